"""Comparison helpers for mined triplets: quasi-equality with the reference.

float64 triplets must equal the reference's exactly; float32 ones may differ
only where the reference's own (float64) distances tie within the float32
tolerance (scikit-learn's pairwise-distances-reduction tests do the same).
"""

from __future__ import annotations

import numpy as np

import tripmine
from conftest import distance_rtol


def tie_tolerance(dtype, d, metric, normalize, case):
    """How far apart two reference distances may be and still count as a tie,
    or None where the implementation must reproduce the reference exactly.

    Exact: float64, and the integer grid without normalisation or cosine (the
    Gram identity is exact on small integers, so ties are exact in both).
    Otherwise the per-dtype distance tolerance of conftest, plus an absolute
    term for rows normalised in the working precision (cosine, normalize).
    """
    exact_grid = case == "grid" and metric != "cosine" and not normalize
    if exact_grid or (np.dtype(dtype) == np.float64 and case != "grid"):
        return None
    rtol = distance_rtol(dtype, d)
    atol = 64 * float(np.finfo(dtype).eps) if (normalize or metric == "cosine") else 0.0
    return lambda d1, d2: rtol * max(d1, d2) + atol


def rows(triplets):
    """Triplets as a list of (anchor, positive, negative) int tuples."""
    return [tuple(int(v) for v in row) for row in zip(*triplets)]


def assert_triplets_type(got):
    assert isinstance(got, tripmine.Triplets)
    for column in got:
        assert isinstance(column, np.ndarray) and column.dtype == np.int64 and column.ndim == 1
    assert len(got.anchor) == len(got.positive) == len(got.negative)


def assert_quasi_equal(got, want, dist, tol, pos, neg, boundary=None):
    """got equals want, except that a positive or negative index may differ
    where the two candidates' reference distances tie within tol, or (with
    boundary, per triplet) where either candidate ties with the boundary value.
    Every got triplet must be label-valid either way."""
    assert_triplets_type(got)
    if tol is None:
        assert rows(got) == rows(want)
        return
    assert len(got.anchor) == len(want[0])
    np.testing.assert_array_equal(got.anchor, want[0])
    for a, p, n in zip(*got):
        assert pos[a, p] and neg[a, n], (a, p, n)
    for column in (1, 2):
        if boundary is not None and column == 1:
            np.testing.assert_array_equal(got[1], want[1])  # pairs are label-determined
            continue
        for k in np.nonzero(got[column] != want[column])[0]:
            a, g, w = want[0][k], got[column][k], want[column][k]
            dg, dw = dist[a, g], dist[a, w]
            tied = abs(dg - dw) <= tol(dg, dw)
            if boundary is not None:
                b = boundary[k]
                tied = tied or abs(dg - b) <= tol(dg, b) or abs(dw - b) <= tol(dw, b)
            assert tied, f"triplet {k}: got {g} at {dg!r}, want {w} at {dw!r}"


def near(value, target, tol):
    """value ties with target within tol."""
    return abs(value - target) <= tol(value, target)


def assert_window_quasi_equal(got, want, dist, tol, margin):
    """semi_hard(select="all"): the same set (in order), except triplets whose
    d(a,n) ties with a window edge d(a,p) or d(a,p) + margin within tol."""
    assert_triplets_type(got)
    got_rows = rows(got)
    assert got_rows == sorted(got_rows)
    if tol is None:
        assert got_rows == rows(want)
        return
    for a, p, n in set(got_rows) ^ set(rows(want)):
        dp, dn = dist[a, p], dist[a, n]
        assert near(dn, dp, tol) or near(dn, dp + margin, tol), (a, p, n, dp, dn)


def assert_random_choices_valid(got, pairs, dist, tol, margin, pos, neg):
    """semi_hard(select="random"): one triplet per reference pair, whose negative
    lies in the reference's candidate set (float32: or on a window edge)."""
    assert_triplets_type(got)
    got_rows = rows(got)
    assert [(a, p) for a, p, _ in got_rows] == sorted((a, p) for a, p, _ in got_rows)
    want = {(a, p): set(c.tolist()) for a, p, c in pairs}
    by_pair = {(a, p): n for a, p, n in got_rows}
    assert len(by_pair) == len(got_rows), "one negative per positive pair"
    if tol is None:
        assert list(by_pair) == [(a, p) for a, p, _ in pairs]
        for pair, n in by_pair.items():
            assert n in want[pair], (pair, n)
        return

    def on_edge(a, p, n):
        return near(dist[a, n], dist[a, p], tol) or near(dist[a, n], dist[a, p] + margin, tol)

    for (a, p), n in by_pair.items():
        assert pos[a, p] and neg[a, n]
        assert n in want.get((a, p), ()) or on_edge(a, p, n), (a, p, n)
    for (a, p), candidates in want.items():
        if (a, p) not in by_pair:  # skipped: every candidate must be on an edge
            assert all(on_edge(a, p, n) for n in candidates), (a, p)


def assert_distance_weighted_valid(got, probabilities, dist, pos, neg, tol, cutoff=1.4):
    """One negative per positive pair of every anchor with some weight, drawn
    where the reference gives it positive probability (float32: or within
    tolerance of the nonzero_loss_cutoff)."""
    assert_triplets_type(got)
    got_rows = rows(got)
    weighted = probabilities.sum(axis=1) > 0
    want_pairs = [(a, p) for a in range(len(dist)) if weighted[a]
                  for p in np.nonzero(pos[a])[0]]
    got_pairs = [(a, p) for a, p, _ in got_rows]
    if tol is None:
        assert got_pairs == want_pairs
        assert all(probabilities[a, n] > 0 for a, _, n in got_rows)
        return
    assert got_pairs == sorted(got_pairs)
    for a, p, n in got_rows:
        assert pos[a, p]
        assert probabilities[a, n] > 0 or near(dist[a, n], cutoff, tol), (a, p, n)
    for a, _ in set(got_pairs) ^ set(want_pairs):  # anchors whose weight hinges on the cutoff
        assert any(near(dist[a, n], cutoff, tol) for n in np.nonzero(neg[a])[0]), a
