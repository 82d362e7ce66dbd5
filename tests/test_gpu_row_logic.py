"""The CUDA kernels' per-row logic, checked on the CPU.

csrc/cuda/row_logic.cuh is plain C++; tests/cuda_shim.cpp builds it with the
host compiler.  These tests then replay the GPU path's pipeline on the host --
the same steps as tripmine/_gpu (usable negatives as sort keys, a stable sort
per row, one search per positive pair; log-weights, cumulative weights,
inverse-CDF pick) with NumPy standing in for CuPy and the C core's own
distance matrix as the tile -- and require the C core's triplets exactly.
This is the evidence, before any GPU run, that the tie-breaks, the RNG
stream, the float32 logarithm and the CDF search are the C core's.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tripmine

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"

i64p = ctypes.POINTER(ctypes.c_int64)
f64p = ctypes.POINTER(ctypes.c_double)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build tests/cuda_shim.cpp")
    out = tmp_path_factory.mktemp("shim") / "cuda_shim.so"
    result = subprocess.run(
        [cxx, "-std=c++14", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra",
         "-Werror", f"-I{CUDA_DIR}", str(ROOT / "tests" / "cuda_shim.cpp"), "-o", str(out)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.shim_uniform01.restype = ctypes.c_double
    lib.shim_uniform01.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64]
    lib.shim_uniform_index.restype = ctypes.c_int64
    lib.shim_uniform_index.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_int64]
    lib.shim_log_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.shim_exp_nonpositive_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.shim_semi_hard_closest.restype = ctypes.c_int64
    lib.shim_semi_hard_closest.argtypes = [f64p, i64p, ctypes.c_int64, ctypes.c_double]
    lib.shim_semi_hard_random.restype = ctypes.c_int64
    lib.shim_semi_hard_random.argtypes = [f64p, i64p, ctypes.c_int64, ctypes.c_double,
                                          ctypes.c_double, ctypes.c_uint64, ctypes.c_int64,
                                          ctypes.c_int64]
    lib.shim_semi_hard_all_count.restype = ctypes.c_int64
    lib.shim_semi_hard_all_count.argtypes = [f64p, ctypes.c_int64, ctypes.c_double,
                                             ctypes.c_double]
    lib.shim_weighted_row.restype = ctypes.c_int
    lib.shim_weighted_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_double, ctypes.c_double,
                                      ctypes.c_double, f64p, i64p]
    lib.shim_weighted_pick.restype = ctypes.c_int64
    lib.shim_weighted_pick.argtypes = [f64p, ctypes.c_int64, ctypes.c_double, ctypes.c_int64]
    lib.shim_pair_coefficients.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.c_double,
                                           ctypes.c_double, ctypes.c_double, f64p]
    lib.shim_softplus.restype = lib.shim_sigmoid.restype = ctypes.c_double
    lib.shim_softplus.argtypes = lib.shim_sigmoid.argtypes = [ctypes.c_double]
    return lib


def _p(arr, kind):
    return arr.ctypes.data_as(kind)


def _batch(seed, n=48, d=8, classes=6, dtype=np.float64, duplicates=True, unit=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    if duplicates:  # exact ties
        x[5] = x[3]
        x[9] = x[3]
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    return x, labels


def test_rng_matches_the_c_core(shim):
    rng = np.random.default_rng(0)
    for _ in range(2000):
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        anchor, draw = (int(v) for v in rng.integers(0, 2**40, size=2))
        assert shim.shim_uniform01(seed, anchor, draw) == tripmine._core.uniform(seed, anchor,
                                                                                  draw)
    for count in (1, 2, 3, 7, 1000, 2**40):
        for draw in range(50):
            k = shim.shim_uniform_index(12345, 3, draw, count)
            u = tripmine._core.uniform(12345, 3, draw)
            assert k == min(int(u * count), count - 1)


def test_log_f32_is_accurate(shim):
    v = np.concatenate([np.linspace(0.01, 4.0, 5001), np.geomspace(1e-30, 1e30, 3001)])
    v = v.astype(np.float32)
    out = v.copy()
    shim.shim_log_f32(out.ctypes.data, out.size)
    np.testing.assert_allclose(out, np.log(v.astype(np.float64)), rtol=2e-6, atol=2e-7)


def test_exp_f32_is_the_c_cores_bit_for_bit(shim, runtime_lib):
    """row_logic.cuh's float exp repeats fastmath.h's: distance-weighted's float32 weights
    (and so its seeded picks) can be the same on the GPU."""
    x = -np.concatenate([np.linspace(0.0, 90.0, 200_001), np.geomspace(1e-20, 1e3, 5001)])
    x = x.astype(np.float32)
    from_c, from_shim = x.copy(), x.copy()
    runtime_lib.tm_exp_nonpositive_array_f32(from_c.ctypes.data, from_c.size)
    shim.shim_exp_nonpositive_f32(from_shim.ctypes.data, from_shim.size)
    np.testing.assert_array_equal(from_shim.view(np.uint32), from_c.view(np.uint32))


def _rows(x, labels, ref, ref_labels, metric):
    """The tile (C core distances), gallery labels and the excluded column offset."""
    dist = tripmine.pairwise_distances(x, ref, metric=metric)
    gallery = labels if ref is None else ref_labels
    return dist, gallery, (0 if ref is None else -1)


def _emulate_semi_hard(shim, x, labels, ref=None, ref_labels=None, metric="euclidean",
                       margin=0.2, select="closest", seed=0):
    dist, gallery, excl = _rows(x, labels, ref, ref_labels, metric)
    n, m = dist.shape
    out = []
    for a in range(n):
        row = dist[a].astype(np.float64)
        usable = (gallery != labels[a]) & ~np.isnan(row)
        positive = gallery == labels[a]
        if excl >= 0:
            usable[a + excl] = positive[a + excl] = False
        keys = np.where(usable, row, np.inf)
        order = np.argsort(keys, kind="stable").astype(np.int64)
        sorted_keys = np.ascontiguousarray(keys[order])
        n_neg = int(usable.sum())
        for p in np.flatnonzero(positive):
            if select == "closest":
                neg = shim.shim_semi_hard_closest(_p(sorted_keys, f64p), _p(order, i64p), n_neg,
                                                  row[p])
            elif select == "random":
                neg = shim.shim_semi_hard_random(_p(sorted_keys, f64p), _p(order, i64p), n_neg,
                                                 row[p], margin, seed, a, int(p))
            else:
                count = shim.shim_semi_hard_all_count(_p(sorted_keys, f64p), n_neg, row[p],
                                                      margin)
                cand = [j for j in range(m) if usable[j] and row[p] < row[j] <= row[p] + margin]
                assert len(cand) == count
                out.extend((a, int(p), j) for j in cand)
                continue
            if neg >= 0:
                out.append((a, int(p), int(neg)))
    return [tuple(map(np.int64, t)) for t in out]


def _as_list(triplets):
    return list(zip(*(np.asarray(t) for t in triplets)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("select", ["closest", "random", "all"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_semi_hard_pipeline_matches_the_c_core(shim, dtype, select, mode, metric):
    x, labels = _batch(1, dtype=dtype)
    kwargs = {}
    if mode == "ref":
        ref, ref_labels = _batch(2, n=40, dtype=dtype)
        kwargs = {"ref": ref, "ref_labels": ref_labels}
    for seed in (0, 99):
        expected = tripmine.semi_hard(x, labels, margin=0.5, select=select, seed=seed,
                                      metric=metric, **kwargs)
        got = _emulate_semi_hard(shim, x, labels, metric=metric, margin=0.5, select=select,
                                 seed=seed, **kwargs)
        assert got == _as_list(expected)


def _emulate_weighted(shim, x, labels, ref=None, ref_labels=None, seed=0, cutoff=0.5,
                      nonzero_loss_cutoff=1.4):
    dist, gallery, excl = _rows(x, labels, ref, ref_labels, "euclidean")
    n, m = dist.shape
    single = int(dist.dtype == np.float32)
    out = []
    for a in range(n):
        row = np.ascontiguousarray(dist[a])
        other = (gallery != labels[a]).astype(np.int32)
        positive = gallery == labels[a]
        if excl >= 0:
            other[a + excl] = 0
            positive[a + excl] = False
        w = np.empty(m)
        last = np.zeros(1, dtype=np.int64)
        ok = shim.shim_weighted_row(single, row.ctypes.data, other.ctypes.data, m, cutoff,
                                    nonzero_loss_cutoff, float(x.shape[1]), _p(w, f64p),
                                    _p(last, i64p))
        if not ok:
            continue
        cum = np.cumsum(w)  # sequential, as the C core's running total
        for p in np.flatnonzero(positive):
            target = tripmine._core.uniform(seed, a, int(p)) * cum[-1]
            out.append((a, int(p), int(shim.shim_weighted_pick(_p(cum, f64p), m, target,
                                                                int(last[0])))))
    return [tuple(map(np.int64, t)) for t in out]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("d", [3, 16])
def test_distance_weighted_pipeline_matches_the_c_core(shim, dtype, mode, d):
    x, labels = _batch(3, n=64, d=d, dtype=dtype, unit=True)
    kwargs = {}
    if mode == "ref":
        ref, ref_labels = _batch(4, n=50, d=d, dtype=dtype, unit=True)
        kwargs = {"ref": ref, "ref_labels": ref_labels}
    for seed in (0, 7, 2**64 - 1):
        expected = tripmine.distance_weighted(x, labels, seed=seed, **kwargs)
        got = _emulate_weighted(shim, x, labels, seed=seed, **kwargs)
        assert got == _as_list(expected)


def test_pair_coefficients_and_softplus(shim):
    out = np.empty(3)
    shim.shim_pair_coefficients(0, 2.0, 4.0, 0.0, 0.0, _p(out, f64p))
    assert out.tolist() == [0.5, -0.5, 0.5]
    shim.shim_pair_coefficients(0, 2.0, 0.0, 0.0, 0.0, _p(out, f64p))  # zero distance
    assert out.tolist() == [0.0, 0.0, 0.0]
    shim.shim_pair_coefficients(1, 2.0, 4.0, 0.0, 0.0, _p(out, f64p))
    assert out.tolist() == [4.0, -4.0, 4.0]
    shim.shim_pair_coefficients(2, 1.0, 0.25, 2.0, 4.0, _p(out, f64p))
    assert out.tolist() == [0.75 / 4, -1.0 / 8, 0.75 / 16]
    for z in (-800.0, -3.0, 0.0, 2.5, 800.0):
        assert np.isclose(shim.shim_softplus(z), np.logaddexp(0.0, z), rtol=1e-15, atol=0)
        assert np.isclose(shim.shim_sigmoid(z), 0.5 * (1 + np.tanh(z / 2)), rtol=1e-12,
                          atol=1e-300)
