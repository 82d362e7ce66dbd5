"""Shared settings for the tripmine benchmarks (not part of the normal test run).

Run with ``python -m pytest benchmarks/ --benchmark-json=results.json``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from benchcommon import bench_threads, blas_threads, set_blas_threads

import tripmine

# Seconds to sleep before each benchmark so that the spinning worker threads of
# the previous case's runtime (libgomp for tripmine, OpenBLAS for NumPy) go idle
# and do not steal cores from the next case.  Small next to the run time.
SETTLE_S = 0.25

# 1/5/15-minute load averages when the benchmark session started (conftest import).
LOADAVG_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


@pytest.fixture(autouse=True)
def settle():
    """Let the previous case's thread pools go to sleep before timing."""
    time.sleep(SETTLE_S)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """Pin tripmine and NumPy's OpenBLAS (when reachable) to TRIPMINE_BENCH_THREADS."""
    n = bench_threads()
    old_tm, old_blas = tripmine.get_num_threads(), blas_threads()
    tripmine.set_num_threads(n)
    set_blas_threads(n)
    yield n
    tripmine.set_num_threads(old_tm)
    if old_blas is not None:
        set_blas_threads(old_blas)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tripmine_build_info"] = tripmine.build_info()
    machine_info["numpy_version"] = np.__version__
    machine_info["bench_threads_env"] = os.environ.get("TRIPMINE_BENCH_THREADS", "2")
    machine_info["bench_peers_env"] = os.environ.get("TRIPMINE_BENCH_PEERS", "0")
    machine_info["nproc"] = os.cpu_count()
    if LOADAVG_AT_START is not None:
        machine_info["loadavg_at_start"] = LOADAVG_AT_START
        machine_info["loadavg_at_end"] = os.getloadavg()
