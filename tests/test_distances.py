"""pairwise_distances against scipy's cdist and the loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

import reference
import tripmine
from conftest import FLOAT_DTYPES, METRICS, distance_rtol

# (N, M, D): ones, primes, and sizes that are not multiples of any tile
# dimension (MR 4/6, NR 8/16, anchor blocks, reference blocks up to 1024).
SHAPES = [
    (1, 1, 1),
    (1, 5, 3),
    (7, 1, 1),
    (2, 3, 130),
    (13, 17, 5),
    (33, 65, 17),
    (97, 130, 129),
    (150, 1100, 64),
    (301, 37, 1),
    (1100, 40, 64),  # self mode over two reference blocks: whole tiles below the diagonal
]


def _inputs(rng, n, m, d, dtype):
    x = rng.standard_normal((n, d)).astype(dtype)
    ref = rng.standard_normal((m, d)).astype(dtype)
    return x, ref


def _assert_close(got, want, dtype, d):
    assert got.dtype == dtype
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=distance_rtol(dtype, d), atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_cdist(isa, rng, shape, metric, dtype):
    n, m, d = shape
    x, ref = _inputs(rng, n, m, d, dtype)
    # The oracle sees exactly the values tripmine sees (float32 rounding included).
    want_ref = cdist(x.astype(np.float64), ref.astype(np.float64), metric)
    _assert_close(tripmine.pairwise_distances(x, ref, metric=metric), want_ref, dtype, d)

    want_self = cdist(x.astype(np.float64), x.astype(np.float64), metric)
    np.fill_diagonal(want_self, 0.0)  # cdist's cosine leaves ~1e-16 there
    got_self = tripmine.pairwise_distances(x, metric=metric)
    _assert_close(got_self, want_self, dtype, d)
    assert np.all(np.diag(got_self) == 0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_loop_reference(isa, rng, metric, dtype):
    x, ref = _inputs(rng, 19, 23, 11, dtype)
    _assert_close(tripmine.pairwise_distances(x, ref, metric=metric),
                  reference.pairwise_distances(x, ref, metric), dtype, 11)
    _assert_close(tripmine.pairwise_distances(x, metric=metric),
                  reference.pairwise_distances(x, None, metric), dtype, 11)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_self_mode_is_exactly_symmetric_zero_diagonal_nonnegative(isa, rng, metric, dtype):
    x = rng.standard_normal((203, 31)).astype(dtype)
    x[50] = x[10]  # exact duplicates: distance 0 off the diagonal too
    got = tripmine.pairwise_distances(x, metric=metric)
    assert np.array_equal(got, got.T)
    assert np.all(np.diag(got) == 0)
    assert got[10, 50] == 0 and got[50, 10] == 0
    assert np.all(got >= 0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_near_duplicates_are_accurate(isa, rng, metric, dtype):
    """Points 1e-4 apart with norms ~100: the Gram identity alone cancels
    catastrophically (float32 would give 0 or garbage); tripmine refines them."""
    base = rng.standard_normal((40, 16)) + 100.0
    x = base.astype(dtype)
    ref = (base + 1e-4 * rng.standard_normal(base.shape)).astype(dtype)
    want = reference.pairwise_distances(x.astype(np.float64), ref.astype(np.float64), metric)
    got = tripmine.pairwise_distances(x, ref, metric=metric)
    # Refined pairs are computed by direct difference in double: near-exact.
    # Cosine normalises first, which costs ~eps / ||a/|a| - b/|b||| relative
    # (here ~1e-10 for float64, invisible in float32).
    rtol = 4 * np.finfo(dtype).eps + (1e-9 if metric == "cosine" else 0.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_more_accurate_than_cdist_for_near_parallel_cosine(rng):
    x = rng.standard_normal((60, 3)) + 30.0
    ref = rng.standard_normal((50, 3)) + 30.0
    exact = reference.pairwise_distances(x, ref, "cosine")
    ours = np.max(np.abs(tripmine.pairwise_distances(x, ref, metric="cosine") - exact) / exact)
    theirs = np.max(np.abs(cdist(x, ref, "cosine") - exact) / exact)
    assert ours < 1e-11
    assert ours < theirs


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cosine_zero_vector_convention(dtype):
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=dtype)
    got = tripmine.pairwise_distances(x, metric="cosine")
    # A zero vector has cosine similarity 0 with everything (distance 1),
    # except itself in self mode (distance exactly 0).
    np.testing.assert_array_equal(got, np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cosine_range_and_opposite_vectors(dtype):
    x = np.array([[1.0, 2.0], [-1.0, -2.0], [2.0, 4.0]], dtype=dtype)
    got = tripmine.pairwise_distances(x, metric="cosine")
    assert got[0, 1] == pytest.approx(2.0) and got[0, 2] == pytest.approx(0.0, abs=1e-7)
    assert np.all((got >= 0) & (got <= 2))


@pytest.mark.parametrize("metric", METRICS)
def test_zero_features(metric):
    x = np.empty((3, 0))
    got = tripmine.pairwise_distances(x, metric=metric)
    assert got.shape == (3, 3)
    expected_off_diagonal = 1.0 if metric == "cosine" else 0.0
    np.testing.assert_array_equal(got, expected_off_diagonal * (1 - np.eye(3)))


@pytest.mark.parametrize("n, m", [(0, 0), (0, 5), (4, 0)])
def test_empty_inputs_give_empty_results(n, m):
    x = np.zeros((n, 3), dtype=np.float32)
    ref = np.zeros((m, 3), dtype=np.float32)
    got = tripmine.pairwise_distances(x, ref)
    assert got.shape == (n, m) and got.dtype == np.float32
    assert tripmine.pairwise_distances(x).shape == (n, n)


def test_dtype_rules(rng):
    x16 = rng.standard_normal((9, 4)).astype(np.float16)
    got = tripmine.pairwise_distances(x16)
    assert got.dtype == np.float32  # float16 is computed and returned in float32
    np.testing.assert_allclose(got, cdist(x16.astype(np.float64), x16.astype(np.float64)),
                               rtol=1e-5)
    x32 = x16.astype(np.float32)
    x64 = x16.astype(np.float64)
    assert tripmine.pairwise_distances(x32, x64).dtype == np.float64
    assert tripmine.pairwise_distances(x16, x32).dtype == np.float32


def test_out_is_filled_and_returned(rng):
    x, ref = _inputs(rng, 21, 34, 8, np.float32)
    out = np.full((21, 34), np.nan, dtype=np.float32)
    result = tripmine.pairwise_distances(x, ref, out=out)
    assert result is out
    np.testing.assert_array_equal(out, tripmine.pairwise_distances(x, ref))


def test_noncontiguous_and_fortran_inputs_are_copied_not_modified(rng):
    base = rng.standard_normal((40, 20))
    views = {
        "strided rows": base[::2],
        "strided cols": base[:, ::2],
        "negative stride": base[::-1],
        "fortran": np.asfortranarray(base),
    }
    for name, view in views.items():
        before = view.copy()
        want = cdist(np.ascontiguousarray(view), np.ascontiguousarray(view))
        np.testing.assert_allclose(tripmine.pairwise_distances(view), want, rtol=1e-10,
                                   err_msg=name)
        np.testing.assert_array_equal(view, before, err_msg=name)


def test_inputs_are_not_modified(rng):
    x, ref = _inputs(rng, 30, 25, 7, np.float64)
    x.flags.writeable = False  # read-only inputs are fine
    x_copy, ref_copy = x.copy(), ref.copy()
    for metric in METRICS:
        tripmine.pairwise_distances(x, ref, metric=metric)
        tripmine.pairwise_distances(x, metric=metric)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(ref, ref_copy)


def test_list_input():
    got = tripmine.pairwise_distances([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(got, [[0.0, 5.0], [5.0, 0.0]])


def test_non_finite_values_propagate_when_check_disabled():
    x = np.array([[0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]])
    got = tripmine.pairwise_distances(x, check_finite=False)
    assert np.isnan(got[1, 0]) and np.isnan(got[0, 1]) and np.isnan(got[2, 1])
    assert got[0, 2] == pytest.approx(np.sqrt(2.0))
