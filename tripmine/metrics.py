"""Retrieval metrics: Recall@K and MAP@R (mean average precision at R).

These are the standard numbers of face verification, re-identification and
image retrieval (Musgrave et al., "A Metric Learning Reality Check", 2020, for
MAP@R).  Every query row of ``x`` ranks the reference rows by distance; the
nearest neighbours come from the C core's tile engine (a streaming top-k per
row), so no N x M distance matrix is ever held.

Self mode (``ref=None``): the references are ``x`` itself and a query never
retrieves itself (its own row is skipped, other rows with identical
embeddings are not).  Reference mode: queries ``x`` against a separate
gallery ``ref`` (``ref_labels`` required), nothing skipped.

Ranking ties (equal distances) go to the lower reference index, the same rule
as the miners.  Queries with no relevant reference (a class with a single
sample in self mode, or a label absent from the gallery) cannot be scored;
they are left out of both metrics (the convention of pytorch-metric-learning's
``AccuracyCalculator``).  When no query can be scored the metrics are NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _core
from . import _validation as check
from ._dispatch import dispatch

__all__ = ["nearest_neighbors", "recall_at_k", "mean_average_precision_at_r"]


@dispatch
def nearest_neighbors(x: Any, k: int, ref: Any = None, *, metric: str = "euclidean",
                      check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of every row of ``x``, nearest first.

    Returns ``(indices, distances)``, both of shape (N, k): int64 reference
    row numbers and their distances (dtype of the computation).  In self mode a
    row is never its own neighbour.  Where fewer than ``k`` references exist,
    the missing slots hold index -1 and distance ``inf``.  Memory is
    O(N k + tile), never O(N M).
    """
    k = check.positive_int(k, "k")
    metric_id = check.metric_code(metric)
    x_arr, ref_arr = check.embeddings(x, ref, check_finite=check_finite)
    n = x_arr.shape[0]
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=x_arr.dtype)
    if n:
        _core.nearest_neighbors(x_arr, ref_arr, metric_id, k, indices, distances)
    return indices, distances


def _relevant_counts(codes: np.ndarray, gallery: np.ndarray, self_mode: bool) -> np.ndarray:
    """R per query: the gallery rows sharing its label (minus itself in self mode)."""
    classes, counts = np.unique(gallery, return_counts=True)
    if len(classes) == 0:
        return np.zeros(len(codes), dtype=np.int64)
    slot = np.minimum(np.searchsorted(classes, codes), len(classes) - 1)
    r = np.where(classes[slot] == codes, counts[slot], 0).astype(np.int64)
    return r - 1 if self_mode else r


# Neighbour-list entries held at once: queries are scored in blocks of
# _BLOCK_ENTRIES // depth rows, so memory stays bounded even when a class is
# as large as the batch (MAP@R's depth is the largest class).
_BLOCK_ENTRIES = 1 << 21


def _relevance_blocks(x: Any, labels: Any, ref: Any, ref_labels: Any, metric: str,
                      depth: int | None, check_finite: bool
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (relevant, r) per block of queries: whether each query's first
    ``depth`` neighbours share its label (rows x depth booleans; ``depth=None``
    means the largest R), and R, the relevant references of each query."""
    if (ref is None) != (ref_labels is None):
        raise ValueError("ref and ref_labels go together: give both (gallery mode) or "
                         "neither (self mode)")
    check.metric_code(metric)  # even when the batch is too small to search
    x_arr, ref_arr = check.embeddings(x, ref, check_finite=check_finite)
    self_mode = ref_arr is None
    n = x_arr.shape[0]
    m = n if self_mode else ref_arr.shape[0]
    codes, ref_codes = check.labels(labels, ref_labels, n=n, m=m)
    gallery = codes if self_mode else ref_codes
    r = _relevant_counts(codes, gallery, self_mode)
    candidates = m - 1 if self_mode else m
    if depth is None:
        depth = int(r.max(initial=0))
    depth = max(1, min(depth, candidates))
    if n == 0 or candidates <= 0:
        yield np.zeros((n, depth), dtype=bool), r
        return
    rows = max(1, _BLOCK_ENTRIES // depth)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        if hi - lo == n:
            indices, _ = nearest_neighbors(x_arr, depth, ref_arr, metric=metric,
                                           check_finite=False)
        elif not self_mode:
            indices, _ = nearest_neighbors(x_arr[lo:hi], depth, ref_arr, metric=metric,
                                           check_finite=False)
        else:
            # A block of queries against all of x: one neighbour more, then drop
            # the query itself (or, if exact duplicates pushed it out, the last).
            indices, _ = nearest_neighbors(x_arr[lo:hi], depth + 1, x_arr, metric=metric,
                                           check_finite=False)
            keep = indices != np.arange(lo, hi)[:, None]
            keep[keep.all(axis=1), -1] = False
            indices = indices[keep].reshape(hi - lo, depth)
        found = indices >= 0
        block_codes = codes[lo:hi, None]
        yield found & (gallery[np.where(found, indices, 0)] == block_codes), r[lo:hi]


def parse_ks(k: Any) -> tuple[bool, list[int]]:
    """``recall_at_k``'s k: (whether one int was given, the distinct ks in order)."""
    single = isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))
    if single:
        ks = [k]
    elif isinstance(k, (str, bytes)) or not isinstance(k, Iterable):
        raise TypeError(f"k must be a positive int or a sequence of them, got {k!r}")
    else:
        ks = list(k)
    if not ks:
        raise ValueError("k must be a positive int or a non-empty sequence of them")
    return single, list(dict.fromkeys(check.positive_int(v, "k") for v in ks))  # each k once


@dispatch
def recall_at_k(x: Any, labels: Any, k: int | Sequence[int] = (1, 5), *, ref: Any = None,
                ref_labels: Any = None, metric: str = "euclidean",
                check_finite: bool = True) -> float | dict[int, float]:
    """Recall@K: the fraction of queries with a same-label reference among their K nearest.

    ``k`` is one positive int (the result is a float) or a sequence of them
    (the result is ``{k: recall}``).  Queries with no relevant reference are
    left out (module docstring); NaN when none is left.  Memory: O(N max(k))
    at most, never O(N M).
    """
    single, ks = parse_ks(k)
    hits = dict.fromkeys(ks, 0)
    scored = 0
    for relevant, r in _relevance_blocks(x, labels, ref, ref_labels, metric, max(ks),
                                         check_finite):
        usable = r > 0
        scored += int(usable.sum())
        first_hit = np.cumsum(relevant, axis=1) > 0  # a hit within the first j + 1
        for v in ks:
            hits[v] += int(first_hit[usable, min(v, relevant.shape[1]) - 1].sum())
    out = {v: hits[v] / scored if scored else float("nan") for v in ks}
    return out[ks[0]] if single else out


@dispatch
def mean_average_precision_at_r(x: Any, labels: Any, *, ref: Any = None, ref_labels: Any = None,
                                metric: str = "euclidean", check_finite: bool = True) -> float:
    """MAP@R (Musgrave et al. 2020), averaged over the queries.

    For a query with R relevant references, take its R nearest neighbours and
    average ``P(i)`` (precision among the first i) over the ranks i that hold
    a relevant reference, dividing by R: ``AP@R = sum_i P(i) rel(i) / R``.
    It rewards a ranking that puts all same-class references first, unlike
    Recall@1.  Queries with R = 0 are left out; NaN when none is left.
    Memory: neighbour lists for a block of queries at a time (about 2**21
    entries), never O(N M).
    """
    total, scored = 0.0, 0
    for relevant, r in _relevance_blocks(x, labels, ref, ref_labels, metric, None,
                                         check_finite):
        usable = r > 0
        ranks = np.arange(1, relevant.shape[1] + 1)
        rel = relevant & (ranks[None, :] <= r[:, None])
        precision = np.cumsum(rel, axis=1) / ranks[None, :]
        ap = (precision * rel).sum(axis=1) / np.maximum(r, 1)
        total += float(ap[usable].sum())
        scored += int(usable.sum())
    return total / scored if scored else float("nan")
