"""Slowdown beside one busy process of RAD's parts (CPU, N=4096, D=256):
its mining (`topk_sim_self`, k=16), one bare `x @ x.T`, and RAD fwd+bwd,
each timed alternately alone and beside a single-threaded busy loop (9
alternations, medians). It separates a loss's slowdown from the floor any
two-thread computation pays on the machine.

    python3 benchmarks/contention_parts.py
"""
import signal
import subprocess
import sys
import time

import torch

import relkd
from relkd import ops


def main() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(4096, 256), dim=1)
    y = torch.randint(0, 400, (4096,))
    fs = torch.randn(4096, 256, requires_grad=True)
    ft = torch.randn(4096, 256)
    rad = relkd.RADLoss()

    def rad_step():
        rad(fs, ft, y).backward()

    cases = {"topk_sim_self": lambda: ops.topk_sim_self(x, 16, y), "mm": lambda: x @ x.T,
             "rad fwd+bwd": rad_step}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name, run in cases.items():
            run()
            run()
            quiet, beside = [], []
            for _ in range(9):
                for times, sig in ((quiet, signal.SIGSTOP), (beside, signal.SIGCONT)):
                    busy.send_signal(sig)
                    time.sleep(0.02)
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
            q, b = sorted(quiet)[4], sorted(beside)[4]
            print(f"{name}: quiet {q * 1e3:.1f} ms, busy {b * 1e3:.1f} ms, slowdown {b / q:.2f}")
    finally:
        busy.kill()


if __name__ == "__main__":
    main()
