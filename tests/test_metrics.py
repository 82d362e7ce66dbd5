"""Retrieval metrics (tripmine.metrics) against the loop references.

nearest_neighbors must reproduce reference.nearest_neighbors_reference: the
indices exactly on float64 continuous data and on exactly computable data
(small integers, axis-aligned rows: exact ties, which go to the lower index),
and on float32 up to swaps of references whose exact distances tie within
the float32 tolerance (the miners' quasi-equality rule); the distances to the
engine's documented error bound.  Recall@K and MAP@R must equal the loop
references to 1e-12 on data whose ranking is exact, and hand-computed values
on small 1-D cases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference
import tripmine
from conftest import FLOAT_DTYPES, METRICS
from tripmine import metrics
from tripmine.metrics import mean_average_precision_at_r, nearest_neighbors, recall_at_k

# (N queries, M references in gallery mode, D): single rows, primes, and sizes
# that are not multiples of any tile or block dimension.
SHAPES = [
    (1, 1, 1),
    (1, 5, 3),
    (7, 1, 64),
    (7, 13, 1),
    (130, 67, 3),
    (130, 257, 64),
]


# ---- helpers ---------------------------------------------------------------


def _ks(available):
    """k = 1, a middle value, exactly the available references, and beyond them."""
    return sorted({1, max(1, min(4, available)), max(1, available), available + 3})


# csrc/engine_impl.h: a pair with d^2 < REFINE (||x||^2 + ||r||^2) is recomputed
# exactly; every other distance has a relative error below 2 eps sqrt(D) / REFINE.
REFINE = 1.0 / 64.0


def _rtol(dtype, d):
    """Relative tolerance of a neighbour's distance.

    Neighbours are the close pairs, where the Gram identity's error peaks (just
    above the refine threshold), so float32 gets the engine's documented bound
    rather than conftest.distance_rtol, which it can exceed at small D (N = 1000
    points in D = 3 reach 0.9 of distance_rtol with sqeuclidean).  float64: 1e-12
    (the documented bound is below it up to D ~ 1000; measured worst ~2e-14).
    """
    bound = 2 * float(np.finfo(dtype).eps) * math.sqrt(d) / REFINE
    return max(bound, 1e-12) if np.dtype(dtype) == np.float64 else bound


def _distance_atol(dtype, metric):
    # cosine rounds the unit vectors in the working precision: an absolute term
    # for distances near 0 (the miners' checks.tie_tolerance has the same).
    return 64 * float(np.finfo(dtype).eps) if metric == "cosine" else 0.0


def _tolerance(dtype, d, metric):
    """How far apart two exact distances may be and still count as a tie that
    the computation may order either way; None where the indices must equal the
    reference's (float64 on continuous data, as for the miners)."""
    atol = _distance_atol(dtype, metric)
    if d == 1 and metric == "cosine":
        # In one dimension every cosine distance is 0 or 2: all ties, which the
        # rounding of the unit vectors may decide in either dtype.
        return lambda d1, d2: atol
    if np.dtype(dtype) == np.float64:
        return None
    rtol = 2 * _rtol(dtype, d)  # both candidates' errors may add up
    return lambda d1, d2: rtol * max(d1, d2) + atol


def assert_neighbors(got, x, k, ref, metric, tol):
    """got = nearest_neighbors(x, k, ref, metric=metric) matches the reference.

    With tol None the indices are equal; otherwise a reference may stand at
    another rank only where its exact distance ties (within tol) with the
    distance the reference has at that rank.
    """
    x_arr = np.asarray(x)
    inputs = (x_arr,) if ref is None else (x_arr, np.asarray(ref))
    dtype = np.dtype(np.float64 if any(a.dtype == np.float64 for a in inputs) else np.float32)
    want_idx, want_dist = reference.nearest_neighbors_reference(x, k, ref, metric)
    got_idx, got_dist = got
    assert isinstance(got_idx, np.ndarray) and got_idx.dtype == np.int64
    assert isinstance(got_dist, np.ndarray) and got_dist.dtype == dtype
    assert got_idx.shape == got_dist.shape == (x_arr.shape[0], k)

    padding = want_idx < 0
    np.testing.assert_array_equal(got_idx[padding], -1, err_msg="padding index must be -1")
    assert np.all(got_dist[padding] == np.inf), "padding distance must be +inf"
    assert np.all(got_idx[~padding] >= 0), "missing neighbours where references remain"

    valid = got_idx >= 0
    fillers = -1 - np.arange(k)  # distinct stand-ins for the padding slots
    ordered = np.sort(np.where(valid, got_idx, fillers), axis=1)
    assert np.all(ordered[:, 1:] != ordered[:, :-1]), "a row repeats a reference"
    if ref is None:
        assert not np.any(got_idx == np.arange(len(got_idx))[:, None]), "a row retrieved itself"
    assert np.all(got_dist[:, 1:] >= got_dist[:, :-1]), "a row is not nearest first"

    rtol = _rtol(dtype, x_arr.shape[1])
    np.testing.assert_allclose(got_dist[~padding], want_dist[~padding], rtol=rtol,
                               atol=_distance_atol(dtype, metric))
    if tol is None:
        np.testing.assert_array_equal(got_idx, want_idx)
        return
    refs = x_arr if ref is None else np.asarray(ref)
    for i, rank in zip(*np.nonzero(got_idx != want_idx)):
        g, w = got_idx[i, rank], want_idx[i, rank]
        exact = float(reference.distance_row(x_arr[i], refs[g:g + 1], metric)[0])
        assert abs(exact - want_dist[i, rank]) <= tol(exact, want_dist[i, rank]), (
            f"row {i} rank {rank}: got {g} at {exact!r}, want {w} at {want_dist[i, rank]!r}")


def assert_metric_equal(got, want):
    """Same type (float, or dict with the same keys in order; tuples of these
    elementwise) and value to 1e-12."""
    if isinstance(want, tuple):  # (recall, MAP@R) of _metrics
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_metric_equal(g, w)
        return
    if isinstance(want, dict):
        assert isinstance(got, dict), f"expected a dict, got {type(got).__name__}"
        assert list(got) == list(want)
        for key in want:
            assert_metric_equal(got[key], want[key])
        return
    assert type(got) is float, f"expected a float, got {type(got).__name__}"
    if math.isnan(want):
        assert math.isnan(got), f"expected NaN, got {got}"
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=0)


def _clustered(rng, n, d, n_classes, integer=False, spread=1.0):
    """Rows around one centre per class: rankings neither perfect nor random."""
    labels = rng.integers(0, n_classes, n)
    if integer:  # small integers: exact distances in both dtypes, many exact ties
        centres = 2 * rng.integers(-2, 3, (n_classes, d))
        x = centres[labels] + rng.integers(-2, 3, (n, d))
    else:
        centres = 1.5 * rng.standard_normal((n_classes, d))
        x = centres[labels] + spread * rng.standard_normal((n, d))
    return x.astype(np.float64), labels


def _batch(rng, mode, dtype, integer, d=4, n_classes=6):
    """(x, labels, ref, ref_labels): self mode with three singleton classes, or
    a gallery with query labels it lacks and labels no query has."""
    if mode == "self":
        x, labels = _clustered(rng, 90, d, n_classes, integer)
        labels[:3] = [100, 101, 102]  # one sample each: left out
        return x.astype(dtype), labels, None, None
    x, labels = _clustered(rng, 40, d, n_classes, integer)
    ref, ref_labels = _clustered(rng, 75, d, n_classes, integer)
    labels[:4] = [200, 200, 201, 202]  # absent from the gallery: left out
    ref_labels[:2] = [300, 301]  # only in the gallery
    return x.astype(dtype), labels, ref.astype(dtype), ref_labels


def _metrics(x, labels, ref, ref_labels, metric, ks):
    got = (recall_at_k(x, labels, ks, ref=ref, ref_labels=ref_labels, metric=metric),
           mean_average_precision_at_r(x, labels, ref=ref, ref_labels=ref_labels,
                                       metric=metric))
    want = (reference.recall_at_k_reference(x, labels, ks, ref, ref_labels, metric),
            reference.map_at_r_reference(x, labels, ref, ref_labels, metric))
    return got, want


# ---- nearest_neighbors against the reference -------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nearest_neighbors_match_reference(isa, rng, shape, metric, dtype):
    n, m, d = shape
    x = rng.standard_normal((n, d)).astype(dtype)
    ref = rng.standard_normal((m, d)).astype(dtype)
    tol = _tolerance(dtype, d, metric)
    for k in _ks(n - 1):
        assert_neighbors(nearest_neighbors(x, k, metric=metric), x, k, None, metric, tol)
    for k in _ks(m):
        assert_neighbors(nearest_neighbors(x, k, ref, metric=metric), x, k, ref, metric, tol)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nearest_neighbors_1000_rows(rng, metric, dtype):
    # Self mode over several anchor and reference blocks, many close pairs;
    # one ISA is enough here (tile edges and gallery mode are the smaller
    # shapes' business, on every ISA).
    x = rng.standard_normal((1000, 3)).astype(dtype)
    tol = _tolerance(dtype, 3, metric)
    for k in (1, 40):
        assert_neighbors(nearest_neighbors(x, k, metric=metric), x, k, None, metric, tol)


def _tied_embeddings(rng, n, d, metric):
    """Exactly computable distances with many exact ties.

    euclidean / sqeuclidean: small integers (the Gram identity is exact on
    them), with duplicated rows.  cosine: axis-aligned rows +-2^e e_a and zero
    rows, so that every cosine distance is exactly 0, 1 (orthogonal, or a zero
    row: tripmine's convention) or 2.
    """
    if metric == "cosine":
        x = np.zeros((n, d))
        axis = rng.integers(0, d, n)
        x[np.arange(n), axis] = rng.choice([-1.0, 1.0], n) * 2.0 ** rng.integers(-2, 4, n)
        x[rng.choice(n, max(1, n // 10), replace=False)] = 0.0
        return x
    x = rng.integers(-2, 3, (n, d)).astype(np.float64)
    x[n // 2: n // 2 + n // 4] = x[: n // 4]  # exact duplicates
    return x


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nearest_neighbors_exact_ties_go_to_the_lower_index(isa, rng, metric, dtype):
    d = 3
    x = _tied_embeddings(rng, 61, d, metric).astype(dtype)
    ref = _tied_embeddings(rng, 45, d, metric)
    ref[7:12] = x[:5]  # copies of query rows: distance 0, never skipped
    ref = ref.astype(dtype)
    for k in (1, 5, 60, 63):
        assert_neighbors(nearest_neighbors(x, k, metric=metric), x, k, None, metric, None)
    for k in (1, 5, 45, 50):
        assert_neighbors(nearest_neighbors(x, k, ref, metric=metric), x, k, ref, metric, None)


def test_ties_hand_written():
    x = np.array([[0.0], [2.0], [1.0], [1.0], [3.0]])
    # Row 2 (at position 1): row 3 at distance 0 (its duplicate: not skipped),
    # rows 0 and 1 both at distance 1 (the tie goes to the lower index), row 4
    # at distance 2.
    idx, dist = nearest_neighbors(x, 4)
    np.testing.assert_array_equal(idx[2], [3, 0, 1, 4])
    np.testing.assert_array_equal(dist[2], [0.0, 1.0, 1.0, 2.0])
    # Row 3 likewise, with row 2 as its duplicate.
    np.testing.assert_array_equal(idx[3], [2, 0, 1, 4])
    # Row 0 (at position 0): rows 2 and 3 at distance 1, row 1 at 2, row 4 at 3.
    np.testing.assert_array_equal(idx[0], [2, 3, 1, 4])
    # k beyond the 4 other rows: padding.
    idx, dist = nearest_neighbors(x, 6)
    np.testing.assert_array_equal(idx[:, 4:], -1)
    assert np.all(dist[:, 4:] == np.inf)
    # Gallery mode: nothing skipped, the query's own copy comes first; for the
    # query at position 2, refs 2, 3 (at position 1) and 4 (at position 3) all
    # lie at distance 1: the lowest two indices win.
    idx, dist = nearest_neighbors(x[:2], 3, x)
    np.testing.assert_array_equal(idx, [[0, 2, 3], [1, 2, 3]])
    np.testing.assert_array_equal(dist, [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])


def test_nearest_neighbors_single_row_and_empty():
    idx, dist = nearest_neighbors(np.ones((1, 4), np.float32), 2)
    np.testing.assert_array_equal(idx, [[-1, -1]])
    assert dist.dtype == np.float32 and np.all(dist == np.inf)
    idx, dist = nearest_neighbors(np.ones((0, 4)), 3)
    assert idx.shape == dist.shape == (0, 3)
    idx, dist = nearest_neighbors(np.ones((0, 4)), 3, np.ones((5, 4)))
    assert idx.shape == dist.shape == (0, 3)
    idx, dist = nearest_neighbors(np.ones((3, 4)), 2, np.ones((0, 4)))  # empty gallery
    np.testing.assert_array_equal(idx, -1)
    assert np.all(dist == np.inf)


def test_nearest_neighbors_input_forms(rng):
    """Lists, strided and Fortran-ordered views and float16 give the contiguous
    answer; mixed float32/float64 computes in float64; inputs are untouched."""
    x = rng.standard_normal((23, 5))
    ref = rng.standard_normal((31, 5))
    want = nearest_neighbors(x, 4, ref)
    for xi, refi in ((x.tolist(), ref.tolist()), (np.asfortranarray(x), ref[::1]),
                     (np.repeat(x, 2, axis=0)[::2], np.repeat(ref, 2, axis=1)[:, ::2])):
        got = nearest_neighbors(xi, 4, refi)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    x32, before = x.astype(np.float32), x.astype(np.float32)
    assert nearest_neighbors(x32, 3, ref)[1].dtype == np.float64
    assert nearest_neighbors(x32, 3, ref.astype(np.float32))[1].dtype == np.float32
    np.testing.assert_array_equal(x32, before)
    x16 = x.astype(np.float16)
    assert_neighbors(nearest_neighbors(x16, 3), x16.astype(np.float32), 3, None, "euclidean",
                     _tolerance(np.float32, 5, "euclidean"))


def test_nearest_neighbors_thread_count_does_not_change_the_result(rng, threads):
    x = rng.standard_normal((301, 7)).astype(np.float32)
    tripmine.set_num_threads(1)
    want = nearest_neighbors(x, 9)
    tripmine.set_num_threads(3)
    got = nearest_neighbors(x, 9)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# ---- Recall@K and MAP@R against the reference ------------------------------


@pytest.mark.parametrize("mode", ["self", "gallery"])
@pytest.mark.parametrize("metric", METRICS)
def test_metrics_match_reference_float64(rng, mode, metric):
    x, labels, ref, ref_labels = _batch(rng, mode, np.float64, integer=False)
    got, want = _metrics(x, labels, ref, ref_labels, metric, [1, 2, 5, 10, 500])
    assert_metric_equal(got, want)


@pytest.mark.parametrize("mode", ["self", "gallery"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_metrics_match_reference_integer_data_with_ties(rng, mode, metric, dtype):
    # Exact distances in both dtypes, many exact ties: the ranking (ties to the
    # lower index) must be the reference's exactly, so must the metrics.
    x, labels, ref, ref_labels = _batch(rng, mode, dtype, integer=True)
    got, want = _metrics(x, labels, ref, ref_labels, metric, [1, 3, 7])
    assert_metric_equal(got, want)


@pytest.mark.parametrize("mode", ["self", "gallery"])
def test_string_labels(rng, mode):
    x, labels, ref, ref_labels = _batch(rng, mode, np.float64, integer=False)
    names = np.array([f"class-{v}" for v in labels])
    ref_names = None if ref_labels is None else [f"class-{v}" for v in ref_labels]
    got, want = _metrics(x, names, ref, ref_names, "euclidean", (1, 5))
    assert_metric_equal(got, want)
    # The same partition as integer labels gives the same numbers.
    assert_metric_equal(got, _metrics(x, labels, ref, ref_labels, "euclidean", (1, 5))[0])
    got_list = _metrics(x, names.tolist(), ref, ref_names, "euclidean", (1, 5))[0]
    assert_metric_equal(got_list, want)


def test_large_random_batch(rng):
    x = rng.standard_normal((2000, 16))
    labels = rng.integers(0, 20, 2000)
    x += 0.6 * rng.standard_normal((20, 16))[labels]  # some class structure
    got, want = _metrics(x, labels, None, None, "euclidean", (1, 5, 10))
    assert 0.1 < want[0][1] < 0.9 and 0.01 < want[1] < 0.9  # neither trivial nor random
    assert_metric_equal(got, want)


def test_k_return_types(rng):
    x, labels, _, _ = _batch(rng, "self", np.float64, integer=False)
    one = recall_at_k(x, labels, 3)
    assert type(one) is float
    assert_metric_equal(one, reference.recall_at_k_reference(x, labels, 3))
    assert recall_at_k(x, labels, np.int64(3)) == one
    many = recall_at_k(x, labels, [5, 1, 3])
    assert isinstance(many, dict) and list(many) == [5, 1, 3]
    assert many[3] == one
    assert all(type(v) is float for v in many.values())
    assert list(recall_at_k(x, labels, (2,))) == [2]
    assert list(recall_at_k(x, labels)) == [1, 5]  # the default k = (1, 5)
    assert type(mean_average_precision_at_r(x, labels)) is float
    # Recall grows with K and reaches 1 once K covers every reference.
    values = recall_at_k(x, labels, range(1, 12))
    assert all(a <= b for a, b in zip(list(values.values()), list(values.values())[1:]))
    assert recall_at_k(x, labels, 10_000) == 1.0


def test_k_beyond_the_gallery(rng):
    x = rng.standard_normal((6, 2))
    ref = rng.standard_normal((3, 2))
    labels, ref_labels = [0, 1, 0, 1, 2, 0], [1, 0, 0]
    got = recall_at_k(x, labels, (1, 3, 4, 100), ref=ref, ref_labels=ref_labels)
    want = reference.recall_at_k_reference(x, labels, (1, 3, 4, 100), ref, ref_labels)
    assert_metric_equal(got, want)
    assert got[3] == got[4] == got[100] == 1.0  # the whole gallery seen; label 2 left out


# ---- hand-computed cases ---------------------------------------------------


def test_map_at_r_by_hand_self_mode():
    x = np.array([[0.0], [1.0], [2.0], [4.0], [7.0]])
    labels = ["a", "a", "b", "a", "b"]
    # Query (position, label): its other rows nearest first (ties to the lower
    # index), R, the first R relevances and AP@R = (1/R) sum P(i) rel(i):
    #   0 (0, a): 1 a @1, 2 b @2, 3 a @4, 4 b @7       R=2  [1, 0]  (1/2)(1)   = 1/2
    #   1 (1, a): 0 a @1, 2 b @1 (tie), 3 a @3, 4 b @6  R=2  [1, 0]  (1/2)(1)   = 1/2
    #   2 (2, b): 1 a @1, 0 a @2, 3 a @2 (tie), 4 b @5  R=1  [0]     0
    #   3 (4, a): 2 b @2, 1 a @3, 4 b @3 (tie), 0 a @4  R=2  [0, 1]  (1/2)(1/2) = 1/4
    #   4 (7, b): 3 a @3, 2 b @5, 1 a @6, 0 a @7        R=1  [0]     0
    # MAP@R = (1/2 + 1/2 + 0 + 1/4 + 0) / 5 = 1/4.  Were ties broken the other
    # way, queries 1 and 3 would score 1/4 and 0 instead.
    assert mean_average_precision_at_r(x, labels) == pytest.approx(0.25, rel=1e-15)
    # Recall@1: hits for queries 0 and 1 -> 2/5.  Recall@2: also query 3
    # ([b, a]) and query 4 ([a, b]) -> 4/5; query 2 first hits at rank 4.
    assert recall_at_k(x, labels, (1, 2, 3, 4)) == pytest.approx(
        {1: 0.4, 2: 0.8, 3: 0.8, 4: 1.0}, rel=1e-15)
    assert mean_average_precision_at_r(x, labels) == pytest.approx(
        reference.map_at_r_reference(x, labels), rel=1e-15)


def test_map_at_r_by_hand_gallery_mode():
    ref = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    ref_labels = [1, 0, 1, 0, 0, 1]  # 0 = a, 1 = b: R = 3 for both classes
    x = np.array([[0.0], [10.0], [3.5]])
    labels = [0, 1, 0]
    # Query at 0 (a):   1 b, 2 a, 3 b, ...            [0, 1, 0]  (1/3)(1/2)         = 1/6
    # Query at 10 (b):  6 b, 5 a, 4 a, ...            [1, 0, 0]  (1/3)(1)           = 1/3
    # Query at 3.5 (a): 3 b and 4 a tie at 0.5 (ref index 2 before 3), then
    #                   2 a and 5 a tie at 1.5        [0, 1, 1]  (1/3)(1/2 + 2/3)   = 7/18
    # MAP@R = (3/18 + 6/18 + 7/18) / 3 = 16/54 = 8/27.
    got = mean_average_precision_at_r(x, labels, ref=ref, ref_labels=ref_labels)
    assert got == pytest.approx(8 / 27, rel=1e-15)
    # Recall@1: only the query at 10 -> 1/3; Recall@2: all three -> 1.
    assert recall_at_k(x, labels, (1, 2), ref=ref, ref_labels=ref_labels) == pytest.approx(
        {1: 1 / 3, 2: 1.0}, rel=1e-15)


def test_worst_ranking_by_hand():
    # Alternating classes on a line: every nearest neighbour has the other label.
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = [0, 1, 0, 1]
    # R = 1 for every query and its first neighbour is wrong: MAP@R = 0,
    # Recall@1 = 0.  Recall@2: query 0 sees [1 (b), 2 (a)] -> hit; query 1 sees
    # [0 (a), 2 (a)] -> miss; query 2 sees [3 (b), 1 (b)] -> miss; query 3 sees
    # [2 (a), 1 (b)] -> hit: 1/2.
    assert mean_average_precision_at_r(x, labels) == 0.0
    assert recall_at_k(x, labels, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_perfect_clustering_and_singletons_left_out():
    # Tight clusters far apart in both position and direction (for cosine).
    x = np.array([[10.0, 0.0], [10.1, 0.0], [10.0, 0.2],     # class 7
                  [0.0, 10.0], [0.1, 10.0],                  # class 3
                  [-9.0, 9.0],                               # class 5: one sample, left out
                  [-9.0, -9.0], [-9.0, -9.3], [-9.2, -9.1], [-9.1, -9.2]])  # class 1
    labels = [7, 7, 7, 3, 3, 5, 1, 1, 1, 1]
    for metric in METRICS:
        assert mean_average_precision_at_r(x, labels, metric=metric) == 1.0, metric
        assert recall_at_k(x, labels, 1, metric=metric) == 1.0, metric
    # Gallery mode: a query whose label the gallery lacks is left out too.
    got = mean_average_precision_at_r(x, labels, ref=x[[0, 1, 3, 4, 6, 7]],
                                      ref_labels=[7, 7, 3, 3, 1, 1])
    assert got == 1.0


@pytest.mark.parametrize("metric", ["recall", "map"])
def test_nothing_scorable_is_nan(metric):
    def run(x, labels, **kw):
        if metric == "map":
            return mean_average_precision_at_r(x, labels, **kw)
        return recall_at_k(x, labels, 1, **kw)

    x = np.arange(8.0).reshape(4, 2)
    assert math.isnan(run(x, [0, 1, 2, 3]))  # all singletons
    assert math.isnan(run(x[:1], [0]))  # one row: no other reference at all
    assert math.isnan(run(x[:0], np.zeros(0, dtype=int)))  # no query
    assert math.isnan(run(x, [0, 0, 1, 1], ref=x, ref_labels=[2, 2, 3, 3]))  # labels disjoint
    assert math.isnan(run(x, [0, 0, 1, 1], ref=x[:0], ref_labels=[]))  # empty gallery
    dict_result = recall_at_k(x, [0, 1, 2, 3], (1, 2))
    assert list(dict_result) == [1, 2] and all(math.isnan(v) for v in dict_result.values())


# ---- bad inputs ------------------------------------------------------------

X = np.arange(12, dtype=np.float64).reshape(4, 3)
LABELS = [0, 0, 1, 1]
REF = np.arange(15, dtype=np.float64).reshape(5, 3)
REF_LABELS = [0, 1, 0, 1, 1]


def _with_nan(a):
    a = a.copy()
    a[1, 1] = np.nan
    return a


BAD = [
    ("ref without ref_labels", lambda: recall_at_k(X, LABELS, ref=REF), ValueError,
     r"ref and ref_labels go together"),
    ("ref_labels without ref", lambda: mean_average_precision_at_r(X, LABELS,
                                                                   ref_labels=REF_LABELS),
     ValueError, r"ref and ref_labels go together"),
    ("map ref without ref_labels", lambda: mean_average_precision_at_r(X, LABELS, ref=REF),
     ValueError, r"ref and ref_labels go together"),
    ("k = 0", lambda: recall_at_k(X, LABELS, 0), ValueError, r"k must be >= 1"),
    ("k negative in a list", lambda: recall_at_k(X, LABELS, [1, -2]), ValueError,
     r"k must be >= 1"),
    ("k = True", lambda: recall_at_k(X, LABELS, True), TypeError,
     r"k must be a positive int or a sequence"),
    ("k = [True]", lambda: recall_at_k(X, LABELS, [True]), TypeError, r"k must be an integer"),
    ("k empty", lambda: recall_at_k(X, LABELS, []), ValueError, r"k must be"),
    ("k a string", lambda: recall_at_k(X, LABELS, "5"), TypeError,
     r"k must be a positive int or a sequence"),
    ("k a float", lambda: recall_at_k(X, LABELS, 2.0), TypeError,
     r"k must be a positive int or a sequence of them, got 2.0"),
    ("nn k = 0", lambda: nearest_neighbors(X, 0), ValueError, r"k must be >= 1"),
    ("nn k = True", lambda: nearest_neighbors(X, True), TypeError, r"k must be an integer"),
    ("nn k = None", lambda: nearest_neighbors(X, None), TypeError, r"k must be an integer"),
    ("labels too short", lambda: recall_at_k(X, LABELS[:3]), ValueError,
     r"labels has length 3 but x has 4 rows"),
    ("ref_labels too long", lambda: mean_average_precision_at_r(
        X, LABELS, ref=REF, ref_labels=REF_LABELS + [0]), ValueError,
     r"ref_labels has length 6 but ref has 5 rows"),
    ("labels 2-D", lambda: recall_at_k(X, np.zeros((4, 1))), ValueError, r"labels must be 1-D"),
    ("labels NaN", lambda: recall_at_k(X, [0.0, np.nan, 1.0, 1.0]), ValueError,
     r"labels contains NaN"),
    ("labels mixed kinds", lambda: recall_at_k(X, ["a", "a", "b", "b"], ref=REF,
                                               ref_labels=REF_LABELS), TypeError,
     r"same kind"),
    ("x NaN", lambda: recall_at_k(_with_nan(X), LABELS), ValueError, r"x contains NaN"),
    ("x NaN map", lambda: mean_average_precision_at_r(_with_nan(X), LABELS), ValueError,
     r"x contains NaN"),
    ("ref NaN", lambda: recall_at_k(X, LABELS, ref=_with_nan(REF), ref_labels=REF_LABELS),
     ValueError, r"ref contains NaN"),
    ("nn x NaN", lambda: nearest_neighbors(_with_nan(X), 2), ValueError, r"x contains NaN"),
    ("nn ref inf", lambda: nearest_neighbors(X, 2, np.full((2, 3), np.inf)), ValueError,
     r"ref contains NaN or infinity"),
    ("D mismatch", lambda: recall_at_k(X, LABELS, ref=REF[:, :2], ref_labels=REF_LABELS),
     ValueError, r"ref has 2 features per row but x has 3"),
    ("nn D mismatch", lambda: nearest_neighbors(X, 1, REF[:, :2]), ValueError,
     r"ref has 2 features per row but x has 3"),
    ("x 1-D", lambda: nearest_neighbors(X[0], 1), ValueError, r"x must be 2-D"),
    ("x int", lambda: mean_average_precision_at_r(X.astype(int), LABELS), TypeError,
     r"x must be a float"),
    ("unknown metric", lambda: recall_at_k(X, LABELS, metric="manhattan"), ValueError,
     r"metric must be one of"),
    ("nn unknown metric", lambda: nearest_neighbors(X, 1, metric="l1"), ValueError,
     r"metric must be one of"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_inputs_are_not_modified(rng):
    x = rng.standard_normal((9, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3])
    ref = rng.standard_normal((5, 3))
    ref_labels = np.array([0, 1, 2, 3, 3])
    copies = [a.copy() for a in (x, labels, ref, ref_labels)]
    recall_at_k(x, labels, (1, 3))
    mean_average_precision_at_r(x, labels, ref=ref, ref_labels=ref_labels, metric="cosine")
    nearest_neighbors(x, 4, ref)
    for a, b in zip((x, labels, ref, ref_labels), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_blocked_scoring_equals_whole(monkeypatch, mode):
    """Queries scored in blocks (bounded memory) give exactly the numbers of one
    pass, including self mode's drop of the query itself when exact duplicates
    tie with it."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, size=(300, 3)).astype(np.float64)  # many exact duplicates
    labels = rng.integers(0, 6, 300)
    kw = {} if mode == "self" else dict(ref=x[::2] + 0.5, ref_labels=labels[::2])
    whole = (metrics.recall_at_k(x, labels, k=(1, 3, 10), **kw),
             metrics.mean_average_precision_at_r(x, labels, **kw))
    monkeypatch.setattr(metrics, "_BLOCK_ENTRIES", 7 * 60)  # a handful of rows per block
    blocked = (metrics.recall_at_k(x, labels, k=(1, 3, 10), **kw),
               metrics.mean_average_precision_at_r(x, labels, **kw))
    assert blocked[0] == whole[0]  # counts: exactly equal
    assert blocked[1] == pytest.approx(whole[1], rel=1e-12)  # a sum in another order
    want_recall = reference.recall_at_k_reference(x, labels, (1, 3, 10), **kw)
    assert blocked[0] == pytest.approx(want_recall, rel=1e-12)
    assert blocked[1] == pytest.approx(reference.map_at_r_reference(x, labels, **kw), rel=1e-12)
