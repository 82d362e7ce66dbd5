"""The lifted structured loss written once for an array module (NumPy or CuPy).

The GPU path (:func:`tripmine._gpu.lifted.lifted_structured_loss`) runs this with CuPy; the
tests run it with NumPy against the C core (csrc/lifted_impl.h, whose top comment derives the
gradient).  Same definitions, same decomposition::

    row blocks of the N x M pair matrix (block x M entries at most BLOCK_ELEMENTS)
      Song's form
        1. tile -> per row log S_i (and per column log S'_j, merged block by block)
        2. positive pairs of the block, exact distances -> h_ij, loss, counts,
           tau_i = sum_j h_ij S_i / (S_i + S'_j), tau'_j = sum_i h_ij S'_j / (S_i + S'_j)
        3. tile again -> weights dL/dd: h_ij on positives,
           -(tau_i e^(m - d_ik) / S_i + tau'_k e^(m - d_ik) / S'_k) on negatives
      generalized form
        one walk: tile + exact positives -> LSE_p, LSE_n per row -> softmax weights
      weights -> coefficient block (per metric) -> coefficients @ ref (+ its transpose)

The block walk (tiles, exact distances, the gradient's products) is tripmine._fused_pairs.
Distances: negatives come from the tile (Gram identity from a product in the input dtype,
finished in float64; pairs near by the C core's rule recomputed by direct difference),
positives by direct difference in float64 (cosine: half the squared difference of the unit
vectors, a zero row at distance 1).  Log-sum-exps are float64, shifted by their largest term;
an empty sum is -inf and never meets an inf - inf.  Memory: O(block x M + (N + M) D); never
N x M.
"""

from __future__ import annotations

from typing import Any

from ._fused_pairs import BLOCK_ELEMENTS, Gradient, Pairs


def _finite_or_zero(xp: Any, v: Any):
    return xp.where(xp.isfinite(v), v, 0.0)


def _log_sum_exp(xp: Any, v: Any, axis: int):
    """log sum exp(v) along axis, shifted by the largest term; -inf for an empty sum."""
    top = v.max(axis=axis)
    shift = _finite_or_zero(xp, top)
    total = xp.exp(v - xp.expand_dims(shift, axis)).sum(axis=axis)
    return xp.where(total > 0, shift + xp.log(xp.where(total > 0, total, 1.0)), -xp.inf)


def _log_add(xp: Any, a: Any, b: Any):
    """log(e^a + e^b), -inf when both are."""
    hi, lo = xp.maximum(a, b), xp.minimum(a, b)
    shift = _finite_or_zero(xp, hi)
    return xp.where(hi == -xp.inf, -xp.inf, shift + xp.log1p(xp.exp(lo - shift)))


def _share(xp: Any, a: Any, b: Any):
    """e^a / (e^a + e^b), 0 when a is -inf, 1 when only b is."""
    both = xp.isfinite(a) & xp.isfinite(b)
    z = xp.where(both, _finite_or_zero(xp, a) - _finite_or_zero(xp, b), 0.0)
    e = xp.exp(-xp.abs(z))
    value = xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return xp.where(both, value, xp.where(a == -xp.inf, 0.0, 1.0))


def _exp_nonpositive(xp: Any, v: Any):
    """e^v for v <= 0 (a larger v, from rounding, is taken as 0): never above 1."""
    return xp.exp(xp.minimum(v, 0.0))


def _reduction_scale(reduction: str, terms: int, active: int) -> float:
    if reduction == "mean":
        return 1.0 / terms if terms else 0.0
    if reduction == "mean_nonzero":
        return 1.0 / active if active else 0.0
    return 1.0


def _song(pairs: Pairs, neg_margin: float, pos_margin: float, want_grad: bool):
    """(per-row loss, terms, active, gradient accumulators or None)."""
    xp, f64 = pairs.xp, pairs.xp.float64
    n, m = pairs.n, pairs.m
    # 1. log S per row, log S' per column (merged over the blocks, shifted by a running max)
    row_lse = xp.empty(n, dtype=f64)
    col_max = xp.full(m, -xp.inf, dtype=f64)
    col_sum = xp.zeros(m, dtype=f64)
    for row0, rows in pairs.blocks():
        _, negative = pairs.masks(row0, rows)
        v = xp.where(negative, neg_margin - pairs.tile(row0, rows, negative), -xp.inf)
        row_lse[row0:row0 + rows] = _log_sum_exp(xp, v, axis=1)
        if not pairs.self_mode:
            top = xp.maximum(col_max, v.max(axis=0))
            shift = _finite_or_zero(xp, top)
            col_sum = col_sum * xp.exp(col_max - shift) + xp.exp(v - shift[None, :]).sum(axis=0)
            col_max = top
    if pairs.self_mode:
        col_lse = row_lse
    else:
        shift = _finite_or_zero(xp, col_max)
        col_lse = xp.where(col_sum > 0, shift + xp.log(xp.where(col_sum > 0, col_sum, 1.0)),
                           -xp.inf)
    # 2. the positive pairs: hinges, loss, counts, tau (per row) and tau' (per column)
    per_row = xp.zeros(n, dtype=f64)
    row_tau = xp.zeros(n, dtype=f64)
    col_tau = row_tau if pairs.self_mode else xp.zeros(m, dtype=f64)
    terms = active = 0
    for row0, rows in pairs.blocks():
        positive, _ = pairs.masks(row0, rows)
        i, j, dist = pairs.positives(positive, row0)
        if not i.shape[0]:
            continue
        a, b = row_lse[i + row0], col_lse[j]
        h = xp.maximum(_log_add(xp, a, b) + dist - pos_margin, 0.0)
        on = h > 0
        terms += int(i.shape[0])
        active += int(on.sum())
        per_row[row0:row0 + rows] = xp.bincount(i, weights=0.5 * h * h, minlength=rows)
        row_tau[row0:row0 + rows] = xp.bincount(
            i, weights=xp.where(on, h * _share(xp, a, b), 0.0), minlength=rows)
        if not pairs.self_mode:
            col_tau += xp.bincount(j, weights=xp.where(on, h * _share(xp, b, a), 0.0),
                                   minlength=m)
    if not want_grad or active == 0:
        return per_row, terms, active, None
    # 3. the weights, block by block (tile again, exact positives again)
    grad = Gradient(pairs, ref_side=not pairs.self_mode)
    row_shift, col_shift = _finite_or_zero(xp, row_lse), _finite_or_zero(xp, col_lse)
    for row0, rows in pairs.blocks():
        positive, negative = pairs.masks(row0, rows)
        dist = pairs.tile(row0, rows, negative)
        t = neg_margin - dist
        w = -(row_tau[row0:row0 + rows, None] *
              _exp_nonpositive(xp, t - row_shift[row0:row0 + rows, None]) +
              col_tau[None, :] * _exp_nonpositive(xp, t - col_shift[None, :]))
        w = xp.where(negative, w, 0.0)
        i, j, pos_dist = pairs.positives(positive, row0)
        if i.shape[0]:
            a, b = row_lse[i + row0], col_lse[j]
            w[i, j] = xp.maximum(_log_add(xp, a, b) + pos_dist - pos_margin, 0.0)
            dist[i, j] = pos_dist
        grad.add(w, dist, row0, rows)
    return per_row, terms, active, grad


def _generalized(pairs: Pairs, neg_margin: float, pos_margin: float, want_grad: bool):
    """(per-row loss, terms, active, gradient accumulators or None): one walk."""
    xp, f64 = pairs.xp, pairs.xp.float64
    per_row = xp.zeros(pairs.n, dtype=f64)
    grad = Gradient(pairs, ref_side=True) if want_grad else None
    terms = active = 0
    for row0, rows in pairs.blocks():
        positive, negative = pairs.masks(row0, rows)
        dist = pairs.tile(row0, rows, negative)
        i, j, pos_dist = pairs.positives(positive, row0)
        dist[i, j] = pos_dist
        p = xp.where(positive, dist - pos_margin, -xp.inf)
        q = xp.where(negative, neg_margin - dist, -xp.inf)
        lse_p, lse_n = _log_sum_exp(xp, p, axis=1), _log_sum_exp(xp, q, axis=1)
        valid = xp.isfinite(lse_p) & xp.isfinite(lse_n)
        value = xp.where(valid, xp.maximum(_finite_or_zero(xp, lse_p) +
                                           _finite_or_zero(xp, lse_n), 0.0), 0.0)
        on = value > 0
        per_row[row0:row0 + rows] = value
        terms += int(valid.sum())
        block_active = int(on.sum())
        active += block_active
        if grad is None or block_active == 0:
            continue
        w_p = _exp_nonpositive(xp, p - _finite_or_zero(xp, lse_p)[:, None])
        w_n = -_exp_nonpositive(xp, q - _finite_or_zero(xp, lse_n)[:, None])
        w = xp.where(positive, w_p, xp.where(negative, w_n, 0.0))
        grad.add(xp.where(on[:, None], w, 0.0), dist, row0, rows)
    return per_row, terms, active, grad


def lifted_terms(xp: Any, x: Any, ref: Any, codes: Any, ref_codes: Any,
                 ref_offset: int | None, metric: str, neg_margin: float, pos_margin: float,
                 generalized: bool, reduction: str, want_grad: bool,
                 block_elements: int = BLOCK_ELEMENTS):
    """(loss, n_terms, n_active, grad, ref_grad) as the C core's tm_lifted_structured_loss.

    ``x``, ``ref`` (None in self mode) C-contiguous in the computing dtype; ``codes``,
    ``ref_codes`` int64 label codes; ``metric`` a name; ``reduction`` "mean", "sum",
    "mean_nonzero" or "none" (then ``loss`` is the float64 vector of per-row sums and the
    gradients are those of their sum).  ``grad`` (and ``ref_grad`` in reference mode) are
    None unless ``want_grad``.  ``block_elements`` bounds the block of the pair matrix.
    """
    pairs = Pairs(xp, x, ref, codes, ref_codes, ref_offset, metric, block_elements)
    if pairs.m == 0:  # no pairs at all (an empty reference set)
        per_row, terms, active, acc = xp.zeros(pairs.n, dtype=xp.float64), 0, 0, None
    else:
        form = _generalized if generalized else _song
        per_row, terms, active, acc = form(pairs, neg_margin, pos_margin, want_grad)
    scale = _reduction_scale(reduction, terms, active)
    loss = per_row if reduction == "none" else float(per_row.sum()) * scale
    grad = ref_grad = None
    if want_grad:
        if acc is None:  # no active term: zero gradients
            acc = Gradient(pairs, ref_side=not pairs.self_mode)
        # Song's self-mode weights are symmetric: the reference side is the anchor side
        doubled = pairs.self_mode and not generalized
        grad, ref_grad = acc.finish(2.0 * scale if doubled else scale)
    return loss, terms, active, grad, ref_grad
