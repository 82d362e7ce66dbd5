"""Self-mode euclidean ``pairwise_distances`` against NumPy/OpenBLAS baselines.

One benchmark group per N (``pairwise N=<N>``), D=128, float32, standard-normal rows.
Cases in each group:

* ``tripmine``   -- ``tripmine.pairwise_distances(x, out=out, check_finite=False)``
* ``numpy_gram`` -- vectorised NumPy Gram trick (norms + sgemm + clamp + sqrt), in place
* ``gemm``       -- ``np.matmul(x, y, out=buf)`` with ``y = ascontiguousarray(x.T)`` (sgemm)
* ``gemm_xxT``   -- ``x @ x.T`` (NumPy sends this to ssyrk, which is slower here)
* ``torch_cdist`` -- ``torch.cdist(x, x)`` under ``torch.no_grad()`` (only with
  ``TRIPMINE_BENCH_PEERS=1`` and torch importable; torch pinned to the same thread count)

Threads: tripmine and NumPy's OpenBLAS are both set to ``TRIPMINE_BENCH_THREADS``
(default 2) by the ``threads`` fixture in conftest.py.  Inputs and output buffers are
created outside the timed code.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import numpy as np
import pytest

import tripmine
from benchcommon import SEED, D, describe, gemm_operands, run_gemm, time_peer

NS = (256, 1024, 4096)

pytestmark = pytest.mark.benchmark(
    min_rounds=15, max_time=1.5, warmup=True, warmup_iterations=5, disable_gc=True
)


@pytest.fixture(scope="module", params=NS, ids=lambda n: f"N={n}")
def data(request):
    n = request.param
    x = np.random.default_rng([SEED, n]).standard_normal((n, D), dtype=np.float32)
    y, out = gemm_operands(x)
    return SimpleNamespace(
        n=n,
        x=x,
        y=y,
        out=out,
        sq=np.empty(n, dtype=np.float32),
        tmp=np.empty_like(x),
    )


def _setup(benchmark, data, case, op="distances", impl="tripmine", **extra):
    describe(benchmark, f"pairwise N={data.n}", case, data.n, op=op, impl=impl, **extra)


def numpy_gram(x, y, sq, tmp, out):
    """sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0)) with NumPy, into ``out``."""
    np.multiply(x, x, out=tmp)
    tmp.sum(axis=1, out=sq)
    np.matmul(x, y, out=out)
    out *= -2
    out += sq[:, None]
    out += sq[None, :]
    np.maximum(out, 0, out=out)
    np.sqrt(out, out=out)
    return out


def _reference(x):
    x64 = x.astype(np.float64)
    sq = (x64 * x64).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * (x64 @ x64.T)
    return np.sqrt(np.maximum(d2, 0))


def test_tripmine(benchmark, data):
    _setup(benchmark, data, "tripmine")
    result = benchmark(tripmine.pairwise_distances, data.x, out=data.out, check_finite=False)
    assert result is data.out
    np.testing.assert_allclose(result, _reference(data.x), rtol=1e-4, atol=1e-3)


def test_numpy_gram(benchmark, data):
    _setup(benchmark, data, "numpy_gram", impl="numpy")
    result = benchmark(numpy_gram, data.x, data.y, data.sq, data.tmp, data.out)
    assert result is data.out


def test_gemm(benchmark, data):
    _setup(benchmark, data, "gemm", op=None, impl="gemm (OpenBLAS sgemm)")
    run_gemm(benchmark, data.x, data.y, data.out)


def test_gemm_xxT(benchmark, data):
    # Not a distance matrix: the Gram product alone, the other BLAS route to it.
    _setup(benchmark, data, "gemm_xxT", op=None, impl="numpy x @ x.T (ssyrk)")
    xt = data.x.T
    result = benchmark(operator.matmul, data.x, xt)
    assert result.shape == (data.n, data.n)


def test_peer_torch_cdist(benchmark, data, peers):
    """``torch.cdist(x, x)``, euclidean: for more than 25 rows torch takes the Gram route
    (MKL sgemm, then norms, clamp at 0 and sqrt), like ``numpy_gram``.  It has no ``out=``,
    so unlike ``tripmine`` it allocates the N x N result in every call.  Forward only:
    ``pairwise_distances`` has no gradient either."""
    torch = peers.torch
    _setup(benchmark, data, "torch_cdist", impl="torch.cdist",
           torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    xt = torch.from_numpy(data.x)

    def cdist(a):
        with torch.no_grad():
            return torch.cdist(a, a)

    result = time_peer(benchmark, cdist, xt)
    # Recorded, not asserted: the Gram route loses precision near the diagonal.
    err = np.abs(result.numpy().astype(np.float64) - _reference(data.x)).max()
    benchmark.extra_info["max_abs_err_vs_float64"] = float(err)
    assert result.shape == (data.n, data.n) and np.isfinite(err)
