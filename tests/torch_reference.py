"""Pure-torch autograd implementations of tripmine's losses (the oracle of tripmine.torch).

Each builds the whole distance matrix by direct difference (N x M, or N x M x M
for batch-all) and lets autograd differentiate the masked max/min, sums and
means: slow and obviously correct, for the small batches of the tests.  The
self pairs (``x[i]`` against its own row ``ref[offset + i]``) are excluded
by a mask; self mode is ``ref = x`` with offset 0.

Import only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")


def unit(a):
    return a / torch.linalg.vector_norm(a, dim=1, keepdim=True)


def distance_matrix(x, ref, metric):
    """d(x_i, ref_j) by direct difference; sqrt with gradient 0 at 0 (the excluded
    self pairs, whose distance is exactly 0 and must not poison the gradient)."""
    if metric == "cosine":
        return 1 - unit(x) @ unit(ref).T
    squared = ((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    if metric == "sqeuclidean":
        return squared
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)


def pair_masks(labels, ref_labels, offset):
    """(positive, negative) boolean N x M masks; ``x[i]`` is ``ref[offset + i]`` when
    offset is not None (self mode: offset 0 with ref = x)."""
    same = labels[:, None] == ref_labels[None, :]
    own = torch.zeros_like(same)
    if offset is not None:
        rows = torch.arange(labels.shape[0])
        own[rows, rows + offset] = True
    return same & ~own, ~same


def setting(x, labels, ref=None, ref_labels=None, offset=None, normalize=False):
    """x, ref, labels, ref_labels and the self-pair offset of a call, normalised if asked."""
    if ref is None:
        ref, ref_labels, offset = x, labels, 0
    if normalize:
        x, ref = unit(x), (unit(x) if ref is x else unit(ref))
    return x, ref, labels, ref_labels, offset


def hinge(z, soft):
    return torch.nn.functional.softplus(z) if soft else torch.relu(z)


def reduce(terms, reduction):
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean_nonzero":
        terms = terms[terms > 0]
    return terms.mean() if terms.numel() else terms.sum()


def batch_hard_reference(x, labels, *, margin, soft, metric, normalize, reduction, ref=None,
                         ref_labels=None, offset=None):
    x, ref, labels, ref_labels, offset = setting(x, labels, ref, ref_labels, offset, normalize)
    d = distance_matrix(x, ref, metric)
    pos, neg = pair_masks(labels, ref_labels, offset)
    valid = pos.any(1) & neg.any(1)
    hardest_positive = torch.where(pos, d, -torch.inf).max(1).values
    hardest_negative = torch.where(neg, d, torch.inf).min(1).values
    terms = hinge(hardest_positive[valid] - hardest_negative[valid] + margin, soft)
    return reduce(terms, "mean" if reduction == "auto" else reduction)


def batch_all_reference(x, labels, *, margin, soft, metric, normalize, reduction, ref=None,
                        ref_labels=None, offset=None):
    x, ref, labels, ref_labels, offset = setting(x, labels, ref, ref_labels, offset, normalize)
    d = distance_matrix(x, ref, metric)
    pos, neg = pair_masks(labels, ref_labels, offset)
    valid = pos[:, :, None] & neg[:, None, :]  # (a, p, n)
    terms = hinge(d[:, :, None] - d[:, None, :] + margin, soft)
    terms = torch.where(valid, terms, 0.0)
    if reduction == "none":
        return terms.sum((1, 2))  # one entry per anchor
    flat = terms[valid]
    return reduce(flat, "mean_nonzero" if reduction == "auto" else reduction)


def semi_hard_reference(x, labels, *, margin, soft, metric, normalize, reduction, ref=None,
                        ref_labels=None, offset=None):
    """TF-Addons' rule per positive pair (a, p): the nearest negative farther than p,
    else the farthest negative; pairs in (anchor, positive index) order."""
    x, ref, labels, ref_labels, offset = setting(x, labels, ref, ref_labels, offset, normalize)
    d = distance_matrix(x, ref, metric)
    pos, neg = pair_masks(labels, ref_labels, offset)
    terms = []
    for a, p in pos.nonzero().tolist():
        if not neg[a].any():
            continue
        farther = neg[a] & (d[a] > d[a, p])
        if farther.any():
            d_an = torch.where(farther, d[a], torch.inf).min()
        else:
            d_an = torch.where(neg[a], d[a], -torch.inf).max()
        terms.append(hinge(d[a, p] - d_an + margin, soft))
    terms = torch.stack(terms) if terms else x.new_zeros(0)
    return reduce(terms, "mean" if reduction == "auto" else reduction)


def given_triplets_reference(x, triplets, *, margin, soft, metric, normalize, reduction,
                             ref=None):
    x, ref, *_ = setting(x, None, ref, None, None, normalize)
    anchor, positive, negative = (torch.as_tensor(np.asarray(t)) for t in triplets)
    d = distance_matrix(x, ref, metric)
    terms = hinge(d[anchor, positive] - d[anchor, negative] + margin, soft)
    return reduce(terms, "mean" if reduction == "auto" else reduction)


def contrastive_reference(x, labels, *, pos_margin, neg_margin, power, metric, normalize,
                          reduction, ref=None, ref_labels=None, offset=None):
    x, ref, labels, ref_labels, offset = setting(x, labels, ref, ref_labels, offset, normalize)
    d = distance_matrix(x, ref, metric)
    pos, neg = pair_masks(labels, ref_labels, offset)
    positive_terms = torch.where(pos, torch.relu(d - pos_margin) ** power, 0.0)
    negative_terms = torch.where(neg, torch.relu(neg_margin - d) ** power, 0.0)
    if reduction == "none":
        return (positive_terms + negative_terms).sum(1)
    if reduction == "mean_nonzero":
        return reduce(positive_terms[pos], "mean_nonzero") + reduce(negative_terms[neg],
                                                                     "mean_nonzero")
    every = torch.cat([positive_terms[pos], negative_terms[neg]])
    return reduce(every, reduction)


REFERENCES = {"batch_hard": batch_hard_reference, "batch_all": batch_all_reference,
              "semi_hard": semi_hard_reference}


# ---- the margin-softmax heads ----------------------------------------------------------

def _psi_torch(m, theta):
    k = torch.floor(m * theta / torch.pi)
    return (-1.0) ** k * torch.cos(m * theta) - 2 * k


def head_reference(kind, x, labels, weight, *, bias=None, class_weight=None, reduction="mean",
                   **p):
    """The whole (N, C) logit matrix, the margin on the target column, and
    ``torch.nn.functional.cross_entropy``: autograd differentiates everything (acos
    included, so keep cos theta away from +-1)."""
    n = x.shape[0]
    rows = torch.arange(n)
    nx = torch.linalg.vector_norm(x, dim=1)
    nw = torch.linalg.vector_norm(weight, dim=1)
    dots = x @ weight.T
    if kind == "softmax":
        logits = dots + (bias if bias is not None else 0.0)
    elif kind in ("normface", "cosface", "arcface", "combined"):
        s = p["scale"]
        cos = dots / (nx[:, None] * nw[None, :])
        cos_y = cos[rows, labels]
        theta = torch.acos(cos_y)
        if kind == "normface":
            target = cos_y
        elif kind == "cosface":
            target = cos_y - p["margin"]
        elif kind == "arcface":
            m = p["margin"]
            phi = torch.cos(theta + m)
            if p.get("easy_margin"):
                target = torch.where(cos_y > 0, phi, cos_y)
            else:
                target = torch.where(cos_y > np.cos(np.pi - m), phi, cos_y - m * np.sin(m))
        else:
            u = p["m1"] * theta + p["m2"]
            k = torch.floor(u / torch.pi)
            target = (-1.0) ** k * torch.cos(u) - 2 * k - p["m3"]
        if p.get("straight_through"):  # InsightFace: the margin under no_grad
            target = cos_y + (target - cos_y).detach()
        logits = s * cos.index_put((rows, labels), target)
    else:
        m, lam = p["margin"], p.get("lambda_", 0.0)
        cos = dots / (nx[:, None] * nw[None, :])
        cos_y = cos[rows, labels]
        f = (lam * cos_y + _psi_torch(m, torch.acos(cos_y))) / (1 + lam)
        if kind == "sphereface":
            logits = (nx[:, None] * cos).index_put((rows, labels), nx * f)
        else:
            logits = dots.index_put((rows, labels), nw[labels] * nx * f)
    return torch.nn.functional.cross_entropy(logits, labels, weight=class_weight,
                                             reduction=reduction)


# ---- the lifted structured loss --------------------------------------------------------

def masked_logsumexp(values, mask, dim):
    """log sum exp of ``values`` over the entries where ``mask`` holds, along ``dim``; -inf
    where none does (an empty sum), with a finite (zero) gradient there."""
    some = mask.any(dim)
    masked = torch.where(mask, values, -torch.inf)
    masked = torch.where(some.unsqueeze(dim), masked, 0.0)  # no -inf - -inf in backward
    return torch.where(some, torch.logsumexp(masked, dim), -torch.inf)


def lifted_reference(x, labels, *, neg_margin=1.0, pos_margin=0.0, generalized=False,
                     metric="euclidean", normalize=False, reduction="mean", ref=None,
                     ref_labels=None, offset=None):
    """Song et al.'s lifted structured loss, or (``generalized``) Hermans et al.'s, from the
    whole N x M distance matrix.  Song's: per positive entry (i, j), the log-sum-exp runs
    over row i's negatives and column j's (the rows of ``x`` with another label than
    ``ref[j]``; row j's in self mode), an N x M x (M + N) tensor of candidates."""
    x, ref, labels, ref_labels, offset = setting(x, labels, ref, ref_labels, offset, normalize)
    d = distance_matrix(x, ref, metric)
    pos, neg = pair_masks(labels, ref_labels, offset)
    if generalized:
        valid = pos.any(1) & neg.any(1)
        hinge_in = (masked_logsumexp(d - pos_margin, pos, 1)
                    + masked_logsumexp(neg_margin - d, neg, 1))
        terms = torch.where(valid, torch.relu(torch.where(valid, hinge_in, 0.0)), 0.0)
        return terms if reduction == "none" else reduce(terms[valid], reduction)
    n, m = d.shape
    a = neg_margin - d
    candidates = torch.cat([a[:, None, :].expand(n, m, m), a.T[None, :, :].expand(n, m, n)], -1)
    mask = torch.cat([neg[:, None, :].expand(n, m, m), neg.T[None, :, :].expand(n, m, n)], -1)
    j = masked_logsumexp(candidates, mask, 2) + d - pos_margin
    terms = torch.where(pos, 0.5 * torch.relu(j) ** 2, 0.0)
    return terms.sum(1) if reduction == "none" else reduce(terms[pos], reduction)
