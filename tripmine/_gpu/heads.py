"""The margin-softmax heads on CuPy arrays (reached from tripmine.heads when ``x`` and
``weight`` are CuPy arrays): validation on the device, then the class-block walk of
:mod:`tripmine._fused_heads` with cuBLAS products.  Results are CuPy arrays on ``x``'s
device; ``loss`` is a Python float (one synchronisation), or a device vector for
``reduction="none"``.

Block size: ``TRIPMINE_GPU_CHUNK_BYTES`` (default 1 GiB) over the bytes of one class's
column of logits and their float64 exponentials (N x 12 bytes), so memory stays
O(N block + (N + C) D).
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from .. import _fused_heads
from .. import _range as cpu_range
from .. import _validation as check
from .. import heads as cpu_heads
from ..heads import REDUCTIONS, SoftmaxLossResult
from . import chunk_bytes


def _device_vector(value: Any, name: str, length: int, dtype, what: str):
    arr = cp.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real-valued vector, got dtype {arr.dtype}")
    if arr.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) ({what}), got shape {arr.shape}")
    arr = cp.ascontiguousarray(arr, dtype=dtype)
    if not bool(cp.isfinite(arr).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def device_matrix(value, name: str, check_finite: bool) -> None:
    """A float matrix on the device, finite where asked (also the center loss's check)."""
    if value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype "
                        f"{value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {value.shape}")
    if check_finite and value.size and not bool(cp.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinity; pass check_finite=False to "
                         f"skip this check")


def run(head: dict, x, labels, weight, *, bias=None, class_weight=None, reduction="mean",
        grad=True, weight_grad=True, upstream=None, check_finite=True) -> SoftmaxLossResult:
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    want_grad = check.flag(grad, "grad")
    want_wgrad = check.flag(weight_grad, "weight_grad") and want_grad
    check_finite = check.flag(check_finite, "check_finite")
    for name, value in (("x", x), ("weight", weight)):
        device_matrix(value, name, check_finite)
    if x.device.id != weight.device.id:
        raise ValueError(f"weight is on GPU {weight.device.id} but x is on GPU {x.device.id}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} features per row but x has "
                         f"{x.shape[1]}: weight must be (num_classes, {x.shape[1]})")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (one per class)")
    n, c = x.shape[0], weight.shape[0]
    dtype = np.dtype(np.float64 if 8 in (x.dtype.itemsize, weight.dtype.itemsize)
                     else np.float32)
    # Labels are checked on the host by the CPU's rules (the same messages).
    host_labels = cp.asnumpy(labels) if isinstance(labels, cp.ndarray) else labels
    codes = cp.asarray(cpu_heads.class_labels(host_labels, n, c))
    x = cp.ascontiguousarray(x, dtype=dtype)
    weight = cp.ascontiguousarray(weight, dtype=dtype)
    b = None if bias is None else _device_vector(bias, "bias", c, dtype,
                                                 "one entry per row of weight")
    cw = None
    if class_weight is not None:
        cw = _device_vector(class_weight, "class_weight", c, np.float64,
                            "one entry per row of weight")
        if bool((cw < 0).any()):
            raise ValueError("class_weight must be >= 0")
    up = None
    if upstream is not None:
        if reduction != "none":
            raise ValueError("upstream weighs per-sample gradients: it needs reduction='none'")
        up = _device_vector(upstream, "upstream", n, np.float64, "one entry per sample")
    block = int(max(1, min(c, chunk_bytes() // max(1, 12 * n))))
    loss, per, correct, g, wg, bg = _fused_heads.fused_head(
        cp, head, x, codes, weight, b, cw, reduction, want_grad, want_wgrad, up, block)
    # As on the CPU: float32 logits W.x that overflowed raise OutOfRange (tripmine.heads
    # reruns the call in float64); a loss beyond the compute dtype raises.
    peak = float(cp.max(cp.abs(per))) if reduction == "none" and n else abs(float(loss))
    if dtype.itemsize == 4 and not peak <= cpu_range.F32_MAX:
        raise cpu_range.OutOfRange(f"the {head['kind']} head")
    cpu_range.check_loss_fits(peak, f"the {head['kind']} head", dtype.itemsize, check_finite)
    return SoftmaxLossResult(per if reduction == "none" else float(loss), g, wg, bg, n, correct,
                             correct / n if n else 0.0)
