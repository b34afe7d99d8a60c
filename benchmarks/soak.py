"""Soak test: a long DDP training run with CoupleFace + EKD over the global
batch (2 gloo ranks on CPU). Every rank records its resident memory after
each step; the run passes when no rank hangs (collectives time out, the run
has a deadline) and the resident memory of the last 500 steps is no higher
than that of the first 500 plus a small allowance (no growth per step).

Usage (from the repository root):
  python3 benchmarks/soak.py                      # 2,000 steps, batch 128 per rank
  python3 benchmarks/soak.py --steps 300 --json bench-output/soak.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import relkd  # noqa: E402

WINDOW = 500                   # steps compared at the start and the end
GROWTH_ALLOWANCE = 16 << 20    # bytes: allocator noise, not a per-step leak


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train(rank: int, world: int, init_file: str, out_dir: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    student = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128)))
    coupleface = relkd.CoupleFaceLoss(k=16, gather=True)
    ekd = relkd.EKDLoss(topk=500, gather=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    rss, seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        images = torch.randn(batch, 64, generator=data)
        labels = torch.randint(0, batch // 2, (batch,), generator=data)
        with torch.no_grad():
            ft = teacher(images)
        fs = student(images)
        loss = coupleface(fs, ft, labels) + ekd(fs, ft, labels)
        (loss * world).backward()
        loss = loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        rss.append(rss_bytes())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump({"rss": rss, "seconds": seconds, "final_loss": loss.item()}, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown race at interpreter exit (see README)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128, help="rows per rank")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    window = min(WINDOW, args.steps // 4)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(train, args=(args.world, os.path.join(tmp, "init"), tmp, args.steps,
                                        args.batch), nprocs=args.world, join=False)
        while not context.join(timeout=5):
            if time.perf_counter() - started > args.deadline:
                for process in context.processes:
                    process.kill()
                print(f"FAIL: ranks still running after {args.deadline:.0f} s (a hang)")
                return 1
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
    rows, ok = [], True
    for rank, result in enumerate(ranks):
        first = max(result["rss"][:window])
        last = max(result["rss"][-window:])
        grew = last - first
        ok &= grew <= GROWTH_ALLOWANCE
        rows.append({"rank": rank, "rss_max_first_window_mib": first / 2**20,
                     "rss_max_last_window_mib": last / 2**20, "growth_mib": grew / 2**20,
                     "median_step_ms": 1e3 * sorted(result["seconds"])[len(result["seconds"]) // 2],
                     "final_loss": result["final_loss"]})
    print(f"{args.steps} steps, {args.world} gloo ranks x batch {args.batch}, CoupleFace + EKD, "
          f"{time.perf_counter() - started:.0f} s; resident memory, max over the first and the "
          f"last {window} steps:")
    for row in rows:
        print(f"  rank {row['rank']}: {row['rss_max_first_window_mib']:.1f} MiB -> "
              f"{row['rss_max_last_window_mib']:.1f} MiB ({row['growth_mib']:+.1f} MiB), "
              f"median step {row['median_step_ms']:.1f} ms")
    print("PASS" if ok else f"FAIL: resident memory grew by more than "
          f"{GROWTH_ALLOWANCE >> 20} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "world": args.world,
                                         "batch": args.batch, "window": window, "ok": ok,
                                         "ranks": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
