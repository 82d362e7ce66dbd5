"""What tripmine costs inside a training step, next to the model's own BLAS/torch threads.

    python benchmarks/trainer_step.py [--n 1024 4096] [--rules ...] [--repeats 5]
                                      [--trainers numpy torch] [--json PATH] [--check 0.10]

Nothing is pinned: the script sets no environment variable and changes no thread count,
so tripmine, OpenBLAS and torch all run with their library defaults (the header prints
them, and warns about thread variables that are set in the environment it was given).

Two trainers, each the same MLP 512 -> 1024 -> 1024 -> 128 (ReLU after both hidden
layers), float32 on the CPU, over one fixed standard-normal (N, 512) input batch with
P x K labels (K = 4: ``np.repeat(np.arange(N // 4), 4)``, shuffled once by a seeded rng):

* ``numpy``: forward and backward by hand-written NumPy matmuls (OpenBLAS sgemm, into
  preallocated buffers) and a plain SGD update of the weights and biases (lr 1e-3).  The
  loss is ``tripmine.triplet_loss(emb, labels, mining=rule, normalize=True)`` (``seed=0``
  for distance_weighted) or ``tripmine.contrastive_loss(emb, labels, normalize=True)``,
  and ``result.grad`` is backpropagated.
* ``torch`` (when torch imports): ``torch.nn.Sequential`` of Linear/ReLU, ``torch.optim.SGD``
  (lr 1e-3), loss ``tripmine.torch.TripletLoss(mining=rule, normalize=True)`` (``seed=0``
  for distance_weighted, with the module's default ``advance_seed=True``: every call
  draws new triplets, as in training) or ``tripmine.torch.ContrastiveLoss(normalize=True)``.
  torch is imported only after the numpy rows, so those run without torch loaded.

Rules: batch_hard, semi_hard, batch_all, distance_weighted, contrastive.

Per (trainer, N, rule), three quantities, timed in the same process:

* ``model``: forward + backward + SGD update of the MLP, backpropagating a fixed
  dL/d(embeddings) (the rule's gradient at the initial embeddings); no tripmine call.
* ``loss``: the tripmine call alone (loss + gradient) on fixed embeddings of the same
  shape (the model's initial output).  torch: the loss module's forward + ``backward()``
  from a leaf tensor that requires grad.
* ``step``: forward + tripmine loss + backward + SGD update (a real training step).

Each quantity is timed in a block of its own: after a quarter of a second of idleness
(so that the thread pools of the block before, OpenBLAS's busy-waiting workers above all,
are asleep), the same number of calls back to back, and the block's median.  So ``model``
and ``loss`` are each what it costs alone, and the overhead ``step / (model + loss) - 1``
is what running them together costs: thread pools fighting each other (a BLAS pool that
busy-waits after its products takes a core from tripmine's threads, and a runtime that
busy-waits after tripmine's call takes one from the next product), and caches.  The warm-up
(``--warmup`` calls of each) sets the calls per block: about ``--target`` seconds of the
slowest quantity, at least ``--min-iters``.  ``--repeats`` repeats of the three blocks; the
table gives per row the medians over the repeats, the median and the WORST overhead over
the repeats, and each repeat's overhead.  Garbage collection is off while timing.
``--check X`` exits with 1 if any row's worst overhead exceeds X (0 otherwise).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

import numpy as np

import benchcommon as bc
import tripmine

D_IN, HIDDEN, D_OUT = 512, 1024, 128
K = 4  # samples per class
LR = 1e-3
SEED = bc.SEED
RULES = ("batch_hard", "semi_hard", "batch_all", "distance_weighted", "contrastive")
TRAINERS = ("numpy", "torch")
QUANTITIES = ("model", "loss", "step")
# Rows during which other processes used more than this share of all CPUs get a warning.
BUSY_WARN = 0.10


# --- data and the tripmine call -----------------------------------------------------------


def make_batch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (N, 512) float32 standard-normal inputs and the shuffled P x K labels."""
    if n % K or n < 2 * K:
        raise ValueError(f"N must be a multiple of {K} and at least {2 * K}, got {n}")
    rng = np.random.default_rng([SEED, n, 3])
    x = rng.standard_normal((n, D_IN), dtype=np.float32)
    labels = rng.permutation(np.repeat(np.arange(n // K), K)).astype(np.int64)
    return x, labels


def tripmine_loss(emb: np.ndarray, labels: np.ndarray, rule: str):
    """The numpy trainer's loss: a tripmine result with ``.loss`` and ``.grad``."""
    if rule == "contrastive":
        return tripmine.contrastive_loss(emb, labels, normalize=True)
    if rule == "distance_weighted":
        return tripmine.triplet_loss(emb, labels, mining=rule, normalize=True, seed=0)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    return tripmine.triplet_loss(emb, labels, mining=rule, normalize=True)


# --- the numpy trainer ---------------------------------------------------------------------


class NumpyMLP:
    """512-1024-1024-128 ReLU MLP, forward and backward by hand (``x @ W + b``, W stored
    (in, out)), SGD update in place.  Initialised like ``torch.nn.Linear``
    (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases).  Every intermediate
    lives in a buffer allocated once for batch size N, so a step allocates nothing."""

    def __init__(self, n: int, seed: int = SEED):
        rng = np.random.default_rng([seed, 7])
        dims = (D_IN, HIDDEN, HIDDEN, D_OUT)
        self.weights, self.biases = [], []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
            self.biases.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
        f32 = np.float32
        self.hidden = [np.empty((n, HIDDEN), f32) for _ in range(2)]  # post-ReLU activations
        self.grad_hidden = [np.empty((n, HIDDEN), f32) for _ in range(2)]
        self.mask = np.empty((n, HIDDEN), np.bool_)
        self.out = np.empty((n, D_OUT), f32)
        self.dw = [np.empty_like(w) for w in self.weights]
        self.db = [np.empty_like(b) for b in self.biases]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The embeddings (N, 128); the returned array is a buffer the next call overwrites."""
        (w1, w2, w3), (b1, b2, b3), (h1, h2) = self.weights, self.biases, self.hidden
        np.matmul(x, w1, out=h1)
        h1 += b1
        np.maximum(h1, 0, out=h1)
        np.matmul(h1, w2, out=h2)
        h2 += b2
        np.maximum(h2, 0, out=h2)
        np.matmul(h2, w3, out=self.out)
        self.out += b3
        return self.out

    def backward_update(self, x: np.ndarray, grad_out: np.ndarray, lr: float) -> None:
        """Backpropagate dL/d(out) through the last ``forward(x)`` and take an SGD step."""
        (_w1, w2, w3), (h1, h2), (g1, g2) = self.weights, self.hidden, self.grad_hidden
        (dw1, dw2, dw3), (db1, db2, db3), mask = self.dw, self.db, self.mask
        np.matmul(h2.T, grad_out, out=dw3)
        np.sum(grad_out, axis=0, out=db3)
        np.matmul(grad_out, w3.T, out=g2)
        np.greater(h2, 0, out=mask)
        g2 *= mask
        np.matmul(h1.T, g2, out=dw2)
        np.sum(g2, axis=0, out=db2)
        np.matmul(g2, w2.T, out=g1)
        np.greater(h1, 0, out=mask)
        g1 *= mask
        np.matmul(x.T, g1, out=dw1)
        np.sum(g1, axis=0, out=db1)
        for param, grad in zip(self.weights + self.biases, self.dw + self.db):
            grad *= np.float32(lr)
            param -= grad


class NumpyTrainer:
    """The numpy trainer for one (N, rule): ``model()``, ``loss()`` and ``step()`` are
    the three timed quantities (see the module docstring); each returns a loss or None."""

    kind = "numpy"

    def __init__(self, n: int, rule: str, lr: float = LR):
        self.n, self.rule, self.lr = n, rule, lr
        self.x, self.labels = make_batch(n)
        self.mlp = NumpyMLP(n)
        self.emb = self.mlp.forward(self.x).copy()  # fixed embeddings of the loss case
        first = tripmine_loss(self.emb, self.labels, rule)
        self.initial_loss = float(first.loss)
        self.fixed_grad = np.ascontiguousarray(first.grad)  # the model case's dL/d(emb)

    def model(self) -> None:
        self.mlp.forward(self.x)
        self.mlp.backward_update(self.x, self.fixed_grad, self.lr)

    def loss(self) -> float:
        return tripmine_loss(self.emb, self.labels, self.rule).loss

    def step(self) -> float:
        result = tripmine_loss(self.mlp.forward(self.x), self.labels, self.rule)
        self.mlp.backward_update(self.x, result.grad, self.lr)
        return result.loss

    def params_finite(self) -> bool:
        return all(np.isfinite(p).all() for p in self.mlp.weights + self.mlp.biases)


# --- the torch trainer ---------------------------------------------------------------------


def import_torch():
    """(torch, tripmine.torch), or (None, reason) when they do not import."""
    try:
        import torch

        import tripmine.torch as tmt
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    return torch, tmt


def torch_loss_module(tmt, rule: str):
    if rule == "contrastive":
        return tmt.ContrastiveLoss(normalize=True)
    if rule == "distance_weighted":
        return tmt.TripletLoss(mining=rule, normalize=True, seed=0)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    return tmt.TripletLoss(mining=rule, normalize=True)


class TorchTrainer:
    """The torch trainer for one (N, rule); same interface as :class:`NumpyTrainer`."""

    kind = "torch"

    def __init__(self, n: int, rule: str, lr: float = LR):
        torch, tmt = import_torch()
        if torch is None:
            raise RuntimeError(f"torch trainer unavailable: {tmt}")
        self.torch, self.n, self.rule, self.lr = torch, n, rule, lr
        x, labels = make_batch(n)
        self.x, self.labels = torch.from_numpy(x), torch.from_numpy(labels)
        torch.manual_seed(SEED)
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                                 nn.ReLU(), nn.Linear(HIDDEN, D_OUT))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.loss_fn = torch_loss_module(tmt, rule)
        with torch.no_grad():
            self.emb = self.net(self.x).detach().clone().requires_grad_(True)
        first = self.loss_fn(self.emb, self.labels)
        first.backward()
        self.initial_loss = float(first.detach())
        self.fixed_grad = self.emb.grad.detach().clone()  # the model case's dL/d(emb)
        self.emb.grad = None

    def model(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.net(self.x).backward(self.fixed_grad)
        self.opt.step()

    def loss(self) -> float:
        self.emb.grad = None
        loss = self.loss_fn(self.emb, self.labels)
        loss.backward()
        return float(loss.detach())

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net(self.x), self.labels)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def params_finite(self) -> bool:
        return all(bool(self.torch.isfinite(p).all()) for p in self.net.parameters())


def make_trainer(kind: str, n: int, rule: str, lr: float = LR):
    """A :class:`NumpyTrainer` or :class:`TorchTrainer` (``kind`` "numpy" or "torch")."""
    if kind == "numpy":
        return NumpyTrainer(n, rule, lr)
    if kind == "torch":
        return TorchTrainer(n, rule, lr)
    raise ValueError(f"unknown trainer {kind!r}")


# --- timing --------------------------------------------------------------------------------


# Seconds of idleness before each timed block, so that the thread pools of the block
# before (OpenBLAS's workers busy-wait for about 0.1 s after a product) are asleep and
# each block starts from a quiet machine, as a quantity measured on its own would.
SETTLE_S = 0.25


def timed_block(fn, iters: int) -> tuple[list[float], object]:
    """After ``SETTLE_S`` of sleep, call ``fn`` ``iters`` times back to back; (seconds of
    each call, the last call's return)."""
    time.sleep(SETTLE_S)
    times, value = [], None
    for _ in range(iters):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return times, value


def iterations_for(estimate: dict[str, float], target_s: float, lo: int, hi: int) -> int:
    """Calls per block: about ``target_s`` of the slowest quantity, within [lo, hi]."""
    slowest = max(max(estimate.values()), 1e-9)
    return max(lo, min(hi, math.ceil(target_s / slowest)))


def measure(trainer, repeats: int, warmup: int, target_s: float, min_iters: int,
            max_iters: int) -> dict:
    """Time ``model``, ``loss`` and ``step`` of one trainer, each in a block of its own
    (see the module docstring).  Returns the row: per repeat the raw times, medians and
    overhead."""
    fns = {"model": trainer.model, "loss": trainer.loss, "step": trainer.step}
    estimate: dict[str, float] = {}
    for q, fn in fns.items():
        times, _ = timed_block(fn, max(warmup, 1))
        estimate[q] = times[-1]
    iters = iterations_for(estimate, target_s, min_iters, max_iters)
    reps, step_losses = [], []
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            gc.collect()
            gc.disable()
            times: dict[str, list[float]] = {}
            before = bc.cpu_snapshot()
            for q, fn in fns.items():
                times[q], last = timed_block(fn, iters)
            step_losses.append(last)
            after = bc.cpu_snapshot()
            if gc_was_enabled:
                gc.enable()
            med = {q: float(np.median(times[q])) for q in QUANTITIES}
            reps.append(dict(
                model_s=med["model"], loss_s=med["loss"], step_s=med["step"],
                overhead=med["step"] / (med["model"] + med["loss"]) - 1.0,
                others_cpu=bc.others_cpu(before, after), times=times))
    finally:
        if gc_was_enabled:
            gc.enable()
    overheads = [r["overhead"] for r in reps]
    return dict(
        trainer=trainer.kind, n=trainer.n, rule=trainer.rule, iterations=iters,
        warmup=max(warmup, 1), estimate_s=estimate,
        model_s=float(np.median([r["model_s"] for r in reps])),
        loss_s=float(np.median([r["loss_s"] for r in reps])),
        step_s=float(np.median([r["step_s"] for r in reps])),
        overhead_median=float(np.median(overheads)), overhead_worst=float(max(overheads)),
        others_cpu_max=max((r["others_cpu"] for r in reps if r["others_cpu"] is not None),
                           default=None),
        initial_loss=trainer.initial_loss, last_step_loss=step_losses[-1],
        losses_finite=bool(np.isfinite(step_losses).all()),
        params_finite=trainer.params_finite(), repeats=reps)


# --- report --------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


HEAD = (f"{'trainer':7} {'N':>5} {'rule':17} {'iters':>5} {'model ms':>9} {'loss ms':>8} "
        f"{'step ms':>8} {'ovh med':>8} {'worst':>7} {'others':>6}  per repeat")


def format_row(row: dict) -> str:
    others = row["others_cpu_max"]
    line = (f"{row['trainer']:7} {row['n']:>5} {row['rule']:17} {row['iterations']:>5} "
            f"{row['model_s'] * 1e3:>9.2f} {row['loss_s'] * 1e3:>8.2f} "
            f"{row['step_s'] * 1e3:>8.2f} {_pct(row['overhead_median']):>8} "
            f"{_pct(row['overhead_worst']):>7} "
            f"{'n/a' if others is None else f'{others:.0%}':>6}  "
            + " ".join(_pct(r["overhead"]) for r in row["repeats"]))
    if not (row["losses_finite"] and row["params_finite"]):
        line += "  [NON-FINITE LOSS OR WEIGHTS]"
    return line


def header_facts() -> dict:
    """Machine, library versions and thread pools (before torch is imported)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return dict(
        cpu=bc.cpu_facts(), python=platform.python_version(), numpy=np.__version__,
        tripmine_build_info=tripmine.build_info(), tripmine_threads=tripmine.get_num_threads(),
        openblas_threads=bc.blas_threads(), thread_pools=bc.thread_pools(),
        thread_env=bc.thread_env(), torch_installed=torch_version,
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)


def print_header(facts: dict) -> None:
    print("trainer_step: tripmine inside a training step, library default threads everywhere")
    print(f"machine: {bc.describe_cpu(facts['cpu'])}")
    if facts["loadavg"] is not None:
        print("load average: " + " ".join(f"{v:.2f}" for v in facts["loadavg"]))
    print(f"python {facts['python']}, numpy {facts['numpy']}, "
          f"OpenBLAS threads {facts['openblas_threads']}")
    print("thread pools (threadpoolctl.threadpool_info()):")
    for line in bc.describe_pools(facts["thread_pools"]):
        print(f"  {line}")
    print(f"tripmine.build_info(): {facts['tripmine_build_info']}")
    print(f"tripmine.get_num_threads(): {facts['tripmine_threads']}")
    env = facts["thread_env"]
    if env:
        print("WARNING: thread variables set in the environment (not library defaults): "
              + ", ".join(f"{k}={v}" for k, v in env.items()))
    else:
        print("environment: no thread variables set (" + ", ".join(bc.THREAD_ENV[:3]) + ", "
              "OMP_*, OPENBLAS_*, MKL_*, ...)")
    print(f"torch: {facts['torch_installed'] or 'not installed'} "
          "(imported after the numpy rows)")


def torch_facts(torch) -> dict:
    return dict(version=torch.__version__, num_threads=torch.get_num_threads(),
                num_interop_threads=torch.get_num_interop_threads(),
                thread_pools=bc.thread_pools())


def print_torch_header(facts: dict) -> None:
    print(f"torch {facts['version']}: get_num_threads() = {facts['num_threads']}, "
          f"get_num_interop_threads() = {facts['num_interop_threads']}; thread pools now:")
    for line in bc.describe_pools(facts["thread_pools"]):
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="batch sizes")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed cycles per row (>= 1)")
    parser.add_argument("--target", type=float, default=0.4,
                        help="seconds of the slowest quantity per repeat (sets the cycles)")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--max-iters", type=int, default=50)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--json", metavar="PATH", help="write settings, facts and every time")
    parser.add_argument("--check", type=float, metavar="X",
                        help="exit 1 if any row's worst overhead exceeds X (e.g. 0.10)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_iters < 1 or args.max_iters < args.min_iters:
        parser.error("need --repeats >= 1 and 1 <= --min-iters <= --max-iters")
    for n in args.n:
        if n % K or n < 2 * K:
            parser.error(f"N must be a multiple of {K} and at least {2 * K}, got {n}")

    facts = header_facts()
    print_header(facts)
    print(f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-{D_OUT} float32, SGD lr {args.lr:g}, P x K labels "
          f"(K={K}), {args.repeats} repeats, {args.warmup} warm-up cycles, ~{args.target:g} s "
          f"per quantity per repeat (>= {args.min_iters} cycles)")
    print("overhead = step / (model + loss) - 1 per repeat (medians of its cycles); "
          "'others' = max share of all CPUs other processes used during a repeat\n")
    print(HEAD, flush=True)

    rows, skipped, torch_info = [], [], None
    start = time.perf_counter()
    for kind in (t for t in TRAINERS if t in args.trainers):
        if kind == "torch":
            torch, tmt = import_torch()
            if torch is None:
                skipped.append(dict(trainer="torch", reason=tmt))
                print(f"torch trainer skipped: {tmt}")
                continue
            torch_info = torch_facts(torch)
            print()
            print_torch_header(torch_info)
            print(HEAD, flush=True)
        for n in args.n:
            for rule in args.rules:
                trainer = make_trainer(kind, n, rule, args.lr)
                row = measure(trainer, args.repeats, args.warmup, args.target,
                              args.min_iters, args.max_iters)
                del trainer
                rows.append(row)
                print(format_row(row), flush=True)
    elapsed = time.perf_counter() - start

    print(f"\n{len(rows)} rows in {elapsed:.0f} s.  Summary (worst overhead over repeats):")
    print(HEAD)
    for row in rows:
        print(format_row(row))

    busy = [r for r in rows if (r["others_cpu_max"] or 0.0) > BUSY_WARN]
    if busy:
        print(f"WARNING: other processes used over {BUSY_WARN:.0%} of the CPUs during "
              f"{len(busy)} of {len(rows)} rows ('others'): their times are unreliable")
    failed = []
    if args.check is not None:
        failed = [r for r in rows if r["overhead_worst"] > args.check]
        verdict = "FAIL" if failed else "PASS"
        print(f"\ncheck: worst overhead <= {_pct(args.check)} in every row: {verdict}")
        for r in failed:
            print(f"  {r['trainer']} N={r['n']} {r['rule']}: worst {_pct(r['overhead_worst'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, settings=vars(args), facts=facts, torch=torch_info,
                           d_in=D_IN, hidden=HIDDEN, d_out=D_OUT, k=K, elapsed_s=elapsed,
                           rows=rows, skipped=skipped,
                           check=None if args.check is None else dict(
                               threshold=args.check, passed=not failed,
                               failed=[(r["trainer"], r["n"], r["rule"]) for r in failed])),
                      f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
