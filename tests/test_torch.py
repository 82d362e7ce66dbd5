"""tripmine.torch: the autograd bridge (copies, dtypes, devices, grad modes), the
modules' attributes and counts, seeds, errors and torch.compile.

The losses themselves are checked against pure-torch autograd references in
``test_torch_reference.py``; the memory bank in ``test_torch_memory.py``.
Everything here is skipped when torch is not installed, and the CUDA tests when
no GPU (or no CuPy) is present.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tripmine
from tripmine import _problem

torch = pytest.importorskip("torch")
tt = pytest.importorskip("tripmine.torch")

from tripmine.torch import _bridge  # noqa: E402  (after the skip)

MINING = ("batch_hard", "batch_all", "semi_hard", "distance_weighted")


def batch(seed=0, n_classes=4, per_class=4, dim=6, dtype=torch.float32, requires_grad=True):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    x = torch.tensor(rng.standard_normal((labels.shape[0], dim)), dtype=dtype)
    return x.requires_grad_(requires_grad), torch.from_numpy(labels)


def test_import_tripmine_does_not_import_torch():
    code = "import sys, tripmine; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- no copies


@pytest.fixture
def prepared(monkeypatch):
    """The arrays tripmine's validation hands to the C core, for every call."""
    seen = []
    original = _problem.prepare

    def spy(*args, **kwargs):
        problem = original(*args, **kwargs)
        seen.append(problem)
        return problem

    monkeypatch.setattr(_problem, "prepare", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mining", MINING[:3])
def test_cpu_tensors_reach_the_c_core_without_a_copy(prepared, mining, dtype):
    x, labels = batch(dtype=dtype)
    ref, ref_labels = batch(seed=1, dtype=dtype)
    loss = tt.triplet_loss(x, labels, mining=mining, ref=ref, ref_labels=ref_labels)
    loss.backward()
    (problem,) = prepared
    assert problem.x.ctypes.data == x.data_ptr()
    assert problem.ref.ctypes.data == ref.data_ptr()
    assert np.shares_memory(problem.x, x.detach().numpy())
    assert x.grad is not None and ref.grad is not None
    prepared.clear()
    tt.contrastive_loss(x, labels).backward()
    assert prepared[0].x.ctypes.data == x.data_ptr()


def test_gradient_comes_back_without_a_copy(monkeypatch):
    """The gradient array tripmine writes is the tensor backward scales (a view)."""
    x, labels = batch(dtype=torch.float64)
    arrays = []
    original = tripmine.triplet_loss

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        arrays.append(result.grad)
        return result

    monkeypatch.setattr(tripmine, "triplet_loss", spy)
    loss = tt.triplet_loss(x, labels)
    saved_grad = loss.grad_fn.saved_tensors[0]
    assert saved_grad.data_ptr() == arrays[0].ctypes.data


def test_non_contiguous_input_gives_the_same_loss_and_gradient():
    x, labels = batch(dim=12, requires_grad=False)
    wide = x.clone().requires_grad_(True)
    strided = wide[:, ::2]  # a view with strides (12, 2)
    assert not strided.is_contiguous()
    loss = tt.triplet_loss(strided, labels, mining="batch_all", normalize=True)
    loss.backward()
    dense = strided.detach().contiguous().requires_grad_(True)
    expected = tt.triplet_loss(dense, labels, mining="batch_all", normalize=True)
    expected.backward()
    assert loss.item() == expected.item()
    torch.testing.assert_close(wide.grad[:, ::2], dense.grad, rtol=0, atol=0)
    assert torch.all(wide.grad[:, 1::2] == 0)
    # A transposed (Fortran-order) tensor too.
    transposed = dense.detach().T.contiguous().T.requires_grad_(True)
    assert not transposed.is_contiguous()
    tt.triplet_loss(transposed, labels, mining="batch_all", normalize=True).backward()
    torch.testing.assert_close(transposed.grad, dense.grad, rtol=0, atol=0)


# --------------------------------------------------------------------------- grad modes


@pytest.fixture
def grad_requests(monkeypatch):
    """The ``grad=`` every tripmine loss call was made with."""
    seen = []
    for name in ("triplet_loss", "contrastive_loss"):
        original = getattr(tripmine, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["grad"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(tripmine, name, spy)
    return seen


def test_no_gradient_is_computed_when_none_is_needed(grad_requests):
    x, labels = batch(requires_grad=False)
    loss = tt.triplet_loss(x, labels)
    assert not loss.requires_grad and grad_requests == [False]
    x.requires_grad_(True)
    with torch.no_grad():
        loss = tt.contrastive_loss(x, labels)
    assert not loss.requires_grad and grad_requests == [False, False]
    with torch.inference_mode():
        tt.TripletLoss()(x, labels)
    assert grad_requests[-1] is False
    loss = tt.triplet_loss(x, labels)
    assert loss.requires_grad and grad_requests[-1] is True


def test_gradient_flows_into_ref_only_when_asked():
    x, labels = batch()
    ref, ref_labels = batch(seed=1, requires_grad=False)
    tt.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels).backward()
    assert x.grad is not None and ref.grad is None
    x2, _ = batch(requires_grad=False)
    ref.requires_grad_(True)
    tt.triplet_loss(x2, labels, ref=ref, ref_labels=ref_labels).backward()
    assert x2.grad is None and ref.grad is not None and ref.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [1.0, 0.0, -3.5, 1e3])
@pytest.mark.parametrize("mining", MINING)
def test_backward_scales_tripmines_gradient_by_grad_output(mining, scale):
    x, labels = batch(dtype=torch.float64)
    loss = tt.triplet_loss(x, labels, mining=mining, normalize=True, seed=4)
    loss.backward(torch.tensor(scale, dtype=torch.float64))
    expected = tripmine.triplet_loss(x.detach().numpy(), labels.numpy(), mining=mining,
                                     normalize=True, seed=4)
    assert loss.item() == expected.loss
    np.testing.assert_array_equal(x.grad.numpy(), scale * expected.grad)


def test_gradient_accumulates_and_graph_can_be_retained():
    x, labels = batch(dtype=torch.float64)
    loss = tt.contrastive_loss(x, labels)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)


def test_double_backward_raises_a_clear_error():
    x, labels = batch(dtype=torch.float64)
    (grad,) = torch.autograd.grad(tt.triplet_loss(x, labels), x, create_graph=True)
    assert grad.requires_grad  # so that it cannot silently act as a constant
    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad ** 2).sum().backward()
    # The values are those of a plain backward: create_graph=True alone still works.
    (plain,) = torch.autograd.grad(tt.triplet_loss(x, labels), x)
    torch.testing.assert_close(grad.detach(), plain, rtol=0, atol=0)


def test_loss_through_a_model_trains_its_parameters():
    torch.manual_seed(0)
    x, labels = batch(requires_grad=False)
    model = torch.nn.Linear(6, 3)
    loss = tt.TripletLoss(normalize=True)(model(x), labels)
    loss.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(mining, dtype):
    x32, labels = batch(seed=3, requires_grad=False)
    half = x32.to(dtype).requires_grad_(True)
    loss = tt.triplet_loss(half, labels, mining=mining, normalize=True, seed=2)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    assert torch.isfinite(half.grad.float()).all()
    # Exactly the float32 computation on the rounded inputs, rounded once at the end.
    rounded = half.detach().float().requires_grad_(True)
    expected = tt.triplet_loss(rounded, labels, mining=mining, normalize=True, seed=2)
    expected.backward()
    assert loss.item() == expected.item()
    torch.testing.assert_close(half.grad, rounded.grad.to(dtype), rtol=0, atol=0)
    # And close to the float32 computation on the unrounded inputs.
    exact = x32.clone().requires_grad_(True)
    reference = tt.triplet_loss(exact, labels, mining=mining, normalize=True, seed=2)
    reference.backward()
    rtol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    if mining in ("batch_hard", "batch_all"):  # the same triplets; the random rules may differ
        assert loss.item() == pytest.approx(reference.item(), rel=rtol, abs=rtol)
        scale = exact.grad.abs().max().item()
        torch.testing.assert_close(half.grad.float(), exact.grad, rtol=rtol, atol=rtol * scale)


def test_half_contrastive_and_mixed_precision_reference():
    x, labels = batch(requires_grad=False)
    half = x.half().requires_grad_(True)
    loss = tt.contrastive_loss(half, labels, neg_margin=4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.float16
    assert torch.isfinite(half.grad).all() and half.grad.abs().sum() > 0
    # float32 queries against a float64 reference compute in float64.
    ref, ref_labels = batch(seed=5, dtype=torch.float64)
    x.requires_grad_(True)
    loss = tt.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels)
    loss.backward()
    assert loss.dtype == torch.float64
    assert x.grad.dtype == torch.float32 and ref.grad.dtype == torch.float64


def test_autocast_bfloat16_model_output():
    torch.manual_seed(0)
    x, labels = batch(requires_grad=False)
    model = torch.nn.Linear(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = tt.TripletLoss(normalize=True)(out, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert model.weight.grad.dtype == torch.float32 and torch.isfinite(model.weight.grad).all()


# --------------------------------------------------------------------------- labels


def test_labels_as_tensor_numpy_array_or_strings():
    x, labels = batch(dtype=torch.float64)
    names = np.array(["cat", "dog", "eel", "fox"])[labels.numpy()]
    values = [tt.triplet_loss(x, lab, mining="batch_all").item()
              for lab in (labels, labels.numpy(), labels.int(), names, labels.tolist())]
    assert len(set(values)) == 1 and values[0] > 0


def test_labels_of_the_wrong_length_are_refused():
    x, labels = batch()
    with pytest.raises(ValueError, match="labels has length"):
        tt.triplet_loss(x, labels[:-1])


# --------------------------------------------------------------------------- modules


def test_module_keeps_its_options_as_attributes():
    criterion = tt.TripletLoss(mining="semi_hard", margin=0.3, soft=True, metric="cosine",
                               normalize=True, reduction="sum", seed=7)
    assert (criterion.mining, criterion.margin, criterion.soft, criterion.metric,
            criterion.normalize, criterion.reduction, criterion.seed) == (
        "semi_hard", 0.3, True, "cosine", True, "sum", 7)
    assert "semi_hard" in repr(criterion)
    contrastive = tt.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8, power=2,
                                     metric="sqeuclidean", normalize=True, reduction="mean")
    assert (contrastive.pos_margin, contrastive.neg_margin, contrastive.power,
            contrastive.metric, contrastive.normalize, contrastive.reduction) == (
        0.1, 0.8, 2, "sqeuclidean", True, "mean")
    # Changing an attribute changes the next call.
    x, labels = batch(dtype=torch.float64)
    before = criterion(x, labels).item()
    criterion.margin = 0.9
    assert criterion(x, labels).item() > before


def test_module_reports_the_last_calls_counts():
    x, labels = batch(dtype=torch.float64)
    criterion = tt.TripletLoss(mining="batch_all")
    criterion(x, labels)
    expected = tripmine.triplet_loss(x.detach().numpy(), labels.numpy(), mining="batch_all")
    assert criterion.n_triplets == expected.n_triplets == 16 * 3 * 12
    assert criterion.n_active == expected.n_active
    assert criterion.fraction_active == expected.fraction_active
    contrastive = tt.ContrastiveLoss()
    contrastive(x, labels)
    result = tripmine.contrastive_loss(x.detach().numpy(), labels.numpy())
    assert (contrastive.n_pairs, contrastive.n_positive_pairs, contrastive.n_negative_pairs,
            contrastive.n_active, contrastive.fraction_active) == (
        result.n_pairs, result.n_positive_pairs, result.n_negative_pairs, result.n_active,
        result.fraction_active)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mining="hardest"), ValueError, "mining must be"),
    (dict(margin=-1.0), ValueError, "margin must be"),
    (dict(metric="manhattan"), ValueError, "metric must be"),
    (dict(reduction="max"), ValueError, "reduction must be"),
    (dict(soft=1), TypeError, "soft must be"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(seed=1.5), TypeError, "seed must be"),
    (dict(select="nearest"), ValueError, "select must be"),
    (dict(cutoff=0.0), ValueError, "cutoff must be"),
])
def test_module_refuses_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        tt.TripletLoss(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(power=3), "power must be"), (dict(neg_margin=-1.0), "neg_margin must be"),
    (dict(reduction="auto"), "reduction must be"),
])
def test_contrastive_module_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tt.ContrastiveLoss(**kwargs)


def test_bad_inputs_are_refused_with_clear_errors():
    x, labels = batch()
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        tt.triplet_loss(x.detach().numpy(), labels)
    with pytest.raises(TypeError, match="floating-point"):
        tt.triplet_loss(torch.ones(4, 2, dtype=torch.int64), labels[:4])
    with pytest.raises(ValueError, match="contains NaN"):
        tt.triplet_loss(torch.full((4, 2), float("nan")), labels[:4])
    with pytest.raises(ValueError, match="ref_labels is required"):
        tt.triplet_loss(x, labels, ref=x.detach())
    with pytest.raises(ValueError, match="memory or ref"):
        tt.triplet_loss(x, labels, ref=x.detach(), ref_labels=labels,
                        memory=tt.MemoryBank(8, 6))
    with pytest.raises(ValueError, match="triplets must be"):
        tt.TripletLoss()(x, labels, triplets=(np.arange(2),))


def test_empty_and_degenerate_batches_give_zero_loss_and_gradient():
    x, _ = batch()
    one_class = torch.zeros(x.shape[0], dtype=torch.int64)
    for loss in (tt.triplet_loss(x, one_class), tt.triplet_loss(x, one_class,
                                                                 mining="batch_all"),
                 tt.contrastive_loss(x[:1], one_class[:1])):
        loss.backward()
        assert loss.item() == 0.0
    assert torch.all(x.grad == 0)
    empty = torch.zeros(0, 6, requires_grad=True)
    loss = tt.triplet_loss(empty, np.zeros(0, dtype=np.int64))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 6)
    vector = tt.triplet_loss(x, one_class, reduction="none")
    assert vector.shape == (0,)
    vector.sum().backward()


# --------------------------------------------------------------------------- seeds


def test_module_seed_advances_per_call_and_runs_repeat():
    x, labels = batch(dtype=torch.float64)

    def run(criterion, calls=3):
        losses = [criterion(x, labels).item() for _ in range(calls)]
        return losses, criterion.last_seed

    first = tt.TripletLoss(mining="distance_weighted", normalize=True, seed=11)
    second = tt.TripletLoss(mining="distance_weighted", normalize=True, seed=11)
    losses_a, seed_a = run(first)
    losses_b, seed_b = run(second)
    assert losses_a == losses_b and seed_a == seed_b
    assert len(set(losses_a)) == 3  # each call draws other triplets
    assert seed_a == (11 + 2 * tt.losses.SEED_STEP) % 2**64
    # Call 0 uses the seed itself: the NumPy call with that seed.
    expected = tripmine.triplet_loss(x.detach().numpy(), labels.numpy(),
                                     mining="distance_weighted", normalize=True, seed=11)
    assert losses_a[0] == expected.loss
    # advance_seed=False repeats the same draw.
    fixed = tt.TripletLoss(mining="distance_weighted", normalize=True, seed=11,
                           advance_seed=False)
    assert run(fixed) == ([expected.loss] * 3, 11)


def test_call_counter_is_saved_with_the_state_dict():
    x, labels = batch(dtype=torch.float64)
    trained = tt.TripletLoss(mining="semi_hard", select="random", seed=3)
    for _ in range(4):
        trained(x, labels)
    resumed = tt.TripletLoss(mining="semi_hard", select="random", seed=3)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.calls == 4
    assert resumed(x, labels).item() == trained(x, labels).item()
    assert resumed.last_seed == trained.last_seed


def test_seed_none_draws_fresh_entropy_each_call():
    x, labels = batch(dtype=torch.float64)
    criterion = tt.TripletLoss(mining="distance_weighted", normalize=True)
    seeds = set()
    for _ in range(3):
        criterion(x, labels)
        seeds.add(criterion.last_seed)
    assert len(seeds) == 3 and None not in seeds
    replay = tripmine.triplet_loss(x.detach().numpy(), labels.numpy(),
                                   mining="distance_weighted", normalize=True,
                                   seed=criterion.last_seed)
    for ours, theirs in zip(criterion.triplets, replay.triplets):
        np.testing.assert_array_equal(ours, theirs)


# --------------------------------------------------------------------------- torch.compile


def test_compiled_model_graph_breaks_around_the_loss():
    """torch.compile: the loss runs eagerly (one graph break), losses and gradients
    equal the eager run's, and the module's counters are updated."""
    torch.manual_seed(0)
    x, labels = batch(requires_grad=False)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    criterion = tt.TripletLoss(normalize=True, mining="batch_all")

    def step(inputs, targets):
        return 2.0 * criterion(model(inputs), targets)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    loss = compiled(x, labels)
    loss.backward()
    compiled_grad = model[0].weight.grad.clone()
    assert criterion.calls == 1 and criterion.n_triplets > 0
    model.zero_grad()
    eager = step(x, labels)
    eager.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    torch.testing.assert_close(compiled_grad, model[0].weight.grad, rtol=1e-5, atol=1e-7)
    explanation = torch._dynamo.explain(step)(x, labels)
    assert explanation.graph_break_count == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------- CUDA


def test_cuda_tensors_without_cupy_raise_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # "import cupy" fails
    with pytest.raises(RuntimeError, match="CuPy"):
        _bridge.Backend(torch.device("cuda", 0))


def test_other_devices_are_refused():
    with pytest.raises(TypeError, match="CPU or CUDA"):
        tt.triplet_loss(torch.zeros(4, 2, device="meta"), np.zeros(4, dtype=np.int64))


def cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cupy = pytest.importorskip("cupy", reason="the GPU path needs CuPy")
    try:  # a tripmine without its CuPy path refuses GPU arrays with a TypeError
        tripmine.triplet_loss(cupy.zeros((2, 2), dtype=cupy.float32), cupy.arange(2))
    except TypeError as exc:
        pytest.skip(f"tripmine's GPU path is not available: {exc}")


@pytest.mark.parametrize("mining", MINING)
def test_cuda_loss_and_gradient_equal_the_cpu_ones(mining):
    cuda_ready()
    x, labels = batch(dtype=torch.float64)
    gpu = x.detach().cuda().requires_grad_(True)
    loss = tt.triplet_loss(gpu, labels.cuda(), mining=mining, normalize=True, seed=1)
    loss.backward()
    assert loss.device.type == "cuda" and gpu.grad.device.type == "cuda"
    expected = tt.triplet_loss(x, labels, mining=mining, normalize=True, seed=1)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    torch.testing.assert_close(gpu.grad.cpu(), x.grad, rtol=1e-8, atol=1e-12)


def test_cuda_half_precision_and_memory_bank():
    cuda_ready()
    x, labels = batch()
    gpu = x.detach().cuda().half().requires_grad_(True)
    bank = tt.MemoryBank(64, 6)
    criterion = tt.ContrastiveLoss(memory=bank)
    for _ in range(2):
        loss = criterion(gpu, labels.cuda())
        loss.backward()
    assert gpu.grad.dtype == torch.float16 and torch.isfinite(gpu.grad).all()
    assert bank.embeddings.device.type == "cuda" and len(bank) == 32
