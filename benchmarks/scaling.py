"""Batch-hard loss + gradient at the sizes pytest-benchmark's suite does not cover.

    python benchmarks/scaling.py

Prints, for float32, P x K labels (K = 4), best of a few calls each: the time
against a float32 sgemm of the same batch (``np.matmul(x, y)``, ``y = x.T``
made contiguous) at D = 512, N = 4096 and at D = 128, N = 4096 and 16384;
the growth from N = 4096 to 16384; and the 1-thread vs 2-thread speedup.
"""

from __future__ import annotations

import time

import numpy as np

import tripmine


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    tripmine.set_num_threads(2)
    rows = []
    for n, d in ((4096, 512), (4096, 128), (16384, 128)):
        x = rng.standard_normal((n, d), dtype=np.float32)
        labels = np.repeat(np.arange(n // 4), 4)
        y = np.ascontiguousarray(x.T)
        repeats = 5 if n <= 4096 else 2
        gemm = best_of(lambda: np.matmul(x, y), repeats)  # noqa: B023
        two = best_of(lambda: tripmine.triplet_loss(x, labels), repeats)  # noqa: B023
        tripmine.set_num_threads(1)
        one = best_of(lambda: tripmine.triplet_loss(x, labels), repeats)  # noqa: B023
        tripmine.set_num_threads(2)
        rows.append((n, d, gemm, two, one))
    print("| N | D | sgemm (ms) | batch-hard loss+grad, 2 threads (ms) | / sgemm | 1 thread (ms) "
          "| speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, d, gemm, two, one in rows:
        print(f"| {n} | {d} | {gemm * 1e3:.1f} | {two * 1e3:.1f} | {two / gemm:.2f} | "
              f"{one * 1e3:.1f} | {one / two:.2f} |")
    growth = rows[2][3] / rows[1][3]
    print(f"\nN = 4096 -> 16384 (D = 128): batch-hard time grows {growth:.1f}x (16x is quadratic)")


if __name__ == "__main__":
    main()
