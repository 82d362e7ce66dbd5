"""Command line: ``python -m tripmine info`` and ``python -m tripmine demo``."""

from __future__ import annotations

import argparse
import sys
import time

#: Variables OpenBLAS takes its thread count from (one thread: no spinning worker).
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def blas_advice(environ=None, blas=None, cpus=None) -> str:
    """One line on NumPy's BLAS beside tripmine: an OpenBLAS with several threads whose
    workers spin after each product (OPENBLAS_THREAD_TIMEOUT unset) takes a core from
    tripmine's threads when a trainer alternates the two (benchmarks/spin_threads.py)."""
    import os

    environ = os.environ if environ is None else environ
    if blas is None:
        try:
            import numpy as np

            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        except Exception:  # older NumPy, or another build layout
            return "unknown"
    name = f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()
    if "openblas" not in name.lower():
        return name
    if environ.get("OPENBLAS_THREAD_TIMEOUT"):
        return f"{name}, OPENBLAS_THREAD_TIMEOUT={environ['OPENBLAS_THREAD_TIMEOUT']}"
    for variable in _BLAS_THREAD_VARIABLES:
        if environ.get(variable):
            if environ[variable].strip() == "1":
                return f"{name}, {variable}=1 (one thread: no spinning worker)"
            break  # OpenBLAS takes the first one set
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    if cpus <= 1:
        return f"{name}, one CPU (one thread: no spinning worker)"
    return (f"{name}: its workers spin about 0.1 s after each product and take a core from "
            f"tripmine's threads; set OPENBLAS_THREAD_TIMEOUT=4 before Python starts "
            f"(README, \"Inside a trainer\")")


def _info() -> int:
    import tripmine
    from tripmine import _selfcheck

    facts = tripmine.build_info()
    print(f"tripmine {facts['version']}")
    print(f"  compiler      {facts['compiler']}")
    print(f"  runtime       {facts['runtime']}")
    print(f"  ISA in use    {facts['isa']}  (usable: {', '.join(facts['isas_usable'])}; "
          f"compiled: {', '.join(facts['isas_compiled'])})")
    print(f"  threads       {facts['num_threads']}")
    print(f"  numpy BLAS    {blas_advice()}")
    if facts["sanitizers"]:
        print(f"  sanitizers    {facts['sanitizers']} (a checking build, not for speed)")
    start = time.perf_counter()
    results = _selfcheck.run()
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r[1]]
    for name, ok, detail in results:
        if not ok:
            print(f"  FAIL {name} {detail}")
    status = "passed" if not failed else "FAILED"
    print(f"self-check: {len(results) - len(failed)}/{len(results)} checks {status} "
          f"in {elapsed:.2f} s")
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    """``"256,128"`` -> (256, 128); an empty string means no hidden layer."""
    return tuple(_positive_int(part) for part in text.replace(" ", "").split(",") if part)


def _add_demo_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .demo import DEFAULT_PLOT, LOSSES, PROJECTIONS, DemoConfig
    from .losses import MINING

    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo", help="train a NumPy network on handwritten digits with tripmine's loss",
        description="Metric learning on scikit-learn's handwritten digits (1,797 8x8 images, "
                    "no download): a small NumPy MLP with L2-normalised output is trained "
                    "with tripmine's loss and gradient on P x K batches, then Recall@1 and "
                    "MAP@R of the held-out images are printed for the raw pixels, the "
                    "untrained and the trained network. Needs the demo extra: "
                    "pip install 'tripmine[demo]'.")
    demo.add_argument("--seed", type=int, default=defaults.seed,
                      help="seed of the split, the initial weights, the batches and the "
                           "miners: the same seed gives the same numbers (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                      help="passes over the training images (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="total optimiser steps; overrides --epochs (default: epochs x "
                           "batches per epoch)")
    demo.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                      help="triplet loss (with --mining), the contrastive pair loss, the "
                           "lifted structured loss (lifted), or a "
                           "margin-softmax head trained with its class weights (softmax, "
                           "normface, cosface, arcface, combined, sphereface, lsoftmax), the "
                           "center loss beside a softmax head (center), or the margin loss "
                           "with per-class beta (margin) (default: %(default)s)")
    demo.add_argument("--mining", choices=MINING, default=defaults.mining,
                      help="how the triplet loss picks its triplets in each batch "
                           "(default: %(default)s)")
    demo.add_argument("--margin", type=float, default=None,
                      help="triplet margin, the negative margin of the contrastive loss, or "
                           "a head's margin, the center loss's weight lambda or the margin loss's "
                           "alpha (default: 0.8 for triplet, 1.0 for contrastive, each head's "
                           "own, 0.2 for center and margin)")
    demo.add_argument("--p", type=_positive_int, default=None,
                      help="classes per batch (default: every training class, 10; 5 with "
                           "--open-set)")
    demo.add_argument("--k", type=_positive_int, default=defaults.k,
                      help="images per class in a batch (default: %(default)s)")
    demo.add_argument("--lr", type=float, default=defaults.lr,
                      help="Adam's learning rate, decayed to 0 on a cosine schedule "
                           "(default: %(default)s)")
    demo.add_argument("--dim", type=_positive_int, default=defaults.dim,
                      help="embedding dimension (default: %(default)s)")
    demo.add_argument("--hidden", type=_widths, default=defaults.hidden, metavar="WIDTHS",
                      help=f"hidden layer widths, comma-separated; '' for none "
                           f"(default: {','.join(map(str, defaults.hidden))})")
    demo.add_argument("--open-set", action="store_true",
                      help="train on digits 0-4 and evaluate on digits 5-9, never seen in "
                           "training (default: split by samples, every digit in both parts)")
    demo.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                      help="share of each digit's images held out for evaluation "
                           "(split by samples only; default: %(default)s)")
    demo.add_argument("--projection", choices=PROJECTIONS, default=defaults.projection,
                      help="2-D projection of the embeddings in the plot (default: "
                           "%(default)s)")
    demo.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH",
                      help="where to write the PNG: loss curve and held-out embeddings before "
                           "and after training (default: %(default)s)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    demo.add_argument("--json", default=None, metavar="PATH",
                      help="also write the figures as JSON: {\"embeddings\": {\"raw_pixels\" | "
                           "\"untrained\" | \"trained\": {\"recall_at_1\", \"map_at_r\"}}, "
                           "\"seconds\", ...}")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bar (then tqdm is not needed)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="threads of tripmine's C core and NumPy's BLAS during the demo; the "
                           "batches are small, so one is fastest (default: %(default)s)")
    return demo


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import demo

    config = demo.DemoConfig(
        seed=args.seed, epochs=args.epochs, steps=args.steps, mining=args.mining,
        loss=args.loss, margin=args.margin, p=args.p, k=args.k, lr=args.lr, dim=args.dim,
        hidden=args.hidden, open_set=args.open_set, test_fraction=args.test_fraction,
        projection=args.projection)
    try:
        config.check()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        demo.run(config, plot=None if args.no_plot else args.plot, json_path=args.json,
                 progress=not args.no_progress, threads=args.threads)
    except demo.MissingDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tripmine",
                                     description="tripmine command line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="print build facts and run a quick self-check")
    demo_parser = _add_demo_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "demo":
        return _demo(args, demo_parser)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
