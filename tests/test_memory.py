"""The memory contract: miners, losses and metrics never materialise N x M.

At N = 16384, D = 128 (float32, 8 MiB of embeddings) an N x N float32 matrix
would take 1 GiB; each loss must instead stay within 64 MB of peak-RSS growth
(its outputs -- an 8 MiB gradient, the triplets -- included).  Each loss runs
in a fresh interpreter so that one call's peak cannot hide another's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import skip_if_sanitized

LIMIT_KIB = 64 * 1000  # 64 MB

SCRIPT = """
import json, resource, sys, time
import numpy as np
import tripmine
import tripmine.metrics

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

n, d, k = 16384, 128, 4
x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
labels = np.arange(n) // k  # P x K with K = 4
loss = {loss}
loss(x[:64], labels[:64])  # warm-up: code paths, thread pool
before = peak_kib()
start = time.perf_counter()
result = loss(x, labels)
elapsed = time.perf_counter() - start
print(json.dumps(dict(growth_kib=peak_kib() - before, seconds=elapsed,
                      finite=bool(np.isfinite(getattr(result, 'loss', result))))))
"""

LOSSES = {
    "batch_hard": "lambda x, y: tripmine.triplet_loss(x, y, mining='batch_hard')",
    "batch_all": "lambda x, y: tripmine.triplet_loss(x, y, mining='batch_all')",
    "semi_hard": "lambda x, y: tripmine.triplet_loss(x, y, mining='semi_hard')",
    "distance_weighted": ("lambda x, y: tripmine.triplet_loss(x, y, mining='distance_weighted',"
                          " normalize=True, seed=0)"),
    "contrastive": "lambda x, y: tripmine.contrastive_loss(x, y)",
    "lifted": "lambda x, y: tripmine.lifted_structured_loss(x, y)",
    "lifted_generalized": "lambda x, y: tripmine.lifted_structured_loss(x, y, generalized=True)",
    "margin_batch_all": "lambda x, y: tripmine.margin_loss(x, y, mining='batch_all')",
    # Retrieval metrics: top-k neighbour lists (k = 5 and R = 3 here), no N x N.
    "recall_at_k": "lambda x, y: tripmine.metrics.recall_at_k(x, y, k=5)",
    "map_at_r": "lambda x, y: tripmine.metrics.mean_average_precision_at_r(x, y)",
}


@skip_if_sanitized
@pytest.mark.parametrize("name", list(LOSSES))
def test_peak_memory_growth_is_bounded(name):
    """One N = 16384 loss + gradient grows the peak RSS by less than 64 MB."""
    completed = subprocess.run([sys.executable, "-c", SCRIPT.format(loss=LOSSES[name])],
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert report["growth_kib"] < LIMIT_KIB, report


HEAD_SCRIPT = """
import json, resource
import numpy as np
import tripmine

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

n, c, d = 4096, 1_000_000, 8
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d), dtype=np.float32)
weight = rng.standard_normal((c, d), dtype=np.float32)
labels = rng.integers(0, c, n)
tripmine.{fn}(x[:8], labels[:8] % 16, weight[:16])  # warm-up
before = peak_kib()
result = tripmine.{fn}(x, labels, weight)
outputs = (result.grad.nbytes + result.weight_grad.nbytes) // 1024
print(json.dumps(dict(growth_kib=peak_kib() - before - outputs,
                      finite=bool(np.isfinite(result.loss)))))
"""


@skip_if_sanitized
@pytest.mark.parametrize("fn", ["arcface_loss", "softmax_loss"])
def test_head_memory_is_linear_in_n_plus_c(fn):
    """A head over a million classes (N = 4096): the peak RSS grows by less than 64 MB
    beyond its outputs (dL/dx, dL/dW), where the N x C logits alone would take 16 GB.
    D = 8 keeps the run short; the D-dependent part (two packed copies of x) is measured at
    D = 512 in benchmarks/RESULTS.md."""
    completed = subprocess.run([sys.executable, "-c", HEAD_SCRIPT.format(fn=fn)],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert report["growth_kib"] < LIMIT_KIB, report
