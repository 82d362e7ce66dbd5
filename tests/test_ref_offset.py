"""ref_offset: a slice of a batch mined against the whole batch is self mode, exactly.

For X (N x D) cut into slices X[o:e], every miner and loss called with
``x=X[o:e], ref=X, ref_offset=o`` must give self mode's triplets of anchors
o .. e-1 (anchor indices shifted by o), seeded draws included; with
``reduction="sum"`` the slices' losses and counts add up to self mode's, and
each slice's ``grad`` plus the matching rows of the summed ``ref_grad`` is
self mode's gradient.  This is what distributed mining (every rank a slice)
relies on.
"""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from conftest import FLOAT_DTYPES, METRICS
from tripmine import _core

N, D, CLASSES = 53, 7, 6
CUTS = (0, 9, 9, 30, N)  # unequal slices, one of them empty


def _slices():
    return list(zip(CUTS[:-1], CUTS[1:]))


def _batch(rng, dtype):
    x = rng.standard_normal((N, D)).astype(dtype)
    labels = rng.integers(0, CLASSES, N)
    return x, labels


def _restricted(triplets, start, end):
    """Self-mode triplets of anchors start .. end-1, anchors renumbered from 0."""
    keep = (triplets.anchor >= start) & (triplets.anchor < end)
    return tripmine.Triplets(triplets.anchor[keep] - start, triplets.positive[keep],
                             triplets.negative[keep])


def _assert_same_triplets(got, expected):
    for name, a, b in zip(("anchor", "positive", "negative"), got, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)


def _grad_tol(dtype):
    return (1e-12, 1e-12) if np.dtype(dtype) == np.float64 else (2e-5, 2e-5)


MINERS = {
    "batch_hard": lambda **kw: tripmine.batch_hard(**kw),
    "semi_hard_closest": lambda **kw: tripmine.semi_hard(**kw, margin=0.5),
    "semi_hard_random": lambda **kw: tripmine.semi_hard(**kw, margin=0.5, select="random",
                                                        seed=11),
    "semi_hard_all": lambda **kw: tripmine.semi_hard(**kw, margin=0.5, select="all"),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("miner", sorted(MINERS))
def test_miners_on_slices_are_self_mode(rng, miner, metric, normalize, dtype):
    x, labels = _batch(rng, dtype)
    mine = MINERS[miner]
    full = mine(x=x, labels=labels, metric=metric, normalize=normalize)
    assert full.anchor.size > 0
    for start, end in _slices():
        part = mine(x=x[start:end], labels=labels[start:end], ref=x, ref_labels=labels,
                    ref_offset=start, metric=metric, normalize=normalize)
        _assert_same_triplets(part, _restricted(full, start, end))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_distance_weighted_on_slices_is_self_mode(rng, dtype):
    x, labels = _batch(rng, dtype)
    full = tripmine.distance_weighted(x, labels, normalize=True, seed=5)
    assert full.anchor.size > 0
    for start, end in _slices():
        part = tripmine.distance_weighted(x[start:end], labels[start:end], ref=x,
                                          ref_labels=labels, ref_offset=start, normalize=True,
                                          seed=5)
        _assert_same_triplets(part, _restricted(full, start, end))


def test_random_draws_are_keyed_on_the_reference_row(rng):
    # A wide margin leaves most pairs many candidates, so the draws decide the
    # negatives (another seed changes them); a slice keys anchor i's draws on
    # its row ref_offset + i and so reproduces self mode's.
    x, labels = _batch(rng, np.float64)
    kwargs = dict(margin=3.0, select="random")
    full = tripmine.semi_hard(x, labels, seed=3, **kwargs)
    assert not np.array_equal(full.negative,
                              tripmine.semi_hard(x, labels, seed=4, **kwargs).negative)
    sliced = tripmine.semi_hard(x[30:], labels[30:], ref=x, ref_labels=labels, ref_offset=30,
                                seed=3, **kwargs)
    _assert_same_triplets(sliced, _restricted(full, 30, N))


def _sum_over_slices(call, x, labels, **kwargs):
    """Loss, counts and assembled gradient of `call` over the slices."""
    grad = np.zeros(x.shape, dtype=np.float64)
    loss, results = 0.0, []
    for start, end in _slices():
        result = call(x[start:end], labels[start:end], ref=x, ref_labels=labels,
                      ref_offset=start, reduction="sum", **kwargs)
        loss += result.loss
        grad[start:end] += result.grad
        grad += result.ref_grad
        results.append(result)
    return loss, grad, results


# distance_weighted is defined for unit-norm euclidean embeddings only.
LOSS_SETUPS = [(mining, metric, normalize)
               for mining in ("batch_hard", "batch_all", "semi_hard", "distance_weighted")
               for metric in METRICS for normalize in (False, True)
               if mining != "distance_weighted" or (metric == "euclidean" and normalize)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mining, metric, normalize", LOSS_SETUPS)
def test_triplet_loss_on_slices_adds_up_to_self_mode(rng, mining, metric, normalize, soft,
                                                     dtype):
    x, labels = _batch(rng, dtype)
    kwargs = dict(mining=mining, margin=0.3, soft=soft, metric=metric, normalize=normalize,
                  seed=9)
    full = tripmine.triplet_loss(x, labels, reduction="sum", **kwargs)
    loss, grad, parts = _sum_over_slices(tripmine.triplet_loss, x, labels, **kwargs)
    assert full.n_triplets > 0 and np.abs(full.grad).max() > 0
    assert sum(p.n_triplets for p in parts) == full.n_triplets
    assert sum(p.n_active for p in parts) == full.n_active
    assert loss == pytest.approx(full.loss, rel=1e-12)
    rtol, atol = _grad_tol(dtype)
    np.testing.assert_allclose(grad, full.grad, rtol=rtol, atol=atol * np.abs(full.grad).max())
    if mining != "batch_all":
        for (start, end), part in zip(_slices(), parts):
            _assert_same_triplets(part.triplets, _restricted(full.triplets, start, end))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_loss_on_slices_adds_up_to_self_mode(rng, metric, normalize, power, dtype):
    x, labels = _batch(rng, dtype)
    neg_margin = {"euclidean": 3.5, "sqeuclidean": 12.0, "cosine": 1.0}[metric]
    kwargs = dict(pos_margin=0.1, neg_margin=0.5 if normalize else neg_margin, power=power,
                  metric=metric, normalize=normalize)
    full = tripmine.contrastive_loss(x, labels, reduction="sum", **kwargs)
    loss, grad, parts = _sum_over_slices(tripmine.contrastive_loss, x, labels, **kwargs)
    for count in ("n_pairs", "n_positive_pairs", "n_negative_pairs", "n_active"):
        assert sum(getattr(p, count) for p in parts) == getattr(full, count), count
    assert 0 < full.n_active < full.n_pairs
    assert loss == pytest.approx(full.loss, rel=1e-12)
    rtol, atol = _grad_tol(dtype)
    np.testing.assert_allclose(grad, full.grad, rtol=rtol, atol=atol * np.abs(full.grad).max())


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "distance_weighted"])
def test_memory_bank_layout(rng, mining):
    # A memory bank: ref = concat(x, bank), ref_offset = 0.  x's anchors then
    # mine exactly what they would in self mode on the concatenation.
    x, labels = _batch(rng, np.float64)
    bank, bank_labels = x[20:], labels[20:]
    query, query_labels = x[:20], labels[:20]
    ref, ref_labels = np.concatenate([query, bank]), np.concatenate([query_labels, bank_labels])
    kwargs = dict(mining=mining, normalize=True, seed=2, reduction="none")
    full = tripmine.triplet_loss(ref, ref_labels, **kwargs)
    got = tripmine.triplet_loss(query, query_labels, ref=ref, ref_labels=ref_labels,
                                ref_offset=0, **kwargs)
    expected = _restricted(full.triplets, 0, 20)
    _assert_same_triplets(got.triplets, expected)
    keep = full.triplets.anchor < 20
    np.testing.assert_allclose(got.loss, full.loss[keep], rtol=1e-13, atol=1e-15)


def test_memory_bank_contrastive_per_anchor(rng):
    x, labels = _batch(rng, np.float64)
    full = tripmine.contrastive_loss(x, labels, reduction="none", neg_margin=3.0)
    got = tripmine.contrastive_loss(x[:20], labels[:20], ref=x, ref_labels=labels, ref_offset=0,
                                    reduction="none", neg_margin=3.0)
    np.testing.assert_allclose(got.loss, full.loss[:20], rtol=1e-13)


def test_pair_masks_exclude_the_own_row(rng):
    labels = rng.integers(0, 4, 30)
    for start, end in _slices()[:3]:
        got = tripmine.positive_mask(labels[start:end], labels, ref_offset=start)
        np.testing.assert_array_equal(got, tripmine.positive_mask(labels)[start:end])
        got = tripmine.negative_mask(labels[start:end], labels, ref_offset=start)
        np.testing.assert_array_equal(got, tripmine.negative_mask(labels)[start:end])


def test_given_triplets_accept_a_checked_offset(rng):
    x, labels = _batch(rng, np.float64)
    triplets = tripmine.Triplets(np.array([0]), np.array([1]), np.array([2]))
    plain = tripmine.triplet_loss(x[:5], None, mining=triplets, ref=x, ref_labels=labels)
    offset = tripmine.triplet_loss(x[:5], None, mining=triplets, ref=x, ref_labels=labels,
                                   ref_offset=0)
    assert plain.loss == offset.loss
    with pytest.raises(ValueError, match="ref_offset"):
        tripmine.triplet_loss(x[:5], None, mining=triplets, ref=x, ref_labels=labels,
                              ref_offset=N)


@pytest.mark.parametrize("offset", [-2, 5, 10**6])
def test_c_core_refuses_bad_offsets(rng, offset):
    # The Python checks come first; the C core checks on its own too.
    x, labels = _batch(rng, np.float64)
    codes = labels.astype(np.int64)
    with pytest.raises(ValueError, match="please report"):
        _core.batch_hard(x[:50], x, _core.METRICS["euclidean"], codes[:50], codes,
                         ref_offset=offset)


def test_c_core_checks_the_labels(rng):
    x, labels = _batch(rng, np.float64)
    codes = labels.astype(np.int64)
    shifted = np.roll(codes, 1)
    assert np.any(shifted[:10] != codes[:10])
    with pytest.raises(ValueError, match="please report"):
        _core.contrastive_loss(x[:10], x, _core.METRICS["euclidean"], shifted[:10], codes, 0.0,
                               1.0, 1, "sum", True, False, ref_offset=0)
    with pytest.raises(ValueError, match="please report"):  # self mode takes no offset
        _core.batch_hard(x, None, _core.METRICS["euclidean"], codes, None, ref_offset=0)
