"""The PyTorch training-step benchmark (test_bench_torch.py) as a table: per N and loss,
the step time with tripmine.torch and with pytorch-metric-learning, their ratio, and the
share of each step the loss takes.

    python benchmarks/torch_step.py results.json

The loss's share of a step is ``(step - model_only) / step``: ``model_only`` is the same
forward and backward pass with a trivial loss, so the difference is what mining, the
loss and its gradient add.  Medians throughout.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re

LOSSES = ("batch_hard", "batch_all", "contrastive")


def medians(data: dict) -> dict[int, dict[str, float]]:
    """{N: {case: median seconds}} of the ``torch step N=<N>`` groups."""
    table: dict[int, dict[str, float]] = {}
    for bench in data.get("benchmarks", []):
        m = re.fullmatch(r"torch step N=(\d+)", bench.get("group") or "")
        if m:
            case = bench.get("extra_info", {}).get("case", bench["name"])
            table.setdefault(int(m.group(1)), {})[case] = bench["stats"]["median"]
    return dict(sorted(table.items()))


def _ms(seconds: float | None, missing: str = "n/a") -> str:
    return f"{seconds * 1e3:.2f}" if seconds is not None else missing


def _share(step: float | None, floor: float | None) -> str:
    if step is None or floor is None:
        return "n/a"
    return f"{max(step - floor, 0.0) / step:.0%}"


def rows(table: dict[int, dict[str, float]]) -> list[str]:
    lines = ["| N | loss | model only (ms) | tripmine step (ms) | loss share | "
             "PML step (ms) | loss share | PML / tripmine |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, cases in table.items():
        floor = cases.get("model_only")
        for loss in LOSSES:
            ours, theirs = cases.get(f"tripmine_{loss}"), cases.get(f"pml_{loss}")
            if ours is None and theirs is None:
                continue
            ratio = f"{theirs / ours:.1f}x" if ours and theirs else "n/a"
            lines.append(f"| {n} | {loss} | {_ms(floor)} | {_ms(ours)} | {_share(ours, floor)} "
                         f"| {_ms(theirs, 'not timed')} | {_share(theirs, floor)} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON file (--benchmark-json)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        table = medians(json.load(f))
    if not table:
        print("no 'torch step N=...' groups in this file (run benchmarks/test_bench_torch.py)")
        return 1
    print("\n".join(rows(table)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
