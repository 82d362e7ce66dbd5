"""The margin loss over given triplets written once for an array module (NumPy or CuPy).

The GPU path (``tripmine._gpu.margin_loss``) runs this with CuPy after mining on the device;
the tests run it with NumPy against the C core (csrc/losses_impl.h, ``tm_margin_loss``).
Per triplet the distances are recomputed by direct difference in float64 (cosine: of the
unit vectors, half the squared difference, a zero row at distance 1), each active hinge's
gradient flows through its own distance, and rows collect their terms by scatter-adds.
Memory O(T D) for T triplets; never N x M.
"""

from __future__ import annotations

from typing import Any

from ._fused_center import _scatter_add

EUCLIDEAN, SQEUCLIDEAN, COSINE = "euclidean", "sqeuclidean", "cosine"


def _distance_and_derivatives(xp: Any, u: Any, v: Any, metric: str):
    """d(u_t, v_t) per row pair, and dd/du, dd/dv (float64 rows)."""
    if metric == COSINE:
        nu_ = xp.sqrt((u * u).sum(axis=1))
        nv_ = xp.sqrt((v * v).sum(axis=1))
        ok = (nu_ > 0) & (nv_ > 0)
        su, sv = xp.where(ok, nu_, 1.0), xp.where(ok, nv_, 1.0)
        uh, vh = u / su[:, None], v / sv[:, None]
        diff = uh - vh
        dist = xp.where(ok, 0.5 * (diff * diff).sum(axis=1), 1.0)
        cos = (uh * vh).sum(axis=1)
        du = -(vh - cos[:, None] * uh) / su[:, None]
        dv = -(uh - cos[:, None] * vh) / sv[:, None]
        return dist, du * ok[:, None], dv * ok[:, None]
    diff = u - v
    sq = (diff * diff).sum(axis=1)
    if metric == SQEUCLIDEAN:
        return sq, 2.0 * diff, -2.0 * diff
    dist = xp.sqrt(sq)
    inv = xp.where(dist > 0, 1.0 / xp.where(dist > 0, dist, 1.0), 0.0)
    return dist, diff * inv[:, None], -diff * inv[:, None]


def margin_terms(xp: Any, x: Any, ref: Any, metric: str, anchor: Any, positive: Any,
                 negative: Any, beta: Any, margin: float, reduction: str, want_grad: bool):
    """(loss, n_active, per_triplet, beta_grad per triplet, grad, ref_grad), as the C core's
    tm_margin_loss; ``reduction`` "mean_nonzero", "sum" or "none"; ``ref`` None in self
    mode."""
    f64 = xp.float64
    rows = x if ref is None else ref
    xa = x[anchor].astype(f64)
    dap, dap_u, dap_v = _distance_and_derivatives(xp, xa, rows[positive].astype(f64), metric)
    dan, dan_u, dan_v = _distance_and_derivatives(xp, xa, rows[negative].astype(f64), metric)
    pos = xp.maximum(dap - beta + margin, 0.0)
    neg = xp.maximum(beta - dan + margin, 0.0)
    gp, gn = (pos > 0).astype(f64), -(neg > 0).astype(f64)
    active = int((pos > 0).sum() + (neg > 0).sum())
    per_triplet = pos + neg
    total = float(per_triplet.sum())
    scale = (1.0 / active if active else 0.0) if reduction == "mean_nonzero" else 1.0
    loss = total if reduction == "none" else total * scale
    beta_grad = scale * (-gn - gp)
    grad = ref_grad = None
    if want_grad:
        gx = xp.zeros(x.shape, dtype=f64)
        gr = gx if ref is None else xp.zeros(ref.shape, dtype=f64)
        gp, gn = scale * gp, scale * gn
        _scatter_add(xp, gx, anchor, gp[:, None] * dap_u + gn[:, None] * dan_u)
        _scatter_add(xp, gr, positive, gp[:, None] * dap_v)
        _scatter_add(xp, gr, negative, gn[:, None] * dan_v)
        grad = gx.astype(x.dtype)
        ref_grad = None if ref is None else gr.astype(ref.dtype)
    return loss, active, per_triplet if reduction == "none" else None, beta_grad, grad, ref_grad


def margin_all_terms(xp: Any, x: Any, ref: Any, codes: Any, ref_codes: Any,
                     ref_offset: int | None, metric: str, beta: Any, margin: float, nu: float,
                     reduction: str, want_grad: bool, block_elements: int | None = None):
    """The margin loss over every valid triplet (``mining="batch_all"``) as the C core's
    ``tm_margin_all_loss`` (csrc/margin_all_impl.h): (loss, n_triplets, n_active, per-anchor
    loss, dL/dbeta per anchor, grad, ref_grad).

    Anchor a's triplets split into pair terms: each positive's hinge counts N_a times (its
    negatives), each negative's P_a times, the penalty nu beta_a P_a N_a times.  Row blocks
    of the pair matrix (tripmine._fused_pairs' walk: tiles, exact positive distances, the
    gradient's products); ``beta`` the float64 boundary of each anchor; ``reduction``
    "mean" (over the nonzero hinge terms), "sum" or "none" (per-anchor sums, the gradients
    of their sum).
    """
    from ._fused_pairs import BLOCK_ELEMENTS, Gradient, Pairs
    pairs = Pairs(xp, x, ref, codes, ref_codes, ref_offset, metric,
                   BLOCK_ELEMENTS if block_elements is None else block_elements)
    f64 = xp.float64
    per_anchor = xp.zeros(pairs.n, dtype=f64)
    beta_grad = xp.zeros(pairs.n, dtype=f64)
    grad = Gradient(pairs, ref_side=True) if want_grad else None
    triplets = active = 0
    for row0, rows in (pairs.blocks() if pairs.m else ()):
        positive, negative = pairs.masks(row0, rows)
        dist = pairs.tile(row0, rows, negative)
        i, j, pos_dist = pairs.positives(positive, row0)
        dist[i, j] = pos_dist
        n_pos = positive.sum(axis=1).astype(f64)
        n_neg = negative.sum(axis=1).astype(f64)
        b = beta[row0:row0 + rows, None]
        hinge_p = xp.where(positive, xp.maximum(dist - (b - margin), 0.0), 0.0)
        hinge_n = xp.where(negative, xp.maximum((b + margin) - dist, 0.0), 0.0)
        on_p, on_n = hinge_p > 0, hinge_n > 0
        act_p, act_n = on_p.sum(axis=1).astype(f64), on_n.sum(axis=1).astype(f64)
        both = n_pos * n_neg
        per_anchor[row0:row0 + rows] = (n_neg * hinge_p.sum(axis=1) + n_pos * hinge_n.sum(axis=1)
                                        + nu * b[:, 0] * both)
        beta_grad[row0:row0 + rows] = -n_neg * act_p + n_pos * act_n + nu * both
        triplets += int(both.sum())
        active += int((n_neg * act_p + n_pos * act_n).sum())
        if grad is not None:
            w = xp.where(on_p, n_neg[:, None], 0.0) - xp.where(on_n, n_pos[:, None], 0.0)
            grad.add(w, dist, row0, rows)
    scale = (1.0 / active if active else 0.0) if reduction == "mean" else 1.0
    loss = per_anchor if reduction == "none" else float(per_anchor.sum()) * scale
    g = rg = None
    if want_grad:
        if grad is None or pairs.m == 0:
            grad = Gradient(pairs, ref_side=not pairs.self_mode)
        g, rg = grad.finish(scale)
    return loss, triplets, active, per_anchor, beta_grad * scale, g, rg
