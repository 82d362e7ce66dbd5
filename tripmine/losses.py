"""Metric-learning losses with exact analytic gradients.

``triplet_loss`` mines (or takes) triplets and returns the margin loss, its
gradient with respect to ``x`` (and ``ref``), and monitoring counts;
``contrastive_loss`` does the same over all pairs.  Neither ever builds an
N x M (let alone N x N x N) array: batch-all and contrastive are reduced row
by row inside the C core's tile engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core, miners
from . import _problem as problems
from . import _validation as check
from ._dispatch import dispatch
from .miners import Triplets

__all__ = ["TripletLossResult", "ContrastiveLossResult", "triplet_loss", "contrastive_loss"]

MINING = ("batch_hard", "batch_all", "semi_hard", "distance_weighted")
REDUCTIONS = ("auto", "mean", "sum", "mean_nonzero", "none")


@dataclass(frozen=True)
class TripletLossResult:
    """What :func:`triplet_loss` returns.

    ``loss`` is a float, or for ``reduction="none"`` a float64 vector (one
    entry per triplet; for batch-all one per anchor).  ``grad`` is dL/dx
    (None when ``grad=False``); ``ref_grad`` is dL/dref when ``ref`` was given.
    ``fraction_active`` = ``n_active / n_triplets`` (Moindrot's
    ``fraction_positive_triplets``): watch it to detect collapse.
    """

    loss: float | np.ndarray
    grad: np.ndarray | None
    ref_grad: np.ndarray | None
    n_triplets: int
    n_active: int
    fraction_active: float
    triplets: Triplets | None
    seed: int | None = None


@dataclass(frozen=True)
class ContrastiveLossResult:
    """What :func:`contrastive_loss` returns; ``loss`` as in :class:`TripletLossResult`
    (``reduction="none"`` gives one entry per anchor)."""

    loss: float | np.ndarray
    grad: np.ndarray | None
    ref_grad: np.ndarray | None
    n_pairs: int
    n_positive_pairs: int
    n_negative_pairs: int
    n_active: int
    fraction_active: float


def _fraction(active: int, total: int) -> float:
    return active / total if total else 0.0


def _given_triplets(triplets: Any, n: int, m: int, *, as_array: Any = None) -> Triplets:
    """Validated int64 index arrays of given triplets.  ``as_array`` turns one index
    sequence into the backend's array (NumPy by default; the GPU path passes CuPy's)."""
    try:
        triplets = tuple(triplets)
    except TypeError:
        triplets = ()
    if len(triplets) != 3:
        raise ValueError(f"mining must be one of {list(MINING)} or Triplets(anchor, positive, "
                         f"negative)")
    arrays = []
    for name, values, limit, rows in zip(("anchor", "positive", "negative"), triplets,
                                         (n, m, m), ("x", "ref", "ref")):
        arr = np.asarray(values) if as_array is None else as_array(values)
        if arr.ndim != 1:
            raise ValueError(f"mining.{name} must be 1-D, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"mining.{name} must hold integer indices, got dtype {arr.dtype}")
        arr = check.c_array(arr, np.int64) if as_array is None else as_array(arr, np.int64)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
            raise ValueError(f"mining.{name} has indices outside [0, {limit}) (the rows of "
                             f"{rows})")
        arrays.append(arr)
    if not arrays[0].shape == arrays[1].shape == arrays[2].shape:
        raise ValueError(f"mining.anchor, .positive and .negative must have equal lengths, got "
                         f"{[a.shape[0] for a in arrays]}")
    return Triplets(*arrays)


def mine_triplets(problem, mining: str | Triplets, margin: float, metric: str,
                  normalize: bool, seed: Any) -> tuple[Triplets, int | None]:
    """The triplets of a mining rule other than batch-all (or given ones, checked) and the
    seed used: shared by :func:`triplet_loss` and :func:`tripmine.margin.margin_loss`."""
    if not isinstance(mining, str):
        return _given_triplets(mining, problem.n, problem.m), None
    if mining == "batch_hard":
        return miners.mine_batch_hard(problem), None
    if mining == "semi_hard":
        return miners.mine_semi_hard(problem, margin, "closest", 0), None
    miners.check_weighted_metric(metric)
    if not normalize:
        miners.check_unit_norm(problem)
    used_seed = problems.resolve_seed(seed)
    return miners.mine_distance_weighted(problem, miners.DEFAULT_CUTOFF,
                                         miners.DEFAULT_NONZERO_LOSS_CUTOFF, used_seed), used_seed


@dispatch
def triplet_loss(x: Any, labels: Any, *, mining: str | Triplets = "batch_hard",
                 margin: float = 0.2, soft: bool = False, metric: str = "euclidean",
                 normalize: bool = False, reduction: str = "auto", ref: Any = None,
                 ref_labels: Any = None, ref_offset: int | None = None, seed: int | None = None,
                 grad: bool = True, check_finite: bool = True) -> TripletLossResult:
    """Triplet margin loss ``l = max(0, d(a,p) - d(a,n) + margin)`` and its gradient.

    ``soft=True`` uses ``softplus(d(a,p) - d(a,n) + margin)`` instead, computed
    without overflow (Hermans et al.'s soft margin is ``margin=0``).

    mining:
      * ``"batch_hard"`` -- :func:`~tripmine.batch_hard` (Hermans et al. 2017);
      * ``"batch_all"`` -- every valid triplet, never enumerated: per anchor
        one sort of its positives and a binary search per negative;
      * ``"semi_hard"`` -- :func:`~tripmine.semi_hard` with ``select="closest"``
        and this ``margin`` (TF-Addons ``TripletSemiHardLoss``);
      * ``"distance_weighted"`` -- :func:`~tripmine.distance_weighted` with its
        default cutoffs and ``seed`` (needs unit-norm rows or ``normalize=True``);
      * a :class:`~tripmine.Triplets` -- your own triplets (``labels`` may be None).

    reduction: ``"mean"`` over triplets, ``"sum"``, ``"mean_nonzero"`` (over
    triplets with ``l > 0``; 0 if none -- pytorch-metric-learning's
    AvgNonZeroReducer, Moindrot's batch-all), ``"none"`` (the vector of losses;
    ``grad`` is then the gradient of its sum); ``"auto"`` is ``"mean_nonzero"``
    for batch-all and ``"mean"`` otherwise.

    Distances that enter the loss of mined triplets are recomputed exactly
    (direct difference in double); batch-all uses the engine's distances,
    whose relative error is documented in the README.  Gradients are
    analytic, with subgradient 0 at the hinge and at zero distance.
    Degenerate batches (no valid triplet) give loss 0 and a zero gradient.

    ``ref_offset`` (with ``ref``): ``x[i]`` is the sample ``ref[ref_offset + i]``
    (see :func:`~tripmine.batch_hard`).  Then ``grad`` is the anchor side and
    ``ref_grad`` the reference side of the gradient: for slices
    ``x = X[o:o+n]``, ``ref = X``, ``ref_offset = o`` and ``reduction="sum"``,
    the losses and counts of the slices add up to self mode's on ``X``, and
    each slice's ``grad`` plus the matching rows of the summed ``ref_grad``
    is self mode's gradient (to rounding) -- what
    :mod:`tripmine.torch.distributed` builds on.  Ignored (but checked) with
    given ``Triplets``.
    """
    margin = check.non_negative(margin, "margin")
    soft = check.flag(soft, "soft")
    want_grad = check.flag(grad, "grad")
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    given = not isinstance(mining, str)
    if not given:
        check.choice(mining, "mining", MINING)
    if reduction == "auto":
        reduction = "mean_nonzero" if mining == "batch_all" else "mean"
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, need_labels=not given,
                               ref_offset=ref_offset)
    if mining == "batch_all":
        loss, n_triplets, active, per_anchor, g, rg = _core.batch_all_loss(
            problem.x, problem.ref, problem.metric, problem.codes, problem.ref_codes, margin,
            soft, reduction, want_grad, reduction == "none", problem.ref_offset)
        g, rg = problem.chain(g, rg)
        return TripletLossResult(per_anchor if reduction == "none" else float(loss), g, rg,
                                 n_triplets, active, _fraction(active, n_triplets), None)

    triplets, used_seed = mine_triplets(problem, mining, margin, metric, normalize, seed)
    loss, active, per_triplet, g, rg = _core.triplet_loss(
        problem.x, problem.ref, problem.metric, triplets.anchor, triplets.positive,
        triplets.negative, margin, soft, reduction, want_grad, reduction == "none")
    g, rg = problem.chain(g, rg)
    count = int(triplets.anchor.shape[0])
    return TripletLossResult(per_triplet if reduction == "none" else float(loss), g, rg, count,
                             active, _fraction(active, count), triplets, used_seed)


@dispatch
def contrastive_loss(x: Any, labels: Any, *, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     power: int = 1, metric: str = "euclidean", normalize: bool = False,
                     reduction: str = "mean_nonzero", ref: Any = None, ref_labels: Any = None,
                     ref_offset: int | None = None, grad: bool = True,
                     check_finite: bool = True) -> ContrastiveLossResult:
    """Contrastive loss over all ordered pairs (Hadsell, Chopra & LeCun 2006).

    Positive pair: ``max(0, d - pos_margin) ** power``; negative pair:
    ``max(0, neg_margin - d) ** power``; in self mode the pairs ``(i, i)`` are
    excluded.  reduction: ``"mean_nonzero"`` (default) = mean of the nonzero
    positive terms + mean of the nonzero negative terms (pytorch-metric-learning
    ``ContrastiveLoss``); ``"mean"`` over all pairs (with ``power=2``: Hadsell /
    DeepID2); ``"sum"``; ``"none"`` (one entry per anchor: the sum of its
    pair terms; ``grad`` is the gradient of their sum).

    ``ref_offset`` (with ``ref``): ``x[i]`` is ``ref[ref_offset + i]``, whose pair
    is then excluded as ``(i, i)`` is in self mode; slices add up to self mode
    as described in :func:`triplet_loss`.
    """
    pos_margin = check.non_negative(pos_margin, "pos_margin")
    neg_margin = check.non_negative(neg_margin, "neg_margin")
    if isinstance(power, (bool, np.bool_)) or power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    want_grad = check.flag(grad, "grad")
    reduction = check.choice(reduction, "reduction", ("mean", "sum", "mean_nonzero", "none"))
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, ref_offset=ref_offset)
    loss, counts, per_anchor, g, rg = _core.contrastive_loss(
        problem.x, problem.ref, problem.metric, problem.codes, problem.ref_codes, pos_margin,
        neg_margin, int(power), reduction, want_grad, reduction == "none", problem.ref_offset)
    g, rg = problem.chain(g, rg)
    n_pos, n_neg, act_pos, act_neg = counts
    pairs, active = n_pos + n_neg, act_pos + act_neg
    return ContrastiveLossResult(per_anchor if reduction == "none" else float(loss), g, rg, pairs,
                                 n_pos, n_neg, active, _fraction(active, pairs))
