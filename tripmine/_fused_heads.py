"""The margin-softmax heads on array-module operations: the GPU path's algorithm.

:func:`fused_head` computes what ``tm_softmax_head`` of the C core computes (csrc/heads.c),
for any NumPy-compatible array module ``xp``: CuPy on the GPU (its matmuls are cuBLAS
tiles), NumPy in the tests, which check it against the C core on every head.  The classes
are walked in blocks of ``block`` rows of W:

* forward: per block, the (N, block) logits (unit vectors for the normalised heads, so the
  tile holds cosines), the target's margin logit in its column, and an online
  log-sum-exp per sample (running max and sum, in float64);
* backward: per block again, the logits recomputed, G = g_i softmax - (target column
  handled apart), dX += G W^_blk and dW_blk = G^T (s x^ or x), each projected off its own
  direction where the head normalises it; the target's terms in closed form.

Memory is O(N block + (N + C) D): never the (N, C) logits.  The target logit and its
derivative follow the C core's rules (heads.c): a zero vector has cos 0 and passes no
gradient through its normalisation; at cos = +-1 the margin's derivative is taken as 0;
ArcFace past pi follows InsightFace; the combined margin continues like SphereFace's psi.
"""

from __future__ import annotations

import math

import numpy as np

NORMALISED_X = ("normface", "cosface", "arcface", "combined")
UNNORMALISED_W = ("softmax", "lsoftmax")


def _psi(xp, m: int, c):
    """psi(theta) = (-1)^k cos(m theta) - 2k and d psi / dc by Chebyshev's recurrences."""
    t_prev, t = xp.ones_like(c), c
    u_prev, u = xp.zeros_like(c), xp.ones_like(c)
    for _ in range(1, m):
        t_prev, t = t, 2 * c * t - t_prev
        u_prev, u = u, 2 * c * u - u_prev
    k = xp.zeros_like(c)
    for j in range(1, m + 1):
        k = k + (c <= math.cos(j * math.pi / m))
    sign = 1 - 2 * (k % 2)
    return sign * t - 2 * k, sign * m * u


def _angular(xp, head: dict, c):
    """F(c) and dF/dc of the angular heads (float64 arrays)."""
    kind = head["kind"]
    sin_theta = xp.sqrt(xp.maximum(1 - c * c, 0.0))
    safe_sin = xp.where(sin_theta > 0, sin_theta, 1.0)
    if kind == "normface":
        return c, xp.ones_like(c)
    if kind == "cosface":
        return c - head.get("m3", 0.0), xp.ones_like(c)
    if kind == "arcface":
        m = head.get("m2", 0.0)
        with_margin = c > 0 if head.get("easy_margin") else c > math.cos(math.pi - m)
        phi = c * math.cos(m) - sin_theta * math.sin(m)
        dphi = xp.where(sin_theta > 0, math.cos(m) + c * math.sin(m) / safe_sin, 0.0)
        fallback = c if head.get("easy_margin") else c - m * math.sin(m)
        F = xp.where(with_margin, phi, fallback)
        dF = xp.where(with_margin, dphi, 1.0)
    elif kind == "combined":
        u = head.get("m1", 1.0) * xp.arccos(c) + head.get("m2", 0.0)
        k = xp.floor(u / math.pi)
        sign = 1 - 2 * (k % 2)
        F = sign * xp.cos(u) - 2 * k - head.get("m3", 0.0)
        dF = xp.where(sin_theta > 0, sign * head.get("m1", 1.0) * xp.sin(u) / safe_sin, 0.0)
    else:  # sphereface, lsoftmax
        p, dp = _psi(xp, head["margin"], c)
        lam = head.get("lambda_", 0.0)
        return (lam * c + p) / (1 + lam), (lam + dp) / (1 + lam)
    if head.get("straight_through"):
        dF = xp.ones_like(c)
    return F, dF


def _target(xp, head: dict, cos, ok, nx, nw):
    """The target logits and the coefficients (a, b, c, e) of their gradients in the basis
    of the unit vectors (tm_head_target in heads.c)."""
    kind = head["kind"]
    if kind == "softmax":
        one, zero = xp.ones_like(cos), xp.zeros_like(cos)
        return cos, (zero, one, one, zero)
    c = xp.clip(cos, -1.0, 1.0)
    F, dF = _angular(xp, head, c)
    dF = xp.where(ok, dF, 0.0)
    if kind == "sphereface":
        return nx * F, (F - dF * c, dF, nx * dF, -nx * dF * c)
    if kind == "lsoftmax":
        return nw * nx * F, (nw * (F - dF * c), nw * dF, nx * dF, nx * (F - dF * c))
    s = head["scale"]
    return s * F, (-s * dF * c, s * dF, s * dF, -s * dF * c)


def _scatter_add(xp, target, index, values) -> None:
    if xp is np:
        np.add.at(target, index, values)
    else:  # CuPy
        import cupyx
        cupyx.scatter_add(target, index, values)


def fused_head(xp, head: dict, x, labels, weight, bias, class_weight, reduction: str,
               want_grad: bool, want_wgrad: bool, upstream=None, block: int = 4096, *,
               shard: bool = False, lse_in=None):
    """(loss, per_sample, n_correct, grad, weight_grad, bias_grad) as tm_softmax_head.

    ``x`` (N, D) and ``weight`` (C, D) of one float dtype, ``labels`` int64 in [0, C),
    ``bias`` (C,) or None (softmax only), ``class_weight`` float64 (C,) or None, ``upstream``
    float64 (N,) or None (reduction "none" only); all on ``xp``'s device, validated.

    ``shard=True`` is tm_softmax_head_shard (tripmine._sharded): labels may be -1 (the
    target lies in another shard), class_weight None, reduction "none".  Without
    ``lse_in`` it returns the (N, 4) float64 statistics (this shard's log-sum-exp, target
    logit or 0, best plain logit, its row); with ``lse_in`` (N,), the log-sum-exp over every
    shard, and ``upstream`` the rows' gains, the gradients of this shard (the forward walk
    is skipped: the log-sum-exp is known)."""
    n, d = x.shape
    c = weight.shape[0]
    dtype = x.dtype
    kind = head["kind"]
    norm_x, norm_w = kind in NORMALISED_X, kind not in UNNORMALISED_W
    s = float(head.get("scale", 1.0)) if norm_x else 1.0
    f64 = xp.float64
    cw = class_weight[labels] if class_weight is not None else xp.ones(n, dtype=f64)
    divisor = float(cw.sum()) if class_weight is not None else float(n)
    red = (1.0 / divisor if divisor > 0 else 0.0) if reduction == "mean" else 1.0
    if n == 0:
        wg = xp.zeros_like(weight) if want_wgrad else None
        bg = xp.zeros_like(bias) if (want_wgrad and bias is not None) else None
        per = xp.zeros(0, dtype=f64) if reduction == "none" else None
        return 0.0, per, 0, (xp.zeros_like(x) if want_grad else None), wg, bg

    x64, w64 = x.astype(f64), weight.astype(f64)
    nx = xp.sqrt((x64 * x64).sum(1))
    nw = xp.sqrt((w64 * w64).sum(1))
    inx = xp.where(nx > 0, 1 / xp.where(nx > 0, nx, 1.0), 0.0)
    inw = xp.where(nw > 0, 1 / xp.where(nw > 0, nw, 1.0), 0.0)
    rows = xp.arange(n)
    has = labels >= 0  # every row, except a shard's rows whose target lies elsewhere
    if shard:
        labels = xp.where(has, labels, 0)
    wy64 = w64[labels]
    if kind == "softmax":
        u, v = x64, wy64
        cos = (u * v).sum(1) + (bias.astype(f64)[labels] if bias is not None else 0.0)
        ok = xp.ones(n, dtype=bool)
    else:
        u, v = x64 * inx[:, None], wy64 * inw[labels][:, None]
        cos = (u * v).sum(1)
        ok = (nx > 0) & (nw[labels] > 0)
    z_y, coef = _target(xp, head, cos, ok, nx, nw[labels])
    if shard:
        z_y = xp.where(has, z_y, 0.0)
    z_y = z_y.astype(dtype)  # the target logit as the tile holds it
    xu = (x64 * inx[:, None]).astype(dtype) if norm_x else x

    def logits(j0: int, j1: int):
        wb = weight[j0:j1]
        wbu = (w64[j0:j1] * inw[j0:j1, None]).astype(dtype) if norm_w else wb
        t = xu @ wbu.T
        if norm_x:
            t = t * dtype.type(s)
        if bias is not None:
            t = t + bias[j0:j1]
        return t, wbu

    if lse_in is None:
        m = xp.full(n, -xp.inf, dtype=f64)
        total = xp.zeros(n, dtype=f64)
        best = xp.full(n, -xp.inf, dtype=dtype)
        best_j = xp.zeros(n, dtype=xp.int64)
        for j0 in range(0, c, block):
            j1 = min(c, j0 + block)
            t, _ = logits(j0, j1)
            block_best = t.max(1)
            better = block_best > best
            best_j = xp.where(better, t.argmax(1) + j0, best_j)
            best = xp.where(better, block_best, best)
            inside = has & (labels >= j0) & (labels < j1)
            t[rows[inside], labels[inside] - j0] = z_y[inside]
            new_m = xp.maximum(m, t.max(1).astype(f64))
            total = total * xp.exp(m - new_m) + xp.exp(t.astype(f64) - new_m[:, None]).sum(1)
            m = new_m
        lse = m + xp.log(total)
        if shard:
            return xp.stack([lse, z_y.astype(f64), best.astype(f64), best_j.astype(f64)], 1)
        per_sample = cw * (lse - z_y.astype(f64))
        loss = float(per_sample.sum()) * red
        correct = int((best_j == labels).sum())
    else:
        lse, loss, per_sample, correct = lse_in, 0.0, None, 0
    grad = weight_grad = bias_grad = None
    if want_grad or want_wgrad:
        g = cw * red * (upstream if upstream is not None else 1.0)
        gy = xp.where(has, g * (xp.exp(z_y.astype(f64) - lse) - 1), 0.0)
        acc = xp.zeros((n, d), dtype=f64) if want_grad else None
        if want_wgrad:
            weight_grad = xp.empty_like(weight)
            bias_grad = xp.empty_like(bias) if bias is not None else None
            side = (xu * dtype.type(s)) if norm_x else x
        for j0 in range(0, c, block):
            j1 = min(c, j0 + block)
            t, wbu = logits(j0, j1)
            G = (g[:, None] * xp.exp(t.astype(f64) - lse[:, None])).astype(dtype)
            inside = has & (labels >= j0) & (labels < j1)
            G[rows[inside], labels[inside] - j0] = 0
            if want_grad:
                acc += (G @ wbu).astype(f64)
            if want_wgrad:
                raw = (G.T @ side).astype(f64)
                if norm_w:
                    unit = wbu.astype(f64)
                    raw = (raw - (raw * unit).sum(1)[:, None] * unit) * inw[j0:j1, None]
                weight_grad[j0:j1] = raw.astype(dtype)
                if bias_grad is not None:
                    bias_grad[j0:j1] = G.astype(f64).sum(0).astype(dtype)
        a, b, cc, e = coef
        if want_grad:
            target = gy[:, None] * (a[:, None] * u + b[:, None] * v)
            if norm_x:
                radial = (acc * u).sum(1)
                grad = ((s * (acc - radial[:, None] * u) + target) * inx[:, None]).astype(dtype)
            else:
                grad = (acc + target).astype(dtype)
        if want_wgrad:
            term = gy[:, None] * (cc[:, None] * u + e[:, None] * v)
            if norm_w:
                term = term * inw[labels][:, None]
            dw = weight_grad.astype(f64)
            _scatter_add(xp, dw, labels, term)
            weight_grad = dw.astype(dtype)
            if bias_grad is not None:
                db = bias_grad.astype(f64)
                _scatter_add(xp, db, labels, gy)
                bias_grad = db.astype(dtype)
    return (loss, per_sample if reduction == "none" else None, correct, grad if want_grad
            else None, weight_grad if want_wgrad else None, bias_grad if want_wgrad else None)

