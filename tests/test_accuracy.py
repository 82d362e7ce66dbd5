"""float32 accuracy where the Gram identity cancels: near-duplicate embeddings.

Rows near a common centre (norm ~10) with same-class rows ~1e-4 apart and other classes
~3e-4 away: ||x||^2 + ||r||^2 - 2 x.r loses every significant digit of such distances in
float32 (the check below shows NumPy's Gram trick getting them wrong), yet tripmine's
distances, mined losses and dense losses stay accurate to a few float32 ulps of the
distances, because near pairs are recomputed by direct difference in double.
The float64 reference sees exactly the float32 values tripmine sees.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine

EPS32 = float(np.finfo(np.float32).eps)


def _near_duplicates(rng, n_classes=8, per_class=4, d=16):
    centre = 10.0 * rng.standard_normal(d) / np.sqrt(d)
    class_offsets = 3e-4 * rng.standard_normal((n_classes, d)) / np.sqrt(d)
    rows = (centre + np.repeat(class_offsets, per_class, axis=0)
            + 1e-4 * rng.standard_normal((n_classes * per_class, d)) / np.sqrt(d))
    x = rows.astype(np.float32)
    labels = np.repeat(np.arange(n_classes), per_class)
    return x, labels


def test_the_gram_identity_really_cancels_here(rng):
    """Guard: without the exact recomputation these inputs are hopeless in float32."""
    x, _ = _near_duplicates(rng)
    exact = reference.pairwise_distances(x.astype(np.float64), None, "euclidean")
    sq = (x * x).sum(1)
    gram = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0))
    off = ~np.eye(len(x), dtype=bool)
    assert np.max(np.abs(gram - exact)[off] / exact[off]) > 0.1


def test_distances_are_accurate(rng):
    x, _ = _near_duplicates(rng)
    exact = reference.pairwise_distances(x.astype(np.float64), None, "euclidean")
    got = tripmine.pairwise_distances(x)
    np.testing.assert_allclose(got, exact, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "batch_all"])
def test_triplet_losses_are_accurate(rng, mining):
    x, labels = _near_duplicates(rng)
    margin = 2e-4  # of the order of the distances: the hinge is active for many triplets
    got = tripmine.triplet_loss(x, labels, mining=mining, margin=margin, reduction="sum")
    x64 = x.astype(np.float64)
    if mining == "batch_all":
        want = reference.batch_all_loss(x64, labels, margin=margin, reduction="sum").loss
    else:
        _, losses = reference.triplet_losses(x64, got.triplets, margin=margin)
        want = float(np.sum(losses))
    assert want > 0
    # Each term is d(a,p) - d(a,n) + margin with distances ~1e-4 accurate to a few ulps.
    n_terms = max(got.n_active, 1)
    assert abs(got.loss - want) <= 8 * EPS32 * 1e-3 * n_terms


def test_contrastive_loss_is_accurate(rng):
    x, labels = _near_duplicates(rng)
    got = tripmine.contrastive_loss(x, labels, neg_margin=5e-4, reduction="sum")
    want = reference.contrastive_loss(x.astype(np.float64), labels, neg_margin=5e-4,
                                      reduction="sum").loss
    assert want > 0
    assert got.loss == pytest.approx(want, rel=16 * EPS32)


def test_mined_triplets_match_float64_mining(rng):
    """The mining decisions themselves (argmax/argmin over ~1e-4 distances) are right."""
    x, labels = _near_duplicates(rng)
    got = tripmine.batch_hard(x, labels)
    want, _ = reference.batch_hard(x.astype(np.float64), labels)
    for mine, oracle in zip(got, want):  # anchor, positive, negative
        np.testing.assert_array_equal(mine, oracle)
