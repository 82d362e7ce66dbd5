"""The margin-softmax heads (tripmine.heads) against the loop reference, float64 finite
differences and pure-torch autograd; their corners, threads and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference
import tripmine
from tripmine import heads

#: (reference kind, function, keyword arguments): every head, with non-default options.
HEADS = [
    ("softmax", heads.softmax_loss, {}),
    ("normface", heads.normface_loss, {"scale": 4.0}),
    ("cosface", heads.cosface_loss, {"scale": 4.0, "margin": 0.35}),
    ("arcface", heads.arcface_loss, {"scale": 4.0, "margin": 0.5}),
    ("arcface", heads.arcface_loss, {"scale": 4.0, "margin": 0.5, "easy_margin": True}),
    ("combined", heads.combined_margin_loss, {"scale": 4.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("combined", heads.combined_margin_loss, {"scale": 3.0, "m1": 1.35, "m2": 0.2, "m3": 0.1}),
    ("sphereface", heads.sphereface_loss, {"margin": 4}),
    ("sphereface", heads.sphereface_loss, {"margin": 3, "lambda_": 2.0}),
    ("lsoftmax", heads.large_margin_softmax_loss, {"margin": 2}),
    ("lsoftmax", heads.large_margin_softmax_loss, {"margin": 4, "lambda_": 5.0}),
]
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for kind, _, kw in HEADS]


def _ref_params(kw):
    """The reference's spelling of a head's options (``margin`` for the additive margins)."""
    return dict(kw)


def _problem(rng, n, c, d, dtype=np.float64, weight_scale=0.3):
    x = rng.standard_normal((n, d)).astype(dtype)
    w = (weight_scale * rng.standard_normal((c, d))).astype(dtype)
    labels = rng.integers(0, c, n)
    return x, labels, w


@pytest.mark.parametrize("kind, fn, kw", HEADS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_accuracy_match_the_loop_reference(kind, fn, kw, dtype, reduction):
    rng = np.random.default_rng(7)
    x, labels, w = _problem(rng, 23, 41, 12, dtype)
    class_weight = rng.uniform(0.2, 2.0, 41)
    for cw in (None, class_weight):
        result = fn(x, labels, w, class_weight=cw, reduction=reduction, **kw)
        expected, per_sample, correct = reference.head_loss(
            kind, x.astype(np.float64), labels, w.astype(np.float64), class_weight=cw,
            reduction=reduction, **_ref_params(kw))
        rtol = 1e-11 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(result.loss, expected, rtol=rtol, atol=rtol)
        assert result.n_samples == 23
        if dtype == np.float64:
            assert result.n_correct == correct
        assert result.accuracy == result.n_correct / 23
        assert result.grad.dtype == dtype and result.weight_grad.dtype == dtype
        assert result.bias_grad is None


@pytest.mark.parametrize("kind, fn, kw", [HEADS[0], HEADS[3], HEADS[9]],
                         ids=[IDS[0], IDS[3], IDS[9]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_isa_matches_the_reference_and_the_portable_kernels(isa, kind, fn, kw, dtype):
    """Each instruction set's micro-kernels and transposing pack of W (full panels of NR
    rows and a partial last one: 75 classes), against the loop reference and against the
    portable kernel set's gradients."""
    from tripmine import _core
    rng = np.random.default_rng(21)
    x, labels, w = _problem(rng, 30, 75, 37, dtype)
    result = fn(x, labels, w, **kw)
    expected, _, _ = reference.head_loss(kind, x.astype(np.float64), labels,
                                         w.astype(np.float64), **_ref_params(kw))
    rtol = 1e-11 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(result.loss, expected, rtol=rtol)
    previous = _core.get_isa()
    _core.set_isa("generic")
    try:
        portable = fn(x, labels, w, **kw)
    finally:
        _core.set_isa(previous)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for got, want in ((result.grad, portable.grad), (result.weight_grad, portable.weight_grad)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def _directional(fn, args, kw, which, direction, h=1e-6):
    def at(t):
        moved = list(args)
        moved[which] = args[which] + t * direction
        return fn(*moved, grad=False, **kw).loss
    return (at(h) - at(-h)) / (2 * h)


@pytest.mark.parametrize("kind, fn, kw", HEADS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_match_float64_finite_differences(kind, fn, kw, reduction):
    rng = np.random.default_rng(11)
    x, labels, w = _problem(rng, 17, 29, 10)
    cw = rng.uniform(0.5, 1.5, 29)
    call_kw = dict(kw, class_weight=cw, reduction="sum" if reduction == "none" else reduction)
    result = fn(x, labels, w, **call_kw)
    if reduction == "none":  # the gradient of the per-sample losses' sum
        assert np.array_equal(fn(x, labels, w, **dict(call_kw, reduction="none")).grad,
                              result.grad)
    for which, analytic in ((0, result.grad), (2, result.weight_grad)):
        for _ in range(3):
            direction = rng.standard_normal(analytic.shape)
            numeric = _directional(fn, (x, labels, w), call_kw, which, direction)
            assert abs(np.sum(analytic * direction) - numeric) <= 1e-6 * (1 + abs(numeric)), \
                (which, numeric)


def test_softmax_bias_gradient_and_weighted_mean():
    rng = np.random.default_rng(3)
    x, labels, w = _problem(rng, 30, 12, 6)
    bias = rng.standard_normal(12)
    cw = rng.uniform(0.0, 2.0, 12)
    result = heads.softmax_loss(x, labels, w, bias=bias, class_weight=cw)
    expected, _, _ = reference.head_loss("softmax", x, labels, w, bias=bias, class_weight=cw)
    assert result.loss == pytest.approx(expected, rel=1e-12)
    for _ in range(3):
        direction = rng.standard_normal(12)
        numeric = (heads.softmax_loss(x, labels, w, bias=bias + 1e-6 * direction,
                                      class_weight=cw, grad=False).loss -
                   heads.softmax_loss(x, labels, w, bias=bias - 1e-6 * direction,
                                      class_weight=cw, grad=False).loss) / 2e-6
        assert np.sum(result.bias_grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_straight_through_changes_only_the_gradient():
    rng = np.random.default_rng(5)
    x, labels, w = _problem(rng, 20, 15, 8)
    exact = heads.arcface_loss(x, labels, w, scale=8.0)
    through = heads.arcface_loss(x, labels, w, scale=8.0, straight_through=True)
    assert through.loss == exact.loss
    assert not np.allclose(through.grad, exact.grad)
    # dz_y/dcos = s: the gradient NormFace would give with the margin's probabilities.
    assert np.all(np.isfinite(through.grad)) and np.all(np.isfinite(through.weight_grad))


@pytest.mark.parametrize("kind, fn, kw", HEADS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_are_finite_at_cos_plus_minus_one_and_zero_vectors(kind, fn, kw, dtype):
    rng = np.random.default_rng(2)
    x, labels, w = _problem(rng, 8, 6, 5, dtype)
    x[0] = w[labels[0]] * 3          # theta = 0 exactly (cos = 1)
    x[1] = -2 * w[labels[1]]         # theta = pi
    x[2] = 0                         # a zero embedding
    w[labels[3]] = 0                 # a zero class vector
    result = fn(x, labels, w, **kw)
    assert math.isfinite(result.loss)
    assert np.all(np.isfinite(result.grad)) and np.all(np.isfinite(result.weight_grad))
    assert not np.any(result.grad[2]) or kind in ("softmax", "lsoftmax", "sphereface")


@pytest.mark.parametrize("kind, fn, kw", HEADS[:4] + HEADS[7:8], ids=IDS[:4] + IDS[7:8])
def test_results_do_not_depend_on_the_thread_count(kind, fn, kw):
    """Several forward and class blocks (C > one block at d = 256), any thread count:
    the same bits."""
    rng = np.random.default_rng(9)
    x, labels, w = _problem(rng, 530, 700, 256, np.float32)
    before = tripmine.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            tripmine.set_num_threads(threads)
            results.append(fn(x, labels, w, **kw))
    finally:
        tripmine.set_num_threads(before)
    for other in results[1:]:
        assert other.loss == results[0].loss
        assert np.array_equal(other.grad, results[0].grad)
        assert np.array_equal(other.weight_grad, results[0].weight_grad)
        assert other.n_correct == results[0].n_correct


def test_many_blocks_match_the_reference():
    """Rows and classes spanning several blocks of each walk, in both precisions."""
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        x, labels, w = _problem(rng, 530, 700, 256, dtype, weight_scale=0.05)
        cw = rng.uniform(0.5, 2.0, 700)
        result = heads.cosface_loss(x, labels, w, scale=10.0, class_weight=cw,
                                    reduction="none")
        expected, _, _ = reference.head_loss("cosface", x[:60].astype(np.float64), labels[:60],
                                             w.astype(np.float64), class_weight=cw,
                                             reduction="none", scale=10.0, margin=0.35)
        np.testing.assert_allclose(result.loss[:60], expected,
                                   rtol=1e-11 if dtype == np.float64 else 1e-4)


def test_gradient_matches_dense_numpy_for_many_blocks():
    rng = np.random.default_rng(6)
    x, labels, w = _problem(rng, 530, 700, 256, np.float64, weight_scale=0.05)
    result = heads.softmax_loss(x, labels, w)
    z = x @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(530), labels] -= 1
    p /= 530
    np.testing.assert_allclose(result.grad, p @ w, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.weight_grad, p.T @ x, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_logits_flush_only_gradients_below_the_normal_range(dtype):
    """Logits spread over hundreds (unnormalised weights of std 1): g e^(z - lse) falls
    below the dtype's normal range for many classes, and the C core flushes those terms of
    G to zero (subnormal operands are slow on x86).  The gradients still match the dense
    float64 ones to the precision of the logits."""
    rng = np.random.default_rng(12)
    n, c, d = 64, 300, 512
    x, labels, w = _problem(rng, n, c, d, np.float64, weight_scale=1.0)
    if dtype == np.float64:
        x, w = 2.2 * x, 2.2 * w  # gaps past 708, where float64's exponentials go subnormal
    z = x @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(n), labels] -= 1
    p /= n
    tiny = np.finfo(dtype).tiny
    g = p[p != 0]
    assert (np.abs(g) < tiny).any(), "the problem must reach the subnormal range"
    result = heads.softmax_loss(x.astype(dtype), labels, w.astype(dtype))
    # float32 logits of magnitude ~500 carry absolute errors ~3e-5, so p and both
    # gradients agree to ~1e-4 of their largest entry; flushed terms are 1e-38 or less.
    eps = 1e-4 if dtype == np.float32 else 1e-11
    for got, want in ((result.grad, p @ w), (result.weight_grad, p.T @ x)):
        np.testing.assert_allclose(got, want, rtol=0, atol=eps * np.abs(want).max())


def test_the_calling_threads_subnormal_mode_is_restored():
    """The products run with flush-to-zero (MXCSR) and put the caller's mode back: NumPy
    arithmetic after a call still produces subnormals."""
    rng = np.random.default_rng(3)
    x, labels, w = _problem(rng, 300, 500, 64, np.float32, weight_scale=1.0)
    tiny = np.array([1e-40], dtype=np.float32)
    assert (tiny * np.float32(0.5))[0] != 0
    heads.softmax_loss(x, labels, w)
    assert (tiny * np.float32(0.5))[0] != 0 and (tiny + tiny)[0] > tiny[0]


def test_float16_computes_in_float32():
    rng = np.random.default_rng(8)
    x, labels, w = _problem(rng, 10, 7, 4, np.float16)
    result = heads.arcface_loss(x, labels, w, scale=4.0)
    as32 = heads.arcface_loss(x.astype(np.float32), labels, w.astype(np.float32), scale=4.0)
    assert result.loss == as32.loss and result.grad.dtype == np.float32


def test_empty_batch_and_grad_flags():
    w = np.ones((5, 3))
    empty = heads.cosface_loss(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), w)
    assert empty.loss == 0.0 and empty.n_samples == 0 and empty.accuracy == 0.0
    assert empty.grad.shape == (0, 3) and not empty.weight_grad.any()
    rng = np.random.default_rng(0)
    x, labels, w = _problem(rng, 6, 5, 3)
    bare = heads.cosface_loss(x, labels, w, grad=False)
    assert bare.grad is None and bare.weight_grad is None
    no_w = heads.cosface_loss(x, labels, w, weight_grad=False)
    full = heads.cosface_loss(x, labels, w)
    assert no_w.weight_grad is None and np.array_equal(no_w.grad, full.grad)
    assert bare.loss == full.loss == no_w.loss


def test_all_zero_class_weights_give_zero_not_nan():
    rng = np.random.default_rng(1)
    x, labels, w = _problem(rng, 6, 4, 3)
    result = heads.softmax_loss(x, labels, w, class_weight=np.zeros(4))
    assert result.loss == 0.0 and not result.grad.any() and not result.weight_grad.any()


# ---- bad input ------------------------------------------------------------------------

def _bad_calls():
    rng = np.random.default_rng(0)
    x, labels, w = _problem(rng, 6, 5, 3)
    yield "labels", heads.softmax_loss, (x, np.array([0, 1, 2, 3, 4, 5]), w), {}
    yield "labels", heads.softmax_loss, (x, np.array([0, 1, 2, 3, 4, -1]), w), {}
    yield "labels", heads.softmax_loss, (x, labels.astype(np.float64), w), {}
    yield "labels", heads.softmax_loss, (x, labels[:5], w), {}
    yield "weight", heads.softmax_loss, (x, labels, w[:, :2]), {}
    yield "class_weight", heads.softmax_loss, (x, labels, w), {"class_weight": -np.ones(5)}
    yield "class_weight", heads.softmax_loss, (x, labels, w), {"class_weight": np.ones(4)}
    yield "class_weight", heads.softmax_loss, (x, labels, w), \
        {"class_weight": np.array([1, 1, np.nan, 1, 1])}
    yield "bias", heads.softmax_loss, (x, labels, w), {"bias": np.ones(3)}
    yield "scale", heads.cosface_loss, (x, labels, w), {"scale": float("inf")}
    yield "scale", heads.arcface_loss, (x, labels, w), {"scale": 0.0}
    yield "margin", heads.cosface_loss, (x, labels, w), {"margin": float("nan")}
    yield "margin", heads.cosface_loss, (x, labels, w), {"margin": -0.1}
    yield "margin", heads.arcface_loss, (x, labels, w), {"margin": 4.0}
    yield "m1", heads.combined_margin_loss, (x, labels, w), {"m1": 0.0}
    yield "m2", heads.combined_margin_loss, (x, labels, w), {"m2": -1.0}
    yield "m3", heads.combined_margin_loss, (x, labels, w), {"m3": float("inf")}
    yield "margin", heads.sphereface_loss, (x, labels, w), {"margin": 1.5}
    yield "margin", heads.sphereface_loss, (x, labels, w), {"margin": 0}
    yield "margin", heads.large_margin_softmax_loss, (x, labels, w), {"margin": "2"}
    yield "lambda_", heads.sphereface_loss, (x, labels, w), {"lambda_": -1.0}
    yield "reduction", heads.softmax_loss, (x, labels, w), {"reduction": "mean_nonzero"}
    yield "x", heads.softmax_loss, (np.full((6, 3), np.nan), labels, w), {}
    yield "weight", heads.softmax_loss, (x, labels, np.full((5, 3), np.inf)), {}


@pytest.mark.parametrize("name, fn, args, kw", list(_bad_calls()),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_calls())])
def test_bad_input_raises_value_error_naming_the_argument(name, fn, args, kw):
    copies = [np.array(a, copy=True) for a in args]
    kw_copies = {k: np.array(v, copy=True) for k, v in kw.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match=name):
        fn(*args, **kw)
    for before, after in zip(copies, args):
        assert np.array_equal(before, after, equal_nan=True)
    for k, before in kw_copies.items():
        assert np.array_equal(before, kw[k], equal_nan=True)


def test_reaches_the_c_core_with_its_own_guard():
    """The C core refuses what the Python layer would have caught (defence in depth)."""
    from tripmine import _core
    x = np.ones((2, 3))
    w = np.ones((4, 3))
    with pytest.raises(ValueError):
        _core.softmax_head({"kind": "sphereface", "margin": 0}, x,
                           np.zeros(2, dtype=np.int64), w, None, None, "mean", True, True)
    with pytest.raises(ValueError):
        _core.softmax_head({"kind": "softmax"}, x, np.array([0, 4], dtype=np.int64), w, None,
                           None, "mean", True, True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_scale_and_margin_where_the_target_leads(dtype):
    """The running max is the exact max with the margin in place: at scale 1000 a margin
    logit 1300 below the plain one must not underflow every exponential."""
    rng = np.random.default_rng(0)
    x, labels, w = _problem(rng, 5, 3, 4)
    labels = np.arange(5) % 3
    x[:3] = 2 * w[labels[:3]]  # the target's plain logit leads its row
    kw = dict(scale=1000.0, m1=1.0, m2=0.3, m3=1.0)
    result = heads.combined_margin_loss(x.astype(dtype), labels, w.astype(dtype), **kw)
    expected, _, _ = reference.head_loss("combined", x, labels, w, **kw)
    # acos is ill-conditioned at cos = 1: a rounding of 1e-16 in cos moves theta by 1.5e-8
    # and the logit by scale * sin(m2) * 1.5e-8 = 4e-6, in the reference as in tripmine.
    assert result.loss == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-8)
    assert np.isfinite(result.grad).all() and np.isfinite(result.weight_grad).all()


# ---- the GPU path's algorithm, run with NumPy ------------------------------------------

@pytest.mark.parametrize("kind, fn, kw", HEADS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_gpu_algorithm_matches_the_c_core(monkeypatch, kind, fn, kw, reduction):
    """tripmine._fused_heads (what the CuPy path runs, on cuBLAS) computed with NumPy equals
    the C core on the same validated inputs, for several class blocks; the CuPy run itself
    is tests/test_gpu.py's."""
    from tripmine import _core, _fused_heads

    seen = {}
    real = _core.softmax_head

    def spy(head, x, labels, weight, bias, cw, red, want_grad, want_wgrad, upstream=None):
        seen.update(head=head, args=(x, labels, weight, bias, cw, red, want_grad, want_wgrad,
                                     upstream))
        return real(head, x, labels, weight, bias, cw, red, want_grad, want_wgrad,
                    upstream=upstream)

    monkeypatch.setattr(_core, "softmax_head", spy)
    rng = np.random.default_rng(21)
    x, labels, w = _problem(rng, 37, 50, 9)
    x[0] = 2 * w[labels[0]]  # cos = 1
    cw = rng.uniform(0.5, 1.5, 50)
    bias = rng.standard_normal(50) if kind == "softmax" else None
    extra = {"bias": bias} if bias is not None else {}
    upstream = rng.uniform(0, 2, 37) if reduction == "none" else None
    ours = fn(x, labels, w, class_weight=cw, reduction=reduction, upstream=upstream, **kw,
              **extra)
    x_c, labels_c, w_c, b_c, cw_c, red, want_grad, want_wgrad, up = seen["args"]
    got = _fused_heads.fused_head(np, seen["head"], x_c, labels_c, w_c, b_c, cw_c, red,
                                  want_grad, want_wgrad, up, block=16)
    loss, per, correct, g, wg, bg = got
    np.testing.assert_allclose(loss if reduction != "none" else per, ours.loss, rtol=1e-10)
    assert correct == ours.n_correct
    np.testing.assert_allclose(g, ours.grad, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(wg, ours.weight_grad, rtol=1e-8, atol=1e-12)
    if bias is not None:
        np.testing.assert_allclose(bg, ours.bias_grad, rtol=1e-8, atol=1e-12)
