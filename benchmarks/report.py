"""Markdown summary of a pytest-benchmark JSON file, and optionally a plot.

    python benchmarks/report.py results.json [--baseline gemm] [--plot out.png]

Prints one row per (group, case): median time in ms, IQR, rounds, the ratio
``case median / baseline median`` within the same group (baseline: ``gemm``) and, when
the cases recorded it (conftest.py does), the share of all CPUs that other processes
used while the case ran: rows with a large share were timed on a contended machine.
Rows whose IQR exceeds half the median are marked "noisy": rerun on a quieter machine.
The load averages at the start and end of the run, and the cases the run skipped with
their reasons, follow the table when recorded.

``--plot`` writes a PNG: median time against N, log-log, one subplot per op (pairwise
distances, batch-hard, batch-all, semi-hard, distance-weighted, contrastive), one line
per implementation, with the baseline (and the other op-less reference cases of the
same groups) drawn in every subplot.  The op and the implementation of a case come from
its ``extra_info`` (``op``, ``impl``: benchcommon.describe) or, for files written
before those were recorded, from the case name (see ``_guess_op_impl``).
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
    "torch_cdist",
    # test_bench_losses.py (gemm as above)
    "triplet_batch_hard",
    "numpy_batch_hard",
    "pml_batch_hard",
    "triplet_batch_all",
    "pml_batch_all",
    "triplet_semi_hard",
    "pml_semi_hard",
    "triplet_distance_weighted",
    "pml_distance_weighted",
    "contrastive",
    "pml_contrastive",
    "mine_batch_hard",
    "pml_mine_batch_hard",
    "mine_semi_hard",
)
NOISY_IQR = 0.5  # flag rows with IQR > NOISY_IQR * median
FEW_ROUNDS = 3  # the plot draws points timed in fewer rounds with hollow markers

# Subplot order and titles of the ops benchcommon.describe records.
OP_TITLES = {
    "distances": "pairwise distances (euclidean)",
    "batch_hard": "batch-hard triplet loss + gradient",
    "batch_all": "batch-all triplet loss + gradient",
    "semi_hard": "semi-hard triplet loss + gradient",
    "distance_weighted": "distance-weighted triplet loss + gradient",
    "contrastive": "contrastive loss + gradient",
}
# Line colours by implementation (the part of ``impl`` before a comma or a space).
IMPL_COLORS = {"tripmine": "C0", "numpy": "C1", "pml": "C2", "torch.cdist": "C2",
               "gemm": "black"}


def _case(bench: dict) -> str:
    case = bench.get("extra_info", {}).get("case")
    if case:
        return case
    name = re.sub(r"\[.*\]$", "", bench["name"])  # test_gemm[N=256] -> gemm
    return name.removeprefix("test_")


def _guess_op_impl(case: str, group: str) -> tuple[str | None, str]:
    """(op, impl) from the naming scheme of the benchmark modules, for JSON files that do
    not record them: ``gemm*`` cases are op-less references; in ``pairwise`` groups
    every other case computes distances; elsewhere a prefix names the implementation
    (``pml_``, ``numpy_``, ``mine_`` = tripmine's miner alone, ``triplet_`` or none =
    tripmine) and the rest of the name is the op."""
    if case == "gemm":
        return None, "gemm (OpenBLAS sgemm)"
    if case == "gemm_xxT":
        return None, "numpy x @ x.T (ssyrk)"
    if (group or "").startswith("pairwise"):
        return "distances", {"numpy_gram": "numpy", "torch_cdist": "torch.cdist"}.get(
            case, "tripmine")
    for prefix, impl in (("pml_mine_", "pml, miner only"), ("pml_", "pml"),
                         ("mine_", "tripmine, miner only"), ("numpy_", "numpy"),
                         ("triplet_", "tripmine")):
        if case.startswith(prefix):
            return case.removeprefix(prefix), impl
    return case, "tripmine"


def _group_n(group: str) -> int | None:
    m = re.search(r"N=(\d+)", group or "")
    return int(m.group(1)) if m else None


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
        info = bench.get("extra_info", {})
        case = _case(bench)
        op, impl = (info.get("op"), info["impl"]) if "impl" in info else _guess_op_impl(
            case, group)
        stats = dict(bench["stats"], others_cpu=info.get("others_cpu"), op=op, impl=impl,
                     n=info.get("n", _group_n(group)), note=info.get("note"))
        groups.setdefault(group, {})[case] = stats
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


def _distinct(data: dict, key: str) -> str:
    """The values of ``extra_info[key]`` over the cases, e.g. "2" or "1/2"; "" if none."""
    values = {b.get("extra_info", {}).get(key) for b in data.get("benchmarks", [])} - {None}
    return "/".join(str(v) for v in sorted(values, key=str))


def plot_title(data: dict) -> str:
    """Two lines: what is plotted, then the machine, threads and data type of the run."""
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}) if isinstance(info.get("cpu"), dict) else {}
    machine = cpu.get("brand_raw") or info.get("processor") or info.get("machine") or "?"
    nproc = info.get("nproc") or cpu.get("count")
    if nproc:
        machine += f", {nproc} CPUs"
    threads = [f"{name} {value}" for name, value in (
        ("tripmine", _distinct(data, "tripmine_threads")),
        ("OpenBLAS", _distinct(data, "blas_threads")),
        ("torch", _distinct(data, "torch_threads"))) if value]
    dtype, d = _distinct(data, "dtype"), _distinct(data, "d")
    build = info.get("tripmine_build_info", {})
    parts = [machine]
    if threads:
        parts.append("threads: " + ", ".join(threads))
    if dtype or d:
        parts.append(", ".join(p for p in (dtype, f"D={d}" if d else "") if p))
    if build:
        parts.append(f"tripmine {build.get('version', '?')} ({build.get('isa', '?')})")
    if data.get("datetime"):
        parts.append(data["datetime"][:16].replace("T", " ") + " UTC")
    return "tripmine benchmarks: median time vs N (log-log)\n" + " | ".join(parts)


def _series(groups: dict[str, dict[str, dict]], baseline: str):
    """{op: {impl: [(n, stats), ...] sorted by n}}, ops in OP_TITLES order, the
    op-less cases (baseline first) added to every op of the same group families."""
    ops: dict[str, dict[str, list]] = {}
    refs: dict[str, dict[str, list]] = {}  # family -> impl -> points
    families: dict[str, set] = {}  # op -> group families it occurs in
    for group, cases in groups.items():
        family = _group_family(group)
        for case, st in cases.items():
            if st.get("n") is None:
                continue
            if st.get("op") is None:
                impl = st["impl"] if case != baseline else f"{st['impl']}, baseline"
                refs.setdefault(family, {}).setdefault(impl, []).append((st["n"], st))
            else:
                ops.setdefault(st["op"], {}).setdefault(st["impl"], []).append((st["n"], st))
                families.setdefault(st["op"], set()).add(family)
    order = [op for op in OP_TITLES if op in ops] + sorted(op for op in ops
                                                            if op not in OP_TITLES)
    result = {}
    for op in order:
        lines = dict(ops[op])
        for family in sorted(families[op]):
            for impl, points in sorted(refs.get(family, {}).items(),
                                       key=lambda kv: not kv[0].endswith(", baseline")):
                lines.setdefault(impl, []).extend(points)
        result[op] = {impl: sorted(points, key=lambda p: p[0]) for impl, points in lines.items()}
    return result


def _line_style(impl: str, spare_colors: list[str]) -> dict:
    head = re.split(r"[ ,]", impl, maxsplit=1)[0]
    color = IMPL_COLORS.get(head)
    if color is None:
        color = spare_colors.pop(0) if spare_colors else "grey"
        IMPL_COLORS[head] = color
    style = {"color": color, "marker": "o", "linestyle": "-", "linewidth": 1.6}
    if head == "gemm":
        style.update(marker="x", linestyle=":", linewidth=1.2)
    elif head == "torch.cdist":
        style.update(marker="D")
    elif "miner only" in impl:
        style.update(marker="s", linestyle="--")
    elif "x @ x.T" in impl:
        style.update(marker="v", linestyle="--", linewidth=1.2)
    return style


def plot(groups: dict[str, dict[str, dict]], path: str, data: dict, baseline: str) -> bool:
    """Write the PNG; False (and a message) when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        print("--plot needs matplotlib, which is not importable here (pip install "
              "matplotlib); no plot written", file=sys.stderr)
        return False
    series = _series(groups, baseline)
    if not series:
        print("--plot: no case records its N; no plot written", file=sys.stderr)
        return False
    ncols = min(3, len(series))
    nrows = -(-len(series) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows + 1.2),
                             squeeze=False)
    spare = [f"C{i}" for i in range(3, 10)]
    for ax, (op, lines) in zip(axes.flat, series.items()):
        ns = sorted({n for points in lines.values() for n, _ in points})
        for impl, points in lines.items():
            style = _line_style(impl, spare)
            xs = [n for n, _ in points]
            med = [st["median"] * 1e3 for _, st in points]
            lo = [max(m - st.get("q1", st["median"]) * 1e3, 0) for m, (_, st) in zip(med, points)]
            hi = [max(st.get("q3", st["median"]) * 1e3 - m, 0) for m, (_, st) in zip(med, points)]
            ax.errorbar(xs, med, yerr=[lo, hi], label=impl, capsize=2, markersize=5,
                        elinewidth=0.8, **style)
            few = [(x, m) for x, m, (_, st) in zip(xs, med, points) if st["rounds"] < FEW_ROUNDS]
            if few:  # hollow markers over the filled ones
                ax.plot(*zip(*few), linestyle="none", marker=style["marker"], markersize=5,
                        markerfacecolor="white", markeredgecolor=style["color"], zorder=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ns))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in ns])
        if len(ns) > 1:
            ax.set_xlim(ns[0] / 1.4, ns[-1] * 1.4)
        notes = sorted({st["note"] for points in lines.values() for _, st in points
                        if st.get("note")})
        ax.set_title("\n".join([OP_TITLES.get(op, op), *notes]), fontsize=9)
        ax.set_xlabel("N (rows)")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="major", linewidth=0.4, alpha=0.7)
        ax.grid(True, which="minor", axis="y", linewidth=0.3, alpha=0.25)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    # One legend for the figure: an implementation has the same style in every subplot.
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    rank = {head: i for i, head in enumerate(("tripmine", "numpy", "torch.cdist", "pml"))}
    handles = dict(sorted(handles.items(), key=lambda kv: (
        rank.get(re.split(r"[ ,]", kv[0], maxsplit=1)[0], len(rank) + kv[0].startswith(
            "gemm")), kv[0])))
    fig.legend(handles.values(), handles.keys(), loc="lower center", fontsize=8,
               ncol=min(len(handles), 4), bbox_to_anchor=(0.5, 0.02), frameon=False)
    fig.suptitle(plot_title(data), fontsize=10)
    note = (f"Markers: medians; bars: interquartile range; hollow: fewer than {FEW_ROUNDS} "
            f"rounds. On the log scale the gap to the {baseline} line is the ratio in the table.")
    skipped = data.get("machine_info", {}).get("skipped_cases") or []
    if skipped:
        note += " Not measured: " + ", ".join(f"{s['case']} N={s['n']}" for s in skipped)
        note += " (reasons: report table)."
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.8 / (4.0 * nrows + 1.2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="file written by pytest --benchmark-json")
    ap.add_argument("--baseline", default="gemm", help="case the ratios refer to (default gemm)")
    ap.add_argument("--plot", metavar="PATH",
                    help="also write a PNG of time vs N per op, log-log (needs matplotlib)")
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
    skipped = info.get("skipped_cases") or []
    if skipped:
        print("\nNot measured in this run:\n")
        for s in skipped:
            print(f"* {s['group']} | {s['case']}: {s['reason']}")
    if args.plot and not plot(groups, args.plot, data, args.baseline):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
