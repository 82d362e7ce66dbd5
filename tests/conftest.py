"""Shared fixtures and the one table of per-dtype tolerances."""

from __future__ import annotations

import ctypes
import shlex
import shutil
import subprocess
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

import tripmine
from tripmine import _core

FLOAT_DTYPES = (np.float32, np.float64)

#: A TRIPMINE_SANITIZE build (README, "Reliability"): memory bounds do not apply there.
SANITIZED = bool(tripmine.build_info()["sanitizers"])
skip_if_sanitized = pytest.mark.skipif(
    SANITIZED, reason="memory bounds are measured on a release build: ASan's shadow memory and "
                      "quarantine inflate RSS and it reserves terabytes of address space")
METRICS = ("euclidean", "sqeuclidean", "cosine")


def distance_rtol(dtype, d: int) -> float:
    """Relative tolerance of a computed distance against the exact one.

    float64: the issue's 1e-10 (measured worst ~1e-13).  float32: the Gram
    identity's dot product accumulates ~eps*sqrt(d) relative error, and pairs
    closer than 1/64 of their norms are recomputed exactly, so the relative
    error stays near eps*sqrt(d); measured worst 2.9e-5 at d = 2000.
    """
    if np.dtype(dtype) == np.float64:
        return 1e-10
    return 16 * float(np.finfo(np.float32).eps) * (np.sqrt(d) + 4)


def loss_rtol(dtype, d: int) -> float:
    """Error of a loss term relative to the distances entering it
    (d(a,p) + d(a,n) + margin for a triplet, the distance for a pair).

    The mined losses recompute their distances exactly, but batch-all and
    contrastive take them from the tile, and normalize=True rounds the rows in
    the input precision: the distance tolerance, with headroom for the few
    distances (and the accumulation) in each term.
    """
    return 4 * distance_rtol(dtype, d)


@pytest.fixture(params=_core.usable_isas())
def isa(request):
    """Run a test once per instruction set this machine can execute."""
    previous = _core.get_isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(previous)


@pytest.fixture
def threads():
    """Restore the thread count after a test that changes it."""
    previous = tripmine.get_num_threads()
    yield
    tripmine.set_num_threads(previous)


@pytest.fixture
def rng(request):
    # A per-test seed derived from the test id: reproducible and independent.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="session")
def runtime_lib(tmp_path_factory):
    """csrc/runtime.c (with the pool it calls) built alone: its internal helpers, through
    ctypes."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]})")
    out = tmp_path_factory.mktemp("clib") / "libtm_runtime.so"
    cmd = cc + ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                "-fno-math-errno", "-fPIC", "-shared", "-pthread", f"-I{CSRC}",
                str(CSRC / "runtime.c"), str(CSRC / "pool.c"), "-o", str(out), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.tm_log_array_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.tm_log_array_f32.restype = None
    lib.tm_exp_nonpositive_array_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.tm_exp_nonpositive_array_f32.restype = None
    return lib
