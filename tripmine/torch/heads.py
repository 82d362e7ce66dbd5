"""The margin-softmax heads as ``nn.Module``s that own their class weights.

Each module holds ``weight`` (num_classes, embedding_dim) as an ``nn.Parameter`` and returns
the cross-entropy of its head for ``forward(x, labels)``; gradients flow to both ``x`` and
``weight`` (and ``bias`` for :class:`SoftmaxLoss`).  The loss and both gradients come from
one call of tripmine's fused kernel (:mod:`tripmine.heads`), which never builds the
(N, C) logits; backward only scales them by ``grad_output``.

* :class:`SoftmaxLoss` -- a linear classifier with cross-entropy (``class_weight`` makes the
  weighted softmax loss); ``weight`` and ``bias`` are initialised as ``torch.nn.Linear``'s.
* :class:`NormFace`, :class:`CosFace`, :class:`ArcFace`, :class:`CombinedMargin`,
  :class:`SphereFace`, :class:`LargeMarginSoftmax` -- ``weight`` is initialised with
  ``torch.nn.init.normal_(std=0.01)``, as InsightFace's classifiers are (the angular heads
  normalise W, so only its directions matter).

float16 and bfloat16 embeddings or weights are computed in float32 and their gradients
cast back.  After each call ``n_correct`` and ``accuracy`` (top-1 of the logits without
margin) are kept on the module for logging.  CUDA tensors (x and a module moved to the GPU)
go to the heads' CuPy path (:mod:`tripmine._gpu.heads`: cuBLAS products over class blocks)
through DLPack, on torch's current stream, as the other tripmine.torch losses do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tripmine import heads as _heads

from ._bridge import Backend, compute_dtype
from ._function import _second_order_error

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "LargeMarginSoftmax", "NormFace",
           "SoftmaxLoss", "SphereFace"]

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable


def _arrays(backend: Backend, dtype: torch.dtype, *tensors: torch.Tensor | None) -> list:
    """The tensors as tripmine takes them on ``backend`` (NumPy views on the CPU, CuPy
    arrays through DLPack on CUDA), in the compute dtype."""
    return [None if t is None else backend.array(t.detach().to(dtype)) for t in tensors]


class _HeadFunction(torch.autograd.Function):
    """loss = head(x, weight, bias); tripmine's gradients, scaled by grad_output."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, module):
        dtype = compute_dtype(x, weight)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        none = module.reduction == "none"
        backend = Backend(x.device)
        with backend.stream():
            result = module._compute(backend, *_arrays(backend, dtype, x, weight, bias),
                                     backend.labels(labels),
                                     grad=(want_x or want_w or want_b) and not none,
                                     weight_grad=want_w or want_b)
            out_dtype = torch.float32 if dtype == torch.float32 else dtype
            loss = backend.scalar(result.loss, out_dtype)
            grads = None if none else tuple(
                backend.tensor(a) for a in (result.grad, result.weight_grad, result.bias_grad))
        module.n_correct, module.accuracy = result.n_correct, result.accuracy
        ctx.module, ctx.labels, ctx.dtype = module, labels, dtype
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.none = none
        if none:  # backward needs grad_output's weights: it recomputes with them
            ctx.save_for_backward(x, weight, bias)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        with torch.no_grad():
            if ctx.none:
                x, weight, bias = ctx.saved_tensors
                backend = Backend(x.device)
                with backend.stream():
                    upstream = backend.array(grad_output.detach().to(torch.float64))
                    result = ctx.module._compute(
                        backend, *_arrays(backend, ctx.dtype, x, weight, bias),
                        backend.labels(ctx.labels), grad=True, weight_grad=True,
                        upstream=upstream)
                    grads = tuple(backend.tensor(a) for a in
                                  (result.grad, result.weight_grad, result.bias_grad))
            else:
                scale = grad_output.to(ctx.dtype)
                grads = tuple(None if g is None else g * scale for g in ctx.grads)
            out = tuple(None if g is None or not need else g.to(dtype)
                        for g, need, dtype in zip(grads, ctx.needs_input_grad[:3], ctx.dtypes))
        out = out + (None, None)
        return out if not torch.is_grad_enabled() else _second_order_error(out)


class _Head(torch.nn.Module):
    """The shared machinery: the weight, the labels and the call into tripmine."""

    _function = None  # tripmine.heads function
    _kind = ""

    def __init__(self, num_classes: int, embedding_dim: int, *, class_weight: Any = None,
                 reduction: str = "mean", **options):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or \
                embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        if reduction not in _heads.REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(_heads.REDUCTIONS)}, got "
                             f"{reduction!r}")
        self.num_classes, self.embedding_dim, self.reduction = num_classes, embedding_dim, reduction
        self.options = options
        self.weight = torch.nn.Parameter(torch.empty(num_classes, embedding_dim))
        cw = None
        if class_weight is not None:
            cw = torch.as_tensor(class_weight, dtype=torch.float64).detach().clone()
            if cw.shape != (num_classes,) or not bool(torch.isfinite(cw).all()) or \
                    bool((cw < 0).any()):
                raise ValueError(f"class_weight must be {num_classes} finite weights >= 0 (one "
                                 f"per class), got {class_weight!r}")
        self.register_buffer("class_weight", cw)
        self.n_correct, self.accuracy = 0, 0.0
        self.reset_parameters()
        # Validate the options now, on a one-sample problem, rather than at the first batch.
        type(self)._function(np.zeros((1, 1)), np.zeros(1, dtype=np.int64), np.ones((1, 1)),
                             grad=False, **options)

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.01)

    def _compute(self, backend, x, weight, bias, labels, *, grad, weight_grad, upstream=None):
        cw = None if self.class_weight is None else backend.array(self.class_weight)
        kw = dict(self.options)
        if bias is not None:
            kw["bias"] = bias
        return type(self)._function(x, labels, weight, class_weight=cw,
                                    reduction=self.reduction, grad=grad,
                                    weight_grad=weight_grad, upstream=upstream, **kw)

    def _bias(self):
        return None

    @_disable
    def forward(self, x: torch.Tensor, labels: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor (N, embedding_dim)")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the module's weight is on "
                             f"{self.weight.device}: move one of them (module.to(x.device))")
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"x must be (N, {self.embedding_dim}), got {tuple(x.shape)}")
        if not isinstance(labels, torch.Tensor):
            labels = np.asarray(labels)
        return _HeadFunction.apply(x, self.weight, self._bias(), labels, self)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"
                + (f", {options}" if options else "") + f", reduction={self.reduction!r}")


class SoftmaxLoss(_Head):
    """Linear classifier + cross-entropy (:func:`tripmine.heads.softmax_loss`).

    ``bias=True`` adds a bias; ``class_weight`` (num_classes,) gives the weighted softmax
    loss.  ``weight`` and ``bias`` start as ``torch.nn.Linear``'s do.
    """

    _function = staticmethod(_heads.softmax_loss)
    _kind = "softmax"

    def __init__(self, num_classes: int, embedding_dim: int, *, bias: bool = True, **options):
        self._with_bias = bool(bias)
        super().__init__(num_classes, embedding_dim, **options)

    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self._with_bias:
            if getattr(self, "bias", None) is None:
                self.bias = torch.nn.Parameter(torch.empty(self.num_classes))
            bound = 1 / math.sqrt(self.embedding_dim)
            torch.nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def _bias(self):
        return self.bias


class NormFace(_Head):
    """:func:`tripmine.heads.normface_loss` with its own weight (``scale``)."""

    _function = staticmethod(_heads.normface_loss)
    _kind = "normface"


class CosFace(_Head):
    """:func:`tripmine.heads.cosface_loss` with its own weight (``scale``, ``margin``)."""

    _function = staticmethod(_heads.cosface_loss)
    _kind = "cosface"


class ArcFace(_Head):
    """:func:`tripmine.heads.arcface_loss` with its own weight (``scale``, ``margin``,
    ``easy_margin``, ``straight_through``)."""

    _function = staticmethod(_heads.arcface_loss)
    _kind = "arcface"


class CombinedMargin(_Head):
    """:func:`tripmine.heads.combined_margin_loss` with its own weight (``scale``, ``m1``,
    ``m2``, ``m3``, ``straight_through``)."""

    _function = staticmethod(_heads.combined_margin_loss)
    _kind = "combined"


class SphereFace(_Head):
    """:func:`tripmine.heads.sphereface_loss` with its own weight (``margin``, ``lambda_``;
    set ``module.options["lambda_"]`` to anneal it)."""

    _function = staticmethod(_heads.sphereface_loss)
    _kind = "sphereface"


class LargeMarginSoftmax(_Head):
    """:func:`tripmine.heads.large_margin_softmax_loss` with its own weight (``margin``,
    ``lambda_``)."""

    _function = staticmethod(_heads.large_margin_softmax_loss)
    _kind = "lsoftmax"


for _cls in (SoftmaxLoss, NormFace, CosFace, ArcFace, CombinedMargin, SphereFace,
             LargeMarginSoftmax):
    _cls.forward.__doc__ = (
        "forward(x, labels) -> loss: x (N, embedding_dim) float tensor, labels (N,) integer "
        "class indices in [0, num_classes); a 0-d tensor (an (N,) tensor for "
        "reduction='none').")
