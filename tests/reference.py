"""Slow, obviously-correct loop implementations: the oracle for the C core.

Each function follows the definition in DESIGN.md section 2 literally, one
pair (or triplet) at a time, in float64 (or wider) arithmetic.  Speed is
irrelevant here; clarity is the point.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


def distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """d(a, b) by direct difference in extended precision."""
    a = np.asarray(a, dtype=np.longdouble)
    b = np.asarray(b, dtype=np.longdouble)
    if metric == "cosine":
        norm_a = math.sqrt(float(np.sum(a * a)))
        norm_b = math.sqrt(float(np.sum(b * b)))
        if norm_a == 0.0 or norm_b == 0.0:
            return 1.0  # tripmine's convention: a zero vector has cosine 0 with anything
        diff = a / np.longdouble(norm_a) - b / np.longdouble(norm_b)
        return float(np.sum(diff * diff) / 2)
    squared = float(np.sum((a - b) * (a - b)))
    return math.sqrt(squared) if metric == "euclidean" else squared


def pairwise_distances(x: np.ndarray, ref: np.ndarray | None, metric: str) -> np.ndarray:
    """out[i, j] = d(x_i, ref_j); self mode (ref None) has an exact-zero diagonal."""
    self_mode = ref is None
    ref = x if self_mode else ref
    out = np.empty((len(x), len(ref)))
    for i in range(len(x)):
        for j in range(len(ref)):
            out[i, j] = 0.0 if (self_mode and i == j) else distance(x[i], ref[j], metric)
    return out


def positive_mask(labels, ref_labels=None) -> np.ndarray:
    self_mode = ref_labels is None
    ref_labels = labels if self_mode else ref_labels
    out = np.zeros((len(labels), len(ref_labels)), dtype=bool)
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            out[i, j] = labels[i] == ref_labels[j] and not (self_mode and i == j)
    return out


def negative_mask(labels, ref_labels=None) -> np.ndarray:
    ref_labels = labels if ref_labels is None else ref_labels
    out = np.zeros((len(labels), len(ref_labels)), dtype=bool)
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            out[i, j] = labels[i] != ref_labels[j]
    return out


def triplet_mask(labels) -> np.ndarray:
    n = len(labels)
    out = np.zeros((n, n, n), dtype=bool)
    for a in range(n):
        for p in range(n):
            for q in range(n):
                out[a, p, q] = a != p and labels[a] == labels[p] and labels[q] != labels[a]
    return out


# ---- miners and losses (issue 3) -------------------------------------------
#
# Conventions shared by everything below: ``ref=None`` is self mode (ref = x,
# the pair (i, i) is never a positive nor a negative); ``normalize=True``
# L2-normalises the rows of x and ref first (a zero row stays zero); ties go
# to the lowest reference index because every scan runs j = 0, 1, ... with a
# strict comparison.  Miners return their triplets as three int64 arrays and
# the (N, M) distance matrix they mined on, for quasi-equality checks.

REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


def normalize_rows(a: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float64; a zero row stays zero."""
    a = np.asarray(a, dtype=np.float64)
    out = np.zeros_like(a)
    for i in range(len(a)):
        norm = math.sqrt(float(np.sum(np.asarray(a[i], dtype=np.longdouble) ** 2)))
        if norm > 0.0:
            out[i] = a[i] / norm
    return out


def prepare(x, ref=None, normalize: bool = False):
    """float64 copies of x and ref (None stays None), normalised when asked."""
    x = np.asarray(x, dtype=np.float64)
    ref = None if ref is None else np.asarray(ref, dtype=np.float64)
    if normalize:
        x = normalize_rows(x)
        ref = None if ref is None else normalize_rows(ref)
    return x, ref


_MEMO: dict = {}


def mining_distances(x, labels, ref=None, ref_labels=None, metric="euclidean",
                     normalize=False):
    """(distance matrix, positive mask, negative mask) of one batch.

    Memoised on the exact inputs (tests ask several miners about one batch);
    callers get copies, so the memo cannot be corrupted.
    """
    key = tuple(None if a is None else (np.asarray(a).dtype.str, np.shape(a),
                                        np.asarray(a).tobytes())
                for a in (x, labels, ref, ref_labels)) + (metric, normalize)
    if key not in _MEMO:
        x, ref = prepare(x, ref, normalize)
        labels = list(labels)
        ref_labels = None if ref_labels is None else list(ref_labels)
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = (pairwise_distances(x, ref, metric), positive_mask(labels, ref_labels),
                      negative_mask(labels, ref_labels))
    return tuple(m.copy() for m in _MEMO[key])


def _as_triplets(rows):
    if not rows:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(3))
    return tuple(np.array(column, dtype=np.int64) for column in zip(*rows))


def batch_hard(x, labels, *, ref=None, ref_labels=None, metric="euclidean", normalize=False):
    """Per anchor: the farthest positive and the closest negative (Hermans et al. 2017)."""
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    rows = []
    for a in range(dist.shape[0]):
        hardest_positive = hardest_negative = None
        for j in range(dist.shape[1]):
            if pos[a, j] and (hardest_positive is None
                              or dist[a, j] > dist[a, hardest_positive]):
                hardest_positive = j
            if neg[a, j] and (hardest_negative is None
                              or dist[a, j] < dist[a, hardest_negative]):
                hardest_negative = j
        if hardest_positive is not None and hardest_negative is not None:
            rows.append((a, hardest_positive, hardest_negative))
    return _as_triplets(rows), dist


def semi_hard_closest(x, labels, *, ref=None, ref_labels=None, metric="euclidean",
                      normalize=False):
    """Per positive pair: the closest negative farther than the positive, else the
    farthest negative (TF-Addons TripletSemiHardLoss)."""
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    rows = []
    for a in range(dist.shape[0]):
        for p in range(dist.shape[1]):
            if not pos[a, p]:
                continue
            closest_farther = farthest = None
            for n in range(dist.shape[1]):
                if not neg[a, n]:
                    continue
                if farthest is None or dist[a, n] > dist[a, farthest]:
                    farthest = n
                if dist[a, n] > dist[a, p] and (closest_farther is None
                                                or dist[a, n] < dist[a, closest_farther]):
                    closest_farther = n
            if farthest is not None:
                rows.append((a, p, farthest if closest_farther is None else closest_farther))
    return _as_triplets(rows), dist


def semi_hard_random_candidates(x, labels, *, margin=0.2, ref=None, ref_labels=None,
                                metric="euclidean", normalize=False):
    """For each positive pair (a, p), in output order, the negatives n with
    d(a,p) < d(a,n) < d(a,p) + margin (FaceNet); pairs with none are left out.

    Returns ([(a, p, candidates as an int64 array), ...], distance matrix).
    """
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    pairs = []
    for a in range(dist.shape[0]):
        for p in range(dist.shape[1]):
            if not pos[a, p]:
                continue
            candidates = [n for n in range(dist.shape[1])
                          if neg[a, n] and dist[a, p] < dist[a, n] < dist[a, p] + margin]
            if candidates:
                pairs.append((a, p, np.array(candidates, dtype=np.int64)))
    return pairs, dist


def semi_hard_all(x, labels, *, margin=0.2, ref=None, ref_labels=None, metric="euclidean",
                  normalize=False):
    """Every (a, p, n) with d(a,p) < d(a,n) <= d(a,p) + margin, ordered by a, p, n."""
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    rows = []
    for a in range(dist.shape[0]):
        for p in range(dist.shape[1]):
            if not pos[a, p]:
                continue
            for n in range(dist.shape[1]):
                if neg[a, n] and dist[a, p] < dist[a, n] <= dist[a, p] + margin:
                    rows.append((a, p, n))
    return _as_triplets(rows), dist


def distance_weighted_probabilities(x, labels, *, cutoff=0.5, nonzero_loss_cutoff=1.4,
                                    ref=None, ref_labels=None, normalize=False):
    """P(n | a) of Wu et al. 2017 ("Sampling Matters"), euclidean distances.

    With dim = D and Dc = max(d, cutoff):
    log w = (2 - dim) log Dc - ((dim - 3) / 2) log(1 - Dc^2 / 4), and w = 0 for
    non-negatives, for d >= nonzero_loss_cutoff and where 1 - Dc^2/4 <= 0.
    Returns (probabilities (N, M), each row summing to 1 or all 0 when the
    anchor has no weight, distance matrix).
    """
    dist, _, neg = mining_distances(x, labels, ref, ref_labels, "euclidean", normalize)
    dim = np.shape(x)[1]
    probabilities = np.zeros_like(dist)
    for a in range(dist.shape[0]):
        log_w = np.full(dist.shape[1], -np.inf)
        for n in range(dist.shape[1]):
            clipped = max(dist[a, n], cutoff)
            if neg[a, n] and dist[a, n] < nonzero_loss_cutoff and 1 - clipped**2 / 4 > 0:
                log_w[n] = ((2 - dim) * math.log(clipped)
                            - (dim - 3) / 2 * math.log(1 - clipped**2 / 4))
        if np.isfinite(log_w).any():
            w = np.exp(log_w - log_w.max())  # log space, shifted by the row max
            probabilities[a] = w / w.sum()
    return probabilities, dist


def softplus(z: float) -> float:
    """log(1 + exp(z)) without overflow."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def triplet_losses(x, triplets, *, margin=0.2, soft=False, metric="euclidean", ref=None,
                   normalize=False):
    """Per triplet z = d(a,p) - d(a,n) + margin and l = max(0, z) (softplus(z) if soft).

    ``triplets`` is (anchor, positive, negative); positive and negative index
    ref (x in self mode).  Returns (z, l) as float64 arrays.
    """
    x, ref = prepare(x, ref, normalize)
    ref = x if ref is None else ref
    anchor, positive, negative = (np.asarray(t, dtype=np.int64) for t in triplets)
    z = np.zeros(len(anchor))
    losses = np.zeros(len(anchor))
    for k in range(len(anchor)):
        a, p, n = anchor[k], positive[k], negative[k]
        z[k] = distance(x[a], ref[p], metric) - distance(x[a], ref[n], metric) + margin
        losses[k] = softplus(z[k]) if soft else max(0.0, z[k])
    return z, losses


def reduce(values, reduction: str):
    """"mean" (0 if empty), "sum", "mean_nonzero" (mean over values > 0, 0 if
    none) or "none" (the values themselves, as float64)."""
    values = np.asarray(values, dtype=np.float64)
    if reduction == "none":
        return values.copy()
    total = 0.0
    count = 0
    for v in values:
        if reduction == "mean_nonzero" and not v > 0:
            continue
        total += float(v)
        count += 1
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def batch_all_triplets(labels, ref_labels=None):
    """Every valid (a, p, n): p a positive and n a negative of a, ordered by a, p, n."""
    self_mode = ref_labels is None
    ref_labels = labels if self_mode else ref_labels
    rows = []
    for a in range(len(labels)):
        for p in range(len(ref_labels)):
            for n in range(len(ref_labels)):
                if (ref_labels[p] == labels[a] and not (self_mode and p == a)
                        and ref_labels[n] != labels[a]):
                    rows.append((a, p, n))
    return _as_triplets(rows)


class LossReference(NamedTuple):
    loss: float | np.ndarray  # a vector for reduction="none"
    n_triplets: int
    n_active: int
    z: np.ndarray  # hinge argument of every term, to judge float32 ties at 0


def batch_all_loss(x, labels, *, margin=0.2, soft=False, metric="euclidean",
                   reduction="mean_nonzero", ref=None, ref_labels=None, normalize=False):
    """The triplet loss over every valid triplet, enumerated one by one.

    reduction "none" gives the per-anchor vector (sum of the anchor's losses).
    """
    triplets = batch_all_triplets(labels, ref_labels)
    z, losses = triplet_losses(x, triplets, margin=margin, soft=soft, metric=metric, ref=ref,
                               normalize=normalize)
    if reduction == "none":
        loss = np.zeros(len(labels))
        for k, a in enumerate(triplets[0]):
            loss[a] += losses[k]
    else:
        loss = reduce(losses, reduction)
    return LossReference(loss, len(losses), int(np.sum(losses > 0)), z)


class ContrastiveReference(NamedTuple):
    loss: float | np.ndarray
    n_positive_pairs: int
    n_negative_pairs: int
    n_active: int
    margin_gap: np.ndarray  # d - pos_margin (positive) / neg_margin - d (negative) per pair


def contrastive_loss(x, labels, *, pos_margin=0.0, neg_margin=1.0, power=1,
                     metric="euclidean", reduction="mean_nonzero", ref=None, ref_labels=None,
                     normalize=False):
    """Over all ordered pairs (i != j in self mode): positive pairs
    max(0, d - pos_margin)^power, negative pairs max(0, neg_margin - d)^power.

    "mean_nonzero" = mean of the nonzero positive terms + mean of the nonzero
    negative terms (PML ContrastiveLoss); "mean" divides by the number of pairs;
    "none" is the per-anchor vector.
    """
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    positive_terms, negative_terms, gaps = [], [], []
    per_anchor = np.zeros(dist.shape[0])
    for i in range(dist.shape[0]):
        for j in range(dist.shape[1]):
            if pos[i, j]:
                gap = dist[i, j] - pos_margin
                positive_terms.append(max(0.0, gap) ** power)
                per_anchor[i] += positive_terms[-1]
            elif neg[i, j]:
                gap = neg_margin - dist[i, j]
                negative_terms.append(max(0.0, gap) ** power)
                per_anchor[i] += negative_terms[-1]
            else:
                continue
            gaps.append(gap)
    if reduction == "none":
        loss = per_anchor
    elif reduction == "mean_nonzero":
        loss = reduce(positive_terms, "mean_nonzero") + reduce(negative_terms, "mean_nonzero")
    else:
        loss = reduce(positive_terms + negative_terms, reduction)
    n_active = sum(1 for v in positive_terms + negative_terms if v > 0)
    return ContrastiveReference(loss, len(positive_terms), len(negative_terms), n_active,
                                np.array(gaps))
