"""Miners and losses (loss + gradient) against the sgemm of the same batch.

One benchmark group per N (``losses N=<N>``, N in 1024, 4096), D=128, float32,
standard-normal rows normalised to unit length, labels in a P x K layout with K=4
(``labels = np.repeat(np.arange(N // 4), 4)``).  Cases in each group:

* ``triplet_batch_hard``        -- ``tripmine.triplet_loss(x, labels, mining="batch_hard")``
* ``triplet_batch_all``         -- ``tripmine.triplet_loss(x, labels, mining="batch_all")``
* ``triplet_semi_hard``         -- ``tripmine.triplet_loss(x, labels, mining="semi_hard")``
* ``triplet_distance_weighted`` -- ``tripmine.triplet_loss(x, labels,
  mining="distance_weighted", seed=0)``
* ``contrastive``               -- ``tripmine.contrastive_loss(x, labels)``
* ``mine_batch_hard``           -- ``tripmine.batch_hard(x, labels)`` (miner only)
* ``mine_semi_hard``            -- ``tripmine.semi_hard(x, labels)`` (miner only)
* ``numpy_batch_hard``          -- batch-hard triplet loss + gradient in vectorised NumPy
  (full distance matrix by the Gram trick, masked argmax/argmin, ``np.add.at`` scatter);
  its loss and gradient are checked against tripmine's after timing
* ``gemm``                      -- ``np.matmul(x, y, out=buf)``, ``y = ascontiguousarray(x.T)``
  (OpenBLAS sgemm, N x N x D): the ratio baseline of report.py

All tripmine losses use their defaults (margin 0.2, ``grad=True``, ``check_finite=True``).

With ``TRIPMINE_BENCH_PEERS=1`` and torch + pytorch-metric-learning importable, the
groups also get ``pml_*`` cases (loss + ``backward()``; CPU, torch pinned to the same
thread count); they are skipped otherwise.  PML has no "closest semi-hard" miner, so
there is no PML semi-hard case.

Threads: tripmine and OpenBLAS are pinned to ``TRIPMINE_BENCH_THREADS`` (default 2) by
conftest.py.  Inputs and buffers are made outside the timed code.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

import tripmine
from benchcommon import SEED, D, bench_threads, describe, gemm_operands, run_gemm

NS = (1024, 4096)
K = 4  # samples per class
MARGIN = 0.2  # tripmine's default triplet margin

pytestmark = pytest.mark.benchmark(
    min_rounds=10, max_time=1.0, warmup=True, warmup_iterations=2, disable_gc=True
)

OPS = {
    "triplet_batch_hard": lambda x, lab: tripmine.triplet_loss(x, lab, mining="batch_hard"),
    "triplet_batch_all": lambda x, lab: tripmine.triplet_loss(x, lab, mining="batch_all"),
    "triplet_semi_hard": lambda x, lab: tripmine.triplet_loss(x, lab, mining="semi_hard"),
    "triplet_distance_weighted": lambda x, lab: tripmine.triplet_loss(
        x, lab, mining="distance_weighted", seed=0
    ),
    "contrastive": lambda x, lab: tripmine.contrastive_loss(x, lab),
    "mine_batch_hard": lambda x, lab: tripmine.batch_hard(x, lab),
    "mine_semi_hard": lambda x, lab: tripmine.semi_hard(x, lab),
}

# Calls that take about a second or more: timed with benchmark.pedantic, this many
# rounds of one call each (after one warm-up call), to keep the whole run short.
PEDANTIC_ROUNDS = {("triplet_batch_all", 4096): 5}


@pytest.fixture(scope="module", params=NS, ids=lambda n: f"N={n}")
def data(request):
    n = request.param
    x = np.random.default_rng([SEED, n, 1]).standard_normal((n, D), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y, buf = gemm_operands(x)
    return SimpleNamespace(n=n, x=x, labels=np.repeat(np.arange(n // K), K), y=y, buf=buf)


def _group(n: int) -> str:
    return f"losses N={n}"


def _time(benchmark, case: str, n: int, fn, *args):
    rounds = PEDANTIC_ROUNDS.get((case, n))
    if rounds is None:
        return benchmark(fn, *args)
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)


def numpy_batch_hard(x: np.ndarray, labels: np.ndarray, margin: float = MARGIN):
    """Batch-hard triplet loss (mean over anchors) and dL/dx, vectorised NumPy.

    Same semantics as ``tripmine.triplet_loss(x, labels, mining="batch_hard")``:
    euclidean, hardest positive (argmax, lowest index on ties) and hardest negative
    (argmin), anchors without a positive or a negative skipped, hinge subgradient 0
    at ``l = 0`` and at zero distance.  Returns ``(loss, grad, positive, negative)``.
    """
    sq = np.einsum("ij,ij->i", x, x)
    d = np.matmul(x, np.ascontiguousarray(x.T))  # sgemm (x @ x.T would go to ssyrk)
    d *= -2
    d += sq[:, None]
    d += sq[None, :]
    np.maximum(d, 0, out=d)
    np.sqrt(d, out=d)
    same = labels[:, None] == labels[None, :]
    pos = same.copy()
    np.fill_diagonal(pos, False)
    hardest_pos = np.where(pos, d, -np.inf).argmax(axis=1)
    hardest_neg = np.where(same, np.inf, d).argmin(axis=1)
    a = np.flatnonzero(pos.any(axis=1) & ~same.all(axis=1))
    p, ng = hardest_pos[a], hardest_neg[a]
    # Distances of the mined triplets from the differences (as tripmine does), which
    # are needed for the gradient anyway.
    diff_p, diff_n = x[a] - x[p], x[a] - x[ng]
    d_ap = np.sqrt(np.einsum("ij,ij->i", diff_p, diff_p))
    d_an = np.sqrt(np.einsum("ij,ij->i", diff_n, diff_n))
    hinge = d_ap - d_an + margin
    count = max(a.size, 1)
    loss = float(np.maximum(hinge, 0).sum(dtype=np.float64) / count)
    w = (hinge > 0) / np.float32(count)
    u_p = diff_p * (w / np.where(d_ap > 0, d_ap, np.inf))[:, None]  # w * d d_ap / d x_a
    u_n = diff_n * (w / np.where(d_an > 0, d_an, np.inf))[:, None]
    grad = np.zeros_like(x)
    np.add.at(grad, a, u_p - u_n)
    np.add.at(grad, p, -u_p)
    np.add.at(grad, ng, u_n)
    return loss, grad, p, ng


@pytest.mark.parametrize("case", list(OPS))
def test_tripmine(benchmark, data, case):
    describe(benchmark, _group(data.n), case, data.n, k=K)
    result = _time(benchmark, case, data.n, OPS[case], data.x, data.labels)
    # Outside the timed code: sanity of the last result.
    if isinstance(result, tripmine.Triplets):
        benchmark.extra_info["n_triplets"] = int(result.anchor.shape[0])
        assert result.anchor.shape[0] > 0
    else:
        benchmark.extra_info["loss"] = float(result.loss)
        assert np.isfinite(result.loss) and result.loss > 0
        assert result.grad.shape == data.x.shape and np.all(np.isfinite(result.grad))


def test_numpy_batch_hard(benchmark, data):
    describe(benchmark, _group(data.n), "numpy_batch_hard", data.n, k=K)
    loss, grad, p, ng = _time(benchmark, "numpy_batch_hard", data.n, numpy_batch_hard,
                              data.x, data.labels)
    # Outside the timed code: same op as tripmine's batch-hard loss.
    ref = tripmine.triplet_loss(data.x, data.labels, mining="batch_hard")
    benchmark.extra_info.update(
        loss=loss,
        loss_rel_diff_vs_tripmine=abs(loss - ref.loss) / abs(ref.loss),
        selection_mismatches=int(np.sum((p != ref.triplets.positive)
                                        | (ng != ref.triplets.negative))),
    )
    assert loss == pytest.approx(ref.loss, rel=1e-4)
    np.testing.assert_allclose(grad, ref.grad, rtol=1e-3, atol=1e-3 * np.abs(ref.grad).max())


def test_gemm(benchmark, data):
    describe(benchmark, _group(data.n), "gemm", data.n, k=K)
    run_gemm(benchmark, data.x, data.y, data.buf)


# --- optional peers: pytorch-metric-learning (TRIPMINE_BENCH_PEERS=1) ---------------

PEERS = (
    "pml_batch_hard",  # BatchHardMiner + TripletMarginLoss(0.2, MeanReducer)
    "pml_batch_all",  # TripletMarginLoss(0.2) over all triplets (AvgNonZeroReducer)
    "pml_distance_weighted",  # DistanceWeightedMiner(0.5, 1.4) + TripletMarginLoss(Mean)
    "pml_contrastive",  # ContrastiveLoss(pos_margin=0, neg_margin=1)
    "pml_mine_batch_hard",  # BatchHardMiner only
)
# Same reduction as tripmine's default for the op: to compare losses (not asserted).
PEER_TRIPMINE = {
    "pml_batch_hard": "triplet_batch_hard",
    "pml_batch_all": "triplet_batch_all",
    "pml_contrastive": "contrastive",
}
PEER_MAX_ALL_TRIPLETS_MASK = 2**31  # PML's all-triplets path builds an N^3 bool tensor


@pytest.fixture(scope="module")
def pml():
    if os.environ.get("TRIPMINE_BENCH_PEERS", "0") != "1":
        pytest.skip("peer baselines are off (set TRIPMINE_BENCH_PEERS=1)")
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners, reducers

    old = torch.get_num_threads()
    torch.set_num_threads(bench_threads())
    yield SimpleNamespace(torch=torch, losses=losses, miners=miners, reducers=reducers)
    torch.set_num_threads(old)


def _peer_fn(pml, case):
    losses, miners, reducers = pml.losses, pml.miners, pml.reducers
    if case == "pml_mine_batch_hard":
        miner = miners.BatchHardMiner()
        return lambda xt, lt: miner(xt, lt)
    if case == "pml_contrastive":
        loss_fn, miner = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None
    elif case == "pml_batch_all":
        loss_fn, miner = losses.TripletMarginLoss(margin=MARGIN), None
    else:
        loss_fn = losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer())
        miner = (miners.BatchHardMiner() if case == "pml_batch_hard"
                 else miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))

    def step(xt, lt):
        xt.grad = None
        loss = loss_fn(xt, lt, miner(xt, lt)) if miner is not None else loss_fn(xt, lt)
        loss.backward()
        return float(loss.detach())

    return step


@pytest.mark.parametrize("case", PEERS)
def test_peer(benchmark, data, pml, case):
    if case == "pml_batch_all" and data.n**3 > PEER_MAX_ALL_TRIPLETS_MASK:
        pytest.skip(f"PML's all-triplets indices build an N^3 bool mask ({data.n**3 >> 30} GiB)")
    describe(benchmark, _group(data.n), case, data.n, k=K,
             torch_threads=pml.torch.get_num_threads(), torch_version=pml.torch.__version__)
    xt = pml.torch.from_numpy(data.x.copy()).requires_grad_(True)
    lt = pml.torch.from_numpy(data.labels.astype(np.int64))
    step = _peer_fn(pml, case)
    rounds = 3 if data.n >= 4096 else None
    if rounds is None:
        result = benchmark(step, xt, lt)
    else:
        result = benchmark.pedantic(step, args=(xt, lt), rounds=rounds, iterations=1,
                                    warmup_rounds=1)
    if case in PEER_TRIPMINE:  # recorded, not asserted: PML's distances differ slightly
        ref = OPS[PEER_TRIPMINE[case]](data.x, data.labels).loss
        benchmark.extra_info.update(loss=result, loss_rel_diff_vs_tripmine=abs(result - ref) / ref)
