"""tripmine's triplet and contrastive losses as torch functions and ``nn.Module``s.

The functional forms (:func:`triplet_loss`, :func:`contrastive_loss`) take the
same options as :func:`tripmine.triplet_loss` / :func:`tripmine.contrastive_loss`
and return a differentiable tensor; the modules (:class:`TripletLoss`,
:class:`ContrastiveLoss`) keep the options as attributes and expose the last
call's counts (``n_active``, ``fraction_active``, ...) for logging.

Query-vs-reference mining: pass ``ref`` / ``ref_labels`` (gradients flow into
``ref`` too when it requires grad), or a :class:`~tripmine.torch.MemoryBank`
(``memory=``) for the cross-batch-memory loss of Wang et al. 2020.

Under ``torch.compile`` the loss runs eagerly: it is wrapped in
``torch.compiler.disable``, so the compiled model graph-breaks around it (the
C core is opaque to the compiler), and the rest of the model is compiled as
usual.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import numpy as np
import torch

import tripmine
from tripmine import _validation as check
from tripmine.losses import MINING, REDUCTIONS
from tripmine.miners import DEFAULT_CUTOFF, DEFAULT_NONZERO_LOSS_CUTOFF

from ._bridge import check_embeddings, label_tensor
from ._function import LossCall, TripmineLoss
from .memory import MemoryBank

__all__ = ["ContrastiveLoss", "TripletLoss", "contrastive_loss", "triplet_loss"]

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable

#: Added to a module's seed once per call (``advance_seed=True``): the SplitMix64
#: increment, so call k's seed is the k-th state of a SplitMix64 sequence from ``seed``.
SEED_STEP = 0x9E3779B97F4A7C15

SELECTS = ("closest", "random", "all")


# --------------------------------------------------------------------------- inputs


def _reference(x: torch.Tensor, labels: Any, ref: Any, ref_labels: Any, ref_offset: Any,
               memory: MemoryBank | None):
    """(ref, ref_labels, ref_offset) for the call; the memory bank's XBM reference set."""
    if ref is not None:
        check_embeddings(ref, "ref")
    if memory is None:
        return ref, ref_labels, ref_offset
    if not isinstance(memory, MemoryBank):
        raise TypeError(f"memory must be a tripmine.torch.MemoryBank, got "
                        f"{type(memory).__name__}")
    if ref is not None or ref_labels is not None or ref_offset is not None:
        raise ValueError("pass either memory or ref/ref_labels/ref_offset, not both: with a "
                         "memory bank the reference set is the batch followed by the bank")
    bank_x, bank_labels = memory.get()
    if bank_x.shape[1] != x.shape[1]:
        raise ValueError(f"the memory bank holds {bank_x.shape[1]}-dimensional embeddings but "
                         f"embeddings has {x.shape[1]} features")
    # The batch's own rows come first: x[i] is ref[i], which ref_offset=0 tells tripmine,
    # so that (i, i) is neither a positive nor a negative, exactly as in self mode.
    ref = torch.cat([x, bank_x.to(device=x.device, dtype=x.dtype)])
    ref_labels = torch.cat([label_tensor(labels, x.device), bank_labels.to(x.device)])
    return ref, ref_labels, 0


def _given_triplets(triplets: Any, backend) -> tripmine.Triplets:
    parts = tuple(triplets)
    if len(parts) != 3:
        raise ValueError("triplets must be (anchor, positive, negative) index arrays or tensors")
    return tripmine.Triplets(*(backend.labels(p) for p in parts))


def _want_grad(x: torch.Tensor, ref: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (ref is not None
                                                            and ref.requires_grad))


def _with_offset(kwargs: dict, ref_offset: Any) -> dict:
    # Passed only when set, so that calls without it work on any tripmine version.
    if ref_offset is not None:
        kwargs["ref_offset"] = ref_offset
    return kwargs


# --------------------------------------------------------------------------- torch terms


def _unit_rows(a: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    positive = norms > 0
    return torch.where(positive, a / torch.where(positive, norms, torch.ones_like(norms)), 0.0)


def _paired_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """d(a_i, b_i) row by row, with tripmine's conventions (0 gradient at 0 distance,
    a zero vector at cosine distance 1)."""
    if metric == "cosine":
        norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
        positive = norms > 0
        cos = (a * b).sum(1) / torch.where(positive, norms, torch.ones_like(norms))
        return torch.where(positive, 1 - cos, 1.0)
    squared = ((a - b) ** 2).sum(1)
    if metric == "sqeuclidean":
        return squared
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)


def _index_tensor(indices: Any, device: torch.device) -> torch.Tensor:
    """Triplet indices (NumPy, or CuPy from the GPU path) as a tensor on ``device``."""
    if isinstance(indices, np.ndarray):
        return torch.from_numpy(indices).to(device)
    return torch.from_dlpack(indices).to(device)


def _triplet_terms(config: dict):
    """The per-triplet losses in torch, for the weighted backward of reduction="none"."""

    def terms(result, x: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        if config["normalize"]:
            x = _unit_rows(x)
            ref = None if ref is None else _unit_rows(ref)
        rows = x if ref is None else ref
        anchor, positive, negative = (_index_tensor(t, x.device) for t in result.triplets)
        z = (_paired_distances(x[anchor], rows[positive], config["metric"])
             - _paired_distances(x[anchor], rows[negative], config["metric"])
             + config["margin"])
        return torch.nn.functional.softplus(z) if config["soft"] else torch.relu(z)

    return terms


# --------------------------------------------------------------------------- functional


@_disable
def _triplet(embeddings: torch.Tensor, labels: Any, *, mining: Any = "batch_hard",
             margin: float = 0.2, soft: bool = False, metric: str = "euclidean",
             normalize: bool = False, reduction: str = "auto", ref: Any = None,
             ref_labels: Any = None, ref_offset: int | None = None,
             memory: MemoryBank | None = None, enqueue: bool = True, seed: int | None = None,
             select: str = "closest", cutoff: float = DEFAULT_CUTOFF,
             nonzero_loss_cutoff: float = DEFAULT_NONZERO_LOSS_CUTOFF,
             max_triplets: int | None = None, check_finite: bool = True):
    """The loss tensor and tripmine's result (counts, triplets, seed; no gradients)."""
    x = check_embeddings(embeddings, "embeddings")
    ref, ref_labels, ref_offset = _reference(x, labels, ref, ref_labels, ref_offset, memory)
    check.choice(select, "select", SELECTS)
    given = not isinstance(mining, str)
    if not given:
        check.choice(mining, "mining", MINING)
    # Options triplet_loss does not take are handled by mining first with the miner itself.
    own_semi_hard = mining == "semi_hard" and (select != "closest" or max_triplets is not None)
    own_weighted = mining == "distance_weighted" and (
        cutoff != DEFAULT_CUTOFF or nonzero_loss_cutoff != DEFAULT_NONZERO_LOSS_CUTOFF)
    used_seed = None
    if own_semi_hard or own_weighted:
        used_seed = secrets.randbits(64) if seed is None else seed
    config = dict(margin=margin, soft=soft, metric=metric, normalize=normalize,
                  reduction=reduction)

    def compute(backend, x_arr, ref_arr, want_grad):
        codes = backend.labels(labels)
        ref_codes = backend.labels(ref_labels)
        where = _with_offset(dict(ref=ref_arr, ref_labels=ref_codes, metric=metric,
                                  normalize=normalize, check_finite=check_finite), ref_offset)
        rule = mining
        if given:
            rule = _given_triplets(mining, backend)
        elif own_semi_hard:
            rule = tripmine.semi_hard(x_arr, codes, margin=margin, select=select,
                                      seed=used_seed, max_triplets=max_triplets, **where)
        elif own_weighted:
            rule = tripmine.distance_weighted(x_arr, codes, cutoff=cutoff,
                                              nonzero_loss_cutoff=nonzero_loss_cutoff,
                                              seed=used_seed, **where)
        result = tripmine.triplet_loss(x_arr, codes, mining=rule, margin=margin, soft=soft,
                                       reduction=reduction, seed=seed, grad=want_grad, **where)
        return result if used_seed is None else dataclasses.replace(result, seed=used_seed)

    per_item = reduction == "none"
    call = LossCall(compute, _want_grad(x, ref), per_item=per_item,
                    terms=_triplet_terms(config) if per_item and mining != "batch_all" else None)
    loss = TripmineLoss.apply(x, ref, call)
    if memory is not None and enqueue:
        memory.enqueue(x, labels)  # after the loss, so the batch never meets its own copies
    return loss, call.result


def triplet_loss(embeddings: torch.Tensor, labels: Any, *, mining: Any = "batch_hard",
                 margin: float = 0.2, soft: bool = False, metric: str = "euclidean",
                 normalize: bool = False, reduction: str = "auto", ref: Any = None,
                 ref_labels: Any = None, ref_offset: int | None = None,
                 memory: MemoryBank | None = None, enqueue: bool = True,
                 seed: int | None = None, select: str = "closest",
                 cutoff: float = DEFAULT_CUTOFF,
                 nonzero_loss_cutoff: float = DEFAULT_NONZERO_LOSS_CUTOFF,
                 max_triplets: int | None = None, check_finite: bool = True) -> torch.Tensor:
    """:func:`tripmine.triplet_loss` as a differentiable torch function.

    ``l = max(0, d(a,p) - d(a,n) + margin)`` per mined triplet (``softplus`` with
    ``soft=True``), reduced by ``reduction`` (``"auto"``: ``"mean_nonzero"`` for
    batch-all, ``"mean"`` otherwise).  Returns a 0-d tensor, or a vector for
    ``reduction="none"`` (per triplet; per anchor for batch-all).

    embeddings: (N, D) float16, bfloat16, float32 or float64 tensor, on the CPU
    (NumPy views, no copy) or CUDA (CuPy through DLPack).  float16/bfloat16 are
    computed in float32; the loss is float32 and the gradient comes back in the
    input's dtype.  labels: (N,) torch tensor or NumPy array.

    mining: ``"batch_hard"``, ``"batch_all"``, ``"semi_hard"``,
    ``"distance_weighted"``, or your own ``(anchor, positive, negative)`` index
    arrays or tensors.  ``select`` / ``max_triplets`` (semi-hard) and ``cutoff``
    / ``nonzero_loss_cutoff`` (distance-weighted) are the miners' options.

    ref, ref_labels: a reference set to mine against (its gradient flows when
    it requires grad); ``ref_offset=k`` says ``embeddings[i]`` is ``ref[k + i]``,
    so those pairs are excluded as in self mode.  memory: a
    :class:`~tripmine.torch.MemoryBank`; the anchors are mined against the batch
    followed by the bank's contents (the batch's own pairs excluded), then the
    batch is enqueued (``enqueue=False`` to skip that).

    seed: as in :func:`tripmine.triplet_loss` (random rules only; ``None`` draws
    fresh OS entropy on every call).
    """
    return _triplet(embeddings, labels, mining=mining, margin=margin, soft=soft, metric=metric,
                    normalize=normalize, reduction=reduction, ref=ref, ref_labels=ref_labels,
                    ref_offset=ref_offset, memory=memory, enqueue=enqueue, seed=seed,
                    select=select, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff,
                    max_triplets=max_triplets, check_finite=check_finite)[0]


@_disable
def _contrastive(embeddings: torch.Tensor, labels: Any, *, pos_margin: float = 0.0,
                 neg_margin: float = 1.0, power: int = 1, metric: str = "euclidean",
                 normalize: bool = False, reduction: str = "mean_nonzero", ref: Any = None,
                 ref_labels: Any = None, ref_offset: int | None = None,
                 memory: MemoryBank | None = None, enqueue: bool = True,
                 check_finite: bool = True):
    x = check_embeddings(embeddings, "embeddings")
    ref, ref_labels, ref_offset = _reference(x, labels, ref, ref_labels, ref_offset, memory)

    def compute(backend, x_arr, ref_arr, want_grad):
        where = _with_offset(dict(ref=ref_arr, ref_labels=backend.labels(ref_labels),
                                  metric=metric, normalize=normalize,
                                  check_finite=check_finite), ref_offset)
        return tripmine.contrastive_loss(x_arr, backend.labels(labels), pos_margin=pos_margin,
                                         neg_margin=neg_margin, power=power,
                                         reduction=reduction, grad=want_grad, **where)

    call = LossCall(compute, _want_grad(x, ref), per_item=reduction == "none")
    loss = TripmineLoss.apply(x, ref, call)
    if memory is not None and enqueue:
        memory.enqueue(x, labels)
    return loss, call.result


def contrastive_loss(embeddings: torch.Tensor, labels: Any, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0, power: int = 1, metric: str = "euclidean",
                     normalize: bool = False, reduction: str = "mean_nonzero", ref: Any = None,
                     ref_labels: Any = None, ref_offset: int | None = None,
                     memory: MemoryBank | None = None, enqueue: bool = True,
                     check_finite: bool = True) -> torch.Tensor:
    """:func:`tripmine.contrastive_loss` as a differentiable torch function.

    Over all ordered pairs: positives ``max(0, d - pos_margin) ** power``, negatives
    ``max(0, neg_margin - d) ** power``; ``"mean_nonzero"`` (default) is the mean of
    the nonzero positive terms plus that of the nonzero negative terms
    (pytorch-metric-learning's ``ContrastiveLoss``).  Devices, dtypes, ``ref``,
    ``ref_offset`` and ``memory`` as in :func:`triplet_loss`.
    """
    return _contrastive(embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin,
                        power=power, metric=metric, normalize=normalize, reduction=reduction,
                        ref=ref, ref_labels=ref_labels, ref_offset=ref_offset, memory=memory,
                        enqueue=enqueue, check_finite=check_finite)[0]


# --------------------------------------------------------------------------- modules


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be None or a non-negative integer, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


class TripletLoss(torch.nn.Module):
    """Triplet margin loss with tripmine's mining, as an ``nn.Module``.

    The options are those of :func:`triplet_loss`, kept as attributes of the
    same names (``mining``, ``margin``, ``soft``, ``metric``, ``normalize``,
    ``reduction``, ``seed``, ``select``, ``cutoff``, ``nonzero_loss_cutoff``,
    ``max_triplets``, ``memory``); change them between calls as you like.

    Seeds (distance-weighted and random semi-hard mining): ``seed=None`` draws
    fresh OS entropy on every call.  With an integer seed and
    ``advance_seed=True`` (default), call k (counted from 0, kept in the
    ``state_dict``) uses ``(seed + k * 0x9E3779B97F4A7C15) mod 2**64``: every
    step draws other triplets, and a rerun (or a resumed checkpoint) draws the
    same ones.  ``advance_seed=False`` uses ``seed`` on every call.
    ``last_seed`` is the seed the last call used.

    After each call: ``n_triplets``, ``n_active`` (triplets with a nonzero
    loss), ``fraction_active`` (watch it for collapse), ``triplets`` (indices
    into the batch and the reference set) and ``last_seed``.

    ``memory``: a :class:`~tripmine.torch.MemoryBank`; forward then computes the
    cross-batch-memory loss and enqueues the batch afterwards.
    """

    def __init__(self, mining: str = "batch_hard", margin: float = 0.2, soft: bool = False,
                 metric: str = "euclidean", normalize: bool = False, reduction: str = "auto",
                 seed: int | None = None, *, advance_seed: bool = True,
                 select: str = "closest", cutoff: float = DEFAULT_CUTOFF,
                 nonzero_loss_cutoff: float = DEFAULT_NONZERO_LOSS_CUTOFF,
                 max_triplets: int | None = None, memory: MemoryBank | None = None,
                 check_finite: bool = True):
        super().__init__()
        self.mining = check.choice(mining, "mining", MINING)
        self.margin = check.non_negative(margin, "margin")
        self.soft = check.flag(soft, "soft")
        check.metric_code(metric)
        self.metric = metric
        self.normalize = check.flag(normalize, "normalize")
        self.reduction = check.choice(reduction, "reduction", REDUCTIONS)
        self.seed = _check_seed(seed)
        self.advance_seed = check.flag(advance_seed, "advance_seed")
        self.select = check.choice(select, "select", SELECTS)
        self.cutoff = check.positive_real(cutoff, "cutoff")
        self.nonzero_loss_cutoff = check.positive_real(nonzero_loss_cutoff, "nonzero_loss_cutoff")
        self.max_triplets = check.optional_count(max_triplets, "max_triplets")
        self.memory = memory
        self.check_finite = check.flag(check_finite, "check_finite")
        self.calls = 0
        self.n_triplets = 0
        self.n_active = 0
        self.fraction_active = 0.0
        self.triplets: tripmine.Triplets | None = None
        self.last_seed: int | None = None

    def call_seed(self) -> int | None:
        """The seed the next call will use (None: fresh entropy)."""
        if self.seed is None or not self.advance_seed:
            return self.seed
        return (int(self.seed) + self.calls * SEED_STEP) % 2**64

    @_disable
    def forward(self, embeddings: torch.Tensor, labels: Any, ref: Any = None,
                ref_labels: Any = None, *, ref_offset: int | None = None,
                triplets: Any = None, memory: MemoryBank | None = None,
                enqueue: bool = True) -> torch.Tensor:
        """The loss of this batch (0-d, or a vector for ``reduction="none"``).

        ``triplets``: your own ``(anchor, positive, negative)`` for this call
        instead of ``mining``.  ``memory``: a bank for this call (default
        ``self.memory``); the batch is enqueued after the loss unless
        ``enqueue=False``.
        """
        loss, result = _triplet(
            embeddings, labels, mining=self.mining if triplets is None else triplets,
            margin=self.margin, soft=self.soft, metric=self.metric, normalize=self.normalize,
            reduction=self.reduction, ref=ref, ref_labels=ref_labels, ref_offset=ref_offset,
            memory=self.memory if memory is None else memory, enqueue=enqueue,
            seed=self.call_seed(), select=self.select, cutoff=self.cutoff,
            nonzero_loss_cutoff=self.nonzero_loss_cutoff, max_triplets=self.max_triplets,
            check_finite=self.check_finite)
        self.calls += 1
        self.n_triplets, self.n_active = result.n_triplets, result.n_active
        self.fraction_active = result.fraction_active
        self.triplets, self.last_seed = result.triplets, result.seed
        return loss

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def extra_repr(self) -> str:
        return (f"mining={self.mining!r}, margin={self.margin}, soft={self.soft}, "
                f"metric={self.metric!r}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, seed={self.seed}")


class ContrastiveLoss(torch.nn.Module):
    """Contrastive loss over all pairs, as an ``nn.Module`` (options as attributes:
    ``pos_margin``, ``neg_margin``, ``power``, ``metric``, ``normalize``,
    ``reduction``, ``memory``).  After each call: ``n_pairs``,
    ``n_positive_pairs``, ``n_negative_pairs``, ``n_active``, ``fraction_active``.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, power: int = 1,
                 metric: str = "euclidean", normalize: bool = False,
                 reduction: str = "mean_nonzero", *, memory: MemoryBank | None = None,
                 check_finite: bool = True):
        super().__init__()
        self.pos_margin = check.non_negative(pos_margin, "pos_margin")
        self.neg_margin = check.non_negative(neg_margin, "neg_margin")
        if isinstance(power, (bool, np.bool_)) or power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power!r}")
        self.power = int(power)
        check.metric_code(metric)
        self.metric = metric
        self.normalize = check.flag(normalize, "normalize")
        self.reduction = check.choice(reduction, "reduction",
                                      ("mean", "sum", "mean_nonzero", "none"))
        self.memory = memory
        self.check_finite = check.flag(check_finite, "check_finite")
        self.n_pairs = self.n_positive_pairs = self.n_negative_pairs = self.n_active = 0
        self.fraction_active = 0.0

    @_disable
    def forward(self, embeddings: torch.Tensor, labels: Any, ref: Any = None,
                ref_labels: Any = None, *, ref_offset: int | None = None,
                memory: MemoryBank | None = None, enqueue: bool = True) -> torch.Tensor:
        loss, result = _contrastive(
            embeddings, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
            power=self.power, metric=self.metric, normalize=self.normalize,
            reduction=self.reduction, ref=ref, ref_labels=ref_labels, ref_offset=ref_offset,
            memory=self.memory if memory is None else memory, enqueue=enqueue,
            check_finite=self.check_finite)
        self.n_pairs, self.n_active = result.n_pairs, result.n_active
        self.n_positive_pairs = result.n_positive_pairs
        self.n_negative_pairs = result.n_negative_pairs
        self.fraction_active = result.fraction_active
        return loss

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"power={self.power}, metric={self.metric!r}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")
