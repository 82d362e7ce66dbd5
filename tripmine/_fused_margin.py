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
