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
             d: int = D, **extra) -> None:
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
        d=d,
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


# --- machine and thread facts for the standalone scripts ------------------------------

# Environment variables that change a thread count or a spin policy of tripmine, OpenMP,
# OpenBLAS, MKL or torch.  The scripts print the ones that are set.
THREAD_ENV = ("TRIPMINE_NUM_THREADS", "TRIPMINE_SPIN_US", "TRIPMINE_ISA",
              "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "OMP_DYNAMIC",
              "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_NUM_THREADS",
              "MKL_DYNAMIC", "KMP_BLOCKTIME", "KMP_AFFINITY")


def thread_env() -> dict[str, str]:
    """The variables of ``THREAD_ENV`` that are set in this process's environment."""
    return {name: os.environ[name] for name in THREAD_ENV if name in os.environ}


def cpu_facts() -> dict:
    """The CPU as ``lscpu`` describes it (``LC_ALL=C``), with ``/proc/cpuinfo`` as the
    fallback: ``model_name``, ``cpus``, ``cores_per_socket``, ``sockets``,
    ``threads_per_core``, ``hypervisor`` (None where unknown) and ``flags`` (a list)."""
    import subprocess

    fields: dict[str, str] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10,
                              env=dict(os.environ, LC_ALL="C")).stdout
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if "Model name" not in fields or "Flags" not in fields:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    key, sep, value = line.partition(":")
                    if sep and key.strip() in ("model name", "flags"):
                        fields.setdefault("Model name" if key.strip() == "model name"
                                          else "Flags", value.strip())
        except OSError:
            pass

    def number(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    return {
        "model_name": fields.get("Model name"),
        "cpus": number("CPU(s)") or os.cpu_count(),
        "cores_per_socket": number("Core(s) per socket"),
        "sockets": number("Socket(s)"),
        "threads_per_core": number("Thread(s) per core"),
        "hypervisor": fields.get("Hypervisor vendor"),
        "flags": fields.get("Flags", "").split(),
    }


def describe_cpu(facts: dict) -> str:
    """One line: model name, CPUs, cores and threads per core, hypervisor."""
    line = f"{facts['model_name'] or '?'}, {facts['cpus']} CPUs"
    cores, sockets, smt = (facts.get(k) for k in ("cores_per_socket", "sockets",
                                                  "threads_per_core"))
    if cores and sockets:
        line += f" ({sockets} socket(s) x {cores} cores x {smt or '?'} threads per core)"
    if facts.get("hypervisor"):
        line += f", {facts['hypervisor']} guest"
    return line


def thread_pools() -> list[dict] | None:
    """``threadpoolctl.threadpool_info()`` (every thread pool loaded in this process and its
    ``num_threads``), or None when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


def describe_pools(pools: list[dict] | None) -> list[str]:
    """One line per thread pool of ``thread_pools()``; without threadpoolctl, the OpenBLAS
    thread count found by ``blas_threads()``."""
    if pools is None:
        return [f"(threadpoolctl not installed) OpenBLAS num_threads={blas_threads()}"]
    if not pools:
        return ["(no thread pools found)"]
    lines = []
    for pool in pools:
        extra = ", ".join(f"{k}={pool[k]}" for k in ("threading_layer", "architecture")
                          if pool.get(k))
        lines.append(f"{pool.get('user_api')}/{pool.get('internal_api')} "
                     f"{pool.get('prefix')} {pool.get('version') or ''}".rstrip()
                     + f": num_threads={pool.get('num_threads')}"
                     + (f" ({extra})" if extra else "") + f"  [{pool.get('filepath')}]")
    return lines


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process), or None.

    Busy = user + nice + system + irq + softirq from /proc/stat (Linux only)."""
    import resource

    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, _idle, _iowait, irq, softirq = fields
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (time.perf_counter(), (user + nice + system + irq + softirq) / tick,
            own.ru_utime + own.ru_stime)


def others_cpu(before, after) -> float | None:
    """Share of all CPUs that *other* processes used between two ``cpu_snapshot()``s
    (0 = this process had the machine to itself, 1 = others kept every core busy)."""
    if before is None or after is None:
        return None
    wall, busy, own = (a - b for a, b in zip(after, before))
    if wall <= 0:
        return None
    return round(min(max(busy - own, 0.0) / (wall * (os.cpu_count() or 1)), 1.0), 3)
