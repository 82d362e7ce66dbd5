"""The validated form of a mining problem, shared by miners and losses.

``prepare`` turns user inputs into what the C core takes (native dtype,
C-contiguous embeddings, shared int64 label codes, a metric code), applying
``normalize=True`` on the way; ``Problem.chain`` carries gradients back
through that normalisation to the caller's original embeddings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validation as check


@dataclass
class Problem:
    x: np.ndarray  # what the C core sees (normalised if asked)
    ref: np.ndarray | None  # None in self mode
    codes: np.ndarray | None  # None when labels were not needed
    ref_codes: np.ndarray | None
    metric: int
    x_norms: np.ndarray | None = None  # set when normalize=True
    ref_norms: np.ndarray | None = None
    ref_offset: int | None = None  # x[i] is ref[ref_offset + i] (reference mode only)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def m(self) -> int:
        return self.x.shape[0] if self.ref is None else self.ref.shape[0]

    def chain(self, grad: np.ndarray | None, ref_grad: np.ndarray | None):
        """Gradients w.r.t. the normalised rows -> w.r.t. the original rows."""
        if self.x_norms is None:
            return grad, ref_grad
        if grad is not None:
            grad = _normalize_backward(grad, self.x, self.x_norms)
        if ref_grad is not None:
            ref_grad = _normalize_backward(ref_grad, self.ref, self.ref_norms)
        return grad, ref_grad


#: Row norms (in double) whose rows are divided in their own precision: the reciprocal and
#: the quotient stay normal numbers there.  Others take a power-of-two route (below).
_PLAIN_NORMS = {4: (2.0 ** -60, 2.0 ** 60), 8: (2.0 ** -480, 2.0 ** 480)}


def _normalize(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows divided by their L2 norm (zero rows stay zero), and the norms (float64; inf where
    a float64 row's norm passes the largest double, its unit row still exact)."""
    # Non-finite rows (possible only with check_finite=False) give NaN rows, silently.
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
        low, high = _PLAIN_NORMS.get(a.dtype.itemsize, (0.0, np.inf))
        safe = np.where(norms > 0, norms, 1.0)
        unit = np.ascontiguousarray(a / safe[:, None].astype(a.dtype), dtype=a.dtype)
        odd = np.flatnonzero((norms < low) | (norms > high))  # zero rows among them
        odd = odd[np.any(a[odd] != 0, axis=1)] if odd.size else odd
        if odd.size:
            # Squares that under- or overflowed: each row brought to magnitude ~1 by a
            # power of two first (exact), its norm found there, then scaled back.
            rows = a[odd].astype(np.float64)
            top = np.max(np.abs(rows), axis=1)
            exponent = np.floor(np.log2(top))
            scaled = np.ldexp(rows, -exponent[:, None].astype(np.int64))
            scaled_norms = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
            unit[odd] = (scaled / scaled_norms[:, None]).astype(a.dtype)
            norms[odd] = np.ldexp(scaled_norms, exponent.astype(np.int64))
        return unit, norms


def _normalize_backward(grad: np.ndarray, unit: np.ndarray, norms: np.ndarray,
                        block: int = 4096) -> np.ndarray:
    """d/dx of f(x / |x|) from g = df/du: (g - u (u . g)) / |x|; 0 for zero rows.

    Works in place on ``grad`` (a fresh array of ours), a block of rows at a
    time, so it needs no N x D temporaries.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, grad.shape[0], block):
            g = grad[start:start + block]
            u = unit[start:start + block]
            radial = np.einsum("ij,ij->i", u, g, dtype=np.float64)
            n = norms[start:start + block]
            g -= u * radial[:, None].astype(g.dtype)
            # Divide by |x| (kept in float64) rather than multiply by 1/|x|: for a
            # float32 row below 2.9e-39 the reciprocal overflows float32 (0 * inf = NaN).
            safe = np.where(n > 0, n, 1.0)[:, None]
            g[:] = np.where(n[:, None] > 0, g / safe, 0.0)
    # 1 / |x| beyond the dtype (rows of norm below ~1e-38 in float32): the true gradient
    # does not fit, which must not come back as inf.  Checked only where such rows exist.
    small = _PLAIN_NORMS.get(grad.dtype.itemsize, (0.0, 0.0))[0]
    if norms.size and np.any((norms > 0) & (norms < small)) and not np.isfinite(grad).all():
        raise FloatingPointError(
            f"the gradient through normalize=True overflows {grad.dtype}: rows of norm "
            f"{norms[norms > 0].min():.3g} scale it by 1/|x|; pass float64 embeddings")
    return grad


def prepare(x: Any, labels: Any, ref: Any = None, ref_labels: Any = None, *,
            metric: str = "euclidean", normalize: bool = False, check_finite: bool = True,
            need_labels: bool = True, ref_offset: Any = None) -> Problem:
    metric_id = check.metric_code(metric)
    if (ref is None) != (ref_labels is None) and need_labels:
        missing = "ref_labels" if ref_labels is None else "ref"
        raise ValueError(f"{missing} is required when "
                         f"{'ref' if missing == 'ref_labels' else 'ref_labels'} is given")
    x_arr, ref_arr = check.embeddings(x, ref, check_finite=check_finite)
    codes = ref_codes = None
    if need_labels:
        if labels is None:
            raise ValueError("labels is required (one label per row of x)")
        codes, ref_codes = check.labels(labels, ref_labels, n=x_arr.shape[0],
                                        m=None if ref_arr is None else ref_arr.shape[0])
    offset = check.ref_offset(ref_offset, x_arr.shape[0],
                              None if ref_arr is None else ref_arr.shape[0], codes, ref_codes)
    problem = Problem(x_arr, ref_arr, codes, ref_codes, metric_id, ref_offset=offset)
    if check.flag(normalize, "normalize"):
        problem.x, problem.x_norms = _normalize(x_arr)
        if ref_arr is not None:
            problem.ref, problem.ref_norms = _normalize(ref_arr)
    return problem


def positive_offsets(problem: Problem) -> np.ndarray:
    """offsets[a]..offsets[a+1]: anchor a's slots, one per positive (n + 1 entries)."""
    ref_codes = problem.codes if problem.ref_codes is None else problem.ref_codes
    classes, class_sizes = np.unique(ref_codes, return_counts=True)
    where = np.searchsorted(classes, problem.codes)
    where = np.minimum(where, max(len(classes) - 1, 0))
    found = (classes[where] == problem.codes) if len(classes) else np.zeros(problem.n, bool)
    counts = np.where(found, class_sizes[where] if len(classes) else 0, 0).astype(np.int64)
    if problem.ref is None or problem.ref_offset is not None:
        counts -= 1  # an anchor is not its own positive
    offsets = np.zeros(problem.n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def resolve_seed(seed: Any) -> int:
    """A validated 64-bit seed; fresh OS entropy for None."""
    if seed is None:
        return secrets.randbits(64)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be None or a non-negative integer, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)
