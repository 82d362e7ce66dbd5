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

import reference
import tripmine
from tripmine import _core, _range, metrics

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
    # semi-hard: the margin in the rows' units (the rerun scales it with the rows)
    unit = 1.0 if p == 0 else min(float(np.ldexp(1.0, exponent * p)), 1e300)
    if 0 < unit < 1e300:
        for a, b in zip(tripmine.semi_hard(x, LABELS, margin=0.7 * unit, metric=metric),
                        tripmine.semi_hard(base, LABELS, margin=0.7, metric=metric)):
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


def _mined(result, x, metric, soft=False):
    triplets = (result.triplets.anchor, result.triplets.positive, result.triplets.negative)
    return float(np.mean(reference.triplet_losses(x, triplets, soft=soft, metric=metric)[1]))


#: Losses whose result does not scale with the rows (soft margins, log-sum-exps, margins
#: and beta in the caller's units): name -> (call(x, metric), reference loss(x, metric),
#: the slow loops of tests/reference.py on the same float64 rows).
CALLER_UNITS = {
    "lifted": (lambda x, m: tripmine.lifted_structured_loss(x, LABELS, metric=m),
               lambda x, m, r: reference.lifted_structured_loss(x, LABELS, metric=m).loss),
    "generalized": (
        lambda x, m: tripmine.lifted_structured_loss(x, LABELS, generalized=True, metric=m),
        lambda x, m, r: reference.lifted_structured_loss(x, LABELS, generalized=True,
                                                         metric=m).loss),
    "soft_batch_hard": (lambda x, m: tripmine.triplet_loss(x, LABELS, soft=True, metric=m),
                        lambda x, m, r: _mined(r, x, m, soft=True)),
    "soft_batch_all": (
        lambda x, m: tripmine.triplet_loss(x, LABELS, soft=True, mining="batch_all",
                                           reduction="sum", metric=m),
        lambda x, m, r: reference.batch_all_loss(x, LABELS, soft=True, reduction="sum",
                                                 metric=m).loss),
    "batch_all": (
        lambda x, m: tripmine.triplet_loss(x, LABELS, mining="batch_all", metric=m),
        lambda x, m, r: reference.batch_all_loss(x, LABELS, metric=m).loss),
    "semi_hard": (lambda x, m: tripmine.triplet_loss(x, LABELS, mining="semi_hard", metric=m),
                  lambda x, m, r: _mined(r, x, m)),
    "contrastive": (
        lambda x, m: tripmine.contrastive_loss(x, LABELS, reduction="sum", metric=m),
        lambda x, m, r: reference.contrastive_loss(x, LABELS, reduction="sum",
                                                   metric=m).loss),
    "margin_all": (
        lambda x, m: tripmine.margin_loss(x, LABELS, mining="batch_all", reduction="sum",
                                          metric=m),
        lambda x, m, r: float(np.sum(reference.margin_losses(
            x, reference.batch_all_triplets(LABELS), lambda a: 1.2, metric=m)[0]))),
    "margin_huge_beta": (
        lambda x, m: tripmine.margin_loss(x, LABELS, mining="batch_all", beta=1e300,
                                          metric=m),
        lambda x, m, r: float(np.mean(reference.margin_losses(
            x, reference.batch_all_triplets(LABELS), lambda a: 1e300, metric=m)[0]))),
}


@pytest.mark.parametrize("metric, exponent", [
    ("euclidean", -500), ("euclidean", 500), ("sqeuclidean", -500), ("sqeuclidean", 250),
    ("sqeuclidean", 500)])
@pytest.mark.parametrize("name", list(CALLER_UNITS))
def test_float64_losses_of_rows_beyond_the_window(name, metric, exponent):
    # Rows at 2^e times normal ones, beyond the engine's window yet with squares double
    # holds, so the slow loops compute the same loss directly: the rerun computes in the
    # caller's units (the C core's row_exponent) and must agree, or raise where the loss
    # does not fit double; its gradient must agree with central differences.
    call, want = CALLER_UNITS[name]
    x = np.ldexp(_rows(1.0), exponent)
    before = x.copy()
    try:
        got = call(x, metric)
    except FloatingPointError as exc:
        assert "overflows float64" in str(exc)
        np.testing.assert_array_equal(x, before)
        with np.errstate(over="ignore"):
            assert not np.isfinite(want(x, metric, None))  # it truly overflows
        return
    np.testing.assert_array_equal(x, before)
    assert np.isfinite(got.loss) and np.isfinite(got.grad).all()
    np.testing.assert_allclose(got.loss, want(x, metric, got), rtol=1e-9)
    if np.abs(got.grad).max() * 1e-6 * np.abs(x).max() < 1e-8 * abs(got.loss):
        # A loss the margins dominate (rows of 2^-500, beta of 1e300) moves by less than
        # its last bits: no finite difference resolves the gradient there;
        # test_row_exponent_is_the_callers_problem checks it.
        return
    rng = np.random.default_rng(1)
    for i, j in zip(rng.integers(0, x.shape[0], 6), rng.integers(0, x.shape[1], 6)):
        step = 1e-6 * abs(x[i, j])
        up, down = x.copy(), x.copy()
        up[i, j] += step
        down[i, j] -= step
        slope = (call(up, metric).loss - call(down, metric).loss) / (up[i, j] - down[i, j])
        scale = np.abs(got.grad).max()
        assert abs(slope - got.grad[i, j]) <= 1e-5 * scale, (i, j, slope, got.grad[i, j])


REF_LABELS = np.arange(10) % 4
#: Reference mode (x against a bank): the reference side of the gradient too.
REFERENCE_MODE = {
    "lifted_ref": lambda x, r, m: tripmine.lifted_structured_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, metric=m),
    "generalized_ref": lambda x, r, m: tripmine.lifted_structured_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, generalized=True, metric=m),
    "soft_batch_all_ref": lambda x, r, m: tripmine.triplet_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, mining="batch_all", soft=True, metric=m),
    "semi_hard_ref": lambda x, r, m: tripmine.triplet_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, mining="semi_hard", soft=True, metric=m),
    "contrastive_ref": lambda x, r, m: tripmine.contrastive_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, power=2, metric=m),
    "margin_all_ref": lambda x, r, m: tripmine.margin_loss(
        x, LABELS, ref=r, ref_labels=REF_LABELS, mining="batch_all", metric=m),
}


def _self_mode(call):
    return lambda x, r, m: call(x, m)


REFERENCE_MODE.update({name: _self_mode(call) for name, (call, _) in CALLER_UNITS.items()})


@pytest.mark.parametrize("exponent", [-40, 37])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("name", list(REFERENCE_MODE))
def test_row_exponent_is_the_callers_problem(name, metric, exponent):
    # The C core's row_exponent e (what the rerun passes): rows 2^e x with e give x's loss
    # and x's gradients, which the rest of the suite checks against the slow loops and
    # finite differences.  Rows inside the window both ways, so both calls run directly.
    call = REFERENCE_MODE[name]
    x, bank = _rows(1.0), _rows(1.0, n=10, seed=5)
    want = call(x, bank, metric)
    token = _range._ROW_EXPONENT.set(exponent)
    try:
        got = call(np.ldexp(x, exponent), np.ldexp(bank, exponent), metric)
    finally:
        _range._ROW_EXPONENT.reset(token)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12)
    for field in ("grad", "ref_grad"):
        value = getattr(want, field)
        if value is not None:
            np.testing.assert_allclose(getattr(got, field), value, rtol=1e-9,
                                       atol=1e-12 * np.abs(value).max())
    assert got.n_active == want.n_active


@pytest.mark.parametrize("metric, exponent", [("cosine", 3), ("euclidean", 1001),
                                              ("sqeuclidean", -1001)])
def test_the_c_core_refuses_a_row_exponent_it_cannot_apply(metric, exponent):
    # Cosine is scale-free (each row gets its own power instead); beyond +-1000 the
    # conversion factors leave double.  A status, never a crash.
    token = _range._ROW_EXPONENT.set(exponent)
    try:
        with pytest.raises(ValueError, match="please report it"):
            tripmine.contrastive_loss(_rows(1.0), LABELS, metric=metric)
    finally:
        _range._ROW_EXPONENT.reset(token)


def test_float64_distances_beyond_double_raise():
    x = np.ldexp(_rows(1.0), 600)  # squared distances about 2^1200
    before = x.copy()
    for call in (lambda: tripmine.triplet_loss(x, LABELS, soft=True, metric="sqeuclidean"),
                 lambda: tripmine.triplet_loss(x, LABELS, mining="batch_all",
                                               metric="sqeuclidean"),
                 lambda: tripmine.lifted_structured_loss(x, LABELS, metric="sqeuclidean")):
        with pytest.raises(FloatingPointError, match="sqeuclidean distance .* overflows"):
            call()
    np.testing.assert_array_equal(x, before)
    # The same rows with the euclidean metric: distances about 2^600 fit.
    assert np.isfinite(tripmine.triplet_loss(x, LABELS, soft=True).loss)


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
    with pytest.raises(FloatingPointError, match="overflows float64 \\(it came out inf"):
        tripmine.triplet_loss(x, [0, 0, 1], mining="batch_all", margin=1e308, reduction="sum",
                              soft=False)


def test_an_overflowing_gradient_raises():
    # A float64 row of 1e-306 among 200: the cosine gradient of its ~10^4 batch-all terms,
    # each about 1/|x| = 1e306, is beyond double while the loss (at most 2 + margin per
    # term) is not.
    x = np.random.default_rng(0).standard_normal((200, 4))
    x[0] *= 1e-306
    before = x.copy()
    with pytest.raises(FloatingPointError, match="the gradient grad of triplet_loss overflows"):
        tripmine.triplet_loss(x, np.arange(200) % 2, mining="batch_all", metric="cosine",
                              reduction="sum", margin=1.0)
    np.testing.assert_array_equal(x, before)
    result = tripmine.triplet_loss(x, np.arange(200) % 2, mining="batch_all",
                                   metric="cosine", reduction="sum", margin=1.0, grad=False)
    assert np.isfinite(result.loss)


@pytest.mark.parametrize("call", [
    lambda x, codes: _core.contrastive_loss(x, None, 1, codes, None, 0.0, 1.0, 2, "sum", True,
                                            False),
    lambda x, codes: _core.lifted_structured_loss(x, None, 1, codes, None, 1.0, 0.0, False,
                                                  "sum", True, False),
])
def test_the_c_core_scans_the_gradients_it_returns(call):
    # float32 rows of 1e15 (inside float32's window) with squared distances of 1e30:
    # gradients of h * 2 (x - r), about 1e45, beyond float32, while the losses (sums in
    # double) are finite.  The scan makes that TM_ERR_RANGE, the float64 rerun's result
    # then does not fit float32: FloatingPointError, never an inf.
    x = _rows(1e15, np.float32)
    codes = np.asarray(LABELS, dtype=np.int64)
    with pytest.raises(_range.OutOfRange):
        call(x, codes)
    with pytest.raises(FloatingPointError, match="beyond float32"):
        tripmine.contrastive_loss(x, LABELS, metric="sqeuclidean", power=2)


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
