"""The GPU path against the C core, op by op, on the same inputs.

Run on a machine with a CUDA GPU and CuPy (``pip install cupy-cuda12x``)::

    python -m pytest -q tests/test_gpu.py

Skipped cleanly elsewhere.  float64: identical triplets (the distances agree
to rounding and the tie-breaks, RNG stream and sampling are the C core's);
float32: quasi-equality (a differing index must be a tie within tolerance);
losses and gradients: allclose.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import tripmine

cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
try:
    _devices = cp.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver, no device
    pytest.skip(f"no usable CUDA device: {exc}", allow_module_level=True)
if _devices == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

RTOL = {np.float32: 2e-4, np.float64: 1e-10}
ATOL = {np.float32: 2e-5, np.float64: 1e-12}


def batch(seed=0, n=64, d=16, classes=6, dtype=np.float64, unit=False, ties=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if ties and n > 10:
        x[7] = x[3]
        x[9] = x[3]
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype), rng.integers(0, classes, size=n)


def to_gpu(*arrays):
    return tuple(None if a is None else cp.asarray(a) for a in arrays)


def host(value):
    return cp.asnumpy(value) if isinstance(value, cp.ndarray) else value


def assert_same_triplets(gpu, cpu):
    for g, c in zip(gpu, cpu):
        assert isinstance(g, cp.ndarray) and g.dtype == np.int64
        np.testing.assert_array_equal(host(g), c)


def assert_quasi_same(gpu, cpu, x, ref, metric, rtol=1e-4):
    """float32: the chosen rows may differ only where distances tie within tolerance."""
    dist = tripmine.pairwise_distances(x.astype(np.float64), None if ref is None else
                                       ref.astype(np.float64), metric=metric)
    g = [host(a) for a in gpu]
    assert len(g[0]) == len(cpu[0]) or abs(len(g[0]) - len(cpu[0])) <= len(cpu[0]) // 50 + 1
    if len(g[0]) == len(cpu[0]):
        np.testing.assert_array_equal(g[0], cpu[0])
        for role in (1, 2):
            np.testing.assert_allclose(dist[g[0], g[role]], dist[cpu[0], cpu[role]],
                                       rtol=rtol, atol=1e-5)


MODES = ["self", "ref"]


def make(mode, dtype, seed=0, unit=False, n=64):
    x, y = batch(seed, n=n, dtype=dtype, unit=unit)
    if mode == "self":
        return x, y, None, None
    r, ry = batch(seed + 100, n=n - 11, dtype=dtype, unit=unit)
    return x, y, r, ry


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("mode", MODES)
def test_pairwise_distances(dtype, metric, mode):
    x, _, r, _ = make(mode, dtype)
    gx, gr = to_gpu(x, r)
    got = tripmine.pairwise_distances(gx, gr, metric=metric)
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    np.testing.assert_allclose(host(got), tripmine.pairwise_distances(x, r, metric=metric),
                               rtol=RTOL[dtype], atol=ATOL[dtype])


def test_masks_with_numpy_or_cupy_labels():
    _, y = batch()
    _, ry = batch(5, n=30)
    for labels in (y, cp.asarray(y)):
        for ref_labels in (None, ry, cp.asarray(ry)):
            if ref_labels is None and not isinstance(labels, cp.ndarray):
                continue
            for fn in (tripmine.positive_mask, tripmine.negative_mask):
                got = fn(labels, ref_labels)
                assert isinstance(got, cp.ndarray)
                np.testing.assert_array_equal(host(got), fn(y, None if ref_labels is None
                                                            else ry))
    np.testing.assert_array_equal(host(tripmine.triplet_mask(cp.asarray(y[:20]))),
                                  tripmine.triplet_mask(y[:20]))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("mode", MODES)
def test_batch_hard(metric, mode):
    x, y, r, ry = make(mode, np.float64)
    gx, gr = to_gpu(x, r)
    assert_same_triplets(tripmine.batch_hard(gx, y, ref=gr, ref_labels=ry, metric=metric),
                         tripmine.batch_hard(x, y, ref=r, ref_labels=ry, metric=metric))
    x32 = x.astype(np.float32)
    r32 = None if r is None else r.astype(np.float32)
    assert_quasi_same(tripmine.batch_hard(cp.asarray(x32), y, ref=to_gpu(r32)[0], ref_labels=ry,
                                          metric=metric),
                      tripmine.batch_hard(x32, y, ref=r32, ref_labels=ry, metric=metric),
                      x32, r32, metric)


@pytest.mark.parametrize("select", ["closest", "random", "all"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_semi_hard(select, mode, metric):
    x, y, r, ry = make(mode, np.float64)
    gx, gr = to_gpu(x, r)
    for seed in (0, 12345):
        for cap in (None, 17):
            kw = dict(ref_labels=ry, metric=metric, margin=0.5, select=select, seed=seed,
                      max_triplets=cap)
            assert_same_triplets(tripmine.semi_hard(gx, y, ref=gr, **kw),
                                 tripmine.semi_hard(x, y, ref=r, **kw))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_distance_weighted(mode, dtype):
    x, y, r, ry = make(mode, dtype, unit=True)
    gx, gr = to_gpu(x, r)
    for seed in (0, 99):
        got = tripmine.distance_weighted(gx, y, ref=gr, ref_labels=ry, seed=seed)
        want = tripmine.distance_weighted(x, y, ref=r, ref_labels=ry, seed=seed)
        if dtype == np.float64:
            assert_same_triplets(got, want)
        else:  # the float32 tiles round differently: nearly every pick agrees
            g = [host(a) for a in got]
            np.testing.assert_array_equal(g[0], want[0])
            assert np.mean(g[2] == want[2]) > 0.97


MINING = ["batch_hard", "batch_all", "semi_hard", "distance_weighted"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_loss(dtype, mining, mode, soft):
    unit = mining == "distance_weighted"
    x, y, r, ry = make(mode, dtype, unit=unit)
    gx, gr = to_gpu(x, r)
    metrics = ["euclidean"] if unit else ["euclidean", "sqeuclidean", "cosine"]
    for metric in metrics:
        for reduction in ("auto", "mean", "sum", "mean_nonzero", "none"):
            kw = dict(ref_labels=ry, mining=mining, metric=metric, soft=soft,
                      reduction=reduction, seed=3, margin=0.3)
            got = tripmine.triplet_loss(gx, y, ref=gr, **kw)
            want = tripmine.triplet_loss(x, y, ref=r, **kw)
            if dtype == np.float32 and mining in ("distance_weighted",):
                continue  # different samples are possible in float32
            assert got.n_triplets == want.n_triplets
            if dtype == np.float64:
                assert got.n_active == want.n_active
            np.testing.assert_allclose(host(got.loss), want.loss, rtol=RTOL[dtype] * 10,
                                       atol=ATOL[dtype])
            assert isinstance(got.grad, cp.ndarray) and got.grad.dtype == dtype
            np.testing.assert_allclose(host(got.grad), want.grad, rtol=RTOL[dtype] * 10,
                                       atol=ATOL[dtype] * 10)
            if r is not None:
                np.testing.assert_allclose(host(got.ref_grad), want.ref_grad,
                                           rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)
            else:
                assert got.ref_grad is None


def test_triplet_loss_given_triplets_and_normalize():
    x, y = batch(2)
    t = tripmine.semi_hard(x, y, select="all", margin=1.0)
    gx = cp.asarray(x)
    for triplets in (t, tripmine.Triplets(*to_gpu(*t))):
        for normalize in (False, True):
            got = tripmine.triplet_loss(gx, None, mining=triplets, normalize=normalize)
            want = tripmine.triplet_loss(x, None, mining=t, normalize=normalize)
            np.testing.assert_allclose(got.loss, want.loss, rtol=1e-10)
            np.testing.assert_allclose(host(got.grad), want.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_contrastive_loss(dtype, mode, power, metric):
    x, y, r, ry = make(mode, dtype)
    gx, gr = to_gpu(x, r)
    for reduction in ("mean", "sum", "mean_nonzero", "none"):
        kw = dict(ref_labels=ry, power=power, metric=metric, reduction=reduction,
                  neg_margin=4.0 if metric != "cosine" else 1.0)
        got = tripmine.contrastive_loss(gx, y, ref=gr, **kw)
        want = tripmine.contrastive_loss(x, y, ref=r, **kw)
        assert (got.n_pairs, got.n_positive_pairs, got.n_negative_pairs) == (
            want.n_pairs, want.n_positive_pairs, want.n_negative_pairs)
        np.testing.assert_allclose(host(got.loss), want.loss, rtol=RTOL[dtype] * 10)
        np.testing.assert_allclose(host(got.grad), want.grad, rtol=RTOL[dtype] * 10,
                                   atol=ATOL[dtype] * 10)
        if r is not None:
            np.testing.assert_allclose(host(got.ref_grad), want.ref_grad,
                                       rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)


@pytest.mark.parametrize("mode", MODES)
def test_retrieval_metrics(mode):
    x, y, r, ry = make(mode, np.float64)
    gx, gr = to_gpu(x, r)
    idx, dist = tripmine.metrics.nearest_neighbors(gx, 5, gr)
    want_idx, want_dist = tripmine.metrics.nearest_neighbors(x, 5, r)
    np.testing.assert_array_equal(host(idx), want_idx)
    np.testing.assert_allclose(host(dist), want_dist, rtol=1e-12)
    kw = dict(ref_labels=ry)
    assert tripmine.metrics.recall_at_k(gx, y, (1, 3), ref=gr, **kw) == \
        tripmine.metrics.recall_at_k(x, y, (1, 3), ref=r, **kw)
    assert np.isclose(tripmine.metrics.mean_average_precision_at_r(gx, y, ref=gr, **kw),
                      tripmine.metrics.mean_average_precision_at_r(x, y, ref=r, **kw))


def test_many_chunks_give_the_same_results(monkeypatch):
    x, y = batch(4, n=300, d=8)
    gx = cp.asarray(x)
    whole = [tripmine.semi_hard(gx, y, select="random", seed=1),
             tripmine.triplet_loss(gx, y, mining="batch_all")]
    monkeypatch.setenv("TRIPMINE_GPU_CHUNK_BYTES", str(300 * 64 * 7))  # about 7 rows a chunk
    chunked = [tripmine.semi_hard(gx, y, select="random", seed=1),
               tripmine.triplet_loss(gx, y, mining="batch_all")]
    assert_same_triplets(chunked[0], [host(a) for a in whole[0]])
    np.testing.assert_allclose(chunked[1].loss, whole[1].loss, rtol=1e-12)
    np.testing.assert_allclose(host(chunked[1].grad), host(whole[1].grad), rtol=1e-10,
                               atol=1e-13)


def test_ref_offset_is_self_mode_inside_a_larger_reference():
    x, y = batch(6)
    gx = cp.asarray(x)
    # offset 0 with ref = x is self mode exactly (exclusion and RNG anchors)
    for mining in ("batch_hard", "semi_hard", "distance_weighted"):
        kw = {"seed": 5} if mining != "batch_hard" else {}
        fn = getattr(tripmine, mining)
        if mining == "distance_weighted":
            kw["normalize"] = True
        assert_same_triplets(fn(gx, y, ref=gx, ref_labels=y, ref_offset=0, **kw),
                             fn(x, y, **kw))
    cpu_has_offset = "ref_offset" in inspect.signature(
        tripmine.batch_hard.__wrapped_cpu__).parameters
    if cpu_has_offset:
        other, oy = batch(7, n=20)
        ref, ry = np.concatenate([other, x]), np.concatenate([oy, y])
        for fn in (tripmine.batch_hard, tripmine.semi_hard):
            assert_same_triplets(fn(gx, y, ref=cp.asarray(ref), ref_labels=ry, ref_offset=20),
                                 fn(x, y, ref=ref, ref_labels=ry, ref_offset=20))


def test_errors_match_the_cpu():
    x, y = batch()
    gx = cp.asarray(x)
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.batch_hard(gx, y, ref=x, ref_labels=y)
    bad = gx.copy()
    bad[0, 0] = cp.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        tripmine.triplet_loss(bad, y)
    with pytest.raises(ValueError, match="labels has length"):
        tripmine.batch_hard(gx, y[:-1])
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        tripmine.batch_hard(cp.zeros((4, 2), dtype=cp.int32), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="margin"):
        tripmine.triplet_loss(gx, y, margin=-1.0)
    with pytest.raises(ValueError, match="unit-norm"):
        tripmine.distance_weighted(gx, y)


def test_degenerate_batches():
    empty = cp.zeros((0, 4))
    assert tripmine.batch_hard(empty, np.zeros(0, dtype=int)).anchor.shape == (0,)
    result = tripmine.triplet_loss(empty, np.zeros(0, dtype=int), mining="batch_all")
    assert result.loss == 0.0 and result.grad.shape == (0, 4)
    one_class = tripmine.triplet_loss(cp.ones((5, 3)), np.zeros(5, dtype=int))
    assert one_class.loss == 0.0 and float(cp.abs(one_class.grad).max()) == 0.0


def test_float16_computes_in_float32():
    x, y = batch(dtype=np.float32)
    got = tripmine.triplet_loss(cp.asarray(x.astype(np.float16)), y)
    assert got.grad.dtype == np.float32


def test_large_batch_runs_in_a_few_gigabytes():
    """N = 262,144, D = 128: batch-hard loss and gradient in bounded memory."""
    n, d = 262_144, 128
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=cp.float32)
    y = cp.arange(n) // 4
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    result = tripmine.triplet_loss(x, y)
    cp.cuda.Device().synchronize()
    assert np.isfinite(result.loss)
    assert pool.total_bytes() < 8 * 2**30


# ---- the margin-softmax heads --------------------------------------------------------

HEAD_CASES = [
    (tripmine.softmax_loss, {}),
    (tripmine.normface_loss, {"scale": 8.0}),
    (tripmine.cosface_loss, {"scale": 8.0}),
    (tripmine.arcface_loss, {"scale": 8.0}),
    (tripmine.arcface_loss, {"scale": 8.0, "straight_through": True}),
    (tripmine.combined_margin_loss, {"scale": 8.0}),
    (tripmine.sphereface_loss, {"margin": 3}),
    (tripmine.large_margin_softmax_loss, {"margin": 2}),
]


@pytest.mark.parametrize("fn, kw", HEAD_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_heads_match_the_c_core(fn, kw, dtype, reduction):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(70, 24)).astype(dtype)
    w = (0.3 * rng.normal(size=(300, 24))).astype(dtype)
    labels = rng.integers(0, 300, 70)
    cw = rng.uniform(0.5, 1.5, 300)
    cpu = fn(x, labels, w, class_weight=cw, reduction=reduction, **kw)
    xg, wg = to_gpu(x, w)
    gpu = fn(xg, labels, wg, class_weight=cw, reduction=reduction, **kw)
    assert isinstance(gpu.grad, cp.ndarray) and gpu.grad.dtype == dtype
    np.testing.assert_allclose(host(gpu.loss), cpu.loss, rtol=RTOL[dtype])
    np.testing.assert_allclose(host(gpu.grad), cpu.grad, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(host(gpu.weight_grad), cpu.weight_grad, rtol=RTOL[dtype],
                               atol=ATOL[dtype])
    assert abs(gpu.n_correct - cpu.n_correct) <= (0 if dtype == np.float64 else 1)


def test_heads_refuse_mixed_devices():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.cosface_loss(cp.asarray(x), np.zeros(3, dtype=np.int64), x)


# ---- the center loss -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_center_loss_and_update_match_the_c_core(dtype, reduction):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(90, 20)).astype(dtype)
    centers = rng.normal(size=(30, 20)).astype(dtype)
    labels = rng.integers(0, 29, 90)  # the last center has no sample
    up = rng.uniform(0.5, 1.5, 90) if reduction == "none" else None
    cpu = tripmine.center_loss(x, labels, centers, reduction=reduction, upstream=up)
    xg, cg = to_gpu(x, centers)
    gpu = tripmine.center_loss(xg, cp.asarray(labels), cg, reduction=reduction,
                               upstream=None if up is None else cp.asarray(up))
    assert isinstance(gpu.grad, cp.ndarray) and gpu.grad.dtype == dtype
    np.testing.assert_allclose(host(gpu.loss), cpu.loss, rtol=RTOL[dtype])
    np.testing.assert_allclose(host(gpu.grad), cpu.grad, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(host(gpu.centers_grad), cpu.centers_grad, rtol=RTOL[dtype],
                               atol=ATOL[dtype])
    moved = tripmine.update_centers(centers.copy(), x, labels)
    assert tripmine.update_centers(cg, xg, labels) is cg
    np.testing.assert_allclose(host(cg), moved, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_center_refuses_mixed_devices_and_bad_centers():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.center_loss(cp.asarray(x), np.zeros(3, dtype=np.int64), x)
    with pytest.raises(ValueError, match="labels"):
        tripmine.update_centers(cp.zeros((2, 4), cp.float32), cp.asarray(x), [0, 1, 2])


# ---- the margin loss -----------------------------------------------------------------

@pytest.mark.parametrize("mining", ["batch_hard", "distance_weighted", "batch_all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_margin_loss_matches_the_c_core(mining, reduction):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(16), 4)
    beta = rng.uniform(0.8, 1.4, 16)
    kw = dict(mining=mining, beta=beta, nu=0.05, reduction=reduction, seed=2)
    cpu = tripmine.margin_loss(x, labels, **kw)
    (xg,) = to_gpu(x)
    gpu = tripmine.margin_loss(xg, cp.asarray(labels), **kw)
    if mining in ("batch_hard", "batch_all"):  # distance-weighted draws may differ
        for a, b in zip(gpu.triplets or (), cpu.triplets or ()):
            np.testing.assert_array_equal(host(a), b)
        assert (gpu.n_triplets, gpu.n_active) == (cpu.n_triplets, cpu.n_active)
        np.testing.assert_allclose(host(gpu.loss), cpu.loss, rtol=1e-10)
        np.testing.assert_allclose(host(gpu.grad), cpu.grad, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(host(gpu.beta_grad), cpu.beta_grad, rtol=1e-10, atol=1e-12)
    assert isinstance(gpu.grad, cp.ndarray) and np.isfinite(host(gpu.grad)).all()


# ---- the lifted structured loss ------------------------------------------------------

def _lifted_modes(dtype):
    """Self mode, reference mode, and ref_offset (the batch inside a larger reference)."""
    x, y = batch(11, n=48, d=12, classes=5, dtype=dtype)
    other, oy = batch(12, n=20, d=12, classes=5, dtype=dtype, ties=False)
    inside = np.concatenate([other[:7], x, other[7:]])
    inside_y = np.concatenate([oy[:7], y, oy[7:]])
    return x, y, [{}, {"ref": other, "ref_labels": oy},
                  {"ref": inside, "ref_labels": inside_y, "ref_offset": 7}]


def assert_same_lifted(got, want, dtype):
    assert (got.n_terms, got.n_active) == (want.n_terms, want.n_active)
    if isinstance(want.loss, np.ndarray):
        assert isinstance(got.loss, cp.ndarray)
    np.testing.assert_allclose(host(got.loss), want.loss, rtol=RTOL[dtype] * 10,
                               atol=ATOL[dtype] * 10)
    for name in ("grad", "ref_grad"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None)
        if w is not None:
            assert isinstance(g, cp.ndarray) and g.dtype == w.dtype
            np.testing.assert_allclose(host(g), w, rtol=RTOL[dtype] * 10,
                                       atol=ATOL[dtype] * 10)


@pytest.mark.parametrize("generalized", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_lifted_structured_loss_matches_the_c_core(generalized, dtype, metric):
    x, y, modes = _lifted_modes(dtype)
    for kw in modes:
        gpu_kw = {k: cp.asarray(v) if k == "ref" else v for k, v in kw.items()}
        for reduction in ("mean", "sum", "mean_nonzero", "none"):
            options = dict(generalized=generalized, metric=metric, reduction=reduction,
                           neg_margin=0.8 if metric == "cosine" else 1.5, pos_margin=0.05)
            want = tripmine.lifted_structured_loss(x, y, **options, **kw)
            got = tripmine.lifted_structured_loss(cp.asarray(x), cp.asarray(y), **options,
                                                  **gpu_kw)
            assert_same_lifted(got, want, dtype)


@pytest.mark.parametrize("generalized", [False, True])
def test_lifted_normalize_and_chunks_match_the_c_core(generalized, monkeypatch):
    from tripmine._gpu.lifted import BYTES_PER_ENTRY
    x, y, modes = _lifted_modes(np.float64)
    x[5] *= 30.0
    for kw in modes:
        gpu_kw = {k: cp.asarray(v) if k == "ref" else v for k, v in kw.items()}
        options = dict(generalized=generalized, normalize=True, **kw)
        want = tripmine.lifted_structured_loss(x, y, **options)
        options.update(gpu_kw)
        whole = tripmine.lifted_structured_loss(cp.asarray(x), y, **options)
        assert_same_lifted(whole, want, np.float64)
        m = x.shape[0] if "ref" not in kw else kw["ref"].shape[0]
        monkeypatch.setenv("TRIPMINE_GPU_CHUNK_BYTES", str(3 * m * BYTES_PER_ENTRY))
        chunked = tripmine.lifted_structured_loss(cp.asarray(x), y, **options)  # 3 rows a block
        monkeypatch.delenv("TRIPMINE_GPU_CHUNK_BYTES")
        assert_same_lifted(chunked, want, np.float64)


def test_lifted_degenerate_batches_and_errors():
    for generalized in (False, True):
        empty = tripmine.lifted_structured_loss(cp.zeros((0, 4)), np.zeros(0, dtype=int),
                                                generalized=generalized)
        assert empty.loss == 0.0 and empty.grad.shape == (0, 4)
        one_class = tripmine.lifted_structured_loss(cp.ones((5, 3)), np.zeros(5, dtype=int),
                                                    generalized=generalized)
        assert one_class.loss == 0.0 and float(cp.abs(one_class.grad).max()) == 0.0
    x, y = batch()
    with pytest.raises(TypeError, match="mixed devices"):
        tripmine.lifted_structured_loss(cp.asarray(x), y, ref=x, ref_labels=y)
    with pytest.raises(ValueError, match="neg_margin"):
        tripmine.lifted_structured_loss(cp.asarray(x), y, neg_margin=-1.0)


def test_lifted_large_batch_stays_below_the_pair_matrix():
    """N = 16,384: the N x N float64 matrix alone would take 2 GiB."""
    n, d = 16_384, 64
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=cp.float32)
    y = cp.arange(n) // 4
    pool = cp.get_default_memory_pool()
    for generalized in (False, True):
        pool.free_all_blocks()
        result = tripmine.lifted_structured_loss(x, y, generalized=generalized)
        cp.cuda.Device().synchronize()
        assert np.isfinite(result.loss) and result.n_terms > 0
        assert pool.total_bytes() < 2**30


# ---- the floating-point range (issue 17) ---------------------------------------------------

RANGE_CALLS = {
    "pairwise": lambda x, y: tripmine.pairwise_distances(x),
    "batch_hard": lambda x, y: tripmine.triplet_loss(x, y),
    "batch_all": lambda x, y: tripmine.triplet_loss(x, y, mining="batch_all"),
    "soft": lambda x, y: tripmine.triplet_loss(x, y, soft=True),
    "contrastive": lambda x, y: tripmine.contrastive_loss(x, y, neg_margin=0.0),
    "lifted_cosine": lambda x, y: tripmine.lifted_structured_loss(x, y, metric="cosine"),
    "margin_all": lambda x, y: tripmine.margin_loss(x, y, mining="batch_all", normalize=True),
}


@pytest.mark.parametrize("scale", [1e30, 1e-25])
@pytest.mark.parametrize("name", sorted(RANGE_CALLS))
def test_float32_rows_beyond_the_window_rerun_in_float64(name, scale):
    """float32 rows whose squared norms leave float32's window: the GPU path refuses them
    (the C engine's check) and the dispatcher reruns them in float64, rounding back, as
    the CPU path does: the same results to float32 rounding."""
    x, y = batch(3, n=48, d=8)
    x = (x * scale).astype(np.float32)
    before = x.copy()
    got, want = RANGE_CALLS[name](cp.asarray(x), y), RANGE_CALLS[name](x, y)
    np.testing.assert_array_equal(x, before)
    if isinstance(want, np.ndarray):
        assert got.dtype == np.float32 and bool(cp.isfinite(got).all())
        np.testing.assert_allclose(host(got), want, rtol=1e-5)
        return
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-5)
    assert got.grad.dtype == np.float32 and bool(cp.isfinite(got.grad).all())
    np.testing.assert_allclose(host(got.grad), want.grad, rtol=1e-4,
                               atol=1e-6 * float(np.abs(want.grad).max()))


def test_float64_rows_beyond_the_window_raise_on_the_gpu():
    """The CUDA kernels take no row exponent (the CPU path's float64 rerun): a clear error,
    never an inf."""
    x, y = batch(3, n=48, d=8)
    with pytest.raises(FloatingPointError, match="GPU path's float64 window"):
        tripmine.triplet_loss(cp.asarray(x * 1e200), y)
    with pytest.raises(FloatingPointError, match="GPU path's float64 window"):
        tripmine.pairwise_distances(cp.asarray(x * 1e-200))


def test_softmax_head_float32_logits_beyond_float32_rerun_in_float64():
    """The CPU test of the same name, on the device: logits W.x of about 4e39 (beyond
    float32) rerun in float64 and the gradients come back in float32, as on the CPU."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((12, 5))).astype(np.float32) * np.float32(1e20)
    shared = np.full(5, 1e19, dtype=np.float32)
    weight = (shared * (1 + 2.0 ** -10 * rng.standard_normal((4, 5)))).astype(np.float32)
    labels = np.repeat(np.arange(4), 3)
    got = tripmine.softmax_loss(cp.asarray(x), labels, cp.asarray(weight))
    want = tripmine.softmax_loss(x, labels, weight)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-6)
    assert got.grad.dtype == np.float32 and got.weight_grad.dtype == np.float32
    np.testing.assert_allclose(host(got.grad), want.grad, rtol=1e-5)
    np.testing.assert_allclose(host(got.weight_grad), want.weight_grad, rtol=1e-5)


def test_center_loss_beyond_float32_raises_before_the_update():
    """As on the CPU: a float32 center loss beyond 3.4e38 raises, and update= moves no
    center."""
    rng = np.random.default_rng(0)
    x = cp.asarray((rng.standard_normal((12, 5)) * 1e25).astype(np.float32))
    centers = cp.zeros((4, 5), dtype=cp.float32)
    with pytest.raises(FloatingPointError, match="the loss of center_loss reaches"):
        tripmine.center_loss(x, np.repeat(np.arange(4), 3), centers, update=0.5)
    assert not bool(centers.any())
