"""The margin-softmax heads against the sgemm of their logits (pytest-benchmark group).

Group ``heads N=1024 C=20000`` (D=512, float32; data as in heads.py: ``x`` standard normal,
``weight`` standard normal x 0.05, labels uniform in [0, C), seeded).  Cases:

* ``arcface_loss``  -- ``tripmine.arcface_loss(x, labels, weight, grad=False)``
* ``arcface_all``   -- ``tripmine.arcface_loss(x, labels, weight)``: loss, dL/dx, dL/dW
* ``cosface_all``   -- ``tripmine.cosface_loss(x, labels, weight)``
* ``softmax_all``   -- ``tripmine.softmax_loss(x, labels, weight)``
* ``gemm``          -- ``np.matmul(x, weight.T made contiguous, out=buf)``: the (N x D) .
  (D x C) sgemm of the logits, the ratio baseline of report.py

With ``TRIPMINE_BENCH_PEERS=1``: ``pml_arcface`` and ``pml_cosface``, pytorch-metric-
learning's ``ArcFaceLoss`` / ``CosFaceLoss`` (loss + ``backward()``, torch on the same
threads).  The alternating timing and the issue's size (C = 100,000) are heads.py's.
"""

from __future__ import annotations

from types import SimpleNamespace

import heads as H
import numpy as np
import pytest

from benchcommon import describe, time_peer

N, D_HEADS, C = 1024, 512, 20_000
GROUP = f"heads N={N} C={C}"

pytestmark = pytest.mark.benchmark(
    min_rounds=5, max_time=1.0, warmup=True, warmup_iterations=1, disable_gc=True
)

CASES = ("arcface_loss", "arcface_all", "cosface_all", "softmax_all")


@pytest.fixture(scope="module")
def data():
    x, weight, labels = H.make_data(N, D_HEADS, C)
    return SimpleNamespace(x=x, weight=weight, labels=labels)


@pytest.mark.parametrize("case", CASES)
def test_tripmine_head(benchmark, data, case):
    describe(benchmark, GROUP, case, N, op=case.rsplit("_", 1)[0], impl="tripmine",
             d=D_HEADS, classes=C)
    result = benchmark(H.make_op(case, data.x, data.weight, data.labels))
    assert np.isfinite(result.loss)


def test_gemm(benchmark, data):
    describe(benchmark, GROUP, "gemm", N, op=None, impl="gemm (OpenBLAS sgemm)", d=D_HEADS,
             classes=C)
    benchmark(H.make_gemm(data.x, data.weight))


@pytest.mark.parametrize("case", ["pml_arcface", "pml_cosface"])
def test_peer_head(benchmark, data, case):
    import os
    if os.environ.get("TRIPMINE_BENCH_PEERS") != "1":
        pytest.skip("peers run with TRIPMINE_BENCH_PEERS=1")
    step = H.peer_step(case, data.x, data.weight, data.labels)
    if step is None:
        pytest.skip("torch or pytorch-metric-learning is not importable")
    import torch

    import tripmine
    torch.set_num_threads(tripmine.get_num_threads())
    describe(benchmark, GROUP, case, N, op=case.split("_", 1)[1], impl="pml", d=D_HEADS,
             classes=C)
    time_peer(benchmark, step)
