"""triplet_loss and contrastive_loss against the loop reference: values, counts,
triplets, result shapes, degenerate batches, extreme values and bad input.

Gradients are checked against finite differences in test_gradients.py; here
only their shapes, dtypes, finiteness and the float32/float64 agreement.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import reference
import tripmine
from checks import (
    assert_distance_weighted_valid,
    assert_quasi_equal,
    assert_triplets_type,
    rows,
    tie_tolerance,
)
from conftest import FLOAT_DTYPES, loss_rtol

TRIPLET_REDUCTIONS = ("auto", "mean", "sum", "mean_nonzero", "none")
CONTRASTIVE_REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")

# (mining, metric, normalize): distance_weighted is defined for unit-norm
# euclidean embeddings only; cosine is scale-free, so normalize adds nothing.
COMBOS = [(mining, metric, normalize)
          for mining in ("batch_hard", "batch_all", "semi_hard")
          for metric, normalize in (("euclidean", False), ("euclidean", True),
                                    ("sqeuclidean", False), ("sqeuclidean", True),
                                    ("cosine", False))]
COMBOS.append(("distance_weighted", "euclidean", True))


def _combo_id(combo):
    mining, metric, normalize = combo
    return f"{mining}-{metric}" + ("-normalize" if normalize else "")


def loss_batch(rng, mode, dtype, n=16, m=22, d=5):
    """Random classes with two singletons; ref mode is a memory bank of another
    size holding copies of some rows of x."""
    x = rng.standard_normal((n, d))
    labels = rng.integers(0, 4, n)
    labels[:2] = [10, 11]
    if mode == "self":
        return x.astype(dtype), labels, None, None
    ref = rng.standard_normal((m, d))
    ref_labels = rng.integers(0, 4, m)
    slots = rng.choice(m, 4, replace=False)
    ref[slots], ref_labels[slots] = x[2:6], labels[2:6]
    return x.astype(dtype), labels, ref.astype(dtype), ref_labels


def margin_away_from(values, target):
    """A margin near target (at least 0) as far as possible from every value,
    so that no hinge sits within rounding of its kink."""
    values = np.asarray(values, dtype=np.float64).ravel()
    candidates = target * np.linspace(0.7, 1.3, 61)
    if values.size == 0:
        return float(target)
    gaps = [np.min(np.abs(values - c)) for c in candidates]
    return float(candidates[int(np.argmax(gaps))])


def _reduced_atol(magnitude, active, reduction, rtol):
    """Absolute tolerance of a reduced loss whose terms have these magnitudes
    (the distances entering each term): rtol times their reduced size."""
    if reduction == "sum":
        return rtol * float(np.sum(magnitude)) + 1e-300
    if reduction == "mean_nonzero":
        return rtol * float(np.sum(magnitude[active])) / max(int(np.sum(active)), 1) + 1e-300
    return rtol * float(np.mean(magnitude)) if magnitude.size else 1e-300


def assert_loss_matches(result, z, losses, magnitude, reduction, rtol, soft, anchors=None,
                        n=None):
    """result (one reduction) against per-term reference values.

    anchors/n: batch-all, whose "none" vector is per anchor.  A hinge's
    n_active may differ from the reference only by terms whose z lies within
    tolerance of the kink; mean_nonzero is then judged with the
    implementation's count.  Softplus terms are all active.
    """
    ztol = rtol * magnitude
    lo, hi = int(np.sum(z > ztol)), int(np.sum(z > -ztol))
    if soft:
        lo = hi = int(np.sum(losses > 0))
    assert lo <= result.n_active <= hi, (result.n_active, lo, hi)
    assert result.n_triplets == len(z)
    assert result.fraction_active == (result.n_active / len(z) if len(z) else 0.0)
    if reduction == "none":
        got = np.asarray(result.loss)
        if anchors is None:
            want, atol = losses, rtol * magnitude
        else:
            want, atol = np.zeros(n), np.zeros(n)
            np.add.at(want, anchors, losses)
            np.add.at(atol, anchors, rtol * magnitude)
        assert got.shape == want.shape
        np.testing.assert_array_less(np.abs(got - want), atol + 1e-300)
        return
    assert isinstance(result.loss, float)
    if reduction == "mean_nonzero":
        want = float(np.sum(losses)) / result.n_active if result.n_active else 0.0
    else:
        want = reference.reduce(losses, reduction)
    atol = _reduced_atol(magnitude, losses > 0, reduction, rtol)
    assert abs(result.loss - want) <= atol, (result.loss, want, atol)


def _assert_grad_shapes(result, x, ref, dtype):
    result_dtype = np.dtype(dtype)
    assert result.grad.shape == x.shape and result.grad.dtype == result_dtype
    if ref is None:
        assert result.ref_grad is None
    else:
        assert result.ref_grad.shape == ref.shape and result.ref_grad.dtype == result_dtype


def _check_mined_triplets(mining, got, x, labels, ref, ref_labels, metric, normalize, dtype):
    kw = dict(ref=ref, ref_labels=ref_labels, metric=metric, normalize=normalize)
    dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
    tol = tie_tolerance(dtype, x.shape[1], metric, normalize, "random")
    if mining == "batch_hard":
        want, _ = reference.batch_hard(x, labels, **kw)
        assert_quasi_equal(got, want, dist, tol, pos, neg)
    elif mining == "semi_hard":
        want, _ = reference.semi_hard_closest(x, labels, **kw)
        assert_quasi_equal(got, want, dist, tol, pos, neg, boundary=dist[want[0], want[1]])
    else:
        del kw["metric"]
        probabilities, _ = reference.distance_weighted_probabilities(x, labels, **kw)
        assert_distance_weighted_valid(got, probabilities, dist, pos, neg, tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("soft", [False, True], ids=["hinge", "soft"])
@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_triplet_loss_matches_reference(rng, combo, soft, mode, dtype):
    """Every mining mode x reduction: loss, counts and triplets equal the
    reference's (within the loss tolerance), "auto" is the documented
    reduction and "none" has the gradient of "sum"."""
    mining, metric, normalize = combo
    x, labels, ref, ref_labels = loss_batch(rng, mode, dtype)
    dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
    a, p, n = reference.batch_all_triplets(labels, ref_labels)
    margin = margin_away_from(dist[a, n] - dist[a, p], 0.3 * np.median(dist))
    kw = dict(ref=ref, ref_labels=ref_labels, metric=metric, normalize=normalize,
              margin=margin, soft=soft, mining=mining, seed=5)
    results = {red: tripmine.triplet_loss(x, labels, reduction=red, **kw)
               for red in TRIPLET_REDUCTIONS}

    if mining == "batch_all":
        triplets, anchors = (a, p, n), a
        for result in results.values():
            assert result.triplets is None
    else:
        got = results["mean"].triplets
        _check_mined_triplets(mining, got, x, labels, ref, ref_labels, metric, normalize, dtype)
        for result in results.values():  # the reduction does not change the mining
            assert rows(result.triplets) == rows(got)
        triplets, anchors = got, None
    z, losses = reference.triplet_losses(x, triplets, margin=margin, soft=soft, metric=metric,
                                         ref=ref, normalize=normalize)
    xs, refs = reference.prepare(x, ref, normalize)
    refs = xs if refs is None else refs
    magnitude = np.array([reference.distance(xs[i], refs[j], metric)
                          + reference.distance(xs[i], refs[k], metric) + margin
                          for i, j, k in zip(*triplets)])
    rtol = loss_rtol(dtype, x.shape[1])
    for reduction, result in results.items():
        resolved = reduction
        if reduction == "auto":
            resolved = "mean_nonzero" if mining == "batch_all" else "mean"
        assert_loss_matches(result, z, losses, magnitude, resolved, rtol, soft, anchors, len(x))
        _assert_grad_shapes(result, x, ref, dtype)
        assert np.all(np.isfinite(result.grad))
        assert result.seed == (5 if mining == "distance_weighted" else None)
    auto = "mean_nonzero" if mining == "batch_all" else "mean"
    assert results["auto"].loss == results[auto].loss
    np.testing.assert_array_equal(results["auto"].grad, results[auto].grad)
    grad_rtol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-5
    scale = np.max(np.abs(results["sum"].grad)) + 1e-300
    np.testing.assert_allclose(results["none"].grad, results["sum"].grad, rtol=0,
                               atol=grad_rtol * scale)
    if mode == "ref":
        np.testing.assert_allclose(results["none"].ref_grad, results["sum"].ref_grad, rtol=0,
                                   atol=grad_rtol * np.max(np.abs(results["sum"].ref_grad)))


def _contrastive_margins(dist, pos, neg, metric):
    """(pos_margin, neg_margin) settings: PML's defaults where they make sense,
    margins inside the distance range (both active and inactive terms), and
    extremes that switch whole sides off or on; all away from every distance."""
    everything = dist[pos | neg]
    positive = dist[pos] if pos.any() else everything
    negative = dist[neg] if neg.any() else everything
    inner = (margin_away_from(everything, np.quantile(positive, 0.3)),
             margin_away_from(everything, np.quantile(negative, 0.6)))
    top = float(everything.max())
    settings = [inner, (0.0, margin_away_from(everything, np.median(negative))),
                (0.0, 0.0), (2 * top + 1, 4 * top + 2)]
    if metric == "cosine":
        settings.append((0.0, 1.0) if np.all(np.abs(everything - 1.0) > 1e-3) else (0.0, 0.9))
    return settings


CONTRASTIVE_COMBOS = [("euclidean", False), ("euclidean", True), ("sqeuclidean", False),
                      ("cosine", False)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["self", "ref", "one_class", "singletons"])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("metric, normalize", CONTRASTIVE_COMBOS,
                         ids=[f"{m}{'-normalize' if z else ''}" for m, z in CONTRASTIVE_COMBOS])
def test_contrastive_loss_matches_reference(rng, metric, normalize, power, mode, dtype):
    """Every reduction and several margin settings: loss and pair counts equal
    the reference's; "none" has the gradient of "sum"."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref" if mode == "ref" else "self", dtype)
    if mode == "one_class":
        labels = np.zeros(len(x), dtype=np.int64)
    elif mode == "singletons":
        labels = np.arange(len(x))
    dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
    rtol = loss_rtol(dtype, x.shape[1])
    for pos_margin, neg_margin in _contrastive_margins(dist, pos, neg, metric):
        results = {}
        for reduction in CONTRASTIVE_REDUCTIONS:
            kw = dict(pos_margin=pos_margin, neg_margin=neg_margin, power=power, metric=metric,
                      normalize=normalize, reduction=reduction)
            want = reference.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, **kw)
            got = tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, **kw)
            results[reduction] = got
            context = (pos_margin, neg_margin, reduction)
            assert got.n_positive_pairs == want.n_positive_pairs == int(pos.sum()), context
            assert got.n_negative_pairs == want.n_negative_pairs == int(neg.sum()), context
            assert got.n_pairs == got.n_positive_pairs + got.n_negative_pairs
            assert got.n_active == want.n_active, context
            assert got.fraction_active == want.n_active / got.n_pairs
            # A term's error is power * gap^(power-1) * (distance error).
            d = dist[pos | neg]
            term_scale = power * (d + pos_margin + neg_margin) ** power
            if reduction == "none":
                per_anchor = np.zeros(len(x))
                np.add.at(per_anchor, np.nonzero(pos | neg)[0], term_scale)
                assert got.loss.shape == (len(x),)
                np.testing.assert_array_less(np.abs(got.loss - want.loss),
                                             rtol * per_anchor + 1e-300, err_msg=str(context))
            else:
                scale = {"sum": np.sum, "mean": np.mean}.get(reduction, np.mean)(term_scale)
                if reduction == "mean_nonzero":
                    scale = 2 * np.max(term_scale)
                assert isinstance(got.loss, float)
                assert abs(got.loss - want.loss) <= rtol * scale + 1e-300, (got.loss, want,
                                                                           context)
            _assert_grad_shapes(got, x, ref, dtype)
            assert np.all(np.isfinite(got.grad))
        grad_rtol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-5
        atol = grad_rtol * (np.max(np.abs(results["sum"].grad)) + 1e-300)
        np.testing.assert_allclose(results["none"].grad, results["sum"].grad, rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_given_triplets(rng, mode):
    """Triplets mined by semi_hard(select="all") and passed in as mining give
    the reference loss on exactly those triplets, in their order."""
    x, labels, ref, ref_labels = loss_batch(rng, mode, np.float64)
    triplets = tripmine.semi_hard(x, labels, ref=ref, ref_labels=ref_labels, select="all",
                                  margin=1.0)
    assert len(triplets.anchor) > 10
    shuffled = tripmine.Triplets(*(t[::-1].copy() for t in triplets))  # any order works
    for given in (triplets, shuffled):
        if mode == "self":
            result = tripmine.triplet_loss(x, None, mining=given, margin=0.3, reduction="none")
        else:
            result = tripmine.triplet_loss(x, labels, mining=given, margin=0.3, ref=ref,
                                           ref_labels=ref_labels, reduction="none")
        assert rows(result.triplets) == rows(given)
        _, want = reference.triplet_losses(x, given, margin=0.3, ref=ref)
        np.testing.assert_allclose(result.loss, want, rtol=1e-12, atol=1e-12)
        assert result.n_triplets == len(want) and result.n_active == int(np.sum(want > 0))
    # Plain index arrays in a Triplets work too, and so does a repeated triplet.
    repeated = tripmine.Triplets(np.array([0, 0]), np.array([1, 1]), np.array([2, 2]))
    result = tripmine.triplet_loss(x, labels, mining=repeated, margin=100.0, ref=ref,
                                   ref_labels=ref_labels)
    _, want = reference.triplet_losses(x, repeated, margin=100.0, ref=ref)
    assert result.loss == pytest.approx(want.mean(), rel=1e-12)


def test_float32_gradient_matches_float64(rng):
    """The float32 gradient is the float64 one, rounded (same triplets)."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref", np.float64)
    x, ref = x.astype(np.float32).astype(np.float64), ref.astype(np.float32).astype(np.float64)
    dist, _, _ = reference.mining_distances(x, labels, ref, ref_labels)
    a, p, n = reference.batch_all_triplets(labels, ref_labels)
    margin = margin_away_from(dist[a, n] - dist[a, p], 0.5)  # same active set in both
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        kw = dict(mining=mining, ref_labels=ref_labels, margin=margin)
        wide = tripmine.triplet_loss(x, labels, ref=ref, **kw)
        narrow = tripmine.triplet_loss(x.astype(np.float32), labels, ref=ref.astype(np.float32),
                                       **kw)
        if mining != "batch_all":
            assert rows(narrow.triplets) == rows(wide.triplets)
        scale = np.max(np.abs(wide.grad))
        np.testing.assert_allclose(narrow.grad, wide.grad, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(narrow.ref_grad, wide.ref_grad, rtol=0, atol=1e-4 * scale)
    wide = tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, power=2)
    narrow = tripmine.contrastive_loss(x.astype(np.float32), labels, ref=ref.astype(np.float32),
                                       ref_labels=ref_labels, power=2)
    np.testing.assert_allclose(narrow.grad, wide.grad, rtol=0,
                               atol=1e-4 * np.max(np.abs(wide.grad)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_isa_gives_the_reference_loss(isa, rng, dtype):
    """batch-all and contrastive take their distances from the tile: every
    micro-kernel gives the reference loss."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref", dtype, d=37)  # wider than a vector
    rtol = loss_rtol(dtype, x.shape[1])
    dist, _, _ = reference.mining_distances(x, labels, ref, ref_labels)
    a, p, n = reference.batch_all_triplets(labels, ref_labels)
    margin = margin_away_from(dist[a, n] - dist[a, p], 2.0)
    got = tripmine.triplet_loss(x, labels, mining="batch_all", ref=ref, ref_labels=ref_labels,
                                margin=margin, reduction="sum")
    want = reference.batch_all_loss(x, labels, ref=ref, ref_labels=ref_labels, margin=margin,
                                    reduction="sum")
    assert got.n_active == want.n_active
    assert got.loss == pytest.approx(want.loss, rel=rtol * 10)
    neg_margin = margin_away_from(dist, np.median(dist))
    got = tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, power=2,
                                    neg_margin=neg_margin)
    want = reference.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, power=2,
                                      neg_margin=neg_margin)
    assert got.n_active == want.n_active
    assert got.loss == pytest.approx(want.loss, rel=rtol * 10)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_losses_do_not_depend_on_the_thread_count(threads, rng, dtype):
    """1 and 2 threads: the same triplets and counts, and the same loss and
    gradients up to the order of summation."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref", dtype, n=300, m=410, d=8)
    labels, ref_labels = rng.integers(0, 20, 300), rng.integers(0, 20, 410)
    calls = [lambda mining=mining: tripmine.triplet_loss(
                 x, labels, ref=ref, ref_labels=ref_labels, mining=mining, normalize=True,
                 margin=0.3, seed=4)
             for mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted")]
    calls.append(lambda: tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels,
                                                   neg_margin=4.0))
    results = {}
    for count in (1, 2):
        tripmine.set_num_threads(count)
        results[count] = [call() for call in calls]
    rtol = 1e-12 if np.dtype(dtype) == np.float64 else 1e-5
    for one, two in zip(results[1], results[2]):
        assert one.n_active == two.n_active > 0
        if getattr(one, "triplets", None) is not None:
            assert rows(one.triplets) == rows(two.triplets)
        assert two.loss == pytest.approx(one.loss, rel=rtol)
        for g1, g2 in ((one.grad, two.grad), (one.ref_grad, two.ref_grad)):
            np.testing.assert_allclose(g2, g1, rtol=0, atol=rtol * np.max(np.abs(g1)))


def test_grad_false_and_float16(rng):
    """grad=False returns no gradients (same loss); float16 computes in float32."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref", np.float32)
    full = tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels)
    bare = tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels, grad=False)
    assert bare.grad is None and bare.ref_grad is None and bare.loss == full.loss
    bare = tripmine.contrastive_loss(x, labels, grad=False)
    assert bare.grad is None and bare.ref_grad is None
    half = tripmine.triplet_loss(x.astype(np.float16), labels, mining="batch_all")
    assert half.grad.dtype == np.float32
    single = tripmine.triplet_loss(x.astype(np.float16).astype(np.float32), labels,
                                   mining="batch_all")
    assert half.loss == single.loss


def test_distance_weighted_seed_is_reported(rng):
    """seed=None draws a fresh seed, reported in the result, that reproduces the run."""
    x, labels, _, _ = loss_batch(rng, "self", np.float64)
    first = tripmine.triplet_loss(x, labels, mining="distance_weighted", normalize=True)
    assert isinstance(first.seed, int)
    again = tripmine.triplet_loss(x, labels, mining="distance_weighted", normalize=True,
                                  seed=first.seed)
    assert rows(again.triplets) == rows(first.triplets) and again.loss == first.loss


# ---- degenerate batches -----------------------------------------------------


def _degenerate_batches():
    d = 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, d))
    return {
        "N=0": (np.zeros((0, d)), np.zeros(0, dtype=np.int64), None, None),
        "N=1": (x[:1], np.array([4]), None, None),
        "one class": (x, np.zeros(6, dtype=np.int64), None, None),
        "all singletons": (x, np.arange(6), None, None),
        "no positives in ref": (x, np.zeros(6, dtype=np.int64), x[:4] + 1, np.ones(4, np.int64)),
        "empty ref": (x, np.zeros(6, dtype=np.int64), np.zeros((0, d)), np.zeros(0, np.int64)),
        "N=0 with ref": (np.zeros((0, d)), np.zeros(0, dtype=np.int64), x, np.arange(6)),
    }


DEGENERATE = _degenerate_batches()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_triplet_batches(name, dtype):
    """No valid triplet: loss 0.0 (or a zero/empty vector), zero gradients of the
    right shape, zero counts, and not a single warning."""
    x, labels, ref, ref_labels = DEGENERATE[name]
    x = x.astype(dtype)
    ref = None if ref is None else ref.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted"):
            for reduction in TRIPLET_REDUCTIONS:
                for soft in (False, True):
                    result = tripmine.triplet_loss(
                        x, labels, mining=mining, reduction=reduction, soft=soft, ref=ref,
                        ref_labels=ref_labels, normalize=True, seed=0)
                    context = (mining, reduction, soft)
                    if reduction == "none":
                        length = len(x) if mining == "batch_all" else 0
                        np.testing.assert_array_equal(result.loss, np.zeros(length))
                    else:
                        assert result.loss == 0.0 and isinstance(result.loss, float), context
                    assert (result.n_triplets, result.n_active) == (0, 0), context
                    assert result.fraction_active == 0.0
                    _assert_grad_shapes(result, x, ref, dtype)
                    assert not np.any(result.grad), context
                    assert result.ref_grad is None or not np.any(result.ref_grad)
                    if mining != "batch_all":
                        assert_triplets_type(result.triplets)
                        assert len(result.triplets.anchor) == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", ["N=0", "N=1", "empty ref", "N=0 with ref"])
def test_degenerate_contrastive_batches(name, dtype):
    """No pair at all: loss 0.0, zero gradients and counts, no warnings."""
    x, labels, ref, ref_labels = DEGENERATE[name]
    x = x.astype(dtype)
    ref = None if ref is None else ref.astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in CONTRASTIVE_REDUCTIONS:
            for power in (1, 2):
                result = tripmine.contrastive_loss(x, labels, reduction=reduction, power=power,
                                                   ref=ref, ref_labels=ref_labels)
                if reduction == "none":
                    np.testing.assert_array_equal(result.loss, np.zeros(len(x)))
                else:
                    assert result.loss == 0.0 and isinstance(result.loss, float)
                assert (result.n_pairs, result.n_positive_pairs, result.n_negative_pairs,
                        result.n_active, result.fraction_active) == (0, 0, 0, 0, 0.0)
                _assert_grad_shapes(result, x, ref, dtype)
                assert not np.any(result.grad)


def test_contrastive_one_side_missing_is_not_nan():
    """One class (no negative pairs) or all singletons (no positive pairs):
    the missing side of mean_nonzero counts 0, never 0/0."""
    x = np.random.default_rng(1).standard_normal((5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in (np.zeros(5, dtype=np.int64), np.arange(5)):
            got = tripmine.contrastive_loss(x, labels, pos_margin=0.1, neg_margin=50.0)
            want = reference.contrastive_loss(x, labels, pos_margin=0.1, neg_margin=50.0)
            assert got.loss == pytest.approx(want.loss, rel=1e-12) and want.loss > 0


# ---- extreme values ---------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_identical_embeddings_give_finite_gradients(metric, normalize):
    """Every distance 0 (the kink of the euclidean norm): finite gradients and
    the reference loss (z = margin for every triplet)."""
    x = np.ones((8, 4))
    labels = np.arange(8) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted"):
            if mining == "distance_weighted" and (metric != "euclidean" or not normalize):
                continue
            result = tripmine.triplet_loss(x, labels, mining=mining, metric=metric,
                                           normalize=normalize, margin=0.3, seed=0)
            assert np.all(np.isfinite(result.grad)), mining
            assert result.loss == pytest.approx(0.3, rel=1e-12), mining
            for power in (1, 2):
                result = tripmine.contrastive_loss(x, labels, metric=metric, power=power,
                                                   normalize=normalize, pos_margin=0.0,
                                                   neg_margin=0.5)
                assert np.all(np.isfinite(result.grad))
                want = reference.contrastive_loss(x, labels, metric=metric, power=power,
                                                  normalize=normalize, neg_margin=0.5)
                assert result.loss == pytest.approx(want.loss, rel=1e-12)


def test_cosine_zero_vector_gradient_is_zero():
    """A zero row has cosine distance 1 to everything, constant: its gradient is 0."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3))
    x[3] = 0.0
    labels = np.arange(8) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for normalize in (False, True):
            for mining in ("batch_hard", "batch_all", "semi_hard"):
                result = tripmine.triplet_loss(x, labels, mining=mining, metric="cosine",
                                               normalize=normalize, margin=1.5)
                assert np.all(np.isfinite(result.grad)) and not np.any(result.grad[3])
            result = tripmine.contrastive_loss(x, labels, metric="cosine", normalize=normalize,
                                               neg_margin=1.5)
            assert np.all(np.isfinite(result.grad)) and not np.any(result.grad[3])


def _triplets_of(result, labels):
    """The triplets a loss used: its own, or every valid one for batch-all."""
    if result.triplets is None:
        return reference.batch_all_triplets(labels)
    return result.triplets


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_huge_margin_is_finite(dtype, soft):
    """margin 1e30: loss ~1e30 (finite, also softplus), finite gradients."""
    x, labels, _, _ = loss_batch(np.random.default_rng(3), "self", dtype)
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        for reduction in ("mean", "sum", "mean_nonzero"):
            result = tripmine.triplet_loss(x, labels, mining=mining, margin=1e30, soft=soft,
                                           reduction=reduction)
            _, losses = reference.triplet_losses(x, _triplets_of(result, labels), margin=1e30,
                                                 soft=soft)
            assert np.isfinite(result.loss) and np.all(np.isfinite(result.grad))
            assert result.loss == pytest.approx(reference.reduce(losses, reduction), rel=1e-6)
    want = reference.contrastive_loss(x, labels, neg_margin=1e30, power=2, reduction="sum").loss
    if dtype == np.float32:  # ~1e62: beyond float32, so refused (README, "Range")
        with pytest.raises(FloatingPointError, match="beyond float32"):
            tripmine.contrastive_loss(x, labels, neg_margin=1e30, power=2, reduction="sum")
        return
    result = tripmine.contrastive_loss(x, labels, neg_margin=1e30, power=2, reduction="sum")
    assert result.loss == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_huge_distances_are_finite(metric):
    """Embeddings ~1e15 (float64): distances up to ~1e31 still give finite,
    accurate losses and finite gradients, also with soft=True and z ~ -1e15."""
    rng = np.random.default_rng(4)
    x = 1e15 * rng.standard_normal((12, 4))
    labels = np.arange(12) // 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mining in ("batch_hard", "batch_all", "semi_hard"):
            for soft in (False, True):
                result = tripmine.triplet_loss(x, labels, mining=mining, metric=metric,
                                               soft=soft, reduction="sum")
                _, losses = reference.triplet_losses(x, _triplets_of(result, labels), soft=soft,
                                                     metric=metric)
                assert np.isfinite(result.loss) and np.all(np.isfinite(result.grad))
                assert result.loss == pytest.approx(losses.sum(), rel=1e-6, abs=1e-6)
        for power in (1, 2):
            result = tripmine.contrastive_loss(x, labels, metric=metric, power=power,
                                               pos_margin=0.0, neg_margin=1e16,
                                               reduction="sum")
            want = reference.contrastive_loss(x, labels, metric=metric, power=power,
                                              neg_margin=1e16, reduction="sum")
            assert np.all(np.isfinite(result.grad))
            assert result.loss == pytest.approx(want.loss, rel=1e-6)


# ---- inputs are never modified ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_inputs_are_not_modified(rng, dtype):
    """No loss writes into x, ref, labels or given triplets (normalize included)."""
    x, labels, ref, ref_labels = loss_batch(rng, "ref", np.float64)
    x, ref = x.astype(dtype), ref.astype(dtype)
    x_f = np.asfortranarray(x)  # a layout that must be copied, never written
    triplets = tripmine.Triplets(np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))
    inputs = (x, x_f, ref, labels, ref_labels, *triplets)
    before = [a.copy() for a in inputs]
    for normalize in (False, True):
        kw = dict(ref=ref, ref_labels=ref_labels, normalize=normalize)
        for mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted", triplets):
            if mining == "distance_weighted" and not normalize:
                continue  # needs unit-norm rows
            tripmine.triplet_loss(x, labels, mining=mining, seed=0, **kw)
            tripmine.triplet_loss(x_f, labels, mining=mining, seed=0, **kw)
        tripmine.contrastive_loss(x, labels, **kw)
        tripmine.contrastive_loss(x_f, labels, power=2, **kw)
    for after, was in zip(inputs, before):
        np.testing.assert_array_equal(after, was)


# ---- bad input ---------------------------------------------------------------

X = np.arange(12, dtype=np.float64).reshape(4, 3) / 10
LABELS = np.array([0, 0, 1, 1])
REF = np.arange(15, dtype=np.float64).reshape(5, 3) / 10
REF_LABELS = np.array([0, 1, 1, 0, 2])
UNIT = X / np.linalg.norm(X, axis=1, keepdims=True)


def _nan(a, value=np.nan):
    a = a.copy()
    a[1, 1] = value
    return a


def _triplets(anchor, positive, negative):
    return tripmine.Triplets(np.array(anchor), np.array(positive), np.array(negative))


def _tl(**kw):
    return lambda: tripmine.triplet_loss(X, LABELS, **kw)


def _cl(**kw):
    return lambda: tripmine.contrastive_loss(X, LABELS, **kw)


# (id, callable, exception type, regex the message must match: it names the argument)
BAD = [
    ("triplet negative margin", _tl(margin=-0.1), ValueError, r"margin"),
    ("semi_hard negative margin", lambda: tripmine.semi_hard(X, LABELS, margin=-1.0),
     ValueError, r"margin"),
    ("negative pos_margin", _cl(pos_margin=-1.0), ValueError, r"pos_margin"),
    ("negative neg_margin", _cl(neg_margin=-1.0), ValueError, r"neg_margin"),
    ("unknown mining", _tl(mining="hardest"), ValueError, r"mining"),
    ("unknown reduction", _tl(reduction="avg"), ValueError, r"reduction"),
    ("contrastive has no auto", _cl(reduction="auto"), ValueError, r"reduction"),
    ("contrastive unknown reduction", _cl(reduction="max"), ValueError, r"reduction"),
    ("unknown select", lambda: tripmine.semi_hard(X, LABELS, select="hardest"), ValueError,
     r"select"),
    ("triplet unknown metric", _tl(metric="manhattan"), ValueError, r"metric"),
    ("contrastive unknown metric", _cl(metric="manhattan"), ValueError, r"metric"),
    ("batch_hard unknown metric", lambda: tripmine.batch_hard(X, LABELS, metric="l1"),
     ValueError, r"metric"),
    ("semi_hard unknown metric", lambda: tripmine.semi_hard(X, LABELS, metric="l1"),
     ValueError, r"metric"),
    ("distance_weighted cosine", lambda: tripmine.distance_weighted(UNIT, LABELS,
                                                                     metric="cosine"),
     ValueError, r"metric"),
    ("power 3", _cl(power=3), ValueError, r"power"),
    ("power 0", _cl(power=0), ValueError, r"power"),
    ("power 1.5", _cl(power=1.5), ValueError, r"power"),
    ("cutoff 0", lambda: tripmine.distance_weighted(UNIT, LABELS, cutoff=0.0), ValueError,
     r"\bcutoff"),
    ("cutoff negative", lambda: tripmine.distance_weighted(UNIT, LABELS, cutoff=-0.5),
     ValueError, r"\bcutoff"),
    ("nonzero_loss_cutoff 0",
     lambda: tripmine.distance_weighted(UNIT, LABELS, nonzero_loss_cutoff=0.0), ValueError,
     r"nonzero_loss_cutoff"),
    ("max_triplets negative", lambda: tripmine.semi_hard(X, LABELS, max_triplets=-1),
     ValueError, r"max_triplets"),
    ("labels length", lambda: tripmine.triplet_loss(X, LABELS[:3]), ValueError, r"labels"),
    ("batch_hard labels length", lambda: tripmine.batch_hard(X, [0, 1, 0, 1, 2]), ValueError,
     r"labels"),
    ("contrastive labels length", lambda: tripmine.contrastive_loss(X, LABELS[:2]), ValueError,
     r"labels"),
    ("ref_labels length", _tl(ref=REF, ref_labels=REF_LABELS[:4]), ValueError, r"ref_labels"),
    ("semi_hard ref_labels length",
     lambda: tripmine.semi_hard(X, LABELS, ref=REF, ref_labels=REF_LABELS[:2]), ValueError,
     r"ref_labels"),
    ("ref without ref_labels", _tl(ref=REF), ValueError, r"ref_labels"),
    ("ref_labels without ref", _tl(ref_labels=REF_LABELS), ValueError, r"\bref\b"),
    ("contrastive ref without ref_labels", _cl(ref=REF), ValueError, r"ref_labels"),
    ("batch_hard ref without ref_labels", lambda: tripmine.batch_hard(X, LABELS, ref=REF),
     ValueError, r"ref_labels"),
    ("D mismatch", _tl(ref=REF[:, :2], ref_labels=REF_LABELS), ValueError,
     r"ref has 2 features"),
    ("contrastive D mismatch", _cl(ref=REF[:, :2], ref_labels=REF_LABELS), ValueError,
     r"ref has 2 features"),
    ("x NaN", lambda: tripmine.triplet_loss(_nan(X), LABELS), ValueError,
     r"x contains NaN.*check_finite=False"),
    ("x inf", lambda: tripmine.contrastive_loss(_nan(X, np.inf), LABELS), ValueError,
     r"x contains NaN or infinity"),
    ("ref NaN", _tl(ref=_nan(REF), ref_labels=REF_LABELS), ValueError, r"ref contains NaN"),
    ("miner x NaN", lambda: tripmine.batch_hard(_nan(X), LABELS), ValueError,
     r"x contains NaN"),
    ("triplets unequal lengths", _tl(mining=_triplets([0, 1], [1, 0], [2])), ValueError,
     r"mining"),
    ("triplets anchor out of range", _tl(mining=_triplets([4], [1], [2])), ValueError,
     r"mining"),
    ("triplets negative index", _tl(mining=_triplets([0], [1], [-1])), ValueError, r"mining"),
    ("triplets ref index out of range",
     _tl(mining=_triplets([0], [5], [2]), ref=REF, ref_labels=REF_LABELS), ValueError,
     r"mining"),
    ("seed negative", lambda: tripmine.semi_hard(X, LABELS, select="random", seed=-1),
     ValueError, r"seed"),
    ("seed float", lambda: tripmine.semi_hard(X, LABELS, select="random", seed=1.5), TypeError,
     r"seed"),
    ("seed string", _tl(mining="distance_weighted", normalize=True, seed="7"), TypeError,
     r"seed"),
    ("distance_weighted seed negative",
     lambda: tripmine.distance_weighted(UNIT, LABELS, seed=-3), ValueError, r"seed"),
    ("x int", lambda: tripmine.triplet_loss(X.astype(int), LABELS), TypeError,
     r"x must be a float"),
    ("miner x int", lambda: tripmine.semi_hard(X.astype(np.int32), LABELS), TypeError,
     r"x must be a float"),
    ("contrastive x 1-D", lambda: tripmine.contrastive_loss(X[0], LABELS[:1]), ValueError,
     r"x must be 2-D"),
    ("ref int", _cl(ref=REF.astype(int), ref_labels=REF_LABELS), TypeError,
     r"ref must be a float"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_table(case):
    """Each bad argument raises the documented exception naming that argument."""
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_check_finite_false_skips_the_check():
    """check_finite=False lets non-finite values through instead of raising ValueError; the
    results are then undefined: NaN values, or FloatingPointError for a gradient that
    carries them (the C core scans every gradient it returns)."""
    tripmine.triplet_loss(_nan(X), LABELS, check_finite=False)
    with pytest.raises(FloatingPointError, match="check_finite=False"):
        tripmine.contrastive_loss(_nan(X), LABELS, check_finite=False)
    assert tripmine.contrastive_loss(_nan(X), LABELS, check_finite=False,
                                     grad=False).n_pairs == 12  # the loss alone: no scan
    tripmine.batch_hard(_nan(X), LABELS, check_finite=False)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_batch_all_with_small_and_large_classes(rng, metric, mode):
    """Anchors with few positives (linear scan) and with many (over 16: sorted
    search) in one batch: loss, counts and gradient (central differences)."""
    n, d = 48, 4
    labels = np.concatenate([np.zeros(24, dtype=np.int64), np.repeat(np.arange(1, 9), 3)])
    x = rng.standard_normal((n, d))
    ref = ref_labels = None
    if mode == "ref":
        ref, ref_labels = rng.standard_normal((40, d)), np.concatenate(
            [np.zeros(20, dtype=np.int64), np.repeat(np.arange(1, 11), 2)])
    want = reference.batch_all_loss(x, labels, margin=0.3, metric=metric, reduction="sum",
                                    ref=ref, ref_labels=ref_labels)
    got = tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels, mining="batch_all",
                                margin=0.3, metric=metric, reduction="sum")
    assert got.loss == pytest.approx(want.loss, rel=1e-10)
    assert (got.n_triplets, got.n_active) == (want.n_triplets, want.n_active)
    assert 0 < got.n_active < got.n_triplets

    def loss_at(xx, rr):
        return tripmine.triplet_loss(xx, labels, ref=rr, ref_labels=ref_labels,
                                     mining="batch_all", margin=0.3, metric=metric,
                                     reduction="sum").loss

    h = 1e-6
    for name, base in [("x", x)] + ([("ref", ref)] if ref is not None else []):
        numeric = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += h
            down[idx] -= h
            if name == "x":
                numeric[idx] = (loss_at(up, ref) - loss_at(down, ref)) / (2 * h)
            else:
                numeric[idx] = (loss_at(x, up) - loss_at(x, down)) / (2 * h)
        analytic = got.grad if name == "x" else got.ref_grad
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())
