"""Internal C helpers that no public function exposes directly, built alone
from their source and called through ctypes."""

from __future__ import annotations

import ctypes
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="module")
def runtime_lib(tmp_path_factory):
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]})")
    out = tmp_path_factory.mktemp("clib") / "libtm_runtime.so"
    cmd = cc + ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                "-fno-math-errno", "-fPIC", "-shared", f"-I{CSRC}", str(CSRC / "runtime.c"),
                "-o", str(out), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.tm_log_array_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.tm_log_array_f32.restype = None
    return lib


def test_log_array_f32_is_accurate_to_a_few_ulp(runtime_lib):
    # Every 499th float from the smallest normal to the largest finite one.
    bits = np.arange(0x00800000, 0x7F800000, 499, dtype=np.uint32)
    x = bits.view(np.float32).copy()
    got = x.copy()
    runtime_lib.tm_log_array_f32(got.ctypes.data, got.size)
    exact = np.log(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    away = np.abs(exact) > 1e-3
    assert (err[away] / ulp[away]).max() < 4.0
    assert err[~away].max() < 1e-9  # near x = 1 the error is absolute and tiny
    # Exact where it must be: ln 1 = 0, and powers of two are e ln 2 to float precision.
    one = np.array([1.0, 2.0, 0.5, 1024.0], dtype=np.float32)
    runtime_lib.tm_log_array_f32(one.ctypes.data, one.size)
    assert one[0] == 0.0
    np.testing.assert_allclose(one[1:], np.log([2.0, 0.5, 1024.0]), rtol=1e-7)
