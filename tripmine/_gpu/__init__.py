"""tripmine's GPU backend: the public functions on CuPy arrays.

Reached only through :mod:`tripmine._dispatch` when an input is a CuPy array,
so ``import tripmine`` never imports CuPy.  Same arguments, same validation
messages, same semantics as the CPU path; results are CuPy arrays on the
device of ``x`` (Triplets of int64 arrays, float gradients of the input's
dtype); scalar results (a loss, counts, a metric) are Python numbers, read
back with one device synchronisation per call, as a training loop logs them.

Structure (csrc/cuda/README.md has the details)::

    rows of x in chunks (sized from TRIPMINE_GPU_CHUNK_BYTES)
      -> tile = cupy.matmul(x_chunk, ref.T)            cuBLAS dot products
      -> finish_tile                                   distances, C-core rule
      -> row kernels (csrc/cuda/kernels.cu)            batch-hard argmax/argmin,
         + cupy.argsort / cumsum per row                semi-hard searches,
                                                        batch-all, inverse CDF
      -> dense losses: pair coefficients, then two cupy.matmul per chunk
         accumulate dL/dx and dL/dref (float64 accumulators)

Memory is O(chunk x M) per call besides the O((N + M) D) inputs and
gradients; no N x M (outside the matrix-valued functions) and never N x N x N.

Labels may be NumPy or CuPy arrays: they are mapped to int64 codes on the
host by the CPU's rules (:func:`tripmine._validation.labels`), then copied to
the device.  Embeddings (``x``, ``ref``) and ``out`` must all be CuPy arrays
on one device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np

from .. import _problem as cpu_problem
from .. import _range as cpu_range
from .. import _validation as check
from .. import losses as cpu_losses
from .. import masks as cpu_masks
from .. import metrics as cpu_metrics
from .. import miners as cpu_miners
from ..losses import ContrastiveLossResult, TripletLossResult
from ..miners import Triplets
from . import _kernels as kernels

METRIC_CODES = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}

#: Default memory for one chunk's per-row buffers (tile, sort keys, weights).
DEFAULT_CHUNK_BYTES = 1 << 30

i64, f64, u64, i32 = np.int64, np.float64, np.uint64, np.int32


def chunk_bytes() -> int:
    """The per-chunk memory budget: TRIPMINE_GPU_CHUNK_BYTES or 1 GiB."""
    value = os.environ.get("TRIPMINE_GPU_CHUNK_BYTES", "").strip()
    try:
        return max(1, int(value)) if value else DEFAULT_CHUNK_BYTES
    except ValueError:
        return DEFAULT_CHUNK_BYTES


def chunk_rows(n: int, m: int, bytes_per_entry: int, budget: int | None = None) -> int:
    """Anchor rows per chunk: as many as fit the budget at bytes_per_entry per pair."""
    budget = chunk_bytes() if budget is None else budget
    return int(max(1, min(max(n, 1), budget // max(1, m * bytes_per_entry))))


# ---- validation ----------------------------------------------------------------


def _is_cupy(value: Any) -> bool:
    return isinstance(value, cp.ndarray)


def _device_matrix(value: Any, name: str, check_finite: bool, device_of: Any = None):
    if not _is_cupy(value):
        where = "a NumPy array" if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name} is {where} but the other embeddings are CuPy arrays: pass all "
                        f"of x, ref and out on one device (cupy.asarray / cupy.asnumpy)")
    if value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, "
                        f"got dtype {value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got shape {value.shape}")
    if device_of is not None and value.device.id != device_of.device.id:
        raise ValueError(f"{name} is on GPU {value.device.id} but x is on GPU "
                         f"{device_of.device.id}: they must share a device")
    if check_finite and value.size and not bool(cp.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinity; pass check_finite=False to skip "
                         f"this check (results are then undefined where such values enter)")
    return value


def embeddings(x: Any, ref: Any = None, *, check_finite: bool = True):
    """Device twins of :func:`tripmine._validation.embeddings`."""
    x_arr = _device_matrix(x, "x", check_finite)
    ref_arr = None if ref is None else _device_matrix(ref, "ref", check_finite, x_arr)
    if ref_arr is not None and ref_arr.shape[1] != x_arr.shape[1]:
        raise ValueError(f"ref has {ref_arr.shape[1]} features per row but x has "
                         f"{x_arr.shape[1]}: they must match")
    dtype = np.dtype(np.float64) if any(
        a is not None and a.dtype.itemsize == 8 for a in (x_arr, ref_arr)) else np.dtype(
        np.float32)
    x_arr = cp.ascontiguousarray(x_arr, dtype=dtype)
    if ref_arr is not None:
        ref_arr = cp.ascontiguousarray(ref_arr, dtype=dtype)
    return x_arr, ref_arr


def _host(value: Any) -> Any:
    return cp.asnumpy(value) if _is_cupy(value) else value


def encode_labels(labels: Any, ref_labels: Any = None, *, n: int | None = None,
                  m: int | None = None):
    """Codes by the CPU rules (on the host), returned as device int64 arrays."""
    codes, ref_codes = check.labels(_host(labels), _host(ref_labels), n=n, m=m)
    return cp.asarray(codes), (None if ref_codes is None else cp.asarray(ref_codes))


@dataclass
class Problem:
    """The device form of :class:`tripmine._problem.Problem`."""

    x: Any
    ref: Any  # None in self mode
    codes: Any
    ref_codes: Any
    metric: int
    ref_offset: int | None = None
    x_norms: Any = None  # set by normalize=True
    ref_norms: Any = None

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def m(self) -> int:
        return self.r.shape[0]

    @property
    def r(self):
        return self.x if self.ref is None else self.ref

    @property
    def gallery_codes(self):
        return self.codes if self.ref_codes is None else self.ref_codes

    @property
    def excl_offset(self) -> int:
        """Column a + excl_offset is excluded from anchor a; -1: none."""
        if self.ref is None:
            return 0
        return -1 if self.ref_offset is None else self.ref_offset

    @property
    def rng_offset(self) -> int:
        return self.ref_offset or 0

    def chain(self, grad, ref_grad):
        if self.x_norms is None:
            return grad, ref_grad
        if grad is not None:
            grad = _normalize_backward(grad, self.x, self.x_norms)
        if ref_grad is not None:
            ref_grad = _normalize_backward(ref_grad, self.ref, self.ref_norms)
        return grad, ref_grad


def sqnorms(a):
    """Squared row norms in float64, summed in index order (the C core's order)."""
    out = cp.empty(a.shape[0], dtype=f64)
    kernels.launch("row_sqnorms", a.dtype, a.shape[0], (a, i64(a.shape[0]), i64(a.shape[1]),
                                                        out))
    return out


def _normalize(a):
    norms = cp.sqrt(sqnorms(a))
    safe = cp.where(norms > 0, norms, 1.0)
    return cp.ascontiguousarray(a / safe[:, None].astype(a.dtype), dtype=a.dtype), norms


def _normalize_backward(grad, unit, norms):
    radial = cp.einsum("ij,ij->i", unit.astype(f64), grad.astype(f64))
    g = grad - unit * radial[:, None].astype(grad.dtype)
    safe = cp.where(norms > 0, norms, 1.0)[:, None]
    return cp.where(norms[:, None] > 0, g / safe, 0.0).astype(grad.dtype)


def prepare(x, labels, ref=None, ref_labels=None, *, metric="euclidean", normalize=False,
            check_finite=True, need_labels=True, ref_offset=None) -> Problem:
    metric_id = check.metric_code(metric)
    if (ref is None) != (ref_labels is None) and need_labels:
        missing = "ref_labels" if ref_labels is None else "ref"
        raise ValueError(f"{missing} is required when "
                         f"{'ref' if missing == 'ref_labels' else 'ref_labels'} is given")
    x_arr, ref_arr = embeddings(x, ref, check_finite=check_finite)
    m = x_arr.shape[0] if ref_arr is None else ref_arr.shape[0]
    codes = ref_codes = None
    if need_labels:
        if labels is None:
            raise ValueError("labels is required (one label per row of x)")
        host_codes, host_ref_codes = check.labels(_host(labels), _host(ref_labels),
                                                  n=x_arr.shape[0],
                                                  m=None if ref_arr is None else m)
        codes = cp.asarray(host_codes)
        ref_codes = None if host_ref_codes is None else cp.asarray(host_ref_codes)
    else:
        host_codes = host_ref_codes = None
    # the CPU's rule and messages, labels included (x[i] and ref[offset + i] share a label)
    offset = check.ref_offset(ref_offset, x_arr.shape[0], None if ref_arr is None else m,
                              host_codes, host_ref_codes)
    problem = Problem(x_arr, ref_arr, codes, ref_codes, metric_id, offset)
    # The raw rows, before any normalisation (whose norms would overflow too): one check
    # for every call that prepares a problem, the fused losses included.
    _check_window(x_arr.dtype, sqnorms(x_arr), None if ref_arr is None else sqnorms(ref_arr))
    if check.flag(normalize, "normalize"):
        problem.x, problem.x_norms = _normalize(x_arr)
        if ref_arr is not None:
            problem.ref, problem.ref_norms = _normalize(ref_arr)
    return problem


# ---- distance tiles ------------------------------------------------------------


def _check_window(dtype, *squared_norms) -> None:
    """OutOfRange (the dispatcher's rerun) when a nonzero squared norm leaves the dtype's
    window, the C engine's norms_in_window: the Gram identity's accuracy needs it."""
    low, high = cpu_range.window(dtype)
    for s in squared_norms:
        if s is not None and bool(((s != 0) & ((s < low) | (s > high))).any()):
            raise cpu_range.OutOfRange("rows outside the GPU engine's window")


class _Norms:
    """What finish_tile needs: norms in double (squared, or plain for cosine)
    and squared norms rounded to the working dtype.  Rows whose squared norms leave the
    dtype's window (the C engine's: tripmine._range.window) raise OutOfRange, as
    TM_ERR_RANGE does on the CPU: the dispatcher reruns float32 calls in float64."""

    def __init__(self, problem: Problem):
        dtype = problem.x.dtype
        xs = sqnorms(problem.x)
        rs = xs if problem.ref is None else sqnorms(problem.ref)
        _check_window(dtype, xs, rs)
        self.cosine = problem.metric == METRIC_CODES["cosine"]
        self.x = cp.sqrt(xs) if self.cosine else xs
        self.r = cp.sqrt(rs) if self.cosine else rs
        self.x_real = xs.astype(dtype)
        self.r_real = rs.astype(dtype)


def _tile(problem: Problem, norms: _Norms, row0: int, rows: int, out=None):
    """Distances of anchors [row0, row0 + rows) to every reference row."""
    x, r = problem.x, problem.r
    tile = cp.matmul(x[row0:row0 + rows], r.T, out=out)
    kernels.launch("finish_tile", x.dtype, rows * problem.m,
                   (tile, x, r, norms.x, norms.r, norms.x_real, norms.r_real, i64(rows),
                    i64(row0), i64(problem.m), i64(x.shape[1]), i32(problem.metric),
                    i64(problem.excl_offset)))
    return tile


def _chunks(problem: Problem, bytes_per_entry: int):
    norms = _Norms(problem)
    step = chunk_rows(problem.n, problem.m, bytes_per_entry)
    for row0 in range(0, problem.n, step):
        rows = min(step, problem.n - row0)
        yield row0, rows, _tile(problem, norms, row0, rows)


def _positive_pairs(problem: Problem, row0: int, rows: int):
    """(row in chunk, positive column) of every positive pair, anchor then index order."""
    mask = problem.codes[row0:row0 + rows, None] == problem.gallery_codes[None, :]
    if problem.excl_offset >= 0:
        rows_idx = cp.arange(rows)
        mask[rows_idx, rows_idx + row0 + problem.excl_offset] = False
    return cp.nonzero(mask)


def _sorted_keys(name: str, problem: Problem, tile, row0: int, rows: int):
    """A row-wise stable sort of the usable negatives ("negative_keys") or the
    positives ("positive_keys"): (sorted values, their columns, counts)."""
    keys = cp.empty_like(tile)
    counts = cp.zeros(rows, dtype=u64)
    kernels.launch(name, tile.dtype, rows * problem.m,
                   (tile, i64(rows), i64(row0), i64(problem.m), problem.codes,
                    problem.gallery_codes, i64(problem.excl_offset), keys, counts))
    order = cp.argsort(keys, axis=1)
    return cp.take_along_axis(keys, order, axis=1), order, counts


# ---- public functions: distances and masks -------------------------------------


def pairwise_distances(x, ref=None, *, metric="euclidean", out=None, check_finite=True):
    metric_id = check.metric_code(metric)
    x_arr, ref_arr = embeddings(x, ref, check_finite=check_finite)
    problem = Problem(x_arr, ref_arr, None, None, metric_id)
    shape = (problem.n, problem.m)
    if out is None:
        out = cp.empty(shape, dtype=x_arr.dtype)
    else:
        if not _is_cupy(out):
            raise ValueError(f"out must be a cupy.ndarray on x's device (x is a CuPy array), "
                             f"got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {out.shape}")
        if out.dtype != x_arr.dtype:
            raise ValueError(f"out must have dtype {x_arr.dtype} (the result dtype), got "
                             f"{out.dtype}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if any(a is not None and cp.shares_memory(out, a) for a in (x, ref, x_arr, ref_arr)):
            raise ValueError("out must not share memory with the inputs")
    if out.size:  # the output is the whole matrix: one GEMM, finished in place
        _tile(problem, _Norms(problem), 0, problem.n, out=out)
    return out


def _mask_codes(labels, ref_labels, ref_offset):
    """Device codes of both label sets and the validated ref_offset (CPU rules)."""
    codes, ref_codes = check.labels(_host(labels), _host(ref_labels))
    offset = check.ref_offset(ref_offset, len(codes), None if ref_codes is None else
                              len(ref_codes), codes, ref_codes)
    return cp.asarray(codes), (None if ref_codes is None else cp.asarray(ref_codes)), offset


def positive_mask(labels, ref_labels=None, *, ref_offset=None):
    codes, ref_codes, offset = _mask_codes(labels, ref_labels, ref_offset)
    mask = codes[:, None] == (codes if ref_codes is None else ref_codes)[None, :]
    if ref_codes is None and mask.size:
        cp.fill_diagonal(mask, False)
    if offset is not None and len(codes):  # sample i is ref row offset + i
        rows = cp.arange(len(codes))
        mask[rows, offset + rows] = False
    return mask


def negative_mask(labels, ref_labels=None, *, ref_offset=None):
    codes, ref_codes, _ = _mask_codes(labels, ref_labels, ref_offset)
    return codes[:, None] != (codes if ref_codes is None else ref_codes)[None, :]


def triplet_mask(labels):
    n = len(labels)
    if n > cpu_masks.TRIPLET_MASK_MAX_N:
        return cpu_masks.triplet_mask(np.empty(n))  # raises the CPU's ValueError
    codes, _ = encode_labels(labels)
    same = codes[:, None] == codes[None, :]
    distinct = ~cp.eye(n, dtype=bool)
    return (same & distinct)[:, :, None] & ~same[:, None, :]


# ---- miners ----------------------------------------------------------------------


def _empty_triplets() -> Triplets:
    return Triplets(*(cp.empty(0, dtype=i64) for _ in range(3)))


def mine_batch_hard(problem: Problem) -> Triplets:
    if problem.n == 0:
        return _empty_triplets()
    positive = cp.empty(problem.n, dtype=i64)
    negative = cp.empty(problem.n, dtype=i64)
    kernel = kernels.get("batch_hard", problem.x.dtype)
    for row0, rows, tile in _chunks(problem, problem.x.dtype.itemsize):
        kernel((rows,), (256,), (tile, i64(row0), i64(problem.m), problem.codes,
                                 problem.gallery_codes, i64(problem.excl_offset), positive,
                                 negative))
    keep = (positive >= 0) & (negative >= 0)
    return Triplets(cp.flatnonzero(keep).astype(i64), positive[keep], negative[keep])


def batch_hard(x, labels, *, ref=None, ref_labels=None, metric="euclidean", normalize=False,
               check_finite=True, ref_offset=None):
    return mine_batch_hard(prepare(x, labels, ref, ref_labels, metric=metric,
                                   normalize=normalize, check_finite=check_finite,
                                   ref_offset=ref_offset))


def _subset(triplets: Triplets, max_triplets, seed: int) -> Triplets:
    total = int(triplets.anchor.shape[0])
    if max_triplets is None or total <= max_triplets:
        return triplets
    keep = cp.asarray(cpu_miners._keep_numbers(total, max_triplets, seed))
    return Triplets(*(a[keep] for a in triplets))


def _concat(parts, count=3) -> Triplets:
    if not parts:
        return _empty_triplets()
    return Triplets(*(cp.concatenate([p[k] for p in parts]) for k in range(count)))


# Bytes per (anchor, reference) entry of the sorting ops: tile, keys, sorted
# keys (T each), the order (int64) and argsort's scratch.
def _sort_bytes(dtype) -> int:
    return 4 * np.dtype(dtype).itemsize + 24


def mine_semi_hard(problem: Problem, margin: float, select: str, seed_value: int,
                   max_triplets=None) -> Triplets:
    if problem.n == 0:
        return _empty_triplets()
    dtype = problem.x.dtype
    if select == "all":
        return _semi_hard_all(problem, margin, seed_value, max_triplets)
    parts = []
    for row0, rows, tile in _chunks(problem, _sort_bytes(dtype)):
        sorted_keys, order, neg_count = _sorted_keys("negative_keys", problem, tile, row0, rows)
        pair_row, pair_col = _positive_pairs(problem, row0, rows)
        negative = cp.empty(pair_row.shape[0], dtype=i64)
        kernels.launch("semi_hard_pairs", dtype, pair_row.shape[0],
                       (tile, sorted_keys, order, neg_count, pair_row, pair_col,
                        i64(pair_row.shape[0]), i64(row0), i64(problem.m),
                        i32(0 if select == "closest" else 1), f64(margin), u64(seed_value),
                        i64(problem.rng_offset), negative))
        chosen = negative >= 0
        parts.append(((pair_row + row0)[chosen], pair_col[chosen], negative[chosen]))
    return _subset(_concat(parts), max_triplets, seed_value)


def _semi_hard_all(problem: Problem, margin: float, seed_value: int, max_triplets):
    dtype = problem.x.dtype
    step_pairs, counts = [], []
    for row0, rows, tile in _chunks(problem, _sort_bytes(dtype)):
        sorted_keys, _, neg_count = _sorted_keys("negative_keys", problem, tile, row0, rows)
        pair_row, pair_col = _positive_pairs(problem, row0, rows)
        count = cp.empty(pair_row.shape[0], dtype=i64)
        kernels.launch("semi_hard_all_counts", dtype, pair_row.shape[0],
                       (tile, sorted_keys, neg_count, pair_row, pair_col,
                        i64(pair_row.shape[0]), i64(problem.m), f64(margin), count))
        step_pairs.append((row0, rows, pair_row, pair_col))
        counts.append(count)
    all_counts = cp.concatenate(counts) if counts else cp.empty(0, dtype=i64)
    starts = cp.cumsum(all_counts) - all_counts
    total = int(all_counts.sum()) if all_counts.size else 0
    keep = None
    size = total
    if max_triplets is not None and total > max_triplets:
        keep = cp.asarray(cpu_miners._keep_numbers(total, max_triplets, seed_value))
        size = int(keep.shape[0])
    out = [cp.empty(size, dtype=i64) for _ in range(3)]
    if size == 0:
        return Triplets(*out)
    norms = _Norms(problem)
    first = 0
    for row0, rows, pair_row, pair_col in step_pairs:
        n_pairs = pair_row.shape[0]
        tile = _tile(problem, norms, row0, rows)
        kernels.launch("semi_hard_all_write", dtype, n_pairs,
                       (tile, pair_row, pair_col, starts[first:first + n_pairs],
                        i64(n_pairs), i64(row0), i64(problem.m), problem.codes,
                        problem.gallery_codes, i64(problem.excl_offset), f64(margin),
                        keep if keep is not None else u64(0),
                        i64(0 if keep is None else keep.shape[0]), *out))
        first += n_pairs
    return Triplets(*out)


def semi_hard(x, labels, *, margin=0.2, select="closest", seed=None, max_triplets=None,
              ref=None, ref_labels=None, metric="euclidean", normalize=False,
              check_finite=True, ref_offset=None):
    margin = check.non_negative(margin, "margin")
    check.choice(select, "select", ("closest", "random", "all"))
    max_triplets = check.optional_count(max_triplets, "max_triplets")
    seed_value = cpu_problem.resolve_seed(seed)
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, ref_offset=ref_offset)
    return mine_semi_hard(problem, margin, select, seed_value, max_triplets)


def check_unit_norm(problem: Problem) -> None:
    for name, rows in (("x", problem.x), ("ref", problem.ref)):
        if rows is None or rows.size == 0:
            continue
        norms = cp.sqrt(sqnorms(rows))
        worst = float(cp.max(cp.abs(norms - 1.0)))
        if worst > cpu_miners.UNIT_NORM_TOLERANCE:
            above = float(norms.max()) > 1
            raise ValueError(
                f"distance_weighted needs unit-norm embeddings (its sampling distribution is "
                f"that of points on the unit sphere), but a row of {name} has norm "
                f"{1.0 + worst if above else 1.0 - worst:.4g}; pass normalize=True")


def mine_distance_weighted(problem: Problem, cutoff: float, nonzero_loss_cutoff: float,
                           seed_value: int) -> Triplets:
    if problem.n == 0:
        return _empty_triplets()
    dtype, m = problem.x.dtype, problem.m
    columns = cp.arange(m, dtype=i64)
    parts = []
    for row0, rows, tile in _chunks(problem, dtype.itemsize + 24):
        log_w = cp.empty((rows, m), dtype=f64)
        kernels.launch("weighted_log", dtype, rows * m,
                       (tile, i64(rows), i64(row0), i64(m), problem.codes,
                        problem.gallery_codes, i64(problem.excl_offset), f64(cutoff),
                        f64(nonzero_loss_cutoff), f64(problem.x.shape[1]), log_w))
        eligible = log_w > -np.inf
        last_eligible = cp.where(eligible, columns[None, :], -1).max(axis=1)
        del eligible
        row_max = log_w.max(axis=1) if m else cp.full(rows, -np.inf)
        row_ok = cp.isfinite(row_max).astype(i32)
        kernels.launch("weighted_relative", dtype, rows * m, (log_w, row_max, i64(rows), i64(m)))
        cum = cp.cumsum(log_w, axis=1)
        del log_w
        pair_row, pair_col = _positive_pairs(problem, row0, rows)
        negative = cp.empty(pair_row.shape[0], dtype=i64)
        kernels.launch("weighted_pairs", dtype, pair_row.shape[0],
                       (cum, last_eligible, row_ok, pair_row, pair_col, i64(pair_row.shape[0]),
                        i64(row0), i64(m), u64(seed_value), i64(problem.rng_offset), negative))
        chosen = negative >= 0
        parts.append(((pair_row + row0)[chosen], pair_col[chosen], negative[chosen]))
    return _concat(parts)


def distance_weighted(x, labels, *, cutoff=cpu_miners.DEFAULT_CUTOFF,
                      nonzero_loss_cutoff=cpu_miners.DEFAULT_NONZERO_LOSS_CUTOFF, seed=None,
                      ref=None, ref_labels=None, metric="euclidean", normalize=False,
                      check_finite=True, ref_offset=None):
    cpu_miners.check_weighted_metric(metric)
    cutoff = check.positive_real(cutoff, "cutoff")
    nonzero_loss_cutoff = check.positive_real(nonzero_loss_cutoff, "nonzero_loss_cutoff")
    seed_value = cpu_problem.resolve_seed(seed)
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, ref_offset=ref_offset)
    if not normalize:
        check_unit_norm(problem)
    return mine_distance_weighted(problem, cutoff, nonzero_loss_cutoff, seed_value)


# ---- losses ------------------------------------------------------------------------


class _DenseGradient:
    """Unscaled float64 accumulators of one part of a dense loss: dL/dx and
    dL/dref (the same array in self mode) and the per-reference gamma sums."""

    def __init__(self, problem: Problem, norms: _Norms):
        self.problem, self.norms = problem, norms
        self.gx = cp.zeros(problem.x.shape, dtype=f64)
        self.gr = self.gx if problem.ref is None else cp.zeros(problem.ref.shape, dtype=f64)
        self.gamma = cp.zeros(problem.m, dtype=f64)

    def add(self, w, tile, row0: int, rows: int) -> None:
        p, dtype = self.problem, self.problem.x.dtype
        beta = cp.empty_like(tile)
        side = cp.empty((rows, p.m), dtype=f64)
        kernels.launch("pair_coefficient_tile", dtype, rows * p.m,
                       (w, tile, i64(rows), i64(row0), i64(p.m), i32(p.metric), self.norms.x,
                        self.norms.r, beta, side))
        alpha = side.sum(axis=1)
        if self.norms.cosine:
            nx = self.norms.x[row0:row0 + rows]
            alpha = cp.where(nx > 0, alpha / cp.where(nx > 0, nx * nx, 1.0), 0.0)
        self.gamma += side.sum(axis=0)
        xc = p.x[row0:row0 + rows]
        self.gx[row0:row0 + rows] += alpha[:, None] * xc + cp.matmul(beta, p.r)
        self.gr += cp.matmul(beta.T, xc)

    def finish(self):
        gamma = self.gamma
        if self.norms.cosine:
            nr = self.norms.r
            gamma = cp.where(nr > 0, gamma / cp.where(nr > 0, nr * nr, 1.0), 0.0)
        self.gr += gamma[:, None] * self.problem.r
        return self.gx, (None if self.problem.ref is None else self.gr)


def _to_dtype(acc, scale: float, dtype):
    return None if acc is None else (acc * scale).astype(dtype)


def _batch_all(problem: Problem, margin, soft, reduction, want_grad):
    dtype, n, m = problem.x.dtype, problem.n, problem.m
    per_anchor = cp.zeros(n, dtype=f64)
    active = cp.zeros(n, dtype=u64)
    triplets = cp.zeros(n, dtype=i64)
    norms = _Norms(problem)
    grad = _DenseGradient(problem, norms) if want_grad else None
    columns = cp.arange(m)
    step = chunk_rows(n, m, _sort_bytes(dtype) + 40)
    for row0 in range(0, n, step):
        rows = min(step, n - row0)
        tile = _tile(problem, norms, row0, rows)
        pos_sorted, pos_order, pos_count = _sorted_keys("positive_keys", problem, tile, row0,
                                                        rows)
        neg_count = _negative_count(problem, tile, row0, rows)
        prefix = cp.zeros((rows, m + 1), dtype=f64)
        prefix[:, 1:] = cp.cumsum(pos_sorted.astype(f64), axis=1)
        marks = cp.zeros((rows, m + 1), dtype=cp.uint32)
        pos_weight = cp.zeros((rows, m), dtype=f64) if soft else cp.zeros((1, 1), dtype=f64)
        w = cp.empty((rows, m), dtype=f64)
        kernels.launch("batch_all_negatives", dtype, rows * m,
                       (tile, i64(rows), i64(row0), i64(m), problem.codes,
                        problem.gallery_codes, i64(problem.excl_offset), pos_sorted, prefix,
                        pos_count, f64(margin), i32(int(soft)), w, per_anchor[row0:row0 + rows],
                        active[row0:row0 + rows], marks, pos_weight))
        triplets[row0:row0 + rows] = (pos_count * neg_count).astype(i64)
        if grad is not None:
            ranks = columns[None, :] < pos_count[:, None].astype(i64)
            weights = pos_weight if soft else cp.cumsum(marks[:, :m], axis=1).astype(f64)
            where_rows, where_ranks = cp.nonzero(ranks)
            w[where_rows, pos_order[where_rows, where_ranks]] = weights[where_rows, where_ranks]
            grad.add(w, tile, row0, rows)
    total_loss = float(per_anchor.sum())
    n_triplets, n_active = int(triplets.sum()), int(active.sum())
    scale = _reduction_scale(reduction, n_triplets, n_active)
    loss = per_anchor if reduction == "none" else total_loss * scale
    g = rg = None
    if grad is not None:
        gx, gr = grad.finish()
        g, rg = _to_dtype(gx, scale, dtype), _to_dtype(gr, scale, dtype)
    return loss, n_triplets, n_active, g, rg


def _negative_count(problem: Problem, tile, row0: int, rows: int):
    """Usable negatives per row of the chunk."""
    keys = cp.empty_like(tile)
    counts = cp.zeros(rows, dtype=u64)
    kernels.launch("negative_keys", tile.dtype, rows * problem.m,
                   (tile, i64(rows), i64(row0), i64(problem.m), problem.codes,
                    problem.gallery_codes, i64(problem.excl_offset), keys, counts))
    return counts


def _reduction_scale(reduction: str, count: int, active: int) -> float:
    if reduction == "mean":
        return 1.0 / count if count else 0.0
    if reduction == "mean_nonzero":
        return 1.0 / active if active else 0.0
    return 1.0


def _device_indices(values, dtype=None):
    """One index sequence as a CuPy array (C-contiguous int64 when dtype is given)."""
    return cp.asarray(values) if dtype is None else cp.ascontiguousarray(values, dtype=dtype)


def _given_triplets(triplets, n: int, m: int) -> Triplets:
    """The CPU's checks and messages (tripmine.losses), on device arrays."""
    return cpu_losses._given_triplets(triplets, n, m, as_array=_device_indices)


def _triplet_terms(problem: Problem, triplets: Triplets, margin, soft, reduction, want_grad):
    dtype, t, d = problem.x.dtype, int(triplets.anchor.shape[0]), problem.x.shape[1]
    cosine = problem.metric == METRIC_CODES["cosine"]
    x_norm = cp.sqrt(sqnorms(problem.x)) if cosine else cp.zeros(1, dtype=f64)
    r_norm = (x_norm if problem.ref is None else cp.sqrt(sqnorms(problem.ref))) if cosine \
        else x_norm
    dap, dan, loss = (cp.empty(t, dtype=f64) for _ in range(3))
    kernels.launch("triplet_terms", dtype, t,
                   (problem.x, problem.r, i64(d), i32(problem.metric), x_norm, r_norm,
                    *triplets, i64(t), f64(margin), i32(int(soft)), dap, dan, loss))
    total = float(loss.sum()) if t else 0.0
    active = int((loss > 0).sum()) if t else 0
    scale = _reduction_scale(reduction, t, active)
    g = rg = None
    if want_grad:
        gx = cp.zeros(problem.x.shape, dtype=f64)
        gr = gx if problem.ref is None else cp.zeros(problem.ref.shape, dtype=f64)
        if scale != 0.0:
            kernels.launch("triplet_gradient", dtype, t * d,
                           (problem.x, problem.r, i64(d), i32(problem.metric), x_norm, r_norm,
                            *triplets, i64(t), f64(margin), i32(int(soft)), f64(scale), dap,
                            dan, gx, gr))
        g = gx.astype(dtype)
        rg = None if problem.ref is None else gr.astype(dtype)
    value = loss if reduction == "none" else total * scale
    return value, active, g, rg


def _mine(problem: Problem, mining, margin, metric, normalize, seed):
    """The triplets of a rule other than batch-all (or given ones) and the seed used: the
    device twin of tripmine.losses.mine_triplets."""
    if not isinstance(mining, str):
        return _given_triplets(mining, problem.n, problem.m), None
    if mining == "batch_hard":
        return mine_batch_hard(problem), None
    if mining == "semi_hard":
        return mine_semi_hard(problem, margin, "closest", 0), None
    cpu_miners.check_weighted_metric(metric)
    if not normalize:
        check_unit_norm(problem)
    used_seed = cpu_problem.resolve_seed(seed)
    return mine_distance_weighted(problem, cpu_miners.DEFAULT_CUTOFF,
                                  cpu_miners.DEFAULT_NONZERO_LOSS_CUTOFF, used_seed), used_seed


def triplet_loss(x, labels, *, mining="batch_hard", margin=0.2, soft=False, metric="euclidean",
                 normalize=False, reduction="auto", ref=None, ref_labels=None, seed=None,
                 grad=True, check_finite=True, ref_offset=None):
    margin = check.non_negative(margin, "margin")
    soft = check.flag(soft, "soft")
    want_grad = check.flag(grad, "grad")
    reduction = check.choice(reduction, "reduction", cpu_losses.REDUCTIONS)
    given = not isinstance(mining, str)
    if not given:
        check.choice(mining, "mining", cpu_losses.MINING)
    if reduction == "auto":
        reduction = "mean_nonzero" if mining == "batch_all" else "mean"
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, need_labels=not given, ref_offset=ref_offset)
    if mining == "batch_all":
        loss, n_triplets, active, g, rg = _batch_all(problem, margin, soft, reduction,
                                                     want_grad)
        g, rg = problem.chain(g, rg)
        return TripletLossResult(loss, g, rg, n_triplets, active,
                                 active / n_triplets if n_triplets else 0.0, None)
    triplets, used_seed = _mine(problem, mining, margin, metric, normalize, seed)
    loss, active, g, rg = _triplet_terms(problem, triplets, margin, soft, reduction, want_grad)
    g, rg = problem.chain(g, rg)
    count = int(triplets.anchor.shape[0])
    return TripletLossResult(loss, g, rg, count, active, active / count if count else 0.0,
                             triplets, used_seed)


def margin_loss(x, labels, *, margin=0.2, beta=1.2, nu=0.0, mining="distance_weighted",
                metric="euclidean", normalize=False, reduction="mean", ref=None, ref_labels=None,
                ref_offset=None, seed=None, grad=True, check_finite=True):
    """tripmine.margin_loss on the device: the CPU's checks, the device miners, then the
    array-module terms of tripmine._fused_margin (cuBLAS-free: gathers and scatter-adds)."""
    from .. import _fused_margin
    from .. import margin as cpu_margin
    margin, nu, beta_value, want_grad, reduction = cpu_margin._arguments(
        margin, nu, cp.asnumpy(beta) if _is_cupy(beta) else beta, grad, reduction, mining,
        labels)
    given = not isinstance(mining, str)
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, need_labels=not given, ref_offset=ref_offset)
    if mining == "batch_all":  # every triplet, as pair terms over row blocks
        from . import lifted as gpu_lifted
        anchor_class, beta_a = cpu_margin._triplet_betas(cp, beta_value, labels, problem.n,
                                                         cp.arange(problem.n))
        loss, t, active, per_anchor, beta_grad_a, g, rg = _fused_margin.margin_all_terms(
            cp, problem.x, problem.ref, problem.codes, problem.ref_codes, problem.ref_offset,
            metric, beta_a, margin, nu, reduction, want_grad, gpu_lifted.block_elements())
        g, rg = problem.chain(g, rg)
        return cpu_margin.finish_all(cp, loss, t, active, per_anchor, beta_grad_a,
                                     anchor_class, beta_value, reduction, g, rg)
    triplets, used_seed = _mine(problem, mining, margin, metric, normalize, seed)
    anchor_class, beta_t = cpu_margin._triplet_betas(cp, beta_value, labels, problem.n,
                                                     triplets.anchor)
    loss, active, per, beta_grad_t, g, rg = _fused_margin.margin_terms(
        cp, problem.x, problem.ref, metric, triplets.anchor, triplets.positive,
        triplets.negative, beta_t, margin, "mean_nonzero" if reduction == "mean" else reduction,
        want_grad)
    g, rg = problem.chain(g, rg)
    return cpu_margin.finish(cp, loss, active, per, beta_grad_t, beta_t, anchor_class,
                             beta_value, nu, reduction, g, rg, triplets, used_seed)


def contrastive_loss(x, labels, *, pos_margin=0.0, neg_margin=1.0, power=1, metric="euclidean",
                     normalize=False, reduction="mean_nonzero", ref=None, ref_labels=None,
                     grad=True, check_finite=True, ref_offset=None):
    pos_margin = check.non_negative(pos_margin, "pos_margin")
    neg_margin = check.non_negative(neg_margin, "neg_margin")
    if isinstance(power, (bool, np.bool_)) or power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    want_grad = check.flag(grad, "grad")
    reduction = check.choice(reduction, "reduction", ("mean", "sum", "mean_nonzero", "none"))
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, ref_offset=ref_offset)
    dtype, n, m = problem.x.dtype, problem.n, problem.m
    row_loss = cp.zeros((n, 2), dtype=f64)
    row_counts = cp.zeros((n, 4), dtype=u64)
    norms = _Norms(problem)
    parts = [_DenseGradient(problem, norms), _DenseGradient(problem, norms)] if want_grad \
        else None
    for row0, rows, tile in _chunks(problem, dtype.itemsize * 2 + 32):
        w_pos = cp.empty((rows, m), dtype=f64)
        w_neg = cp.empty((rows, m), dtype=f64)
        kernels.launch("contrastive_pairs", dtype, rows * m,
                       (tile, i64(rows), i64(row0), i64(m), problem.codes,
                        problem.gallery_codes, i64(problem.excl_offset), f64(pos_margin),
                        f64(neg_margin), i32(int(power)), w_pos, w_neg,
                        row_loss[row0:row0 + rows], row_counts[row0:row0 + rows]))
        if parts is not None:
            parts[0].add(w_pos, tile, row0, rows)
            parts[1].add(w_neg, tile, row0, rows)
    sums = [float(v) for v in row_loss.sum(axis=0)] if n else [0.0, 0.0]
    n_pos, n_neg, act_pos, act_neg = ([int(v) for v in row_counts.sum(axis=0)] if n
                                      else [0, 0, 0, 0])
    scale = [1.0, 1.0]
    if reduction == "mean":
        scale = [1.0 / (n_pos + n_neg) if n_pos + n_neg else 0.0] * 2
    elif reduction == "mean_nonzero":
        scale = [1.0 / act_pos if act_pos else 0.0, 1.0 / act_neg if act_neg else 0.0]
    loss = row_loss.sum(axis=1) if reduction == "none" else scale[0] * sums[0] + scale[1] * sums[1]
    g = rg = None
    if parts is not None:
        (gx0, gr0), (gx1, gr1) = parts[0].finish(), parts[1].finish()
        g = (scale[0] * gx0 + scale[1] * gx1).astype(dtype)
        if gr0 is not None:
            rg = (scale[0] * gr0 + scale[1] * gr1).astype(dtype)
    g, rg = problem.chain(g, rg)
    pairs, active = n_pos + n_neg, act_pos + act_neg
    return ContrastiveLossResult(loss, g, rg, pairs, n_pos, n_neg, active,
                                 active / pairs if pairs else 0.0)


# ---- retrieval metrics ----------------------------------------------------------


def _knn(problem: Problem, k: int):
    """k nearest references per query (ties: lower index), -1 / inf padded."""
    n, m, dtype = problem.n, problem.m, problem.x.dtype
    indices = cp.full((n, k), -1, dtype=i64)
    distances = cp.full((n, k), np.inf, dtype=dtype)
    if n == 0 or m == 0:
        return indices, distances
    width = min(k, m)
    for row0, rows, tile in _chunks(problem, _sort_bytes(dtype)):
        keys = cp.where(cp.isnan(tile), cp.inf, tile)
        usable = ~cp.isnan(tile)
        if problem.excl_offset >= 0:
            r = cp.arange(rows)
            keys[r, r + row0 + problem.excl_offset] = cp.inf
            usable[r, r + row0 + problem.excl_offset] = False
        order = cp.argsort(keys, axis=1)[:, :width]
        valid = cp.arange(width)[None, :] < usable.sum(axis=1)[:, None]
        indices[row0:row0 + rows, :width] = cp.where(valid, order, -1)
        distances[row0:row0 + rows, :width] = cp.where(
            valid, cp.take_along_axis(tile, order, axis=1), cp.inf)
    return indices, distances


def nearest_neighbors(x, k, ref=None, *, metric="euclidean", check_finite=True):
    k = check.positive_int(k, "k")
    metric_id = check.metric_code(metric)
    x_arr, ref_arr = embeddings(x, ref, check_finite=check_finite)
    return _knn(Problem(x_arr, ref_arr, None, None, metric_id), k)


def _relevance(x, labels, ref, ref_labels, metric, depth, check_finite):
    """(relevant, r): whether each query's first depth neighbours share its label,
    and R per query (the CPU's _relevance_blocks, in one piece on the device)."""
    if (ref is None) != (ref_labels is None):
        raise ValueError("ref and ref_labels go together: give both (gallery mode) or "
                         "neither (self mode)")
    metric_id = check.metric_code(metric)
    x_arr, ref_arr = embeddings(x, ref, check_finite=check_finite)
    self_mode = ref_arr is None
    n = x_arr.shape[0]
    m = n if self_mode else ref_arr.shape[0]
    codes, ref_codes = encode_labels(labels, ref_labels, n=n, m=m)
    gallery = codes if self_mode else ref_codes
    classes, counts = cp.unique(gallery, return_counts=True)
    if len(classes):
        slot = cp.minimum(cp.searchsorted(classes, codes), len(classes) - 1)
        r = cp.where(classes[slot] == codes, counts[slot], 0).astype(i64)
    else:
        r = cp.zeros(n, dtype=i64)
    if self_mode:
        r = r - 1
    candidates = m - 1 if self_mode else m
    if depth is None:
        depth = int(r.max()) if n else 0
    depth = max(1, min(depth, candidates))
    if n == 0 or candidates <= 0:
        return cp.zeros((n, depth), dtype=bool), r
    indices, _ = _knn(Problem(x_arr, ref_arr, None, None, metric_id), depth)
    found = indices >= 0
    return found & (gallery[cp.where(found, indices, 0)] == codes[:, None]), r


def recall_at_k(x, labels, k=(1, 5), *, ref=None, ref_labels=None, metric="euclidean",
                check_finite=True):
    single, ks = cpu_metrics.parse_ks(k)
    relevant, r = _relevance(x, labels, ref, ref_labels, metric, max(ks), check_finite)
    usable = r > 0
    scored = int(usable.sum())
    first_hit = cp.cumsum(relevant, axis=1) > 0
    out = {}
    for v in ks:
        hits = int(first_hit[:, min(v, relevant.shape[1]) - 1][usable].sum()) if scored else 0
        out[v] = hits / scored if scored else float("nan")
    return out[ks[0]] if single else out


def mean_average_precision_at_r(x, labels, *, ref=None, ref_labels=None, metric="euclidean",
                                check_finite=True):
    relevant, r = _relevance(x, labels, ref, ref_labels, metric, None, check_finite)
    usable = r > 0
    scored = int(usable.sum())
    if not scored:
        return float("nan")
    ranks = cp.arange(1, relevant.shape[1] + 1)
    rel = relevant & (ranks[None, :] <= r[:, None])
    precision = cp.cumsum(rel, axis=1) / ranks[None, :]
    ap = (precision * rel).sum(axis=1) / cp.maximum(r, 1)
    return float(ap[usable].sum()) / scored


# ---- pair heads (their own module, which imports prepare and chunk_bytes from here) ---

from .lifted import lifted_structured_loss as lifted_structured_loss  # noqa: E402
