"""Where the dense ops' time goes: each as a ratio to sgemm, with and without its gradient.

    python benchmarks/breakdown.py [N]        # default N = 4096, D = 128, float32, 2 threads

Prints the median of 7 calls of: sgemm (the baseline of the suite), a full N x N product
pass (reference-mode ``pairwise_distances``: no upper-triangle saving), batch-all with
``grad=False`` and with the gradient, and distance-weighted mining alone and with its loss.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import benchcommon as bc
import tripmine


def median_ms(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    threads = bc.bench_threads()
    bc.set_blas_threads(threads)
    tripmine.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n // 4), 4)
    y = np.ascontiguousarray(x.T)
    product = np.empty((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    ref = x.copy()
    cases = [
        ("sgemm", lambda: np.matmul(x, y, out=product)),
        ("full product pass (ref mode)",
         lambda: tripmine.pairwise_distances(x, ref, out=out, check_finite=False)),
        ("batch_all, loss only", lambda: tripmine.triplet_loss(x, labels, mining="batch_all",
                                                              grad=False)),
        ("batch_all, loss + grad", lambda: tripmine.triplet_loss(x, labels, mining="batch_all")),
        ("distance_weighted, mining", lambda: tripmine.distance_weighted(x, labels, seed=0)),
        ("distance_weighted, loss + grad",
         lambda: tripmine.triplet_loss(x, labels, mining="distance_weighted", seed=0)),
    ]
    base = None
    print(f"N={n}, D=128, float32, {threads} threads, median of 7")
    for name, fn in cases:
        ms = median_ms(fn)
        base = base or ms
        print(f"{name:32s} {ms:8.1f} ms  {ms / base:5.2f}x sgemm")


if __name__ == "__main__":
    main()
