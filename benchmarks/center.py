"""Center loss + the paper's center update against a NumPy ``x - centers[labels]`` pass,
timed ALTERNATING with it.

    python benchmarks/center.py [--n 1024 4096] [--d 128] [--runs 3] [--threads 2]
                                [--targets] [--two-calls] [--json PATH]

Data: float32, ``x`` (N, D) standard normal, labels ``np.repeat(np.arange(N // 4), 4)`` (P x
K, K = 4), ``centers`` (N // 4, D) standard normal (seeded).  The op is the paper's training
step in one call: ``tripmine.center_loss(x, labels, centers, centers_grad=False,
update=0.5)`` (the loss and dL/dx, the paper's rule needing no dL/dC, then the centers moved
in place, on a copy that the step keeps updating, as a trainer does); ``--two-calls`` times
it as ``center_loss`` followed by ``update_centers(centers, x, labels, alpha=0.5)``.  The
baseline is the vectorised NumPy pass every center loss starts from,
``np.subtract(x, centers[labels], out=buf)`` into a preallocated buffer.  Timing as in
``alternating.py`` (its ``measure_once``): rounds of alternating (baseline, op) pairs,
median over median, then the isolated ratio; median of ``--runs``.

With ``TRIPMINE_BENCH_PEERS=1`` and torch importable, the center loss as its popular
PyTorch port computes it is timed too (isolated, same data, torch on the same threads): the
(N, C) matrix of squared distances ||x||^2 + ||c||^2 - 2 x.c^T, masked to each sample's
own class, clamped to [1e-12, 1e12] and summed over N, differentiated by autograd, with an
SGD step on the centers.  pytorch-metric-learning has no center loss.
"""

from __future__ import annotations

import json
import os
import time

import alternating as alt
import numpy as np

import benchcommon as bc
import tripmine

#: N -> the largest median alternating ratio to the NumPy pass that passes.
TARGET = 2.0


def make_data(n: int, d: int):
    rng = np.random.default_rng([bc.SEED, n, d, 7])
    x = rng.standard_normal((n, d), dtype=np.float32)
    labels = np.repeat(np.arange(n // 4), 4)
    centers = rng.standard_normal((n // 4, d), dtype=np.float32)
    return x, labels, centers


def make_op(x, labels, centers, two_calls: bool = False):
    state = centers.copy()

    def step():
        tripmine.center_loss(x, labels, state, centers_grad=False, update=0.5)

    def steps():
        tripmine.center_loss(x, labels, state, centers_grad=False)
        tripmine.update_centers(state, x, labels, alpha=0.5)
    return steps if two_calls else step


def make_baseline(x, labels, centers):
    buf = np.empty_like(x)
    return lambda: np.subtract(x, centers[labels], out=buf)


def peer_step(x, labels, centers):
    """The popular port's formula in torch (N x C distances), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    xt = torch.from_numpy(x).requires_grad_(True)
    ct = torch.nn.Parameter(torch.from_numpy(centers.copy()))
    lt = torch.from_numpy(labels)
    classes = torch.arange(centers.shape[0])
    optimiser = torch.optim.SGD([ct], lr=0.5)

    def step():
        xt.grad = None
        optimiser.zero_grad()
        n = xt.shape[0]
        distmat = (xt.pow(2).sum(1, keepdim=True) + ct.pow(2).sum(1).unsqueeze(0)
                   - 2 * xt @ ct.T)
        mask = lt.unsqueeze(1).eq(classes.unsqueeze(0))
        loss = (distmat * mask).clamp(1e-12, 1e12).sum() / n
        loss.backward()
        optimiser.step()
    return step


def main(argv=None) -> int:
    parser = alt.small_op_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--two-calls", action="store_true",
                        help="time center_loss + update_centers instead of update=")
    args = parser.parse_args(argv)
    data = {n: make_data(n, args.d) for n in args.n}
    results = alt.compare_over_n(
        args, lambda n, d: (make_op(*data[n], two_calls=args.two_calls),
                            make_baseline(*data[n])),
        ("numpy ms", "op ms"), TARGET, (20, 2000))
    if os.environ.get("TRIPMINE_BENCH_PEERS") == "1":
        for n, entry in results.items():
            step = peer_step(*data[n])
            if step is None:
                print("peer: torch not importable")
                break
            import torch
            torch.set_num_threads(args.threads or torch.get_num_threads())
            step()
            times = []
            for _ in range(max(5, entry["rounds"] // 20)):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            peer = float(np.median(times)) * 1e3
            ours = float(np.median([r["op_isolated_s"] for r in entry["runs"]])) * 1e3
            print(f"N={n}: torch port (N x C distances): {peer:.3f} ms = {peer / ours:.1f}x "
                  f"tripmine's step (isolated)")
            entry["peer_ms"] = peer
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: dict(summary=e["summary"], rounds=e["rounds"],
                               peer_ms=e.get("peer_ms")) for n, e in results.items()},
                      f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
