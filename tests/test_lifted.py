"""The lifted structured loss (tripmine.lifted), Song's form and the generalized form,
against the loop reference and float64 finite differences (x and ref), in self mode,
reference mode and with ref_offset, and the corners: degenerate batches, extreme
distances, thread counts, bad input, and pytorch-metric-learning's values."""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine

METRICS = ["euclidean", "sqeuclidean", "cosine"]
FORMS = [False, True]
MODES = ["self", "ref", "offset"]


def _problem(rng, mode, n=14, m=11, d=5, classes=4, dtype=np.float64, scale=0.6):
    x = (rng.standard_normal((n, d)) * scale).astype(dtype)
    labels = rng.integers(0, classes, n)
    if mode == "self":
        return x, labels, {}
    ref = (rng.standard_normal((m, d)) * scale).astype(dtype)
    ref_labels = rng.integers(0, classes, m)
    if mode == "ref":
        return x, labels, {"ref": ref, "ref_labels": ref_labels}
    offset = 3
    ref = np.concatenate([ref[:offset], x, ref[offset:]])
    ref_labels = np.concatenate([ref_labels[:offset], labels, ref_labels[offset:]])
    return x, labels, {"ref": ref, "ref_labels": ref_labels, "ref_offset": offset}


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
def test_matches_the_loop_reference(generalized, metric, mode, reduction):
    rng = np.random.default_rng(hash((generalized, metric, mode, reduction)) % 2**32)
    x, labels, kw = _problem(rng, mode)
    options = dict(generalized=generalized, metric=metric, reduction=reduction,
                   neg_margin=0.7, pos_margin=0.1)
    got = tripmine.lifted_structured_loss(x, labels, **options, **kw)
    want = reference.lifted_structured_loss(x, labels, **options, **kw)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-11, atol=1e-13)
    assert (got.n_terms, got.n_active) == (want.n_terms, want.n_active)
    assert got.fraction_active == (want.n_active / want.n_terms if want.n_terms else 0.0)
    f32 = tripmine.lifted_structured_loss(x.astype(np.float32), labels, **options,
                                          **{k: v.astype(np.float32) if k == "ref" else v
                                             for k, v in kw.items()})
    np.testing.assert_allclose(f32.loss, want.loss, rtol=2e-5, atol=1e-6)
    assert f32.grad.dtype == np.float32


def _directional(f, arr, direction, eps=1e-6):
    return (f(arr + eps * direction) - f(arr - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradients_match_finite_differences(generalized, metric, mode, normalize):
    rng = np.random.default_rng(hash((generalized, metric, mode, normalize)) % 2**32)
    x, labels, kw = _problem(rng, mode)
    options = dict(generalized=generalized, metric=metric, normalize=normalize,
                   neg_margin=1.0, pos_margin=0.05)
    got = tripmine.lifted_structured_loss(x, labels, **options, **kw)
    assert got.n_active > 0

    def loss_of_x(xx):
        extra = dict(kw)
        if mode == "offset":  # x is a slice of ref: both move together
            extra["ref"] = kw["ref"].copy()
            extra["ref"][3:3 + len(xx)] = xx
        return tripmine.lifted_structured_loss(xx, labels, grad=False, **options,
                                               **extra).loss

    for _ in range(3):
        v = rng.standard_normal(x.shape)
        analytic = np.sum(got.grad * v)
        if mode == "offset":
            analytic += np.sum(got.ref_grad[3:3 + len(x)] * v)
        np.testing.assert_allclose(analytic, _directional(loss_of_x, x, v), rtol=2e-6,
                                   atol=1e-8)
    if mode == "ref":
        def loss_of_ref(rr):
            return tripmine.lifted_structured_loss(x, labels, grad=False, **options,
                                                   **{**kw, "ref": rr}).loss
        v = rng.standard_normal(kw["ref"].shape)
        np.testing.assert_allclose(np.sum(got.ref_grad * v),
                                   _directional(loss_of_ref, kw["ref"], v), rtol=2e-6,
                                   atol=1e-8)


@pytest.mark.parametrize("generalized", FORMS)
def test_reductions_are_one_sum_scaled(generalized):
    rng = np.random.default_rng(5)
    x, labels, _ = _problem(rng, "self", n=20)
    results = {r: tripmine.lifted_structured_loss(x, labels, generalized=generalized,
                                                  reduction=r)
               for r in ("mean", "sum", "mean_nonzero", "none")}
    total = results["sum"].loss
    assert results["none"].loss.shape == (20,)
    np.testing.assert_allclose(results["none"].loss.sum(), total, rtol=1e-13)
    np.testing.assert_allclose(results["mean"].loss * results["mean"].n_terms, total,
                               rtol=1e-13)
    np.testing.assert_allclose(results["mean_nonzero"].loss * results["mean"].n_active, total,
                               rtol=1e-13)
    np.testing.assert_allclose(results["none"].grad, results["sum"].grad, rtol=1e-12)
    np.testing.assert_allclose(results["mean"].grad * results["mean"].n_terms,
                               results["sum"].grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("generalized", FORMS)
def test_ref_offset_zero_over_the_batch_is_self_mode(generalized):
    # x = ref[0:n] with ref_offset=0: every pair and every negative sum is self mode's.
    rng = np.random.default_rng(6)
    x, labels, _ = _problem(rng, "self", n=18)
    own = tripmine.lifted_structured_loss(x, labels, generalized=generalized, reduction="sum")
    sliced = tripmine.lifted_structured_loss(x, labels, generalized=generalized, ref=x,
                                             ref_labels=labels, ref_offset=0, reduction="sum")
    np.testing.assert_allclose(sliced.loss, own.loss, rtol=1e-12)
    assert (sliced.n_terms, sliced.n_active) == (own.n_terms, own.n_active)
    np.testing.assert_allclose(sliced.grad + sliced.ref_grad, own.grad, rtol=1e-9, atol=1e-13)


def test_generalized_slices_add_up_to_self_mode():
    rng = np.random.default_rng(7)
    x, labels, _ = _problem(rng, "self", n=21)
    whole = tripmine.lifted_structured_loss(x, labels, generalized=True, reduction="sum")
    loss, terms, active = 0.0, 0, 0
    grad = np.zeros_like(x)
    for lo, hi in ((0, 8), (8, 9), (9, 21)):
        part = tripmine.lifted_structured_loss(x[lo:hi], labels[lo:hi], generalized=True,
                                               reduction="sum", ref=x, ref_labels=labels,
                                               ref_offset=lo)
        loss += part.loss
        terms += part.n_terms
        active += part.n_active
        grad[lo:hi] += part.grad
        grad += part.ref_grad
    np.testing.assert_allclose(loss, whole.loss, rtol=1e-12)
    assert (terms, active) == (whole.n_terms, whole.n_active)
    np.testing.assert_allclose(grad, whole.grad, rtol=1e-9, atol=1e-13)


def test_song_slices_see_only_their_own_rows_negatives():
    # Song's term for (i, j) needs j's negatives over the whole batch; a slice's column j
    # holds only the slice's rows, so its sum differs from self mode (README, Semantics).
    rng = np.random.default_rng(8)
    x, labels, _ = _problem(rng, "self", n=16)
    lo, hi = 0, 8
    part = tripmine.lifted_structured_loss(x[lo:hi], labels[lo:hi], reduction="sum", ref=x,
                                           ref_labels=labels, ref_offset=lo)
    want = reference.lifted_structured_loss(x[lo:hi], labels[lo:hi], reduction="sum", ref=x,
                                            ref_labels=labels, ref_offset=lo)
    np.testing.assert_allclose(part.loss, want.loss, rtol=1e-12)
    own_rows = reference.lifted_structured_loss(x, labels, reduction="none").loss[lo:hi].sum()
    assert abs(part.loss - own_rows) > 1e-6


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("case", ["one_class", "singletons", "empty", "one_row", "grad_off"])
def test_degenerate_batches_give_zero_and_no_nan(generalized, case):
    x = np.random.default_rng(9).standard_normal((6, 3))
    labels = np.arange(6) if case == "singletons" else np.zeros(6, int)
    if case == "empty":
        x, labels = x[:0], labels[:0]
    elif case == "one_row":
        x, labels = x[:1], labels[:1]
    got = tripmine.lifted_structured_loss(x, labels, generalized=generalized,
                                          grad=case != "grad_off")
    assert got.loss == 0.0 and got.n_active == 0
    if case == "grad_off":
        assert got.grad is None
    else:
        assert got.grad.shape == x.shape and not np.any(got.grad)
    # Song's form counts the positive pairs even when none has a negative to contrast.
    if case == "one_class" and not generalized:
        assert got.n_terms == 30


def test_identical_rows_give_a_finite_gradient():
    x = np.ones((6, 4))
    x[3:] = -1.0
    labels = np.array([0, 0, 0, 1, 1, 1])
    for metric in METRICS:
        for generalized in FORMS:
            got = tripmine.lifted_structured_loss(x, labels, metric=metric,
                                                  generalized=generalized)
            assert np.isfinite(got.loss) and np.all(np.isfinite(got.grad))


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_far_negatives_do_not_underflow_the_sums(generalized, dtype):
    # Negatives at distance ~1000: e^(1 - d) underflows even in double, but the sums are
    # kept as shifted logarithms, so the loss is the (finite, exact) hinge and the gradient
    # stays finite and matches the reference.
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((12, 4)) * 0.1).astype(dtype)
    labels = np.repeat([0, 1, 2], 4)
    x[labels == 1] += dtype(700.0)
    x[labels == 2] -= dtype(700.0)
    got = tripmine.lifted_structured_loss(x, labels, generalized=generalized)
    want = reference.lifted_structured_loss(x, labels, generalized=generalized)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-4 if dtype == np.float32 else 1e-9)
    assert np.all(np.isfinite(got.grad))


def test_thread_counts():
    rng = np.random.default_rng(11)
    x, labels, kw = _problem(rng, "ref", n=300, m=200, d=16, classes=40)
    before = tripmine.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2, 3):
            tripmine.set_num_threads(threads)
            runs[threads] = [tripmine.lifted_structured_loss(x, labels, generalized=g, **mode)
                             for g in FORMS for mode in ({}, kw)]
    finally:
        tripmine.set_num_threads(before)
    for threads in (2, 3):
        for one, other in zip(runs[1], runs[threads]):
            np.testing.assert_allclose(other.loss, one.loss, rtol=1e-13)
            assert (other.n_terms, other.n_active) == (one.n_terms, one.n_active)
            np.testing.assert_allclose(other.grad, one.grad, rtol=1e-10, atol=1e-15)
        # Self mode has no per-thread sums (both forms): the same bits on any thread count.
        for k in (0, 2):
            assert runs[threads][k].loss == runs[1][k].loss
            np.testing.assert_array_equal(runs[threads][k].grad, runs[1][k].grad)


@pytest.mark.parametrize("bad, match", [
    ({"neg_margin": -0.1}, "neg_margin"),
    ({"pos_margin": -1e-300}, "pos_margin"),
    ({"neg_margin": np.inf}, "neg_margin"),
    ({"pos_margin": np.nan}, "pos_margin"),
    ({"reduction": "auto"}, "reduction"),
    ({"metric": "manhattan"}, "metric"),
])
def test_bad_options_raise_naming_the_argument(bad, match):
    rng = np.random.default_rng(12)
    x, labels, _ = _problem(rng, "self")
    before = x.copy()
    with pytest.raises(ValueError, match=match):
        tripmine.lifted_structured_loss(x, labels, **bad)
    np.testing.assert_array_equal(x, before)


def test_bad_flags_and_shapes():
    rng = np.random.default_rng(13)
    x, labels, kw = _problem(rng, "ref")
    with pytest.raises(TypeError, match="generalized"):
        tripmine.lifted_structured_loss(x, labels, generalized="yes")
    with pytest.raises(ValueError, match="labels"):
        tripmine.lifted_structured_loss(x, labels[:-1])
    with pytest.raises(ValueError, match="ref_offset"):
        tripmine.lifted_structured_loss(x, labels, ref_offset=0, **kw)


def test_pytorch_metric_learning_agrees_where_the_definitions_meet():
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning.distances import LpDistance
    rng = np.random.default_rng(14)
    x = rng.standard_normal((32, 8)).astype(np.float64)
    labels = np.repeat(np.arange(8), 4)  # every row has positives and negatives
    plain = LpDistance(normalize_embeddings=False)  # PML normalises by default
    for generalized, peer in ((False, losses.LiftedStructureLoss(distance=plain)),
                              (True, losses.GeneralizedLiftedStructureLoss(distance=plain))):
        xt = torch.tensor(x, requires_grad=True)
        value = peer(xt, torch.tensor(labels))
        value.backward()
        got = tripmine.lifted_structured_loss(x, labels, generalized=generalized)
        np.testing.assert_allclose(got.loss, value.item(), rtol=1e-9)
        np.testing.assert_allclose(got.grad, xt.grad.numpy(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_every_instruction_set_agrees_with_the_reference(dtype, metric):
    # The row kernels (lifted_weights, pair_beta, the softmax rows) are compiled per
    # instruction set; each usable one must give the reference's loss and gradient.
    from tripmine import _core
    rng = np.random.default_rng(15)
    x, labels, kw = _problem(rng, "ref", n=70, m=45, d=19, classes=9, dtype=dtype)
    previous = _core.get_isa()
    try:
        for isa in _core.usable_isas():
            _core.set_isa(isa)
            for generalized in FORMS:
                got = tripmine.lifted_structured_loss(x, labels, generalized=generalized,
                                                      metric=metric, **kw)
                want = reference.lifted_structured_loss(x, labels, generalized=generalized,
                                                        metric=metric, **kw)
                rtol = 2e-5 if dtype == np.float32 else 1e-11
                np.testing.assert_allclose(got.loss, want.loss, rtol=rtol, err_msg=isa)
                _core.set_isa("generic")
                base = tripmine.lifted_structured_loss(x, labels, generalized=generalized,
                                                       metric=metric, **kw)
                _core.set_isa(isa)
                scale = np.abs(base.grad).max()
                np.testing.assert_allclose(got.grad, base.grad, rtol=rtol,
                                           atol=rtol * scale, err_msg=isa)
                np.testing.assert_allclose(got.ref_grad, base.ref_grad, rtol=rtol,
                                           atol=rtol * np.abs(base.ref_grad).max(), err_msg=isa)
    finally:
        _core.set_isa(previous)
