"""GPU benchmark group (skipped without CuPy and a CUDA device).

``python -m pytest benchmarks/test_bench_gpu.py``: tripmine's losses (loss +
gradient, float32, K = 4) and the cuBLAS GEMM of the same batch, one group per
(N, D), each timed call synchronised with the device; the GPU time measured by
cupyx.profiler.benchmark goes into ``extra_info["gpu_s"]``.  The ratio table
and the PML comparison: ``python benchmarks/gpu_report.py`` (RESULTS.md, "GPU").
"""

from __future__ import annotations

import pytest

cp = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    if cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception as exc:
    pytest.skip(f"no usable CUDA device: {exc}", allow_module_level=True)

import gpu_report  # noqa: E402  (benchmarks/ is on sys.path under pytest's rootdir conftest)

SIZES = [(16384, 128), (16384, 512), (65536, 128), (65536, 512)]


@pytest.fixture(scope="module", params=SIZES, ids=[f"N={n},D={d}" for n, d in SIZES])
def batch(request):
    n, d = request.param
    x, labels = gpu_report.make_batch(n, d)
    return n, d, x, labels


def _synchronised(fn):
    def run():
        fn()
        cp.cuda.Device().synchronize()
    return run


@pytest.mark.parametrize("case", ["gemm", *gpu_report.CASES])
def test_gpu(benchmark, batch, case):
    n, d, x, labels = batch
    fn = gpu_report.gemm_case(x) if case == "gemm" else gpu_report.tripmine_case(x, labels, case)
    benchmark.group = f"gpu N={n} D={d}"
    benchmark.extra_info.update(n=n, d=d, case=case, gpu_s=gpu_report.gpu_time(fn, 5))
    benchmark.pedantic(_synchronised(fn), rounds=5, warmup_rounds=1)
