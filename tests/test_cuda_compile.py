"""Every CUDA source compiles with the local nvcc, warning-free, so a syntax
error in csrc/cuda cannot land unseen on a machine without a GPU.

Both forms are compiled for both dtypes: kernels.cu as it stands (with the
header on the include path) and the exact text tripmine._gpu hands to NVRTC
(header inlined, dtype macros prepended), with the NVRTC options.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
ARCH = "sm_90"  # H100; the kernels need sm_60+ (double atomicAdd)

# tripmine._gpu imports CuPy; its kernel loader alone does not: load that file.
_spec = importlib.util.spec_from_file_location("tripmine_gpu_kernels",
                                               ROOT / "tripmine" / "_gpu" / "_kernels.py")
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")


def _nvcc(source: Path, out: Path, *extra: str) -> None:
    command = [NVCC, "-ptx", f"-arch={ARCH}", *kernels.COMPILE_OPTIONS, "-Werror",
               "all-warnings", *extra, str(source), "-o", str(out)]
    # Not under the sanitizer run's preloaded ASan runtime: nvcc itself is not built for it
    # (it dies with a segmentation fault there).
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stderr
    assert out.stat().st_size > 0


def test_every_cu_file_is_known():
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu*")) == sorted(kernels.KERNEL_FILES)


@pytest.mark.parametrize("real,suffix", [("float", "f32"), ("double", "f64")])
def test_kernels_compile(tmp_path, real, suffix):
    for source in CUDA_DIR.glob("*.cu"):
        _nvcc(source, tmp_path / f"{source.stem}_{suffix}.ptx", f"-I{CUDA_DIR}",
              f"-DTM_REAL={real}", f"-DTM_SUFFIX={suffix}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_nvrtc_text_compiles_and_exports_every_kernel(tmp_path, dtype):
    source = tmp_path / f"tripmine_{dtype}.cu"
    source.write_text(kernels.source_text(dtype))
    ptx = tmp_path / f"tripmine_{dtype}.ptx"
    _nvcc(source, ptx)
    text = ptx.read_text()
    suffix = "f32" if dtype == "float32" else "f64"
    defined = set(re.findall(r"^TM_KERNEL\((\w+)\)", (CUDA_DIR / "kernels.cu").read_text(),
                             re.M))
    gpu_module = (ROOT / "tripmine" / "_gpu" / "__init__.py").read_text()
    used = set(re.findall(r'kernels\.(?:launch|get)\("(\w+)"', gpu_module))
    assert used <= defined, used - defined
    for name in defined:
        assert f".entry {name}_{suffix}(" in text, name
