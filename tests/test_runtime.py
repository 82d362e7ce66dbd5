"""Build facts, environment variables and the command line."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

import tripmine
from tripmine import _core

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TRIPMINE_ISA", "TRIPMINE_NUM_THREADS")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_version_is_consistent():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert tripmine.__version__ == declared == tripmine.build_info()["version"]


def test_build_info_keys():
    info = tripmine.build_info()
    assert set(info) >= {"version", "compiler", "runtime", "threaded", "isa", "isas_usable",
                         "isas_compiled", "num_threads"}
    assert info["isa"] in info["isas_usable"]
    assert info["num_threads"] == tripmine.get_num_threads()


def test_public_api_is_exported():
    for name in tripmine.__all__:
        assert hasattr(tripmine, name), name


def test_import_does_not_import_gpu_or_torch_modules():
    result = _run("import sys, tripmine; print(sorted(m for m in ('cupy', 'torch') "
                  "if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("isa", _core.usable_isas())
def test_environment_forces_isa(isa):
    result = _run("import tripmine; print(tripmine.build_info()['isa'])", TRIPMINE_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa
    assert "Warning" not in result.stderr


def test_environment_unknown_isa_warns_and_falls_back():
    result = _run("import tripmine; print(tripmine.build_info()['isa'])", TRIPMINE_ISA="avx9000")
    assert result.returncode == 0, result.stderr
    assert "ignoring TRIPMINE_ISA='avx9000'" in result.stderr
    assert result.stdout.strip() in _core.usable_isas()


@pytest.mark.parametrize("isa", sorted(set(_core.compiled_isas()) - set(_core.usable_isas())))
def test_environment_compiled_but_unusable_isa_warns(isa):
    # e.g. avx512 on a CPU without AVX-512: never run, never crash.
    result = _run("import tripmine; print(tripmine.build_info()['isa'])", TRIPMINE_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert f"ignoring TRIPMINE_ISA='{isa}'" in result.stderr
    assert result.stdout.strip() != isa


def test_environment_sets_threads():
    result = _run("import tripmine; print(tripmine.get_num_threads())", TRIPMINE_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_environment_bad_thread_count_warns(value):
    result = _run("import tripmine; print(tripmine.get_num_threads())",
                  TRIPMINE_NUM_THREADS=value)
    assert result.returncode == 0, result.stderr
    assert f"ignoring TRIPMINE_NUM_THREADS={value!r}" in result.stderr


def test_info_command_runs_self_check():
    result = subprocess.run([sys.executable, "-m", "tripmine", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tripmine {tripmine.__version__}" in result.stdout
    assert re.search(r"self-check: (\d+)/\1 checks passed", result.stdout)


def test_self_check_detects_a_wrong_result(monkeypatch):
    """The self-check is not vacuous: corrupt the distances and it fails."""
    from tripmine import _selfcheck

    real = _selfcheck.pairwise_distances

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) * 1.001

    monkeypatch.setattr(_selfcheck, "pairwise_distances", off_by_a_bit)
    results = _selfcheck.run()
    assert any(not ok for _, ok, _ in results)


def test_command_line_without_command_prints_help():
    result = subprocess.run([sys.executable, "-m", "tripmine"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "info" in result.stdout


def test_no_warnings_on_import():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _run("import warnings; warnings.simplefilter('error'); import tripmine")
    assert result.returncode == 0, result.stderr


_FORK_SCRIPT = """
import multiprocessing as mp
import sys
import threading
import numpy as np
import tripmine
from tripmine import _core

x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
labels = np.repeat(np.arange(500), 4)
tripmine.set_num_threads(2)
parent = tripmine.triplet_loss(x, labels).loss  # the parent's pool has a worker now
threaded = tripmine.build_info()["threaded"]
assert _core.pool_workers() == (1 if threaded else 0)


def child(_):
    loss = tripmine.triplet_loss(x, labels).loss
    return loss, tripmine.get_num_threads(), _core.pool_workers()


# With "during_call", fork while another thread of the parent is inside a parallel call:
# the child's pool must not inherit that call's state (its pool is reset at fork).
during_call = sys.argv[1] == "during_call"
stop = threading.Event()
def keep_busy():
    while not stop.is_set():
        tripmine.triplet_loss(x, labels)
busy = threading.Thread(target=keep_busy)
if during_call:
    busy.start()
try:
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(child, range(4))
finally:
    stop.set()
    if during_call:
        busy.join()
assert all(loss == parent for loss, _, _ in results), (parent, results)
# Children run threads too: their pools start empty and create a worker.
assert all(t == 2 and w == (1 if threaded else 0) for _, t, w in results), results
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("when", ["after_call", "during_call"])
def test_forked_children_compute_with_threads_instead_of_hanging(when):
    """A child forked from a process whose pool has run (after a call, or while another
    of its threads is in a parallel call) computes the parent's result on threads of its
    own, never hangs: the pool resets itself in the child."""
    if when == "during_call" and tripmine.build_info()["sanitizers"]:
        # Not tripmine's hang: GCC 12's libasan takes no allocator lock around fork()
        # (ASan installs its pthread_atfork handlers only from LLVM PR #75290, GCC 14),
        # so a child forked while the busy thread is inside malloc can inherit a held
        # allocator lock and block in its own first malloc.  It happened once in CI.  The
        # release build, where glibc's malloc is fork-safe, runs this case.
        pytest.skip("the sanitizer runtime of GCC < 14 is not fork-safe while another "
                    "thread allocates")
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, when], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- the thread pool (csrc/pool.c) ----------------------------------------------------

_IDLE_SCRIPT = """
import resource, time
import numpy as np
import tripmine
from tripmine import _core

x = np.random.default_rng(0).standard_normal((1024, 64)).astype(np.float32)
labels = np.repeat(np.arange(256), 4)
tripmine.set_num_threads(4)
for _ in range(3):
    tripmine.triplet_loss(x, labels, mining="batch_all")
workers = _core.pool_workers()
time.sleep(0.05)  # well past the workers' spin (50 us)
before = resource.getrusage(resource.RUSAGE_SELF)
time.sleep(0.5)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(workers, cpu)
"""


@pytest.mark.skipif(not tripmine.build_info()["threaded"], reason="single-threaded build")
def test_idle_workers_use_no_cpu_after_a_call():
    """After a call returns, the pool's workers sleep: over half a second of idleness the
    whole process uses almost no CPU (spinning workers would use about 1.5 s on 3
    workers)."""
    result = _run(_IDLE_SCRIPT)
    assert result.returncode == 0, result.stderr
    workers, cpu = result.stdout.split()
    assert int(workers) == 3  # four threads: the caller and three workers
    assert float(cpu) < 0.05, f"{cpu} s of CPU while idle"


def test_threadpoolctl_lists_and_limits_the_pool():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not hasattr(threadpoolctl, "register"):
        pytest.skip("threadpoolctl < 3.5 has no controller registry")
    previous = tripmine.get_num_threads()
    try:
        tripmine.set_num_threads(3)
        pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "tripmine"]
        assert len(pools) == 1, threadpoolctl.threadpool_info()
        assert pools[0]["num_threads"] == (3 if tripmine.build_info()["threaded"] else 1)
        assert pools[0]["version"] == tripmine.__version__
        assert pools[0]["runtime"] == tripmine.build_info()["runtime"]
        with threadpoolctl.threadpool_limits(limits=1):
            assert tripmine.get_num_threads() == 1
        assert tripmine.get_num_threads() == (3 if tripmine.build_info()["threaded"] else 1)
        with threadpoolctl.threadpool_limits(limits=2, user_api="tripmine"):
            assert tripmine.get_num_threads() == (2 if tripmine.build_info()["threaded"] else 1)
    finally:
        tripmine.set_num_threads(previous)


def test_default_thread_count_follows_omp_num_threads_and_affinity():
    result = _run("import tripmine; print(tripmine.get_num_threads())", OMP_NUM_THREADS="3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("3" if tripmine.build_info()["threaded"] else "1")
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import os, tripmine; print(tripmine.get_num_threads(), "
            "len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={k: v for k, v in environment.items()
                                 if k not in ("TRIPMINE_NUM_THREADS",)}, timeout=120)
    assert result.returncode == 0, result.stderr
    threads, cpus = (int(v) for v in result.stdout.split())
    if tripmine.build_info()["threaded"] and cpus:
        assert threads == min(cpus, 256)


def test_threadpoolctl_skips_other_libraries_named_like_the_extension(tmp_path):
    """threadpoolctl tries tripmine's controller on every library whose file name starts
    with ``_native`` (hypothesis ships one): building it on a stranger must not fail."""
    pytest.importorskip("threadpoolctl")
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]})")
    stranger = tmp_path / "_native_stranger.so"
    source = tmp_path / "stranger.c"
    source.write_text("int stranger_function(void) { return 1; }\n")
    built = subprocess.run(cc + ["-shared", "-fPIC", str(source), "-o", str(stranger)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    code = (f"import ctypes, tripmine, threadpoolctl; ctypes.CDLL({str(stranger)!r}); "
            "apis = [p['user_api'] for p in threadpoolctl.threadpool_info()]; "
            "print(apis.count('tripmine'))")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("1" if hasattr(__import__("threadpoolctl"), "register")
                                     else "0")


@pytest.mark.parametrize("environ, cpus, expected", [
    ({}, 2, "set OPENBLAS_THREAD_TIMEOUT=4"),
    ({"OPENBLAS_THREAD_TIMEOUT": "4"}, 2, "OPENBLAS_THREAD_TIMEOUT=4"),
    ({"OPENBLAS_NUM_THREADS": "1"}, 8, "OPENBLAS_NUM_THREADS=1 (one thread"),
    ({"OMP_NUM_THREADS": "1"}, 8, "OMP_NUM_THREADS=1 (one thread"),
    ({"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "1"}, 8, "set OPENBLAS_THREAD_TIMEOUT"),
    ({}, 1, "one CPU"),
])
def test_info_advises_on_openblas_spinning(environ, cpus, expected):
    """`python -m tripmine info` names NumPy's BLAS and, for an OpenBLAS whose workers will
    spin beside tripmine's threads, the environment variable that stops them."""
    from tripmine.__main__ import blas_advice

    openblas = {"name": "scipy-openblas", "version": "0.3.31"}
    assert expected in blas_advice(environ, openblas, cpus)
    assert blas_advice(environ, {"name": "accelerate", "version": "14"}, cpus) == \
        "accelerate 14"


def test_info_prints_the_blas_line():
    result = subprocess.run([sys.executable, "-m", "tripmine", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^  numpy BLAS    \S", result.stdout, re.MULTILINE)
