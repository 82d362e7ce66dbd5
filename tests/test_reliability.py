"""Reliability: threads, the GIL, leaks, 64-bit sizes and allocation failure.

* Thread safety: Python threads calling miners, losses, distances and metrics at
  once on shared read-only inputs get bit for bit what serial calls get, and the
  process-wide thread count may be changed while calls run.
* The C calls release the GIL (checked without timing: see ``_progress_during``).
* Repeated calls, including ones that raise, keep the resident set flat.
* Query-vs-reference problems with N x M > 2**31 pairs are mined and reduced
  correctly (checked on sampled anchors against float64 NumPy).
* A failed allocation, in NumPy or inside the C core, raises MemoryError: the
  process never dies.  Those run in subprocesses under ``RLIMIT_AS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tripmine
from conftest import distance_rtol, loss_rtol, skip_if_sanitized
from tripmine import _core, metrics

# /proc/self/status and RLIMIT_AS semantics are Linux's.
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/status and relies on Linux's RLIMIT_AS")

# ---- helpers -----------------------------------------------------------------


def _bits(value, path: str = "result") -> list:
    """(path, value) pairs that compare equal only for bit-identical results."""
    if isinstance(value, np.ndarray):
        return [(path, value.dtype.str, value.shape, value.tobytes())]
    if dataclasses.is_dataclass(value):
        return [item for field in dataclasses.fields(value)
                for item in _bits(getattr(value, field.name), f"{path}.{field.name}")]
    if isinstance(value, tuple):  # Triplets; (indices, distances)
        return [item for i, v in enumerate(value) for item in _bits(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [item for k in sorted(value) for item in _bits(value[k], f"{path}[{k!r}]")]
    if isinstance(value, float):
        return [(path, float(value).hex())]
    if value is None or isinstance(value, int):
        return [(path, value)]
    raise TypeError(f"{path}: cannot compare {type(value).__name__}")


def _fingerprint(arrays) -> list[str]:
    return [hashlib.sha256(a.tobytes()).hexdigest() for a in arrays]


def _read_only(*arrays):
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _run_script(script: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter (the test's own), ``env`` added."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout, check=False, env={**os.environ, **env})


def _describe_exit(completed: subprocess.CompletedProcess) -> str:
    code = completed.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"{how}\nstdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"


# ---- 1. thread safety --------------------------------------------------------


def _shared_problem():
    """Read-only inputs big enough that every call runs on several C threads."""
    rng = np.random.default_rng(20240611)
    n, m, d, classes = 256, 224, 24, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = np.arange(n) // (n // classes)  # P x K, K = 4
    ref = rng.standard_normal((m, d)).astype(np.float32)
    ref_labels = rng.integers(0, classes, m)
    x64 = rng.standard_normal((n, d))
    given = tripmine.batch_hard(x, labels)
    arrays = _read_only(x, unit, labels, ref, ref_labels, x64, *given)
    return (x, unit, labels, ref, ref_labels, x64, given), arrays


def _mixed_calls(problem) -> dict:
    x, unit, y, ref, ry, x64, given = problem
    bank = dict(ref=ref, ref_labels=ry)
    return {
        "pairwise_distances": lambda: tripmine.pairwise_distances(x),
        "pairwise_distances_ref_cosine_f64": lambda: tripmine.pairwise_distances(
            x64, ref, metric="cosine"),
        "batch_hard": lambda: tripmine.batch_hard(x, y),
        "batch_hard_ref": lambda: tripmine.batch_hard(x, y, metric="sqeuclidean", **bank),
        "semi_hard_closest": lambda: tripmine.semi_hard(x, y, margin=0.5),
        "semi_hard_random": lambda: tripmine.semi_hard(x, y, select="random", seed=7),
        "semi_hard_all": lambda: tripmine.semi_hard(x, y, select="all", max_triplets=700,
                                                    seed=3),
        "distance_weighted": lambda: tripmine.distance_weighted(unit, y, seed=11),
        "loss_batch_hard": lambda: tripmine.triplet_loss(x, y, mining="batch_hard"),
        "loss_batch_hard_ref": lambda: tripmine.triplet_loss(x, y, soft=True, **bank),
        "loss_batch_all": lambda: tripmine.triplet_loss(x, y, mining="batch_all"),
        "loss_batch_all_ref": lambda: tripmine.triplet_loss(x64, y, mining="batch_all", **bank),
        "loss_semi_hard": lambda: tripmine.triplet_loss(x, y, mining="semi_hard",
                                                        metric="cosine", normalize=True),
        "loss_distance_weighted": lambda: tripmine.triplet_loss(
            x, y, mining="distance_weighted", normalize=True, seed=5),
        "loss_given_triplets": lambda: tripmine.triplet_loss(x, None, mining=given,
                                                             reduction="none"),
        "contrastive": lambda: tripmine.contrastive_loss(x, y),
        "contrastive_ref": lambda: tripmine.contrastive_loss(x, y, power=2, **bank),
        "recall_at_k": lambda: metrics.recall_at_k(x, y, k=(1, 4)),
        "map_at_r_ref": lambda: metrics.mean_average_precision_at_r(x, y, **bank),
        "nearest_neighbors": lambda: metrics.nearest_neighbors(x, 5),
        "arcface": lambda: tripmine.arcface_loss(x, y, ref[:64]),
        "softmax_f64": lambda: tripmine.softmax_loss(x64, y, ref[:64], bias=ref[64, :1].repeat(64),
                                                     class_weight=ry[:64] % 3),
        "sphereface_none": lambda: tripmine.sphereface_loss(unit, y, ref[:64], reduction="none"),
        "center": lambda: tripmine.center_loss(x, y, ref[:64]),
        "center_update": lambda: tripmine.update_centers(ref[:64].copy(), x, y),
        "margin": lambda: tripmine.margin_loss(unit, y, seed=4, beta=ref[:64, 0] % 1 + 0.8),
        "lifted": lambda: tripmine.lifted_structured_loss(x, y),
        "lifted_generalized_ref": lambda: tripmine.lifted_structured_loss(
            x, y, generalized=True, **bank),
        "margin_batch_all": lambda: tripmine.margin_loss(x, y, mining="batch_all", nu=0.1),
    }


def test_concurrent_calls_are_bit_identical_to_serial_calls(threads):
    """8 Python threads, every kind of call, 6 rounds in shuffled order: each
    result equals the serial one bit for bit, and no input is written to.

    Fails on shared mutable state in the C core or the Python layer (scratch
    buffers, caches, the RNG), or a write through a read-only input's pointer.
    The C thread count stays fixed: batch-all and reference-mode contrastive
    gradients are bit-identical only for a fixed count (README, Semantics).
    """
    tripmine.set_num_threads(2)
    problem, arrays = _shared_problem()
    before = _fingerprint(arrays)
    calls = _mixed_calls(problem)
    serial = {name: _bits(call()) for name, call in calls.items()}
    order = [name for name in calls for _ in range(6)]
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(8) as pool:
        futures = [(name, pool.submit(lambda c=calls[name]: _bits(c()))) for name in order]
        differing = sorted({name for name, future in futures if future.result() != serial[name]})
    assert differing == []
    assert _fingerprint(arrays) == before
    assert tripmine.get_num_threads() == 2


def _thread_count_problem():
    """Reference-mode dense losses whose reference side takes several passes.

    With D = 512 the per-thread reference accumulators (capped at 32 MiB in
    all) cover 16384 / threads rows per pass for batch-all and half that for
    contrastive, so M = 9000 rows take 2 or more passes (batch-all: from 2
    threads on), each of which reads the thread count anew.
    """
    rng = np.random.default_rng(99)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    labels = np.arange(32) % 4
    ref = rng.standard_normal((9000, 512)).astype(np.float32)
    ref_labels = np.arange(9000) % 4
    small = rng.standard_normal((256, 16)).astype(np.float32)
    small_labels = np.arange(256) // 4
    return _read_only(x, labels, ref, ref_labels, small, small_labels)


def test_changing_the_thread_count_while_calls_run_is_safe(threads):
    """One thread keeps calling set_num_threads(1..4) while 4 threads compute.

    The thread count is one process-wide value (csrc/runtime.c) that every C
    call reads, possibly several times.  A call running while it changes must
    still succeed with a valid result: mined triplets and loss values equal the
    serial ones bit for bit (they never depend on the thread count), gradients
    to rounding (batch-all and contrastive sum per-thread partials).
    """
    x, y, ref, ry, small, small_y = _thread_count_problem()
    bank = dict(ref=ref, ref_labels=ry)
    calls = {
        "contrastive_ref": lambda: tripmine.contrastive_loss(x, y, **bank),
        "batch_all_ref": lambda: tripmine.triplet_loss(x, y, mining="batch_all", **bank),
        "batch_all": lambda: tripmine.triplet_loss(small, small_y, mining="batch_all"),
        "batch_hard_ref": lambda: tripmine.triplet_loss(x, y, mining="batch_hard", **bank),
        "semi_hard_random": lambda: tripmine.semi_hard(small, small_y, select="random", seed=1),
        "pairwise_distances": lambda: tripmine.pairwise_distances(small, ref[:, :16]),
        "cosface": lambda: tripmine.cosface_loss(x, y, ref[:8]),
        "softmax": lambda: tripmine.softmax_loss(small, small_y, small[:64] * 0.1),
        "center": lambda: tripmine.center_loss(ref, ry, x[:4]),  # 4.6M elements: threaded
        "lifted": lambda: tripmine.lifted_structured_loss(small, small_y),
    }
    tripmine.set_num_threads(2)
    serial = {name: call() for name, call in calls.items()}
    stop = threading.Event()

    def toggle():
        k = 0
        while not stop.is_set():
            tripmine.set_num_threads(1 + k % 4)
            k += 1
            time.sleep(0.0002)

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [(name, pool.submit(calls[name])) for _ in range(4) for name in calls]
            outcomes = []
            for name, future in futures:
                try:
                    outcomes.append((name, future.result()))
                except Exception as exc:  # reported below
                    outcomes.append((name, exc))
    finally:
        stop.set()
        toggler.join()
    errors = [f"{name}: {type(r).__name__}: {r}" for name, r in outcomes
              if isinstance(r, Exception)]
    assert errors == [], f"{len(errors)} of {len(outcomes)} calls failed: {errors[:3]}"
    # over mined triplets, and the heads (fixed blocks): any thread count
    exact_gradients = ("batch_hard_ref", "cosface", "softmax", "center")
    for name, result in outcomes:
        want = serial[name]
        if not dataclasses.is_dataclass(want) or name in exact_gradients:
            assert _bits(result) == _bits(want), name
            continue
        no_grad = dict(grad=None, ref_grad=None)
        assert _bits(dataclasses.replace(result, **no_grad)) == \
            _bits(dataclasses.replace(want, **no_grad)), name
        for field in ("grad", "ref_grad"):
            got, expected = getattr(result, field), getattr(want, field)
            if expected is not None:
                scale = float(np.abs(expected).max())
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale,
                                           err_msg=f"{name}.{field}")


# ---- 2. the GIL --------------------------------------------------------------


def _progress_during(call, attempts: int = 20) -> bool:
    """Whether another Python thread ran Python code while ``call()`` ran.

    A second thread, B, counts in a Python loop, releasing the GIL at every
    step (``time.sleep``) so that this thread can always take it back.  The switch
    interval is raised to 100 s, so the interpreter never takes the GIL from a
    thread running Python code: from the read of ``before`` up to the C call,
    and from its return up to the read of ``after``, this thread holds the GIL
    without a break (``call`` runs no NumPy code that could drop it).  So
    ``after > before`` proves that B ran while this thread was inside the C
    call, i.e. that the call released the GIL; with the GIL held throughout, it
    is impossible (the control with ``math.factorial`` in the test checks just
    that).  No timing enters: on a machine too busy to schedule B during one
    call, the next attempt gives it another chance; only a call that holds the
    GIL fails all of them.
    """
    count = [0]
    stop = threading.Event()
    started = threading.Event()

    def count_in_python():
        started.set()
        while not stop.is_set():
            count[0] += 1
            time.sleep(1e-5)

    previous = sys.getswitchinterval()
    other = threading.Thread(target=count_in_python)
    sys.setswitchinterval(100.0)
    try:
        other.start()
        started.wait()
        while count[0] == 0:  # B is in its loop, waiting for the GIL or sleeping
            time.sleep(1e-3)
        for _ in range(attempts):
            before = count[0]
            call()
            after = count[0]
            if after > before:
                return True
        return False
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(previous)


@pytest.mark.skipif(not getattr(sys, "_is_gil_enabled", lambda: True)(),
                    reason="free-threaded Python: there is no GIL to release")
def test_c_calls_release_the_gil():
    """Another Python thread makes progress while a long C call (~0.2 s each)
    runs: the tile engine (distances), a miner and a dense loss.  The calls go
    through ``tripmine._core``, whose wrappers only pass pointers to C: the
    public functions also run NumPy code (validation, outputs), which may drop
    the GIL by itself and so would prove nothing about the C core."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 256)).astype(np.float32)
    labels = np.arange(4000) // 4
    out = np.empty((4000, 4000), dtype=np.float32)
    euclidean = _core.METRICS["euclidean"]
    c_calls = {
        "tm_pairwise_distances": lambda: _core.pairwise_distances(x, None, euclidean, out),
        "tm_batch_hard": lambda: _core.batch_hard(x, None, euclidean, labels, None),
        "tm_batch_all_loss": lambda: _core.batch_all_loss(x, None, euclidean, labels, None, 0.2,
                                                          False, "mean", False, False),
    }
    # The control: a C function that keeps the GIL (CPython's factorial, ~0.1 s)
    # never lets the other thread run, so the probe cannot pass by accident.
    assert not _progress_during(lambda: math.factorial(60000), attempts=2)
    held = [name for name, call in c_calls.items() if not _progress_during(call)]
    assert held == [], f"these C calls hold the GIL: {held}"


# ---- 3. leaks ----------------------------------------------------------------

LEAK_REPEATS = 2000
# 512 KiB over 2000 calls of one kind: any leak of >= 262 bytes per call fails
# (a 1 KiB-per-call leak grows the RSS by 2 MiB).  Measured growth with no leak: 0.
LEAK_LIMIT_KIB = 512

LEAK_SCRIPT = """
import ctypes, json
import numpy as np
import tripmine
from tripmine import metrics

def kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])

def raises(call, exc):
    try:
        call()
    except exc:
        return
    raise AssertionError("no exception")

rng = np.random.default_rng(0)
x = rng.standard_normal((24, 8)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
y = np.arange(24) // 4
ref = rng.standard_normal((20, 8)).astype(np.float32)
ry = np.arange(20) % 6
big = rng.standard_normal((96, 64)).astype(np.float32)  # several C threads
big_y = np.arange(96) // 4
bad = x.copy()
bad[3, 2] = np.nan
given = tripmine.batch_hard(x, y)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
out = np.empty((24, 20), np.float32)
calls = {
    "pairwise_distances": lambda: tripmine.pairwise_distances(x, ref, out=out),
    "masks": lambda: tripmine.negative_mask(y, ry),
    "batch_hard": lambda: tripmine.batch_hard(x, y, ref=ref, ref_labels=ry),
    "semi_hard_random": lambda: tripmine.semi_hard(x, y, select="random", seed=1),
    "semi_hard_all": lambda: tripmine.semi_hard(x, y, select="all", max_triplets=9, seed=1),
    "distance_weighted": lambda: tripmine.distance_weighted(x, y, seed=2),
    "loss_batch_hard_ref": lambda: tripmine.triplet_loss(x, y, ref=ref, ref_labels=ry),
    "loss_batch_all": lambda: tripmine.triplet_loss(x, y, mining="batch_all", normalize=True),
    "loss_given": lambda: tripmine.triplet_loss(x, None, mining=given, soft=True),
    "contrastive_ref": lambda: tripmine.contrastive_loss(x, y, ref=ref, ref_labels=ry, power=2),
    "threaded_batch_all_ref": lambda: tripmine.triplet_loss(
        big, big_y, mining="batch_all", ref=big[::-1], ref_labels=big_y),
    "threaded_contrastive": lambda: tripmine.contrastive_loss(big, big_y),
    "recall_at_k": lambda: metrics.recall_at_k(x, y, k=(1, 3)),
    "raise_nan": lambda: raises(lambda: tripmine.triplet_loss(bad, y), ValueError),
    "raise_shape": lambda: raises(lambda: tripmine.pairwise_distances(x, ref[:, :5]),
                                  ValueError),
    "raise_labels": lambda: raises(lambda: tripmine.contrastive_loss(x, y[:-1]), ValueError),
    "arcface": lambda: tripmine.arcface_loss(big, big_y, big[:24]),
    "softmax_none": lambda: tripmine.softmax_loss(x, y, ref[:6], reduction="none"),
    "center": lambda: tripmine.center_loss(big, big_y, big[:24]),
    "center_update": lambda: tripmine.update_centers(big[:24].copy(), big, big_y),
    "margin": lambda: tripmine.margin_loss(big, big_y, mining="batch_hard", beta=1.0),
    "lifted": lambda: tripmine.lifted_structured_loss(big, big_y),
    "margin_batch_all": lambda: tripmine.margin_loss(big, big_y, mining="batch_all"),
    "lifted_generalized_ref": lambda: tripmine.lifted_structured_loss(
        x, y, generalized=True, ref=ref, ref_labels=ry),
    "raise_lifted_margin": lambda: raises(lambda: tripmine.lifted_structured_loss(
        x, y, neg_margin=-1.0), ValueError),
    "raise_center_labels": lambda: raises(lambda: tripmine.update_centers(
        ref[:6].copy(), x, y + 100), ValueError),
    "raise_head_labels": lambda: raises(lambda: tripmine.cosface_loss(x, y + 100, ref),
                                        ValueError),
    "raise_margin": lambda: raises(lambda: tripmine.semi_hard(x, y, margin=-1.0), ValueError),
    "raise_dtype": lambda: raises(lambda: tripmine.batch_hard(x.astype(np.int32), y),
                                  TypeError),
    "raise_out": lambda: raises(lambda: tripmine.pairwise_distances(x, out=out), ValueError),
    # The control: a real leak of 1 KiB per call must be seen.
    "control_leak_1k": lambda: libc.malloc(1024),
}
# CPython keeps up to 2000 freed tuples of each length below 21 for reuse; a C call with
# 20 arguments (tm_margin_loss) fills the list of 20-tuples over its first ~2000 calls,
# about 400 KiB, bounded: a cache, not a leak.  Fill every list before measuring.
spare = [tuple(range(size + k, 2 * size + k)) for size in range(1, 21) for k in range(2100)]
del spare
growth = {}
for name, call in calls.items():
    for _ in range(200):  # warm-up: caches, arenas, OpenMP teams
        call()
    rss, vm = kib("VmRSS"), kib("VmSize")
    for _ in range(REPEATS):
        call()
    growth[name] = [kib("VmRSS") - rss, kib("VmSize") - vm]
print(json.dumps(growth))
"""


@linux_only
@skip_if_sanitized
def test_repeated_calls_do_not_leak():
    """Each kind of call (successful or raising) 2000 times after a warm-up, in a
    fresh interpreter: the resident set grows by < 512 KiB per kind, so a leak
    of >= 262 bytes per call fails.  A real 1 KiB-per-call malloc leak is the
    control that shows the measurement sees such leaks.  The address space
    (VmSize) is checked too, at the same bound: leaked buffers that were never
    touched do not show in the RSS."""
    # Passive OpenMP waiting changes no allocation; it keeps the 2400 calls of the
    # threaded kinds at ~0.3 ms each on a busy machine, where spinning workers made
    # small batch-all calls take ~12 ms (the test took 67 s instead of 3 s).
    completed = _run_script(LEAK_SCRIPT.replace("REPEATS", str(LEAK_REPEATS)),
                            OMP_WAIT_POLICY="passive")
    assert completed.returncode == 0, _describe_exit(completed)
    growth = json.loads(completed.stdout.strip().splitlines()[-1])
    control_rss, _ = growth.pop("control_leak_1k")
    assert control_rss > LEAK_LIMIT_KIB, f"the 1 KiB/call control leak went unseen: {growth}"
    leaking = {name: g for name, g in growth.items() if max(g) >= LEAK_LIMIT_KIB}
    assert leaking == {}, f"KiB of [RSS, VmSize] growth over {LEAK_REPEATS} calls: {leaking}"


# ---- 4. huge batches: 64-bit sizes ---------------------------------------------


def _sample_anchors(n: int, m: int, rng) -> np.ndarray:
    """50-odd anchors: the first and last two, 23 anywhere, and 23 whose pairs
    lie past 2**31 in row-major order (a * m >= 2**31), where a 32-bit pair
    index would wrap."""
    tail = -(-(2**31) // m)
    return np.unique(np.concatenate([[0, 1, n - 2, n - 1], rng.choice(n, 23, replace=False),
                                     rng.choice(np.arange(tail, n), 23, replace=False)]))


def test_reference_mining_beyond_2_31_pairs():
    """N = M = 48,000 (2.3e9 pairs > 2**31), D = 4, float32, reference mode.

    * batch_hard: on 50 sampled anchors (see ``_sample_anchors``) the
      mined positive is the farthest and the negative the nearest of the
      float64 reference, to the documented distance error (ties only within it);
    * triplet_loss over those triplets: loss, grad and ref_grad equal float64
      NumPy over all 48,000 triplets;
    * contrastive_loss (reduction="none", with gradient): the pair counts are
      exact 64-bit numbers, and each sampled anchor's loss and gradient row match
      float64 NumPy; ref_grad obeys translation invariance (sum of all gradient
      rows = 0).
    About 12-17 s on 2 cores (batch_hard 3-4 s, contrastive 9-13 s).
    """
    rng = np.random.default_rng(7)
    n = m = 48_000
    d, classes = 4, 1000
    assert n * m > 2**31
    x = rng.standard_normal((n, d)).astype(np.float32)
    ref = rng.standard_normal((m, d)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    ref_labels = rng.permutation(np.arange(m) % classes)  # 48 per class: all anchors usable
    x64, ref64 = x.astype(np.float64), ref.astype(np.float64)
    sample = _sample_anchors(n, m, rng)
    rtol = distance_rtol(np.float32, d)

    triplets = tripmine.batch_hard(x, labels, ref=ref, ref_labels=ref_labels)
    assert np.array_equal(triplets.anchor, np.arange(n))
    for a in sample:
        dist = np.sqrt(((ref64 - x64[a]) ** 2).sum(axis=1))
        positive = ref_labels == labels[a]
        p, q = triplets.positive[a], triplets.negative[a]
        assert positive[p] and not positive[q], a
        farthest, nearest = dist[positive].max(), dist[~positive].min()
        assert farthest - dist[p] <= 2 * rtol * farthest, (a, p, farthest, dist[p])
        assert dist[q] - nearest <= 2 * rtol * dist[q], (a, q, nearest, dist[q])

    # The loss over the mined triplets, checked in full.
    margin = 0.5
    result = tripmine.triplet_loss(x, None, mining=triplets, ref=ref, margin=margin,
                                   reduction="sum")
    a, p, q = triplets
    to_p, to_n = x64[a] - ref64[p], x64[a] - ref64[q]
    d_ap, d_an = np.linalg.norm(to_p, axis=1), np.linalg.norm(to_n, axis=1)
    z = d_ap - d_an + margin
    active = z > 0
    np.testing.assert_allclose(result.loss, z[active].sum(), rtol=1e-10)
    assert result.n_active == int(active.sum())
    unit_p = np.where(active[:, None], to_p / d_ap[:, None], 0.0)
    unit_n = np.where(active[:, None], to_n / d_an[:, None], 0.0)
    want_ref_grad = np.zeros_like(ref64)
    np.add.at(want_ref_grad, p, -unit_p)
    np.add.at(want_ref_grad, q, unit_n)
    np.testing.assert_allclose(result.grad, unit_p - unit_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.ref_grad, want_ref_grad, rtol=1e-5, atol=1e-5)

    # Contrastive: every one of the 2.3e9 pairs.
    neg_margin = 1.0
    result = tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels,
                                       neg_margin=neg_margin, reduction="none")
    per_class_x = np.bincount(labels, minlength=classes)
    per_class_ref = np.bincount(ref_labels, minlength=classes)
    n_positive = int((per_class_x * per_class_ref).sum())
    assert result.n_pairs == n * m
    assert result.n_positive_pairs == n_positive
    assert result.n_negative_pairs == n * m - n_positive
    assert n_positive <= result.n_active <= n * m
    for a in sample:
        diff = x64[a] - ref64
        dist = np.sqrt((diff**2).sum(axis=1))
        positive = ref_labels == labels[a]
        hinge = ~positive & (dist < neg_margin)
        want_loss = dist[positive].sum() + (neg_margin - dist[hinge]).sum()
        unit = diff / dist[:, None]
        want_grad = unit[positive].sum(axis=0) - unit[hinge].sum(axis=0)
        # Distance errors of rtol per term; a negative within that of the margin
        # may land on either side of the hinge (a unit vector more or less).
        terms = int(positive.sum() + hinge.sum())
        at_kink = int((~positive & (np.abs(dist - neg_margin) <= 2 * rtol)).sum())
        scale = dist[positive].sum() + dist[hinge].sum()
        assert abs(result.loss[a] - want_loss) <= loss_rtol(np.float32, d) * scale, a
        error = np.linalg.norm(result.grad[a] - want_grad)
        assert error <= 4 * loss_rtol(np.float32, d) * terms + at_kink, (a, error)
    total = (result.grad.sum(axis=0, dtype=np.float64)
             + result.ref_grad.sum(axis=0, dtype=np.float64))
    size = np.abs(result.grad).sum() + np.abs(result.ref_grad).sum()
    assert np.abs(total).max() <= 1e-5 * size, (total, size)


@skip_if_sanitized  # ASan aborts on an allocation that large instead of failing it
def test_outputs_larger_than_the_address_space_raise_memory_error():
    """Outputs of 160 TB and more (beyond x86-64's 128 TiB of user address
    space, so no overcommit setting can grant them) raise MemoryError before any
    C call."""
    x = np.zeros((8_000_000, 1), dtype=np.float32)
    with pytest.raises(MemoryError):
        tripmine.pairwise_distances(x, check_finite=False)
    with pytest.raises(MemoryError):
        tripmine.pairwise_distances(x[:5_000_000], x, check_finite=False)
    with pytest.raises(MemoryError):
        metrics.nearest_neighbors(x[:4], 2**46, check_finite=False)


# ---- 5. allocation failure: MemoryError, never a crash ------------------------

RLIMIT_PRELUDE = """
import json, resource, sys
import numpy as np
import tripmine
from tripmine import metrics

def vm_size():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

def limit_address_space(headroom):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
"""

MEMORY_ERROR_SCRIPT = RLIMIT_PRELUDE + """
MiB = 2**20
HEADROOM = 64 * MiB
n, d = 12000, 2048  # x: 94 MiB, allocated before the limit
x = np.full((n, d), 1 / np.sqrt(d), dtype=np.float32)  # unit rows (distance_weighted)
y = np.arange(n) // 4
small = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
tripmine.set_num_threads(2)
# Warm-up, so that the limit only meets the calls: the OpenMP team, its stacks
# and malloc arenas, lazily loaded code.
tripmine.triplet_loss(small, y[:256], mining="batch_all")
tripmine.contrastive_loss(small, y[:256], ref=small[::-1], ref_labels=y[:256])
tripmine.batch_hard(small, y[:256])
metrics.recall_at_k(small, y[:256])
nf = dict(check_finite=False)
given = tripmine.Triplets(*(np.arange(3) for _ in range(3)))
cases = {  # name: (where the failed allocation is, the call)
    # NumPy allocates the output
    "pairwise_output": ("numpy", lambda: tripmine.pairwise_distances(x[:5000, :16].copy())),
    "positive_mask": ("numpy", lambda: tripmine.positive_mask(y)),
    "triplet_mask": ("numpy", lambda: tripmine.triplet_mask(y[:1024])),
    # the C core allocates its packed copies, tiles or accumulators
    "pairwise_packing": ("c", lambda: tripmine.pairwise_distances(x[:16], x[16:], **nf)),
    "batch_hard": ("c", lambda: tripmine.batch_hard(x, y, **nf)),
    "batch_hard_second_pack": ("c", lambda: tripmine.batch_hard(
        x[:6000], y[:6000], ref=x[6000:], ref_labels=y[:6000], **nf)),
    "semi_hard_random": ("c", lambda: tripmine.semi_hard(
        x[:6000], y[:6000], ref=x[6000:], ref_labels=y[:6000], select="random", seed=0, **nf)),
    "distance_weighted": ("c", lambda: tripmine.distance_weighted(x, y, seed=0, **nf)),
    "batch_all_setup": ("c", lambda: tripmine.triplet_loss(x[:2400], y[:2400],
                                                           mining="batch_all", **nf)),
    "contrastive": ("c", lambda: tripmine.contrastive_loss(x[:2400], y[:2400], **nf)),
    "contrastive_ref": ("c", lambda: tripmine.contrastive_loss(
        x[:1000], y[:1000], ref=x[1000:], ref_labels=y[1000:], grad=False, **nf)),
    "given_triplets_gradient": ("c", lambda: tripmine.triplet_loss(x[:4000], None,
                                                                   mining=given, **nf)),
    "nearest_neighbors": ("c", lambda: metrics.nearest_neighbors(x, 1, **nf)),
    "recall_at_k": ("c", lambda: metrics.recall_at_k(x, y, **nf)),
}
limit_address_space(HEADROOM)
report = {}
for name, (where, call) in cases.items():
    outcomes = []
    start = None
    for attempt in range(6):  # repeated: a failure path that leaks would show
        if attempt == 3:  # glibc keeps some freed memory after the first calls, then is flat
            start = vm_size()
        try:
            call()
            outcomes.append("no error")
        except MemoryError as exc:
            outcomes.append("MemoryError: " + str(exc))
        except Exception as exc:
            outcomes.append(type(exc).__name__ + ": " + str(exc))
    report[name] = dict(where=where, outcomes=sorted(set(outcomes)),
                        vm_growth=vm_size() - start)
# Still healthy: calls that need about half the headroom succeed.
tripmine.pairwise_distances(x[:16], x[:4000], **nf)  # a 31 MiB packed copy
tripmine.contrastive_loss(x[:600], y[:600], **nf)
print(json.dumps(report))
"""


@linux_only
@skip_if_sanitized  # ASan reserves terabytes of address space and aborts on a failed malloc
def test_allocation_failure_raises_memory_error():
    """Under RLIMIT_AS = current address space + 64 MiB, with 94 MiB embeddings
    allocated before the limit, every call that needs more raises MemoryError:
    outputs allocated by NumPy, and allocations inside the C core (its packed
    copies of x, per-thread tiles, dense-loss panels and gradient buffers),
    which must come back as ``MemoryError("...: out of memory")``.  Each
    failing call runs 6 times: from the 4th on the address space must stay
    within 4 MiB (a failure path that forgot to free its first, successful
    allocations -- 18 MiB or more here -- would grow it; glibc keeps up to one
    such block after the first calls, hence the 3 unmeasured ones), and calls
    needing half the headroom still succeed afterwards.  The process must exit
    normally.
    """
    completed = _run_script(MEMORY_ERROR_SCRIPT)
    assert completed.returncode == 0, _describe_exit(completed)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    problems = {}
    for name, case in report.items():
        outcomes = case["outcomes"]
        expected = "out of memory" if case["where"] == "c" else ""
        if len(outcomes) != 1 or not outcomes[0].startswith("MemoryError: ") \
                or expected not in outcomes[0] or case["vm_growth"] > 4 * 2**20:
            problems[name] = case
    assert problems == {}


THREAD_START_SCRIPT = RLIMIT_PRELUDE + """
import threading
x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
out = np.empty((300, 300), dtype=np.float32)
tripmine.set_num_threads(2)
tripmine.pairwise_distances(x[:8], out=np.empty((8, 8), np.float32))  # serial: no team yet
go = threading.Event()

def call():
    go.wait()
    try:
        tripmine.pairwise_distances(x, out=out)  # about 0.3 MiB of C buffers, 2 threads
        print("no error", flush=True)
    except MemoryError as exc:
        print("MemoryError:", exc, flush=True)

if MODE == "new_python_thread":
    tripmine.pairwise_distances(x, out=out)  # the main thread's team exists
    worker = threading.Thread(target=call)  # started before the limit: its stack exists
    worker.start()
# 2 MiB: room for the call's buffers, not for a thread stack (8 MiB by default).
limit_address_space(2 * 2**20)
go.set()
if MODE == "new_python_thread":
    worker.join()
else:
    call()
print("DONE", flush=True)
"""


@linux_only
@skip_if_sanitized
@pytest.mark.parametrize("mode", ["first_call", "new_python_thread"])
def test_no_room_for_worker_threads_is_not_fatal(mode):
    """A parallel C call whose worker threads cannot be created (no address
    space for their stacks) must raise MemoryError or run on fewer threads --
    not end the process (as GNU OpenMP, tripmine's earlier runtime, did).  The
    pool creates its workers at the first parallel call (``first_call``); a new
    Python thread then uses the same pool (``new_python_thread``).
    """
    completed = _run_script(THREAD_START_SCRIPT.replace("MODE", repr(mode)))
    assert completed.returncode == 0 and "DONE" in completed.stdout, _describe_exit(completed)
    assert completed.stdout.splitlines()[0].startswith(("no error", "MemoryError:"))
