"""tripmine.torch.distributed.ShardedMarginSoftmax: W split across gloo ranks, the same loss
and gradients as the single-process head on the concatenated batch and W.

One spawn of two processes and one of three run every case; the parent compares each
rank's loss, embedding gradient and weight slice with tripmine.torch's single-process
heads.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
distributed = pytest.importorskip("tripmine.torch.distributed")
theads = pytest.importorskip("tripmine.torch.heads")

from gloo import assert_ddp_step, record_outcomes, spawn_ranks  # noqa: E402

import tripmine  # noqa: E402
from tripmine.torch.sharded import _split  # noqa: E402

requires_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                   reason="torch.distributed with gloo is not available")

D = 6
C = 13
HEADS = {"softmax": (theads.SoftmaxLoss, {}),
         "normface": (theads.NormFace, dict(scale=6.0)),
         "cosface": (theads.CosFace, dict(scale=8.0, margin=0.3)),
         "arcface": (theads.ArcFace, dict(scale=8.0, margin=0.4)),
         "combined": (theads.CombinedMargin, dict(scale=7.0, m1=1.1, m2=0.2, m3=0.1)),
         "sphereface": (theads.SphereFace, dict(margin=3, lambda_=0.5)),
         "lsoftmax": (theads.LargeMarginSoftmax, dict(margin=2, lambda_=1.0))}

# name -> (head, options, dtype, extra)
CASES = {f"{kind}-f64": (kind, options, np.float64, None) for kind, (_, options) in HEADS.items()}
CASES.update({
    "arcface-f32": ("arcface", dict(scale=8.0), np.float32, None),
    "softmax-weighted-sum": ("softmax", dict(class_weight=np.linspace(0.2, 2.0, C),
                                             reduction="sum"), np.float64, None),
    "softmax-no-bias": ("softmax", dict(bias=False), np.float64, None),
    "arcface-straight-through": ("arcface", dict(scale=8.0, straight_through=True),
                                 np.float64, None),
    "cosface-empty-rank": ("cosface", dict(scale=8.0), np.float64, "empty_rank"),
    # every label in rank 0's classes: the other ranks hold no target and no positive class
    "arcface-targets-on-rank-0": ("arcface", dict(scale=8.0), np.float64, "first_shard"),
    "normface-ddp-scale": ("normface", dict(scale=6.0), np.float64, "ddp_scale"),
    "cosface-float16": ("cosface", dict(scale=8.0), np.float16, None),
})


def _sizes(world: int, extra) -> list[int]:
    sizes = [11, 6] if world == 2 else [9, 4, 7]
    if extra == "empty_rank":
        sizes[-1] = 0
    return sizes


def _problem(name: str, world: int):
    """The global batch and W of a case (the same in every process)."""
    kind, options, dtype, extra = CASES[name]
    rng = np.random.default_rng([sum(map(ord, name)), world])
    sizes = _sizes(world, extra)
    x = rng.standard_normal((sum(sizes), D)).astype(dtype)
    labels = rng.integers(0, C, sum(sizes))
    if extra == "first_shard":
        labels = rng.integers(0, C // world, sum(sizes))
    weight = rng.standard_normal((C, D))
    bias = rng.standard_normal(C)
    return x, labels, weight, bias, sizes


def _partial_problem(world: int):
    """arcface-f64's problem with its labels on three classes, so that Partial FC draws."""
    x, labels, weight, bias, sizes = _problem("arcface-f64", world)
    return x, labels % 3 * 5, weight, bias, sizes


def _sharded_module(name: str, world: int, **extra_options):
    kind, options, dtype, extra = CASES[name]
    module = distributed.ShardedMarginSoftmax(HEADS[kind][0], C, D,
                                              scale_for_ddp=extra == "ddp_scale",
                                              **options, **extra_options)
    return module.double() if dtype == np.float64 else module


def _load(module, weight, bias) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight[module.class_start:module.class_stop]))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(bias[module.class_start:module.class_stop]))


# ---- the workers (one process per rank) -------------------------------------------------


def _run_case(rank: int, world: int, name: str) -> dict:
    x, labels, weight, bias, sizes = _problem(name, world)
    start = sum(sizes[:rank])
    module = _sharded_module(name, world)
    _load(module, weight, bias)
    local_x = torch.tensor(x[start:start + sizes[rank]], requires_grad=True)
    loss = module(local_x, torch.from_numpy(labels[start:start + sizes[rank]]))
    loss.backward()
    out = {f"{name}/loss": loss.detach().numpy(), f"{name}/grad": local_x.grad.float().numpy()
           if local_x.dtype == torch.float16 else local_x.grad.numpy(),
           f"{name}/weight_grad": module.weight.grad.numpy(),
           f"{name}/range": np.array([module.class_start, module.class_stop]),
           f"{name}/correct": np.array(module.n_correct)}
    if module.bias is not None:
        out[f"{name}/bias_grad"] = module.bias.grad.numpy()
    return out


def _run_partial(rank: int, world: int) -> dict:
    """Partial FC: two training steps, the kept classes, and a second module replaying the
    first step."""
    x, labels, weight, bias, sizes = _partial_problem(world)
    start = sum(sizes[:rank])
    local_labels = torch.from_numpy(labels[start:start + sizes[rank]])
    out = {}
    module = distributed.ShardedMarginSoftmax("arcface", C, D, sample_rate=0.4, seed=11,
                                              **HEADS["arcface"][1]).double()
    _load(module, weight, bias)
    for step in range(2):
        local_x = torch.tensor(x[start:start + sizes[rank]], requires_grad=True)
        module.weight.grad = None
        loss = module(local_x, local_labels)
        loss.backward()
        out[f"partial{step}/loss"] = loss.detach().numpy()
        out[f"partial{step}/grad"] = local_x.grad.numpy()
        out[f"partial{step}/weight_grad"] = module.weight.grad.numpy()
        out[f"partial{step}/classes"] = module._last_classes
    out["partial/step"] = np.array(int(module.sample_step))
    replay = distributed.ShardedMarginSoftmax("arcface", C, D, sample_rate=0.4, seed=11,
                                              **HEADS["arcface"][1]).double()
    _load(replay, weight, bias)
    loss = replay(torch.tensor(x[start:start + sizes[rank]]), local_labels)
    out["replay/loss"] = loss.detach().numpy()
    out["replay/classes"] = replay._last_classes
    replay.eval()  # every class, and the step stays
    out["eval/loss"] = replay(torch.tensor(x[start:start + sizes[rank]]),
                              local_labels).detach().numpy()
    out["eval/step"] = np.array(int(replay.sample_step))
    return out


def _run_ddp(rank: int, world: int) -> dict:
    """A linear backbone under DDP beside the sharded head (not wrapped)."""
    x, labels, weight, bias, sizes = _problem("arcface-f64", world)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    head = distributed.ShardedMarginSoftmax("arcface", C, D, scale_for_ddp=True,
                                            **HEADS["arcface"][1]).double()
    _load(head, weight, bias)
    start = sum(sizes[:rank])
    loss = head(ddp(torch.from_numpy(x[start:start + sizes[rank]])),
                torch.from_numpy(labels[start:start + sizes[rank]]))
    loss.backward()
    return {"ddp/loss": loss.detach().numpy(), "ddp/weight": backbone.weight.grad.numpy(),
            "ddp/bias": backbone.bias.grad.numpy(), "ddp/head": head.weight.grad.numpy()}


def _run_failures(rank: int, world: int) -> dict:
    """A refused input or a mismatched option on one rank raises on every rank."""
    found = {}
    x = torch.randn(5, D, dtype=torch.float64)
    labels = torch.arange(5) % C
    bad_labels = labels.clone()
    if rank == 1:
        bad_labels[0] = C  # outside the classes, on rank 1 only
    calls = {
        "labels": lambda: distributed.ShardedMarginSoftmax("cosface", C, D).double()(
            x, bad_labels),
        "options": lambda: distributed.ShardedMarginSoftmax(
            "cosface", C, D, margin=0.2 + 0.1 * (rank == 1)).double()(x, labels),
        "classes": lambda: distributed.ShardedMarginSoftmax(
            "cosface", C + (rank == 1), D).double()(x, labels),
        "rate": lambda: distributed.ShardedMarginSoftmax(
            "cosface", C, D, sample_rate=0.5 if rank == 0 else 1.0, seed=1).double()(x, labels),
    }
    return record_outcomes(found, calls.items())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tripmine.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name in CASES:
            results.update(_run_case(rank, world, name))
        results.update(_run_partial(rank, world))
        results.update(_run_ddp(rank, world))
        results.update(_run_failures(rank, world))
    finally:
        dist.destroy_process_group()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    """Every rank's results (world, [rank 0, rank 1, ...]), one spawn per world size."""
    world = request.param
    return world, spawn_ranks(_worker, world, tmp_path_factory.mktemp(f"sharded{world}"),
                              world)


# ---- the parent's checks ------------------------------------------------------------


def _single_process(name: str, world: int, weight=None, labels=None, x=None):
    """The single-process head on the concatenated batch and W: (loss, dL/dx, dL/dW,
    dL/db, n_correct)."""
    kind, options, dtype, extra = CASES[name]
    gx, glabels, gweight, bias, _ = _problem(name, world)
    x = gx if x is None else x
    weight = gweight if weight is None else weight
    labels = glabels if labels is None else labels
    module = HEADS[kind][0](len(weight), D, **options).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.from_numpy(bias[:len(weight)]))
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    loss = module(xt, torch.from_numpy(labels))
    loss.backward()
    bias_grad = module.bias.grad.numpy() if getattr(module, "bias", None) is not None else None
    return loss.item(), xt.grad.numpy(), module.weight.grad.numpy(), bias_grad, module.n_correct


def _tolerance(dtype) -> float:
    return {np.float64: 1e-11, np.float32: 2e-5, np.float16: 2e-3}[dtype]


@requires_gloo
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_reproduce_the_single_process_head(ranks, name):
    world, results = ranks
    kind, options, dtype, extra = CASES[name]
    loss, grad, weight_grad, bias_grad, correct = _single_process(name, world)
    rtol = _tolerance(dtype)
    for r in range(world):
        assert float(results[r][f"{name}/loss"]) == pytest.approx(loss, rel=rtol)
        assert results[r][f"{name}/loss"] == results[0][f"{name}/loss"]  # bit-identical
        assert int(results[r][f"{name}/correct"]) == correct
    scale = world if extra == "ddp_scale" else 1
    got = np.concatenate([results[r][f"{name}/grad"] for r in range(world)])
    assert np.abs(grad).max() > 0
    np.testing.assert_allclose(got, scale * grad, rtol=rtol, atol=rtol * np.abs(grad).max())
    ranges = [tuple(results[r][f"{name}/range"]) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == C
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
    got_w = np.concatenate([results[r][f"{name}/weight_grad"] for r in range(world)])
    np.testing.assert_allclose(got_w, weight_grad, rtol=rtol,
                               atol=rtol * np.abs(weight_grad).max())
    if bias_grad is not None:
        got_b = np.concatenate([results[r][f"{name}/bias_grad"] for r in range(world)])
        np.testing.assert_allclose(got_b, bias_grad, rtol=rtol, atol=rtol)


@requires_gloo
def test_partial_fc_is_the_exact_sampled_softmax(ranks):
    world, results = ranks
    x, labels, weight, _, sizes = _partial_problem(world)
    for step in range(2):
        kept = [results[r][f"partial{step}/classes"] for r in range(world)]
        for r in range(world):
            lo, hi = _split(C, world, r)
            assert np.all(np.diff(kept[r]) > 0) and kept[r].min() >= lo and kept[r].max() < hi
            positives = np.unique(labels[(labels >= lo) & (labels < hi)])
            assert np.isin(positives, kept[r]).all()  # every positive class is kept
            assert len(kept[r]) == max(len(positives), math.ceil(0.4 * (hi - lo)))
            # rows that were not kept get no gradient
            dropped = np.setdiff1d(np.arange(lo, hi), kept[r]) - lo
            assert not results[r][f"partial{step}/weight_grad"][dropped].any()
        union = np.concatenate(kept)
        assert len(union) < C  # something was dropped
        remapped = np.searchsorted(union, labels)
        loss, grad, weight_grad, _, _ = _single_process("arcface-f64", world,
                                                        weight=weight[union], labels=remapped)
        for r in range(world):
            assert float(results[r][f"partial{step}/loss"]) == pytest.approx(loss, rel=1e-11)
        got = np.concatenate([results[r][f"partial{step}/grad"] for r in range(world)])
        np.testing.assert_allclose(got, grad, rtol=1e-11, atol=1e-11 * np.abs(grad).max())
        full_w = np.zeros((C, D))
        full_w[union] = weight_grad
        got_w = np.concatenate([results[r][f"partial{step}/weight_grad"] for r in range(world)])
        np.testing.assert_allclose(got_w, full_w, rtol=1e-11, atol=1e-13)
    for r in range(world):
        assert int(results[r]["partial/step"]) == 2
        # Reproducible: a fresh module with the same seed draws the same classes at step 0.
        np.testing.assert_array_equal(results[r]["replay/classes"],
                                      results[r]["partial0/classes"])
        assert results[r]["replay/loss"] == results[r]["partial0/loss"]
        assert int(results[r]["eval/step"]) == 1  # eval mode neither samples nor steps
    draws = [np.concatenate([results[r][f"partial{s}/classes"] for r in range(world)])
             for s in range(2)]
    assert not np.array_equal(draws[0], draws[1])  # the step changes the draw
    full = _single_process("arcface-f64", world, labels=labels)[0]
    assert float(results[0]["eval/loss"]) == pytest.approx(full, rel=1e-11)


@requires_gloo
def test_ddp_backbone_beside_the_sharded_head(ranks):
    world, results = ranks
    x, labels, weight, _, _ = _problem("arcface-f64", world)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D).double()
    head = theads.ArcFace(C, D, **HEADS["arcface"][1]).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    loss = head(backbone(torch.from_numpy(x)), torch.from_numpy(labels))
    loss.backward()
    got_head = np.concatenate([results[r]["ddp/head"] for r in range(world)])
    np.testing.assert_allclose(got_head, head.weight.grad.numpy(), rtol=1e-11, atol=1e-13)
    assert_ddp_step([results[r] for r in range(world)], loss.item(),
                    backbone.weight.grad.numpy(), backbone.bias.grad.numpy(), rtol=1e-10)


@requires_gloo
def test_a_refusal_on_one_rank_raises_on_every_rank(ranks):
    world, results = ranks
    labels = [str(results[r]["fail/labels"]) for r in range(world)]
    assert labels[1].startswith("ValueError: labels must lie in [0, 13)")
    for r in (0, *range(2, world)):
        assert labels[r].startswith("RuntimeError") and "failed on rank(s) [1]" in labels[r]
    for r in range(world):
        assert "the head's options" in str(results[r]["fail/options"])
        assert "the head's options" in str(results[r]["fail/classes"])
        assert "differs across ranks" in str(results[r]["fail/rate"])


# ---- one process ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HEADS))
def test_without_a_process_group_it_is_the_head(kind):
    cls, options = HEADS[kind]
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((20, D)), requires_grad=True)
    labels = torch.from_numpy(rng.integers(0, C, 20))
    sharded = distributed.ShardedMarginSoftmax(cls, C, D, **options).double()
    single = cls(C, D, **options).double()
    with torch.no_grad():
        single.weight.copy_(sharded.weight)
        if sharded.bias is not None:
            single.bias.copy_(sharded.bias)
    loss = sharded(x, labels)
    (2.5 * loss).backward()  # backward scales by grad_output
    grad, x.grad = x.grad.clone(), None
    expected = single(x, labels)
    (2.5 * expected).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), x.grad.numpy(), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(sharded.weight.grad.numpy(), single.weight.grad.numpy(),
                               rtol=1e-11, atol=1e-14)
    assert sharded.n_correct == single.n_correct


def test_initialisation_follows_the_head():
    torch.manual_seed(0)
    arc = distributed.ShardedMarginSoftmax("arcface", 1000, 64)
    assert 0.008 < float(arc.weight.detach().std()) < 0.012
    soft = distributed.ShardedMarginSoftmax("softmax", 1000, 64)
    bound = 1 / math.sqrt(64)
    assert float(soft.weight.detach().abs().max()) <= bound
    assert float(soft.bias.detach().abs().max()) <= bound
    assert distributed.ShardedMarginSoftmax("softmax", 10, 4, bias=False).bias is None


def test_no_grad_and_float32():
    module = distributed.ShardedMarginSoftmax("cosface", 7, 3)
    x = torch.randn(9, 3)
    with torch.no_grad():
        loss = module(x, torch.arange(9) % 7)
    assert loss.dtype == torch.float32 and not loss.requires_grad and loss.item() > 0
    assert 0 <= module.accuracy <= 1 and module.n_classes_used == 7


def test_partial_fc_keeps_every_positive_when_they_exceed_the_rate():
    module = distributed.ShardedMarginSoftmax("arcface", 10, 3, sample_rate=0.1, seed=0)
    labels = torch.tensor([1, 4, 4, 7])
    module(torch.randn(4, 3), labels).backward()
    np.testing.assert_array_equal(module._last_classes, [1, 4, 7])
    assert module.n_classes_used == 3


def test_state_dict_carries_the_sampling_step():
    module = distributed.ShardedMarginSoftmax("cosface", 12, 3, sample_rate=0.5, seed=4)
    x, labels = torch.randn(3, 3), torch.tensor([0, 1, 2])
    module(x, labels)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert int(state["sample_step"]) == 1
    following = module(x, labels).item(), module._last_classes
    restored = distributed.ShardedMarginSoftmax("cosface", 12, 3, sample_rate=0.5, seed=4)
    restored.load_state_dict(state)
    assert restored(x, labels).item() == following[0]
    np.testing.assert_array_equal(restored._last_classes, following[1])


@pytest.mark.parametrize("make, error, match", [
    (lambda: distributed.ShardedMarginSoftmax("arc", 10, 4), ValueError, "head must be one of"),
    (lambda: distributed.ShardedMarginSoftmax(object, 10, 4), TypeError,
     "head must be a tripmine.torch head class"),
    (lambda: distributed.ShardedMarginSoftmax(theads.ArcFace(10, 4), 10, 4), TypeError,
     "not a module instance"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 0, 4), ValueError,
     "num_classes must be an integer >= 1"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4.0), ValueError,
     "embedding_dim must be an integer >= 1"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, sample_rate=0.0), ValueError,
     r"sample_rate must lie in \(0, 1\]"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, sample_rate=1.5), ValueError,
     r"sample_rate must lie in \(0, 1\]"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, seed=-1), ValueError,
     "seed must be a non-negative integer"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, margin=4.0), ValueError,
     "margin must lie in"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, mrgin=0.3), TypeError,
     "mrgin"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, reduction="none"), ValueError,
     "reduction must be 'mean' or 'sum'"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, bias=True), TypeError,
     "bias applies to the softmax head only"),
    (lambda: distributed.ShardedMarginSoftmax("softmax", 10, 4, class_weight=[1.0] * 9),
     ValueError, "class_weight must be 10 finite weights"),
    (lambda: distributed.ShardedMarginSoftmax("arcface", 10, 4, scale_for_ddp="yes"), TypeError,
     "scale_for_ddp must be True or False"),
])
def test_bad_configuration(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs_name_the_argument_and_change_nothing():
    module = distributed.ShardedMarginSoftmax("arcface", 10, 4)
    before = module.weight.detach().clone()
    with pytest.raises(ValueError, match=r"x must be \(n, 4\)"):
        module(torch.zeros(3, 5), [0, 1, 2])
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        module(torch.zeros(3, 4, dtype=torch.int32), [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        module(torch.zeros(3, 4), [0, 1, 10])
    with pytest.raises(ValueError, match="labels has length 2 but x has 3 rows"):
        module(torch.zeros(3, 4), [0, 1])
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        module(bad, [0, 1, 2])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module(np.zeros((3, 4)), [0, 1, 2])
    assert torch.equal(module.weight, before) and module.weight.grad is None


# ---- CUDA (skipped without a GPU) -----------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("kind", ["arcface", "softmax", "sphereface"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_cuda_takes_the_cupy_path_and_matches_the_cpu(kind, sample_rate):
    pytest.importorskip("cupy")
    cls, options = HEADS[kind]
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, D))
    labels = torch.from_numpy(rng.integers(0, C, 40))
    weight, bias = rng.standard_normal((C, D)), rng.standard_normal(C)
    runs = []
    for device in ("cpu", "cuda"):
        module = distributed.ShardedMarginSoftmax(cls, C, D, sample_rate=sample_rate, seed=2,
                                                  **options).double()
        _load(module, weight, bias)
        module = module.to(device)
        xt = torch.tensor(x, device=device, requires_grad=True)
        loss = module(xt, labels.to(device))
        loss.backward()
        runs.append((loss.item(), xt.grad.cpu().numpy(), module.weight.grad.cpu().numpy()))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-10)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(runs[1][2], runs[0][2], rtol=1e-9, atol=1e-12)


def _nccl_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=1, timeout=timedelta(seconds=60))
    try:
        results = {}
        x, labels, weight, bias, _ = _problem("arcface-f64", 2)
        module = _sharded_module("arcface-f64", 2).cuda()
        _load(module, weight, bias)
        xt = torch.tensor(x, device="cuda", requires_grad=True)
        loss = module(xt, torch.from_numpy(labels).cuda())
        loss.backward()
        results = {"loss": loss.cpu().numpy(), "grad": xt.grad.cpu().numpy(),
                   "weight_grad": module.weight.grad.cpu().numpy()}
    finally:
        dist.destroy_process_group()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)


@requires_cuda
def test_nccl_with_one_rank_is_the_head(tmp_path):
    pytest.importorskip("cupy")
    if not dist.is_nccl_available():
        pytest.skip("torch.distributed without NCCL")
    spawn_ranks(_nccl_worker, 1, tmp_path)
    got = dict(np.load(tmp_path / "rank0.npz"))
    loss, grad, weight_grad, _, _ = _single_process("arcface-f64", 2)
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-10)
    np.testing.assert_allclose(got["grad"], grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["weight_grad"], weight_grad, rtol=1e-9, atol=1e-12)


def test_backward_hands_the_weight_gradient_over_and_refuses_a_second_pass():
    module = distributed.ShardedMarginSoftmax("cosface", 9, 3)
    x = torch.randn(5, 3, requires_grad=True)
    loss = module(x, torch.arange(5))
    (3.0 * loss).backward(retain_graph=True)
    first = module.weight.grad.clone()
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()
    module.weight.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    module(x2, torch.arange(5)).backward()
    torch.testing.assert_close(first, 3.0 * module.weight.grad)


def test_a_loss_beyond_float32_raises():
    module = distributed.ShardedMarginSoftmax("softmax", 4, 5, bias=False)
    with torch.no_grad():
        module.weight.fill_(1e19)
        module.weight[0] = -1e19
    x = torch.full((3, 5), 1e20)
    with pytest.raises(FloatingPointError, match="the loss of the sharded softmax head"):
        module(x, torch.tensor([0, 0, 0]))


def test_float32_embeddings_with_a_float64_head_compute_in_float64():
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.standard_normal((10, D)), dtype=torch.float32, requires_grad=True)
    labels = torch.from_numpy(rng.integers(0, C, 10))
    sharded = distributed.ShardedMarginSoftmax("cosface", C, D, scale=8.0).double()
    single = theads.CosFace(C, D, scale=8.0).double()
    with torch.no_grad():
        single.weight.copy_(sharded.weight)
    got = sharded(x, labels)
    got.backward()
    grad, x.grad = x.grad.clone(), None
    want = single(x, labels)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, x.grad)
    torch.testing.assert_close(sharded.weight.grad, single.weight.grad, rtol=1e-11, atol=1e-14)
