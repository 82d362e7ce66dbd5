"""Loss + gradient as a ratio to the sgemm of the same N x N x D product, timed ALTERNATING
with that sgemm (gemm, op, gemm, op, ...), the way a trainer calls tripmine between its own
matrix products.

    python benchmarks/alternating.py [--n 1024 4096] [--ops ...] [--d 128] [--runs 3]
                                     [--rounds R] [--threads 2] [--targets] [--json PATH]

Data as in test_bench_losses.py: float32, D = 128 (``--d``), standard-normal rows scaled
to unit length, labels ``np.repeat(np.arange(N // 4), 4)`` (P x K, K = 4).  Ops:

* ``batch_hard``, ``semi_hard``, ``batch_all``: ``tripmine.triplet_loss(x, labels,
  mining=op)``; ``distance_weighted``: the same with ``seed=0`` (all other arguments
  default: margin 0.2, loss + gradient, ``check_finite=True``);
* ``contrastive``: ``tripmine.contrastive_loss(x, labels)``;
* ``pairwise``: ``tripmine.pairwise_distances(x, out=buf)`` into a preallocated buffer.

The baseline is ``np.matmul(x, y, out=buf)`` with ``y = np.ascontiguousarray(x.T)``
(OpenBLAS sgemm; benchcommon.gemm_operands), into its own preallocated buffer.

One run, per N and op: one untimed (gemm, op) pair, then ``rounds`` alternating pairs,
each call timed on its own; the run's ratio is median(op) / median(gemm).  Then, for
comparison, the ISOLATED ratio: ``rounds`` calls of the op in a loop on their own and
``rounds`` gemms on their own (one untimed call before each loop), median / median.  Each
of the three phases starts after a 0.25 s sleep (``SETTLE_S``), so that it does not
inherit the previous phase's spinning thread pools.  The whole measurement (every N and
op) is repeated ``--runs`` times; the table shows the median of the per-run ratios and
their range.  ``rounds`` is chosen once per (N, op), in the first run, for about
``--seconds`` (default 1 s) of op calls per run, at least ``--min-rounds``, from one op
call timed after an untimed op (first touch of fresh buffers) and gemm; these calls are
not part of the results.  ``--rounds`` fixes it.  Garbage collection is off while timing.

Threads: ``--threads T`` (default 2) pins tripmine (``tripmine.set_num_threads``) and
OpenBLAS (``benchcommon.set_blas_threads``) to T, as the pytest suite does; ``--threads 0``
leaves both at their library defaults.

``--targets`` prints the targets of the issue next to each ratio (N = 1024 / N = 4096)
and PASS/FAIL of the median ratio; other N have no target.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import numpy as np

import benchcommon as bc
import tripmine

K = 4  # samples per class
OPS = ("batch_hard", "semi_hard", "distance_weighted", "batch_all", "contrastive", "pairwise")
# op -> {N: largest median ratio to the sgemm that passes}
TARGETS = {
    "batch_hard": {1024: 1.5, 4096: 1.1},
    "semi_hard": {1024: 3.0, 4096: 2.0},
    "distance_weighted": {1024: 3.0, 4096: 2.0},
    "batch_all": {1024: 3.5, 4096: 2.5},
    "contrastive": {1024: 2.5, 4096: 2.0},
    "pairwise": {1024: 1.3, 4096: 1.1},
}
# Seconds to sleep before each phase (alternating, op alone, gemm alone) so that the thread
# pools of the previous phase stop spinning (OpenBLAS's idle workers keep a core busy for
# a while after every sgemm); as conftest.py's SETTLE_S.
SETTLE_S = 0.25
# Rows during which other processes used more than this share of all CPUs get a warning.
BUSY_WARN = 0.10
SIMD_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def make_data(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length float32 rows (as in test_bench_losses.py) and P x K labels."""
    x = np.random.default_rng([bc.SEED, n, 1]).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(np.arange(n // K), K)


def make_op(name: str, x: np.ndarray, labels: np.ndarray):
    """The timed call of an op, a function of no arguments."""
    if name == "pairwise":
        out = np.empty((x.shape[0], x.shape[0]), dtype=np.float32)
        return lambda: tripmine.pairwise_distances(x, out=out)
    if name == "contrastive":
        return lambda: tripmine.contrastive_loss(x, labels)
    if name == "distance_weighted":
        return lambda: tripmine.triplet_loss(x, labels, mining=name, seed=0)
    if name in OPS:
        return lambda: tripmine.triplet_loss(x, labels, mining=name)
    raise ValueError(f"unknown op {name!r}")


def make_gemm(x: np.ndarray):
    """The baseline call: ``np.matmul(x, y, out=buf)``, ``y = x.T`` made contiguous."""
    y, buf = bc.gemm_operands(x)
    return lambda: np.matmul(x, y, out=buf)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternating(op, gemm, rounds: int) -> tuple[list[float], list[float]]:
    """(op times, gemm times) of ``rounds`` pairs gemm, op, gemm, op, ... (after one
    untimed pair)."""
    gemm()
    op()
    op_times, gemm_times = [], []
    for _ in range(rounds):
        gemm_times.append(_timed(gemm))
        op_times.append(_timed(op))
    return op_times, gemm_times


def isolated(fn, rounds: int) -> list[float]:
    """Times of ``rounds`` calls of ``fn`` in a loop on its own (after one untimed call)."""
    fn()
    return [_timed(fn) for _ in range(rounds)]


def measure_once(op, gemm, rounds: int) -> dict:
    """One run of one op: the alternating and the isolated times and ratios."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        time.sleep(SETTLE_S)
        before = bc.cpu_snapshot()
        op_alt, gemm_alt = alternating(op, gemm, rounds)
        time.sleep(SETTLE_S)
        op_iso = isolated(op, rounds)
        time.sleep(SETTLE_S)
        gemm_iso = isolated(gemm, rounds)
        after = bc.cpu_snapshot()
    finally:
        if enabled:
            gc.enable()
    med = {k: float(np.median(v)) for k, v in
           (("op_alt", op_alt), ("gemm_alt", gemm_alt), ("op_iso", op_iso),
            ("gemm_iso", gemm_iso))}
    return dict(
        rounds=rounds, ratio=med["op_alt"] / med["gemm_alt"],
        isolated_ratio=med["op_iso"] / med["gemm_iso"],
        op_s=med["op_alt"], gemm_s=med["gemm_alt"], op_isolated_s=med["op_iso"],
        gemm_isolated_s=med["gemm_iso"], others_cpu=bc.others_cpu(before, after),
        times=dict(op_alternating=op_alt, gemm_alternating=gemm_alt, op_isolated=op_iso,
                   gemm_isolated=gemm_iso))


def choose_rounds(op, gemm, seconds: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds for about ``seconds`` of op calls, from one call timed after a warm-up pair
    (whose first touch of fresh buffers would overestimate) and a gemm."""
    op()
    gemm()
    estimate = max(_timed(op), 1e-6)
    return max(min_rounds, min(max_rounds, math.ceil(seconds / estimate)))


def summarize(runs: list[dict]) -> dict:
    ratios = [r["ratio"] for r in runs]
    iso = [r["isolated_ratio"] for r in runs]
    return dict(
        ratio_median=float(np.median(ratios)), ratio_min=min(ratios), ratio_max=max(ratios),
        isolated_median=float(np.median(iso)), isolated_min=min(iso), isolated_max=max(iso),
        op_ms=float(np.median([r["op_s"] for r in runs])) * 1e3,
        gemm_ms=float(np.median([r["gemm_s"] for r in runs])) * 1e3,
        others_cpu_max=max((r["others_cpu"] for r in runs if r["others_cpu"] is not None),
                           default=None))


def target_of(op: str, n: int) -> float | None:
    return TARGETS.get(op, {}).get(n)


def format_table(results: dict, show_targets: bool) -> list[str]:
    head = (f"{'N':>5} {'op':17} {'rounds':>6} {'gemm ms':>8} {'op ms':>8} "
            f"{'ratio (alternating)':>19} {'range':>11}")
    if show_targets:
        head += f" {'target':>7} {'':4}"
    head += f" | {'isolated ratio':>14} {'range':>11} | {'others':>6}"
    lines = [head]
    for (n, op), entry in results.items():
        s = entry["summary"]
        line = (f"{n:>5} {op:17} {entry['rounds']:>6} {s['gemm_ms']:>8.3f} {s['op_ms']:>8.3f} "
                f"{s['ratio_median']:>18.2f}x {s['ratio_min']:>5.2f}-{s['ratio_max']:<5.2f}")
        if show_targets:
            target = target_of(op, n)
            if target is None:
                line += f" {'-':>7} {'':4}"
            else:
                verdict = "PASS" if s["ratio_median"] <= target else "FAIL"
                line += f" {'<=' + format(target, 'g'):>7} {verdict:4}"
        others = s["others_cpu_max"]
        line += (f" | {s['isolated_median']:>13.2f}x {s['isolated_min']:>5.2f}-"
                 f"{s['isolated_max']:<5.2f} | {'n/a' if others is None else f'{others:.0%}':>6}")
        lines.append(line)
    return lines


def header(args, facts: dict) -> list[str]:
    cpu = facts["cpu"]
    flags = set(cpu["flags"])
    lines = [
        "alternating: tripmine op vs sgemm of the same N x N x D product, timed alternately",
        f"machine: {bc.describe_cpu(cpu)}",
        "SIMD flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SIMD_FLAGS),
    ]
    if facts["loadavg"] is not None:
        lines.append("load average: " + " ".join(f"{v:.2f}" for v in facts["loadavg"]))
    build = facts["tripmine_build_info"]
    lines += [
        f"tripmine {build.get('version')}: isa {build.get('isa')} "
        f"(usable {build.get('isas_usable')}), threads {facts['tripmine_threads']}, "
        f"runtime {build.get('runtime', build.get('openmp', '?'))}",
        f"python {facts['python']}, numpy {facts['numpy']}, OpenBLAS threads "
        f"{facts['openblas_threads']}"
        + (" (pinned by --threads)" if args.threads else " (library default)"),
        "thread pools (threadpoolctl.threadpool_info()):",
    ]
    lines += [f"  {line}" for line in bc.describe_pools(facts["thread_pools"])]
    if facts["thread_env"]:
        lines.append("thread variables set in the environment: " + ", ".join(
            f"{k}={v}" for k, v in facts["thread_env"].items()))
    lines.append(f"float32, D={args.d}, P x K labels (K={K}), {args.runs} run(s); ratio = "
                 "median(op) / median(gemm) per run; table: median over runs [range]; "
                 "'others' = max share of all CPUs other processes used during a run")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--d", type=int, default=bc.D)
    parser.add_argument("--runs", type=int, default=3, help="repeats of the whole measurement")
    parser.add_argument("--rounds", type=int, help="alternating pairs per run (default: "
                        "adaptive, see --seconds)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="op time per run that sets the adaptive rounds")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2,
                        help="tripmine and OpenBLAS threads (0: library defaults)")
    parser.add_argument("--targets", action="store_true",
                        help="print the targets and PASS/FAIL next to each ratio")
    parser.add_argument("--json", metavar="PATH", help="write settings, facts and every time")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.d < 1 or args.threads < 0 or (args.rounds is not None
                                                           and args.rounds < 1):
        parser.error("need --runs >= 1, --d >= 1, --threads >= 0, --rounds >= 1")
    for n in args.n:
        if n % K or n < 2 * K:
            parser.error(f"N must be a multiple of {K} and at least {2 * K}, got {n}")

    if args.threads:
        tripmine.set_num_threads(args.threads)
        bc.set_blas_threads(args.threads)
    facts = dict(
        cpu=bc.cpu_facts(), python=platform.python_version(), numpy=np.__version__,
        tripmine_build_info=tripmine.build_info(), tripmine_threads=tripmine.get_num_threads(),
        openblas_threads=bc.blas_threads(), thread_pools=bc.thread_pools(),
        thread_env=bc.thread_env(),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print("\n".join(header(args, facts)), flush=True)

    data = {n: make_data(n, args.d) for n in args.n}
    results: dict[tuple[int, str], dict] = {}
    start = time.perf_counter()
    for run in range(args.runs):
        for n in args.n:
            x, labels = data[n]
            gemm = make_gemm(x)
            for name in args.ops:
                op = make_op(name, x, labels)
                entry = results.setdefault((n, name), {"runs": []})
                if "rounds" not in entry:
                    entry["rounds"] = args.rounds or choose_rounds(
                        op, gemm, args.seconds, args.min_rounds, args.max_rounds)
                one = measure_once(op, gemm, entry["rounds"])
                entry["runs"].append(one)
                print(f"run {run + 1}/{args.runs} N={n} {name}: ratio {one['ratio']:.2f}x "
                      f"(isolated {one['isolated_ratio']:.2f}x), {entry['rounds']} rounds",
                      flush=True)
            del gemm
    elapsed = time.perf_counter() - start
    for entry in results.values():
        entry["summary"] = summarize(entry["runs"])

    print(f"\n{len(results)} (N, op) in {elapsed:.0f} s")
    print("\n".join(format_table(results, args.targets)))
    busy = [k for k, e in results.items()
            if (e["summary"]["others_cpu_max"] or 0.0) > BUSY_WARN]
    if busy:
        print(f"WARNING: other processes used over {BUSY_WARN:.0%} of the CPUs during "
              f"{len(busy)} of {len(results)} rows ('others'): their ratios are unreliable")
    if args.targets:
        checked = [(k, e) for k, e in results.items() if target_of(k[1], k[0]) is not None]
        failed = [k for k, e in checked if e["summary"]["ratio_median"] > target_of(k[1], k[0])]
        print(f"targets: {len(checked) - len(failed)}/{len(checked)} PASS (median of the "
              "alternating ratios)" + ("; FAIL: " + ", ".join(f"{op} N={n}" for n, op in failed)
                                       if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, settings=vars(args), facts=facts, elapsed_s=elapsed,
                           targets={op: {str(n): t for n, t in v.items()}
                                    for op, v in TARGETS.items()},
                           results=[dict(n=n, op=op, target=target_of(op, n), **entry)
                                    for (n, op), entry in results.items()]),
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ---- small ops against a baseline of their own (benchmarks/center.py, margin.py) -------------

def small_op_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a script that times an op against its own baseline over N."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", action="store_true")
    return parser


def compare_over_n(args, make_pair, columns: tuple[str, str], target: float,
                   rounds: tuple[int, int]) -> dict:
    """Pin the threads, then per N time ``make_pair(n, d) -> (op, baseline)`` alternating
    (``measure_once``, ``args.runs`` times) and print one table row; returns
    {n: dict(runs, summary, rounds)}."""
    if args.threads:
        tripmine.set_num_threads(args.threads)
        bc.set_blas_threads(args.threads)
    print(bc.describe_cpu(bc.cpu_facts()))
    print(f"tripmine {tripmine.__version__}, isa {tripmine.build_info()['isa']}, threads "
          f"{tripmine.get_num_threads()}; D={args.d} K=4 float32")
    print(f"{'N':>6} {columns[0]:>10} {columns[1]:>9} {'ratio (alt)':>11} {'range':>11} "
          f"{'isolated':>8}" + ("  target" if args.targets else ""))
    results = {}
    for n in args.n:
        op, base = make_pair(n, args.d)
        count = choose_rounds(op, base, args.seconds, *rounds)
        runs = [measure_once(op, base, count) for _ in range(args.runs)]
        s = summarize(runs)
        row = (f"{n:>6} {s['gemm_ms']:>10.3f} {s['op_ms']:>9.3f} {s['ratio_median']:>10.2f}x "
               f"{s['ratio_min']:>5.2f}-{s['ratio_max']:<5.2f} {s['isolated_median']:>7.2f}x")
        if args.targets:
            row += f"  <={target:g} {'PASS' if s['ratio_median'] <= target else 'FAIL'}"
        print(row)
        results[n] = dict(runs=runs, summary=s, rounds=count)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
