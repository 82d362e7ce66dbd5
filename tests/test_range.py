"""The whole floating-point range (tripmine._range): results wherever the dtype holds them,
``FloatingPointError`` where it does not, inputs unchanged either way.

* float32 rows outside the engine's window compute in float64: the results equal those of
  the float64 call on the same values, rounded to float32.
* float64 rows outside the window: a power of two rescales them exactly (metamorphic
  checks: f(2^k x, 2^(kp) margins) = 2^(k p q) f(x, margins), gradients 2^(k (1 - p q))),
  or, where the function's result does not transform simply, FloatingPointError.
"""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from tripmine import metrics

LABELS = np.repeat(np.arange(4), 3)


def _rows(scale: float, dtype=np.float64, n: int = 12, d: int = 5, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, d)) * scale).astype(dtype)


# ---- float32: computed in float64, rounded back -----------------------------------------

FLOAT32_CALLS = {
    "pairwise": lambda x: tripmine.pairwise_distances(x),
    "pairwise_cosine": lambda x: tripmine.pairwise_distances(x, metric="cosine"),
    "batch_hard": lambda x: tripmine.triplet_loss(x, LABELS),
    "batch_all": lambda x: tripmine.triplet_loss(x, LABELS, mining="batch_all"),
    "semi_hard": lambda x: tripmine.triplet_loss(x, LABELS, mining="semi_hard"),
    "soft": lambda x: tripmine.triplet_loss(x, LABELS, soft=True),
    "normalized_weighted": lambda x: tripmine.triplet_loss(
        x, LABELS, mining="distance_weighted", normalize=True, seed=3),
    "contrastive": lambda x: tripmine.contrastive_loss(x, LABELS, neg_margin=0.0),
    "contrastive_cosine": lambda x: tripmine.contrastive_loss(x, LABELS, metric="cosine"),
    "lifted": lambda x: tripmine.lifted_structured_loss(x, LABELS, metric="cosine"),
    "generalized": lambda x: tripmine.lifted_structured_loss(x, LABELS, generalized=True,
                                                             normalize=True),
    "margin_all": lambda x: tripmine.margin_loss(x, LABELS, mining="batch_all",
                                                 normalize=True),
    "nearest": lambda x: metrics.nearest_neighbors(x, 3),
    "recall": lambda x: metrics.recall_at_k(x, LABELS, 1),
    "batch_hard_miner": lambda x: tripmine.batch_hard(x, LABELS),
}


def _as_tuple(result):
    if isinstance(result, np.ndarray) or np.isscalar(result):
        return (result,)
    if isinstance(result, tuple):
        return tuple(result)
    return tuple(getattr(result, f) for f in ("loss", "grad", "triplets", "n_active")
                 if hasattr(result, f))


#: Calls whose rows are normalised first: the unit rows are inside the window, so they
#: compute in float32 (close to, not equal to, the float64 call).
NORMALIZED = ("normalized_weighted", "generalized", "margin_all")


@pytest.mark.parametrize("scale", [1e30, 1e-25, 1e-40])
@pytest.mark.parametrize("name", list(FLOAT32_CALLS))
def test_float32_rows_beyond_the_window_compute_in_float64(name, scale):
    x = _rows(scale, np.float32)
    before = x.copy()
    want = FLOAT32_CALLS[name](x.astype(np.float64))
    grad = getattr(want, "grad", None)
    if grad is not None and np.abs(grad).max() > np.finfo(np.float32).max:
        # 1 / |x| of rows near float32's smallest numbers: beyond float32, so refused.
        with pytest.raises(FloatingPointError, match="gradient"):
            FLOAT32_CALLS[name](x)
        np.testing.assert_array_equal(x, before)
        return
    got = FLOAT32_CALLS[name](x)
    np.testing.assert_array_equal(x, before)
    if name in NORMALIZED:
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-5)
        assert got.grad.dtype == np.float32 and np.isfinite(got.grad).all()
        np.testing.assert_allclose(got.grad, want.grad, rtol=1e-3,
                                   atol=1e-4 * np.abs(want.grad).max())
        return
    for g, w in zip(_as_tuple(got), _as_tuple(want)):
        if isinstance(w, np.ndarray) and w.dtype == np.float64 and \
                isinstance(g, np.ndarray) and g.dtype == np.float32:
            np.testing.assert_array_equal(g, w.astype(np.float32))  # rounded once
            assert np.isfinite(g).all() or name == "nearest"
        elif isinstance(w, (float, np.floating, np.ndarray)) and not isinstance(w, tuple):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        else:
            for a, b in zip(g if isinstance(g, tuple) else (g,),
                            w if isinstance(w, tuple) else (w,)):
                np.testing.assert_array_equal(a, b)


def test_float32_distances_of_huge_rows_are_finite():
    x = _rows(1e30, np.float32)
    d = tripmine.pairwise_distances(x)
    assert d.dtype == np.float32 and np.isfinite(d).all()
    exact = np.sqrt(((x.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d, exact, rtol=1e-6)


def test_float32_results_beyond_float32_raise_and_change_nothing():
    x = _rows(3e19, np.float32)
    out = np.full((12, 12), -1.0, dtype=np.float32)
    with pytest.raises(FloatingPointError, match="a distance reaches .* beyond float32"):
        tripmine.pairwise_distances(x, metric="sqeuclidean", out=out)
    assert (out == -1).all()
    with pytest.raises(FloatingPointError, match="the loss reaches .* beyond float32"):
        tripmine.contrastive_loss(_rows(1e30, np.float32), LABELS, power=2, neg_margin=0.0)
    # ... while euclidean distances of the same rows fit.
    assert np.isfinite(tripmine.pairwise_distances(x)).all()


def test_float32_out_is_filled_in_place():
    x = _rows(1e-30, np.float32)
    out = np.empty((12, 12), dtype=np.float32)
    assert tripmine.pairwise_distances(x, out=out) is out
    np.testing.assert_array_equal(out, tripmine.pairwise_distances(x.astype(np.float64))
                                  .astype(np.float32))


def test_float16_rows_and_mixed_dtypes():
    x = _rows(1e-6, np.float16)  # subnormal float16 values: within float32's window
    assert np.isfinite(tripmine.triplet_loss(x, LABELS).grad).all()
    mixed = tripmine.pairwise_distances(_rows(1e30, np.float32), _rows(1.0, np.float64, n=3))
    assert mixed.dtype == np.float64 and np.isfinite(mixed).all()


# ---- float64: rescaled by a power of two -------------------------------------------------

HOMOGENEOUS = {
    # name: (call(x, unit, metric), with the margins in distance units; the loss's degree q
    # per unit of p, p = 1 euclidean, 2 sqeuclidean)
    "batch_hard": (lambda x, u, m: tripmine.triplet_loss(x, LABELS, margin=0.3 * u,
                                                         metric=m), 1),
    "batch_all": (lambda x, u, m: tripmine.triplet_loss(
        x, LABELS, mining="batch_all", margin=0.3 * u, reduction="sum", metric=m), 1),
    "semi_hard": (lambda x, u, m: tripmine.triplet_loss(
        x, LABELS, mining="semi_hard", margin=0.3 * u, metric=m), 1),
    "batch_all_none": (lambda x, u, m: tripmine.triplet_loss(
        x, LABELS, mining="batch_all", margin=0.3 * u, reduction="none", metric=m), 1),
    "contrastive": (lambda x, u, m: tripmine.contrastive_loss(
        x, LABELS, pos_margin=0.1 * u, neg_margin=2.0 * u, metric=m), 1),
    "contrastive_power2": (lambda x, u, m: tripmine.contrastive_loss(
        x, LABELS, neg_margin=2.0 * u, power=2, reduction="sum", metric=m), 2),
    "margin_all": (lambda x, u, m: tripmine.margin_loss(
        x, LABELS, mining="batch_all", margin=0.2 * u, beta=1.5 * u, nu=0.1, metric=m), 1),
    "margin_per_class": (lambda x, u, m: tripmine.margin_loss(
        x, LABELS, mining=tripmine.batch_hard(np.ldexp(x, 0), LABELS, metric=m),
        margin=0.2 * u, beta=np.linspace(1.0, 2.0, 4) * u, metric=m, reduction="sum"), 1),
}


@pytest.mark.parametrize("metric, exponent", [
    ("euclidean", -700), ("euclidean", -560), ("euclidean", 560),
    # squared: rows just outside the window, so that the margins (times 2^(2e)) stay finite
    ("sqeuclidean", -490), ("sqeuclidean", 500)])
@pytest.mark.parametrize("name", list(HOMOGENEOUS))
def test_float64_rescaling_is_exact(name, metric, exponent):
    call, q = HOMOGENEOUS[name]
    p = 2 if metric == "sqeuclidean" else 1
    base = _rows(1.0)
    x = np.ldexp(base, exponent)
    unit = float(np.ldexp(1.0, exponent * p))
    want = call(base, 1.0, metric)
    degree = p * q
    # In the rows' own units: L(2^e x) = 2^(e p q) L(x), dL/dx scales by 2^(e (p q - 1));
    # values below the smallest double round to 0 (or a subnormal) there, as they should.
    with np.errstate(over="ignore", under="ignore"):
        loss = np.ldexp(np.asarray(want.loss), exponent * degree)
        grad = np.ldexp(want.grad, exponent * (degree - 1))
    if not np.isfinite(loss).all():
        with pytest.raises(FloatingPointError, match="overflows float64"):
            call(x, unit, metric)
        return
    got = call(x, unit, metric)
    tiny = np.finfo(np.float64).tiny
    np.testing.assert_allclose(np.asarray(got.loss), loss, rtol=1e-12, atol=tiny)
    np.testing.assert_allclose(got.grad, grad, rtol=1e-10, atol=tiny)
    assert got.n_active == want.n_active


@pytest.mark.parametrize("exponent", [-1000, -600, 600, 900])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_float64_distances_and_neighbours_of_any_finite_rows(metric, exponent):
    base = _rows(1.0)
    x = np.ldexp(base, exponent)
    p = {"euclidean": 1, "sqeuclidean": 2, "cosine": 0}[metric]
    want = tripmine.pairwise_distances(base, metric=metric)
    if p * exponent > 1020 or p * exponent < -1070:
        with pytest.raises(FloatingPointError) if p * exponent > 0 else _no_error():
            tripmine.pairwise_distances(x, metric=metric)
        return
    got = tripmine.pairwise_distances(x, metric=metric)
    np.testing.assert_allclose(np.ldexp(got, -exponent * p), want, rtol=1e-12, atol=1e-300)
    idx, dist = metrics.nearest_neighbors(x, 3, metric=metric)
    want_idx, want_dist = metrics.nearest_neighbors(base, 3, metric=metric)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(np.ldexp(dist, -exponent * p), want_dist, rtol=1e-12)
    assert metrics.mean_average_precision_at_r(x, LABELS, metric=metric) == \
        metrics.mean_average_precision_at_r(base, LABELS, metric=metric)
    for a, b in zip(tripmine.batch_hard(x, LABELS, metric=metric),
                    tripmine.batch_hard(base, LABELS, metric=metric)):
        np.testing.assert_array_equal(a, b)


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("call", [
    lambda x: tripmine.lifted_structured_loss(x, LABELS, metric="cosine"),
    lambda x: tripmine.triplet_loss(x, LABELS, metric="cosine", soft=True),
    lambda x: tripmine.margin_loss(x, LABELS, mining="batch_all", metric="cosine"),
    lambda x: tripmine.contrastive_loss(x, LABELS, metric="cosine", power=2),
])
def test_float64_cosine_calls_take_any_finite_rows(call):
    base = _rows(1.0)
    magnitudes = np.ldexp(1.0, np.arange(12) * 170 - 1000)  # 2^-1000 .. 2^870, row by row
    x = base * magnitudes[:, None]
    got, want = call(x), call(base)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12)
    np.testing.assert_allclose(got.grad * magnitudes[:, None], want.grad, rtol=1e-9,
                               atol=1e-300)


@pytest.mark.parametrize("scale, call, match", [
    (1e200, lambda x: tripmine.lifted_structured_loss(x, LABELS), "lifted_structured_loss"),
    (1e200, lambda x: tripmine.triplet_loss(x, LABELS, soft=True), "soft=True"),
    (1e-200, lambda x: tripmine.margin_loss(x, LABELS, mining="batch_all",
                                            beta=np.full(4, 1e300)), "beta times the power"),
])
def test_float64_calls_that_cannot_rescale_refuse(scale, call, match):
    x = _rows(scale)
    before = x.copy()
    with pytest.raises(FloatingPointError, match=match):
        call(x)
    np.testing.assert_array_equal(x, before)


def test_a_batch_spanning_more_than_the_window_is_refused():
    x = _rows(1.0)
    x[0] *= 1e-300
    x[1] *= 1e300
    with pytest.raises(FloatingPointError, match="span more than the window"):
        tripmine.triplet_loss(x, LABELS)
    # Distances alone take one power of two for the big rows; the tiny one is then 0,
    # its distances to the others those of the origin.
    assert np.isfinite(tripmine.pairwise_distances(x, metric="cosine")).all()


def test_normalize_takes_any_finite_rows():
    base = _rows(1.0)
    for x in (base * 1e-200, base * 1e200, (base * 1e-25).astype(np.float32),
              (base * 1e30).astype(np.float32)):
        got = tripmine.triplet_loss(x, LABELS, normalize=True, mining="batch_all")
        want = tripmine.triplet_loss(base.astype(x.dtype), LABELS, normalize=True,
                                     mining="batch_all")
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        assert np.isfinite(got.grad).all()


def test_an_overflowing_loss_raises():
    x = np.zeros((3, 2))
    with pytest.raises(FloatingPointError, match="is inf: an intermediate overflowed"):
        tripmine.triplet_loss(x, [0, 0, 1], mining="batch_all", margin=1e308, reduction="sum",
                              soft=False)


def test_center_loss_and_heads_check_their_loss():
    x = _rows(1e25, np.float32)
    centers = np.zeros((4, 5), dtype=np.float32)
    before = centers.copy()
    with pytest.raises(FloatingPointError, match="the loss of center_loss reaches"):
        tripmine.center_loss(x, LABELS, centers, update=0.5)
    np.testing.assert_array_equal(centers, before)  # refused before the update
    assert np.isfinite(tripmine.center_loss(x.astype(np.float64), LABELS, centers).loss)
    weight = _rows(1e20, np.float32, n=4)
    # float32 logits W.x of 1e45 overflow: the head reruns in float64, where its loss (about
    # 1e46) still does not fit float32.
    with pytest.raises(FloatingPointError, match="the loss reaches .* beyond float32"):
        tripmine.softmax_loss(x, LABELS, weight)
    # Angular heads see unit vectors: any finite rows.
    assert np.isfinite(tripmine.arcface_loss(x, LABELS, weight).loss)


def test_softmax_head_logits_beyond_float32_rerun_in_float64():
    # Logits W.x of about 4e39 (beyond float32) that differ by about 1e36: the loss (a
    # difference of logits, about 1e36) fits float32, so the float64 rerun's result stands,
    # its gradients rounded to float32.
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((12, 5))).astype(np.float32) * np.float32(1e20)
    shared = np.full(5, 1e19, dtype=np.float32)
    weight = (shared * (1 + 2.0 ** -10 * rng.standard_normal((4, 5)))).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(x @ weight.T).all()  # float32 logits overflow
    got = tripmine.softmax_loss(x, LABELS, weight)
    want = tripmine.softmax_loss(x.astype(np.float64), LABELS, weight.astype(np.float64))
    assert 1e30 < got.loss < 3e38 and got.loss == want.loss
    assert got.grad.dtype == np.float32 and got.weight_grad.dtype == np.float32
    np.testing.assert_array_equal(got.grad, want.grad.astype(np.float32))
    np.testing.assert_array_equal(got.weight_grad, want.weight_grad.astype(np.float32))
