"""Invariants of the miners and losses, checked with hypothesis on bounded
random batches: permutation, translation (euclidean), loss >= 0, seeding."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tripmine
from checks import rows

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
LOSS_MINING = ("batch_hard", "batch_all", "semi_hard")


@st.composite
def batches(draw, dtypes=(np.float64,)):
    """(x, labels, ref, ref_labels, rng): continuous random rows (no ties), 1-5
    classes, self mode or a reference set of another size."""
    n = draw(st.integers(2, 30))
    d = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    classes = draw(st.integers(1, 5))
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((n, d))).astype(dtype)
    labels = rng.integers(0, classes, n)
    if draw(st.booleans()):
        return x, labels, None, None, rng
    m = draw(st.integers(1, 40))
    ref = (scale * rng.standard_normal((m, d))).astype(dtype)
    return x, labels, ref, rng.integers(0, classes, m), rng


def _relabel(triplets, anchor_map, ref_map):
    """Triplet indices of a permuted batch mapped back to the original rows."""
    return {(int(anchor_map[a]), int(ref_map[p]), int(ref_map[n])) for a, p, n in rows(triplets)}


@SETTINGS
@given(batches(), st.sampled_from(["euclidean", "sqeuclidean", "cosine"]))
def test_permuting_the_batch_permutes_the_triplets(batch, metric):
    """Mining a permuted batch (and reference) gives the same triplets, relabelled,
    and the same loss."""
    x, labels, ref, ref_labels, rng = batch
    # In one dimension cosine distances are exactly 0 or 2: ties, which the
    # lowest-index rule breaks differently once the rows move.
    assume(not (metric == "cosine" and x.shape[1] == 1))
    perm = rng.permutation(len(x))
    ref_perm = None if ref is None else rng.permutation(len(ref))
    kw = dict(metric=metric)
    permuted = dict(ref=None if ref is None else ref[ref_perm],
                    ref_labels=None if ref is None else ref_labels[ref_perm], **kw)
    kw.update(ref=ref, ref_labels=ref_labels)
    ref_map = perm if ref is None else ref_perm
    for miner in (tripmine.batch_hard, tripmine.semi_hard):
        original = set(rows(miner(x, labels, **kw)))
        assert _relabel(miner(x[perm], labels[perm], **permuted), perm, ref_map) == original
    for mining in LOSS_MINING:
        base = tripmine.triplet_loss(x, labels, mining=mining, **kw).loss
        moved = tripmine.triplet_loss(x[perm], labels[perm], mining=mining, **permuted).loss
        np.testing.assert_allclose(moved, base, rtol=1e-9, atol=1e-300)
    base = tripmine.contrastive_loss(x, labels, **kw).loss
    moved = tripmine.contrastive_loss(x[perm], labels[perm], **permuted).loss
    np.testing.assert_allclose(moved, base, rtol=1e-9, atol=1e-300)


@SETTINGS
@given(batches(), st.floats(-50, 50))
def test_euclidean_losses_are_translation_invariant(batch, shift):
    """Shifting every embedding (x and ref) by one vector leaves euclidean losses unchanged."""
    x, labels, ref, ref_labels, rng = batch
    offset = shift * rng.standard_normal(x.shape[1])
    moved_ref = None if ref is None else ref + offset
    # The shift rounds the inputs: tolerance relative to the coordinates' size.
    scale = float(np.abs(x).max()) + abs(shift) * float(np.abs(offset).max() + 1)
    atol = 1e-9 * scale * len(x)
    for mining in LOSS_MINING:
        base = tripmine.triplet_loss(x, labels, mining=mining, ref=ref, ref_labels=ref_labels,
                                     reduction="sum")
        moved = tripmine.triplet_loss(x + offset, labels, mining=mining, ref=moved_ref,
                                      ref_labels=ref_labels, reduction="sum")
        np.testing.assert_allclose(moved.loss, base.loss, rtol=1e-7, atol=atol)
        np.testing.assert_allclose(moved.grad, base.grad, rtol=1e-5, atol=1e-6 * len(x))
    base = tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels, power=2,
                                     neg_margin=float(np.abs(x).max()), reduction="sum")
    moved = tripmine.contrastive_loss(x + offset, labels, ref=moved_ref, ref_labels=ref_labels,
                                      power=2, neg_margin=float(np.abs(x).max()),
                                      reduction="sum")
    np.testing.assert_allclose(moved.loss, base.loss, rtol=1e-7, atol=atol * scale)


@SETTINGS
@given(batches(dtypes=(np.float32, np.float64)),
       st.sampled_from(["euclidean", "sqeuclidean", "cosine"]),
       st.sampled_from(["mean", "sum", "mean_nonzero", "none"]), st.booleans(),
       st.floats(0, 5))
def test_losses_are_nonnegative_and_finite(batch, metric, reduction, soft, margin):
    """Every loss is >= 0 and finite, with finite gradients, whatever the batch."""
    x, labels, ref, ref_labels, _ = batch
    kw = dict(ref=ref, ref_labels=ref_labels, metric=metric, reduction=reduction)
    results = [tripmine.triplet_loss(x, labels, mining=mining, margin=margin, soft=soft, **kw)
               for mining in LOSS_MINING]
    results.append(tripmine.triplet_loss(x, labels, mining="distance_weighted", normalize=True,
                                         margin=margin, soft=soft, seed=0,
                                         **dict(kw, metric="euclidean")))
    for power in (1, 2):
        results.append(tripmine.contrastive_loss(x, labels, power=power, pos_margin=margin / 4,
                                                 neg_margin=margin, **kw))
    for result in results:
        loss = np.asarray(result.loss)
        assert np.all(np.isfinite(loss)) and np.all(loss >= 0)
        assert np.all(np.isfinite(result.grad))
        assert 0 <= result.n_active <= getattr(result, "n_triplets",
                                               getattr(result, "n_pairs", None))


@SETTINGS
@given(batches(), st.integers(0, 2**63 - 1))
def test_seeded_mining_is_reproducible(batch, seed):
    """The same seed gives the same random triplets (semi-hard random, distance
    weighted, max_triplets subsets), and the same distance-weighted loss."""
    x, labels, ref, ref_labels, _ = batch
    kw = dict(ref=ref, ref_labels=ref_labels)
    calls = [
        lambda: tripmine.semi_hard(x, labels, select="random", margin=1.0, seed=seed, **kw),
        lambda: tripmine.semi_hard(x, labels, select="all", margin=1.0, max_triplets=5,
                                   seed=seed, **kw),
        lambda: tripmine.distance_weighted(x, labels, normalize=True, seed=seed, **kw),
        lambda: tripmine.triplet_loss(x, labels, mining="distance_weighted", normalize=True,
                                      seed=seed, **kw).triplets,
    ]
    for call in calls:
        assert rows(call()) == rows(call())
    first = tripmine.triplet_loss(x, labels, mining="distance_weighted", normalize=True,
                                  seed=seed, **kw)
    assert first.seed == seed
