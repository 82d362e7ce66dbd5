"""Center loss (Wen et al. 2016) as an ``nn.Module`` that owns the class centers.

``CenterLoss(num_classes, embedding_dim, alpha=0.5, update="paper")`` returns
1/2 sum_i ||x_i - c_{y_i}||^2 (divided by N for ``reduction="mean"``) for ``forward(x,
labels)``; the gradient flows to ``x``.  The centers follow one of two rules:

* ``update="paper"`` (default): ``centers`` is a buffer, moved after every training-mode
  forward by the paper's rule c_j -= alpha sum_{y_i = j} (c_j - x_i) / (1 + n_j)
  (:func:`tripmine.update_centers`, in place), using the batch's embeddings and the centers
  the loss was computed with.  No optimiser touches them; ``module.eval()`` freezes them.
* ``update="sgd"``: ``centers`` is an ``nn.Parameter`` that receives dL/dC, for an optimiser
  (usually its own, with its own learning rate, as the center-loss ports do).

Centers start at zero (the paper's rule pulls each one to its class's mean within a few
batches).  The paper trains this loss beside a softmax head: ``loss = softmax(x, y) + lam *
center(x, y)``, with ``lam`` about 0.003-0.01.  CPU tensors reach the C core as NumPy views;
CUDA tensors go to the CuPy path through DLPack.  float16/bfloat16 compute in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import tripmine
from tripmine.center import _alpha

from ._bridge import HALF_DTYPES, Backend, compute_dtype
from ._function import _second_order_error

__all__ = ["CenterLoss"]

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable
_REDUCTIONS = ("mean", "sum", "none")


def _compute(backend: Backend, x, centers, labels, reduction, *, grad, centers_grad):
    dtype = compute_dtype(x, centers)
    return tripmine.center_loss(backend.array(x.detach().to(dtype)), backend.labels(labels),
                                backend.array(centers.detach().to(dtype)),
                                reduction=reduction, grad=grad, centers_grad=centers_grad)


class _CenterFunction(torch.autograd.Function):
    """loss = center(x, centers); tripmine's gradients, scaled by grad_output.

    For ``reduction="none"`` forward keeps dL/dx of the plain sum, which is the residual
    r_i = x_i - c_{y_i} itself, so a weighted backward is w_i r_i for x and -sum w_i r_i per
    class for the centers: nothing is recomputed, and a paper update of the centers after
    forward cannot leak into the gradient."""

    @staticmethod
    def forward(ctx, x, centers, labels, reduction):
        dtype = compute_dtype(x, centers)
        want_x, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = reduction == "none"
        backend = Backend(x.device)
        with backend.stream():
            result = _compute(backend, x, centers, labels, reduction,
                              grad=want_x or (none and want_c),
                              centers_grad=want_c and not none)
            loss = backend.scalar(result.loss, torch.float32 if dtype == torch.float32
                                  else dtype)
            grads = (backend.tensor(result.grad), backend.tensor(result.centers_grad))
        ctx.reduction, ctx.dtype = reduction, dtype
        ctx.dtypes = (x.dtype, centers.dtype)
        ctx.shape = tuple(centers.shape)
        if none and want_c:
            ctx.codes = torch.as_tensor(np.asarray(labels) if not isinstance(
                labels, torch.Tensor) else labels).to(device=x.device, dtype=torch.int64)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        want_x, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.no_grad():
            if ctx.reduction == "none":
                residual = ctx.grads[0]
                weighted = residual * grad_output.to(ctx.dtype)[:, None]
                grads = (weighted if want_x else None, None)
                if want_c:
                    grads = (grads[0], torch.zeros(ctx.shape, dtype=ctx.dtype,
                                                   device=residual.device)
                             .index_add_(0, ctx.codes, weighted, alpha=-1))
            else:
                scale = grad_output.to(ctx.dtype)
                grads = tuple(None if g is None else g * scale for g in ctx.grads)
            out = tuple(None if g is None or not need else g.to(dtype)
                        for g, need, dtype in zip(grads, (want_x, want_c), ctx.dtypes))
        out = out + (None, None)
        return out if not torch.is_grad_enabled() else _second_order_error(out)


class CenterLoss(torch.nn.Module):
    """Center loss with its own ``centers`` (num_classes, embedding_dim); see the module
    docstring for ``update`` (``"paper"`` or ``"sgd"``) and ``alpha``."""

    def __init__(self, num_classes: int, embedding_dim: int, *, alpha: float = 0.5,
                 update: str = "paper", reduction: str = "mean"):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if update not in ("paper", "sgd"):
            raise ValueError(f"update must be 'paper' (the paper's rule, centers a buffer) or "
                             f"'sgd' (centers a parameter), got {update!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got "
                             f"{reduction!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.alpha = _alpha(alpha)
        self.update, self.reduction = update, reduction
        centers = torch.zeros(num_classes, embedding_dim)
        if update == "sgd":
            self.centers = torch.nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    @_disable
    def forward(self, x: torch.Tensor, labels: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor (N, embedding_dim)")
        if x.device != self.centers.device:
            raise ValueError(f"x is on {x.device} but the module's centers are on "
                             f"{self.centers.device}: move one of them (module.to(x.device))")
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"x must be (N, {self.embedding_dim}), got {tuple(x.shape)}")
        if not isinstance(labels, torch.Tensor):
            labels = np.asarray(labels)
        loss = _CenterFunction.apply(x, self.centers, labels, self.reduction)
        if self.update == "paper" and self.training:
            self._paper_update(x, labels)
        return loss

    @torch.no_grad()
    def _paper_update(self, x: torch.Tensor, labels: Any) -> None:
        backend = Backend(x.device)
        centers = self.centers
        work = centers.float() if centers.dtype in HALF_DTYPES else centers
        if not work.is_contiguous():
            work = work.contiguous()
        with backend.stream():
            tripmine.update_centers(backend.array(work), backend.array(x.detach().to(work.dtype)),
                                    backend.labels(labels), alpha=self.alpha)
        if work is not centers:
            centers.copy_(work)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"alpha={self.alpha}, update={self.update!r}, reduction={self.reduction!r}")
