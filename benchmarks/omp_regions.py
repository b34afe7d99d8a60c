"""OpenMP parallel regions per fwd+bwd call of each fused loss (CPU).

Every region ends with libgomp's idle worker spinning for a few ms (unless
OMP_WAIT_POLICY=PASSIVE), CPU time a busy machine's other processes need, so
this count predicts how a loss fares under `bench.py --contention`.

Counts calls of libgomp's GOMP_parallel with a perf uprobe (Linux perf and
root needed): the difference between runs of 2R and R calls, divided by R.

    python3 benchmarks/omp_regions.py [--losses rad,sp] [--n 4096] [--dim 256]
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cases  # noqa: E402

EVENT = "probe_libgomp:GOMP_parallel"


def libgomp() -> str:
    found = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if not found:
        raise SystemExit("no libgomp next to torch (this torch does not use GNU OpenMP)")
    return found[0]


def add_probe() -> None:
    listed = subprocess.run(["perf", "probe", "--list"], capture_output=True, text=True)
    if EVENT not in listed.stdout:
        subprocess.run(["perf", "probe", "-x", libgomp(), "GOMP_parallel"], check=True,
                       capture_output=True)


def run_calls(loss: str, n: int, dim: int, calls: int) -> None:
    """Child: build the inputs, warm up, then `calls` fwd+bwd of the fused loss."""
    inputs = cases.build_loss_inputs(n, dim, "float32", "cpu", 0)
    forward_backward = cases.prepare(cases.make_case(loss, "fused", "fwd+bwd", n, dim), inputs)
    for _ in range(2 + calls):
        forward_backward()


def regions(loss: str, n: int, dim: int, calls: int) -> int:
    def count(c: int) -> int:
        cmd = ["perf", "stat", "-x,", "-e", EVENT, sys.executable, __file__, "--child", loss,
               "--n", str(n), "--dim", str(dim), "--calls", str(c)]
        err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        return int(next(line for line in err.splitlines() if EVENT in line).split(",")[0])

    return round((count(2 * calls) - count(calls)) / calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=",".join(cases.LOSS_NAMES))
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_calls(args.child, args.n, args.dim, args.calls)
        return
    add_probe()
    print(f"OpenMP regions per fused fwd+bwd, N={args.n}, D={args.dim}, "
          f"{torch.get_num_threads()} threads:")
    for loss in args.losses.split(","):
        print(f"  {loss}: {regions(loss, args.n, args.dim, args.calls)}")


if __name__ == "__main__":
    main()
