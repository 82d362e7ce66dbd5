"""The ``torch.autograd.Function`` that runs a tripmine loss inside autograd.

Forward hands the embeddings (and the reference embeddings, when given) to one
tripmine loss call, which returns the loss *and* its analytic gradient; the
gradient is kept for backward, which only scales it by ``grad_output``.  No
graph is built through the mining or the distances, so the loss costs one C
call (or one CuPy call) whatever the batch size.

Backward is once-differentiable: tripmine returns the gradient as numbers, not
as a graph, so it cannot be differentiated again.  With ``create_graph=True``
the gradients carry a node that raises a clear error if anything
backpropagates through them (a gradient penalty, a Hessian-vector product),
rather than silently treating tripmine's gradient as a constant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._bridge import HALF_DTYPES, Backend, compute_dtype

DOUBLE_BACKWARD_MESSAGE = (
    "tripmine.torch losses are differentiable once: their gradient comes from tripmine as "
    "numbers, not as a torch graph, so it cannot be differentiated again (double backward, "
    "gradient penalties and Hessian products through the loss are not supported)")


@dataclass
class LossCall:
    """One loss call: what to compute, and (after forward) what it reported.

    ``compute(backend, x, ref, want_grad)`` calls tripmine on backend arrays and
    returns its result object.  ``terms(x, ref)``, when set, recomputes the
    ``reduction="none"`` vector in differentiable torch (from the triplets that
    forward mined); backward uses it only for a non-uniform ``grad_output``.
    """

    compute: Callable[[Backend, Any, Any, bool], Any]
    want_grad: bool
    per_item: bool = False
    terms: Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    result: Any = None  # tripmine's result without its gradient arrays


def loss_dtype(x: torch.Tensor, ref: torch.Tensor | None) -> torch.dtype:
    """float16/bfloat16 losses come out in float32 (autocast's rule for losses)."""
    dtype = x.dtype if ref is None else torch.promote_types(x.dtype, ref.dtype)
    return torch.float32 if dtype in HALF_DTYPES else dtype


class TripmineLoss(torch.autograd.Function):
    """``loss = tripmine_loss(x, ref)``; backward returns tripmine's gradient x grad_output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ref: torch.Tensor | None, call: LossCall):
        backend = Backend(x.device)
        want_grad = call.want_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with backend.stream():
            result = call.compute(backend, backend.array(x), backend.array(ref), want_grad)
            loss = backend.scalar(result.loss, loss_dtype(x, ref))
            grad = backend.tensor(result.grad) if want_grad else None
            ref_grad = backend.tensor(result.ref_grad) if want_grad and ref is not None else None
        # The statistics stay with the call; the gradients only in ctx (freed after backward).
        call.result = dataclasses.replace(result, grad=None, ref_grad=None)
        ctx.call = call
        ctx.dtypes = (x.dtype, None if ref is None else ref.dtype)
        if call.per_item:
            ctx.save_for_backward(grad, ref_grad, x, ref)
        else:
            ctx.save_for_backward(grad, ref_grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        with torch.no_grad():
            grads = _backward(ctx, grad_output)
        if not torch.is_grad_enabled():
            return grads
        # create_graph=True: whatever differentiates these gradients must fail loudly
        # (torch's once_differentiable does this only when grad_output requires grad).
        return _second_order_error(grads)


def _second_order_error(grads: tuple) -> tuple:
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(DOUBLE_BACKWARD_MESSAGE.encode(), len(present))
    aliases = [g.detach().requires_grad_(True) for g in present]
    raising = error(*aliases)
    raising = iter(raising if isinstance(raising, tuple) else (raising,))
    return tuple(None if g is None else next(raising) for g in grads)


def _backward(ctx, grad_output: torch.Tensor) -> tuple:
    """The gradients w.r.t. (x, ref, call): tripmine's, scaled by grad_output."""
    grad, ref_grad, *inputs = ctx.saved_tensors
    need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_output.dim() == 0:
        scale = grad_output
    else:
        flat = grad_output.reshape(-1)
        scale = flat[0] if flat.numel() else flat.new_zeros(())
        if flat.numel() and not bool(torch.all(flat == scale)):
            return _weighted_backward(ctx, inputs, grad_output) + (None,)
    x_dtype, ref_dtype = ctx.dtypes
    grad_x = grad_ref = None
    if need_x and grad is not None:
        grad_x = (grad * scale.to(grad.dtype)).to(x_dtype)
    if need_ref and ref_grad is not None:
        grad_ref = (ref_grad * scale.to(ref_grad.dtype)).to(ref_dtype)
    return grad_x, grad_ref, None


def _weighted_backward(ctx, inputs, grad_output: torch.Tensor):
    """d(sum_t w_t l_t)/d(x, ref) for a non-uniform w = grad_output (reduction="none")."""
    call = ctx.call
    if call.terms is None:
        raise NotImplementedError(
            "reduction='none' of batch-all and contrastive losses returns one entry per anchor "
            "whose gradient tripmine computes only for the plain sum: backpropagate a uniform "
            "gradient (loss.sum(), loss.mean()) or weight the mined triplets "
            "(mining='batch_hard', 'semi_hard', 'distance_weighted' or your own triplets)")
    x, ref = inputs
    dtype = compute_dtype(x, ref)
    with torch.enable_grad():
        x_var = x.detach().to(dtype).requires_grad_(True)
        ref_var = None if ref is None else ref.detach().to(dtype).requires_grad_(True)
        terms = call.terms(call.result, x_var, ref_var)
        wrt = [x_var] if ref_var is None else [x_var, ref_var]
        grads = torch.autograd.grad(terms, wrt, grad_outputs=grad_output.to(dtype),
                                    allow_unused=True)
    grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x_var)
    grad_ref = None
    if ref_var is not None:
        grad_ref = grads[1] if grads[1] is not None else torch.zeros_like(ref_var)
        grad_ref = grad_ref.to(ref.dtype) if ctx.needs_input_grad[1] else None
    return grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None, grad_ref
