"""The center loss and the paper's update on CuPy arrays (reached from tripmine.center when
``x`` and ``centers`` are CuPy arrays): validation with the CPU's messages, then the
array-module code of :mod:`tripmine._fused_center`.  Results are CuPy arrays on ``x``'s
device; ``loss`` is a Python float (one synchronisation), or a device vector for
``reduction="none"``."""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from .. import _fused_center
from .. import _range as cpu_range
from .. import _validation as check
from .. import center as cpu_center
from ..heads import REDUCTIONS, class_labels
from .heads import device_matrix


def _codes(labels: Any, n: int, c: int):
    host = cp.asnumpy(labels) if isinstance(labels, cp.ndarray) else labels
    return cp.asarray(class_labels(host, n, c, "centers"))


def center_loss(x, labels, centers, *, reduction="mean", grad=True, centers_grad=True,
                upstream=None, check_finite=True) -> cpu_center.CenterLossResult:
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    want_grad = check.flag(grad, "grad")
    want_cgrad = check.flag(centers_grad, "centers_grad")
    check_finite = check.flag(check_finite, "check_finite")
    device_matrix(x, "x", check_finite)
    device_matrix(centers, "centers", check_finite)
    if x.device.id != centers.device.id:
        raise ValueError(f"centers is on GPU {centers.device.id} but x is on GPU "
                         f"{x.device.id}")
    cpu_center._centers_shape(centers, x.shape[1])
    dtype = np.dtype(np.float64 if 8 in (x.dtype.itemsize, centers.dtype.itemsize)
                     else np.float32)
    n = x.shape[0]
    codes = _codes(labels, n, centers.shape[0])
    up = None
    if upstream is not None:
        if reduction != "none":
            raise ValueError("upstream weighs per-sample gradients: it needs reduction='none'")
        up = cp.asarray(upstream)
        if up.dtype.kind not in "fiu" or up.shape != (n,):
            raise ValueError(f"upstream must be a real vector of shape ({n},) (one entry per "
                             f"sample), got dtype {up.dtype} and shape {up.shape}")
        up = up.astype(cp.float64)
        if not bool(cp.isfinite(up).all()):
            raise ValueError("upstream contains NaN or infinity")
    x = cp.ascontiguousarray(x, dtype=dtype)
    centers = cp.ascontiguousarray(centers, dtype=dtype)
    loss, per, g, cg = _fused_center.center_loss(cp, x, codes, centers, reduction, want_grad,
                                                 want_cgrad, up)
    # As on the CPU: a loss beyond the compute dtype raises (before any update of the
    # centers, which tripmine.center makes after this returns).
    peak = float(cp.max(cp.abs(per))) if reduction == "none" and n else abs(float(loss))
    cpu_range.check_loss_fits(peak, "center_loss", dtype.itemsize, check_finite)
    return cpu_center.CenterLossResult(per if reduction == "none" else loss, g, cg, n)


def update_centers(centers, x, labels, *, alpha=0.5):
    alpha = cpu_center._alpha(alpha)
    if centers.dtype not in (np.float32, np.float64) or centers.ndim != 2:
        raise ValueError(f"centers must be a 2-D float32 or float64 array (updated in place), "
                         f"got dtype {centers.dtype} and shape {centers.shape}")
    if not centers.flags.c_contiguous:
        raise ValueError("centers must be C-contiguous (it is updated in place)")
    device_matrix(x, "x", True)
    if x.device.id != centers.device.id:
        raise ValueError(f"centers is on GPU {centers.device.id} but x is on GPU "
                         f"{x.device.id}")
    cpu_center._centers_shape(centers, x.shape[1])
    if cp.shares_memory(x, centers):
        raise ValueError("x shares memory with centers: pass a copy of the embeddings")
    codes = _codes(labels, x.shape[0], centers.shape[0])
    if not bool(cp.isfinite(centers).all()):
        raise ValueError("centers contains NaN or infinity")
    _fused_center.update_centers(cp, centers, cp.ascontiguousarray(x, dtype=centers.dtype),
                                 codes, alpha)
    return centers
