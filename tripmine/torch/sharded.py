"""Class-sharded margin-softmax heads over ``torch.distributed``, with Partial FC sampling.

Face sets outgrow one device on the classifier, not on the embeddings: at 2M identities and
D = 512 a float32 W is 4.2 GB.  :class:`ShardedMarginSoftmax` splits W's rows (the classes)
into one contiguous range per rank and computes the loss of the whole batch against the
whole W, exactly, without any rank holding more than its slice::

    rank r: x_r (n_r x D), labels_r          W_r = rows [lo_r, hi_r) of W (its Parameter)
       |  all_gather: sizes and a consistency check, then embeddings and labels
       v
    X (M x D), labels (M), the global batch in rank order
       |  tripmine, first call on (X, W_r): per sample, the log-sum-exp of this rank's
       |  logits, the target logit with its margin (on the rank that holds the target), the
       |  best plain logit and its class                        -> 4 float64 per sample
       |  all_gather of those statistics (M x 4 per rank)
       v
    every rank combines them in rank order: lse, loss (the same number everywhere), top-1
       |  tripmine, second call: this rank's part of dL/dX (M x D) and dL/dW_r
       |  reduce-scatter of the parts: rank r keeps the sum of its own rows
       v
    dL/dx_r (exact), dL/dW_r (exact); backward only scales them by grad_output

With ``sample_rate=1`` the loss and every gradient equal those of the single-process head
(``tripmine.torch.ArcFace`` etc.) on the concatenated batch and the concatenated W, to the
rounding of a different summation order.  The (M x C_r) logits are never stored.

**Partial FC** (An et al., "Partial FC: Training 10 Million Identities on a Single
Machine", 2021).  With ``sample_rate < 1`` each rank keeps, at every training step, every
class of its range that appears in the global batch (the positives) and uniformly sampled
other classes of its range, ``ceil(sample_rate * C_r)`` classes in all (all positives where
they are more).  The softmax then runs over the kept classes only; the loss and gradients
are exact for that sampled softmax, and rows that were not kept get a zero gradient.  The
draw is reproducible: it depends on ``seed``, the rank and the module's step counter
(``sample_step``, a buffer saved in ``state_dict``, advanced by each training-mode call),
and on nothing global.  In eval mode every class is used.  *Known bias*: dropping negatives
shrinks the denominator, so the sampled loss is below the full loss and the gradient pushes
kept negatives harder than the full softmax would; the paper reports no accuracy loss at
``sample_rate=0.1`` on large face sets, where almost all of the dropped classes have
negligible probability, but on small or hard problems it is a different objective.

**Cost per step** (W ranks, M = the global batch, n_max the largest local batch, D
features, C classes, b bytes per embedding element, 8 for float64 else 4):

* sent and received per rank: the embeddings' all_gather, (W - 1) n_max D b; labels,
  (W - 1) n_max 8; the statistics, (W - 1) M 32 + 8; the gradient's reduce-scatter, about
  (W - 1) n_max D b (twice that where the backend only has all_reduce).  None of it
  depends on C: the weights never move.
* memory per rank: W_r and its gradient, 2 (C / W) D b (plus the optimiser's state), the
  gathered X and its gradient part, 2 M D b, and tripmine's working memory (linear in M +
  C / W).  Partial FC adds a copy of the kept rows, rate (C / W) D b, and their gradient.
* compute per rank: five (M x C_r x D) products, one more than the single-process head (the
  first call finds the statistics, the second recomputes the logits for the gradients);
  Partial FC divides C_r by 1 / sample_rate.

**DistributedDataParallel**: wrap the backbone in DDP, never the head (its parameters are
different on every rank).  The loss is the same on every rank and each rank's backward gives
its own embeddings the gradient of that global loss, so the backbone's true gradient is the
*sum* over ranks while DDP *averages*: ``scale_for_ddp=True`` multiplies the embeddings'
gradient by W (the head's own gradient is left alone), as :class:`DistributedLoss` does.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch

from tripmine import _range, _sharded
from tripmine import heads as _heads

from . import heads as _torch_heads
from ._bridge import Backend
from .distributed import _DTYPES, _check_wrapper_options, _Group, _raise_if_any_failed

__all__ = ["ShardedMarginSoftmax"]

_KINDS = {cls._kind: cls for cls in (
    _torch_heads.SoftmaxLoss, _torch_heads.NormFace, _torch_heads.CosFace, _torch_heads.ArcFace,
    _torch_heads.CombinedMargin, _torch_heads.SphereFace, _torch_heads.LargeMarginSoftmax)}
_NAMES = {"softmax": "softmax", "normface": "normface", "cosface": "cosface",
          "arcface": "arcface", "combined": "combined", "combined_margin": "combined",
          "sphereface": "sphereface", "lsoftmax": "lsoftmax",
          "large_margin_softmax": "lsoftmax"}


def _head_kind(head: Any) -> str:
    if isinstance(head, str):
        if head.lower() not in _NAMES:
            raise ValueError(f"head must be one of {sorted(_NAMES)} or a tripmine.torch head "
                             f"class, got {head!r}")
        return _NAMES[head.lower()]
    if isinstance(head, type) and issubclass(head, _torch_heads._Head) and head._kind:
        return head._kind
    if isinstance(head, _torch_heads._Head):
        raise TypeError("head must be a head class or name (e.g. tripmine.torch.ArcFace or "
                        "'arcface'), not a module instance: the sharded head owns its weight")
    raise TypeError(f"head must be a tripmine.torch head class (ArcFace, CosFace, ...) or its "
                    f"name, got {head!r}")


def _split(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """Rank r's class range: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_classes, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedMarginSoftmax(torch.nn.Module):
    """A margin-softmax head whose classes are split across the ranks of a process group.

    ``head``: a head of :mod:`tripmine.torch` (``ArcFace``, ``CosFace``, ``SoftmaxLoss``,
    ...) or its name (``"arcface"``, ``"cosface"``, ``"combined"``, ``"sphereface"``,
    ``"lsoftmax"``, ``"normface"``, ``"softmax"``); ``head_options`` are that head's
    options (``scale``, ``margin``, ...; ``bias=True|False`` for the softmax head),
    ``class_weight`` (all ``num_classes`` weights, the same on every rank) and
    ``reduction`` (``"mean"`` or ``"sum"`` over the global batch).

    Rank r owns ``weight``, rows ``[class_start, class_stop)`` of the global W, an
    ``nn.Parameter`` initialised as the single-process head initialises its W (and ``bias``
    for the softmax head).  ``forward(x, labels)`` takes this rank's (n_r, D) embeddings
    and n_r global class indices (ranks may hold different batch sizes, or none) and
    returns the loss of the global batch, the same 0-d tensor on every rank; its gradient
    goes to ``x`` and to this rank's ``weight``.  Every rank must call ``forward`` with the
    same options; a rank whose input is refused makes every rank raise instead of hanging.
    ``n_correct`` and ``accuracy`` (global top-1 of the logits without margin, over the
    classes used) and ``n_classes_used`` are kept after each call.

    ``sample_rate`` in (0, 1]: Partial FC, see the module docstring; ``seed`` (an int, or
    None for one drawn from torch's generator at construction) makes its draws
    reproducible.  ``scale_for_ddp``, ``gradient_collective`` and ``group`` as in
    :class:`tripmine.torch.distributed.DistributedLoss`.
    """

    def __init__(self, head: Any, num_classes: int, embedding_dim: int, *,
                 sample_rate: float = 1.0, seed: int | None = None, group: Any = None,
                 scale_for_ddp: bool = False, gradient_collective: str = "auto",
                 **head_options: Any):
        super().__init__()
        self.kind = _head_kind(head)
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or \
                not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        options = dict(head_options)
        reduction = options.pop("reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' for the sharded head (the "
                             f"loss is the global batch's), got {reduction!r}")
        class_weight = options.pop("class_weight", None)
        with_bias = bool(options.pop("bias", True)) if self.kind == "softmax" else False
        if "bias" in head_options and self.kind != "softmax":
            raise TypeError(f"bias applies to the softmax head only, not {self.kind!r}")
        # The head's own checks (unknown options raise TypeError, bad values ValueError).
        self._head = _heads.HEAD_PARAMETERS[self.kind](**options)
        self.options = options
        self.scale_for_ddp, self.gradient_collective = _check_wrapper_options(
            scale_for_ddp, gradient_collective)
        self.group = group
        self._group = _Group(group, self.gradient_collective)
        world, rank = self._group.world, self._group.rank
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) must be at least the number of "
                             f"ranks ({world}): every rank holds a slice of the classes")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.reduction, self.sample_rate, self.seed = reduction, float(sample_rate), seed
        self.class_start, self.class_stop = _split(num_classes, world, rank)
        local = self.class_stop - self.class_start
        self.weight = torch.nn.Parameter(torch.empty(local, embedding_dim))
        self.bias = torch.nn.Parameter(torch.empty(local)) if with_bias else None
        cw = None
        if class_weight is not None:
            cw = torch.as_tensor(class_weight, dtype=torch.float64).detach().clone().cpu()
            if cw.shape != (num_classes,) or not bool(torch.isfinite(cw).all()) or \
                    bool((cw < 0).any()):
                raise ValueError(f"class_weight must be {num_classes} finite weights >= 0 "
                                 f"(one per class, the same on every rank)")
        self.register_buffer("class_weight", cw)
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self.n_correct, self.accuracy, self.n_classes_used = 0, 0.0, 0
        self._last_classes = np.empty(0, dtype=np.int64)  # this rank's, at the last call
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the single-process head: ``nn.Linear``'s initialisation for the softmax head
        (fan-in D, the same on every rank), ``normal_(std=0.01)`` for the others."""
        if self.kind == "softmax":
            torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.embedding_dim)
                torch.nn.init.uniform_(self.bias, -bound, bound)
        else:
            torch.nn.init.normal_(self.weight, std=0.01)

    def _fingerprint(self) -> int:
        """What must agree on every rank, hashed (a mismatch raises on every rank).  Not the
        seed: each rank draws from its own range, and its draw includes the rank anyway."""
        cw = b"" if self.class_weight is None else self.class_weight.cpu().numpy().tobytes()
        text = repr((self.kind, sorted(self._head.items()), self.reduction, self.num_classes,
                     self.embedding_dim, self.sample_rate, self.bias is not None,
                     str(self.weight.dtype),
                     self.scale_for_ddp, zlib.crc32(cw)))
        return zlib.crc32(text.encode())

    def forward(self, x: torch.Tensor, labels: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a torch.Tensor (n, embedding_dim)")
        sampling = self.training and self.sample_rate < 1.0
        loss = _ShardedFunction.apply(x, self.weight, self.bias, labels, self, sampling)
        if sampling:
            with torch.no_grad():
                self.sample_step += 1
        return loss

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return (f"{self.kind}, num_classes={self.num_classes}, embedding_dim="
                f"{self.embedding_dim}{options}, classes=[{self.class_start}, "
                f"{self.class_stop}), sample_rate={self.sample_rate}, reduction="
                f"{self.reduction!r}")

    # -- one step -----------------------------------------------------------------------

    def _validate(self, x: torch.Tensor, labels: Any) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"x must be (n, {self.embedding_dim}), got {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the module's weight is on "
                             f"{self.weight.device}: move one of them (module.to(x.device))")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        codes = _heads.class_labels(np.asarray(labels), int(x.shape[0]), self.num_classes,
                                    "num_classes")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinity")
        return codes

    def _classes(self, labels_all: np.ndarray, sampling: bool) -> np.ndarray:
        """This rank's classes for the step: all of its range, or Partial FC's draw."""
        lo, hi = self.class_start, self.class_stop
        if not sampling:
            return np.arange(lo, hi, dtype=np.int64)
        positives = np.unique(labels_all[(labels_all >= lo) & (labels_all < hi)])
        keep = math.ceil(self.sample_rate * (hi - lo))
        if len(positives) >= keep:
            return positives.astype(np.int64)
        rng = np.random.default_rng([self.seed, self._group.rank, int(self.sample_step)])
        others = np.setdiff1d(np.arange(lo, hi, dtype=np.int64), positives,
                              assume_unique=True)
        drawn = rng.choice(others, size=keep - len(positives), replace=False)
        return np.sort(np.concatenate([positives, drawn])).astype(np.int64)

    def _step(self, x: torch.Tensor, labels: Any, weight: torch.Tensor,
              bias: torch.Tensor | None, sampling: bool, wants_grad: bool):
        group, device = self._group, x.device
        n = int(x.shape[0]) if x.ndim else 0
        local_error: BaseException | None = None
        codes = np.empty(0, dtype=np.int64)
        try:
            codes = self._validate(x, labels)
        except (TypeError, ValueError) as exc:
            local_error = exc
        dtype_code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
        width = int(x.shape[1]) if x.ndim == 2 else -1
        header = torch.tensor([n, width, dtype_code, int(wants_grad), self._fingerprint(),
                               int(self.sample_step) if sampling else -1, int(sampling),
                               local_error is not None], dtype=torch.int64, device=device)
        headers = group.all_gather(header).cpu().numpy()
        _raise_if_any_failed(headers[:, 7], local_error, "input validation")
        names = {1: "the embedding width", 2: "the embeddings' dtype",
                 3: "whether a gradient is wanted (requires_grad and grad mode)",
                 4: "the head's options (kind, margins, classes, sample_rate, "
                    "class_weight, weight dtype)", 5: "the sampling step (sample_step)",
                 6: "training or eval mode"}
        for column, name in names.items():
            values = headers[:, column]
            if np.any(values != values[0]):
                raise ValueError(f"tripmine.torch.distributed.ShardedMarginSoftmax: {name} "
                                 f"differs across ranks ({values.tolist()}): every rank must "
                                 f"call the same head the same way")
        sizes = [int(s) for s in headers[:, 0]]
        n_max = max(sizes)
        # As the single-process heads: float64 if either side is, else float32.
        compute = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
        x_all = _gather_rows(group, x.detach().to(compute), sizes, n_max)
        labels_all = _gather_rows(group, torch.from_numpy(codes).to(device), sizes,
                                  n_max).cpu().numpy()
        m = len(labels_all)
        classes = self._classes(labels_all, sampling)
        self._last_classes = classes
        self.n_classes_used = int(group.all_gather(
            torch.tensor(len(classes), device=device)).sum())
        w_used = weight.detach().to(compute)
        b_used = None if bias is None else bias.detach().to(compute)
        if sampling:
            rows = torch.from_numpy(classes - self.class_start).to(device)
            w_used = w_used[rows]
            b_used = None if b_used is None else b_used[rows]
        backend = Backend(device)  # NumPy views on the CPU, CuPy arrays (DLPack) on CUDA
        local_labels = _sharded.local_labels(labels_all, classes)
        table = np.zeros((m, 4))
        with backend.stream():
            x_a, w_a, b_a = (backend.array(t) for t in (x_all, w_used, b_used))
            try:
                if m:
                    table = _sharded.statistics(self._head, x_a, local_labels, w_a, b_a,
                                                classes)
                local_error = None
            except Exception as exc:  # re-raised below, once every rank knows
                local_error = exc
        payload = np.concatenate([table.reshape(-1), [local_error is not None]])
        tables = group.all_gather(torch.from_numpy(payload).to(device)).cpu().numpy()
        _raise_if_any_failed(tables[:, -1], local_error, "the tripmine call")
        cw = None if self.class_weight is None else self.class_weight.cpu().numpy()
        if m == 0:
            return 0.0, None, None, None
        combined = _sharded.combine(tables[:, :-1].reshape(group.world, m, 4), labels_all, cw)
        divisor = float(m if cw is None else cw[labels_all].sum())
        red = (1.0 / divisor if divisor > 0 else 0.0) if self.reduction == "mean" else 1.0
        loss = float(combined.per_sample.sum()) * red
        # The same number on every rank, so every rank raises here alike (no hang).
        _range.check_loss_fits(loss, f"the sharded {self.kind} head",
                               8 if compute == torch.float64 else 4)
        self.n_correct = int(combined.correct.sum())
        self.accuracy = self.n_correct / m
        if not wants_grad:
            return loss, None, None, None
        gain = red * (np.ones(m) if cw is None else cw[labels_all])
        parts = (None, None, None)
        with backend.stream():
            try:
                parts = _sharded.gradients(self._head, x_a, local_labels, w_a, b_a,
                                           combined.lse, gain, True, True)
                local_error = None
            except Exception as exc:
                local_error = exc
            grad_part, wgrad, bgrad = (backend.tensor(a) for a in parts)
        flags = group.all_gather(torch.tensor([local_error is not None],
                                              device=device)).cpu().numpy()
        _raise_if_any_failed(flags, local_error, "the tripmine gradient call")
        padded = grad_part.new_zeros((group.world * n_max, grad_part.shape[1]))
        start = 0
        for r, size in enumerate(sizes):
            padded[r * n_max:r * n_max + size] = grad_part[start:start + size]
            start += size
        x_grad = group.reduce_scatter(padded, n_max)[:n].clone()
        if self.scale_for_ddp:
            x_grad *= group.world
        if sampling:
            rows = torch.from_numpy(classes - self.class_start).to(device)
            full = wgrad.new_zeros(tuple(weight.shape))
            full[rows] = wgrad
            wgrad = full
            if bgrad is not None:
                full_b = bgrad.new_zeros(tuple(bias.shape))
                full_b[rows] = bgrad
                bgrad = full_b
        return loss, x_grad, wgrad, bgrad


def _gather_rows(group: _Group, rows: torch.Tensor, sizes: list[int], n_max: int):
    """Every rank's rows, concatenated in rank order (unequal sizes padded for the
    collective)."""
    n = rows.shape[0]
    if n < n_max:
        padded = rows.new_zeros((n_max, *rows.shape[1:]))
        padded[:n] = rows
        rows = padded
    gathered = group.all_gather(rows)
    return torch.cat([gathered[r, :s] for r, s in enumerate(sizes)])


class _ShardedFunction(torch.autograd.Function):
    """The global loss; forward computes both gradients, backward scales them."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, module, sampling):
        wants = any(ctx.needs_input_grad[:3])
        loss, x_grad, wgrad, bgrad = module._step(x, labels, weight, bias, sampling, wants)
        ctx.grads = (x_grad, wgrad, bgrad)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # The compute dtype, as the single-process heads return it.
        out_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
        return torch.tensor(loss, dtype=out_dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output):
        # The gradients are handed over, scaled in place: holding on to them would make
        # autograd copy dL/dW (C/W x D) into weight.grad instead of taking it.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("backward through ShardedMarginSoftmax ran twice: its gradients "
                               "were handed over the first time; call the head again")
        unit = bool(grad_output == 1)
        out = []
        for g, need, dtype in zip(grads, ctx.needs_input_grad[:3], ctx.dtypes):
            if g is None or not need:
                out.append(None)
                continue
            if not unit:
                g.mul_(grad_output.to(g.dtype))
            out.append(g.to(dtype))
        del grads
        return (*out, None, None, None)
