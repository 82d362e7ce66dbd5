"""Label masks against the loop reference."""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine

LABEL_LAYOUTS = {
    "random": lambda rng, n: rng.integers(0, 5, size=n),
    "one class": lambda rng, n: np.zeros(n, dtype=np.int64),
    "all singletons": lambda rng, n: np.arange(n),
    "pk": lambda rng, n: np.repeat(np.arange((n + 3) // 4), 4)[:n],
}


@pytest.mark.parametrize("layout", LABEL_LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 17, 64, 131])
def test_pair_masks_self_mode(rng, layout, n):
    labels = LABEL_LAYOUTS[layout](rng, n)
    pos, neg = tripmine.positive_mask(labels), tripmine.negative_mask(labels)
    assert pos.dtype == bool and neg.dtype == bool and pos.shape == (n, n)
    np.testing.assert_array_equal(pos, reference.positive_mask(labels))
    np.testing.assert_array_equal(neg, reference.negative_mask(labels))
    assert not np.any(np.diag(pos)) and not np.any(np.diag(neg))


@pytest.mark.parametrize("n, m", [(1, 1), (5, 9), (70, 33)])
def test_pair_masks_with_reference(rng, n, m):
    labels = rng.integers(0, 4, size=n)
    ref_labels = rng.integers(0, 4, size=m)
    pos = tripmine.positive_mask(labels, ref_labels)
    neg = tripmine.negative_mask(labels, ref_labels)
    np.testing.assert_array_equal(pos, reference.positive_mask(labels, ref_labels))
    np.testing.assert_array_equal(neg, reference.negative_mask(labels, ref_labels))
    np.testing.assert_array_equal(pos, ~neg)  # no self exclusion in reference mode


def test_string_labels_share_codes_with_ref_labels():
    labels = np.array(["cat", "dog", "cat", "emu"])
    ref_labels = ["dog", "yak", "cat"]
    np.testing.assert_array_equal(
        tripmine.positive_mask(labels, ref_labels),
        [[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]],
    )
    np.testing.assert_array_equal(tripmine.positive_mask(labels),
                                  reference.positive_mask(list(labels)))


@pytest.mark.parametrize("labels", [
    np.array([1.5, 2.5, 1.5, -0.0, 0.0]),
    np.array([True, False, True]),
    np.array([2**63 + 5, 7, 2**63 + 5], dtype=np.uint64),
    np.array([-3, 10**15, -3], dtype=np.int64),
    np.array([b"a", b"b", b"a"]),
    np.array([(1, 2), (3,), (1, 2)], dtype=object),
], ids=["float", "bool", "uint64", "int64", "bytes", "object"])
def test_label_types(labels):
    np.testing.assert_array_equal(tripmine.positive_mask(labels),
                                  reference.positive_mask(list(labels)))
    np.testing.assert_array_equal(tripmine.negative_mask(labels),
                                  reference.negative_mask(list(labels)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 23, 40])
def test_triplet_mask_equals_triple_loop(rng, n):
    labels = rng.integers(0, 3, size=n)
    got = tripmine.triplet_mask(labels)
    assert got.shape == (n, n, n) and got.dtype == bool
    np.testing.assert_array_equal(got, reference.triplet_mask(labels))


def test_triplet_mask_string_labels():
    labels = ["a", "b", "a", "c", "b"]
    np.testing.assert_array_equal(tripmine.triplet_mask(labels), reference.triplet_mask(labels))


def test_triplet_mask_refuses_large_batches():
    too_many = np.zeros(tripmine.TRIPLET_MASK_MAX_N + 1, dtype=np.int64)
    with pytest.raises(ValueError, match="TRIPLET_MASK_MAX_N.*batch_hard"):
        tripmine.triplet_mask(too_many)


def test_masks_of_empty_labels():
    assert tripmine.positive_mask([]).shape == (0, 0)
    assert tripmine.negative_mask(np.array([], dtype=int), [1, 2]).shape == (0, 2)
    assert tripmine.triplet_mask(np.array([], dtype=int)).shape == (0, 0, 0)


def test_labels_are_not_modified(rng):
    labels = rng.integers(0, 5, size=50)
    before = labels.copy()
    tripmine.positive_mask(labels)
    tripmine.triplet_mask(labels)
    np.testing.assert_array_equal(labels, before)
