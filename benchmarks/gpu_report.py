"""GPU benchmark: tripmine on CuPy against a cuBLAS GEMM of the same batch and
against pytorch-metric-learning on CUDA tensors.  Prints the ratio table of
issue 7's targets (one H100, float32, K = 4 samples per class).

    python benchmarks/gpu_report.py                    # tripmine and the GEMM
    TRIPMINE_BENCH_PEERS=1 python benchmarks/gpu_report.py   # + PML at N = 8,192
    python benchmarks/gpu_report.py --n 16384 65536 --d 128 512 --json gpu.json

Timing: cupyx.profiler.benchmark (CUDA events around each call, after warm-up:
the GPU time, synchronised); the GEMM reference is cupy.matmul(x, x.T.copy()).
Each tripmine case is loss + gradient (triplet_loss, grad=True).  Targets:
batch-hard <= 2x the GEMM at N = 16,384 and <= 1.5x at N = 65,536 (D = 128 and
512); batch-all, semi-hard, distance-weighted <= 4x the GEMM; every op >= 10x
faster than PML at N = 8,192 (PML cases that fail, e.g. out of memory in its
N^3 paths, are reported as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CASES = {
    "batch_hard": dict(mining="batch_hard"),
    "batch_all": dict(mining="batch_all"),
    "semi_hard": dict(mining="semi_hard"),
    "distance_weighted": dict(mining="distance_weighted", normalize=True, seed=0),
}
TARGET = {"batch_hard": {16384: 2.0, 65536: 1.5}, "batch_all": 4.0, "semi_hard": 4.0,
          "distance_weighted": 4.0}
K = 4


def make_batch(n: int, d: int, dtype="float32"):
    import cupy as cp

    rng = cp.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=cp.float32).astype(dtype)
    labels = cp.repeat(cp.arange(n // K), K)
    return x, labels


def gpu_time(fn, repeat: int = 10) -> float:
    """Median GPU seconds of fn() over `repeat` synchronised runs."""
    import numpy as np
    from cupyx.profiler import benchmark

    result = benchmark(fn, n_repeat=repeat, n_warmup=2)
    return float(np.median(result.gpu_times[0]))


def tripmine_case(x, labels, case: str):
    import tripmine

    kwargs = CASES[case]
    return lambda: tripmine.triplet_loss(x, labels, **kwargs)


def gemm_case(x):
    import cupy as cp

    xt = x.T.copy()
    return lambda: cp.matmul(x, xt)


def pml_case(x, labels, case: str):
    """pytorch-metric-learning on the same CUDA tensors: loss + backward."""
    import torch
    from pytorch_metric_learning import losses, miners

    xt = torch.as_tensor(x, device="cuda").clone().requires_grad_(True)
    lt = torch.as_tensor(labels, device="cuda")
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    miner = {
        "batch_hard": miners.BatchHardMiner(),
        "batch_all": None,
        "semi_hard": miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        "distance_weighted": miners.DistanceWeightedMiner(),
    }[case]

    def step():
        xt.grad = None
        emb = torch.nn.functional.normalize(xt) if case == "distance_weighted" else xt
        loss = loss_fn(emb, lt, miner(emb, lt)) if miner is not None else loss_fn(emb, lt)
        loss.backward()

    return step


def run(ns, ds, repeat, peers, peer_n=8192):
    rows = []
    for d in ds:
        for n in ns:
            x, labels = make_batch(n, d)
            gemm = gpu_time(gemm_case(x), repeat)
            rows.append(dict(n=n, d=d, case="gemm", seconds=gemm, ratio=1.0))
            for case in CASES:
                try:
                    t = gpu_time(tripmine_case(x, labels, case), repeat)
                except Exception as exc:  # report, keep going
                    rows.append(dict(n=n, d=d, case=case, error=repr(exc)))
                    continue
                target = TARGET[case]
                target = target.get(n) if isinstance(target, dict) else target
                rows.append(dict(n=n, d=d, case=case, seconds=t, ratio=t / gemm,
                                 target=target))
        if peers:
            x, labels = make_batch(peer_n, d)
            for case in CASES:
                mine = gpu_time(tripmine_case(x, labels, case), repeat)
                try:
                    theirs = gpu_time(pml_case(x, labels, case), max(3, repeat // 3))
                    rows.append(dict(n=peer_n, d=d, case=f"pml_{case}", seconds=theirs,
                                     speedup=theirs / mine, target=10.0))
                except Exception as exc:  # PML's N^3 paths run out of memory
                    rows.append(dict(n=peer_n, d=d, case=f"pml_{case}", error=repr(exc)[:200]))
    return rows


def table(rows) -> str:
    lines = ["| N | D | case | ms | vs GEMM | vs PML (speedup) | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['d']} | {r['case']} | failed: {r['error'][:60]} "
                         f"| | | | |")
            continue
        ms = f"{1e3 * r['seconds']:.3f}"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        target = r.get("target")
        if target is None:
            met = ""
        elif "speedup" in r:
            met = "yes" if r["speedup"] >= target else "NO"
        else:
            met = "yes" if r["ratio"] <= target else "NO"
        lines.append(f"| {r['n']} | {r['d']} | {r['case']} | {ms} | {ratio} | {speed} | "
                     f"{'' if target is None else target} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--d", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"gpu_report: no usable CuPy/CUDA device ({exc}); nothing measured",
              file=sys.stderr)
        return 2
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}, CuPy {cupy.__version__}")
    rows = run(args.n, args.d, args.repeat, os.environ.get("TRIPMINE_BENCH_PEERS") == "1")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
