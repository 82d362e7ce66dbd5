"""Analytic gradients (grad and ref_grad) against float64 central finite
differences along random directions, away from kinks.

For a direction (v, u) the directional derivative grad.v + ref_grad.u must
match (L(x + hv, ref + hu) - L(x - hv, ref - hu)) / 2h.  Batches are redrawn
until no hinge argument, margin gap or distance is within 1e-3 of its kink,
and mined losses must mine the same triplets at x + hv and x - hv.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine
from checks import rows
from conftest import METRICS

REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
KINK_CLEARANCE = 1e-3
N_DIRECTIONS = 2

TRIPLET_CASES = [(mining, metric, normalize, soft)
                 for mining in ("batch_hard", "batch_all", "semi_hard", "given")
                 for metric in METRICS for normalize in (False, True) for soft in (False, True)]
TRIPLET_CASES += [("distance_weighted", "euclidean", True, soft) for soft in (False, True)]


def _case_id(case):
    return "-".join(str(part) if not isinstance(part, bool) else ("T" if part else "F")
                    for part in case)


def _batch(rng, mode, d=5):
    """Three classes, self mode N = 12, or N = 8 against a reference of M = 14."""
    if mode == "self":
        return rng.standard_normal((12, d)), np.arange(12) % 3, None, None
    return (rng.standard_normal((8, d)), np.arange(8) % 3, rng.standard_normal((14, d)),
            np.arange(14) % 3)


def _margin_clear_of(values, target):
    """The margin near target farthest from every value (hinge arguments are
    value - margin up to sign, so this keeps them away from 0)."""
    candidates = target * np.linspace(0.6, 1.4, 81)
    values = np.asarray(values).ravel()
    if values.size == 0:
        return float(target)
    return float(candidates[np.argmax([np.min(np.abs(values - c)) for c in candidates])])


def _directional_check(evaluate, x, ref, rng, mined):
    """Compare grad.v + ref_grad.u with a central difference for a few random
    directions.  Returns False (redraw the batch) when the mined triplets
    change under the perturbation."""
    value, base = evaluate(x, ref)
    scale = max(1.0, float(np.abs(x).max()), 0.0 if ref is None else float(np.abs(ref).max()))
    h = 1e-6 * scale
    for _ in range(N_DIRECTIONS):
        v = rng.standard_normal(x.shape)
        u = None if ref is None else rng.standard_normal(ref.shape)
        plus_value, plus = evaluate(x + h * v, None if ref is None else ref + h * u)
        minus_value, minus = evaluate(x - h * v, None if ref is None else ref - h * u)
        if mined and not rows(plus.triplets) == rows(minus.triplets) == rows(base.triplets):
            return False
        numeric = (plus_value - minus_value) / (2 * h)
        analytic = float(np.sum(base.grad * v))
        bound = float(np.linalg.norm(base.grad) * np.linalg.norm(v))
        if ref is not None:
            analytic += float(np.sum(base.ref_grad * u))
            bound += float(np.linalg.norm(base.ref_grad) * np.linalg.norm(u))
        assert abs(numeric - analytic) <= 1e-5 * bound + 1e-10 * (1 + abs(value)), (
            numeric, analytic, bound)
    return True


def _loss_value(result, reduction):
    return float(np.sum(result.loss)) if reduction == "none" else result.loss


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("case", TRIPLET_CASES, ids=_case_id)
def test_triplet_loss_gradient(rng, case, mode):
    """triplet_loss: grad and ref_grad are the derivative of the loss, for every
    reduction ("none": of the sum of the vector)."""
    mining, metric, normalize, soft = case
    for _attempt in range(20):
        x, labels, ref, ref_labels = _batch(rng, mode)
        dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
        a, p, n = reference.batch_all_triplets(labels, ref_labels)
        margin = _margin_clear_of(dist[a, n] - dist[a, p], 0.5 * np.median(dist[pos | neg]))
        if mining == "given":
            pick = rng.choice(len(a), 30, replace=False)
            given = tripmine.Triplets(a[pick], p[pick], n[pick])
        kw = dict(ref=ref, ref_labels=ref_labels, metric=metric, normalize=normalize,
                  margin=margin, soft=soft, seed=3,
                  mining=given if mining == "given" else mining)
        used = tripmine.triplet_loss(x, labels, **kw)
        triplets = (a, p, n) if mining == "batch_all" else used.triplets
        z, _ = reference.triplet_losses(x, triplets, margin=margin, metric=metric, ref=ref,
                                        normalize=normalize)
        entering = np.concatenate([dist[triplets[0], triplets[1]], dist[triplets[0], triplets[2]]])
        clearance = KINK_CLEARANCE * max(1.0, float(np.median(dist)))
        if len(z) and (np.min(np.abs(z)) < clearance or np.min(entering) < KINK_CLEARANCE):
            continue
        if used.n_active == 0 or (not soft and mining in ("batch_all", "given")
                                  and used.n_active == used.n_triplets):
            continue  # exercise a nonzero gradient (and both sides of the hinge)

        stable = True
        for reduction in REDUCTIONS:
            def evaluate(xe, refe, reduction=reduction, labels=labels, kw=kw):
                result = tripmine.triplet_loss(xe, labels, reduction=reduction,
                                               **dict(kw, ref=refe))
                return _loss_value(result, reduction), result

            stable = _directional_check(evaluate, x, ref, rng,
                                        mined=mining not in ("batch_all", "given"))
            if not stable:
                break
        if stable:
            return
    pytest.fail("no kink-free, mining-stable batch in 20 draws")


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("power", [1, 2])
def test_contrastive_loss_gradient(rng, power, metric, normalize, mode):
    """contrastive_loss: grad and ref_grad are the derivative of the loss, for
    every reduction, with both margins inside the distance range."""
    for _attempt in range(20):
        x, labels, ref, ref_labels = _batch(rng, mode)
        dist, pos, neg = reference.mining_distances(x, labels, ref, ref_labels, metric, normalize)
        pairs = dist[pos | neg]
        pos_margin = _margin_clear_of(pairs, np.quantile(dist[pos], 0.4))
        neg_margin = _margin_clear_of(pairs, np.quantile(dist[neg], 0.5))
        if np.min(pairs) < KINK_CLEARANCE:
            continue
        kw = dict(ref_labels=ref_labels, metric=metric, normalize=normalize, power=power,
                  pos_margin=pos_margin, neg_margin=neg_margin)
        for reduction in REDUCTIONS:
            def evaluate(xe, refe, reduction=reduction, labels=labels, kw=kw):
                result = tripmine.contrastive_loss(xe, labels, ref=refe, reduction=reduction,
                                                   **kw)
                return _loss_value(result, reduction), result

            _directional_check(evaluate, x, ref, rng, mined=False)
        return
    pytest.fail("no kink-free batch in 20 draws")


@pytest.mark.parametrize("metric", METRICS)
def test_gradient_at_exact_zero_distance_is_finite_and_zero(metric):
    """Two identical rows of one class (d = 0, the euclidean kink) in an
    inactive-negative setting: the subgradient is exactly 0."""
    x = np.array([[1.0, 2.0], [1.0, 2.0], [9.0, -7.0], [9.5, -7.0]])
    labels = np.array([0, 0, 1, 1])
    result = tripmine.triplet_loss(x, labels, mining="batch_all", metric=metric, margin=0.0,
                                   reduction="sum")
    assert np.all(np.isfinite(result.grad))
    want = reference.batch_all_loss(x, labels, margin=0.0, metric=metric, reduction="sum")
    assert result.loss == pytest.approx(want.loss, abs=1e-12)
    np.testing.assert_array_equal(result.grad[:2], 0.0)
