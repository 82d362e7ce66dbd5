"""Finding, compiling and launching the CUDA kernels of ``csrc/cuda``.

The ``.cu`` sources ship as package data (``tripmine/_gpu/cuda/``, copied from
``csrc/cuda`` by setup.py's build step); an editable install reads them from
the source tree.  Each dtype's module is compiled once per process and
device, at first use, by ``cupy.RawModule`` (NVRTC; CuPy also caches the
binary on disk, in ``~/.cupy/kernel_cache``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KERNEL_FILES = ("kernels.cu", "row_logic.cuh")

#: NVRTC options: no fused multiply-add, so that the float32 logarithm and the
#: Gram-identity rounding match the C core operation for operation (the C core
#: is built with -ffp-contract=off); IEEE division and square root (the default).
COMPILE_OPTIONS = ("--std=c++14", "--fmad=false")

_SUFFIX = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}
_modules: dict = {}


def source_dir() -> Path:
    """The folder holding kernels.cu: package data first, then the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda", here.parent.parent / "csrc" / "cuda"):
        if (candidate / KERNEL_FILES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"tripmine's CUDA sources ({KERNEL_FILES[0]}) are missing from {here / 'cuda'} and "
        f"from the source tree; reinstall tripmine")


def source_text(dtype: np.dtype) -> str:
    """kernels.cu for one dtype, with row_logic.cuh inlined (NVRTC then needs no
    include path, and the text is all the compile cache keys on)."""
    folder = source_dir()
    real, suffix = _SUFFIX[np.dtype(dtype)]
    logic = (folder / "row_logic.cuh").read_text()
    body = (folder / "kernels.cu").read_text().replace('#include "row_logic.cuh"', logic)
    return f"#define TM_REAL {real}\n#define TM_SUFFIX {suffix}\n{body}"


def get(name: str, dtype: np.dtype):
    """The compiled kernel ``name`` for dtype (float32 or float64) on the current device."""
    import cupy

    dtype = np.dtype(dtype)
    key = (cupy.cuda.Device().id, dtype)
    module = _modules.get(key)
    if module is None:
        module = cupy.RawModule(code=source_text(dtype), options=COMPILE_OPTIONS)
        _modules[key] = module
    return module.get_function(f"{name}_{_SUFFIX[dtype][1]}")


def launch(name: str, dtype: np.dtype, count: int, args: tuple, block: int = 256) -> None:
    """One thread per item (count items)."""
    if count <= 0:
        return
    get(name, dtype)(((count + block - 1) // block,), (block,), args)
