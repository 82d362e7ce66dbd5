"""Lifted structured loss (Song, Xiang, Jegelka & Savarese 2016, "Deep Metric Learning via
Lifted Structured Feature Embedding") and its generalized form (Hermans, Beyer & Leibe 2017,
"In Defense of the Triplet Loss for Person Re-Identification", section 2), with their
exact gradients, in memory linear in the batch.

Song's smooth form, per positive pair (i, j) (both orders in self mode)::

    J_ij = log( sum_{k in N(i)} exp(neg_margin - d_ik) + sum_{l in N(j)} exp(neg_margin - d_jl) )
           + d_ij - pos_margin
    loss = mean over positive pairs of max(0, J_ij)**2 / 2

The generalized form, per anchor with a positive and a negative::

    loss_a = max(0, LSE_{p}(d_ap - pos_margin) + LSE_{n}(neg_margin - d_an))

Both are computed by the C core (csrc/pair_heads.c) from per-row log-sum-exps over the
distance tiles; the gradient is one product of a coefficient block with the embeddings, as
for the contrastive loss.  Peers build an N x N mask of positive pairs times negatives
(pytorch-metric-learning's ``LiftedStructureLoss``: O(N^3) memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from . import _problem as problems
from . import _validation as check
from ._dispatch import dispatch

__all__ = ["LiftedStructuredLossResult", "lifted_structured_loss"]


@dataclass(frozen=True)
class LiftedStructuredLossResult:
    """What :func:`lifted_structured_loss` returns.

    ``loss`` (a float, or for ``reduction="none"`` one float64 entry per row of ``x``: the
    sum of that row's terms), ``grad`` = dL/dx and ``ref_grad`` = dL/dref (None unless
    computed).  ``n_terms`` counts the loss's terms: positive pairs (ordered, so each pair
    twice in self mode) for Song's form, anchors with a positive and a negative for the
    generalized form; ``n_active`` the nonzero ones, ``fraction_active`` their share.
    """

    loss: float | np.ndarray
    grad: np.ndarray | None
    ref_grad: np.ndarray | None
    n_terms: int
    n_active: int
    fraction_active: float


def _arguments(neg_margin: Any, pos_margin: Any, generalized: Any, reduction: Any, grad: Any):
    """The scalar options, validated (shared with the GPU path)."""
    neg_margin = check.non_negative(neg_margin, "neg_margin")  # finite, >= 0
    pos_margin = check.non_negative(pos_margin, "pos_margin")
    generalized = check.flag(generalized, "generalized")
    reduction = check.choice(reduction, "reduction", ("mean", "sum", "mean_nonzero", "none"))
    return neg_margin, pos_margin, generalized, reduction, check.flag(grad, "grad")


@dispatch
def lifted_structured_loss(x: Any, labels: Any, *, neg_margin: float = 1.0,
                           pos_margin: float = 0.0, generalized: bool = False,
                           metric: str = "euclidean", normalize: bool = False,
                           reduction: str = "mean", ref: Any = None, ref_labels: Any = None,
                           ref_offset: int | None = None, grad: bool = True,
                           check_finite: bool = True) -> LiftedStructuredLossResult:
    """Lifted structured loss, Song et al.'s smooth form or (``generalized=True``) Hermans
    et al.'s.

    Defaults (``neg_margin=1``, ``pos_margin=0``) are Song et al.'s margin and
    pytorch-metric-learning's ``LiftedStructureLoss`` / ``GeneralizedLiftedStructureLoss``
    defaults.  ``reduction``: ``"mean"`` (default) over the terms (positive pairs for
    Song's form, anchors with a positive and a negative for the generalized one; 0 when
    there is none), ``"sum"``, ``"mean_nonzero"`` (over the nonzero terms) or ``"none"``
    (one entry per row of ``x``, the sum of its terms; ``grad`` is then the gradient of
    their sum).  Song's term is ``max(0, J)**2 / 2``, the generalized one ``max(0, .)``.

    Positive pairs' distances are exact (direct difference, as the mined losses use);
    negatives' come from the distance tiles.  An anchor without negatives contributes an
    empty sum (log 0 = -inf), so a batch of one class gives loss 0 and a zero gradient.

    Reference mode (``ref``, ``ref_labels``): the pairs are the entries (i, j) of the
    N x M matrix; in Song's form the second sum runs over column j's negatives (the rows
    of ``x`` with another label), which is row j's in self mode.  ``ref_offset`` excludes
    each sample's pair with itself.  Slices add up to self mode for the generalized form
    (each anchor's term depends on its own row only); Song's term couples row i with row
    j, whose negatives a slice does not see, so its slices do not (see the README).
    """
    neg_margin, pos_margin, generalized, reduction, want_grad = _arguments(
        neg_margin, pos_margin, generalized, reduction, grad)
    problem = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                               check_finite=check_finite, ref_offset=ref_offset)
    loss, (terms, active), per_anchor, g, rg = _core.lifted_structured_loss(
        problem.x, problem.ref, problem.metric, problem.codes, problem.ref_codes, neg_margin,
        pos_margin, generalized, reduction, want_grad, reduction == "none", problem.ref_offset)
    g, rg = problem.chain(g, rg)
    return LiftedStructuredLossResult(per_anchor if reduction == "none" else float(loss), g, rg,
                                      terms, active, active / terms if terms else 0.0)
