"""Markdown summary of a pytest-benchmark JSON file.

    python benchmarks/report.py results.json [--baseline gemm] [--plot out.png]

Prints one row per (group, case): median time in ms, IQR, rounds, the ratio
``case median / baseline median`` within the same group (baseline: ``gemm``) and, when
the cases recorded it (conftest.py does), the share of all CPUs that other processes
used while the case ran: rows with a large share were timed on a contended machine.
Rows whose IQR exceeds half the median are marked "noisy": rerun on a quieter machine.
The load averages at the start and end of the run follow the table when recorded.
Standard library only; ``--plot`` additionally needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

CASE_ORDER = (
    # test_bench_distances.py
    "tripmine",
    "numpy_gram",
    "gemm",
    "gemm_xxT",
    # test_bench_losses.py (gemm as above)
    "triplet_batch_hard",
    "numpy_batch_hard",
    "pml_batch_hard",
    "triplet_batch_all",
    "pml_batch_all",
    "triplet_semi_hard",
    "triplet_distance_weighted",
    "pml_distance_weighted",
    "contrastive",
    "pml_contrastive",
    "mine_batch_hard",
    "pml_mine_batch_hard",
    "mine_semi_hard",
)
NOISY_IQR = 0.5  # flag rows with IQR > NOISY_IQR * median


def _case(bench: dict) -> str:
    case = bench.get("extra_info", {}).get("case")
    if case:
        return case
    name = re.sub(r"\[.*\]$", "", bench["name"])  # test_gemm[N=256] -> gemm
    return name.removeprefix("test_")


def _group_family(group: str) -> str:
    return re.sub(r"\d+", "", group or "")  # "pairwise N=256" -> "pairwise N="


def _group_key(group: str, families: list[str]) -> tuple:
    """Families (group names without their numbers) in order of first appearance in the
    file, then by the first number in the name (N)."""
    m = re.search(r"(\d+)", group or "")
    return (families.index(_group_family(group)), int(m.group(1)) if m else float("inf"),
            group or "")


def _case_key(case: str) -> tuple:
    return (CASE_ORDER.index(case) if case in CASE_ORDER else len(CASE_ORDER), case)


def collect(data: dict) -> dict[str, dict[str, dict]]:
    """{group: {case: stats}} in display order."""
    groups: dict[str, dict[str, dict]] = {}
    families: list[str] = []
    for bench in data.get("benchmarks", []):
        group = bench.get("group") or "(none)"
        stats = dict(bench["stats"], others_cpu=bench.get("extra_info", {}).get("others_cpu"))
        groups.setdefault(group, {})[_case(bench)] = stats
        if _group_family(group) not in families:
            families.append(_group_family(group))
    return {
        g: dict(sorted(groups[g].items(), key=lambda kv: _case_key(kv[0])))
        for g in sorted(groups, key=lambda g: _group_key(g, families))
    }


def markdown(groups: dict[str, dict[str, dict]], baseline: str) -> str:
    load = any(st.get("others_cpu") is not None for cs in groups.values() for st in cs.values())
    lines = [
        f"| group | case | median (ms) | IQR (ms) | rounds | / {baseline} |"
        + (" others' CPU |" if load else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|" if load else ""),
    ]
    for group, cases in groups.items():
        base = cases.get(baseline, {}).get("median")
        for case, st in cases.items():
            ratio = f"{st['median'] / base:.2f}" if base else "n/a"
            noisy = " (noisy)" if st["iqr"] > NOISY_IQR * st["median"] else ""
            row = (
                f"| {group} | {case} | {st['median'] * 1e3:.3f} | {st['iqr'] * 1e3:.3f}{noisy} "
                f"| {st['rounds']} | {ratio} |"
            )
            if load:
                oc = st.get("others_cpu")
                row += f" {oc:.0%} |" if oc is not None else " n/a |"
            lines.append(row)
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, dict]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not importable; no plot written", file=sys.stderr)
        return
    cases = sorted({c for cs in groups.values() for c in cs}, key=_case_key)
    width = 0.8 / max(len(cases), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, case in enumerate(cases):
        xs = [j + i * width for j, cs in enumerate(groups.values()) if case in cs]
        ys = [cs[case]["median"] * 1e3 for cs in groups.values() if case in cs]
        ax.bar(xs, ys, width, label=case)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], list(groups))
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="file written by pytest --benchmark-json")
    ap.add_argument("--baseline", default="gemm", help="case the ratios refer to (default gemm)")
    ap.add_argument("--plot", metavar="PATH", help="also write a bar chart (needs matplotlib)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    groups = collect(data)
    if not groups:
        print("no benchmarks in file", file=sys.stderr)
        return 1
    print(markdown(groups, args.baseline))
    info = data.get("machine_info", {})
    if "loadavg_at_start" in info:
        fmt = ", ".join
        start = fmt(f"{v:.2f}" for v in info["loadavg_at_start"])
        end = fmt(f"{v:.2f}" for v in info.get("loadavg_at_end", []))
        print(f"\nLoad average (1/5/15 min) at start: {start}; at end: {end or 'n/a'}.")
    if args.plot:
        plot(groups, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
