"""Shared settings for the tripmine benchmarks (not part of the normal test run).

Run with ``python -m pytest benchmarks/ --benchmark-json=results.json``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import tripmine

# Seconds to sleep before each benchmark so that the spinning worker threads of
# the previous case's runtime (libgomp for tripmine, OpenBLAS for NumPy) go idle
# and do not steal cores from the next case.  Small next to the run time.
SETTLE_S = 0.25


@pytest.fixture(autouse=True)
def settle():
    """Let the previous case's thread pools go to sleep before timing."""
    time.sleep(SETTLE_S)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tripmine_build_info"] = tripmine.build_info()
    machine_info["numpy_version"] = np.__version__
    machine_info["bench_threads_env"] = os.environ.get("TRIPMINE_BENCH_THREADS", "2")
    machine_info["nproc"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        machine_info["loadavg_at_start"] = os.getloadavg()
