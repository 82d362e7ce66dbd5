"""tripmine.torch.LiftedStructuredLoss against the pure-torch autograd reference
(tests/torch_reference.py ``lifted_reference``: the whole distance matrix, masked
log-sum-exps, autograd).

Loss, dL/dx and dL/dref must match for both forms, every metric, ``normalize``, every
reduction, self mode, a reference set and ``ref_offset``, in float64 and float32.  The
batches are clustered (five classes around random centers) and the margins scaled to the
typical distance, so that with the unbounded metrics some terms are zero and some are not
(``mean_nonzero`` differs from ``mean``); the data are continuous, so no term sits at its
kink.  Everything is skipped without torch, the CUDA tests without a GPU or CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import tripmine

torch = pytest.importorskip("torch")
tt = pytest.importorskip("tripmine.torch")

from torch_reference import METRICS, distance_matrix, lifted_reference, unit  # noqa: E402

REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
MODES = ("self", "ref", "ref_offset")

#: (rtol, atol) of the loss and of the gradients, per dtype of the module's input; the
#: reference always runs in float64.  float64: those of test_torch_reference.py; float32:
#: about ten times the worst measured here (8e-7 on the loss, 7e-6 on a gradient entry).
TOLERANCES = {
    torch.float64: ((1e-9, 1e-11), (1e-8, 1e-10)),
    torch.float32: ((1e-5, 1e-6), (1e-4, 1e-5)),
}


def clustered(rng, centers, labels, noise=0.3):
    return centers[labels] + noise * rng.standard_normal((labels.shape[0], centers.shape[1]))


def problem(seed, mode, dim=5):
    """(x, labels, ref, ref_labels, ref_offset, leaves) as float64 tensors, the leaves
    requiring grad.  ``ref``: 12 rows of five classes, one absent from the batch.
    ``ref_offset``: a bank of those rows followed by the batch itself (a view of x)."""
    rng = np.random.default_rng(seed)
    centers = 2 * rng.standard_normal((5, dim))
    labels = rng.permutation(np.repeat(np.arange(4), 4))
    x = torch.tensor(clustered(rng, centers, labels), requires_grad=True)
    labels = torch.from_numpy(labels)
    if mode == "self":
        return x, labels, None, None, None, [x]
    ref_labels = torch.from_numpy(rng.integers(0, 5, 12))
    bank = torch.tensor(clustered(rng, centers, ref_labels.numpy()), requires_grad=True)
    if mode == "ref":
        return x, labels, bank, ref_labels, None, [x, bank]
    return (x, labels, torch.cat([bank, x]), torch.cat([ref_labels, labels]), 12, [x, bank])


def margins(x, metric, normalize):
    """(neg_margin, pos_margin) proportional to the batch's median distance."""
    rows = unit(x.detach()) if normalize else x.detach()
    d = distance_matrix(rows, rows, metric)
    median = float(d[d > 0].median())
    return 0.4 * median, 0.05 * median


def gradients(loss, leaves, scale=None):
    for leaf in leaves:
        leaf.grad = None
    (loss.sum() if scale is None else (scale * loss).sum()).backward()
    return [leaf.grad.clone() for leaf in leaves]


def run_both(mode, options, dtype=torch.float64, seed=0):
    """The module's loss and gradients (input cast to ``dtype``) and the reference's."""
    x, labels, ref, ref_labels, offset, leaves = problem(seed, mode)
    neg_margin, pos_margin = margins(x, options["metric"], options["normalize"])
    options = dict(options, neg_margin=neg_margin, pos_margin=pos_margin)
    expected = lifted_reference(x, labels, ref=ref, ref_labels=ref_labels, offset=offset,
                                **options)
    expected_grads = gradients(expected, leaves)
    # The module sees leaves of its own dtype, combined the same way.
    cast = [leaf.detach().to(dtype).requires_grad_(True) for leaf in leaves]
    x_in = cast[0]
    ref_in = None if mode == "self" else (cast[1] if mode == "ref" else
                                          torch.cat([cast[1], cast[0]]))
    module = tt.LiftedStructuredLoss(**options)
    loss = module(x_in, labels, ref_in, ref_labels, offset)
    grads = gradients(loss, cast)
    return module, (loss, grads), (expected.detach(), expected_grads)


def assert_close(ours, expected, dtype):
    (loss, grads), (ref_loss, ref_grads) = ours, expected
    (loss_rtol, loss_atol), (grad_rtol, grad_atol) = TOLERANCES[dtype]
    assert loss.shape == ref_loss.shape and loss.dtype == dtype
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=loss_rtol, atol=loss_atol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=grad_atol)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("generalized", [False, True])
def test_the_torch_reference_equals_the_loop_reference(generalized, mode):
    """The oracle itself, against tests/reference.py's loops (every metric and reduction)."""
    import reference

    x, labels, ref, ref_labels, offset, _ = problem(1, mode)
    arrays = {} if ref is None else dict(ref=ref.detach().numpy(), ref_labels=ref_labels.numpy(),
                                         ref_offset=offset)
    for metric in METRICS:
        for reduction in REDUCTIONS:
            options = dict(generalized=generalized, metric=metric, reduction=reduction,
                           neg_margin=0.7, pos_margin=0.1, normalize=metric == "euclidean")
            expected = reference.lifted_structured_loss(x.detach().numpy(), labels.numpy(),
                                                        **options, **arrays).loss
            ours = lifted_reference(x.detach(), labels, ref=ref, ref_labels=ref_labels,
                                    offset=offset, **options)
            np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("generalized", [False, True], ids=["song", "generalized"])
def test_matches_pure_torch_autograd(generalized, metric, normalize, reduction, mode, dtype):
    options = dict(generalized=generalized, metric=metric, normalize=normalize,
                   reduction=reduction)
    module, ours, expected = run_both(mode, options, dtype)
    assert_close(ours, expected, dtype)
    assert module.n_terms > 0 and 0 < module.n_active <= module.n_terms
    assert module.fraction_active == pytest.approx(module.n_active / module.n_terms)


@pytest.mark.parametrize("generalized", [False, True])
def test_some_terms_are_inactive(generalized):
    """The margins of these tests leave part of the terms at zero (euclidean, raw rows):
    mean_nonzero is then tested against a different number than mean."""
    options = dict(generalized=generalized, metric="euclidean", normalize=False,
                   reduction="mean")
    module, _, _ = run_both("self", options)
    assert 0 < module.n_active < module.n_terms


@pytest.mark.parametrize("generalized", [False, True])
def test_counts_are_tripmines(generalized):
    x, labels, ref, ref_labels, offset, _ = problem(2, "ref_offset")
    module = tt.LiftedStructuredLoss(generalized=generalized, neg_margin=0.5)
    module(x, labels, ref, ref_labels, ref_offset=offset)
    result = tripmine.lifted_structured_loss(
        x.detach().numpy(), labels.numpy(), ref=ref.detach().numpy(),
        ref_labels=ref_labels.numpy(), ref_offset=offset, generalized=generalized,
        neg_margin=0.5, grad=False)
    assert (module.n_terms, module.n_active) == (result.n_terms, result.n_active)
    assert module.fraction_active == result.fraction_active


@pytest.mark.parametrize("generalized", [False, True])
def test_ref_equal_to_the_batch_with_offset_zero_is_self_mode(generalized):
    x, labels, *_ = problem(3, "self")
    module = tt.LiftedStructuredLoss(generalized=generalized)
    own = module(x, labels)
    (own_grad,) = gradients(own, [x])
    both = module(x, labels, x, labels, ref_offset=0)  # x's gradient through both inputs
    (both_grad,) = gradients(both, [x])
    torch.testing.assert_close(both, own, rtol=1e-12, atol=0)
    torch.testing.assert_close(both_grad, own_grad, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- grad_output


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
@pytest.mark.parametrize("generalized", [False, True])
def test_grad_output_scales_the_gradient(generalized, reduction):
    x, labels, ref, ref_labels, _, leaves = problem(4, "ref")
    module = tt.LiftedStructuredLoss(generalized=generalized, reduction=reduction)
    plain = gradients(module(x, labels, ref, ref_labels), leaves)
    loss = module(x, labels, ref, ref_labels)
    for leaf in leaves:
        leaf.grad = None
    (2 * loss).backward()
    for leaf, grad in zip(leaves, plain):
        torch.testing.assert_close(leaf.grad, 2 * grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("generalized", [False, True])
def test_reduction_none_backpropagates_uniform_weights(generalized):
    x, labels, *_ = problem(5, "self")
    module = tt.LiftedStructuredLoss(generalized=generalized, reduction="none")
    (summed,) = gradients(module(x, labels), [x])
    rows = module(x, labels)
    assert rows.shape == (16,)
    (mean,) = gradients(rows.mean(), [x])
    torch.testing.assert_close(mean, summed / 16, rtol=1e-14, atol=0)
    with pytest.raises(NotImplementedError, match="uniform"):
        module(x, labels).backward(torch.arange(16, dtype=torch.float64))


# --------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("labels", [np.zeros(8, np.int64), np.arange(8)],
                         ids=["one_class", "singletons"])
@pytest.mark.parametrize("generalized", [False, True])
def test_degenerate_batches_give_zero(generalized, labels, metric, reduction):
    """One class (no negatives: every log-sum-exp is empty) or all singletons (no
    positives): loss 0, a zero gradient, no NaN, in the module and in the reference."""
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    options = dict(generalized=generalized, metric=metric, reduction=reduction)
    module = tt.LiftedStructuredLoss(**options)
    (grad,) = gradients(module(x, labels), [x])
    loss = module(x, labels)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    assert module.n_active == 0 and module.fraction_active == 0.0
    expected = lifted_reference(x, torch.from_numpy(labels), **options)
    (expected_grad,) = gradients(expected, [x])
    assert torch.all(expected == 0) and torch.all(expected_grad == 0)


@pytest.mark.parametrize("generalized", [False, True])
def test_identical_embeddings_give_a_finite_gradient(generalized):
    """Every distance 0: euclidean's subgradient at 0 is 0, so no NaN."""
    x = torch.ones(8, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(8) // 4
    module = tt.LiftedStructuredLoss(generalized=generalized)
    loss = module(x, labels)
    (grad,) = gradients(loss, [x])
    expected = lifted_reference(x, labels, generalized=generalized)
    (expected_grad,) = gradients(expected, [x])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- options, dtypes


@pytest.mark.parametrize("options, error, name", [
    (dict(neg_margin=-1.0), ValueError, "neg_margin"),
    (dict(pos_margin=-0.5), ValueError, "pos_margin"),
    (dict(neg_margin=float("inf")), ValueError, "neg_margin"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(metric="manhattan"), ValueError, "metric"),
    (dict(generalized=1), TypeError, "generalized"),
    (dict(normalize="yes"), TypeError, "normalize"),
])
def test_bad_options_are_refused_at_construction(options, error, name):
    with pytest.raises(error, match=name):
        tt.LiftedStructuredLoss(**options)


def test_options_are_attributes_and_defaults_are_song_and_pml():
    module = tt.LiftedStructuredLoss()
    assert (module.neg_margin, module.pos_margin, module.generalized) == (1.0, 0.0, False)
    assert (module.metric, module.normalize, module.reduction) == ("euclidean", False, "mean")
    assert "neg_margin=1.0" in repr(module) and "LiftedStructuredLoss" in tt.__all__


def test_bad_inputs_are_refused():
    module = tt.LiftedStructuredLoss()
    with pytest.raises(TypeError, match="x"):
        module(np.zeros((4, 2)), np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.zeros(4, 2, dtype=torch.int64), np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="ref"):
        module(torch.zeros(4, 2), np.zeros(4, np.int64), np.zeros((3, 2)), np.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    x, labels, *_ = problem(6, "self")
    half = x.detach().to(dtype).requires_grad_(True)
    module = tt.LiftedStructuredLoss()
    loss = module(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    single = half.detach().float().requires_grad_(True)
    expected = module(single, labels)
    expected.backward()
    assert loss.item() == expected.item()
    torch.testing.assert_close(half.grad, single.grad.to(dtype), rtol=0, atol=0)


def test_labels_as_arrays_and_no_grad():
    x, labels, *_ = problem(7, "self")
    module = tt.LiftedStructuredLoss(generalized=True)
    as_tensor = module(x, labels)
    assert module(x, labels.numpy()).item() == as_tensor.item()
    with torch.no_grad():
        loss = module(x, labels)
    assert loss.grad_fn is None and loss.item() == as_tensor.item()


# --------------------------------------------------------------------------- CUDA


def cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cupy = pytest.importorskip("cupy", reason="the GPU path needs CuPy")
    try:
        tripmine.lifted_structured_loss(cupy.zeros((2, 2), dtype=cupy.float32), cupy.arange(2))
    except (TypeError, ImportError, AttributeError) as exc:
        pytest.skip(f"tripmine's GPU path has no lifted structured loss: {exc!r}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("generalized", [False, True])
def test_cuda_loss_and_gradients_equal_the_cpu_ones(generalized, mode):
    cuda_ready()
    x, labels, ref, ref_labels, offset, leaves = problem(8, mode)
    module = tt.LiftedStructuredLoss(generalized=generalized, normalize=True)
    cpu_loss = module(x, labels, ref, ref_labels, offset)
    cpu_grads = gradients(cpu_loss, leaves)
    gpu_leaves = [leaf.detach().cuda().requires_grad_(True) for leaf in leaves]
    gpu_ref = None if mode == "self" else (gpu_leaves[1] if mode == "ref" else
                                           torch.cat([gpu_leaves[1], gpu_leaves[0]]))
    loss = module(gpu_leaves[0], labels.cuda(), gpu_ref,
                  None if ref_labels is None else ref_labels.cuda(), offset)
    grads = gradients(loss, gpu_leaves)
    assert loss.device.type == "cuda" and all(g.device.type == "cuda" for g in grads)
    assert loss.item() == pytest.approx(cpu_loss.item(), rel=1e-9)
    for grad, cpu_grad in zip(grads, cpu_grads):
        torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-8, atol=1e-12)


def test_cuda_half_precision():
    cuda_ready()
    x, labels, *_ = problem(9, "self")
    gpu = x.detach().cuda().half().requires_grad_(True)
    loss = tt.LiftedStructuredLoss(generalized=True)(gpu, labels.cuda())
    loss.backward()
    assert loss.dtype == torch.float32 and gpu.grad.dtype == torch.float16
    assert torch.isfinite(gpu.grad).all()
