"""Distributed mining with ``torch.distributed``: N ranks train exactly as one process.

(The class-sharded margin-softmax heads, :class:`ShardedMarginSoftmax`, live in
:mod:`tripmine.torch.sharded` and are exported here.)

:class:`DistributedLoss` wraps a tripmine loss (triplet or contrastive) so that
each rank mines its own embeddings against the embeddings of *all* ranks and
gets back the exact gradient of the loss one process would compute on the
concatenated batch::

    rank r: x_r (n_r x D), labels_r
       |  all_gather (sizes first: ranks may hold different batch sizes)
       v
    X = [x_0; x_1; ...; x_{W-1}]  (M x D), labels of all ranks
       |  tripmine, reference mode: x = x_r, ref = X, ref_offset = n_0 + ... + n_{r-1},
       |  reduction="sum"  ->  loss_r, counts_r, grad_r (n_r x D), ref_grad_r (M x D)
       v
    all_gather of (loss_r, counts_r)  ->  the global loss, the same number on every rank
    backward:  dL/dx_r = grad_r + rows of x_r in (ref_grad_0 + ... + ref_grad_{W-1})
               (a reduce-scatter; an all_reduce where the backend has none)

``ref_offset`` tells tripmine that ``x_r`` *is* that slice of ``X``: a sample's
pair with itself is excluded (as in self mode) and the seeded rules key their
draws on the sample's global row, so the ranks together mine exactly the
triplets of one process on ``X`` (batch-hard, batch-all, semi-hard,
distance-weighted with a seed; the seed of rank 0 is used everywhere).  The
losses are reduced with ``"sum"`` locally and the counts added over ranks
before dividing, so ``"mean"``, ``"mean_nonzero"`` and ``"sum"`` equal the
single-process values (to the rounding of a different summation order).

**Gradients and DistributedDataParallel.**  Rank r's backward pass gives
``grad_output * dL/dx_r``: the gradient of the *global* loss with respect to
its own embeddings, every rank's anchors included.  The gradient of the
global loss with respect to the model's parameters is therefore the **sum**
over ranks of what each rank's backward produces.  DDP *averages* parameter
gradients (divides that sum by the world size W), so a DDP model would train
with 1/W of the single-process gradient.  ``scale_for_ddp=True`` multiplies
the embeddings' gradient by W (the loss value is left alone) so that DDP's
average is exactly the single-process gradient.  Keep it ``False`` when you
sum the gradients yourself (``all_reduce(SUM)``) or want DDP's averaged
scale.  (pytorch-metric-learning's ``DistributedLossWrapper`` instead keeps
only the local slice's gradient and no reference gradient, the question of
its issue #732.)  Every rank must call ``backward`` on its loss, since the
backward pass is a collective.

**Communication per step** (W ranks, largest local batch n_max, M = the
global batch, D features, b bytes per embedding element, b_g per gradient
element: 4 for float32 and the half types, 8 for float64):

* forward: an all_gather of 8 int64 per rank (sizes and a consistency
  check); an all_gather of the embeddings, padded to n_max rows, i.e. each
  rank receives (W - 1) * n_max * D * b bytes; the labels likewise as int64
  (8 (W - 1) n_max bytes; floats as float64; strings and other objects
  through ``all_gather_object``, pickled); an all_gather of 7 float64 per rank
  (losses and counts);
* backward: a reduce-scatter of the W * n_max x D reference gradient, about
  (W - 1) * n_max * D * b_g bytes sent and received per rank in a ring; where
  the backend refuses reduce-scatter (gloo in older PyTorch releases), an
  all_reduce of the same buffer, about twice that, then this rank's rows are
  kept.  ``gradient_collective`` forces one or the other.

Memory per rank: the gathered M x D embeddings and an M x D reference
gradient, plus what the tripmine call needs (linear in M).  Compute per rank:
its n_r anchors against M references, 1/W of the single-process work
(contrastive ``"mean_nonzero"`` runs the pair walk twice, once for the positive
and once for the negative terms, since it scales them by separate global
counts).

CPU tensors reach tripmine as NumPy arrays without a copy (``Tensor.numpy()``).
CUDA tensors are handed over through DLPack as CuPy arrays, for tripmine's
GPU path; where that path (or CuPy) is missing, a ``TypeError`` says so.
Without an initialised process group the loss runs as a single process.
"""

from __future__ import annotations

import secrets
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

import tripmine
from tripmine import _problem
from tripmine import _validation as check
from tripmine.losses import MINING
from tripmine.miners import DEFAULT_CUTOFF, DEFAULT_NONZERO_LOSS_CUTOFF

__all__ = [
    "DistributedLoss",
    "DistributedLossStats",
    "ShardedMarginSoftmax",
    "distributed_contrastive_loss",
    "distributed_triplet_loss",
]

TRIPLET_OPTIONS = {"mining": "batch_hard", "margin": 0.2, "soft": False, "metric": "euclidean",
                   "normalize": False, "reduction": "auto", "seed": None}
CONTRASTIVE_OPTIONS = {"pos_margin": 0.0, "neg_margin": 1.0, "power": 1, "metric": "euclidean",
                       "normalize": False, "reduction": "mean_nonzero"}
#: "none" has no meaning for one global number.
REDUCTIONS = ("auto", "mean", "sum", "mean_nonzero")
GRADIENT_COLLECTIVES = ("auto", "reduce_scatter", "all_reduce")

# Embedding dtypes that cross ranks (the half types compute in float32), by code.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How labels cross ranks: as int64, as float64, or pickled.
_INTEGER_LABELS, _FLOAT_LABELS, _OBJECT_LABELS = 0, 1, 2
# A positive margin no finite distance exceeds: it switches the positive terms off.
_NO_POSITIVE_TERMS = float(np.finfo(np.float64).max)
# Backends that refused reduce-scatter in this process (then all_reduce is used).
_REDUCE_SCATTER_REFUSED: set[str] = set()


@dataclass(frozen=True)
class DistributedLossStats:
    """Global counts of the last step, identical on every rank.

    ``n_triplets`` (triplet loss) or ``n_pairs``, ``n_positive_pairs`` and
    ``n_negative_pairs`` (contrastive) count the whole global batch, as
    :func:`tripmine.triplet_loss` / :func:`tripmine.contrastive_loss` would on
    the concatenated batch; ``seed`` is the seed every rank mined with
    (distance-weighted; None otherwise).
    """

    loss: float
    n_active: int
    fraction_active: float
    batch_sizes: tuple[int, ...]
    n_triplets: int | None = None
    n_pairs: int | None = None
    n_positive_pairs: int | None = None
    n_negative_pairs: int | None = None
    seed: int | None = None


# ---- configuration -----------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    kind: str  # "triplet" or "contrastive"
    options: dict

    def fingerprint(self) -> int:
        """A checksum of the options (the seed aside: rank 0's is used), compared across ranks."""
        shown = sorted((k, repr(v)) for k, v in self.options.items() if k != "seed")
        return zlib.crc32(repr((self.kind, shown)).encode())


def _configure(loss: Any, options: dict) -> _Config:
    """A loss name with keyword options, or an object exposing the options as attributes."""
    if isinstance(loss, str):
        if loss not in ("triplet", "contrastive"):
            raise ValueError(f"loss must be 'triplet', 'contrastive' or an object with the "
                             f"options as attributes, got {loss!r}")
        defaults = TRIPLET_OPTIONS if loss == "triplet" else CONTRASTIVE_OPTIONS
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for a {loss} loss; the options are "
                            f"{sorted(defaults)}")
        kind, values = loss, {**defaults, **options}
    else:
        if options:
            raise TypeError("pass either a loss object or keyword options, not both")
        if all(hasattr(loss, name) for name in ("pos_margin", "neg_margin", "power")):
            kind = "contrastive"
        elif hasattr(loss, "mining") and hasattr(loss, "margin"):
            kind = "triplet"
        else:
            raise TypeError(f"cannot tell which loss {type(loss).__name__} is: expected the "
                            f"attributes of a triplet loss ({sorted(TRIPLET_OPTIONS)}) or of a "
                            f"contrastive loss ({sorted(CONTRASTIVE_OPTIONS)})")
        defaults = TRIPLET_OPTIONS if kind == "triplet" else CONTRASTIVE_OPTIONS
        values = {name: getattr(loss, name, default) for name, default in defaults.items()}
        # Options of tripmine.torch's modules this wrapper does not carry over: refuse
        # them rather than silently mine by another rule.
        unsupported = {"select": "closest", "max_triplets": None, "memory": None,
                       "cutoff": DEFAULT_CUTOFF, "nonzero_loss_cutoff": DEFAULT_NONZERO_LOSS_CUTOFF}
        changed = sorted(name for name, default in unsupported.items()
                         if getattr(loss, name, default) is not default
                         and getattr(loss, name, default) != default)
        if changed:
            raise ValueError(f"DistributedLoss does not support the option(s) {changed} of "
                             f"{type(loss).__name__}; leave them at their defaults")
    if not isinstance(values["reduction"], str) or values["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)} for a distributed loss "
                         f"(one number for the global batch), got {values['reduction']!r}")
    if kind == "triplet" and (not isinstance(values["mining"], str)
                              or values["mining"] not in MINING):
        raise ValueError(f"mining must be one of {list(MINING)} for a distributed loss (given "
                         f"Triplets would index one rank's batch), got {values['mining']!r}")
    if values["reduction"] == "auto":  # tripmine's meaning of "auto"
        batch_all = kind == "triplet" and values["mining"] == "batch_all"
        values["reduction"] = "mean" if kind == "triplet" and not batch_all else "mean_nonzero"
    return _Config(kind, values)


# ---- collectives ---------------------------------------------------------------


class _Group:
    """The collectives this module uses, on a process group, or trivially for one process."""

    def __init__(self, group: Any, gradient_collective: str):
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.gradient_collective = gradient_collective

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(...) on every rank -> (world, ...), rank order."""
        tensor = tensor.contiguous()
        if self.world == 1:
            return tensor.unsqueeze(0)
        out = tensor.new_empty((self.world, *tensor.shape))
        dist.all_gather(list(out.unbind(0)), tensor, group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def reduce_scatter(self, padded: torch.Tensor, block_rows: int) -> torch.Tensor:
        """Rows [rank * block_rows, (rank + 1) * block_rows) of the sum over ranks of ``padded``."""
        if self.world == 1:
            return padded[:block_rows]
        backend = str(dist.get_backend(self.group))
        if self.gradient_collective == "reduce_scatter" or (
                self.gradient_collective == "auto" and backend not in _REDUCE_SCATTER_REFUSED):
            out = padded.new_empty((block_rows, *padded.shape[1:]))
            reduce_scatter = (getattr(dist, "reduce_scatter_single", None)
                              or dist.reduce_scatter_tensor)
            try:
                reduce_scatter(out, padded, group=self.group)
                return out
            except (RuntimeError, NotImplementedError) as exc:
                # A backend without the collective refuses it on every rank, before
                # any communication: fall back to all_reduce, and remember.
                if self.gradient_collective != "auto" or "support" not in str(exc).lower():
                    raise
                _REDUCE_SCATTER_REFUSED.add(backend)
        dist.all_reduce(padded, group=self.group)
        return padded[self.rank * block_rows:(self.rank + 1) * block_rows]


def _raise_if_any_failed(flags: np.ndarray, local_error: BaseException | None, what: str) -> None:
    """Every rank raises if one failed (a rank raising alone would leave the others waiting)."""
    failed = [int(r) for r in np.flatnonzero(flags)]
    if not failed:
        return
    if local_error is not None:
        raise local_error
    raise RuntimeError(f"tripmine.torch.distributed: {what} failed on rank(s) {failed}; see the "
                       f"error raised there")


# ---- arrays: NumPy for CPU tensors, CuPy (through DLPack) for CUDA tensors ----------


def _cupy_or_none(device: torch.device):
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise TypeError(f"embeddings on {device.type!r} are not supported: use CPU tensors "
                        f"(NumPy path) or CUDA tensors (CuPy path)")
    try:
        import cupy
    except ImportError:
        raise TypeError("CUDA embeddings are handed to tripmine as CuPy arrays (DLPack), but "
                        "CuPy is not installed; install it, or compute on CPU tensors with a "
                        "gloo process group") from None
    return cupy


def _to_array(tensor: torch.Tensor, cupy: Any):
    return tensor.numpy() if cupy is None else cupy.from_dlpack(tensor)


def _to_tensor(array: Any, cupy: Any) -> torch.Tensor:
    return torch.from_numpy(array) if cupy is None else torch.from_dlpack(array)


def _call_tripmine(function, cupy: Any, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except TypeError as exc:
        if cupy is None or "GPU" not in str(exc):
            raise
        raise TypeError(f"tripmine.torch.distributed: tripmine has no GPU path for "
                        f"{function.__name__} here ({exc}); compute on CPU tensors with a gloo "
                        f"process group instead") from exc


# ---- one step ----------------------------------------------------------------------


def _label_payload(labels: Any, n: int, device: torch.device) -> tuple[int, Any]:
    """(kind, what crosses ranks): int64 or float64 tensors on ``device``, or a NumPy array."""
    if isinstance(labels, torch.Tensor):
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must be 1-D with one label per embedding ({n}), got shape "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point():
            return _FLOAT_LABELS, labels.detach().to(device=device, dtype=torch.float64)
        if labels.is_complex():
            raise TypeError(f"labels must be integers, floats or strings, got {labels.dtype}")
        return _INTEGER_LABELS, labels.detach().to(device=device, dtype=torch.int64)
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"labels must be 1-D with one label per embedding ({n}), got shape "
                         f"{array.shape}")
    if array.dtype.kind in "biu":
        # uint64 past 2**63 wraps to negative int64: still a one-to-one code.
        codes = array.astype(np.int64)
        return _INTEGER_LABELS, torch.from_numpy(codes).to(device)
    if array.dtype.kind == "f":
        return _FLOAT_LABELS, torch.from_numpy(array.astype(np.float64)).to(device)
    return _OBJECT_LABELS, array


class _Step:
    """One forward and backward pass of the distributed loss on this rank."""

    def __init__(self, config: _Config, group: _Group, scale_for_ddp: bool, wants_grad: bool):
        self.config = config
        self.group = group
        self.scale_for_ddp = scale_for_ddp
        self.wants_grad = wants_grad
        self.stats: DistributedLossStats | None = None
        self.local_grad: torch.Tensor | None = None
        self.ref_grad: torch.Tensor | None = None  # padded: world * n_max rows

    # -- forward ----------------------------------------------------------------

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        group, device = self.group, embeddings.device
        self.n = int(embeddings.shape[0]) if embeddings.ndim else 0
        self.dtype, self.device, self.shape = embeddings.dtype, device, tuple(embeddings.shape)
        local_error: BaseException | None = None
        kind, payload, d = -1, None, 0
        try:
            if embeddings.ndim != 2:
                raise ValueError(f"embeddings must be 2-D (batch x features), got shape "
                                 f"{tuple(embeddings.shape)}")
            if embeddings.dtype not in _DTYPES:
                raise TypeError(f"embeddings must be float16, bfloat16, float32 or float64, got "
                                f"{embeddings.dtype}")
            d = int(embeddings.shape[1])
            kind, payload = _label_payload(labels, self.n, device)
            seed = self.config.options.get("seed")
            seed = secrets.randbits(64) if seed is None else _problem.resolve_seed(seed)
        except (TypeError, ValueError) as exc:
            local_error, seed = exc, 0
        dtype_code = _DTYPES.index(self.dtype) if self.dtype in _DTYPES else -1
        header = torch.tensor([self.n, d, dtype_code, kind, int(self.wants_grad),
                               self.config.fingerprint(),
                               int(np.uint64(seed).astype(np.int64)), local_error is not None],
                              dtype=torch.int64, device=device)
        headers = group.all_gather(header).cpu().numpy()
        _raise_if_any_failed(headers[:, 7], local_error, "input validation")
        kind = self._check_consistent(headers)
        sizes = [int(s) for s in headers[:, 0]]
        self.sizes, self.n_max = sizes, max(sizes)
        self.offset = sum(sizes[:group.rank])
        self.seed = int(np.int64(headers[0, 6]).astype(np.uint64))
        if sum(sizes) == 0:
            return self._finish(np.zeros(7), [], None)
        if self.n == 0:  # an empty list of labels has no kind of its own: take the others'
            payload = (np.empty(0) if kind == _OBJECT_LABELS else
                       torch.empty(0, dtype=torch.int64 if kind == _INTEGER_LABELS
                                   else torch.float64, device=device))

        x_all = self._gather_embeddings(embeddings, d)
        codes = self._gather_labels(kind, payload)
        try:
            stats, parts = self._compute(x_all, codes)
            local_error = None
        except Exception as exc:  # re-raised below, once every rank knows
            stats, parts, local_error = np.zeros(6), [], exc
        return self._finish(np.concatenate([stats, [local_error is not None]]), parts,
                            local_error)

    def _check_consistent(self, headers: np.ndarray) -> int:
        """Every rank must call the same loss the same way; returns the labels' kind."""
        holding = headers[headers[:, 0] > 0]  # ranks with rows: an empty rank's labels have no kind
        names = {1: (headers, "the number of features D"), 2: (headers, "the embeddings' dtype"),
                 3: (holding, "the kind of labels (integers, floats, other)"),
                 4: (headers, "whether a gradient is wanted (requires_grad and grad mode)"),
                 5: (headers, "the loss options")}
        for column, (rows, name) in names.items():
            values = rows[:, column]
            if np.any(values != values[0]):
                raise ValueError(f"tripmine.torch.distributed: {name} differs across ranks "
                                 f"({headers[:, column].tolist()}): every rank must call the "
                                 f"same loss on embeddings of the same width and dtype")
        return int(holding[0, 3]) if len(holding) else _INTEGER_LABELS

    def _gather_embeddings(self, embeddings: torch.Tensor, d: int) -> torch.Tensor:
        """The global batch (M x D), in rank order, in a dtype tripmine computes in."""
        group, sizes = self.group, self.sizes
        rows = embeddings.detach()
        if d == 0:
            gathered = rows.new_zeros((group.world, self.n_max, 0))
        else:
            if self.n < self.n_max:
                padded = rows.new_zeros((self.n_max, d))
                padded[:self.n] = rows
                rows = padded
            gathered = group.all_gather(rows)
        if all(s == self.n_max for s in sizes):
            x_all = gathered.reshape(group.world * self.n_max, d)
        else:
            x_all = torch.cat([gathered[r, :s] for r, s in enumerate(sizes)])
        if x_all.dtype in (torch.float16, torch.bfloat16):
            x_all = x_all.float()
        return x_all

    def _gather_labels(self, kind: int, payload: Any) -> np.ndarray:
        """int64 class codes of the global batch (equal labels, equal codes)."""
        sizes, n_max = self.sizes, self.n_max
        if kind == _OBJECT_LABELS:
            parts = [np.asarray(a) for a in self.group.all_gather_object(payload)]
            labels = np.concatenate([a for a in parts if a.size])
        else:
            padded = payload.new_zeros(n_max)
            padded[:self.n] = payload
            gathered = self.group.all_gather(padded).cpu().numpy()
            labels = np.concatenate([gathered[r, :s] for r, s in enumerate(sizes)])
            if kind == _INTEGER_LABELS:
                return labels
        # Every rank holds the same global labels, so np.unique gives the same codes.
        if labels.dtype.kind == "f" and np.isnan(labels).any():
            raise ValueError("labels contain NaN, which is not a usable class label")
        try:
            _, codes = np.unique(labels, return_inverse=True)
        except TypeError as exc:
            raise TypeError(f"labels must be sortable by numpy.unique: {exc}") from None
        return codes.reshape(-1).astype(np.int64)

    def _compute(self, x_all: torch.Tensor, codes: np.ndarray):
        """This rank's anchors against the global batch, reduction="sum".

        Returns the local sums and counts (6 numbers) and the gradient parts
        [(grad, ref_grad), ...], one per separately scaled part of the loss.
        """
        cupy = _cupy_or_none(x_all.device)
        ref = _to_array(x_all, cupy)
        ref_labels = codes if cupy is None else cupy.asarray(codes)
        start, stop = self.offset, self.offset + self.n
        common = dict(ref=ref, ref_labels=ref_labels, ref_offset=start, reduction="sum",
                      metric=self.config.options["metric"],
                      normalize=self.config.options["normalize"], grad=self.wants_grad)
        args = (ref[start:stop], ref_labels[start:stop])
        options = self.config.options
        if self.config.kind == "triplet":
            result = _call_tripmine(tripmine.triplet_loss, cupy, *args, mining=options["mining"],
                                    margin=options["margin"], soft=options["soft"],
                                    seed=self.seed, **common)
            stats = [result.loss, 0.0, result.n_triplets, 0, result.n_active, 0]
            return np.array(stats, dtype=np.float64), [(result.grad, result.ref_grad, cupy)]
        margins = dict(pos_margin=options["pos_margin"], neg_margin=options["neg_margin"],
                       power=options["power"])
        if options["reduction"] != "mean_nonzero":
            result = _call_tripmine(tripmine.contrastive_loss, cupy, *args, **margins, **common)
            stats = [result.loss, 0.0, result.n_positive_pairs, result.n_negative_pairs,
                     result.n_active, 0]
            return np.array(stats, dtype=np.float64), [(result.grad, result.ref_grad, cupy)]
        # Separate scales for the positive and negative terms: one walk each.
        positive = _call_tripmine(tripmine.contrastive_loss, cupy, *args,
                                  **{**margins, "neg_margin": 0.0}, **common)
        negative = _call_tripmine(tripmine.contrastive_loss, cupy, *args,
                                  **{**margins, "pos_margin": _NO_POSITIVE_TERMS}, **common)
        stats = [positive.loss, negative.loss, positive.n_positive_pairs,
                 positive.n_negative_pairs, positive.n_active, negative.n_active]
        return np.array(stats, dtype=np.float64), [(positive.grad, positive.ref_grad, cupy),
                                                   (negative.grad, negative.ref_grad, cupy)]

    def _finish(self, local: np.ndarray, parts: list, local_error: BaseException | None):
        """Adds up every rank's sums and counts; scales and keeps the gradient parts."""
        local_row = torch.tensor(local, dtype=torch.float64, device=self.device)
        table = self.group.all_gather(local_row).cpu().numpy()
        _raise_if_any_failed(table[:, 6], local_error, "the tripmine call")
        # Same table on every rank, summed in rank order: the same loss everywhere.
        sum_a, sum_b, count_a, count_b, active_a, active_b = (float(v) for v in
                                                              table[:, :6].sum(axis=0))
        loss, scales, self.stats = self._reduce(sum_a, sum_b, int(count_a), int(count_b),
                                                int(active_a), int(active_b))
        if self.wants_grad and parts:
            self._keep_gradient(parts, scales)
        out_dtype = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.tensor(loss, dtype=out_dtype, device=self.device)

    def _reduce(self, sum_a, sum_b, count_a, count_b, active_a, active_b):
        """The global loss, each gradient part's scale, and the stats."""
        options, reduction = self.config.options, self.config.options["reduction"]

        def inverse(count: int) -> float:
            return 1.0 / count if count > 0 else 0.0

        sizes = tuple(self.sizes)
        if self.config.kind == "triplet":
            scale = {"sum": 1.0, "mean": inverse(count_a),
                     "mean_nonzero": inverse(active_a)}[reduction]
            loss = sum_a * scale
            seed = self.seed if options["mining"] == "distance_weighted" else None
            stats = DistributedLossStats(loss, active_a, active_a / count_a if count_a else 0.0,
                                         sizes, n_triplets=count_a, seed=seed)
            return loss, [scale], stats
        pairs = count_a + count_b
        active = active_a + active_b
        if reduction == "mean_nonzero":
            scales = [inverse(active_a), inverse(active_b)]
            loss = scales[0] * sum_a + scales[1] * sum_b
        else:
            scales = [1.0 if reduction == "sum" else inverse(pairs)]
            loss = scales[0] * sum_a
        stats = DistributedLossStats(loss, active, active / pairs if pairs else 0.0, sizes,
                                     n_pairs=pairs, n_positive_pairs=count_a,
                                     n_negative_pairs=count_b)
        return loss, scales, stats

    def _keep_gradient(self, parts: list, scales: list[float]) -> None:
        """local grad = sum of scale * grad; reference grad in the padded rank layout."""
        local = ref = None
        for (grad, ref_grad, cupy), scale in zip(parts, scales):
            g, r = _to_tensor(grad, cupy) * scale, _to_tensor(ref_grad, cupy) * scale
            local = g if local is None else local + g
            ref = r if ref is None else ref + r
        world, n_max, sizes = self.group.world, self.n_max, self.sizes
        if all(s == n_max for s in sizes):
            padded = ref
        else:
            padded = ref.new_zeros((world * n_max, ref.shape[1]))
            start = 0
            for r, s in enumerate(sizes):
                padded[r * n_max:r * n_max + s] = ref[start:start + s]
                start += s
        self.local_grad, self.ref_grad = local, padded.contiguous()

    # -- backward ---------------------------------------------------------------

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        # Nothing anywhere (no rows, or no features): the same on every rank.
        if self.local_grad is None or self.ref_grad.numel() == 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        received = self.group.reduce_scatter(self.ref_grad, self.n_max)[:self.n]
        grad = self.local_grad + received
        self.local_grad = self.ref_grad = None
        if self.scale_for_ddp:
            grad = grad * self.group.world
        return (grad * grad_output.to(grad.dtype)).to(self.dtype)


class _GlobalLoss(torch.autograd.Function):
    """The global loss as a function of this rank's embeddings (see the module docstring)."""

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, labels: Any, step: _Step) -> torch.Tensor:
        value = step.forward(embeddings, labels)
        ctx.step = step
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        step, ctx.step = ctx.step, None
        return step.backward(grad_output), None, None


def _distributed_loss(embeddings: torch.Tensor, labels: Any, config: _Config, group: Any,
                      scale_for_ddp: bool, gradient_collective: str):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    wants_grad = torch.is_grad_enabled() and embeddings.requires_grad
    step = _Step(config, _Group(group, gradient_collective), scale_for_ddp, wants_grad)
    loss = _GlobalLoss.apply(embeddings, labels, step)
    return loss, step.stats


def _check_wrapper_options(scale_for_ddp: Any, gradient_collective: Any) -> tuple[bool, str]:
    return (check.flag(scale_for_ddp, "scale_for_ddp"),
            check.choice(gradient_collective, "gradient_collective", GRADIENT_COLLECTIVES))


class DistributedLoss(torch.nn.Module):
    """A tripmine loss over the batches of all ranks, with exact gradients.

    ``loss`` is ``"triplet"`` or ``"contrastive"`` with the options as keywords
    (those of :func:`tripmine.triplet_loss`: ``mining``, ``margin``, ``soft``,
    ``metric``, ``normalize``, ``reduction``, ``seed``; or of
    :func:`tripmine.contrastive_loss`: ``pos_margin``, ``neg_margin``,
    ``power``, ``metric``, ``normalize``, ``reduction``), or any object with
    those attributes, such as ``tripmine.torch.TripletLoss(...)`` (read at
    every call).  ``reduction``: ``"auto"``, ``"mean"``, ``"sum"`` or
    ``"mean_nonzero"``, over the global batch.

    ``forward(embeddings, labels)`` takes this rank's (n_r, D) embeddings and
    n_r labels (a tensor, array or list: integers and floats cross ranks as
    tensors, other labels such as strings through ``all_gather_object``) and
    returns the global loss, the same 0-d tensor on every rank (float32 for
    half-precision embeddings).  Its backward pass gives this rank's
    embeddings the exact gradient of that loss; every rank must run it.
    ``last_stats`` holds the global counts (:class:`DistributedLossStats`).

    ``scale_for_ddp=True`` multiplies the embeddings' gradient by the world
    size, so that DistributedDataParallel's averaging of parameter gradients
    gives the single-process gradient (see the module docstring).
    ``gradient_collective``: ``"auto"`` (reduce-scatter, or all_reduce where
    the backend refuses it), ``"reduce_scatter"`` or ``"all_reduce"``.
    ``group``: the process group (default: the world).
    """

    def __init__(self, loss: Any = "triplet", *, group: Any = None, scale_for_ddp: bool = False,
                 gradient_collective: str = "auto", **options: Any):
        super().__init__()
        self._config = _configure(loss, options)
        self.loss = None if isinstance(loss, str) else loss
        self.group = group
        self.scale_for_ddp, self.gradient_collective = _check_wrapper_options(
            scale_for_ddp, gradient_collective)
        self.last_stats: DistributedLossStats | None = None

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        config = self._config if self.loss is None else _configure(self.loss, {})
        loss, self.last_stats = _distributed_loss(embeddings, labels, config, self.group,
                                                  self.scale_for_ddp, self.gradient_collective)
        return loss

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._config.options.items())
        return f"{self._config.kind}: {shown}, scale_for_ddp={self.scale_for_ddp}"


def distributed_triplet_loss(embeddings: torch.Tensor, labels: Any, *, group: Any = None,
                             scale_for_ddp: bool = False, gradient_collective: str = "auto",
                             **options: Any) -> torch.Tensor:
    """The global triplet loss of all ranks' batches; see :class:`DistributedLoss`."""
    flags = _check_wrapper_options(scale_for_ddp, gradient_collective)
    return _distributed_loss(embeddings, labels, _configure("triplet", options), group,
                             *flags)[0]


def distributed_contrastive_loss(embeddings: torch.Tensor, labels: Any, *, group: Any = None,
                                 scale_for_ddp: bool = False, gradient_collective: str = "auto",
                                 **options: Any) -> torch.Tensor:
    """The global contrastive loss of all ranks' batches; see :class:`DistributedLoss`."""
    flags = _check_wrapper_options(scale_for_ddp, gradient_collective)
    return _distributed_loss(embeddings, labels, _configure("contrastive", options), group,
                             *flags)[0]


from .sharded import ShardedMarginSoftmax  # noqa: E402  (it uses this module's collectives)
