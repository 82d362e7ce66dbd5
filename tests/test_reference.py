"""The oracle checked on its own: hand-computed tiny batches and brute-force
cross-checks between independent formulations (no tripmine code involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference

# 1-D points: distances are |x_i - x_j|, easy to verify by hand.
LINE = np.array([[0.0], [1.0], [3.0], [4.0], [10.0]])
LINE_LABELS = [0, 0, 1, 1, 0]


def _rows(triplets):
    return [tuple(int(v) for v in row) for row in zip(*triplets)]


def test_batch_hard_by_hand():
    """Farthest positive, closest negative, on 1-D points checked by hand."""
    triplets, dist = reference.batch_hard(LINE, LINE_LABELS)
    assert _rows(triplets) == [(0, 4, 2), (1, 4, 2), (2, 3, 1), (3, 2, 1), (4, 0, 3)]
    assert dist[0, 4] == 10 and dist[4, 3] == 6


def test_semi_hard_closest_by_hand():
    """Closest farther negative, else the farthest one (TF-Addons rule)."""
    triplets, _ = reference.semi_hard_closest(LINE, LINE_LABELS)
    # (0, 4): no negative beyond d = 10, so the farthest negative (3, at 4).
    assert _rows(triplets) == [(0, 1, 2), (0, 4, 3), (1, 0, 2), (1, 4, 3), (2, 3, 1),
                               (3, 2, 1), (4, 0, 2), (4, 1, 2)]


def test_semi_hard_windows_by_hand():
    """The random window is open at d(a,p) + margin, the "all" window closed."""
    pairs, _ = reference.semi_hard_random_candidates(LINE, LINE_LABELS, margin=2.0)
    assert [(a, p, list(c)) for a, p, c in pairs] == [(1, 0, [2]), (2, 3, [1])]
    triplets, _ = reference.semi_hard_all(LINE, LINE_LABELS, margin=2.0)
    assert _rows(triplets) == [(0, 1, 2), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1),
                               (3, 2, 1)]


def test_ties_go_to_the_lowest_index():
    """Scanning j upwards with strict comparisons keeps the lowest tied index."""
    x = np.array([[0.0], [1.0], [-1.0], [2.0], [-2.0]])
    triplets, _ = reference.batch_hard(x, [0, 0, 0, 1, 1])
    # Anchor 0: positives 1 and 2 tie at 1, negatives 3 and 4 tie at 2.
    assert _rows(triplets)[0] == (0, 1, 3)


def test_ref_mode_keeps_the_diagonal():
    """In reference mode row i of ref is an ordinary row, even at distance 0."""
    triplets, _ = reference.batch_hard(LINE[:2], [0, 1], ref=LINE[:2], ref_labels=[0, 1])
    assert _rows(triplets) == [(0, 0, 1), (1, 1, 0)]
    triplets, _ = reference.batch_hard(LINE[:1], [0], ref=LINE[:3], ref_labels=[0, 1, 1])
    assert _rows(triplets) == [(0, 0, 1)]


def test_normalize_and_cosine():
    """normalize divides rows by their norm and keeps zero rows at zero."""
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(reference.normalize_rows(x), [[0.6, 0.8], [0, 0], [0, 1]])
    dist, _, _ = reference.mining_distances(x, [0, 0, 1], metric="euclidean", normalize=True)
    assert dist[0, 2] == pytest.approx(math.sqrt(0.36 + 0.04))
    assert dist[1, 2] == pytest.approx(1.0)


def test_triplet_losses_and_reductions_by_hand():
    """z, hinge, softplus and the reductions on hand-computed triplets."""
    triplets, _ = reference.batch_hard(LINE, LINE_LABELS)
    z, losses = reference.triplet_losses(LINE, triplets, margin=0.5)
    np.testing.assert_allclose(z, [7.5, 7.5, -0.5, -1.5, 4.5])
    np.testing.assert_allclose(losses, [7.5, 7.5, 0, 0, 4.5])
    assert reference.reduce(losses, "mean") == pytest.approx(3.9)
    assert reference.reduce(losses, "sum") == pytest.approx(19.5)
    assert reference.reduce(losses, "mean_nonzero") == pytest.approx(6.5)
    assert reference.reduce([], "mean") == 0 and reference.reduce([0.0], "mean_nonzero") == 0
    _, soft = reference.triplet_losses(LINE, triplets, margin=0.5, soft=True)
    np.testing.assert_allclose(soft, np.log1p(np.exp(z)))


def test_softplus_does_not_overflow():
    """softplus is exact at the extremes instead of overflowing."""
    assert reference.softplus(1e30) == 1e30
    assert reference.softplus(-1e30) == 0.0
    assert reference.softplus(0.0) == pytest.approx(math.log(2))


def test_batch_all_by_hand():
    """Batch-all enumerates every valid triplet; z == 0 is not active."""
    x, labels = LINE[:3], [0, 0, 1]
    got = reference.batch_all_loss(x, labels, margin=2.5)
    assert (got.loss, got.n_triplets, got.n_active) == (pytest.approx(1.0), 2, 2)
    np.testing.assert_allclose(got.z, [0.5, 1.5])
    per_anchor = reference.batch_all_loss(x, labels, margin=2.5, reduction="none").loss
    np.testing.assert_allclose(per_anchor, [0.5, 1.5, 0.0])
    # z = 1 - 3 + 2 = 0 exactly: a triplet on the kink is not active.
    assert reference.batch_all_loss(x, labels, margin=2.0).n_active == 1
    assert reference.batch_all_loss(x, labels, margin=0.5).n_active == 0


def test_batch_all_triplets_are_the_triplet_mask():
    """The enumeration is exactly the nonzeros of the (a, p, n) mask."""
    labels = np.random.default_rng(0).integers(0, 4, size=13)
    want = np.nonzero(reference.triplet_mask(labels))  # lexicographic (a, p, n) order
    got = reference.batch_all_triplets(labels)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("power, want", [
    (1, {"mean_nonzero": 1.0, "mean": 2 / 6, "sum": 2.0, "none": [0.5, 1.0, 0.5]}),
    (2, {"mean_nonzero": 0.5, "mean": 1 / 6, "sum": 1.0, "none": [0.25, 0.5, 0.25]}),
])
def test_contrastive_by_hand(power, want):
    """Contrastive terms, counts and every reduction on a 3-point batch."""
    for reduction, value in want.items():
        got = reference.contrastive_loss(LINE[:3], [0, 0, 1], pos_margin=0.5, neg_margin=2.5,
                                         power=power, reduction=reduction)
        np.testing.assert_allclose(got.loss, value)
        assert (got.n_positive_pairs, got.n_negative_pairs, got.n_active) == (2, 4, 4)


def _on_circle(distances, dim):
    """Unit vectors at the given chord distances from e1."""
    rows = []
    for d in distances:
        cos = 1 - d * d / 2
        row = np.zeros(dim)
        row[0], row[1] = cos, math.sqrt(1 - cos * cos)
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("dim, weight", [
    (3, lambda t: 1 / t),                      # (2 - 3) log t, and (3 - 3)/2 = 0
    (2, lambda t: math.sqrt(1 - t * t / 4)),   # 0 * log t, and -(-1/2) log(1 - t^2/4)
])
def test_distance_weighted_by_hand(dim, weight):
    """Sampling probabilities follow w(d) of Wu et al., cutoffs included."""
    ref = _on_circle([0.0, 0.3, 1.0, 1.2, 1.5], dim)
    probabilities, dist = reference.distance_weighted_probabilities(
        ref[:1], [0], ref=ref, ref_labels=[0, 1, 1, 1, 1])
    np.testing.assert_allclose(dist[0], [0.0, 0.3, 1.0, 1.2, 1.5], atol=1e-12)
    # The positive has weight 0; 0.3 is clipped to the cutoff 0.5; 1.5 >= 1.4.
    w = np.array([0.0, weight(0.5), weight(1.0), weight(1.2), 0.0])
    np.testing.assert_allclose(probabilities[0], w / w.sum(), rtol=1e-12)


def test_distance_weighted_skips_anchors_without_weight():
    """All negatives beyond nonzero_loss_cutoff: the anchor has no distribution."""
    ref = _on_circle([0.0, 1.6, 1.9], 3)
    probabilities, _ = reference.distance_weighted_probabilities(
        ref[:1], [0], ref=ref, ref_labels=[0, 1, 1])
    assert np.all(probabilities == 0)


def test_miners_agree_with_vectorised_numpy():
    """Brute force: the loop miners equal argmin/argmax over masked matrices
    (numpy's argmin/argmax also return the first of tied entries)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(30, 2)).astype(float)  # a small grid: many ties
    labels = rng.integers(0, 4, size=30)
    dist, pos, neg = reference.mining_distances(x, labels)
    triplets, _ = reference.batch_hard(x, labels)
    keep = pos.any(1) & neg.any(1)
    np.testing.assert_array_equal(triplets[0], np.nonzero(keep)[0])
    np.testing.assert_array_equal(triplets[1], np.argmax(np.where(pos, dist, -1), 1)[keep])
    np.testing.assert_array_equal(triplets[2], np.argmin(np.where(neg, dist, np.inf), 1)[keep])

    closest, _ = reference.semi_hard_closest(x, labels)
    for a, p, n in zip(*closest):
        farther = neg[a] & (dist[a] > dist[a, p])
        if farther.any():
            assert n == np.argmin(np.where(farther, dist[a], np.inf))
        else:
            assert n == np.argmax(np.where(neg[a], dist[a], -1))

    margin = 1.0
    everything, _ = reference.semi_hard_all(x, labels, margin=margin)
    a, p, n = np.nonzero(pos[:, :, None] & neg[:, None, :]
                         & (dist[:, None, :] > dist[:, :, None])
                         & (dist[:, None, :] <= dist[:, :, None] + margin))
    for got, want in zip(everything, (a, p, n)):
        np.testing.assert_array_equal(got, want)
    pairs, _ = reference.semi_hard_random_candidates(x, labels, margin=margin)
    for a, p, candidates in pairs:
        window = neg[a] & (dist[a] > dist[a, p]) & (dist[a] < dist[a, p] + margin)
        np.testing.assert_array_equal(candidates, np.nonzero(window)[0])
