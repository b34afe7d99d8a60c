"""EKD fwd+bwd with its one-pass threshold selection on and off, and the GEMM
floor, timed in turn in one process (so the machine's drift hits all three
alike): `python3 benchmarks/ekd_selection_ab.py N D [ROUNDS]`. "off" is the
radix passes alone (relkd.ops.COLLECT_MIN_ROWS raised above N)."""
import statistics
import sys
import time

import cases
from relkd import ops


def main() -> None:
    n, d = int(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    runs = {}
    for backend in ("fused", "gemm"):
        case = cases.make_case("ekd", backend, "fwd+bwd", n, d)
        runs[backend] = cases.prepare(case, cases.build_inputs(case))
    min_rows = ops.COLLECT_MIN_ROWS
    plan = {  # name: (call, COLLECT_MIN_ROWS during it)
        "radix passes only": (runs["fused"], n + 1),
        "one-pass selection": (runs["fused"], min_rows),
        "GEMM floor": (runs["gemm"], min_rows),
    }
    times = {name: [] for name in plan}
    for run, _ in plan.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, (run, rows) in plan.items():
            ops.COLLECT_MIN_ROWS = rows
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ops.COLLECT_MIN_ROWS = min_rows
    floor = statistics.median(times["GEMM floor"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"EKD N={n} D={d} {name}: {median * 1e3:.1f} ms, {median / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
