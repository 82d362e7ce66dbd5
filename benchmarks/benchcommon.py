"""Helpers shared by the benchmark modules: OpenBLAS thread control, the ``gemm``
baseline, the ``extra_info`` every case records, and the timing and skip bookkeeping
of the optional peer cases (``TRIPMINE_BENCH_PEERS=1``).

``benchmarks/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` and the
benchmark modules (and ``conftest.py``) import this as ``benchcommon``.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

import tripmine

D = 128
SEED = 20240601


def bench_threads() -> int:
    """Thread count for tripmine and OpenBLAS: ``TRIPMINE_BENCH_THREADS``, default 2."""
    return int(os.environ.get("TRIPMINE_BENCH_THREADS", "2"))


def _find_openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS NumPy uses, or None."""
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure BLAS is loaded
    try:
        with open("/proc/self/maps") as f:  # Linux only
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_{}64_", "scipy_openblas_{}", "openblas_{}"):
            get = getattr(lib, name.format("get_num_threads"), None)
            put = getattr(lib, name.format("set_num_threads"), None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                return get, put
    return None


_BLAS = _find_openblas()


def blas_threads() -> int | None:
    return int(_BLAS[0]()) if _BLAS else None


def set_blas_threads(n: int) -> None:
    if _BLAS:
        _BLAS[1](n)


def describe(benchmark, group: str, case: str, n: int, *, op: str | None, impl: str,
             **extra) -> None:
    """Set the group and the ``extra_info`` that report.py and RESULTS.md rely on.

    ``op`` is what the case computes (``"distances"``, ``"batch_hard"``, ...; None for
    the ``gemm`` baseline) and ``impl`` who computes it and how much of it (``"tripmine"``,
    ``"tripmine, miner only"``, ``"numpy"``, ``"pml"``, ...): report.py draws one subplot
    per op and one line per impl."""
    benchmark.group = group
    benchmark.extra_info.update(
        case=case,
        op=op,
        impl=impl,
        n=n,
        d=D,
        dtype="float32",
        isa=tripmine.build_info()["isa"],
        tripmine_threads=tripmine.get_num_threads(),
        blas_threads=blas_threads(),
        loadavg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **extra,
    )


def gemm_operands(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y, buf)`` for the ``gemm`` baseline: ``y = x.T`` made contiguous (so that
    NumPy calls sgemm, not ssyrk) and an N x N float32 output buffer."""
    return np.ascontiguousarray(x.T), np.empty((x.shape[0], x.shape[0]), dtype=np.float32)


def run_gemm(benchmark, x: np.ndarray, y: np.ndarray, buf: np.ndarray) -> None:
    """The ratio baseline of every group: ``np.matmul(x, y, out=buf)`` (OpenBLAS sgemm)."""
    result = benchmark(np.matmul, x, y, out=buf)
    assert result is buf


# --- peers (TRIPMINE_BENCH_PEERS=1) ---------------------------------------------------

# Calls faster than this are timed like the tripmine cases (pytest-benchmark calibrates
# the rounds).  Slower ones get ``PEER_BUDGET_S / call`` rounds of one call (1 to 10)
# after the estimating call, which doubles as the warm-up.
PEER_FAST_S = 0.25
PEER_BUDGET_S = 6.0

# Cases not measured in this run, with the reason; conftest.py writes them into the JSON's
# machine_info["skipped_cases"] and report.py lists them under the table.
SKIPPED: list[dict] = []


def skip_case(group: str, case: str, n: int, reason: str) -> None:
    """Skip the current case and record why (pytest -rs shows the reason too)."""
    SKIPPED.append({"group": group, "case": case, "n": n, "reason": reason})
    pytest.skip(f"{case} N={n}: {reason}")


def time_peer(benchmark, fn, *args):
    """Time ``fn(*args)``: pytest-benchmark's calibrated rounds for fast calls, a few
    pedantic rounds of one call for slow ones.  Returns the last result."""
    if benchmark.disabled:
        return benchmark(fn, *args)
    start = time.perf_counter()
    fn(*args)
    estimate = time.perf_counter() - start
    benchmark.extra_info["first_call_s"] = round(estimate, 4)
    if estimate < PEER_FAST_S:
        return benchmark(fn, *args)
    rounds = max(1, min(10, int(PEER_BUDGET_S / estimate)))
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=0)
