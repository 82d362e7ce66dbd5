"""Slow, obviously-correct loop implementations: the oracle for the C core.

Each function follows the definition in DESIGN.md section 2 literally, one
pair (or triplet) at a time, in float64 (or wider) arithmetic.  Speed is
irrelevant here; clarity is the point.
"""

from __future__ import annotations

import itertools
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


# ---- retrieval metrics (nearest neighbours, Recall@K, MAP@R) ---------------
#
# Self mode (ref=None) ranks the other rows of x: a query never retrieves
# itself.  Every ranking is a sort on (distance, reference index), so equal
# distances go to the lower index.  A query with no same-label reference
# (R = 0) cannot be scored and is left out; NaN when none is left.


def distance_row(a, refs, metric: str) -> np.ndarray:
    """d(a, refs[j]) for every j, in float64 by direct differences (never the
    Gram identity), with :func:`distance`'s conventions (cosine distance is
    half the squared distance of the unit vectors; a zero vector is at 1)."""
    a = np.asarray(a, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    if metric == "cosine":
        norm_a = math.sqrt(float(np.sum(a * a)))
        norms = np.sqrt(np.sum(refs * refs, axis=1))
        usable = (norms > 0) & (norm_a > 0)
        unit_refs = refs / np.where(usable, norms, 1.0)[:, None]
        unit_a = a / (norm_a if norm_a > 0 else 1.0)
        diff = unit_refs - unit_a
        return np.where(usable, np.sum(diff * diff, axis=1) / 2, 1.0)
    diff = refs - a
    squared = np.sum(diff * diff, axis=1)
    return np.sqrt(squared) if metric == "euclidean" else squared


_RANKING_MEMO: dict = {}


def ranking(x, ref=None, metric="euclidean"):
    """(order, distances), both (N, M) (M = N - 1 in self mode): row i lists
    the references of query i nearest first, sorted on (distance, index),
    with row i itself left out in self mode, and their distances.

    Memoised on the exact inputs (the references rank one batch several
    times); callers get copies.
    """
    key = tuple(None if a is None else (np.asarray(a).dtype.str, np.shape(a),
                                        np.asarray(a).tobytes())
                for a in (x, ref)) + (metric,)
    if key not in _RANKING_MEMO:
        x = np.asarray(x, dtype=np.float64)
        self_mode = ref is None
        ref = x if self_mode else np.asarray(ref, dtype=np.float64)
        width = len(ref) - 1 if self_mode else len(ref)
        order = np.zeros((len(x), max(width, 0)), dtype=np.int64)
        distances = np.zeros((len(x), max(width, 0)))
        for i in range(len(x)):
            d = distance_row(x[i], ref, metric)
            row = np.lexsort((np.arange(len(ref)), d))  # by distance, then by index
            if self_mode:
                row = row[row != i]
            order[i] = row
            distances[i] = d[row]
        if len(_RANKING_MEMO) > 2:  # a large batch's ranking is N x M: keep few
            _RANKING_MEMO.clear()
        _RANKING_MEMO[key] = (order, distances)
    order, distances = _RANKING_MEMO[key]
    return order.copy(), distances.copy()


def nearest_neighbors_reference(x, k, ref=None, metric="euclidean"):
    """(indices int64, distances float64), both (N, k): the first k columns of
    :func:`ranking`, slots beyond the available references -1 and inf."""
    order, ranked = ranking(x, ref, metric)
    available = min(k, order.shape[1])
    indices = np.full((len(order), k), -1, dtype=np.int64)
    distances = np.full((len(order), k), np.inf)
    indices[:, :available] = order[:, :available]
    distances[:, :available] = ranked[:, :available]
    return indices, distances


def _queries(x, labels, ref, ref_labels, metric):
    """Per query: (its label, R, its ranked references' labels as an iterator),
    R counting the same-label references (the query itself excluded in self mode)."""
    labels = np.asarray(labels).tolist()
    self_mode = ref_labels is None
    gallery = labels if self_mode else np.asarray(ref_labels).tolist()
    out = []
    order, _ = ranking(x, ref, metric)
    for i in range(len(labels)):
        r = gallery.count(labels[i]) - (1 if self_mode else 0)
        out.append((labels[i], r, (gallery[j] for j in order[i])))
    return out


def recall_at_k_reference(x, labels, ks, ref=None, ref_labels=None, metric="euclidean"):
    """Recall@K: among the queries with R > 0, the fraction with at least one
    same-label reference among their K nearest.  ``ks`` an int gives a float,
    a sequence gives {K: recall}."""
    ks_list = [ks] if isinstance(ks, int) else list(ks)
    hits = dict.fromkeys(ks_list, 0)
    scored = 0
    for label, r, ranked_labels in _queries(x, labels, ref, ref_labels, metric):
        if r == 0:
            continue
        scored += 1
        first = list(itertools.islice(ranked_labels, max(ks_list)))
        for k in ks_list:
            if label in first[:k]:
                hits[k] += 1
    out = {k: hits[k] / scored if scored else math.nan for k in ks_list}
    return out[ks] if isinstance(ks, int) else out


def map_at_r_reference(x, labels, ref=None, ref_labels=None, metric="euclidean"):
    """MAP@R (Musgrave et al. 2020): the mean, over the queries with R > 0, of
    AP@R = (1/R) sum_{i=1..R} P(i) rel(i), P(i) the precision of the first i."""
    total = 0.0
    scored = 0
    for label, r, ranked_labels in _queries(x, labels, ref, ref_labels, metric):
        if r == 0:
            continue
        scored += 1
        ap = 0.0
        relevant_so_far = 0
        for i, neighbour_label in enumerate(itertools.islice(ranked_labels, r), start=1):
            rel = neighbour_label == label
            relevant_so_far += rel
            if rel:
                ap += relevant_so_far / i  # P(i) rel(i)
        total += ap / r
    return total / scored if scored else math.nan


# ---- the margin-softmax heads (tripmine.heads) ------------------------------------------

def _psi(m: int, theta: float) -> float:
    k = math.floor(m * theta / math.pi)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def head_logits_row(kind: str, x: np.ndarray, weight: np.ndarray, y: int, bias=None,
                    **p) -> tuple[list[float], list[float]]:
    """One sample's logits, loop by loop: (with the target's margin, without any margin)."""
    nx = math.sqrt(sum(float(v) * float(v) for v in x))
    plain, marg = [], []
    for j, w in enumerate(weight):
        dot = sum(float(a) * float(b) for a, b in zip(x, w))
        nw = math.sqrt(sum(float(v) * float(v) for v in w))
        cos = dot / (nx * nw) if nx > 0 and nw > 0 else 0.0
        cos = min(1.0, max(-1.0, cos))
        theta = math.acos(cos)
        s = p.get("scale", 1.0)
        if kind == "softmax":
            z = dot + (float(bias[j]) if bias is not None else 0.0)
            zt = z
        elif kind in ("normface", "cosface", "arcface", "combined"):
            z = s * cos
            if kind == "normface":
                zt = z
            elif kind == "cosface":
                zt = s * (cos - p["margin"])
            elif kind == "arcface":
                m = p["margin"]
                if p.get("easy_margin"):
                    zt = s * math.cos(theta + m) if cos > 0 else s * cos
                else:
                    zt = (s * math.cos(theta + m) if cos > math.cos(math.pi - m)
                          else s * (cos - m * math.sin(m)))
            else:
                u = p["m1"] * theta + p["m2"]
                k = math.floor(u / math.pi)
                zt = s * ((-1) ** k * math.cos(u) - 2 * k - p["m3"])
        else:  # sphereface, lsoftmax
            m, lam = p["margin"], p.get("lambda_", 0.0)
            f = (lam * cos + _psi(m, theta)) / (1 + lam)
            if kind == "sphereface":
                z, zt = nx * cos, nx * f
            else:
                z, zt = dot, nw * nx * f
        plain.append(z)
        marg.append(zt if j == y else z)
    return marg, plain


def head_loss(kind: str, x, labels, weight, *, bias=None, class_weight=None,
              reduction="mean", **p):
    """(loss, per-sample losses, n_correct) of a margin-softmax head, one sample at a time."""
    per, correct, total_w = [], 0, 0.0
    for i in range(x.shape[0]):
        y = int(labels[i])
        marg, plain = head_logits_row(kind, x[i], weight, y, bias, **p)
        top = max(marg)
        lse = top + math.log(sum(math.exp(v - top) for v in marg))
        w = 1.0 if class_weight is None else float(class_weight[y])
        per.append(w * (lse - marg[y]))
        total_w += w
        correct += int(np.argmax(plain)) == y
    per = np.array(per)
    if reduction == "none":
        return per, per, correct
    total = float(sum(per))
    if reduction == "mean":
        total = total / total_w if total_w > 0 else 0.0
    return total, per, correct


# ---- center loss -------------------------------------------------------------------

def center_loss(x, labels, centers, reduction="mean", upstream=None):
    """(loss, per-sample losses, dL/dx, dL/dC) of 1/2 sum_i |x_i - c_{y_i}|^2, one sample and
    one feature at a time."""
    n, d = x.shape
    per, grad = [], np.zeros((n, d))
    cgrad = np.zeros(centers.shape)
    red = 1.0 / n if reduction == "mean" and n else 1.0
    for i in range(n):
        y = int(labels[i])
        g = red * (1.0 if upstream is None else float(upstream[i]))
        total = 0.0
        for p in range(d):
            r = float(x[i, p]) - float(centers[y, p])
            total += r * r
            grad[i, p] = g * r
            cgrad[y, p] -= g * r
        per.append(0.5 * total)
    loss = sum(per) * red
    return loss, np.array(per), grad, cgrad


def update_centers(centers, x, labels, alpha):
    """Wen et al.'s update, eq. 4: a new array, class by class."""
    out = np.array(centers, dtype=np.float64)
    for j in range(centers.shape[0]):
        members = [i for i in range(len(labels)) if int(labels[i]) == j]
        if not members:
            continue
        delta = sum(out[j] - np.asarray(x[i], dtype=np.float64) for i in members)
        out[j] = out[j] - alpha * delta / (1 + len(members))
    return out


# ---- margin loss ------------------------------------------------------------------

def margin_losses(x, triplets, beta_of_anchor, *, margin=0.2, nu=0.0, metric="euclidean",
                  ref=None):
    """Per-triplet margin losses (Wu et al. 2017) and the count of nonzero hinge terms:
    max(0, d(a,p) - beta + margin) + max(0, beta - d(a,n) + margin) + nu beta, beta =
    beta_of_anchor(a)."""
    rows = x if ref is None else ref
    out, active = [], 0
    for a, p, q in zip(*triplets):
        beta = float(beta_of_anchor(int(a)))
        pos = max(0.0, distance(x[a], rows[p], metric) - beta + margin)
        neg = max(0.0, beta - distance(x[a], rows[q], metric) + margin)
        active += (pos > 0) + (neg > 0)
        out.append(pos + neg + nu * beta)
    return np.array(out, dtype=np.float64), active


# ---- lifted structured loss --------------------------------------------------


class LiftedReference(NamedTuple):
    loss: float | np.ndarray
    n_terms: int
    n_active: int


def _log_sum_exp(values) -> float:
    """log(sum(exp(v))) in float64, -inf for no values."""
    values = [float(v) for v in values]
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def lifted_structured_loss(x, labels, *, neg_margin=1.0, pos_margin=0.0, generalized=False,
                           metric="euclidean", reduction="mean", ref=None, ref_labels=None,
                           ref_offset=None, normalize=False):
    """Song et al.'s lifted structured loss, literally: for each positive entry (i, j) of the
    pair matrix, J = log(sum over i's negatives k of e^(neg_margin - d_ik) + sum over j's
    negatives l of e^(neg_margin - d_lj)) + d_ij - pos_margin, term max(0, J)^2 / 2.  In
    self mode j's negatives are row j's; in reference mode they are the rows of x in column
    j with another label.  generalized=True: per row with a positive and a negative,
    max(0, LSE_p(d - pos_margin) + LSE_n(neg_margin - d)).  ref_offset excludes the pair
    (i, ref_offset + i).  "none" gives each row's sum of terms."""
    dist, pos, neg = mining_distances(x, labels, ref, ref_labels, metric, normalize)
    if ref_offset is not None:
        for i in range(dist.shape[0]):
            pos[i, ref_offset + i] = neg[i, ref_offset + i] = False
    n, m = dist.shape
    terms, per_anchor = [], np.zeros(n)
    if generalized:
        for i in range(n):
            p = [dist[i, j] - pos_margin for j in range(m) if pos[i, j]]
            q = [neg_margin - dist[i, j] for j in range(m) if neg[i, j]]
            if p and q:
                terms.append(max(0.0, _log_sum_exp(p) + _log_sum_exp(q)))
                per_anchor[i] = terms[-1]
    else:
        row = [[neg_margin - dist[i, k] for k in range(m) if neg[i, k]] for i in range(n)]
        if ref is None:
            column = row
        else:
            column = [[neg_margin - dist[k, j] for k in range(n) if neg[k, j]] for j in range(m)]
        for i in range(n):
            for j in range(m):
                if pos[i, j]:
                    both = _log_sum_exp(row[i] + column[j])
                    h = max(0.0, both + dist[i, j] - pos_margin)
                    terms.append(0.5 * h * h)
                    per_anchor[i] += terms[-1]
    active = sum(1 for t in terms if t > 0)
    loss = per_anchor if reduction == "none" else reduce(terms, reduction)
    return LiftedReference(loss, len(terms), active)
