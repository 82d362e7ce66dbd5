"""Issue 17's speed check: the cost of the range checks on calls inside the window.

Times the same calls with two builds of tripmine, in alternating fresh processes (best of
``--repeat`` per call and process, median over ``--rounds`` processes per build):

    python benchmarks/range_overhead.py --before /path/to/old/checkout --after .

Each build's directory must hold a built tripmine (``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {
    "triplet batch_hard N=256": "tripmine.triplet_loss(x256, y256)",
    "triplet batch_hard N=4096": "tripmine.triplet_loss(x4096, y4096)",
    "triplet batch_all N=1024": "tripmine.triplet_loss(x1024, y1024, mining='batch_all')",
    "triplet given N=1024 (float64)": "tripmine.triplet_loss(x1024d, y1024, mining=given)",
    "contrastive N=1024": "tripmine.contrastive_loss(x1024, y1024)",
    "pairwise N=1024 into out": "tripmine.pairwise_distances(x1024, out=out1024)",
    "normalize=True batch_hard N=1024": "tripmine.triplet_loss(x1024, y1024, normalize=True)",
}

CHILD = r"""
import json, sys, timeit
import numpy as np
sys.path.insert(0, sys.argv[1])
import tripmine
tripmine.set_num_threads(2)
rng = np.random.default_rng(0)
def rows(n):
    x = rng.standard_normal((n, 128)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
x256, x1024, x4096 = rows(256), rows(1024), rows(4096)
x1024d = x1024.astype(np.float64)
y256, y1024, y4096 = (np.repeat(np.arange(n // 4), 4) for n in (256, 1024, 4096))
out1024 = np.empty((1024, 1024), np.float32)
given = tripmine.batch_hard(x1024, y1024)
cases = json.loads(sys.argv[2])
repeat = int(sys.argv[3])
result = {}
for name, stmt in cases.items():
    t = timeit.Timer(stmt, globals=globals())
    number = max(1, int(0.05 / max(t.timeit(1), 1e-7)))
    result[name] = min(t.repeat(repeat, number)) / number
print(json.dumps(result))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    times: dict = {"before": {}, "after": {}}
    env = dict(os.environ, PYTHONPATH="")
    for _ in range(args.rounds):
        for label in ("before", "after"):
            path = os.path.abspath(getattr(args, label))
            out = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(CASES),
                                  str(args.repeat)], capture_output=True, text=True, env=env,
                                 cwd="/", check=True).stdout
            for name, value in json.loads(out).items():
                times[label].setdefault(name, []).append(value)
    print("| call | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for name in CASES:
        b, a = (statistics.median(times[k][name]) for k in ("before", "after"))
        print(f"| {name} | {b * 1e3:.3f} ms | {a * 1e3:.3f} ms | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
