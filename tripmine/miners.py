"""Triplet miners: which (anchor, positive, negative) triplets to train on.

Every miner is one pass of the C core's tile engine over the batch (and the
reference set, when given): no N x M matrix is ever materialised.  Positives
of anchor ``a`` are the reference rows with its label (never ``a`` itself in
self mode); negatives are the rows with another label; ties go to the lowest
reference index.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _core
from . import _problem as problems
from . import _validation as check

__all__ = ["Triplets", "batch_hard", "semi_hard", "distance_weighted"]

#: distance_weighted's defaults (Wu et al. 2017), also used by triplet_loss.
DEFAULT_CUTOFF = 0.5
DEFAULT_NONZERO_LOSS_CUTOFF = 1.4

#: Rows must have |norm - 1| below this for distance_weighted without normalize.
UNIT_NORM_TOLERANCE = 1e-3


class Triplets(NamedTuple):
    """Mined triplets: ``anchor`` indexes rows of ``x``; ``positive`` and
    ``negative`` index rows of the reference set (``x`` itself in self mode)."""

    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray


def _empty() -> Triplets:
    return Triplets(*(np.empty(0, dtype=np.int64) for _ in range(3)))


def _subset(triplets: Triplets, max_triplets: int | None, seed: int) -> Triplets:
    """A seeded uniform subset of max_triplets triplets, order preserved."""
    total = triplets.anchor.shape[0]
    if max_triplets is None or total <= max_triplets:
        return triplets
    keep = _keep_numbers(total, max_triplets, seed)
    return Triplets(*(a[keep] for a in triplets))


def _keep_numbers(total: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x7472_6970])  # a stream apart from the mining draws
    return np.sort(rng.choice(total, size=size, replace=False)).astype(np.int64)


def _per_pair(problem: problems.Problem, positive: np.ndarray, negative: np.ndarray,
              offsets: np.ndarray) -> Triplets:
    """Slots (one per positive pair) -> triplets of the pairs that got a negative."""
    anchor = np.repeat(np.arange(problem.n, dtype=np.int64), np.diff(offsets))
    chosen = negative >= 0
    return Triplets(anchor[chosen], positive[chosen], negative[chosen])


def batch_hard(x: Any, labels: Any, *, ref: Any = None, ref_labels: Any = None,
               ref_offset: int | None = None, metric: str = "euclidean",
               normalize: bool = False, check_finite: bool = True) -> Triplets:
    """Batch-hard mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    Per anchor ``a``: ``p* = argmax_{p positive} d(a, p)`` and
    ``n* = argmin_{n negative} d(a, n)``; anchors without a positive or a
    negative are skipped.  One triplet per remaining anchor, in anchor order.

    ``ref_offset`` (with ``ref``): ``x[i]`` is the sample ``ref[ref_offset + i]``,
    so that pair is neither a positive nor a negative, as ``(i, i)`` in self
    mode.  Mining the slice ``x = X[o:o+n]`` against ``ref = X`` with
    ``ref_offset = o`` gives self mode's triplets of anchors ``o .. o+n-1``
    (anchors numbered from 0 within the slice).
    """
    return mine_batch_hard(problems.prepare(x, labels, ref, ref_labels, metric=metric,
                                            normalize=normalize, check_finite=check_finite,
                                            ref_offset=ref_offset))


def mine_batch_hard(problem: problems.Problem) -> Triplets:
    """batch_hard on an already prepared problem (used by the losses)."""
    if problem.n == 0:
        return _empty()
    positive, negative = _core.batch_hard(problem.x, problem.ref, problem.metric, problem.codes,
                                          problem.ref_codes, problem.ref_offset)
    keep = (positive >= 0) & (negative >= 0)
    anchor = np.flatnonzero(keep).astype(np.int64)
    return Triplets(anchor, positive[keep], negative[keep])


def semi_hard(x: Any, labels: Any, *, margin: float = 0.2, select: str = "closest",
              seed: int | None = None, max_triplets: int | None = None, ref: Any = None,
              ref_labels: Any = None, ref_offset: int | None = None, metric: str = "euclidean",
              normalize: bool = False, check_finite: bool = True) -> Triplets:
    """Semi-hard negatives for every positive pair ``(a, p)``.

    ``select="closest"``: the negative with the smallest ``d(a, n) > d(a, p)``,
    else the farthest negative (TF-Addons ``TripletSemiHardLoss``,
    sentence-transformers ``BatchSemiHardTripletLoss``).
    ``select="random"``: uniform among negatives with
    ``d(a, p) < d(a, n) < d(a, p) + margin`` (FaceNet, Schroff et al. 2015);
    pairs with none are skipped.  Draws come from the counter-based generator
    keyed on ``(seed, anchor, positive)``: the same seed gives the same
    triplets on any number of threads; ``seed=None`` draws fresh entropy.
    ``select="all"``: every ``(a, p, n)`` with ``d(a, p) < d(a, n) <= d(a, p) +
    margin`` (pytorch-metric-learning ``TripletMarginMiner("semihard")``).

    Output order: anchor, then positive index, then (``"all"``) negative
    index.  ``max_triplets``: when more were mined, a uniform random subset of
    that size (seeded by ``seed``) is kept, order preserved.

    ``ref_offset``: as in :func:`batch_hard`; the random draws of anchor ``i``
    are keyed on ``ref_offset + i``, so a slice mines exactly self mode's
    triplets of its anchors -- except with ``max_triplets`` (when it cuts), whose
    subset is drawn over the call's whole set of triplets.
    """
    margin = check.non_negative(margin, "margin")
    check.choice(select, "select", ("closest", "random", "all"))
    max_triplets = check.optional_count(max_triplets, "max_triplets")
    seed_value = problems.resolve_seed(seed)
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, ref_offset=ref_offset)
    return mine_semi_hard(problem, margin, select, seed_value, max_triplets)


def mine_semi_hard(problem: problems.Problem, margin: float, select: str, seed_value: int,
                   max_triplets: int | None = None) -> Triplets:
    """semi_hard on an already prepared problem, with validated options."""
    if problem.n == 0:
        return _empty()
    args = (problem.x, problem.ref, problem.metric, problem.codes, problem.ref_codes, margin)
    ref_offset = problem.ref_offset
    if select == "all":
        counts = _core.semi_hard_all_counts(*args, ref_offset=ref_offset)
        offsets = np.zeros(problem.n + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        keep = None
        if max_triplets is not None and total > max_triplets:
            keep = _keep_numbers(total, max_triplets, seed_value)
        return Triplets(*_core.semi_hard_all_write(*args, offsets, keep, ref_offset=ref_offset))
    offsets = problems.positive_offsets(problem)
    positive, negative = _core.semi_hard(*args, select, seed_value, offsets,
                                         ref_offset=ref_offset)
    return _subset(_per_pair(problem, positive, negative, offsets), max_triplets, seed_value)


def check_weighted_metric(metric: str) -> None:
    if metric != "euclidean":
        raise ValueError(f"distance_weighted is defined for metric='euclidean' on the unit "
                         f"sphere, got metric={metric!r}")


def check_unit_norm(problem: problems.Problem) -> None:
    for name, rows in (("x", problem.x), ("ref", problem.ref)):
        if rows is None or rows.size == 0:
            continue
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        worst = float(np.max(np.abs(norms - 1.0)))
        if worst > UNIT_NORM_TOLERANCE:
            raise ValueError(
                f"distance_weighted needs unit-norm embeddings (its sampling distribution is "
                f"that of points on the unit sphere), but a row of {name} has norm "
                f"{1.0 + worst if norms.max() > 1 else 1.0 - worst:.4g}; pass normalize=True"
            )


def distance_weighted(x: Any, labels: Any, *, cutoff: float = DEFAULT_CUTOFF,
                      nonzero_loss_cutoff: float = DEFAULT_NONZERO_LOSS_CUTOFF,
                      seed: int | None = None, ref: Any = None, ref_labels: Any = None,
                      ref_offset: int | None = None, metric: str = "euclidean",
                      normalize: bool = False, check_finite: bool = True) -> Triplets:
    """Distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling Matters").

    For each positive pair ``(a, p)`` one negative ``n`` is drawn with
    probability proportional to ``w(d(a, n))``, the inverse of the density of
    pairwise distances on the unit sphere in ``dim = D`` dimensions::

        t = max(d, cutoff)
        log w = (2 - dim) log t - ((dim - 3) / 2) log(1 - t^2 / 4)

    with ``w = 0`` for non-negatives and for ``d >= nonzero_loss_cutoff``
    (and where ``1 - t^2/4 <= 0``).  Anchors whose weights are all zero are
    skipped.  Embeddings must be unit-norm (pass ``normalize=True``), and the
    metric euclidean.  Seeded like :func:`semi_hard`; ``ref_offset`` as there
    (a slice draws exactly the negatives self mode draws for its anchors).
    """
    check_weighted_metric(metric)
    cutoff = check.positive_real(cutoff, "cutoff")
    nonzero_loss_cutoff = check.positive_real(nonzero_loss_cutoff, "nonzero_loss_cutoff")
    seed_value = problems.resolve_seed(seed)
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, ref_offset=ref_offset)
    if not normalize:
        check_unit_norm(problem)
    return mine_distance_weighted(problem, cutoff, nonzero_loss_cutoff, seed_value)


def mine_distance_weighted(problem: problems.Problem, cutoff: float, nonzero_loss_cutoff: float,
                           seed_value: int) -> Triplets:
    """distance_weighted on an already prepared (unit-norm, euclidean) problem."""
    if problem.n == 0:
        return _empty()
    offsets = problems.positive_offsets(problem)
    positive, negative = _core.distance_weighted(problem.x, problem.ref, problem.codes,
                                                 problem.ref_codes, cutoff, nonzero_loss_cutoff,
                                                 seed_value, offsets, problem.ref_offset)
    return _per_pair(problem, positive, negative, offsets)
