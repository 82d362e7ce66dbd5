"""One PyTorch training step with tripmine.torch's loss against pytorch-metric-learning's.

One benchmark group per N (``torch step N=<N>``, N in 256, 1024, 4096).  Every case times
the forward and backward pass of the same small MLP (128 -> 256 -> 128, ReLU, float32,
CPU) over the same N standard-normal input rows with P x K labels (K=4):
``model.zero_grad(set_to_none=True); loss = loss_fn(model(x), labels); loss.backward()``.
No optimiser step, so every round does the same work.  Cases in each group:

* ``model_only``            -- the step with a trivial loss (``out.square().mean()``): the
  cost of the network itself, the floor under every other case;
* ``tripmine_batch_hard``   -- ``tripmine.torch.TripletLoss(mining="batch_hard",
  margin=0.2, normalize=True)``;
* ``tripmine_batch_all``    -- ``TripletLoss(mining="batch_all", margin=0.2,
  normalize=True)`` (``"mean_nonzero"``);
* ``tripmine_contrastive``  -- ``tripmine.torch.ContrastiveLoss(normalize=True)``
  (``pos_margin=0, neg_margin=1``, ``"mean_nonzero"``).

With ``TRIPMINE_BENCH_PEERS=1`` (and pytorch-metric-learning importable) the groups also
get the pytorch-metric-learning equivalents, with PML's default ``LpDistance()``, which
normalises the embeddings inside the loss as ``normalize=True`` does in tripmine:

* ``pml_batch_hard``   -- ``BatchHardMiner()`` + ``TripletMarginLoss(0.2, MeanReducer())``;
* ``pml_batch_all``    -- ``TripletMarginLoss(0.2)`` without a miner (every triplet,
  ``AvgNonZeroReducer``); N <= 1024 (it enumerates all N(K-1)(N-K) triplets);
* ``pml_contrastive``  -- ``ContrastiveLoss(pos_margin=0, neg_margin=1)``.

After timing, each PML case's loss and the model's gradient are checked against the
tripmine case of the same op.  ``python benchmarks/torch_step.py results.json`` prints
the step-time ratio (PML / tripmine) and the loss's share of each step
(``(step - model_only) / step``).

Threads: tripmine, OpenBLAS (conftest.py) and torch (here) are all pinned to
``TRIPMINE_BENCH_THREADS`` (default 2).  torch is imported by this module's fixture only,
so the other benchmark modules, which run first, time tripmine without torch loaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchcommon import SEED, D, bench_threads, describe, skip_case, time_peer

NS = (256, 1024, 4096)
K = 4
MARGIN = 0.2
D_IN, HIDDEN = 128, 256

pytestmark = pytest.mark.benchmark(
    min_rounds=5, max_time=1.0, warmup=True, warmup_iterations=2, disable_gc=True
)

TRIPMINE_CASES = ("model_only", "tripmine_batch_hard", "tripmine_batch_all",
                  "tripmine_contrastive")
# PML case -> (tripmine case it is checked against, largest N it runs at, why).
PEERS = {
    "pml_batch_hard": ("tripmine_batch_hard", None, ""),
    "pml_batch_all": ("tripmine_batch_all", 1024, (
        "PML enumerates all N(K-1)(N-K) triplets (~50M at N=4096) as index tensors after an "
        "N x N x N mask: several GB and over a minute per step")),
    "pml_contrastive": ("tripmine_contrastive", None, ""),
}
OPS = {"model_only": None, "tripmine_batch_hard": "batch_hard",
       "tripmine_batch_all": "batch_all", "tripmine_contrastive": "contrastive",
       "pml_batch_hard": "batch_hard", "pml_batch_all": "batch_all",
       "pml_contrastive": "contrastive"}


@pytest.fixture(scope="module")
def torch_env():
    """torch and tripmine.torch, torch pinned to TRIPMINE_BENCH_THREADS threads."""
    torch = pytest.importorskip("torch")
    tmt = pytest.importorskip("tripmine.torch")
    old = torch.get_num_threads()
    torch.set_num_threads(bench_threads())
    yield SimpleNamespace(torch=torch, tmt=tmt)
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=NS, ids=lambda n: f"N={n}")
def step_data(request, torch_env):
    torch, n = torch_env.torch, request.param
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, D))
    x = np.random.default_rng([SEED, n, 2]).standard_normal((n, D_IN), dtype=np.float32)
    labels = torch.from_numpy(np.repeat(np.arange(n // K), K).astype(np.int64))
    return SimpleNamespace(n=n, model=model, x=torch.from_numpy(x), labels=labels)


def _group(n: int) -> str:
    return f"torch step N={n}"


def _loss_fn(case: str, torch_env, peers=None):
    if case == "model_only":
        return lambda out, labels: out.square().mean()
    if case.startswith("tripmine_"):
        tmt = torch_env.tmt
        if case == "tripmine_contrastive":
            return tmt.ContrastiveLoss(normalize=True)
        return tmt.TripletLoss(mining=case.removeprefix("tripmine_"), margin=MARGIN,
                               normalize=True)
    losses, miners, reducers = peers.losses, peers.miners, peers.reducers
    if case == "pml_batch_hard":
        miner = miners.BatchHardMiner()
        loss = losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer())
        return lambda out, labels: loss(out, labels, miner(out, labels))
    if case == "pml_batch_all":
        return losses.TripletMarginLoss(margin=MARGIN)
    if case == "pml_contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    raise ValueError(case)


def _step(model, loss_fn):
    def step(x, labels):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        return float(loss.detach())

    return step


def _describe(benchmark, data, case, torch):
    describe(benchmark, _group(data.n), case, data.n, op=None,
             impl=case.split("_")[0] if case != "model_only" else "model only",
             k=K, loss_op=OPS[case], d_in=D_IN, hidden=HIDDEN,
             torch_threads=torch.get_num_threads(), torch_version=torch.__version__)


@pytest.mark.parametrize("case", TRIPMINE_CASES)
def test_tripmine_step(benchmark, step_data, torch_env, case):
    _describe(benchmark, step_data, case, torch_env.torch)
    step = _step(step_data.model, _loss_fn(case, torch_env))
    loss = benchmark(step, step_data.x, step_data.labels)
    benchmark.extra_info["loss"] = loss
    assert np.isfinite(loss) and loss > 0
    grad = step_data.model[0].weight.grad
    assert grad is not None and bool(torch_env.torch.isfinite(grad).all())


@pytest.mark.parametrize("case", list(PEERS))
def test_peer_step(benchmark, step_data, torch_env, peers, case):
    same_as, max_n, reason = PEERS[case]
    if max_n is not None and step_data.n > max_n:
        skip_case(_group(step_data.n), case, step_data.n, reason)
    torch = torch_env.torch
    _describe(benchmark, step_data, case, torch)
    benchmark.extra_info["pml_version"] = peers.pml_version
    model = step_data.model
    loss = time_peer(benchmark, _step(model, _loss_fn(case, torch_env, peers)), step_data.x,
                     step_data.labels)
    grad = model[0].weight.grad.clone()
    # Outside the timed code: the same loss and gradient as tripmine's step.
    expected = _step(model, _loss_fn(same_as, torch_env))(step_data.x, step_data.labels)
    expected_grad = model[0].weight.grad
    benchmark.extra_info.update(
        loss=loss, loss_rel_diff_vs_tripmine=abs(loss - expected) / abs(expected),
        grad_max_diff_rel=float((grad - expected_grad).abs().max()
                                / expected_grad.abs().max()))
    assert loss == pytest.approx(expected, rel=1e-4)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3 * scale)

