"""Peak extra memory of one fused forward+backward at several thread counts
(torch.set_num_threads), each in a fresh process measured like bench.py's
memory children (cases.probe_peak_memory). relkd's kernels keep one copy of
every gradient whatever the thread count, plus per-thread tiles: the memory
must not grow with the threads beyond that.

Usage (from the repository root):
  python3 benchmarks/threads_memory.py                       # CCKD, N=8192, D=256
  python3 benchmarks/threads_memory.py --losses cckd,rkd,ekd --n 8192 --threads 1,2,8,16
  python3 benchmarks/threads_memory.py --json bench-output/threads-memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROBE = """
import sys, json, torch
torch.set_num_threads({threads})
sys.path[:0] = [{root!r}, {bench!r}]
import cases
result = cases.probe_peak_memory(cases.Case(**json.loads({case!r})))
result["threads"] = torch.get_num_threads()
print(json.dumps(result))
"""


def probe(case: dict, threads: int) -> dict:
    code = PROBE.format(threads=threads, root=str(BENCH_DIR.parent), bench=str(BENCH_DIR),
                        case=json.dumps(case))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        return {"memory_error": done.stderr.strip().splitlines()[-1:] or "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="cckd")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", default="1,2,8,16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("| loss | N x D | threads | peak extra memory |\n|---|---|---:|---:|")
    for loss in args.losses.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            case = {"op": loss, "backend": "fused", "mode": "fwd+bwd", "n": args.n,
                    "d": args.dim}
            result = probe(case, threads)
            rows.append({**case, "threads": threads, **result})
            size = result.get("peak_extra_bytes")
            shown = f"{size / 2**20:.1f} MiB" if size is not None else result.get("memory_error")
            print(f"| {loss} | {args.n} x {args.dim} | {threads} | {shown} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
