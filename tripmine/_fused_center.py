"""The center loss and the paper's update written once for an array module (NumPy or CuPy).

The GPU path (:mod:`tripmine._gpu.center`) runs these with CuPy; the tests run them with
NumPy against the C core (csrc/center.c), which computes the same sums in double.  Memory is
O(N D) (one float64 copy of the residuals); never N x C.  Per-class sums are scatter-adds:
in sample order with NumPy (as the C core), in the order of the GPU's atomics with CuPy (the
float64 sums then agree to rounding, not always to the bit).
"""

from __future__ import annotations

from typing import Any


def _scatter_add(xp: Any, out: Any, index: Any, values: Any) -> None:
    if xp.__name__ == "numpy":
        xp.add.at(out, index, values)
    else:  # CuPy
        import cupyx
        cupyx.scatter_add(out, index, values)


def center_loss(xp: Any, x: Any, codes: Any, centers: Any, reduction: str, want_grad: bool,
                want_cgrad: bool, upstream: Any = None):
    """(loss, per_sample, grad, centers_grad) of 1/2 sum_i |x_i - c_{y_i}|^2, x and centers
    already in the computing dtype, codes int64 in [0, C)."""
    n = x.shape[0]
    f64 = xp.float64
    residual = x.astype(f64) - centers[codes].astype(f64)
    per_sample = 0.5 * (residual * residual).sum(axis=1)
    red = 1.0 / n if reduction == "mean" and n else 1.0
    total = float(per_sample.sum()) * red
    g = xp.full(n, red, dtype=f64) if upstream is None else red * upstream.astype(f64)
    weighted = residual * g[:, None]
    grad = weighted.astype(x.dtype) if want_grad else None
    centers_grad = None
    if want_cgrad:
        acc = xp.zeros(centers.shape, dtype=f64)
        _scatter_add(xp, acc, codes, -weighted)
        centers_grad = acc.astype(centers.dtype)
    return total, (per_sample if reduction == "none" else None), grad, centers_grad


def update_centers(xp: Any, centers: Any, x: Any, codes: Any, alpha: float) -> None:
    """c_j -= alpha sum_{y_i = j} (c_j - x_i) / (1 + n_j), in place, in double."""
    if x.shape[0] == 0:
        return
    f64 = xp.float64
    acc = xp.zeros(centers.shape, dtype=f64)
    _scatter_add(xp, acc, codes, centers[codes].astype(f64) - x.astype(f64))
    counts = xp.bincount(codes, minlength=centers.shape[0]).astype(f64)
    step = alpha / (1.0 + counts)
    centers[...] = (centers.astype(f64) - step[:, None] * acc).astype(centers.dtype)
