"""Command line: ``python -m tripmine info``."""

from __future__ import annotations

import argparse
import sys
import time


def _info() -> int:
    import tripmine
    from tripmine import _selfcheck

    facts = tripmine.build_info()
    openmp = f"yes (_OPENMP {facts['openmp']})" if facts["openmp"] else "no (single-threaded)"
    print(f"tripmine {facts['version']}")
    print(f"  compiler      {facts['compiler']}")
    print(f"  OpenMP        {openmp}")
    print(f"  ISA in use    {facts['isa']}  (usable: {', '.join(facts['isas_usable'])}; "
          f"compiled: {', '.join(facts['isas_compiled'])})")
    print(f"  threads       {facts['num_threads']}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tripmine",
                                     description="tripmine command line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="print build facts and run a quick self-check")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
