"""Margin loss (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling Matters in Deep Embedding
Learning") with a learnable boundary beta, over mined or given triplets.

Per triplet (a, p, n), with alpha = ``margin`` and beta_a the boundary of the anchor's
class (or one shared value)::

    loss = max(0, d(a,p) - beta_a + alpha) + max(0, beta_a - d(a,n) + alpha) + nu * beta_a

``reduction="mean"`` divides the sum by the number of nonzero hinge terms (0 when there is
none), as pytorch-metric-learning's ``MarginLoss`` does; ``"sum"`` adds; ``"none"`` returns
the per-triplet vector.  The result's ``beta_grad`` (the shape of ``beta``) is dL/dbeta,
so a caller can learn beta; ``grad`` (and ``ref_grad``) is dL/dx, analytic, through each
active hinge's own distance.  Distances are recomputed exactly per triplet, as
:func:`tripmine.triplet_loss` does, in the same C reducer (csrc/losses_impl.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from . import _problem as problems
from . import _validation as check
from ._dispatch import dispatch
from .heads import class_labels
from .losses import MINING, mine_triplets
from .miners import Triplets

__all__ = ["MarginLossResult", "margin_loss"]

#: Mining rules margin_loss takes by name (plus given Triplets): every rule of triplet_loss.
MARGIN_MINING = MINING


@dataclass(frozen=True)
class MarginLossResult:
    """What :func:`margin_loss` returns.

    ``loss`` (a float, or the per-triplet vector for ``reduction="none"``), ``grad`` =
    dL/dx and ``ref_grad`` = dL/dref (None unless computed), ``beta_grad`` = dL/dbeta (a
    float for a scalar beta, an array of beta's shape otherwise), ``n_triplets``,
    ``n_active`` (nonzero hinge terms, at most 2 per triplet), ``fraction_active`` (their
    share of the 2 x n_triplets terms), ``triplets`` (None for ``mining="batch_all"``, which
    never lists them) and the ``seed`` used.
    """

    loss: Any
    grad: Any
    ref_grad: Any
    beta_grad: Any
    n_triplets: int
    n_active: int
    fraction_active: float
    triplets: Triplets | None
    seed: int | None


def _beta(beta: Any) -> np.ndarray | float:
    if isinstance(beta, (bool, np.bool_)):
        raise TypeError("beta must be a real number or a vector of them (one per class), got "
                        "a bool")
    if isinstance(beta, (int, float, np.integer, np.floating)):
        value = float(beta)
        if not np.isfinite(value):
            raise ValueError(f"beta must be finite, got {value}")
        return value
    if isinstance(beta, (str, bytes)) or np.ndim(beta) == 0:
        raise TypeError(f"beta must be a real number or a vector of them (one per class), "
                        f"got {check._describe(beta)}")
    arr = check._as_array(beta, "beta")
    if arr.ndim != 1 or arr.dtype.kind not in "fiu" or arr.size == 0:
        raise ValueError(f"beta must be a number or a 1-D vector with one value per class, "
                         f"got dtype {arr.dtype} and shape {arr.shape}")
    arr = check.c_array(arr, np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("beta contains NaN or infinity")
    return arr


@dispatch
def margin_loss(x: Any, labels: Any, *, margin: float = 0.2, beta: Any = 1.2, nu: float = 0.0,
                mining: str | Triplets = "distance_weighted", metric: str = "euclidean",
                normalize: bool = False, reduction: str = "mean", ref: Any = None,
                ref_labels: Any = None, ref_offset: int | None = None, seed: int | None = None,
                grad: bool = True, check_finite: bool = True) -> MarginLossResult:
    """Margin loss of ``x`` (N, D) over the triplets of ``mining``.

    ``margin`` alpha >= 0 (the paper's 0.2); ``beta`` a number (the paper starts at 1.2) or a
    vector with one boundary per class, indexed by the anchor's label (``labels`` must then
    be integer class indices in [0, len(beta))); ``nu`` >= 0 weighs the penalty nu * beta of
    every triplet.  ``mining``: ``"distance_weighted"`` (the paper's sampler; needs unit-norm
    rows or ``normalize=True``, and ``seed``), ``"batch_hard"``, ``"semi_hard"`` (closest,
    with this ``margin``), ``"batch_all"`` (every valid triplet, summed as pair terms
    without listing them: ``triplets`` is then None and ``reduction="none"`` gives one entry
    per anchor) or given :class:`~tripmine.Triplets`.  ``metric``, ``normalize``, ``ref``,
    ``ref_labels``, ``ref_offset`` as for :func:`tripmine.triplet_loss`.
    """
    margin, nu, beta_value, want_grad, reduction = _arguments(margin, nu, beta, grad,
                                                              reduction, mining, labels)
    given = not isinstance(mining, str)
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, need_labels=not given,
                               ref_offset=ref_offset)
    if mining == "batch_all":
        anchor_class, beta_a = _triplet_betas(np, beta_value, labels, problem.n,
                                              np.arange(problem.n))
        loss, (t, active), per_anchor, beta_grad_a, g, rg = _core.margin_all_loss(
            problem.x, problem.ref, problem.metric, problem.codes, problem.ref_codes,
            problem.ref_offset, beta_a, margin, nu, reduction, want_grad, reduction == "none")
        g, rg = problem.chain(g, rg)
        return finish_all(np, loss, t, active, per_anchor, beta_grad_a, anchor_class,
                          beta_value, reduction, g, rg)
    triplets, used_seed = mine_triplets(problem, mining, margin, metric, normalize, seed)
    anchor_class, beta_t = _triplet_betas(np, beta_value, labels, problem.n, triplets.anchor)
    loss, active, per_triplet, beta_grad_t, g, rg = _core.margin_loss(
        problem.x, problem.ref, problem.metric, triplets.anchor, triplets.positive,
        triplets.negative, beta_t, margin, "mean_nonzero" if reduction == "mean" else reduction,
        want_grad, reduction == "none")
    g, rg = problem.chain(g, rg)
    return finish(np, loss, active, per_triplet, beta_grad_t, beta_t, anchor_class, beta_value,
                  nu, reduction, g, rg, triplets, used_seed)


def _arguments(margin, nu, beta, grad, reduction, mining, labels):
    """The checked keywords (both backends): margin, nu, beta, grad flag, reduction."""
    margin = check.non_negative(margin, "margin")
    nu = check.non_negative(nu, "nu")
    beta_value = _beta(beta)
    want_grad = check.flag(grad, "grad")
    reduction = check.choice(reduction, "reduction", ("mean", "sum", "none"))
    if isinstance(mining, str):
        check.choice(mining, "mining", MARGIN_MINING)
    if isinstance(beta_value, np.ndarray) and labels is None:
        raise ValueError("labels is required with a per-class beta (the anchor's label picks "
                         "its boundary)")
    return margin, nu, beta_value, want_grad, reduction


def _triplet_betas(xp: Any, beta_value, labels: Any, n: int, anchor: Any):
    """(anchor classes or None, beta per triplet) on the array module of ``anchor``."""
    t = int(anchor.shape[0])
    if not isinstance(beta_value, np.ndarray):
        return None, xp.full(t, beta_value, dtype=xp.float64)
    host = labels.get() if hasattr(labels, "get") and not isinstance(labels, np.ndarray) \
        else labels
    classes = xp.asarray(class_labels(host, n, beta_value.shape[0], "beta"))
    anchor_class = classes[anchor]
    return anchor_class, xp.ascontiguousarray(xp.asarray(beta_value)[anchor_class])


def _beta_shaped(xp: Any, grads, anchor_class, beta_value):
    """dL/dbeta in beta's shape from per-term (or per-anchor) gradients: summed per class
    for a per-class beta, in all for a shared one."""
    if anchor_class is None:
        return float(grads.sum())
    return xp.bincount(anchor_class, weights=grads,
                       minlength=beta_value.shape[0]).astype(xp.float64)


def finish(xp: Any, loss, active: int, per_triplet, beta_grad_t, beta_t, anchor_class,
           beta_value, nu: float, reduction: str, g, rg, triplets, used_seed
           ) -> MarginLossResult:
    """The penalty nu * beta of every triplet (reduced as the hinge terms are), beta's
    gradient in beta's shape, and the result (both backends)."""
    t = int(beta_t.shape[0])
    scale = (1.0 / active if active else 0.0) if reduction == "mean" else 1.0
    if nu:
        loss += scale * nu * float(beta_t.sum())
        if per_triplet is not None:
            per_triplet = per_triplet + nu * beta_t
        beta_grad_t = beta_grad_t + scale * nu
    beta_grad = _beta_shaped(xp, beta_grad_t, anchor_class, beta_value)
    return MarginLossResult(per_triplet if reduction == "none" else float(loss), g, rg,
                            beta_grad, t, active, active / (2 * t) if t else 0.0, triplets,
                            used_seed)


def finish_all(xp: Any, loss, triplets: int, active: int, per_anchor, beta_grad_a,
               anchor_class, beta_value, reduction: str, g, rg) -> MarginLossResult:
    """The result of ``mining="batch_all"`` (both backends): the penalty is already in the
    loss and in dL/dbeta per anchor, which is gathered into beta's shape."""
    beta_grad = _beta_shaped(xp, beta_grad_a, anchor_class, beta_value)
    return MarginLossResult(per_anchor if reduction == "none" else float(loss), g, rg,
                            beta_grad, triplets, active,
                            active / (2 * triplets) if triplets else 0.0, None, None)
