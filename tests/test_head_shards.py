"""A margin-softmax head split into shards of classes (tm_softmax_head_shard, tripmine._sharded,
and the GPU path's array-module walk with ``shard=True``), without torch: the shards'
statistics, combined, and their gradient parts, added up, are the single head's results.
"""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from tripmine import _core, _fused_heads, _sharded, heads

HEADS = {"softmax": (heads.softmax_loss, {}),
         "normface": (heads.normface_loss, dict(scale=6.0)),
         "cosface": (heads.cosface_loss, dict(scale=8.0, margin=0.3)),
         "arcface": (heads.arcface_loss, dict(scale=8.0, margin=0.5)),
         "arcface-easy": (heads.arcface_loss, dict(scale=8.0, margin=0.5, easy_margin=True)),
         "combined": (heads.combined_margin_loss, dict(scale=7.0, m1=1.2, m2=0.3, m3=0.1,
                                                        straight_through=True)),
         "sphereface": (heads.sphereface_loss, dict(margin=4, lambda_=0.2)),
         "lsoftmax": (heads.large_margin_softmax_loss, dict(margin=3))}
SPEC_OPTIONS = {"arcface-easy": "arcface"}


def _spec(name: str) -> dict:
    kind = SPEC_OPTIONS.get(name, name)
    return heads.HEAD_PARAMETERS[kind](**HEADS[name][1])


def _problem(seed: int, dtype, n=29, d=7, c=17):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    weight = rng.standard_normal((c, d)).astype(dtype)
    labels = rng.integers(0, c, n)
    bias = rng.standard_normal(c).astype(dtype)
    return x, labels, weight, bias


def _sharded_run(spec, x, labels, weight, bias, shards, class_weight=None, calls=None):
    """The split computation over ``shards`` (lists of class ids, in increasing order):
    (loss with "mean", grad, weight_grad, bias_grad, n_correct)."""
    calls = calls or (_sharded.statistics, _sharded.gradients)
    tables, local = [], []
    for classes in shards:
        rows = _sharded.local_labels(labels, classes)
        b = None if bias is None else bias[classes]
        local.append((rows, weight[classes], b))
        tables.append(calls[0](spec, x, rows, weight[classes], b, classes))
    combined = _sharded.combine(np.stack(tables), labels, class_weight)
    cw = np.ones(len(labels)) if class_weight is None else class_weight[labels]
    loss = combined.per_sample.sum() / cw.sum()
    gain = cw / cw.sum()
    grad = np.zeros(x.shape)
    weight_grad = np.zeros(weight.shape)
    bias_grad = np.zeros(weight.shape[0])
    for classes, (rows, w, b) in zip(shards, local):
        g, wg, bg = calls[1](spec, x, rows, w, b, combined.lse, gain, True, True)
        grad += g
        weight_grad[classes] = wg
        if bg is not None:
            bias_grad[classes] = bg
    return loss, grad, weight_grad, bias_grad, int(combined.correct.sum())


def _close(got, want, dtype):
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


SPLITS = {"one": [0, 17], "two": [0, 9, 17], "uneven": [0, 1, 2, 10, 17]}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", list(HEADS))
def test_shards_add_up_to_the_head(name, split, dtype):
    function, options = HEADS[name]
    x, labels, weight, bias = _problem(len(name) + len(split), dtype)
    bias = bias if name == "softmax" else None
    class_weight = np.random.default_rng(3).uniform(0.2, 2.0, weight.shape[0])
    kw = {"bias": bias} if bias is not None else {}
    want = function(x, labels, weight, class_weight=class_weight, **kw, **options)
    bounds = SPLITS[split]
    shards = [np.arange(a, b) for a, b in zip(bounds, bounds[1:])]
    loss, grad, wgrad, bgrad, correct = _sharded_run(_spec(name), x, labels, weight, bias,
                                                     shards, class_weight)
    assert loss == pytest.approx(want.loss, rel=1e-12 if dtype == np.float64 else 1e-6)
    _close(grad, want.grad, dtype)
    _close(wgrad, want.weight_grad, dtype)
    if bias is not None:
        _close(bgrad, want.bias_grad, dtype)
    assert correct == want.n_correct


@pytest.mark.parametrize("name", ["arcface", "softmax", "lsoftmax"])
def test_sampled_shards_are_the_head_on_the_kept_classes(name):
    """Partial FC: shards holding any sorted subset of their classes."""
    function, options = HEADS[name]
    x, labels, weight, bias = _problem(7, np.float64)
    bias = bias if name == "softmax" else None
    rng = np.random.default_rng(1)
    keep = np.union1d(labels, rng.choice(17, 5, replace=False))
    shards = [keep[keep < 8], keep[keep >= 8]]
    kw = {"bias": bias[keep]} if bias is not None else {}
    want = function(x, np.searchsorted(keep, labels), weight[keep], **kw, **options)
    loss, grad, wgrad, bgrad, correct = _sharded_run(_spec(name), x, labels, weight, bias,
                                                     shards)
    assert loss == pytest.approx(want.loss, rel=1e-12)
    _close(grad, want.grad, np.float64)
    _close(wgrad[keep], want.weight_grad, np.float64)
    assert not wgrad[np.setdiff1d(np.arange(17), keep)].any()
    assert correct == want.n_correct


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(HEADS))
def test_the_gpu_walk_matches_the_c_core(name, dtype):
    """The array-module walk (the CuPy path's algorithm) with NumPy, against the C core."""
    x, labels, weight, bias = _problem(11, dtype)
    bias = bias if name == "softmax" else None
    spec = _spec(name)

    def statistics(spec, x, rows, w, b, classes):
        table = _fused_heads.fused_head(np, spec, x, rows, w, b, None, "none", False, False,
                                        block=3, shard=True)
        table[:, 3] = classes[table[:, 3].astype(np.int64)]
        return table

    def gradients(spec, x, rows, w, b, lse, gain, want_grad, want_wgrad):
        out = _fused_heads.fused_head(np, spec, x, rows, w, b, None, "none", want_grad,
                                      want_wgrad, gain, 3, shard=True, lse_in=lse)
        return out[3], out[4], out[5]

    shards = [np.arange(0, 6), np.arange(6, 17)]
    c_core = _sharded_run(spec, x, labels, weight, bias, shards)
    walk = _sharded_run(spec, x, labels, weight, bias, shards, calls=(statistics, gradients))
    assert walk[0] == pytest.approx(c_core[0], rel=1e-12 if dtype == np.float64 else 1e-6)
    for got, want in zip(walk[1:4], c_core[1:4]):
        _close(got, want, dtype)
    assert walk[4] == c_core[4]


def test_statistics_of_a_shard():
    x, labels, weight, _ = _problem(2, np.float64, n=6, c=5)
    spec = _spec("cosface")
    rows = np.array([0, -1, 2, -1, 4, 1])
    table = _core.softmax_head_shard(spec, x, rows, weight, None)
    full = heads.cosface_loss(x, np.where(rows >= 0, rows, 0), weight, reduction="none",
                              **HEADS["cosface"][1])
    assert table.shape == (6, 4)
    held = rows >= 0
    np.testing.assert_allclose(table[held, 0], full.loss[held] + table[held, 1], rtol=1e-13)
    assert not table[~held, 1].any()  # no target logit where the target lies elsewhere
    # The best plain logit and its row: the cosines times the scale.
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    unit_w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    logits = 8.0 * unit_x @ unit_w.T
    np.testing.assert_allclose(table[:, 2], logits.max(1), rtol=1e-13)
    np.testing.assert_array_equal(table[:, 3], logits.argmax(1))


def test_thread_count_does_not_change_a_bit():
    x, labels, weight, _ = _problem(4, np.float32, n=300, d=40, c=700)
    spec = _spec("arcface")
    shards = [np.arange(0, 350), np.arange(350, 700)]
    runs = []
    before = tripmine.get_num_threads()
    try:
        for threads in (1, 2):
            tripmine.set_num_threads(threads)
            runs.append(_sharded_run(spec, x, labels, weight, None, shards))
    finally:
        tripmine.set_num_threads(before)
    for a, b in zip(runs[0][1:4], runs[1][1:4]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][0] == runs[1][0]


@pytest.mark.parametrize("case", ["label_below", "label_above", "lse_nan", "gain_inf",
                                  "first_with_grad", "second_without_outputs",
                                  "second_with_partial"])
def test_the_c_core_refuses_bad_arguments(case):
    x, labels, weight, _ = _problem(5, np.float64, n=4, c=3)
    rows = np.array([0, -1, 2, 1])
    spec = _spec("arcface")
    params = _core._head_params(spec)
    lse, gain = np.zeros(4), np.ones(4)
    partial = np.empty((4, 4))
    grad, wgrad = np.empty_like(x), np.empty_like(weight)
    p = _core._ptr
    if case == "label_below":
        rows = np.array([0, -2, 2, 1])
    elif case == "label_above":
        rows = np.array([0, 3, 2, 1])
    elif case == "lse_nan":
        lse[1] = np.nan
    elif case == "gain_inf":
        gain[2] = np.inf
    args = {
        "label_below": (None, None, partial, None, None),
        "label_above": (None, None, partial, None, None),
        "lse_nan": (lse, gain, None, grad, None),
        "gain_inf": (lse, gain, None, grad, wgrad),
        "first_with_grad": (None, None, partial, grad, None),
        "second_without_outputs": (lse, gain, None, None, None),
        "second_with_partial": (lse, gain, partial, grad, None),
    }[case]
    status = _core.lib.tm_softmax_head_shard_f64(
        params, p(x), 4, x.shape[1], p(rows), p(weight), 3, _core.ffi.NULL, p(args[0]),
        p(args[1]), p(args[2]), p(args[3]), p(args[4]), _core.ffi.NULL)
    assert status == _core.lib.TM_ERR_INVALID


def test_local_labels():
    classes = np.array([2, 5, 9])
    np.testing.assert_array_equal(_sharded.local_labels(np.array([9, 0, 5, 2, 10, 3]), classes),
                                  [2, -1, 1, 0, -1, -1])
    np.testing.assert_array_equal(_sharded.local_labels(np.array([1, 2]),
                                                        np.empty(0, dtype=np.int64)), [-1, -1])
