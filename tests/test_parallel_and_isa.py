"""Results do not depend on the thread count or (beyond rounding) on the ISA."""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from conftest import FLOAT_DTYPES, METRICS, distance_rtol
from tripmine import _core


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_identical_for_one_and_two_threads(isa, threads, rng, metric, dtype, mode):
    x = rng.standard_normal((517, 45)).astype(dtype)
    ref = None if mode == "self" else rng.standard_normal((1290, 45)).astype(dtype)
    tripmine.set_num_threads(1)
    one = tripmine.pairwise_distances(x, ref, metric=metric)
    tripmine.set_num_threads(2)
    two = tripmine.pairwise_distances(x, ref, metric=metric)
    assert np.array_equal(one, two)


def test_masks_identical_for_one_and_two_threads(threads, rng):
    labels = rng.integers(0, 7, size=300)
    ref_labels = rng.integers(0, 7, size=200)
    results = []
    for n in (1, 2):
        tripmine.set_num_threads(n)
        results.append((tripmine.positive_mask(labels), tripmine.negative_mask(labels, ref_labels),
                        tripmine.triplet_mask(labels[:60])))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_isa_agrees_with_generic(rng, metric, dtype):
    x = rng.standard_normal((211, 77)).astype(dtype)
    ref = rng.standard_normal((133, 77)).astype(dtype)
    previous = _core.get_isa()
    results = {}
    try:
        for isa in _core.usable_isas():
            _core.set_isa(isa)
            results[isa] = (tripmine.pairwise_distances(x, ref, metric=metric),
                            tripmine.pairwise_distances(x, metric=metric))
    finally:
        _core.set_isa(previous)
    generic = results["generic"]
    for isa, (cross, self_) in results.items():
        np.testing.assert_allclose(cross, generic[0], rtol=2 * distance_rtol(dtype, 77),
                                   err_msg=isa)
        np.testing.assert_allclose(self_, generic[1], rtol=2 * distance_rtol(dtype, 77),
                                   err_msg=isa)


def test_thread_control(threads):
    tripmine.set_num_threads(1)
    assert tripmine.get_num_threads() == 1
    tripmine.set_num_threads(3)
    expected = 3 if tripmine.build_info()["threaded"] else 1
    assert tripmine.get_num_threads() == expected
    tripmine.set_num_threads(None)
    assert tripmine.get_num_threads() >= 1


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_thread_count_must_be_a_positive_integer(threads, bad, exc):
    with pytest.raises(exc, match="n"):
        tripmine.set_num_threads(bad)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="instruction set 'sse9'"):
        _core.set_isa("sse9")
    assert _core.get_isa() in _core.usable_isas()


def test_generic_isa_always_available():
    assert "generic" in _core.usable_isas()
    assert set(_core.usable_isas()) <= set(_core.compiled_isas())


@pytest.mark.parametrize("loss", ["batch_all", "contrastive"])
def test_dense_losses_with_many_threads_split_the_reference_side(threads, rng, loss):
    """With 64 threads the per-thread reference-gradient accumulators would
    exceed their byte budget, so the walk is repeated over ranges of reference
    rows: the results must not change (beyond summation order)."""
    x = rng.standard_normal((300, 128))
    ref = rng.standard_normal((2000, 128))
    labels, ref_labels = rng.integers(0, 20, 300), rng.integers(0, 20, 2000)

    def run():
        if loss == "contrastive":
            return tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels,
                                             neg_margin=18.0)
        return tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels,
                                     mining="batch_all", margin=3.0)

    tripmine.set_num_threads(1)
    one = run()
    tripmine.set_num_threads(64)
    many = run()
    assert many.loss == one.loss and many.n_active == one.n_active > 0
    np.testing.assert_allclose(many.grad, one.grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(many.ref_grad, one.ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_mined_losses_are_bit_identical_on_any_thread_count(threads, rng, mode):
    """The README's promise: triplets, loss values and the gradients of losses over
    mined (or given) triplets do not change by a bit with the thread count."""
    x = rng.standard_normal((900, 24)).astype(np.float32)
    labels = rng.integers(0, 60, 900)
    ref = None if mode == "self" else rng.standard_normal((700, 24)).astype(np.float32)
    ref_labels = None if mode == "self" else rng.integers(0, 60, 700)
    results = {}
    for count in (1, 2, 5):
        tripmine.set_num_threads(count)
        results[count] = [
            tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels, mining=mining,
                                  margin=0.5, normalize=True, seed=9)
            for mining in ("batch_hard", "semi_hard", "distance_weighted")
        ]
    for count in (2, 5):
        for one, other in zip(results[1], results[count]):
            assert other.loss == one.loss
            assert np.array_equal(other.grad, one.grad)
            if ref is not None:
                assert np.array_equal(other.ref_grad, one.ref_grad)
            for a, b in zip(one.triplets, other.triplets):
                assert np.array_equal(a, b)


_CONTENDED_SCRIPT = """
import hashlib, os, sys
import numpy as np
if hasattr(os, "sched_setaffinity") and CPUS:
    os.sched_setaffinity(0, CPUS)  # before the pool exists: its workers inherit it
import tripmine
from tripmine import _core

rng = np.random.default_rng(5)
x = rng.standard_normal((700, 32))
ref = rng.standard_normal((900, 32))
labels, ref_labels = rng.integers(0, 40, 700), rng.integers(0, 40, 900)
tripmine.set_num_threads(THREADS)
digests = set()
for _ in range(ROUNDS):
    h = hashlib.sha256()
    for result in (
        tripmine.triplet_loss(x, labels, ref=ref, ref_labels=ref_labels, mining="batch_all"),
        tripmine.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels),
        tripmine.triplet_loss(x, labels, mining="batch_all"),
    ):
        h.update(np.float64(result.loss).tobytes())
        h.update(result.grad.tobytes())
        if result.ref_grad is not None:
            h.update(result.ref_grad.tobytes())
    digests.add(h.hexdigest())
print(len(digests), sorted(digests)[0], _core.pool_stats()["worker_items"] > 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"),
                    reason="needs sched_setaffinity")
def test_reference_gradients_are_reproducible_under_preemption():
    """Batch-all and contrastive sum reference gradients per thread slot; the pool lets
    any participant run a slot's next unit (so a preempted worker never holds up the
    caller) while each slot still runs its units in order.  Four threads squeezed onto
    one CPU are preempted constantly: every run must give the same bits, and the same
    bits as four threads with the machine to themselves."""
    import os
    import subprocess
    import sys

    def run(cpus, rounds):
        script = (_CONTENDED_SCRIPT.replace("CPUS", repr(cpus)).replace("THREADS", "4")
                  .replace("ROUNDS", str(rounds)))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        count, digest, workers_ran = done.stdout.split()
        return int(count), digest, workers_ran == "True"

    one_cpu = {min(os.sched_getaffinity(0))}
    count, squeezed, workers_ran = run(one_cpu, 12)
    assert count == 1
    if tripmine.build_info()["threaded"]:
        assert workers_ran  # the workers did take part, even on one CPU
    assert run(set(), 2)[:2] == (1, squeezed)
