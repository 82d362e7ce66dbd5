"""Build facts, environment variables and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
    assert set(info) >= {"version", "compiler", "openmp", "isa", "isas_usable", "isas_compiled",
                         "num_threads"}
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
import numpy as np
import tripmine

x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
labels = np.repeat(np.arange(500), 4)
tripmine.set_num_threads(2)
parent = tripmine.triplet_loss(x, labels).loss  # runs a thread team when OpenMP is on


def child(_):
    return tripmine.triplet_loss(x, labels).loss, tripmine.get_num_threads()


with mp.get_context("fork").Pool(2) as pool:
    results = pool.map(child, range(2))
assert all(loss == parent for loss, _ in results), (parent, results)
assert all(threads == 1 for _, threads in results) or not tripmine.build_info()["openmp"]
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_compute_instead_of_hanging():
    """GNU OpenMP's pool does not survive fork(); a forked child must still
    compute (single-threaded) and give the parent's result, not hang."""
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
