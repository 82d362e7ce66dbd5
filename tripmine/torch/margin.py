"""The margin loss (Wu et al. 2017) as an ``nn.Module`` with a learnable boundary beta.

``MarginLoss(num_classes=None, learn_beta=True, beta=1.2, margin=0.2, nu=0.0,
mining="distance_weighted", ...)`` returns :func:`tripmine.margin_loss` of ``forward(x,
labels)``; the gradient flows to ``x`` and, with ``learn_beta=True``, to ``beta``, an
``nn.Parameter`` (one value, or one per class with ``num_classes``) that the optimiser
updates with the network, as the paper does (it uses a larger learning rate for beta).
The gradient of beta is tripmine's analytic dL/dbeta; no graph is built through the
distances.  ``reduction="none"`` returns the per-triplet vector (per anchor for
``mining="batch_all"``); a non-uniform ``grad_output`` is then differentiated through the
mined triplets in torch.
CPU tensors reach the C core as NumPy views, CUDA tensors the CuPy path.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import torch

import tripmine
from tripmine import _validation as check

from ._bridge import Backend, check_embeddings, compute_dtype
from ._function import _second_order_error
from .losses import SEED_STEP, _index_tensor, _paired_distances, _unit_rows

__all__ = ["MarginLoss"]

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable


class _MarginFunction(torch.autograd.Function):
    """loss = margin_loss(x, beta); tripmine's gradients, scaled by grad_output."""

    @staticmethod
    def forward(ctx, x, beta, labels, module, seed):
        dtype = compute_dtype(x)
        backend = Backend(x.device)
        want_x = ctx.needs_input_grad[0]
        with backend.stream():
            beta_value = beta.detach().to(torch.float64)
            beta_arg = float(beta_value) if module.num_classes is None else \
                backend.array(beta_value)
            result = tripmine.margin_loss(
                backend.array(x.detach().to(dtype)), backend.labels(labels),
                margin=module.margin, beta=beta_arg, nu=module.nu, mining=module.mining,
                metric=module.metric, normalize=module.normalize, reduction=module.reduction,
                seed=seed, grad=want_x)
            loss = backend.scalar(result.loss, torch.float32 if dtype == torch.float32
                                  else dtype)
            grad = backend.tensor(result.grad) if want_x else None
            beta_grad = torch.as_tensor(result.beta_grad, dtype=torch.float64) \
                if module.num_classes is None else backend.tensor(result.beta_grad)
        module.n_triplets, module.n_active = result.n_triplets, result.n_active
        module.fraction_active = result.fraction_active
        ctx.dtypes, ctx.module, ctx.result = (x.dtype, beta.dtype), module, result
        ctx.labels = labels
        ctx.save_for_backward(x, beta)
        ctx.grads = (grad, beta_grad.reshape(beta.shape).to(beta.device))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        with torch.no_grad():
            flat = grad_output.reshape(-1)
            uniform = grad_output.dim() == 0 or (
                ctx.result.triplets is None and bool((flat == flat[:1]).all()))
            if uniform:  # the gradient of (a multiple of) the sum
                scale = flat[0] if flat.numel() else flat.new_zeros(())
                grads = tuple(None if g is None else g * scale.to(g.dtype) for g in ctx.grads)
            else:
                grads = _weighted_backward(ctx, grad_output)
            out = tuple(None if g is None or not need else g.to(dtype)
                        for g, need, dtype in zip(grads, ctx.needs_input_grad[:2], ctx.dtypes))
        out = out + (None, None, None)
        return out if not torch.is_grad_enabled() else _second_order_error(out)


def _weighted_backward(ctx, grad_output: torch.Tensor):
    """d(sum_t w_t l_t)/d(x, beta) for reduction="none": the mined triplets' terms in torch."""
    x, beta = ctx.saved_tensors
    module, result = ctx.module, ctx.result
    if result.triplets is None:
        raise NotImplementedError(
            "mining='batch_all' with reduction='none' returns one entry per anchor, whose "
            "gradient tripmine computes only for the plain sum: backpropagate a uniform "
            "gradient (loss.sum(), loss.mean())")
    dtype = compute_dtype(x)
    with torch.enable_grad():
        xv = x.detach().to(dtype).requires_grad_(True)
        bv = beta.detach().to(torch.float64).requires_grad_(True)
        rows = _unit_rows(xv) if module.normalize else xv
        a, p, q = (_index_tensor(t, x.device) for t in result.triplets)
        if module.num_classes is None:
            b = bv.reshape(()).expand(a.shape[0])
        else:
            codes = torch.as_tensor(np.asarray(ctx.labels) if not isinstance(
                ctx.labels, torch.Tensor) else ctx.labels).to(x.device, torch.int64)
            b = bv[codes[a]]
        b = b.to(dtype)
        terms = (torch.relu(_paired_distances(rows[a], rows[p], module.metric) - b + module.margin)
                 + torch.relu(b - _paired_distances(rows[a], rows[q], module.metric)
                              + module.margin) + module.nu * b)
        gx, gb = torch.autograd.grad(terms, (xv, bv), grad_outputs=grad_output.to(dtype),
                                     allow_unused=True)
    gx = torch.zeros_like(xv) if gx is None else gx
    gb = torch.zeros_like(bv) if gb is None else gb
    return gx, gb


class MarginLoss(torch.nn.Module):
    """Margin loss with its own ``beta`` (see the module docstring).

    ``num_classes=None``: one shared beta; an integer: one per class (labels must then be
    class indices in [0, num_classes)).  ``learn_beta=False`` keeps beta fixed (a buffer).
    ``mining``: ``"distance_weighted"`` (default, the paper's; with ``seed``, advanced once
    per call when ``advance_seed``), ``"batch_hard"``, ``"semi_hard"`` or ``"batch_all"``
    (every triplet; with ``reduction="none"`` one entry per anchor, and only a uniform
    ``grad_output`` such as ``loss.sum()`` can be backpropagated through it).
    """

    def __init__(self, num_classes: int | None = None, learn_beta: bool = True, *,
                 beta: float = 1.2, margin: float = 0.2, nu: float = 0.0,
                 mining: str = "distance_weighted", metric: str = "euclidean",
                 normalize: bool = True, reduction: str = "mean", seed: int | None = None,
                 advance_seed: bool = True):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or
                                        not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or an integer >= 1, got "
                             f"{num_classes!r}")
        self.num_classes = num_classes
        self.margin = check.non_negative(margin, "margin")
        self.nu = check.non_negative(nu, "nu")
        self.mining, self.metric, self.reduction = mining, metric, reduction
        self.normalize = check.flag(normalize, "normalize")
        self.learn_beta = check.flag(learn_beta, "learn_beta")
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.advance_seed = check.flag(advance_seed, "advance_seed")
        init = torch.full((1,) if num_classes is None else (num_classes,), float(beta),
                          dtype=torch.float32)
        if self.learn_beta:
            self.beta = torch.nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.n_triplets = self.n_active = 0
        self.fraction_active = 0.0
        # The options are checked now, on a one-triplet problem, not at the first batch.
        tripmine.margin_loss(np.eye(2, 3), np.zeros(2, dtype=np.int64),
                             mining=tripmine.Triplets(np.zeros(1, np.int64), np.ones(1, np.int64),
                                                      np.ones(1, np.int64)),
                             margin=self.margin, beta=float(beta), nu=self.nu, metric=metric,
                             reduction=reduction)
        if mining not in ("distance_weighted", "batch_hard", "semi_hard", "batch_all"):
            raise ValueError(f"mining must be 'distance_weighted', 'batch_hard', 'semi_hard' "
                             f"or 'batch_all', got {mining!r}")

    @_disable
    def forward(self, x: torch.Tensor, labels: Any) -> torch.Tensor:
        check_embeddings(x, "x")
        if x.device != self.beta.device:
            raise ValueError(f"x is on {x.device} but the module's beta is on "
                             f"{self.beta.device}: move one of them (module.to(x.device))")
        if not isinstance(labels, torch.Tensor):
            labels = np.asarray(labels)
        seed = self.seed
        if self.advance_seed:
            self.seed = (self.seed + SEED_STEP) % 2**64
        return _MarginFunction.apply(x, self.beta, labels, self, seed)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, learn_beta={self.learn_beta}, "
                f"margin={self.margin}, nu={self.nu}, mining={self.mining!r}, "
                f"reduction={self.reduction!r}")
