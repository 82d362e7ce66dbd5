"""The CPU side of the GPU path: backend choice, mixed-device errors, keyword
forwarding, lazy loading and packaging -- all checkable without a GPU (and
without CuPy: CuPy arrays are stood in for by a class from a "cupy" module)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tripmine
from tripmine import _dispatch

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    "pairwise_distances": tripmine.pairwise_distances,
    "positive_mask": tripmine.positive_mask,
    "negative_mask": tripmine.negative_mask,
    "triplet_mask": tripmine.triplet_mask,
    "batch_hard": tripmine.batch_hard,
    "semi_hard": tripmine.semi_hard,
    "distance_weighted": tripmine.distance_weighted,
    "triplet_loss": tripmine.triplet_loss,
    "contrastive_loss": tripmine.contrastive_loss,
    "margin_loss": tripmine.margin_loss,
    "lifted_structured_loss": tripmine.lifted_structured_loss,
    "nearest_neighbors": tripmine.metrics.nearest_neighbors,
    "recall_at_k": tripmine.metrics.recall_at_k,
    "mean_average_precision_at_r": tripmine.metrics.mean_average_precision_at_r,
}


class FakeDeviceArray:
    """Looks like a CuPy array to the dispatcher (its type lives in 'cupy')."""

    __module__ = "cupy._core.core"

    def __init__(self, shape=(4, 2)):
        self.shape = shape


def test_import_tripmine_never_imports_cupy():
    code = ("import sys, numpy as np, tripmine; "
            "tripmine.batch_hard(np.eye(4), np.array([0, 0, 1, 1])); "
            "tripmine.triplet_loss(np.eye(4), np.array([0, 0, 1, 1])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cupy' "
            "or m.startswith('tripmine._gpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_is_cupy_by_module_name():
    assert _dispatch.is_cupy(FakeDeviceArray())
    assert not _dispatch.is_cupy(np.zeros(2))
    assert not _dispatch.is_cupy([1, 2])
    assert not _dispatch.is_cupy(None)


@pytest.mark.parametrize("bound,expected", [
    ({"x": np.zeros((2, 2)), "labels": np.zeros(2)}, "cpu"),
    ({"x": FakeDeviceArray(), "labels": np.zeros(2)}, "gpu"),
    ({"x": FakeDeviceArray(), "labels": FakeDeviceArray()}, "gpu"),
    ({"x": FakeDeviceArray(), "ref": FakeDeviceArray(), "ref_labels": [1, 2]}, "gpu"),
    ({"labels": FakeDeviceArray()}, "gpu"),  # masks
    ({"labels": [0, 1]}, "cpu"),
    ({"x": [[0.0, 1.0]], "labels": [0]}, "cpu"),
    ({"x": FakeDeviceArray(), "mining": (FakeDeviceArray(),) * 3}, "gpu"),
])
def test_backend_choice(bound, expected):
    assert _dispatch.backend(bound) == expected


@pytest.mark.parametrize("bound,names", [
    ({"x": FakeDeviceArray(), "ref": np.zeros((2, 2))}, "x on the GPU (CuPy) but ref"),
    ({"x": np.zeros((2, 2)), "ref": FakeDeviceArray()}, "ref on the GPU (CuPy) but x"),
    ({"x": FakeDeviceArray(), "out": np.zeros((2, 2))}, "x on the GPU (CuPy) but out"),
    ({"x": np.zeros((2, 2)), "labels": FakeDeviceArray()}, "labels on the GPU (CuPy) but x"),
    ({"x": FakeDeviceArray(), "mining": (np.zeros(1),) * 3}, "but mining"),
])
def test_mixed_devices_are_refused(bound, names):
    with pytest.raises(TypeError, match="mixed devices") as info:
        _dispatch.backend(bound)
    assert names in str(info.value)


def test_public_call_with_mixed_devices_raises():
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.batch_hard(np.eye(3), FakeDeviceArray((3,)))
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.triplet_loss(FakeDeviceArray(), [0, 1, 1, 0], ref=np.eye(4), ref_labels=[0] * 4)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_function_forwards_all_arguments(monkeypatch, name):
    calls = []
    monkeypatch.setattr(_dispatch, "_gpu_function",
                        lambda fn: lambda *a, **k: calls.append((fn, a, k)) or "gpu result")
    func = PUBLIC[name]
    device = FakeDeviceArray()
    params = list(inspect.signature(func.__wrapped_cpu__).parameters)
    args = (device,) if params[0] in ("x", "labels") else ()
    kwargs = {"ref_offset": 3, "a_future_keyword": "kept"}
    if params[0] == "labels":
        kwargs = {"ref_labels": [1, 2]}
    assert func(*args, **kwargs) == "gpu result"
    assert calls == [(name, args, kwargs)]


def test_cpu_calls_are_untouched():
    x = np.random.default_rng(0).normal(size=(12, 3))
    y = np.arange(12) % 3
    for got, want in zip(tripmine.batch_hard(x, y), tripmine.batch_hard.__wrapped_cpu__(x, y)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError):  # an unknown keyword still fails on the CPU path
        tripmine.batch_hard(x, y, no_such_keyword=1)


def test_missing_cupy_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # "import cupy" now fails
    monkeypatch.delitem(sys.modules, "tripmine._gpu", raising=False)
    monkeypatch.delattr(tripmine, "_gpu", raising=False)
    with pytest.raises(ImportError, match="pip install cupy-cuda12x"):
        tripmine.batch_hard(FakeDeviceArray(), [0, 0, 1, 1])


def _gpu_signatures(module: str = "__init__") -> dict[str, list[str]]:
    """The functions tripmine._gpu defines or imports from its own submodules (read from
    the source: CuPy is not importable here)."""
    tree = ast.parse((ROOT / "tripmine" / "_gpu" / f"{module}.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            out[node.name] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        elif (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
              and module == "__init__"):
            defined = _gpu_signatures(node.module)
            out.update({alias.asname or alias.name: defined[alias.name]
                        for alias in node.names if alias.name in defined})
    return out


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_gpu_twin_takes_the_same_arguments(name):
    gpu = _gpu_signatures()
    assert name in gpu, f"tripmine._gpu has no {name}"
    cpu = list(inspect.signature(PUBLIC[name].__wrapped_cpu__).parameters)
    assert gpu[name][:len(cpu)] == cpu or set(cpu) <= set(gpu[name]), (cpu, gpu[name])
    if "labels" in cpu and "x" in cpu and name not in (
            "nearest_neighbors", "recall_at_k", "mean_average_precision_at_r"):
        assert "ref_offset" in gpu[name]


def test_chunk_rows_respects_the_budget():
    pytest.importorskip("cupy")
    from tripmine import _gpu

    assert _gpu.chunk_rows(262_144, 262_144, 48, budget=1 << 30) == 85
    assert _gpu.chunk_rows(10, 10, 48, budget=1 << 30) == 10
    assert _gpu.chunk_rows(5, 10**9, 48, budget=1) == 1
    assert _gpu.chunk_rows(0, 0, 48, budget=1 << 30) == 1


def test_wheel_build_ships_the_cuda_sources(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot read pyproject.toml's "
                    f"license field; pip's isolated build uses a newer one")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shipped = tmp_path / "tripmine" / "_gpu"
    for name in ("__init__.py", "_kernels.py", "cuda/kernels.cu", "cuda/row_logic.cuh"):
        assert (shipped / name).is_file(), name


class FakeDeviceMatrix(FakeDeviceArray):
    """A device array with a dtype and astype, holding host values (for the rerun)."""

    __module__ = "cupy._core.core"
    __cuda_array_interface__ = {}  # the rerun tells device arrays by this attribute

    def __init__(self, values):
        super().__init__(values.shape)
        self.values = values
        self.dtype = values.dtype

    def astype(self, dtype):
        return FakeDeviceMatrix(self.values.astype(dtype))


def test_gpu_rows_outside_the_window_rerun_in_float64(monkeypatch):
    """The GPU path raises OutOfRange from the C engine's norm check (tripmine._gpu);
    the dispatcher reruns float32 calls in float64 and rounds back (or raises where
    float32 cannot hold the result), and refuses float64 rows, which the CUDA kernels take
    no row exponent for.  Checked here with a stand-in GPU function."""
    from tripmine import _range

    seen = []

    def gpu_pairwise(x, ref=None, *, metric="euclidean", out=None, check_finite=True):
        seen.append(x.dtype)
        if x.dtype == np.float32:
            raise _range.OutOfRange("rows outside the GPU engine's window")
        rows = x.values
        return np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))

    monkeypatch.setattr(_dispatch, "_gpu_function", lambda fn: gpu_pairwise)
    rows = np.random.default_rng(0).standard_normal((4, 3))
    got = tripmine.pairwise_distances(FakeDeviceMatrix((rows * 1e30).astype(np.float32)))
    assert seen == [np.float32, np.float64]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, tripmine.pairwise_distances(rows) * 1e30, rtol=1e-6)
    with pytest.raises(FloatingPointError, match="beyond float32"):
        # entries up to 3e38, float32's; distances up to about 1e39, beyond it
        big = (rows / np.abs(rows).max() * 3e38).astype(np.float32)
        tripmine.pairwise_distances(FakeDeviceMatrix(big))

    def gpu_refuses(x, ref=None, *, metric="euclidean", out=None, check_finite=True):
        raise _range.OutOfRange("rows outside the GPU engine's window")

    monkeypatch.setattr(_dispatch, "_gpu_function", lambda fn: gpu_refuses)
    with pytest.raises(FloatingPointError, match="GPU path's float64 window"):
        tripmine.pairwise_distances(FakeDeviceMatrix(rows * 1e200))


def test_gpu_heads_whose_float32_logits_overflow_rerun_in_float64(monkeypatch):
    """tripmine._gpu.heads raises OutOfRange where float32 logits overflow, as the C core's
    heads do; tripmine.heads reruns the call in float64 and rounds the gradients back.
    Checked with a stand-in GPU module."""
    import types

    from tripmine import _range
    from tripmine.heads import SoftmaxLossResult

    seen = []

    def run(head, x, labels, weight, *, bias=None, class_weight=None, reduction="mean",
            grad=True, weight_grad=True, upstream=None, check_finite=True):
        seen.append((x.dtype, weight.dtype))
        if x.dtype == np.float32:
            raise _range.OutOfRange("the softmax head")
        g = np.full(x.shape, 0.5)
        wg = np.full(weight.shape, 1e39)  # beyond float32: must be refused, not rounded
        return SoftmaxLossResult(1.25, g, wg if weight_grad else None, None, x.shape[0], 0,
                                 0.0)

    package = types.ModuleType("tripmine._gpu")
    package.heads = types.SimpleNamespace(run=run)
    monkeypatch.setitem(sys.modules, "tripmine._gpu", package)
    x = FakeDeviceMatrix(np.ones((4, 3), np.float32))
    w = FakeDeviceMatrix(np.ones((5, 3), np.float32))
    got = tripmine.softmax_loss(x, [0, 1, 2, 3], w, weight_grad=False)
    assert seen == [(np.float32, np.float32), (np.float64, np.float64)]
    assert got.loss == 1.25 and got.grad.dtype == np.float32
    with pytest.raises(FloatingPointError, match="weight_grad reaches 1e\\+39"):
        tripmine.softmax_loss(x, [0, 1, 2, 3], w)
