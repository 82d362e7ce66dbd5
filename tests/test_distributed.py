"""tripmine.torch.distributed: N ranks give exactly the single-process loss and gradient.

Two gloo processes on localhost (spawned once) run every case with unequal
batch sizes; the parent compares each rank's loss and gradient with
tripmine on the concatenated batch in self mode.  CUDA tests skip cleanly
without a GPU.
"""

from __future__ import annotations

import os
import types
from datetime import timedelta

import numpy as np
import pytest
from gloo import assert_ddp_step, record_outcomes, spawn_ranks

import tripmine

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
distributed = pytest.importorskip("tripmine.torch.distributed")

requires_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                   reason="torch.distributed with gloo is not available")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

SIZES = (13, 7)  # rank 0 and rank 1: unequal on purpose
D = 6

# name -> (loss, options, dtype, extra); extra: "strings", "floats", "empty_rank",
# "seedless", "ddp_scale", "all_reduce", "refused", "object_config"
CASES = {}
for _mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted"):
    for _reduction in ("mean", "sum", "mean_nonzero"):
        CASES[f"{_mining}-{_reduction}"] = (
            "triplet", dict(mining=_mining, reduction=_reduction, margin=0.3, normalize=True,
                            seed=17), np.float64, None)
for _reduction in ("mean", "sum", "mean_nonzero"):
    CASES[f"contrastive-{_reduction}"] = (
        "contrastive", dict(reduction=_reduction, pos_margin=0.1, neg_margin=1.2,
                            normalize=True), np.float64, None)
CASES.update({
    "batch_hard-soft-cosine": ("triplet", dict(mining="batch_hard", soft=True, metric="cosine"),
                               np.float64, None),
    "semi_hard-sqeuclidean": ("triplet", dict(mining="semi_hard", metric="sqeuclidean",
                                              margin=2.0), np.float64, None),
    "batch_all-auto-soft": ("triplet", dict(mining="batch_all", soft=True), np.float64, None),
    "contrastive-power2-cosine": ("contrastive", dict(power=2, metric="cosine", neg_margin=0.9),
                                  np.float64, None),
    "f32-batch_all": ("triplet", dict(mining="batch_all", normalize=True), np.float32, None),
    "f32-distance_weighted": ("triplet", dict(mining="distance_weighted", normalize=True,
                                              seed=4), np.float32, None),
    "f32-contrastive": ("contrastive", dict(normalize=True), np.float32, None),
    "string-labels": ("triplet", dict(mining="semi_hard"), np.float64, "strings"),
    "float-labels": ("contrastive", dict(neg_margin=3.0), np.float64, "floats"),
    "empty-rank": ("triplet", dict(mining="batch_all", reduction="mean"), np.float64,
                   "empty_rank"),
    "seedless-distance_weighted": ("triplet", dict(mining="distance_weighted", normalize=True),
                                   np.float64, "seedless"),
    "scale_for_ddp": ("contrastive", dict(neg_margin=2.0), np.float64, "ddp_scale"),
    "all_reduce": ("triplet", dict(mining="batch_all"), np.float64, "all_reduce"),
    "reduce_scatter-refused": ("contrastive", dict(reduction="mean_nonzero"), np.float64,
                               "refused"),
    "object-config": ("triplet", dict(mining="batch_hard", margin=0.5, soft=False,
                                      metric="euclidean", normalize=True, reduction="mean",
                                      seed=None), np.float64, "object_config"),
})


def _global_batch(name: str, dtype, extra):
    """The concatenated batch every case starts from (the same in every process)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    sizes = (sum(SIZES), 0) if extra == "empty_rank" else SIZES
    x = rng.standard_normal((sum(sizes), D)).astype(dtype)
    labels = rng.integers(0, 5, sum(sizes))
    if extra == "strings":
        labels = np.array([f"id-{k}" for k in labels])
    elif extra == "floats":
        labels = labels * 0.5
    return x, labels, sizes


# ---- the worker (one process per rank) -------------------------------------------


def _run_case(rank: int, name: str) -> dict:
    loss_kind, options, dtype, extra = CASES[name]
    x, labels, sizes = _global_batch(name, dtype, extra)
    start = sum(sizes[:rank])
    local_x = torch.tensor(x[start:start + sizes[rank]], requires_grad=True)
    local_labels = labels[start:start + sizes[rank]]
    if extra not in ("strings", "floats"):
        local_labels = torch.from_numpy(local_labels)
    if extra == "seedless":
        options = {k: v for k, v in options.items() if k != "seed"}
    wrapper_options = dict(scale_for_ddp=extra == "ddp_scale",
                           gradient_collective="all_reduce" if extra == "all_reduce" else "auto")
    if extra == "object_config":
        module = distributed.DistributedLoss(types.SimpleNamespace(**options), **wrapper_options)
    else:
        module = distributed.DistributedLoss(loss_kind, **wrapper_options, **options)
    loss = module(local_x, local_labels)
    if extra == "refused":
        _backward_where_reduce_scatter_is_refused(loss)
    else:
        loss.backward()
    stats = module.last_stats
    return {f"{name}/loss": loss.detach().numpy(), f"{name}/grad": local_x.grad.numpy(),
            f"{name}/counts": np.array([stats.n_active, stats.n_triplets or stats.n_pairs]),
            f"{name}/seed": np.array(stats.seed if stats.seed is not None else -1,
                                     dtype=np.uint64 if stats.seed is not None else np.int64)}


def _backward_where_reduce_scatter_is_refused(loss) -> None:
    """A backend without reduce-scatter (gloo before PyTorch 2.x) refuses it: all_reduce then."""
    def refuse(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    names = [n for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}
    try:
        for name in names:
            setattr(dist, name, refuse)
        loss.backward()
        assert "gloo" in distributed._REDUCE_SCATTER_REFUSED
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
        distributed._REDUCE_SCATTER_REFUSED.discard("gloo")


def _run_ddp(rank: int) -> dict:
    """A linear model under DistributedDataParallel with scale_for_ddp=True."""
    x, labels, sizes = _global_batch("ddp", np.float64, None)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    start = sum(sizes[:rank])
    inputs = torch.from_numpy(x[start:start + sizes[rank]])
    loss_fn = distributed.DistributedLoss("triplet", mining="batch_all", normalize=True,
                                          scale_for_ddp=True)
    loss = loss_fn(ddp(inputs), torch.from_numpy(labels[start:start + sizes[rank]]))
    loss.backward()
    return {"ddp/loss": loss.detach().numpy(), "ddp/weight": model.weight.grad.numpy(),
            "ddp/bias": model.bias.grad.numpy()}


def _run_failures(rank: int) -> dict:
    """A bad input on one rank makes every rank raise instead of hanging."""
    found = {}
    x = torch.randn(SIZES[rank], D, dtype=torch.float64)
    labels = torch.arange(SIZES[rank]) % 3
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = float("nan")  # in rank 1's rows only, but every rank sees the gathered batch
    short = labels[:-1] if rank == 1 else labels  # found by rank 1 alone
    margin = 0.2 if rank == 0 else 0.3  # options that differ across ranks
    return record_outcomes(found, (
        ("nan", lambda: distributed.distributed_triplet_loss(bad, labels)),
        ("labels", lambda: distributed.distributed_triplet_loss(x, short)),
        ("options", lambda: distributed.distributed_triplet_loss(x, labels, margin=margin)),
        ("width", lambda: distributed.distributed_triplet_loss(x[:, :D - rank], labels))))


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tripmine.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name in CASES:
            results.update(_run_case(rank, name))
        results.update(_run_ddp(rank))
        results.update(_run_failures(rank))
    finally:
        dist.destroy_process_group()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results, from one spawn of two gloo processes."""
    return spawn_ranks(_worker, 2, tmp_path_factory.mktemp("distributed"))


# ---- the parent's checks ---------------------------------------------------------


def _single_process(name: str, seed=None):
    loss_kind, options, dtype, extra = CASES[name]
    x, labels, sizes = _global_batch(name, dtype, extra)
    options = dict(options)
    if seed is not None:
        options["seed"] = seed
    if loss_kind == "triplet":
        return tripmine.triplet_loss(x, labels, **options), sizes
    return tripmine.contrastive_loss(x, labels, **options), sizes


@requires_gloo
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_reproduce_the_single_process_loss_and_gradient(ranks, name):
    _, _, dtype, extra = CASES[name]
    seed = None
    if extra == "seedless":  # every rank mined with rank 0's fresh seed
        seed = int(ranks[0][f"{name}/seed"])
        assert int(ranks[1][f"{name}/seed"]) == seed
    expected, sizes = _single_process(name, seed)
    loss_rtol = 1e-12 if dtype == np.float64 else 1e-6
    grad_rtol = 1e-12 if dtype == np.float64 else 2e-5
    for rank in range(2):
        assert float(ranks[rank][f"{name}/loss"]) == pytest.approx(expected.loss, rel=loss_rtol)
        assert ranks[rank][f"{name}/loss"].dtype == dtype
    # The same number on every rank.
    assert ranks[0][f"{name}/loss"] == ranks[1][f"{name}/loss"]
    count = expected.n_triplets if hasattr(expected, "n_triplets") else expected.n_pairs
    for rank in range(2):
        np.testing.assert_array_equal(ranks[rank][f"{name}/counts"], [expected.n_active, count])
    grad = np.concatenate([ranks[r][f"{name}/grad"] for r in range(2)])
    assert grad.shape == (sum(sizes), D)
    want = expected.grad * (2 if extra == "ddp_scale" else 1)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(grad, want, rtol=grad_rtol,
                               atol=grad_rtol * np.abs(want).max())


@requires_gloo
def test_ddp_trains_as_one_process(ranks):
    x, labels, _ = _global_batch("ddp", np.float64, None)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    embeddings = model(torch.from_numpy(x))
    expected = tripmine.triplet_loss(embeddings.detach().numpy(), labels, mining="batch_all",
                                     normalize=True)
    embeddings.backward(torch.from_numpy(expected.grad))
    # DDP averaged the ranks' gradients; scale_for_ddp made that the single-process one.
    assert_ddp_step([ranks[rank] for rank in range(2)], expected.loss,
                    model.weight.grad.numpy(), model.bias.grad.numpy(), rtol=1e-11)


@requires_gloo
def test_a_failure_on_one_rank_raises_on_every_rank(ranks):
    nan = [str(ranks[r]["fail/nan"]) for r in range(2)]
    assert nan[1].startswith("ValueError: x contains NaN")
    assert nan[0].startswith("ValueError: ref contains NaN")  # rank 1's rows, gathered
    labels = [str(ranks[r]["fail/labels"]) for r in range(2)]
    assert labels[1].startswith("ValueError: labels must be 1-D with one label per embedding")
    assert labels[0].startswith("RuntimeError") and "failed on rank(s) [1]" in labels[0]
    for r in range(2):
        assert "the loss options differs" in str(ranks[r]["fail/options"])
        assert "the number of features D differs" in str(ranks[r]["fail/width"])


# ---- one process (no process group) --------------------------------------------------


@pytest.mark.parametrize("loss_kind, options", [
    ("triplet", dict(mining="batch_hard")),
    ("triplet", dict(mining="semi_hard", reduction="sum", metric="cosine")),
    ("contrastive", dict(power=2, reduction="mean")),
])
def test_without_a_process_group_it_is_tripmine(loss_kind, options):
    rng = np.random.default_rng(1)
    x, labels = rng.standard_normal((24, 5)), rng.integers(0, 4, 24)
    embeddings = torch.tensor(x, requires_grad=True)
    loss = distributed.DistributedLoss(loss_kind, **options)(embeddings, labels.tolist())
    loss.backward()
    call = tripmine.triplet_loss if loss_kind == "triplet" else tripmine.contrastive_loss
    expected = call(x, labels, **options)
    assert loss.item() == pytest.approx(expected.loss, rel=1e-13)
    np.testing.assert_allclose(embeddings.grad.numpy(), expected.grad, rtol=1e-12, atol=1e-15)


def test_float16_embeddings_compute_in_float32():
    rng = np.random.default_rng(2)
    x, labels = rng.standard_normal((16, 4)).astype(np.float16), np.repeat(np.arange(4), 4)
    embeddings = torch.tensor(x, requires_grad=True)
    loss = distributed.distributed_triplet_loss(embeddings, torch.from_numpy(labels),
                                                mining="batch_all")
    loss.backward()
    expected = tripmine.triplet_loss(x, labels, mining="batch_all")
    assert loss.dtype == torch.float32 and embeddings.grad.dtype == torch.float16
    assert loss.item() == pytest.approx(expected.loss, rel=1e-6)
    np.testing.assert_allclose(embeddings.grad.float().numpy(), expected.grad, rtol=1e-3,
                               atol=1e-3 * np.abs(expected.grad).max())


def test_no_grad_skips_the_gradient():
    embeddings = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        loss = distributed.distributed_contrastive_loss(embeddings, torch.arange(8) % 2)
    assert loss.requires_grad is False and loss.item() >= 0


@pytest.mark.parametrize("make, error, match", [
    (lambda: distributed.DistributedLoss("triplet", reduction="none"), ValueError,
     "reduction must be one of"),
    (lambda: distributed.DistributedLoss("triplet", mining=tripmine.Triplets([0], [1], [2])),
     ValueError, "mining must be one of"),
    (lambda: distributed.DistributedLoss("triplet", pos_margin=0.1), TypeError,
     r"unknown option\(s\) \['pos_margin'\]"),
    (lambda: distributed.DistributedLoss("arcface"), ValueError, "loss must be 'triplet'"),
    (lambda: distributed.DistributedLoss(object()), TypeError, "cannot tell which loss"),
    (lambda: distributed.DistributedLoss(types.SimpleNamespace(mining="batch_hard", margin=0.1),
                                         margin=0.2),
     TypeError, "either a loss object or keyword options"),
    (lambda: distributed.DistributedLoss("triplet", scale_for_ddp=1), TypeError,
     "scale_for_ddp must be True or False"),
    (lambda: distributed.DistributedLoss("triplet", gradient_collective="ring"), ValueError,
     "gradient_collective must be one of"),
])
def test_bad_configuration(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs_name_the_argument():
    loss = distributed.DistributedLoss("triplet")
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        loss(torch.zeros(4), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="embeddings must be float16, bfloat16"):
        loss(torch.zeros(4, 2, dtype=torch.int32), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"labels must be 1-D with one label per embedding \(4\)"):
        loss(torch.zeros(4, 2), [0, 1, 1])
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        loss(np.zeros((4, 2)), [0, 0, 1, 1])


def test_the_wrapped_object_is_read_at_every_call():
    config = types.SimpleNamespace(mining="batch_hard", margin=0.0, soft=False,
                                   metric="euclidean", normalize=False, reduction="sum", seed=None)
    loss = distributed.DistributedLoss(config)
    x, labels = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 3
    for margin in (0.0, 0.7):
        config.margin = margin
        expected = tripmine.triplet_loss(x.numpy(), labels.numpy(), margin=margin, reduction="sum")
        assert loss(x, labels).item() == pytest.approx(expected.loss, rel=1e-13)
        assert loss.last_stats.n_active == expected.n_active


# ---- CUDA ----------------------------------------------------------------------------


@requires_cuda
def test_cuda_embeddings_take_the_cupy_path_or_say_why():
    rng = np.random.default_rng(3)
    x, labels = rng.standard_normal((16, 4)), np.repeat(np.arange(4), 4)
    embeddings = torch.tensor(x, device="cuda", requires_grad=True)
    try:
        loss = distributed.distributed_triplet_loss(
            embeddings, torch.from_numpy(labels).cuda(), mining="batch_all")
    except TypeError as exc:  # no CuPy, or tripmine without its GPU path yet
        assert "CuPy" in str(exc) or "GPU path" in str(exc)
        return
    loss.backward()
    expected = tripmine.triplet_loss(x, labels, mining="batch_all")
    assert loss.item() == pytest.approx(expected.loss, rel=1e-10)
    np.testing.assert_allclose(embeddings.grad.cpu().numpy(), expected.grad, rtol=1e-9,
                               atol=1e-12)


def test_wrapped_module_options_it_cannot_carry_are_refused():
    torch_losses = pytest.importorskip("tripmine.torch")
    from tripmine.torch.distributed import DistributedLoss

    DistributedLoss(torch_losses.TripletLoss(mining="batch_all"))  # defaults: fine
    for options in ({"mining": "semi_hard", "select": "random"}, {"max_triplets": 10},
                    {"mining": "distance_weighted", "cutoff": 0.7}):
        with pytest.raises(ValueError, match="does not support"):
            DistributedLoss(torch_losses.TripletLoss(**options))
