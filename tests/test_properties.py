"""Invariants checked with hypothesis on bounded random inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tripmine
from conftest import distance_rtol

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def batches(draw):
    n = draw(st.integers(1, 60))
    d = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((n, d))).astype(dtype)
    # Some exact duplicates, which must give distance exactly 0.
    if n > 2 and draw(st.booleans()):
        x[-1] = x[0]
    return x, rng


@SETTINGS
@given(batches(), st.sampled_from(["euclidean", "sqeuclidean", "cosine"]))
def test_permuting_the_batch_permutes_the_matrix_exactly(batch, metric):
    x, rng = batch
    perm = rng.permutation(len(x))
    full = tripmine.pairwise_distances(x, metric=metric)
    permuted = tripmine.pairwise_distances(x[perm], metric=metric)
    assert np.array_equal(permuted, full[np.ix_(perm, perm)])


@SETTINGS
@given(batches(), st.sampled_from(["euclidean", "sqeuclidean", "cosine"]))
def test_nonnegative_symmetric_zero_diagonal(batch, metric):
    x, _ = batch
    got = tripmine.pairwise_distances(x, metric=metric)
    assert np.all(got >= 0) and np.array_equal(got, got.T) and np.all(np.diag(got) == 0)
    if metric == "cosine":
        assert np.all(got <= 2)
    if len(x) > 2 and np.array_equal(x[0], x[-1]) and np.any(x[0] != 0):
        assert got[0, -1] == 0


@SETTINGS
@given(batches(), st.floats(-50, 50))
def test_euclidean_is_translation_invariant(batch, shift):
    x, _ = batch
    x64 = x.astype(np.float64)
    base = tripmine.pairwise_distances(x64)
    moved = tripmine.pairwise_distances(x64 + shift)
    # The translation itself rounds the inputs: compare with a tolerance that
    # covers both that and the distance computation.
    scale = np.abs(x64).max() + abs(shift)
    np.testing.assert_allclose(moved, base, rtol=1e-9, atol=1e-12 * scale * x.shape[1])


@SETTINGS
@given(batches())
def test_ref_mode_equals_self_mode_off_the_diagonal(batch):
    x, _ = batch
    self_mode = tripmine.pairwise_distances(x)
    ref_mode = tripmine.pairwise_distances(x, x.copy())
    off = ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(ref_mode[off], self_mode[off],
                               rtol=distance_rtol(x.dtype, x.shape[1]))
    # In reference mode identical rows are still recognised as distance 0.
    assert np.all(np.diag(ref_mode) == 0)
