"""Miners against the loop reference (tests/reference.py).

float64 triplets must equal the reference's exactly; float32 ones may differ
only where the reference's own (float64) distances tie within the float32
tolerance ("quasi-equality", as in scikit-learn's pairwise-distances-reduction
tests).  Random miners are checked for membership in the reference's candidate
sets, for their distribution (chi-square) and for seeded reproducibility on any
thread count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import reference
import tripmine
from checks import (
    assert_distance_weighted_valid,
    assert_quasi_equal,
    assert_random_choices_valid,
    assert_triplets_type,
    assert_window_quasi_equal,
    rows,
    tie_tolerance,
)
from conftest import FLOAT_DTYPES, METRICS

CASES = ("pxk", "random_labels", "one_class", "all_singletons", "duplicates",
         "near_duplicates", "grid")


# ---- batches ---------------------------------------------------------------


def _embeddings(case, rng, n, d):
    if case == "grid":  # small integers: many exactly tied distances
        return rng.integers(0, 3, size=(n, d)).astype(np.float64)
    if case == "near_duplicates":  # clusters of rows 1e-5 apart, across classes
        base = rng.standard_normal((6, d))
        return base[rng.integers(0, 6, n)] + 1e-5 * rng.standard_normal((n, d))
    x = rng.standard_normal((n, d))
    if case == "duplicates":
        x[rng.integers(0, n, n // 3)] = x[rng.integers(0, n, n // 3)]
    return x


def _labels(case, rng, n, offset=0):
    if case == "one_class":
        return np.zeros(n, dtype=np.int64)
    if case == "all_singletons":
        return np.arange(n) + offset
    if case in ("pxk", "duplicates"):
        return rng.permutation(np.arange(n) // 4)  # P x K with K = 4
    labels = rng.integers(0, 5, n)
    labels[:3] = 100 + offset + np.arange(3)  # a few singleton classes
    return labels


def make_batch(case, mode, dtype, rng):
    """(x, labels, ref, ref_labels) of one layout; ref mode is a memory bank of
    another size that holds copies of some rows of x (distance 0, positives)."""
    d = 3 if case == "grid" else 5
    if mode == "self":
        n = 24
        return _embeddings(case, rng, n, d).astype(dtype), _labels(case, rng, n), None, None
    n, m = 13, 40
    x, labels = _embeddings(case, rng, n, d), _labels(case, rng, n)
    ref, ref_labels = _embeddings(case, rng, m, d), _labels(case, rng, m, offset=1000)
    if case != "all_singletons":
        slots = rng.choice(m, 5, replace=False)
        ref[slots], ref_labels[slots] = x[:5], labels[:5]
    return x.astype(dtype), labels, ref.astype(dtype), ref_labels


def _window_margin(case, metric, normalize, dist):
    if case == "grid" and metric != "cosine" and not normalize:
        return 1.0  # integer distances: d(a,n) == d(a,p) + margin happens exactly
    off_diagonal = dist[dist > 0]
    return float(np.round(0.3 * np.median(off_diagonal), 2)) if off_diagonal.size else 0.2


# ---- every miner against the reference --------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_miners_match_reference(rng, case, mode, normalize, metric, dtype):
    """batch_hard, semi_hard closest/all/random (and distance_weighted where it
    applies) reproduce the loop reference on every label layout."""
    x, labels, ref, ref_labels = make_batch(case, mode, dtype, rng)
    kw = dict(ref=ref, ref_labels=ref_labels, metric=metric, normalize=normalize)
    dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
    tol = tie_tolerance(dtype, x.shape[1], metric, normalize, case)
    margin = _window_margin(case, metric, normalize, dist)

    want, _ = reference.batch_hard(x, labels, **kw)
    assert_quasi_equal(tripmine.batch_hard(x, labels, **kw), want, dist, tol, pos, neg)

    want, _ = reference.semi_hard_closest(x, labels, **kw)
    got = tripmine.semi_hard(x, labels, margin=margin, select="closest", **kw)
    assert_quasi_equal(got, want, dist, tol, pos, neg, boundary=dist[want[0], want[1]])

    want, _ = reference.semi_hard_all(x, labels, margin=margin, **kw)
    got = tripmine.semi_hard(x, labels, margin=margin, select="all", **kw)
    assert_window_quasi_equal(got, want, dist, tol, margin)

    pairs, _ = reference.semi_hard_random_candidates(x, labels, margin=margin, **kw)
    got = tripmine.semi_hard(x, labels, margin=margin, select="random", seed=7, **kw)
    assert_random_choices_valid(got, pairs, dist, tol, margin, pos, neg)

    if metric == "euclidean" and normalize:
        del kw["metric"]
        probabilities, _ = reference.distance_weighted_probabilities(x, labels, **kw)
        got = tripmine.distance_weighted(x, labels, seed=7, **kw)
        assert_distance_weighted_valid(got, probabilities, dist, pos, neg, tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_isa_matches_reference(isa, rng, dtype):
    """The SIMD micro-kernels mine the same triplets as the reference."""
    x, labels, _, _ = make_batch("pxk", "self", dtype, rng)
    x = np.repeat(x, 3, axis=1)  # wider than one SIMD vector
    for metric in METRICS:
        dist, pos, neg = reference.mining_distances(x, labels, metric=metric)
        tol = tie_tolerance(dtype, x.shape[1], metric, False, "pxk")
        want, _ = reference.batch_hard(x, labels, metric=metric)
        assert_quasi_equal(tripmine.batch_hard(x, labels, metric=metric), want, dist, tol,
                           pos, neg)
        want, _ = reference.semi_hard_closest(x, labels, metric=metric)
        got = tripmine.semi_hard(x, labels, metric=metric)
        assert_quasi_equal(got, want, dist, tol, pos, neg, boundary=dist[want[0], want[1]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_ties_go_to_the_lowest_reference_index(dtype, mode):
    """Exactly tied positives and negatives: the lowest index wins, in both modes."""
    x = np.array([[0.0], [1.0], [-1.0], [2.0], [-2.0]], dtype=dtype)
    labels = np.array([0, 0, 0, 1, 1])
    if mode == "self":
        got = tripmine.batch_hard(x, labels)
        assert rows(got)[0] == (0, 1, 3)
        got = tripmine.semi_hard(x, labels, margin=5.0, select="closest")
        # Anchor 0, positive 1 (d = 1): negatives 3 and 4 tie at d = 2.
        assert rows(got)[0] == (0, 1, 3)
    else:
        # ref = [-2, 2, -1, 1, 0]: for the anchor 0, the positives -1 and 1 (indices
        # 2, 3) tie at 1, and so do the negatives -2 and 2 (indices 0, 1) at 2.
        ref, ref_labels = x[::-1].copy(), labels[::-1].copy()
        got = tripmine.batch_hard(x[:1], labels[:1], ref=ref, ref_labels=ref_labels)
        assert rows(got) == [(0, 2, 0)]
        want, _ = reference.batch_hard(x[:1], labels[:1], ref=ref, ref_labels=ref_labels)
        assert rows(want) == [(0, 2, 0)]


def test_string_labels_equal_integer_labels(rng):
    """Labels are classes, whatever their type."""
    x = rng.standard_normal((20, 4))
    codes = rng.integers(0, 4, 20)
    names = np.array(["cat", "dog", "emu", "fox"])[codes]
    for miner in (tripmine.batch_hard, tripmine.semi_hard):
        assert rows(miner(x, names)) == rows(miner(x, codes))


def test_float16_mines_like_float32(rng):
    """float16 input is mined in float32."""
    x16 = rng.standard_normal((30, 6)).astype(np.float16)
    labels = rng.integers(0, 5, 30)
    assert rows(tripmine.batch_hard(x16, labels)) == rows(
        tripmine.batch_hard(x16.astype(np.float32), labels))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches_give_empty_triplets(n):
    """N = 0 and N = 1 give empty int64 Triplets from every miner."""
    x = np.ones((n, 3))
    labels = np.zeros(n, dtype=np.int64)
    for got in (tripmine.batch_hard(x, labels), tripmine.semi_hard(x, labels),
                tripmine.semi_hard(x, labels, select="all"),
                tripmine.semi_hard(x, labels, select="random", seed=0),
                tripmine.distance_weighted(x / np.sqrt(3), labels, seed=0)):
        assert_triplets_type(got)
        assert len(got.anchor) == 0


def test_inputs_are_not_modified(rng):
    """Miners never write into x, ref or the labels (normalize included)."""
    x = rng.standard_normal((20, 4)).astype(np.float32)
    ref = rng.standard_normal((30, 4)).astype(np.float32)
    labels, ref_labels = rng.integers(0, 3, 20), rng.integers(0, 3, 30)
    before = [a.copy() for a in (x, ref, labels, ref_labels)]
    kw = dict(ref=ref, ref_labels=ref_labels, normalize=True)
    tripmine.batch_hard(x, labels, **kw)
    tripmine.semi_hard(x, labels, select="all", **kw)
    tripmine.distance_weighted(x, labels, seed=1, **kw)
    for a, b in zip((x, ref, labels, ref_labels), before):
        np.testing.assert_array_equal(a, b)


# ---- semi_hard random and max_triplets --------------------------------------


def _semi_hard_batch(rng, n=60, d=4):
    x = rng.standard_normal((n, d))
    return x, rng.integers(0, 4, n)


def test_semi_hard_random_is_seeded(rng):
    """Same seed, same triplets; another seed, other triplets; None, fresh ones."""
    x, labels = _semi_hard_batch(rng)
    first = tripmine.semi_hard(x, labels, margin=1.0, select="random", seed=3)
    assert len(first.anchor) > 50
    assert rows(tripmine.semi_hard(x, labels, margin=1.0, select="random", seed=3)) == rows(first)
    assert rows(tripmine.semi_hard(x, labels, margin=1.0, select="random", seed=4)) != rows(first)
    fresh = [rows(tripmine.semi_hard(x, labels, margin=1.0, select="random")) for _ in range(2)]
    assert fresh[0] != fresh[1]


def test_semi_hard_random_is_uniform_over_the_window():
    """Pooled over 1500 identical positives of one anchor (independent draws,
    keyed on the positive index) the negatives are uniform over the window."""
    n_positives = 1500
    anchor = np.zeros((1, 2))
    window = [1.02, 1.06, 1.1, 1.15]       # inside (1, 1.2)
    outside = [0.5, 0.95, 1.0, 1.25, 1.5]  # below, on the lower edge, above
    ref = np.array([[1.0, 0.0]] * n_positives + [[d, 0.0] for d in window + outside])
    ref_labels = np.array([0] * n_positives + [1] * (len(window) + len(outside)))
    got = tripmine.semi_hard(anchor, [0], ref=ref, ref_labels=ref_labels, margin=0.2,
                             select="random", seed=0)
    assert len(got.anchor) == n_positives
    counts = np.bincount(got.negative - n_positives, minlength=len(window) + len(outside))
    assert counts[len(window):].sum() == 0
    assert stats.chisquare(counts[:len(window)]).pvalue > 1e-3


@pytest.mark.parametrize("select", ["closest", "all", "random"])
def test_max_triplets_keeps_an_ordered_subset(rng, select):
    """At most max_triplets triplets, in the uncapped order, from the uncapped set."""
    x, labels = _semi_hard_batch(rng)
    full = rows(tripmine.semi_hard(x, labels, margin=1.0, select=select, seed=5))
    assert len(full) > 40
    for cap in (0, 1, 17, len(full) - 1):
        capped = tripmine.semi_hard(x, labels, margin=1.0, select=select, seed=5,
                                    max_triplets=cap)
        assert_triplets_type(capped)
        position = {row: i for i, row in enumerate(full)}
        positions = [position[row] for row in rows(capped)]  # KeyError: not a subset
        assert len(positions) == cap and positions == sorted(set(positions))
    for cap in (len(full), len(full) + 100):
        got = tripmine.semi_hard(x, labels, margin=1.0, select=select, seed=5, max_triplets=cap)
        assert rows(got) == full


def test_max_triplets_subset_is_seeded_and_uniform(rng):
    """The kept subset depends on the seed only, and every triplet is kept
    with the same probability max_triplets / total."""
    x, labels = _semi_hard_batch(rng, n=12)
    full = rows(tripmine.semi_hard(x, labels, margin=1.0, select="all"))
    cap, n_seeds = 5, 300
    assert len(full) >= 4 * cap
    kept = np.zeros(len(full))
    subsets = set()
    for seed in range(n_seeds):
        got = rows(tripmine.semi_hard(x, labels, margin=1.0, select="all", seed=seed,
                                      max_triplets=cap))
        if seed < 10:
            assert got == rows(tripmine.semi_hard(x, labels, margin=1.0, select="all",
                                                   seed=seed, max_triplets=cap))
        subsets.add(tuple(got))
        for row in got:
            kept[full.index(row)] += 1
    assert len(subsets) > n_seeds // 2
    # Each count is Binomial(300, cap / total): allow 5 standard deviations.
    p = cap / len(full)
    assert np.all(np.abs(kept - n_seeds * p) < 5 * math.sqrt(n_seeds * p * (1 - p)) + 1)


# ---- distance_weighted ------------------------------------------------------


def _on_circle(distances, dim):
    """Unit vectors at the given chord distances from e1 (in the e1-e2 plane)."""
    out = np.zeros((len(distances), dim))
    for i, d in enumerate(distances):
        cos = 1 - d * d / 2
        out[i, 0], out[i, 1] = cos, math.sqrt(1 - cos * cos)
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_distance_weighted_matches_the_analytic_distribution(dtype):
    """Chi-square goodness of fit, pooled over 3000 identical positives of one
    anchor: frequencies follow w(d) of Wu et al. (dim 4, cutoff 0.5, 1.4)."""
    n_positives, dim = 3000, 4
    negatives = [0.2, 0.6, 0.9, 1.2, 1.35, 1.45, 1.8]  # 0.2 clipped; the last two weigh 0
    ref = np.vstack([np.repeat(_on_circle([0.3], dim), n_positives, axis=0),
                     _on_circle(negatives, dim)]).astype(dtype)
    ref_labels = np.array([0] * n_positives + [1] * len(negatives))
    anchor = _on_circle([0.0], dim).astype(dtype)
    probabilities, _ = reference.distance_weighted_probabilities(
        anchor, [0], ref=ref, ref_labels=ref_labels)
    expected = probabilities[0, n_positives:]
    assert expected[-2:].sum() == 0 and np.all(expected[:-2] > 0.05)

    got = tripmine.distance_weighted(anchor, [0], ref=ref, ref_labels=ref_labels, seed=0)
    assert np.all(got.anchor == 0)
    np.testing.assert_array_equal(got.positive, np.arange(n_positives))
    counts = np.bincount(got.negative - n_positives, minlength=len(negatives))
    assert counts[-2:].sum() == 0
    assert stats.chisquare(counts[:-2], n_positives * expected[:-2]).pvalue > 1e-3


def test_distance_weighted_pooled_over_seeds_on_a_random_batch():
    """Pooled over seeds 0..399, anchor 0's negatives follow the reference's
    probabilities on a random unit-norm batch (many negatives, dim 3)."""
    rng = np.random.default_rng(12)
    x = reference.normalize_rows(rng.standard_normal((16, 3)))
    labels = np.array([0, 0] + [1, 2, 3, 4, 5, 6, 7] * 2)
    probabilities, _ = reference.distance_weighted_probabilities(x, labels)
    expected = probabilities[0]
    counts = np.zeros(len(x))
    n_seeds = 400
    for seed in range(n_seeds):
        got = tripmine.distance_weighted(x, labels, seed=seed)
        counts[got.negative[got.anchor == 0]] += 1
    support = expected > 0
    assert counts[~support].sum() == 0 and support.sum() >= 4
    assert stats.chisquare(counts[support], n_seeds * expected[support]).pvalue > 1e-3


def test_distance_weighted_requires_unit_norm_rows(rng):
    """Rows off the unit sphere by more than 1e-3 are refused (unless normalize)."""
    x = reference.normalize_rows(rng.standard_normal((10, 3)))
    labels = rng.integers(0, 3, 10)
    tripmine.distance_weighted(x * (1 + 5e-4), labels, seed=0)  # within tolerance
    bad = x.copy()
    bad[4] *= 1.01
    with pytest.raises(ValueError, match="normalize=True"):
        tripmine.distance_weighted(bad, labels, seed=0)
    with pytest.raises(ValueError, match="normalize=True"):
        tripmine.distance_weighted(x, labels, ref=bad, ref_labels=labels, seed=0)
    got = tripmine.distance_weighted(bad, labels, seed=0, normalize=True)
    assert rows(got) == rows(tripmine.distance_weighted(x, labels, seed=0))
    with pytest.raises(ValueError, match="metric"):
        tripmine.distance_weighted(x, labels, metric="cosine", seed=0)


def test_distance_weighted_is_seeded(rng):
    """Same seed, same draws; another seed or None, other draws."""
    x = reference.normalize_rows(rng.standard_normal((60, 3)))
    labels = rng.integers(0, 4, 60)
    first = rows(tripmine.distance_weighted(x, labels, seed=11))
    assert rows(tripmine.distance_weighted(x, labels, seed=11)) == first
    assert rows(tripmine.distance_weighted(x, labels, seed=12)) != first
    fresh = [rows(tripmine.distance_weighted(x, labels)) for _ in range(2)]
    assert fresh[0] != fresh[1]


# ---- threads ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_identical_for_one_and_two_threads(threads, rng, dtype, mode):
    """Every miner, seeded ones included, returns the same triplets on 1 and 2 threads."""
    n, m, d = 300, 420, 8
    x = reference.normalize_rows(rng.standard_normal((n, d))).astype(dtype)
    labels = rng.integers(0, 30, n)
    kw = {} if mode == "self" else dict(
        ref=reference.normalize_rows(rng.standard_normal((m, d))).astype(dtype),
        ref_labels=rng.integers(0, 30, m))
    calls = [
        lambda: tripmine.batch_hard(x, labels, **kw),
        lambda: tripmine.semi_hard(x, labels, **kw),
        lambda: tripmine.semi_hard(x, labels, margin=0.3, select="random", seed=9, **kw),
        lambda: tripmine.semi_hard(x, labels, margin=0.3, select="all", max_triplets=500,
                                   seed=9, **kw),
        lambda: tripmine.distance_weighted(x, labels, seed=9, **kw),
    ]
    results = {}
    for count in (1, 2):
        tripmine.set_num_threads(count)
        results[count] = [rows(call()) for call in calls]
    for one, two in zip(results[1], results[2]):
        assert len(one) > 100 and one == two
