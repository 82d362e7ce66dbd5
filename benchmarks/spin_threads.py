"""Does tripmine's second thread help while NumPy's OpenBLAS workers spin?

    python benchmarks/spin_threads.py [--n 4096] [--pairs 9]
    OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/spin_threads.py   # workers sleep at once

OpenBLAS keeps its default threads (all CPUs); tripmine runs on 1 and then 2 threads.  For
each op (batch-all triplet loss and contrastive loss, loss + gradient, float32, D = 128,
unit rows, K = 4) it prints the median of ``--pairs`` calls timed alternating with the
sgemm ``x @ x.T`` (each right after a product, as a trainer calls it) and of as many calls
in a row (isolated).  Equal alternating times on 1 and 2 threads mean the second thread
got no CPU while OpenBLAS's workers spun.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tripmine


def median_ms(times: list[float]) -> float:
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(args.n // 4), 4)
    xt = np.ascontiguousarray(x.T)
    product = np.empty((args.n, args.n), np.float32)
    ops = {
        "batch_all": lambda: tripmine.triplet_loss(x, labels, mining="batch_all",
                                                   check_finite=False),
        "contrastive": lambda: tripmine.contrastive_loss(x, labels, check_finite=False),
    }
    print("threads  op            sgemm ms  alternating ms  isolated ms")
    for threads in (1, 2):
        tripmine.set_num_threads(threads)
        for name, op in ops.items():
            op()
            np.matmul(x, xt, out=product)
            gemm, alternating, isolated = [], [], []
            for _ in range(args.pairs):
                start = time.perf_counter()
                np.matmul(x, xt, out=product)
                gemm.append(time.perf_counter() - start)
                start = time.perf_counter()
                op()
                alternating.append(time.perf_counter() - start)
            for _ in range(args.pairs):
                start = time.perf_counter()
                op()
                isolated.append(time.perf_counter() - start)
            print(f"{threads:7d}  {name:12s} {median_ms(gemm):9.1f} {median_ms(alternating):15.1f}"
                  f" {median_ms(isolated):12.1f}")


if __name__ == "__main__":
    main()
