"""A quick end-to-end check of the installed extension against NumPy.

Used by ``python -m tripmine info``: small random batches, every metric, both
dtypes, self and query-vs-reference modes, every usable instruction set, and
the masks, each compared with a direct NumPy computation.
"""

from __future__ import annotations

import numpy as np

from . import _core
from .distances import pairwise_distances
from .losses import contrastive_loss, triplet_loss
from .masks import negative_mask, positive_mask, triplet_mask
from .miners import batch_hard

# Loose enough for float32 rounding, far tighter than any real bug.
_TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}


def _numpy_distances(x: np.ndarray, ref: np.ndarray, metric: str) -> np.ndarray:
    x = x.astype(np.float64)
    ref = ref.astype(np.float64)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        rn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        return 0.5 * ((xn[:, None, :] - rn[None, :, :]) ** 2).sum(-1)
    sq = ((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    return np.sqrt(sq) if metric == "euclidean" else sq


def run(rng_seed: int = 0) -> list[tuple[str, bool, str]]:
    """Return (name, passed, detail) for every check."""
    rng = np.random.default_rng(rng_seed)
    results = []
    x64 = rng.standard_normal((157, 37))
    ref64 = rng.standard_normal((83, 37))
    labels = rng.integers(0, 9, size=157)
    ref_labels = rng.integers(0, 9, size=83)
    original_isa = _core.get_isa()
    try:
        for isa in _core.usable_isas():
            _core.set_isa(isa)
            for dtype in (np.float32, np.float64):
                x, ref = x64.astype(dtype), ref64.astype(dtype)
                for metric in ("euclidean", "sqeuclidean", "cosine"):
                    for mode, r in (("self", None), ("ref", ref)):
                        got = pairwise_distances(x, r, metric=metric)
                        want = _numpy_distances(x, x if r is None else r, metric)
                        err = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
                        ok = got.dtype == dtype and err <= _TOLERANCE[dtype]
                        if mode == "self":
                            ok = ok and bool(np.all(np.diag(got) == 0))
                        results.append((f"distances {isa:8s} {np.dtype(dtype).name:7s} "
                                        f"{metric:11s} {mode}", ok, f"max rel err {err:.1e}"))
    finally:
        _core.set_isa(original_isa)
    same = labels[:, None] == labels[None, :]
    eye = np.eye(len(labels), dtype=bool)
    checks = {
        "positive_mask self": np.array_equal(positive_mask(labels), same & ~eye),
        "negative_mask self": np.array_equal(negative_mask(labels), ~same),
        "positive_mask ref": np.array_equal(positive_mask(labels, ref_labels),
                                            labels[:, None] == ref_labels[None, :]),
        "triplet_mask": np.array_equal(
            triplet_mask(labels[:30]),
            (same & ~eye)[:30, :30, None] & ~same[:30, None, :30]),
    }
    results.extend((name, ok, "") for name, ok in checks.items())
    results.extend(_loss_checks(rng))
    return results


def _loss_checks(rng: np.random.Generator) -> list[tuple[str, bool, str]]:
    """Batch-hard mining, batch-all and contrastive losses and a gradient,
    against direct NumPy computations on a small float64 batch."""
    x = rng.standard_normal((40, 6))
    labels = rng.integers(0, 5, size=40)
    d = _numpy_distances(x, x, "euclidean")
    same = labels[:, None] == labels[None, :]
    pos = same & ~np.eye(40, dtype=bool)
    neg = ~same
    has = pos.any(1) & neg.any(1)
    hardest_pos = np.where(pos, d, -np.inf).argmax(1)
    hardest_neg = np.where(neg, d, np.inf).argmin(1)
    mined = batch_hard(x, labels)
    ok_mined = (np.array_equal(mined.anchor, np.flatnonzero(has))
                and np.array_equal(mined.positive, hardest_pos[has])
                and np.array_equal(mined.negative, hardest_neg[has]))
    z = d[:, :, None] - d[:, None, :] + 0.3  # z[a, p, n]
    valid = pos[:, :, None] & neg[:, None, :]
    terms = np.maximum(z[valid], 0)
    want_all = terms.sum() / max(int((terms > 0).sum()), 1)
    result = triplet_loss(x, labels, mining="batch_all", margin=0.3)
    ok_all = abs(result.loss - want_all) <= 1e-9 * (1 + want_all)
    pos_terms = np.maximum(d[pos] - 0.5, 0)
    neg_terms = np.maximum(2.0 - d[neg], 0)
    want_pair = (pos_terms.sum() / max(int((pos_terms > 0).sum()), 1)
                 + neg_terms.sum() / max(int((neg_terms > 0).sum()), 1))
    pair = contrastive_loss(x, labels, pos_margin=0.5, neg_margin=2.0)
    ok_pair = abs(pair.loss - want_pair) <= 1e-9 * (1 + want_pair)
    direction = rng.standard_normal(x.shape)
    h = 1e-6
    numeric = (triplet_loss(x + h * direction, labels, mining="batch_all", margin=0.3).loss
               - triplet_loss(x - h * direction, labels, mining="batch_all", margin=0.3).loss)
    numeric /= 2 * h
    analytic = float(np.sum(result.grad * direction))
    ok_grad = abs(numeric - analytic) <= 1e-5 * (1 + abs(numeric))
    return [
        ("batch_hard triplets", ok_mined, ""),
        ("batch-all triplet loss", ok_all, f"{result.loss:.6g} vs {want_all:.6g}"),
        ("contrastive loss", ok_pair, f"{pair.loss:.6g} vs {want_pair:.6g}"),
        ("batch-all gradient", ok_grad, f"{analytic:.6g} vs {numeric:.6g}"),
    ]
