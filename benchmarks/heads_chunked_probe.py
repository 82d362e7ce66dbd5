"""A probe of the three-product design for the heads (Liger-Kernel's row chunks), in NumPy
with OpenBLAS, timed alternating with the logits' sgemm.

    python benchmarks/heads_chunked_probe.py [--n 1024] [--d 512] [--c 100000]
                                             [--chunks 128 256 1024] [--runs 3]

Per chunk of r rows (plain softmax, no normalisation or margin, which would only add work):
S = X_r W^T into a kept (r, C) buffer, the softmax in place, dX_r = S W, and dW += S^T X_r
(through a (C, D) temporary: NumPy has no beta = 1 GEMM).  It answers one question: does
keeping a chunk's logits (three GEMM-sized products) beat recomputing them (four), as
tripmine's C core does?  Threads: 2 for OpenBLAS (benchcommon.set_blas_threads).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import benchcommon as bc


def chunked_step(x, w, wt, r, s, tmp, dw, dx):
    dw[...] = 0
    for i0 in range(0, x.shape[0], r):
        xr = x[i0:i0 + r]
        sv = s[:len(xr)]
        np.matmul(xr, wt, out=sv)
        sv -= sv.max(axis=1, keepdims=True)
        np.exp(sv, out=sv)
        sv /= sv.sum(axis=1, keepdims=True)
        np.matmul(sv, w, out=dx[i0:i0 + r])
        np.matmul(sv.T, xr, out=tmp)
        dw += tmp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--c", type=int, default=100_000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    bc.set_blas_threads(2)
    rng = np.random.default_rng(bc.SEED)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    w = rng.standard_normal((args.c, args.d), dtype=np.float32) * np.float32(0.05)
    wt = np.ascontiguousarray(w.T)
    buf = np.empty((args.n, args.c), np.float32)
    print(bc.describe_cpu(bc.cpu_facts()))
    for r in args.chunks:
        s = np.empty((r, args.c), np.float32)
        tmp, dw = np.empty_like(w), np.empty_like(w)
        dx = np.empty_like(x)
        gemm_t, op_t = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            np.matmul(x, wt, out=buf)
            middle = time.perf_counter()
            chunked_step(x, w, wt, r, s, tmp, dw, dx)
            op_t.append(time.perf_counter() - middle)
            gemm_t.append(middle - start)
        print(f"rows per chunk {r:5d} ({s.nbytes / 1e6:.0f} MB of logits): "
              f"{np.median(op_t) / np.median(gemm_t):.2f}x the sgemm "
              f"({np.median(gemm_t) * 1e3:.0f} ms), alternating")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
