"""A margin-softmax head whose classes are split into shards (tripmine.torch.distributed).

The loss of sample i is ``w_{y_i} (LSE_j z_ij - z_{i,y_i})`` over every class j.  With the
classes split into shards (one per rank, each a contiguous range of W's rows, or with
Partial FC a sorted subset of that range), the log-sum-exp splits too::

    shard k, first call   -> per row: lse_k (its logits, the target's with its margin),
                             z_y (on the shard that holds y), best plain logit and its class
    combine (same on every shard, shards in order)
                          -> lse = log sum_k exp(lse_k), z_y, loss, top-1 (ties to the
                             lowest class, as tripmine.heads does)
    shard k, second call  -> its part of dL/dx (the parts add up to dL/dx) and dL/dW_k

Both calls run in tripmine's C core (``tm_softmax_head_shard``) for host arrays, or in
the heads' array-module walk (:func:`tripmine._fused_heads.fused_head`, ``shard=True``) for
CuPy arrays: the N x C_k logits of a shard are never stored either.  Nothing here
communicates; the caller moves the statistics (4 float64 per sample per shard, always a
host array) and the gradient parts (on the inputs' device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from ._dispatch import is_cupy


def _on_device(head, x, labels, weight, bias, lse=None, gain=None, want_grad=False,
               want_wgrad=False):
    """The CuPy path of both calls (the heads' class-block walk, cuBLAS products)."""
    import cupy as cp

    from . import _fused_heads
    from ._gpu import chunk_bytes

    n, c = x.shape[0], weight.shape[0]
    block = int(max(1, min(c, chunk_bytes() // max(1, 12 * n))))
    out = _fused_heads.fused_head(
        cp, head, x, cp.asarray(labels), weight, bias, None, "none", want_grad, want_wgrad,
        None if gain is None else cp.asarray(gain), block, shard=True,
        lse_in=None if lse is None else cp.asarray(lse))
    if lse is None:
        return cp.asnumpy(out)
    return out[3], out[4], out[5]


@dataclass(frozen=True)
class Combined:
    """The shards' statistics combined: identical on every shard that combines the same
    table."""

    lse: np.ndarray           # (n,) log-sum-exp over every shard's logits
    target: np.ndarray        # (n,) the target logits, with their margins
    per_sample: np.ndarray    # (n,) class_weight[y] (lse - target)
    correct: np.ndarray       # (n,) bool: the top-1 plain logit is the label


def local_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each label's row among this shard's ``classes`` (sorted class ids), or -1."""
    rows = np.searchsorted(classes, labels)
    rows = np.minimum(rows, max(len(classes) - 1, 0))
    held = len(classes) > 0
    found = classes[rows] == labels if held else np.zeros(len(labels), dtype=bool)
    return np.where(found, rows, -1).astype(np.int64)


def statistics(head: dict, x: np.ndarray, labels: np.ndarray, weight: np.ndarray,
               bias: np.ndarray | None, classes: np.ndarray) -> np.ndarray:
    """(n, 4): this shard's log-sum-exp, target logit (0 where the label is -1), best plain
    logit and its class id (``classes[row]``, as float64: exact below 2^53).  ``labels`` are
    rows of ``weight`` or -1 (:func:`local_labels`); ``weight`` must have a row."""
    if is_cupy(x):
        table = _on_device(head, x, labels, weight, bias)
    else:
        table = _core.softmax_head_shard(head, x, labels, weight, bias)
    table[:, 3] = classes[table[:, 3].astype(np.int64)]
    return table


def combine(table: np.ndarray, labels: np.ndarray, class_weight: np.ndarray | None) -> Combined:
    """``table`` (shards, n, 4) of :func:`statistics`, shards in increasing class order;
    ``labels`` global class ids; ``class_weight`` (C,) or None."""
    lse_k = table[:, :, 0]
    top = lse_k.max(axis=0)
    lse = top + np.log(np.exp(lse_k - top).sum(axis=0))
    target = table[:, :, 1].sum(axis=0)  # one shard holds each target; the others wrote 0
    cw = np.ones(len(labels)) if class_weight is None else class_weight[labels]
    per_sample = cw * (lse - target)
    best = table[:, :, 2]
    # The first shard reaching the max holds its lowest class (shards in class order).
    winner = np.argmax(best == best.max(axis=0), axis=0)
    best_class = table[winner, np.arange(len(labels)), 3].astype(np.int64)
    return Combined(lse, target, per_sample, best_class == labels)


def gradients(head: dict, x: np.ndarray, labels: np.ndarray, weight: np.ndarray,
              bias: np.ndarray | None, lse: np.ndarray, gain: np.ndarray, want_grad: bool,
              want_wgrad: bool):
    """This shard's (grad part, weight_grad, bias_grad) for ``gain`` = dL/dloss_i."""
    if is_cupy(x):
        return _on_device(head, x, labels, weight, bias, lse, gain, want_grad, want_wgrad)
    return _core.softmax_head_shard(head, x, labels, weight, bias, lse=lse, gain=gain,
                                    want_grad=want_grad, want_wgrad=want_wgrad)
