"""The margin loss with a learnable beta (tripmine.margin) against a loop reference and
float64 finite differences (x, ref and beta), every mining rule it takes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine
from tripmine import Triplets

METRICS = ["euclidean", "sqeuclidean", "cosine"]


def _batch(rng, n=24, d=6, k=4, dtype=np.float64, unit=True):
    x = rng.standard_normal((n, d))
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype), np.repeat(np.arange(n // k), k)


def _expected(x, labels, result, beta, margin, nu, metric, reduction, ref=None):
    per_class = np.ndim(beta) == 1
    per, active = reference.margin_losses(
        x.astype(np.float64), result.triplets,
        (lambda a: beta[labels[a]]) if per_class else (lambda a: beta),
        margin=margin, nu=nu, metric=metric, ref=None if ref is None else ref.astype(np.float64))
    if reduction == "none":
        return per, active
    if reduction == "sum":
        return per.sum(), active
    return (per.sum() / active if active else 0.0), active


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "given"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_loop_reference(metric, mining, reduction):
    rng = np.random.default_rng(0)
    x, labels = _batch(rng)
    beta = rng.uniform(0.3, 1.4, 6)
    if mining == "given":
        mining = tripmine.batch_hard(x, labels, metric=metric)
    result = tripmine.margin_loss(x, labels, mining=mining, metric=metric, beta=beta, nu=0.05,
                                  margin=0.2, reduction=reduction)
    loss, active = _expected(x, labels, result, beta, 0.2, 0.05, metric, reduction)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-12, atol=1e-14)
    assert result.n_active == active and result.n_triplets == len(result.triplets.anchor)
    assert result.beta_grad.shape == beta.shape


def test_distance_weighted_is_the_default_and_seeded():
    rng = np.random.default_rng(1)
    x, labels = _batch(rng)
    a = tripmine.margin_loss(x, labels, seed=3)
    b = tripmine.margin_loss(x, labels, seed=3)
    assert a.seed == 3 and a.loss == b.loss and a.n_triplets > 0
    np.testing.assert_array_equal(a.grad, b.grad)
    expected = tripmine.distance_weighted(x, labels, seed=3)
    for got, want in zip(a.triplets, expected):
        np.testing.assert_array_equal(got, want)


def _fd(fn, value, direction, h=1e-6):
    return (fn(value + h * direction) - fn(value - h * direction)) / (2 * h)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_class", [False, True])
def test_gradients_match_float64_finite_differences(metric, reduction, per_class):
    rng = np.random.default_rng(2)
    x, labels = _batch(rng, unit=False)
    triplets = tripmine.batch_hard(x, labels, metric=metric)
    beta = rng.uniform(0.5, 3.0, 6) if per_class else 1.7
    kw = dict(mining=triplets, metric=metric, nu=0.1, margin=0.3, reduction=reduction)
    result = tripmine.margin_loss(x, labels, beta=beta, **kw)
    for _ in range(3):
        direction = rng.standard_normal(x.shape)
        numeric = _fd(lambda v: tripmine.margin_loss(v, labels, beta=beta, grad=False, **kw).loss,
                      x, direction)
        assert np.sum(result.grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    direction = rng.standard_normal(np.shape(beta))
    numeric = _fd(lambda b: tripmine.margin_loss(x, labels, beta=b, grad=False, **kw).loss,
                  np.asarray(beta, dtype=np.float64), direction)
    assert np.sum(np.asarray(result.beta_grad) * direction) == pytest.approx(numeric, rel=1e-6,
                                                                             abs=1e-8)


def test_reference_mode_gradients():
    rng = np.random.default_rng(3)
    x, labels = _batch(rng, n=12, unit=False)
    ref, ref_labels = _batch(rng, n=20, unit=False)
    ref_labels = ref_labels % 3
    labels = labels % 3
    kw = dict(ref=ref, ref_labels=ref_labels, mining="batch_hard", beta=1.5, reduction="sum")
    result = tripmine.margin_loss(x, labels, **kw)
    loss, _ = _expected(x, labels, result, 1.5, 0.2, 0.0, "euclidean", "sum", ref=ref)
    assert result.loss == pytest.approx(loss, rel=1e-12)
    direction = rng.standard_normal(ref.shape)
    numeric = _fd(lambda r: tripmine.margin_loss(x, labels, **dict(kw, ref=r)).loss, ref,
                  direction)
    assert np.sum(result.ref_grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_normalize_chains_the_gradient():
    rng = np.random.default_rng(4)
    x, labels = _batch(rng, unit=False)
    kw = dict(mining="distance_weighted", normalize=True, seed=1, beta=1.2, reduction="sum")
    result = tripmine.margin_loss(x, labels, **kw)
    triplets = result.triplets
    fixed = dict(kw, mining=triplets)
    direction = rng.standard_normal(x.shape)
    numeric = _fd(lambda v: tripmine.margin_loss(v, labels, **fixed).loss, x, direction)
    assert np.sum(result.grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_mean_divides_by_the_nonzero_hinges_and_none_adds_up():
    rng = np.random.default_rng(5)
    x, labels = _batch(rng)
    triplets = tripmine.batch_hard(x, labels)
    total = tripmine.margin_loss(x, labels, mining=triplets, reduction="sum", nu=0.2)
    mean = tripmine.margin_loss(x, labels, mining=triplets, reduction="mean", nu=0.2)
    none = tripmine.margin_loss(x, labels, mining=triplets, reduction="none", nu=0.2)
    assert mean.loss == pytest.approx(total.loss / total.n_active, rel=1e-12)
    assert none.loss.sum() == pytest.approx(total.loss, rel=1e-12)
    np.testing.assert_allclose(none.grad, total.grad, rtol=1e-12)
    np.testing.assert_allclose(mean.grad * mean.n_active, total.grad, rtol=1e-12, atol=1e-15)


def test_no_active_hinge_gives_zero_and_no_triplets_gives_zero():
    rng = np.random.default_rng(6)
    x, labels = _batch(rng)
    easy = tripmine.margin_loss(x, labels, mining="batch_hard", beta=50.0, margin=0.0,
                                nu=0.0)
    # beta far above every distance: the negative hinge is active, the positive one is not
    assert easy.n_active == easy.n_triplets
    none = tripmine.margin_loss(x, np.arange(24), mining="batch_hard")  # no positives
    assert none.loss == 0.0 and none.n_triplets == 0 and not none.grad.any()
    assert none.beta_grad == 0.0 and none.fraction_active == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_the_thread_count(dtype):
    rng = np.random.default_rng(7)
    x, labels = _batch(rng, n=2048, d=64, dtype=dtype)
    runs = []
    previous = tripmine.get_num_threads()
    try:
        for threads in (1, 2, 3):
            tripmine.set_num_threads(threads)
            r = tripmine.margin_loss(x, labels, seed=5, beta=np.linspace(0.8, 1.4, 512))
            runs.append((r.loss, r.grad, r.beta_grad))
    finally:
        tripmine.set_num_threads(previous)
    for other in runs[1:]:
        assert other[0] == runs[0][0]
        np.testing.assert_array_equal(other[1], runs[0][1])
        np.testing.assert_array_equal(other[2], runs[0][2])


@pytest.mark.parametrize("kw, match", [
    ({"margin": -0.1}, "margin"),
    ({"nu": -1.0}, "nu"),
    ({"beta": np.full(5, 1.2)}, "labels"),  # label 5 has no boundary
    ({"beta": np.array([1.0, np.nan, 1, 1, 1, 1])}, "beta"),
    ({"beta": float("inf")}, "beta"),
    ({"beta": np.ones((2, 3))}, "beta"),
    ({"mining": "hardest"}, "mining"),
    ({"reduction": "mean_nonzero"}, "reduction"),
])
def test_bad_input_raises_value_error_naming_the_argument(kw, match):
    rng = np.random.default_rng(8)
    x, labels = _batch(rng)
    before = x.copy()
    with pytest.raises(ValueError, match=match):
        tripmine.margin_loss(x, labels, **dict({"mining": "batch_hard"}, **kw))
    np.testing.assert_array_equal(x, before)


def test_per_class_beta_needs_labels_with_given_triplets():
    rng = np.random.default_rng(9)
    x, labels = _batch(rng)
    triplets = tripmine.batch_hard(x, labels)
    with pytest.raises(ValueError, match="labels is required"):
        tripmine.margin_loss(x, None, mining=triplets, beta=np.ones(6))
    scalar = tripmine.margin_loss(x, None, mining=Triplets(*triplets))
    assert scalar.n_triplets == len(triplets.anchor)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean_nonzero", "sum", "none"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_the_gpu_algorithm_matches_the_c_core(metric, reduction, mode):
    """tripmine._fused_margin with NumPy (what the GPU runs with CuPy) against the C core's
    tm_margin_loss on the same triplets, zero rows included (cosine's corner)."""
    from tripmine import _core, _fused_margin
    rng = np.random.default_rng(10)
    x, labels = _batch(rng, unit=False)
    x[5] = 0.0
    ref = None
    if mode == "ref":
        ref = rng.standard_normal((30, 6))
        ref[7] = 0.0
    m = 24 if ref is None else 30
    t = 200
    anchor, positive, negative = rng.integers(0, 24, t), rng.integers(0, m, t), \
        rng.integers(0, m, t)
    beta = rng.uniform(0.0, 2.0, t)
    ours = _core.margin_loss(x, ref, _core.METRICS[metric], anchor, positive, negative, beta,
                             0.3, reduction, True, reduction == "none")
    theirs = _fused_margin.margin_terms(np, x, ref, metric, anchor, positive, negative, beta,
                                        0.3, reduction, True)
    np.testing.assert_allclose(theirs[0], ours[0], rtol=1e-12, atol=1e-14)
    assert theirs[1] == ours[1]
    if reduction == "none":
        np.testing.assert_allclose(theirs[2], ours[2], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(theirs[3], ours[3], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(theirs[4], ours[4], rtol=1e-10, atol=1e-12)
    if ref is not None:
        np.testing.assert_allclose(theirs[5], ours[5], rtol=1e-10, atol=1e-12)


# ---- every triplet (mining="batch_all"), as pair terms ---------------------------------


def _all_problem(rng, mode, n=14, m=11, d=5, classes=3):
    x = rng.standard_normal((n, d)) * 0.7
    labels = rng.integers(0, classes, n)
    if mode == "self":
        return x, labels, {}
    ref = rng.standard_normal((m, d)) * 0.7
    ref_labels = rng.integers(0, classes, m)
    if mode == "ref":
        return x, labels, {"ref": ref, "ref_labels": ref_labels}
    ref = np.concatenate([ref[:2], x, ref[2:]])
    ref_labels = np.concatenate([ref_labels[:2], labels, ref_labels[2:]])
    return x, labels, {"ref": ref, "ref_labels": ref_labels, "ref_offset": 2}


def _all_expected(x, labels, kw, beta, margin, nu, metric, reduction):
    if "ref" in kw:
        triplets = reference.batch_all_triplets(list(labels), list(kw["ref_labels"]))
        if "ref_offset" in kw:  # x[i] is ref[o + i]: that row is not its own positive
            keep = triplets[1] != triplets[0] + kw["ref_offset"]
            triplets = tuple(t[keep] for t in triplets)
    else:
        triplets = reference.batch_all_triplets(list(labels))
    per, active = reference.margin_losses(
        x, triplets, (lambda a: beta[labels[a]]) if np.ndim(beta) else (lambda a: beta),
        margin=margin, nu=nu, metric=metric, ref=kw.get("ref"))
    per_anchor = np.bincount(triplets[0], weights=per, minlength=len(x))
    if reduction == "none":
        return per_anchor, len(per), active
    total = per.sum()
    return (total / active if active else 0.0) if reduction == "mean" else total, len(per), active


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["self", "ref", "offset"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_class", [False, True])
def test_batch_all_matches_the_enumerated_triplets(metric, mode, reduction, per_class):
    rng = np.random.default_rng(hash((metric, mode, reduction, per_class)) % 2**32)
    x, labels, kw = _all_problem(rng, mode)
    beta = rng.uniform(0.4, 1.6, 3) if per_class else 1.1
    options = dict(mining="batch_all", margin=0.3, nu=0.05, metric=metric, reduction=reduction)
    got = tripmine.margin_loss(x, labels, beta=beta, **options, **kw)
    loss, t, active = _all_expected(x, labels, kw, beta, 0.3, 0.05, metric, reduction)
    np.testing.assert_allclose(got.loss, loss, rtol=1e-11, atol=1e-13)
    assert (got.n_triplets, got.n_active) == (t, active) and got.triplets is None
    assert got.fraction_active == (active / (2 * t) if t else 0.0)
    f32 = tripmine.margin_loss(x.astype(np.float32), labels, beta=beta, **options,
                               **{k: v.astype(np.float32) if k == "ref" else v
                                  for k, v in kw.items()})
    np.testing.assert_allclose(f32.loss, loss, rtol=3e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_all_gradients_match_finite_differences(metric, mode, reduction):
    rng = np.random.default_rng(hash((metric, mode, reduction, 1)) % 2**32)
    x, labels, kw = _all_problem(rng, mode)
    beta = rng.uniform(0.5, 1.8, 3)
    options = dict(mining="batch_all", margin=0.25, nu=0.1, metric=metric, reduction=reduction,
                   **kw)
    got = tripmine.margin_loss(x, labels, beta=beta, **options)
    assert got.n_active > 0
    for _ in range(2):
        v = rng.standard_normal(x.shape)
        numeric = _fd(lambda xx: tripmine.margin_loss(xx, labels, beta=beta, grad=False,
                                                      **options).loss, x, v)
        assert np.sum(got.grad * v) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    v = rng.standard_normal(beta.shape)
    numeric = _fd(lambda b: tripmine.margin_loss(x, labels, beta=b, grad=False,
                                                 **options).loss, beta, v)
    assert np.sum(got.beta_grad * v) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    if mode == "ref":
        v = rng.standard_normal(kw["ref"].shape)
        numeric = _fd(lambda r: tripmine.margin_loss(x, labels, beta=beta, grad=False,
                                                     **dict(options, ref=r)).loss, kw["ref"], v)
        assert np.sum(got.ref_grad * v) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_batch_all_slices_add_up_to_self_mode():
    rng = np.random.default_rng(31)
    x, labels, _ = _all_problem(rng, "self", n=19)
    options = dict(mining="batch_all", beta=np.array([0.9, 1.2, 1.4]), nu=0.1,
                   reduction="sum")
    whole = tripmine.margin_loss(x, labels, **options)
    loss, t, active, grad, beta_grad = 0.0, 0, 0, np.zeros_like(x), np.zeros(3)
    for lo, hi in ((0, 7), (7, 19)):
        part = tripmine.margin_loss(x[lo:hi], labels[lo:hi], ref=x, ref_labels=labels,
                                    ref_offset=lo, **options)
        loss += part.loss
        t += part.n_triplets
        active += part.n_active
        grad[lo:hi] += part.grad
        grad += part.ref_grad
        beta_grad += part.beta_grad
    assert loss == pytest.approx(whole.loss, rel=1e-12)
    assert (t, active) == (whole.n_triplets, whole.n_active)
    np.testing.assert_allclose(grad, whole.grad, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(beta_grad, whole.beta_grad, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["self", "ref", "offset"])
@pytest.mark.parametrize("metric", METRICS)
def test_batch_all_array_module_version_matches_the_c_core(dtype, mode, metric):
    # tripmine._fused_margin.margin_all_terms is what the GPU path runs (with CuPy).
    from tripmine import _fused_margin
    from tripmine import _problem as problems
    rng = np.random.default_rng(hash((mode, metric, str(dtype))) % 2**32)
    x, labels, kw = _all_problem(rng, mode, n=40, m=30, d=6, classes=5)
    x = x.astype(dtype)
    kw = {k: v.astype(dtype) if k == "ref" else v for k, v in kw.items()}
    beta = rng.uniform(0.5, 1.5, 5)
    for reduction in ("mean", "sum", "none"):
        got = tripmine.margin_loss(x, labels, mining="batch_all", beta=beta, nu=0.05,
                                   metric=metric, reduction=reduction, **kw)
        problem = problems.prepare(x, labels, kw.get("ref"), kw.get("ref_labels"),
                                   metric=metric, ref_offset=kw.get("ref_offset"))
        for block in (7, 1 << 22):  # a few rows per block, and one block
            loss, t, active, _, beta_grad_a, g, rg = _fused_margin.margin_all_terms(
                np, problem.x, problem.ref, problem.codes, problem.ref_codes,
                problem.ref_offset, metric, beta[labels].astype(np.float64), 0.2, 0.05,
                reduction, True, block_elements=block)
            rtol = 1e-4 if dtype == np.float32 else 1e-10
            np.testing.assert_allclose(loss, got.loss, rtol=rtol, atol=rtol)
            assert (t, active) == (got.n_triplets, got.n_active)
            np.testing.assert_allclose(np.bincount(labels, weights=beta_grad_a, minlength=5),
                                       got.beta_grad, rtol=rtol, atol=rtol)
            scale = np.abs(got.grad).max()
            np.testing.assert_allclose(g, got.grad, rtol=rtol, atol=rtol * scale)
            if mode != "self":
                np.testing.assert_allclose(rg, got.ref_grad, rtol=rtol,
                                           atol=rtol * np.abs(got.ref_grad).max())


def test_batch_all_degenerate_batches():
    x = np.random.default_rng(32).standard_normal((6, 3))
    for labels in (np.zeros(6, int), np.arange(6)):
        got = tripmine.margin_loss(x, labels, mining="batch_all", nu=0.5)
        assert got.loss == 0.0 and got.n_triplets == 0 and not got.grad.any()
        assert got.beta_grad == 0.0
    empty = tripmine.margin_loss(x[:0], np.zeros(0, int), mining="batch_all")
    assert empty.loss == 0.0 and empty.grad.shape == (0, 3)
