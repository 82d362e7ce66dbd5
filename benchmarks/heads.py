"""The margin-softmax heads against the sgemm of their logits, timed ALTERNATING with it.

    python benchmarks/heads.py [--n 1024] [--d 512] [--c 100000] [--ops ...] [--runs 3]
                               [--threads 2] [--targets] [--memory] [--json PATH]

Data: float32, ``x`` (N, D) standard normal, ``weight`` (C, D) standard normal times 0.05,
labels uniform in [0, C) (seeded).  The baseline is the product the heads' logits need,
``np.matmul(x, wt, out=buf)`` with ``wt = weight.T`` made contiguous (D, C) and ``buf``
(N, C) preallocated: OpenBLAS's sgemm of (N x D) . (D x C).  Ops (``head`` is arcface,
cosface, softmax or softmaxwide: softmax on standard-normal weights, std 1 instead of 0.05,
whose logits spread like a trained unnormalised head's and whose exponentials reach
float's subnormal range):

* ``<head>_loss``: the loss alone (``grad=False``);
* ``<head>_grad``: loss and dL/dx (``weight_grad=False``);
* ``<head>_all``: loss, dL/dx and dL/dW, what a training step needs.

The timing is that of ``alternating.py`` (its ``measure_once``): per op, ``rounds``
alternating (gemm, op) pairs, each call timed alone, ratio = median(op) / median(gemm),
then the same op and gemm each in a loop of their own (the isolated ratio); the whole is
repeated ``--runs`` times and the median of the per-run ratios shown.

``--memory`` also measures, each in a fresh interpreter, the peak resident memory a call
adds beyond its inputs and its outputs (``grad``, ``weight_grad``): VmHWM after the call
minus VmRSS before it, minus the outputs' bytes.  Sizes: ``--memory-sizes N,C,D ...``
(default 4096,1000000,512: the issue's bound of 64 MB, about two minutes per call here).

With ``TRIPMINE_BENCH_PEERS=1`` and torch + pytorch-metric-learning importable,
pytorch-metric-learning's ``ArcFaceLoss`` and ``CosFaceLoss`` (loss + backward, their own
(D, C) weight, the same data, torch on the same threads) are timed in the same run
(isolated: each call takes seconds) and their peak memory measured as above; at sizes
whose (N, C) logits and their copies exceed ``--peer-max-bytes`` (default half the
machine's memory) the peer is reported as not run, with the bytes it would need.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

import alternating as alt
import numpy as np

import benchcommon as bc
import tripmine

#: "softmaxwide" is softmax on weights 20x larger (logits spread ~20, as in trained
#: unnormalised heads): many exponentials then fall near float's normal range.
HEADS = ("arcface", "cosface", "softmax", "softmaxwide")
KINDS = ("loss", "grad", "all")
DEFAULT_OPS = ("arcface_loss", "arcface_grad", "arcface_all", "cosface_all", "softmax_all",
               "softmaxwide_all")
#: op -> the largest median alternating ratio that passes, at N=1024, D=512, C=100k.
TARGETS = {"all": 3.5, "loss": 1.3}


def make_data(n: int, d: int, c: int):
    rng = np.random.default_rng([bc.SEED, n, d, c])
    x = rng.standard_normal((n, d), dtype=np.float32)
    weight = rng.standard_normal((c, d), dtype=np.float32) * np.float32(0.05)
    labels = rng.integers(0, c, n)
    return x, weight, labels


def make_op(name: str, x, weight, labels):
    head, kind = name.rsplit("_", 1)
    fn = {"arcface": tripmine.arcface_loss, "cosface": tripmine.cosface_loss,
          "softmax": tripmine.softmax_loss, "softmaxwide": tripmine.softmax_loss}[head]
    options = {"loss": dict(grad=False), "grad": dict(weight_grad=False), "all": {}}[kind]
    if head == "softmaxwide":
        weight = weight * np.float32(20.0)
    return lambda: fn(x, labels, weight, **options)


def make_gemm(x, weight):
    wt = np.ascontiguousarray(weight.T)
    buf = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    return lambda: np.matmul(x, wt, out=buf)


# ---- peers -------------------------------------------------------------------------------

def peer_step(name: str, x, weight, labels):
    """pytorch-metric-learning's loss + backward, or None when it is not importable."""
    try:
        import torch
        from pytorch_metric_learning import losses as pml
    except ImportError:
        return None
    cls = {"pml_arcface": pml.ArcFaceLoss, "pml_cosface": pml.CosFaceLoss}[name]
    d, c = x.shape[1], weight.shape[0]
    loss_fn = cls(num_classes=c, embedding_size=d)
    with torch.no_grad():
        loss_fn.W.copy_(torch.from_numpy(weight.T.copy()))  # its W is stored D x C
    xt = torch.from_numpy(x).requires_grad_(True)
    lt = torch.from_numpy(labels)

    def step():
        xt.grad = None
        loss_fn.W.grad = None
        loss_fn(xt, lt).backward()
    return step


def peer_bytes(n: int, c: int) -> int:
    """A lower bound of pytorch-metric-learning's ArcFaceLoss memory: it keeps the (N, C)
    float32 cosines, the logits and the softmax, and their gradients (about six N x C
    arrays; measured 1.9 GB at N=1024, C=100k)."""
    return 6 * 4 * n * c


# ---- memory in a fresh interpreter ---------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {bench!r})
    import heads as H
    n, c, d, name, threads = {n}, {c}, {d}, {name!r}, {threads}
    def kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    import tripmine
    tripmine.set_num_threads(threads)
    x, weight, labels = H.make_data(n, d, c)
    if name.startswith("pml_"):
        import torch
        torch.set_num_threads(threads)
        step = H.peer_step(name, x, weight, labels)
        out_bytes = x.nbytes + weight.nbytes  # the gradients of x and W
    else:
        step = H.make_op(name, x, weight, labels)
        out_bytes = (x.nbytes if not name.endswith("_loss") else 0) + (
            weight.nbytes if name.endswith("_all") else 0)
    before = kib("VmRSS")
    start = __import__("time").perf_counter()
    step()
    seconds = __import__("time").perf_counter() - start
    peak = kib("VmHWM")
    print(json.dumps(dict(extra_mib=(peak - before) / 1024 - out_bytes / 2**20,
                          seconds=seconds)))
""")


def measure_memory(name: str, n: int, c: int, d: int, threads: int) -> dict:
    script = _MEMORY_SCRIPT.format(bench=os.path.dirname(os.path.abspath(__file__)), n=n, c=c,
                                   d=d, name=name, threads=threads)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=3600, check=False)
    if done.returncode != 0:
        return dict(error=done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--c", type=int, default=100_000)
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-sizes", nargs="+", default=["4096,1000000,512"])
    parser.add_argument("--peer-max-bytes", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for op in args.ops:
        head, _, kind = op.rpartition("_")
        if head not in HEADS or kind not in KINDS:
            parser.error(f"unknown op {op!r}: <head>_<kind>, head in {HEADS}, kind in {KINDS}")
    if args.threads:
        tripmine.set_num_threads(args.threads)
        bc.set_blas_threads(args.threads)
    peers = os.environ.get("TRIPMINE_BENCH_PEERS") == "1"
    facts = bc.cpu_facts()
    print(bc.describe_cpu(facts))
    print(f"tripmine {tripmine.__version__}, isa {tripmine.build_info()['isa']}, threads "
          f"{tripmine.get_num_threads()}; N={args.n} D={args.d} C={args.c} float32")
    x, weight, labels = make_data(args.n, args.d, args.c)
    gemm = make_gemm(x, weight)
    results: dict = {}
    for op in args.ops:
        fn = make_op(op, x, weight, labels)
        rounds = args.rounds or alt.choose_rounds(fn, gemm, args.seconds, 3, 50)
        runs = [alt.measure_once(fn, gemm, rounds) for _ in range(args.runs)]
        results[op] = dict(rounds=rounds, summary=alt.summarize(runs), runs=runs)
    lines = [f"{'op':14} {'rounds':>6} {'gemm ms':>9} {'op ms':>9} {'ratio (alt)':>11} "
             f"{'range':>11} {'isolated':>8}" + (f" {'target':>7}" if args.targets else "")]
    for op, entry in results.items():
        s = entry["summary"]
        line = (f"{op:14} {entry['rounds']:>6} {s['gemm_ms']:>9.1f} {s['op_ms']:>9.1f} "
                f"{s['ratio_median']:>10.2f}x {s['ratio_min']:>5.2f}-{s['ratio_max']:<5.2f} "
                f"{s['isolated_median']:>7.2f}x")
        kind = op.rpartition("_")[2]
        if args.targets and kind in TARGETS and (args.n, args.d, args.c) == (1024, 512, 100_000):
            verdict = "PASS" if s["ratio_median"] <= TARGETS[kind] else "FAIL"
            line += f" {'<=' + format(TARGETS[kind], 'g'):>7} {verdict}"
        lines.append(line)
    print("\n".join(lines))
    report = dict(machine=facts, n=args.n, d=args.d, c=args.c, threads=tripmine.get_num_threads(),
                  results=results, peers={}, memory={})
    if peers:
        limit = args.peer_max_bytes or 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES")
        gemm_s = float(np.median(alt.isolated(gemm, 3)))
        for name in ("pml_arcface", "pml_cosface"):
            if peer_bytes(args.n, args.c) > limit:
                print(f"{name}: not run: needs at least {peer_bytes(args.n, args.c) / 2**30:.1f} "
                      f"GiB for its (N, C) arrays")
                report["peers"][name] = dict(skipped_bytes=peer_bytes(args.n, args.c))
                continue
            step = peer_step(name, x, weight, labels)
            if step is None:
                print(f"{name}: torch or pytorch-metric-learning is not importable")
                continue
            import torch
            torch.set_num_threads(args.threads or torch.get_num_threads())
            times = alt.isolated(step, 3)
            ratio = float(np.median(times)) / gemm_s
            print(f"{name}: {np.median(times) * 1e3:.0f} ms = {ratio:.2f}x the sgemm (isolated)")
            report["peers"][name] = dict(seconds=times, ratio=ratio)
    if args.memory:
        for size in args.memory_sizes:
            n, c, d = (int(v) for v in size.split(","))
            names = ["arcface_all", "arcface_loss"]
            if peers:
                names += ["pml_arcface"]
            for name in names:
                if name.startswith("pml_"):
                    limit = args.peer_max_bytes or 0.5 * os.sysconf("SC_PAGE_SIZE") * \
                        os.sysconf("SC_PHYS_PAGES")
                    if peer_bytes(n, c) > limit:
                        print(f"memory {name} N={n} C={c} D={d}: not run (needs at least "
                              f"{peer_bytes(n, c) / 2**30:.1f} GiB)")
                        continue
                start = time.perf_counter()
                got = measure_memory(name, n, c, d, args.threads or 0)
                report["memory"][f"{name}:{n},{c},{d}"] = got
                print(f"memory {name} N={n} C={c} D={d}: {json.dumps(got)} "
                      f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
