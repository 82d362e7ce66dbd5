"""Miners and losses (loss + gradient) against the sgemm of the same batch.

One benchmark group per N (``losses N=<N>``, N in 256, 1024, 4096), D=128, float32,
standard-normal rows normalised to unit length, labels in a P x K layout with K=4
(``labels = np.repeat(np.arange(N // 4), 4)``).  Cases in each group:

* ``triplet_batch_hard``        -- ``tripmine.triplet_loss(x, labels, mining="batch_hard")``
* ``triplet_batch_all``         -- ``tripmine.triplet_loss(x, labels, mining="batch_all")``
* ``triplet_semi_hard``         -- ``tripmine.triplet_loss(x, labels, mining="semi_hard")``
* ``triplet_distance_weighted`` -- ``tripmine.triplet_loss(x, labels,
  mining="distance_weighted", seed=0)``
* ``contrastive``               -- ``tripmine.contrastive_loss(x, labels)``
* ``lifted``                    -- ``tripmine.lifted_structured_loss(x, labels)`` (Song's form)
* ``lifted_generalized``        -- ``tripmine.lifted_structured_loss(x, labels,
  generalized=True)``
* ``mine_batch_hard``           -- ``tripmine.batch_hard(x, labels)`` (miner only)
* ``mine_semi_hard``            -- ``tripmine.semi_hard(x, labels)`` (miner only)
* ``numpy_batch_hard``          -- batch-hard triplet loss + gradient in vectorised NumPy
  (full distance matrix by the Gram trick, masked argmax/argmin, ``np.add.at`` scatter);
  its loss and gradient are checked against tripmine's after timing
* ``gemm``                      -- ``np.matmul(x, y, out=buf)``, ``y = ascontiguousarray(x.T)``
  (OpenBLAS sgemm, N x N x D): the ratio baseline of report.py

All tripmine losses use their defaults (margin 0.2; the lifted losses neg_margin 1,
pos_margin 0; ``grad=True``, ``check_finite=True``).

With ``TRIPMINE_BENCH_PEERS=1`` and torch + pytorch-metric-learning importable, the
groups also get ``pml_*`` cases (loss + ``backward()`` on CPU, torch pinned to the same
thread count; configurations and their differences from tripmine's: see ``PEERS``);
they are skipped otherwise.  PML cases too large for the suite are skipped with the
reason (``PEER_MAX_N``), which the JSON records and report.py prints.

Threads: tripmine and OpenBLAS are pinned to ``TRIPMINE_BENCH_THREADS`` (default 2) by
conftest.py.  Inputs and buffers are made outside the timed code.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import tripmine
from benchcommon import SEED, D, describe, gemm_operands, run_gemm, skip_case, time_peer

NS = (256, 1024, 4096)
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
    "lifted": lambda x, lab: tripmine.lifted_structured_loss(x, lab),
    "lifted_generalized": lambda x, lab: tripmine.lifted_structured_loss(
        x, lab, generalized=True
    ),
    "mine_batch_hard": lambda x, lab: tripmine.batch_hard(x, lab),
    "mine_semi_hard": lambda x, lab: tripmine.semi_hard(x, lab),
}
# case -> (op, impl) for report.py: one subplot per op, one line per impl.
OP_IMPL = {
    "triplet_batch_hard": ("batch_hard", "tripmine"),
    "triplet_batch_all": ("batch_all", "tripmine"),
    "triplet_semi_hard": ("semi_hard", "tripmine"),
    "triplet_distance_weighted": ("distance_weighted", "tripmine"),
    "contrastive": ("contrastive", "tripmine"),
    "lifted": ("lifted", "tripmine"),
    "lifted_generalized": ("lifted_generalized", "tripmine"),
    "mine_batch_hard": ("batch_hard", "tripmine, miner only"),
    "mine_semi_hard": ("semi_hard", "tripmine, miner only"),
    "numpy_batch_hard": ("batch_hard", "numpy"),
    "gemm": (None, "gemm (OpenBLAS sgemm)"),
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
    op, impl = OP_IMPL[case]
    describe(benchmark, _group(data.n), case, data.n, op=op, impl=impl, k=K)
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
    op, impl = OP_IMPL["numpy_batch_hard"]
    describe(benchmark, _group(data.n), "numpy_batch_hard", data.n, op=op, impl=impl, k=K)
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
    describe(benchmark, _group(data.n), "gemm", data.n, op=None, impl=OP_IMPL["gemm"][1],
             k=K)
    run_gemm(benchmark, data.x, data.y, data.buf)


# --- optional peers: pytorch-metric-learning (TRIPMINE_BENCH_PEERS=1) ---------------
#
# Every peer case times one training step's worth of work, as the tripmine cases do:
# (mining +) loss + ``backward()`` from a leaf tensor over the same unit-length rows and
# P x K labels, margin 0.2, euclidean distance.  Common to all of them:
#
# * Distance ``LpDistance(normalize_embeddings=False)`` (p=2, power=1).  PML normalises
#   by default.  The rows are unit length already, so that would change the distances only
#   by rounding, but it would put the normalisation into the autograd graph, and the
#   gradient would come out projected onto the sphere; tripmine's losses (normalize=False)
#   differentiate with respect to the rows as given.  Without it both compute the same
#   function and gradient (checked after timing where the triplets are deterministic).
#   The cost of the normalisation, O(N D), is negligible next to the N x N matrix.
# * PML computes the full N x N ``torch.cdist`` (MKL sgemm route) in the loss, and again
#   in the miner if there is one, and backpropagates through the whole matrix even when
#   the loss uses a few entries per row; tripmine recomputes only the mined distances.
#
# Per case, the PML configuration and what differs from the tripmine case it is drawn with:
PEERS = {
    # BatchHardMiner + TripletMarginLoss(0.2, MeanReducer): hardest positive and hardest
    # negative per anchor, mean over anchors: tripmine mining="batch_hard" ("mean").
    "pml_batch_hard": ("batch_hard", "pml"),
    # BatchHardMiner alone (no gradient): tripmine.batch_hard.
    "pml_mine_batch_hard": ("batch_hard", "pml, miner only"),
    # TripletMarginLoss(0.2) without a miner: every valid triplet, AvgNonZeroReducer (mean
    # over the triplets with a positive loss): tripmine mining="batch_all" ("mean_nonzero").
    # PML enumerates the N (K-1) (N-K) triplets as index tensors; tripmine never does.
    "pml_batch_all": ("batch_all", "pml"),
    # TripletMarginMiner(0.2, "semihard") + TripletMarginLoss(0.2, MeanReducer): EVERY
    # (a, p, n) with 0 < d(a,n) - d(a,p) <= 0.2 (tripmine's semi_hard(select="all")),
    # enumerated from all triplets as above.  Not the tripmine case's rule: mining=
    # "semi_hard" takes ONE negative per positive pair (the closest one farther than the
    # positive, else the farthest; TF-Addons), which PML does not offer.  Same op family,
    # different triplet sets; the loss is checked against select="all" after timing.
    "pml_semi_hard": ("semi_hard", "pml"),
    # DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4) + TripletMarginLoss(0.2,
    # MeanReducer).  Same weights as tripmine's defaults, but PML draws K triplets per
    # anchor (a random positive, with replacement, and one weighted negative each) where
    # tripmine draws one negative per positive pair (K-1 per anchor), with another
    # generator: the losses agree in expectation only.  The miner insists on PML's
    # normalising distance; it runs without gradient, so the loss is unaffected.
    "pml_distance_weighted": ("distance_weighted", "pml"),
    # ContrastiveLoss(pos_margin=0, neg_margin=1), AvgNonZeroReducer applied to the
    # positive and the negative pairs separately and summed: tripmine.contrastive_loss
    # defaults ("mean_nonzero"); both take all ordered pairs i != j.
    "pml_contrastive": ("contrastive", "pml"),
    # LiftedStructureLoss / GeneralizedLiftedStructureLoss (neg_margin 1, pos_margin 0,
    # MeanReducer): tripmine.lifted_structured_loss defaults, Song's form and generalized=True.
    # PML's generalized form averages over every row (an empty log-sum-exp counts 0),
    # tripmine's over the rows with a positive and a negative: with K = 4, every row.
    "pml_lifted": ("lifted", "pml"),
    "pml_lifted_generalized": ("lifted_generalized", "pml"),
}
# Recorded in extra_info["note"]; report.py adds it to the subplot's title.
PEER_NOTES = {
    "pml_semi_hard": "pml: every semi-hard triplet; tripmine: the closest per positive pair",
    "pml_distance_weighted": "pml: K triplets per anchor; tripmine: one per positive pair",
}
# Peers checked against tripmine after timing (same triplets, so same loss and gradient).
PEER_SAME_AS = {
    "pml_batch_hard": "triplet_batch_hard",
    "pml_batch_all": "triplet_batch_all",
    "pml_contrastive": "contrastive",
    "pml_lifted": "lifted",
    "pml_lifted_generalized": "lifted_generalized",
}
# Largest N a peer case runs at within the suite's limits, and why.  At N=1024 one call of
# pml_batch_all takes ~7 s (1 GiB triplet mask, ~3.1M triplets), pml_distance_weighted
# ~4 s, pml_semi_hard ~2.3 s (2-vCPU dev VM, busy); N=4096 has 16x the triplets and 64x
# the weight copies.
_ENUMERATES = ("PML enumerates all N(K-1)(N-K) triplets as index tensors (~50M at N=4096: "
               "a Python loop per anchor, several GB of indices, est. over a minute per call)")
PEER_MAX_N = {
    "pml_batch_all": (1024, _ENUMERATES),
    "pml_semi_hard": (1024, _ENUMERATES),
    "pml_distance_weighted": (1024, (
        "PML's sampler loops over the N/K labels in Python and copies an N x (N-K) weight "
        "slice for each (~64 GiB of copies at N=4096); one call took ~240 s on the busy "
        "2-vCPU dev VM")),
    "pml_lifted": (256, (
        "PML's LiftedStructureLoss builds N(K-1) x N(N-K) (positive pair x negative pair) "
        "arrays, ~22 B per entry at its peak: ~66 GiB at N=1024 (1 GiB and ~3 s at N=256)")),
}


def _peer_step(peers, case):
    """The timed function for a peer case: (x tensor, label tensor) -> float loss."""
    losses, miners, reducers = peers.losses, peers.miners, peers.reducers

    def dist():
        return peers.distances.LpDistance(normalize_embeddings=False)

    def triplet(reducer=None):
        return losses.TripletMarginLoss(margin=MARGIN, distance=dist(), reducer=reducer)

    if case == "pml_mine_batch_hard":
        miner = miners.BatchHardMiner(distance=dist())
        return lambda xt, lt: miner(xt, lt)
    miner = None
    if case == "pml_batch_hard":
        miner, loss_fn = miners.BatchHardMiner(distance=dist()), triplet(reducers.MeanReducer())
    elif case == "pml_batch_all":
        loss_fn = triplet()  # default AvgNonZeroReducer
    elif case == "pml_semi_hard":
        miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard",
                                          distance=dist())
        loss_fn = triplet(reducers.MeanReducer())
    elif case == "pml_distance_weighted":
        miner = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
        loss_fn = triplet(reducers.MeanReducer())
    elif case == "pml_contrastive":
        loss_fn = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=dist())
    elif case == "pml_lifted":
        loss_fn = losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=dist())
    elif case == "pml_lifted_generalized":
        loss_fn = losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0,
                                                        distance=dist())
    else:
        raise ValueError(case)

    def step(xt, lt):
        xt.grad = None
        loss = loss_fn(xt, lt, miner(xt, lt)) if miner is not None else loss_fn(xt, lt)
        loss.backward()
        return float(loss.detach())

    step.miner = miner
    return step


@pytest.mark.parametrize("case", list(PEERS))
def test_peer(benchmark, data, peers, case):
    torch = peers.torch
    max_n, reason = PEER_MAX_N.get(case, (None, ""))
    if max_n is not None and data.n > max_n:
        skip_case(_group(data.n), case, data.n, reason)
    op, impl = PEERS[case]
    if case in PEER_NOTES:
        benchmark.extra_info["note"] = PEER_NOTES[case]
    describe(benchmark, _group(data.n), case, data.n, op=op, impl=impl, k=K,
             torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
             pml_version=peers.pml_version)
    xt = torch.from_numpy(data.x.copy()).requires_grad_(True)
    lt = torch.from_numpy(data.labels.astype(np.int64))
    step = _peer_step(peers, case)
    result = time_peer(benchmark, step, xt, lt)

    # Outside the timed code: the peer computes what it claims to.
    if case == "pml_mine_batch_hard":
        ref = tripmine.batch_hard(data.x, data.labels)
        a, p, n = (t.numpy() for t in result)
        benchmark.extra_info["selection_mismatches"] = int(
            np.sum((p != ref.positive) | (n != ref.negative)))
        assert np.array_equal(a, ref.anchor)
        return
    benchmark.extra_info["loss"] = result
    assert np.isfinite(result) and result > 0
    if case in PEER_SAME_AS:
        ref = OPS[PEER_SAME_AS[case]](data.x, data.labels)
    elif case == "pml_semi_hard":
        mined = tripmine.semi_hard(data.x, data.labels, margin=MARGIN, select="all")
        ref = tripmine.triplet_loss(data.x, data.labels, mining=mined, margin=MARGIN)
        benchmark.extra_info.update(n_triplets=len(step.miner(xt, lt)[0]),
                                    n_triplets_tripmine_select_all=int(mined.anchor.shape[0]))
    else:  # pml_distance_weighted: random triplets, recorded only
        ref = OPS["triplet_distance_weighted"](data.x, data.labels)
    rel = abs(result - ref.loss) / abs(ref.loss)
    benchmark.extra_info["loss_rel_diff_vs_tripmine"] = rel
    if case in PEER_SAME_AS:
        grad = xt.grad.numpy()
        benchmark.extra_info["grad_max_diff_rel"] = float(
            np.abs(grad - ref.grad).max() / np.abs(ref.grad).max())
        assert result == pytest.approx(ref.loss, rel=1e-4)
        np.testing.assert_allclose(grad, ref.grad, rtol=1e-3,
                                   atol=1e-3 * np.abs(ref.grad).max())
    elif case == "pml_semi_hard":
        assert result == pytest.approx(ref.loss, rel=1e-3)
