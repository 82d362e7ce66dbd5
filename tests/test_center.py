"""Center loss and the paper's center update (tripmine.center) against loop references,
float64 finite differences, the array-module version the GPU runs, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tripmine
from tripmine import _core, _fused_center
from tripmine import center as tc


def _problem(rng, n=23, c=7, d=9, dtype=np.float64):
    x = rng.standard_normal((n, d)).astype(dtype)
    centers = rng.standard_normal((c, d)).astype(dtype)
    labels = rng.integers(0, c - 1, n)  # the last class has no sample
    return x, labels, centers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_loop_reference(dtype, reduction):
    rng = np.random.default_rng(0)
    x, labels, centers = _problem(rng, dtype=dtype)
    upstream = rng.uniform(0.1, 2.0, len(labels)) if reduction == "none" else None
    result = tripmine.center_loss(x, labels, centers, reduction=reduction, upstream=upstream)
    loss, per, grad, cgrad = reference.center_loss(x.astype(np.float64), labels,
                                                   centers.astype(np.float64), reduction,
                                                   upstream)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    if reduction == "none":
        np.testing.assert_allclose(result.loss, per, rtol=rtol)
    else:
        assert result.loss == pytest.approx(loss, rel=rtol)
    assert result.grad.dtype == dtype and result.centers_grad.dtype == dtype
    np.testing.assert_allclose(result.grad, grad, rtol=rtol, atol=1e-7 if dtype == np.float32
                               else 0)
    np.testing.assert_allclose(result.centers_grad, cgrad, rtol=rtol,
                               atol=1e-6 if dtype == np.float32 else 1e-15)
    assert not result.centers_grad[-1].any()  # the class without samples
    assert result.n_samples == len(labels)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_match_float64_finite_differences(reduction):
    rng = np.random.default_rng(1)
    x, labels, centers = _problem(rng, n=11, c=4, d=5)
    result = tripmine.center_loss(x, labels, centers, reduction=reduction)
    h = 1e-6
    for which, analytic in ((0, result.grad), (2, result.centers_grad)):
        for _ in range(3):
            direction = rng.standard_normal(analytic.shape)
            args = [x, labels, centers]
            plus, minus = list(args), list(args)
            plus[which] = args[which] + h * direction
            minus[which] = args[which] - h * direction
            numeric = (tripmine.center_loss(*plus, reduction=reduction, grad=False).loss -
                       tripmine.center_loss(*minus, reduction=reduction, grad=False).loss) / (2 * h)
            assert abs(np.sum(analytic * direction) - numeric) <= 1e-7 * (1 + abs(numeric))


def test_none_differentiates_the_weighted_sum():
    rng = np.random.default_rng(2)
    x, labels, centers = _problem(rng)
    w = rng.uniform(0, 3, len(labels))
    weighted = tripmine.center_loss(x, labels, centers, reduction="none", upstream=w)
    plain = tripmine.center_loss(x, labels, centers, reduction="none")
    np.testing.assert_array_equal(weighted.loss, plain.loss)
    np.testing.assert_allclose(weighted.grad, plain.grad * w[:, None], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_is_the_papers_rule(dtype):
    rng = np.random.default_rng(3)
    x, labels, centers = _problem(rng, dtype=dtype)
    before = centers.copy()
    expected = reference.update_centers(centers, x, labels, 0.5)
    out = tripmine.update_centers(centers, x, labels, alpha=0.5)
    assert out is centers and centers.dtype == dtype
    np.testing.assert_allclose(centers, expected, rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_array_equal(centers[-1], before[-1])  # no sample: untouched
    # The paper's 1 / (1 + n_j): a class with every sample at one point moves n_j / (1 + n_j)
    # of the way there with alpha = 1, never past it.
    point = np.ones((1, 9), dtype=dtype)
    c = np.zeros((2, 9), dtype=dtype)
    tripmine.update_centers(c, np.repeat(point, 3, axis=0), [1, 1, 1], alpha=1.0)
    np.testing.assert_allclose(c[1], 0.75, rtol=1e-7)
    assert not c[0].any()


def test_update_with_alpha_zero_or_no_samples_changes_nothing():
    rng = np.random.default_rng(4)
    x, labels, centers = _problem(rng)
    before = centers.copy()
    tripmine.update_centers(centers, x, labels, alpha=0.0)
    np.testing.assert_array_equal(centers, before)
    tripmine.update_centers(centers, np.zeros((0, 9)), np.zeros(0, dtype=np.int64))
    np.testing.assert_array_equal(centers, before)


def test_empty_batch_and_flags():
    centers = np.ones((3, 2))
    empty = tripmine.center_loss(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), centers)
    assert empty.loss == 0.0 and empty.grad.shape == (0, 2) and not empty.centers_grad.any()
    rng = np.random.default_rng(5)
    x, labels, centers = _problem(rng)
    bare = tripmine.center_loss(x, labels, centers, grad=False, centers_grad=False)
    assert bare.grad is None and bare.centers_grad is None
    assert bare.loss == tripmine.center_loss(x, labels, centers).loss


def test_float16_computes_in_float32():
    rng = np.random.default_rng(6)
    x, labels, centers = _problem(rng, dtype=np.float16)
    half = tripmine.center_loss(x, labels, centers)
    single = tripmine.center_loss(x.astype(np.float32), labels, centers.astype(np.float32))
    assert half.loss == single.loss and half.grad.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_the_thread_count(dtype):
    rng = np.random.default_rng(7)
    x, labels, centers = _problem(rng, n=3000, c=50, d=64, dtype=dtype)
    runs = []
    previous = tripmine.get_num_threads()
    try:
        for threads in (1, 2, 3):
            tripmine.set_num_threads(threads)
            r = tripmine.center_loss(x, labels, centers)
            c = centers.copy()
            tripmine.update_centers(c, x, labels)
            runs.append((r.loss, r.grad, r.centers_grad, c))
    finally:
        tripmine.set_num_threads(previous)
    for other in runs[1:]:
        assert other[0] == runs[0][0]
        for a, b in zip(other[1:], runs[0][1:]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_gpu_algorithm_matches_the_c_core(reduction):
    """tripmine._fused_center with NumPy (what the GPU runs with CuPy) against the C core:
    the update to the bit (the same double sums in the same order), the loss to rounding."""
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        x, labels, centers = _problem(rng, dtype=dtype)
        up = rng.uniform(0.5, 1.5, len(labels)) if reduction == "none" else None
        ours = tripmine.center_loss(x, labels, centers, reduction=reduction, upstream=up)
        loss, per, g, cg = _fused_center.center_loss(np, x, labels.astype(np.int64), centers,
                                                     reduction, True, True, up)
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(per if reduction == "none" else loss, ours.loss, rtol=tol)
        np.testing.assert_array_equal(g, ours.grad)
        np.testing.assert_allclose(cg, ours.centers_grad, rtol=tol, atol=tol)
        a, b = centers.copy(), centers.copy()
        tripmine.update_centers(a, x, labels)
        _fused_center.update_centers(np, b, x, labels.astype(np.int64), 0.5)
        np.testing.assert_array_equal(a, b)


# ---- bad input ---------------------------------------------------------------------------

def _bad_loss_cases():
    x = np.ones((4, 3))
    c = np.zeros((2, 3))
    good = np.array([0, 1, 1, 0])
    return [
        ("labels", (x, np.array([0, 1, 2, 0]), c), {}),
        ("labels", (x, np.array([0.0, 1.0, 1.0, 0.0]), c), {}),
        ("labels", (x, good[:3], c), {}),
        ("centers", (x, good, np.zeros((2, 4))), {}),
        ("centers", (x, good, np.zeros((0, 3))), {}),
        ("x", (np.full((4, 3), np.nan), good, c), {}),
        ("centers", (x, good, np.full((2, 3), np.inf)), {}),
        ("reduction", (x, good, c), {"reduction": "avg"}),
        ("upstream", (x, good, c), {"upstream": np.ones(4)}),
        ("upstream", (x, good, c), {"reduction": "none", "upstream": np.ones(3)}),
    ]


@pytest.mark.parametrize("name, args, kw", _bad_loss_cases(),
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(_bad_loss_cases())])
def test_bad_loss_input_raises_value_error_naming_the_argument(name, args, kw):
    copies = [np.array(a, copy=True) for a in args]
    with pytest.raises(ValueError, match=name):
        tripmine.center_loss(*args, **kw)
    for a, b in zip(args, copies):
        np.testing.assert_array_equal(a, b)


def test_bad_update_input_raises_and_leaves_the_centers_unchanged():
    x = np.ones((4, 3))
    labels = np.array([0, 1, 1, 0])
    centers = np.zeros((2, 3))
    for kw, match in (({"alpha": -0.1}, "alpha"), ({"alpha": float("nan")}, "alpha")):
        with pytest.raises(ValueError, match=match):
            tripmine.update_centers(centers, x, labels, **kw)
    with pytest.raises(ValueError, match="labels"):
        tripmine.update_centers(centers, x, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="centers"):
        tripmine.update_centers(np.zeros((2, 4)), x, labels)
    frozen = np.zeros((2, 3))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        tripmine.update_centers(frozen, x, labels)
    with pytest.raises(ValueError, match="C-contiguous"):
        tripmine.update_centers(np.zeros((3, 2)).T, x, labels)
    with pytest.raises(ValueError, match="float32 or float64"):
        tripmine.update_centers(np.zeros((2, 3), dtype=np.float16), x, labels)
    with pytest.raises(ValueError, match="shares memory"):
        both = np.zeros((6, 3))
        tripmine.update_centers(both[:2], both[1:5], labels)  # row 1 is in both
    with pytest.raises(ValueError, match="range of centers' dtype"):
        tripmine.update_centers(np.zeros((2, 3), np.float32), np.full((4, 3), 1e300), labels)
    with pytest.raises(TypeError, match="NumPy array"):
        tripmine.update_centers([[0.0, 0.0, 0.0]], x, np.zeros(4, dtype=np.int64))
    assert not centers.any()


def test_reaches_the_c_core_with_its_own_guard():
    """Below the Python checks the C core refuses bad labels, alpha and overlap itself."""
    x = np.ones((2, 3))
    c = np.zeros((2, 3))
    with pytest.raises(ValueError):
        _core.center_loss(x, np.array([0, 5]), c, "mean", True, True)
    with pytest.raises(ValueError):
        _core.update_centers(c, x, np.array([0, 1]), -1.0)
    with pytest.raises(ValueError):
        _core.update_centers(c, c, np.array([0, 1]), 0.5)
    assert not c.any()


def test_is_exported():
    assert tripmine.center_loss is tc.center_loss and tripmine.update_centers is tc.update_centers


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float64),
                                    (np.float64, np.float32), (np.float32, np.float64)])
def test_update_keyword_is_the_two_calls_in_one(dtypes):
    rng = np.random.default_rng(40)
    x = rng.standard_normal((30, 6)).astype(dtypes[0])
    labels = rng.integers(0, 5, 30)
    centers = rng.standard_normal((5, 6)).astype(dtypes[1])
    expected_centers = centers.copy()
    want = tripmine.center_loss(x, labels, expected_centers)
    tripmine.update_centers(expected_centers, x, labels, alpha=0.3)
    got = tripmine.center_loss(x, labels, centers, update=0.3)
    assert got.loss == want.loss  # from the centers as they were
    np.testing.assert_array_equal(got.grad, want.grad)
    np.testing.assert_array_equal(got.centers_grad, want.centers_grad)
    np.testing.assert_array_equal(centers, expected_centers)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(update=-0.5), ValueError, "update"),
    (dict(update=True), TypeError, "update"),
    (dict(update=np.nan), ValueError, "update"),
    (dict(read_only=True), ValueError, "read-only"),
    (dict(labels_out=True), ValueError, "labels"),
    (dict(nan_x=True), ValueError, "x"),
])
def test_update_keyword_refuses_without_writing(bad, exc, match):
    rng = np.random.default_rng(41)
    x = rng.standard_normal((12, 4))
    labels = rng.integers(0, 3, 12)
    centers = rng.standard_normal((3, 4))
    if bad.get("labels_out"):
        labels[2] = 7
    if bad.get("nan_x"):
        x[1, 1] = np.nan
    if bad.get("read_only"):
        centers.flags.writeable = False
    before_x, before_c = x.copy(), centers.copy()
    with pytest.raises(exc, match=match):
        tripmine.center_loss(x, labels, centers, update=bad.get("update", 0.5))
    np.testing.assert_array_equal(x, before_x)
    np.testing.assert_array_equal(centers, before_c)


def test_update_keyword_refuses_x_sharing_memory_with_centers():
    centers = np.random.default_rng(42).standard_normal((4, 3))
    before = centers.copy()
    with pytest.raises(ValueError, match="shares memory"):
        tripmine.center_loss(centers, np.arange(4), centers, update=0.5)
    np.testing.assert_array_equal(centers, before)
