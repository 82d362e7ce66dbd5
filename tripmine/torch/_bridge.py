"""Tensors in, arrays for tripmine out, and back: the only place that knows devices.

CPU tensors are handed over as NumPy views (``Tensor.numpy()``): a C-contiguous
float32/float64 tensor reaches the C core without a copy, and the gradients the
C core writes into fresh arrays come back as tensors without a copy
(``torch.from_numpy``).  CUDA tensors go to tripmine's CuPy path through
DLPack (``cupy.from_dlpack``), with CuPy running on torch's current stream, and
the results come back through ``torch.from_dlpack``.

float16 and bfloat16 are computed in float32 (NumPy has no bfloat16, and the
C core computes float16 in float32 anyway); the autograd function casts the
gradient back to the input's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

#: Dtypes tripmine computes in float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype tripmine computes in: float64 if any input is, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_embeddings(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {t.dtype}")
    return t


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "tripmine.torch got a CUDA tensor: its GPU path runs on CuPy, which is not "
            "installed (pip install cupy-cuda12x, matching your CUDA), or move the "
            "embeddings to the CPU with .cpu()") from exc
    return cupy


class Backend:
    """Where one call computes: ``"cpu"`` (NumPy views) or ``"cuda"`` (CuPy via DLPack)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if device.type not in ("cpu", "cuda"):
            raise TypeError(f"tripmine.torch computes on CPU or CUDA tensors, got a tensor on "
                            f"{device}")
        self.cupy = _cupy() if self.cuda else None

    @contextlib.contextmanager
    def stream(self):
        """Run CuPy work on torch's current stream (no cross-stream races, no syncs)."""
        if not self.cuda:
            yield
            return
        cupy = self.cupy
        stream = torch.cuda.current_stream(self.device)
        with cupy.cuda.Device(self.device.index), \
                cupy.cuda.ExternalStream(stream.cuda_stream):
            yield

    def array(self, t: torch.Tensor | None):
        """The embeddings as tripmine takes them; a view whenever the dtype allows."""
        if t is None:
            return None
        t = t.detach()
        if t.device != self.device:
            raise ValueError(f"all embeddings must be on one device, got {t.device} and "
                             f"{self.device}")
        if t.dtype in HALF_DTYPES:
            t = t.float()
        if self.cuda:
            # Contiguous here, where torch copies on the current stream, rather than
            # leaving strided DLPack views to the GPU path.
            return self.cupy.from_dlpack(t.contiguous())
        return t.numpy()  # strided views are copied by tripmine's validation

    def labels(self, labels: Any):
        """Labels for tripmine on this backend: a torch tensor (any device) or array-like."""
        if labels is None:
            return None
        if isinstance(labels, torch.Tensor):
            labels = labels.detach()
            if self.cuda:
                return self.cupy.from_dlpack(labels.to(self.device).contiguous())
            return labels.cpu().numpy()
        return labels  # array-like: host labels, which the GPU path takes too

    def tensor(self, a) -> torch.Tensor | None:
        """A result array of tripmine's as a tensor on this device, without a copy."""
        if a is None:
            return None
        if isinstance(a, np.ndarray):
            t = torch.from_numpy(a)
            return t.to(self.device) if self.cuda else t
        return torch.from_dlpack(a)

    def scalar(self, value, dtype: torch.dtype) -> torch.Tensor:
        """A loss value (Python float, NumPy vector or device array) as a tensor of ``dtype``."""
        if isinstance(value, (float, int, np.floating)):
            return torch.tensor(float(value), dtype=dtype, device=self.device)
        return self.tensor(value).to(dtype)


def label_tensor(labels: Any, device: torch.device) -> torch.Tensor:
    """Integer labels as an int64 tensor on ``device`` (for the memory bank)."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integers to be stored in a MemoryBank, got "
                            f"{labels.dtype}")
        return labels.detach().to(device=device, dtype=torch.int64)
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"labels must be integers to be stored in a MemoryBank, got dtype "
                        f"{arr.dtype}; map them to class numbers first")
    return torch.as_tensor(arr.astype(np.int64, copy=False), device=device)
