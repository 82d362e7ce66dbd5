"""Center loss (Wen et al. 2016) with its gradients, and the paper's center update.

``center_loss(x, labels, centers)`` is L = 1/2 sum_i ||x_i - c_{y_i}||^2 (divided by N for
``reduction="mean"``), with ``grad`` = dL/dx and ``centers_grad`` = dL/dC for callers that
learn the centers by gradient descent.  ``update_centers(centers, x, labels, alpha=0.5)``
is the paper's rule instead (its Algorithm 1, eq. 4), applied in place:

    delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),    c_j <- c_j - alpha * delta_j,

for every class j with n_j > 0 samples in the batch (other centers are untouched).  The
1 / (1 + n_j) factor keeps a class that fills the batch from jumping its center; several
popular ports drop it (see the README's compatibility rows).

Both are O(N D) in the C core (csrc/center.c): no N x C distance matrix, sums in double,
per class in sample order, so the results do not depend on the thread count.  CuPy inputs
run on the GPU (tripmine._gpu.center).  The paper trains the center loss beside a softmax
head: ``total = softmax + lambda * center``, with ``lambda`` about 0.003-0.01 and ``alpha``
0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core, _range
from . import _validation as check
from ._dispatch import is_cupy
from .heads import REDUCTIONS, class_labels

__all__ = ["CenterLossResult", "center_loss", "update_centers"]


@dataclass(frozen=True)
class CenterLossResult:
    """What :func:`center_loss` returns.

    ``loss`` is a float (an (N,) vector of per-sample losses for ``reduction="none"``);
    ``grad`` = dL/dx (N, D) and ``centers_grad`` = dL/dC (C, D; zero rows for classes
    without samples) are None when not computed.  For ``"none"`` the gradients are those of
    the sum of the per-sample losses (times ``upstream`` when given).
    """

    loss: Any
    grad: Any
    centers_grad: Any
    n_samples: int


def _alpha(value: Any, name: str = "alpha") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {check._describe(value)}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the paper's alpha is 0.5), "
                         f"got {value}")
    return value


def _centers_shape(centers: np.ndarray, d: int) -> None:
    if centers.shape[1] != d:
        raise ValueError(f"centers has {centers.shape[1]} features per row but x has {d}: "
                         f"centers must be (num_classes, {d})")
    if centers.shape[0] < 1:
        raise ValueError("centers must have at least one row (one per class)")


def _upstream(value: Any, reduction: str, n: int) -> np.ndarray | None:
    if value is None:
        return None
    if reduction != "none":
        raise ValueError("upstream weighs per-sample gradients: it needs reduction='none'")
    arr = check._as_array(value, "upstream")
    if arr.dtype.kind not in "fiu" or arr.shape != (n,):
        raise ValueError(f"upstream must be a real vector of shape ({n},) (one entry per "
                         f"sample), got dtype {arr.dtype} and shape {arr.shape}")
    arr = check.c_array(arr, np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("upstream contains NaN or infinity")
    return arr


def _writable_centers(centers: Any) -> None:
    """Refuses centers that cannot be updated in place (update_centers, update=)."""
    if not isinstance(centers, np.ndarray):
        raise TypeError(f"centers must be a NumPy array (updated in place), got "
                        f"{check._describe(centers)}")
    if centers.dtype not in (np.float32, np.float64) or not centers.dtype.isnative:
        raise ValueError(f"centers must be a float32 or float64 array in native byte order "
                         f"(it is updated in place), got dtype {centers.dtype}")
    if centers.ndim != 2:
        raise ValueError(f"centers must be 2-D (num_classes, D), got shape {centers.shape}")
    if not centers.flags.writeable:
        raise ValueError("centers is read-only: update_centers writes it in place")
    if not (centers.flags.c_contiguous and centers.flags.aligned):
        raise ValueError("centers must be C-contiguous and aligned (it is updated in place; "
                         "np.ascontiguousarray makes a copy you can keep)")


def _update_operands(centers: np.ndarray, x_arr: np.ndarray,
                     centers_checked: bool = False) -> np.ndarray:
    """x in centers' dtype for the update, after the checks that need both (overlap,
    finiteness of centers, x within centers' range); nothing is written yet."""
    if np.shares_memory(x_arr, centers):
        raise ValueError("x shares memory with centers: pass a copy of the embeddings")
    if not centers_checked and centers.size and \
            not (np.isfinite(centers.min()) and np.isfinite(centers.max())):
        raise ValueError("centers contains NaN or infinity")
    with np.errstate(over="ignore"):  # refused just below, rather than warned about
        x_cast = check.c_array(x_arr, centers.dtype)
    if x_arr.dtype.itemsize > centers.dtype.itemsize and x_cast.size and \
            not (np.isfinite(x_cast.min()) and np.isfinite(x_cast.max())):
        raise ValueError(f"x has values beyond the range of centers' dtype {centers.dtype} "
                         f"(it is read in that dtype)")
    return x_cast


def center_loss(x: Any, labels: Any, centers: Any, *, reduction: str = "mean",
                grad: bool = True, centers_grad: bool = True, upstream: Any = None,
                check_finite: bool = True, update: float | None = None) -> CenterLossResult:
    """Center loss of ``x`` (N, D) against ``centers`` (C, D), one row per class.

    ``labels`` are integer class indices in [0, C).  ``reduction``: ``"mean"`` (divide by
    N), ``"sum"`` or ``"none"``; ``grad`` / ``centers_grad`` select the gradients;
    ``upstream`` (N,) with ``"none"`` weighs each sample's gradient (the chain rule of an
    autograd caller); ``check_finite`` refuses NaN and infinity in ``x`` and ``centers``.
    float32 and float64 compute in their own precision (float64 when either is), float16
    in float32.

    ``update=alpha`` also takes the paper's training step in the same call: after the loss
    and gradients (from the centers as they were), ``centers`` is moved **in place** as
    :func:`update_centers` does with that alpha (same requirements on ``centers``; refused
    input changes nothing).  One validation of the inputs instead of two.
    """
    alpha = None if update is None else _alpha(update, "update")
    if is_cupy(x) or is_cupy(centers):
        if not (is_cupy(x) and is_cupy(centers)):
            raise TypeError("mixed devices: x and centers must both be CuPy arrays (or both "
                            "host arrays); move them to one side (cupy.asarray / cupy.asnumpy)")
        from ._gpu import center as gpu_center
        result = gpu_center.center_loss(x, labels, centers, reduction=reduction, grad=grad,
                                        centers_grad=centers_grad, upstream=upstream,
                                        check_finite=check_finite)
        if alpha is not None:  # after the loss, which read the centers as they were
            gpu_center.update_centers(centers, x, labels, alpha=alpha)
        return result
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    want_grad = check.flag(grad, "grad")
    want_cgrad = check.flag(centers_grad, "centers_grad")
    check_finite = check.flag(check_finite, "check_finite")
    if alpha is not None:
        _writable_centers(centers)
    x_arr = check._float_matrix(x, "x", check_finite or alpha is not None)
    c_arr = check._float_matrix(centers, "centers", check_finite)
    _centers_shape(c_arr, x_arr.shape[1])
    dtype = check.compute_dtype(x_arr, c_arr)
    n = x_arr.shape[0]
    codes = class_labels(labels, n, c_arr.shape[0], "centers")
    up = _upstream(upstream, reduction, n)
    x_update = None if alpha is None else _update_operands(centers, x_arr, check_finite)
    x_arr, c_arr = check.c_array(x_arr, dtype), check.c_array(c_arr, dtype)
    loss, per_sample, g, cg = _core.center_loss(x_arr, codes, c_arr, reduction, want_grad,
                                                want_cgrad, upstream=up)
    # Before the update: a refused loss leaves the centers as they were.
    _range.check_loss_fits(per_sample if reduction == "none" else float(loss), "center_loss",
                           dtype.itemsize, check_finite or alpha is not None)
    if alpha is not None:  # after the loss: c_arr may be centers itself
        _core.update_centers(centers, x_update, codes, alpha)
    return CenterLossResult(per_sample if reduction == "none" else float(loss), g, cg, n)


def update_centers(centers: Any, x: Any, labels: Any, *, alpha: float = 0.5) -> Any:
    """The paper's center update, **in place** on ``centers``; returns ``centers``.

    For every class j with n_j > 0 rows of ``x`` labelled j:
    ``c_j -= alpha * sum_{y_i = j} (c_j - x_i) / (1 + n_j)`` (computed in double, rounded
    once).  ``centers`` must be a writable, C-contiguous float32 or float64 array (a
    CuPy array on the GPU); ``x`` is read in ``centers``' dtype and must not share memory
    with it.  ``alpha`` in [0, inf) (the paper uses 0.5; 0 leaves the centers unchanged).
    Nothing is modified when an argument is refused.
    """
    if is_cupy(x) or is_cupy(centers):
        if not (is_cupy(x) and is_cupy(centers)):
            raise TypeError("mixed devices: centers and x must both be CuPy arrays (or both "
                            "host arrays)")
        from ._gpu import center as gpu_center
        return gpu_center.update_centers(centers, x, labels, alpha=alpha)
    alpha = _alpha(alpha)
    _writable_centers(centers)
    x_arr = check._float_matrix(x, "x", True)
    _centers_shape(centers, x_arr.shape[1])
    codes = class_labels(labels, x_arr.shape[0], centers.shape[0], "centers")
    x_cast = _update_operands(centers, x_arr)
    _core.update_centers(centers, x_cast, codes, alpha)
    return centers
