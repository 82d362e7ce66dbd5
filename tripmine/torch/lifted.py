"""The lifted structured loss as an ``nn.Module`` (:func:`tripmine.lifted_structured_loss`).

``LiftedStructuredLoss(neg_margin=1.0, pos_margin=0.0, generalized=False, ...)`` returns
the loss of ``forward(x, labels)``: Song et al.'s smooth form over every positive pair of
the batch, or (``generalized=True``) Hermans et al.'s per-anchor form.  tripmine returns
the loss and its exact gradient in one call (no autograd graph through the distances);
backward scales that gradient by ``grad_output``, as for the other tripmine.torch losses.
CPU tensors reach the C core as NumPy views, CUDA tensors tripmine's CuPy path.
"""

from __future__ import annotations

from typing import Any

import torch

import tripmine
from tripmine import _validation as check
from tripmine.lifted import _arguments

from ._bridge import check_embeddings
from ._function import LossCall, TripmineLoss
from .losses import _want_grad, _with_offset

__all__ = ["LiftedStructuredLoss"]

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable


def _unweighted_only(result, x: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """Backward's hook for a non-uniform ``grad_output`` of ``reduction="none"``."""
    raise NotImplementedError(
        "reduction='none' of the lifted structured loss returns one entry per row whose "
        "gradient tripmine computes only for the plain sum (Song's terms couple rows): "
        "backpropagate a uniform gradient (loss.sum(), loss.mean())")


class LiftedStructuredLoss(torch.nn.Module):
    """Lifted structured loss, Song et al.'s smooth form or Hermans et al.'s generalized one.

    Song, Xiang, Jegelka & Savarese 2016, "Deep Metric Learning via Lifted Structured
    Feature Embedding": for each positive pair (i, j) (both orders in self mode; N(j) are
    the rows of ``x`` with another label than column j, row j's negatives in self mode)::

        J_ij = log(sum_{k in N(i)} exp(neg_margin - d_ik)
                   + sum_{l in N(j)} exp(neg_margin - d_lj)) + d_ij - pos_margin
        term = max(0, J_ij)**2 / 2

    ``generalized=True``: Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for
    Person Re-Identification", per anchor with a positive and a negative::

        term = max(0, LSE_p(d_ap - pos_margin) + LSE_n(neg_margin - d_an))

    The defaults ``neg_margin=1``, ``pos_margin=0`` are Song et al.'s margin and
    pytorch-metric-learning's ``LiftedStructureLoss`` / ``GeneralizedLiftedStructureLoss``
    defaults.  ``metric`` (``"euclidean"``, ``"sqeuclidean"``, ``"cosine"``) and
    ``normalize`` (L2-normalise the rows first) as in :func:`tripmine.lifted_structured_loss`.
    ``reduction``: ``"mean"`` over the terms (positive pairs, or anchors for the generalized
    form), ``"sum"``, ``"mean_nonzero"`` or ``"none"`` (one entry per row of ``x``, the sum
    of its terms; only a uniform ``grad_output`` such as ``loss.sum()`` can be
    backpropagated through it).  The options are kept as attributes of the same names and
    checked when the module is built.

    ``forward(x, labels, ref=None, ref_labels=None, ref_offset=None)``: ``x`` an (N, D)
    float tensor on the CPU or a CUDA device (float16/bfloat16 computed in float32), labels
    a tensor or array.  With ``ref``/``ref_labels`` the pairs are those of ``x`` against the
    reference set (the gradient flows into ``ref`` when it requires grad); ``ref_offset=k``
    says ``x[i]`` is ``ref[k + i]``, so that pair is excluded.

    After each call: ``n_terms`` (the loss's terms), ``n_active`` (the nonzero ones) and
    ``fraction_active``.
    """

    def __init__(self, *, neg_margin: float = 1.0, pos_margin: float = 0.0,
                 generalized: bool = False, metric: str = "euclidean", normalize: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self.neg_margin, self.pos_margin, self.generalized, self.reduction, _ = _arguments(
            neg_margin, pos_margin, generalized, reduction, True)
        check.metric_code(metric)
        self.metric = metric
        self.normalize = check.flag(normalize, "normalize")
        self.n_terms = self.n_active = 0
        self.fraction_active = 0.0

    @_disable
    def forward(self, x: torch.Tensor, labels: Any, ref: Any = None, ref_labels: Any = None,
                ref_offset: int | None = None) -> torch.Tensor:
        """The loss of this batch (0-d, or one entry per row of ``x`` for ``"none"``)."""
        x = check_embeddings(x, "x")
        if ref is not None:
            check_embeddings(ref, "ref")
        options = dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin,
                       generalized=self.generalized, metric=self.metric,
                       normalize=self.normalize, reduction=self.reduction)

        def compute(backend, x_arr, ref_arr, want_grad):
            where = _with_offset(dict(ref=ref_arr, ref_labels=backend.labels(ref_labels)),
                                 ref_offset)
            return tripmine.lifted_structured_loss(x_arr, backend.labels(labels),
                                                   grad=want_grad, **options, **where)

        per_item = self.reduction == "none"
        call = LossCall(compute, _want_grad(x, ref), per_item=per_item,
                        terms=_unweighted_only if per_item else None)
        loss = TripmineLoss.apply(x, ref, call)
        result = call.result
        self.n_terms, self.n_active = result.n_terms, result.n_active
        self.fraction_active = result.fraction_active
        return loss

    def extra_repr(self) -> str:
        return (f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}, "
                f"generalized={self.generalized}, metric={self.metric!r}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")
