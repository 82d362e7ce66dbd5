"""Batch-all's two-sided rows (self mode, classes of at most 17, with a gradient): each
row writes its pairs' coefficients from both anchors' sides, and the positive pairs' other
side is added after the walk.  These tests pin that path against the same loss computed
on the explicitly enumerated triplets (``mining=Triplets``: the per-triplet gradient code,
which shares nothing with the row walk), against the loss-only walk (``grad=False`` never
takes the two-sided path) and against the loop reference, on both sides of the class-size
limit, with the NaN, zero-distance and huge-margin corners."""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from reference import batch_all_loss, batch_all_triplets

LIMIT = 17  # TM_LINEAR_POSITIVES + 1 members per class


def _batch(rng, sizes, d=6, dtype=np.float64):
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    rng.shuffle(labels)
    x = rng.standard_normal((len(labels), d)).astype(dtype)
    return x, labels


def _two_ways(x, labels, **kw):
    """(batch-all with its gradient, the same loss over the enumerated triplets)."""
    walked = tripmine.triplet_loss(x, labels, mining="batch_all", **kw)
    listed = tripmine.triplet_loss(x, labels, mining=tripmine.Triplets(*batch_all_triplets(labels)),
                                   **{"reduction": "mean_nonzero", **kw})
    return walked, listed


@pytest.mark.parametrize("sizes", [[4] * 12, [1, 2, 3, 5, 8, 13, LIMIT], [LIMIT + 1, 3, 4, 2],
                                   [2, 2], [LIMIT] * 3])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("reduction", ["mean_nonzero", "sum", "mean"])
def test_two_sided_equals_one_sided_and_reference(sizes, metric, reduction):
    rng = np.random.default_rng(len(sizes) * 7 + sum(sizes))
    x, labels = _batch(rng, sizes)
    margin = 1.0 if metric == "euclidean" else 4.0  # many active and many inactive triplets
    two, one = _two_ways(x, labels, metric=metric, margin=margin, reduction=reduction)
    assert two.n_triplets == one.n_triplets and two.n_active == one.n_active
    assert 0 < two.n_active < two.n_triplets
    np.testing.assert_allclose(two.loss, one.loss, rtol=1e-12)
    np.testing.assert_allclose(two.grad, one.grad, rtol=1e-10, atol=1e-12)
    loss_only = tripmine.triplet_loss(x, labels, mining="batch_all", metric=metric,
                                      margin=margin, reduction=reduction, grad=False)
    np.testing.assert_allclose(two.loss, loss_only.loss, rtol=1e-12)
    if reduction == "sum":  # the loop oracle is slow: once per batch and metric
        expected = batch_all_loss(x, labels, margin=margin, metric=metric, reduction=reduction)
        np.testing.assert_allclose(two.loss, expected.loss, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_sided_float32_and_threads(dtype):
    rng = np.random.default_rng(5)
    x, labels = _batch(rng, [4] * 40, d=32, dtype=dtype)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    two, one = _two_ways(x, labels)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(two.loss, one.loss, rtol=rtol)
    scale = np.abs(one.grad).max()
    np.testing.assert_allclose(two.grad, one.grad, rtol=0, atol=rtol * scale)
    previous = tripmine.get_num_threads()
    try:
        for threads in (1, 2, 3):
            tripmine.set_num_threads(threads)
            again = tripmine.triplet_loss(x, labels, mining="batch_all")
            assert again.loss == two.loss
            np.testing.assert_array_equal(again.grad, two.grad)
    finally:
        tripmine.set_num_threads(previous)


def test_two_sided_duplicates_nan_and_huge_margin():
    rng = np.random.default_rng(9)
    x, labels = _batch(rng, [3, 4, 5, 4])
    x[3] = x[0]  # zero distances, inside and across classes
    x[7] = x[1]
    two, one = _two_ways(x, labels, margin=0.5)
    np.testing.assert_allclose(two.grad, one.grad, rtol=1e-10, atol=1e-12)
    assert np.isfinite(two.grad).all()
    big = tripmine.triplet_loss(x, labels, mining="batch_all", margin=1e20)
    assert big.n_active == big.n_triplets and np.isfinite(big.grad).all()
    x[2, 0] = np.nan  # check_finite=False: undefined, but no crash
    # The two-sided walk runs to the end; its NaN gradient is then refused (the C core
    # scans every gradient it returns), and the loss-only walk counts.
    with pytest.raises(FloatingPointError, match="check_finite=False"):
        tripmine.triplet_loss(x, labels, mining="batch_all", margin=0.5, check_finite=False)
    one = tripmine.triplet_loss(x, labels, mining="batch_all", margin=0.5, check_finite=False,
                                grad=False)
    assert 0 < one.n_triplets <= big.n_triplets  # NaN distances compare false: drop, never add
