"""Class-sharded margin-softmax heads: per-rank step time and peak memory against C.

Each configuration (ranks, C, sample rate) runs in fresh gloo processes on this machine:
every rank builds ``ShardedMarginSoftmax("arcface", C, D)`` (its slice of W), then times
training steps on its share of a global batch of M embeddings -- forward, backward and an
SGD update of its slice -- and reports the step time and its peak RSS growth (the process's
peak resident memory after the steps minus its resident memory before the head was built).
Ranks get one thread each (``--threads``), so 4 ranks on a 2-core machine time-share the
cores: the step times then show the communication and the per-rank work, not a speed-up.

    python benchmarks/sharded.py                       # the table of benchmarks/RESULTS.md
    python benchmarks/sharded.py --ranks 1 2 --classes 10000 100000 --steps 2
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank, world, port, out_dir, classes, dim, batch, rate, steps, threads):
    import torch
    import torch.distributed as dist

    import tripmine
    from tripmine.torch.distributed import ShardedMarginSoftmax

    torch.set_num_threads(threads)
    tripmine.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    try:
        rng = np.random.default_rng(rank)
        local = batch // world + (rank < batch % world)
        x = torch.from_numpy(rng.standard_normal((local, dim)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, classes, local))
        before = _rss_mib()
        head = ShardedMarginSoftmax("arcface", classes, dim, sample_rate=rate, seed=0)
        optimiser = torch.optim.SGD(head.parameters(), lr=0.1)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            xt = x.clone().requires_grad_(True)
            dist.barrier()
            start = time.perf_counter()
            loss = head(xt, labels)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        peak = _peak_mib() - before
    finally:
        dist.destroy_process_group()
    np.save(os.path.join(out_dir, f"rank{rank}.npy"),
            np.array([np.median(times[1:]), peak, loss.item(), head.n_classes_used]))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(world, classes, dim, batch, rate, steps, threads):
    import torch

    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(
            _worker, args=(world, _free_port(), out_dir, classes, dim, batch, rate, steps,
                           threads), nprocs=world, join=True)
        return np.array([np.load(os.path.join(out_dir, f"rank{r}.npy")) for r in range(world)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch M")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    args = parser.parse_args(argv)
    print(f"ArcFace, D = {args.dim}, global batch M = {args.batch}, float32, "
          f"{args.threads} thread(s) per rank, gloo on localhost; median of {args.steps} "
          f"steps after one warm-up\n")
    print("| C | ranks | sample rate | classes used | step (s) | W slice per rank (MiB) | "
          "peak RSS growth per rank (MiB, max) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for classes in args.classes:
        for rate in args.rates:
            for world in args.ranks:
                table = run(world, classes, args.dim, args.batch, rate, args.steps,
                            args.threads)
                slice_mib = -(-classes // world) * args.dim * 4 / 2**20
                print(f"| {classes:,} | {world} | {rate:g} | {int(table[0, 3]):,} | "
                      f"{table[:, 0].max():.3f} | {slice_mib:.0f} | {table[:, 1].max():.0f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
