"""tripmine._fused_lifted with NumPy (what the GPU path runs with CuPy) against the C core
(tripmine.lifted_structured_loss): both forms, every metric, self / reference / ref_offset
modes, every reduction, both precisions, normalize through the problem's chain, corners
(one class, singletons, empty sides, zero rows, duplicates, far negatives), block sizes,
and memory linear in the batch.  Any NumPy floating-point warning (an inf - inf, a log 0)
fails the test."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import tripmine
from tripmine import _fused_lifted
from tripmine import _problem as problems

pytestmark = pytest.mark.filterwarnings("error")

METRICS = ["euclidean", "sqeuclidean", "cosine"]
FORMS = [False, True]
MODES = ["self", "ref", "offset"]
REDUCTIONS = ["mean", "sum", "mean_nonzero", "none"]
DTYPES = [np.float64, np.float32]
# Relative to the largest entry of what is compared.  Measured on these batches: float64
# 1.3e-13, float32 5.8e-6 (gradients; the C core's float32 tiles and products round
# differently; on the worst row, the near-duplicate's, ours is 1.4e-6 from the float64
# gradient of the same data and the C core 4.4e-6).
TOLERANCE = {np.float64: 1e-12, np.float32: 2e-5}


def _problem(rng, mode, n=24, m=17, d=6, classes=4, dtype=np.float64, metric="euclidean",
             near=None):
    """A batch with the awkward pairs: same-label duplicates (a zero positive distance),
    an other-label near-duplicate (a tile entry the C core refines; ``near`` apart in each
    coordinate), a zero row for cosine.

    float32 keeps the near-duplicate 3e-2 apart: at 1e-4 its gradient weight w / d ~ 4e3 w
    cancels in alpha x_a + beta r_j (csrc/dense_impl.h), so both the C core's and this
    module's float32 gradients are ~5e-4 (relative) away from the float64 gradient of the
    same data, and up to 6e-4 from each other; float64 at 1e-3 for the same reason (at 1e-4
    the two sides differ by 1.8e-12)."""
    if near is None:
        near = 1e-3 if dtype == np.float64 else 3e-2
    x = rng.standard_normal((n, d)) * 0.6
    labels = rng.integers(0, classes, n)
    labels[:3] = [0, 0, 1]
    x[1] = x[0]
    x[2] = x[0] + near
    if metric == "cosine":
        x[5] = 0.0
    x = x.astype(dtype)
    if mode == "self":
        return x, labels, {}
    ref = (rng.standard_normal((m, d)) * 0.6).astype(dtype)
    ref_labels = rng.integers(0, classes, m)
    ref[4], ref_labels[4] = x[3], labels[3] + 1  # an other-label copy of a sample
    if mode == "ref":
        return x, labels, {"ref": ref, "ref_labels": ref_labels}
    offset = 3
    ref = np.concatenate([ref[:offset], x, ref[offset:]])
    ref_labels = np.concatenate([ref_labels[:offset], labels, ref_labels[offset:]])
    return x, labels, {"ref": ref, "ref_labels": ref_labels, "ref_offset": offset}


def _ours(x, labels, *, neg_margin=1.0, pos_margin=0.0, generalized=False,
          metric="euclidean", normalize=False, reduction="mean", ref=None, ref_labels=None,
          ref_offset=None, grad=True, block_elements=_fused_lifted.BLOCK_ELEMENTS):
    """The GPU path's steps on the host: the CPU's problem, the array-module terms, the
    chain through normalize; a LiftedStructuredLossResult."""
    p = problems.prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                         ref_offset=ref_offset)
    loss, terms, active, g, rg = _fused_lifted.lifted_terms(
        np, p.x, p.ref, p.codes, p.ref_codes, p.ref_offset, metric, neg_margin, pos_margin,
        generalized, reduction, grad, block_elements)
    g, rg = p.chain(g, rg)
    return tripmine.LiftedStructuredLossResult(loss, g, rg, terms, active,
                                               active / terms if terms else 0.0)


def _close(got, want, tol, what):
    """Equal to tol relative to the largest entry (at least 1e-2: an all-zero gradient may
    come back as rounding noise, e.g. -1.9e-17, from either side)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-2)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def _assert_same(got, want, dtype, what=""):
    tol = TOLERANCE[dtype]
    assert (got.n_terms, got.n_active) == (want.n_terms, want.n_active), what
    assert got.fraction_active == want.fraction_active, what
    assert isinstance(got.loss, float) == isinstance(want.loss, float), what
    _close(got.loss, want.loss, tol, f"loss {what}")
    for name in ("grad", "ref_grad"):
        ours, theirs = getattr(got, name), getattr(want, name)
        assert (ours is None) == (theirs is None), f"{name} {what}"
        if theirs is not None:
            assert ours.dtype == theirs.dtype, f"{name} {what}"
            assert np.all(np.isfinite(ours)), f"{name} {what}"
            _close(ours, theirs, tol, f"{name} {what}")


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_c_core(generalized, metric, mode):
    rng = np.random.default_rng(FORMS.index(generalized) * 100 + METRICS.index(metric) * 10
                                + MODES.index(mode))
    for dtype in DTYPES:
        x, labels, kw = _problem(rng, mode, dtype=dtype, metric=metric)
        for reduction in REDUCTIONS:
            options = dict(generalized=generalized, metric=metric, reduction=reduction,
                           neg_margin=0.8 if metric == "cosine" else 1.3, pos_margin=0.05,
                           **kw)
            want = tripmine.lifted_structured_loss(x, labels, **options)
            assert want.n_active > 0  # the comparison covers the gradient's weights
            _assert_same(_ours(x, labels, **options), want, dtype,
                         f"{np.dtype(dtype).name} {reduction}")


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_normalize_chains_the_gradient_like_the_c_core(generalized, mode):
    rng = np.random.default_rng(20 + MODES.index(mode))
    x, labels, kw = _problem(rng, mode, metric="cosine")
    x[7] *= 40.0
    for metric in ("euclidean", "cosine"):
        options = dict(generalized=generalized, metric=metric, normalize=True, **kw)
        _assert_same(_ours(x, labels, **options),
                     tripmine.lifted_structured_loss(x, labels, **options), np.float64, metric)


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_the_block_size_does_not_change_the_results(generalized, mode):
    rng = np.random.default_rng(30 + MODES.index(mode))
    x, labels, kw = _problem(rng, mode, n=31, m=23, classes=5)
    options = dict(generalized=generalized, reduction="none", **kw)
    whole = _ours(x, labels, **options)
    # 1 entry: a row per block and a pair per gather; 3 x M: uneven blocks of three rows
    m = x.shape[0] if "ref" not in kw else kw["ref"].shape[0]
    for block_elements in (1, 3 * m + 1):
        part = _ours(x, labels, block_elements=block_elements, **options)
        assert (part.n_terms, part.n_active) == (whole.n_terms, whole.n_active)
        for name in ("loss", "grad", "ref_grad"):
            if getattr(whole, name) is not None:
                _close(getattr(part, name), getattr(whole, name), TOLERANCE[np.float64], name)


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("case", ["one_class", "singletons", "empty", "one_row", "grad_off",
                                  "empty_ref", "empty_x_with_ref"])
def test_degenerate_batches_match_the_c_core(generalized, case):
    x = np.random.default_rng(9).standard_normal((6, 3))
    labels = np.arange(6) if case == "singletons" else np.zeros(6, int)
    kw = {}
    if case == "empty":
        x, labels = x[:0], labels[:0]
    elif case == "one_row":
        x, labels = x[:1], labels[:1]
    elif case == "empty_ref":
        kw = {"ref": np.zeros((0, 3)), "ref_labels": np.zeros(0, int)}
    elif case == "empty_x_with_ref":
        kw = {"ref": x, "ref_labels": np.arange(6) % 2}
        x, labels = x[:0], labels[:0]
    for reduction in ("mean", "none"):
        options = dict(generalized=generalized, reduction=reduction, grad=case != "grad_off",
                       **kw)
        got = _ours(x, labels, **options)
        _assert_same(got, tripmine.lifted_structured_loss(x, labels, **options), np.float64,
                     reduction)
        assert got.n_active == 0 and not np.any(got.loss)
        assert (got.grad is None) == (case == "grad_off")


def test_identical_rows_give_a_finite_gradient():
    x = np.ones((6, 4))
    x[3:] = -1.0
    labels = np.array([0, 0, 0, 1, 1, 1])
    for metric in METRICS:
        for generalized in FORMS:
            options = dict(metric=metric, generalized=generalized)
            _assert_same(_ours(x, labels, **options),
                         tripmine.lifted_structured_loss(x, labels, **options), np.float64,
                         f"{metric} {generalized}")


@pytest.mark.parametrize("generalized", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_far_negatives_do_not_underflow_the_sums(generalized, dtype):
    # e^(1 - d) underflows even in double at d ~ 1000: the sums are shifted logarithms
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((12, 4)) * 0.1).astype(dtype)
    labels = np.repeat([0, 1, 2], 4)
    x[labels == 1] += dtype(700.0)
    x[labels == 2] -= dtype(700.0)
    for reduction in ("mean", "none"):
        options = dict(generalized=generalized, reduction=reduction)
        want = tripmine.lifted_structured_loss(x, labels, **options)
        got = _ours(x, labels, **options)
        assert (got.n_terms, got.n_active) == (want.n_terms, want.n_active)
        _close(got.loss, want.loss, TOLERANCE[dtype] * 10, "loss")
        # the gradient is made of hinges ~ 1e3 times weights of order 1: compare on its scale
        assert np.all(np.isfinite(got.grad))
        _close(got.grad, want.grad, TOLERANCE[dtype] * 100, "grad")


def test_memory_stays_linear_in_the_batch():
    """N = M = 1500: the N x M float64 matrix would be 18 MB; blocks of 60,000 entries
    keep the peak near 5 MB (one block whole: 185 MB, about ten float64 N x M arrays)."""
    rng = np.random.default_rng(12)
    n, d = 1500, 8
    x = rng.standard_normal((n, d))
    labels = rng.integers(0, 100, n)
    for generalized in FORMS:
        tracemalloc.start()
        try:
            _ours(x, labels, generalized=generalized, block_elements=60_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < n * n * 8 / 2, peak
