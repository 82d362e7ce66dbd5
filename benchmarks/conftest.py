"""Shared settings for the tripmine benchmarks (not part of the normal test run).

Run with ``python -m pytest benchmarks/ --benchmark-json=results.json``.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import tripmine
from benchcommon import SKIPPED, bench_threads, blas_threads, cpu_snapshot, set_blas_threads

# Seconds to sleep before each benchmark so that the spinning worker threads of
# the previous case's runtime (libgomp for tripmine, OpenBLAS for NumPy) go idle
# and do not steal cores from the next case.  Small next to the run time.
SETTLE_S = 0.25

# 1/5/15-minute load averages when the benchmark session started (conftest import).
LOADAVG_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


@pytest.fixture(autouse=True)
def settle(request):
    """Let the previous case's thread pools go to sleep before timing, then record in
    ``extra_info["others_cpu"]`` the share of all CPUs that *other* processes used
    while the case ran (0 = the case had the machine to itself, 1 = others kept every
    core busy)."""
    time.sleep(SETTLE_S)
    before = cpu_snapshot()
    yield
    after = cpu_snapshot()
    bench = request.node.funcargs.get("benchmark")
    if before is None or after is None or bench is None:
        return
    wall, busy, own = (a - b for a, b in zip(after, before))
    if wall > 0:
        others = max(busy - own, 0.0) / (wall * (os.cpu_count() or 1))
        bench.extra_info["others_cpu"] = round(min(others, 1.0), 3)


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


@pytest.fixture(scope="session")
def peers():
    """torch and pytorch-metric-learning, torch pinned to TRIPMINE_BENCH_THREADS threads
    (intra-op; MKL and ATen's OpenMP pool), or a skip when the peers are off or missing.

    torch is imported only here, so a run without TRIPMINE_BENCH_PEERS=1 never loads it
    (nor its OpenMP runtime and MKL) into the process that times tripmine."""
    if os.environ.get("TRIPMINE_BENCH_PEERS", "0") != "1":
        pytest.skip("peer baselines are off (set TRIPMINE_BENCH_PEERS=1)")
    torch = pytest.importorskip("torch")
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    old = torch.get_num_threads()
    torch.set_num_threads(bench_threads())
    yield SimpleNamespace(torch=torch, distances=distances, losses=losses, miners=miners,
                          reducers=reducers, pml_version=pml.__version__)
    torch.set_num_threads(old)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tripmine_build_info"] = tripmine.build_info()
    machine_info["numpy_version"] = np.__version__
    machine_info["bench_threads_env"] = os.environ.get("TRIPMINE_BENCH_THREADS", "2")
    machine_info["bench_peers_env"] = os.environ.get("TRIPMINE_BENCH_PEERS", "0")
    machine_info["nproc"] = os.cpu_count()
    if "torch" in sys.modules:  # the peers ran (their thread count is in extra_info)
        machine_info["torch_version"] = sys.modules["torch"].__version__
    if "pytorch_metric_learning" in sys.modules:
        machine_info["pml_version"] = sys.modules["pytorch_metric_learning"].__version__
    machine_info["skipped_cases"] = list(SKIPPED)
    if LOADAVG_AT_START is not None:
        machine_info["loadavg_at_start"] = LOADAVG_AT_START
        machine_info["loadavg_at_end"] = os.getloadavg()
