"""Speed and memory benchmark of relkd's losses, similarity_topk and ida_scores.

For every loss it times the forward pass and forward+backward with the fused
kernels, the eager reference (which materialises N x N) and the reference
under torch.compile; for similarity_topk it times the fused kernel against
chunked torch.mm + topk (several chunk sizes; the best is the baseline) and
against the bare matrix product of the same shapes (the physical floor); for
ida_scores (IDA score alignment of N pairs against an M-row support gallery)
it times the fused path against the reference run over chunks of pairs (its
memory bounded by the chunk). All backends of a shape run in one process on
the same inputs. It reports the
median time over repeats, the peak extra memory of one pass and ratios:

  speedup vs eager    eager reference median / this median  (JSON ratio_vs_eager)
  memory vs eager     this peak extra / eager reference's    (memory_ratio_vs_eager)
  vs best chunked     best chunked median / this median      (ratio_vs_chunked)
  x GEMM floor        this median / best bare-GEMM median    (time_over_gemm_floor)
  floor TFLOP/s       the floor's FLOPs / this median         (floor_tflops); in
                      brackets against the machine's bf16 torch.mm rate,
                      measured in the same run (fraction_of_bf16_mm; machine
                      bf16_mm_tflops)
  vs reference        IDA: reference time for all pairs / this (ratio_vs_reference)

The IDA reference sorts each face's M similarities; at full size it would
take hours, so it runs the first --ida-subset pairs and its time for all N
pairs is extrapolated linearly (every chunk does the same work; JSON
pairs_run, time_all_pairs_s, extrapolated). Its peak memory is measured: it
is the peak of one chunk.

Timing: time.perf_counter around one pass (CUDA synchronised), after a
warm-up on tiny inputs and full-size warm-ups (two for compiled, so that
compilation is excluded); at least the planned repeats, more for fast cases
until 0.5 s of timed runs (at most 50). A case that fails (e.g. torch.compile
cannot compile it) records its error instead of a time.

Peak extra memory: on CPU the resident-set high-water mark of a fresh child
process per case, forked from a server that has imported torch, torch._dynamo
and relkd (so a child starts in ~0.2 s): glibc's mmap threshold fixed (so
freed tensors leave the RSS at once and the peak is reproducible), a tiny
warm-up, inputs built, the high-water mark reset to the current RSS
(/proc/self/clear_refs; where that is impossible, ru_maxrss after the inputs
is the baseline), one pass, peak minus baseline. On CUDA,
torch.cuda.max_memory_allocated after reset_peak_memory_stats, in process.

Default sweep (fp32, D=256; tens of minutes on 2 CPU cores):
  N=4096   each loss: fused, reference, compiled reference; 5 repeats
  N=8192   each loss: fused, reference; 2 repeats (the memory comparison)
  N=32768  each loss: fused only (the reference needs tens of GB); 2 repeats
  similarity_topk N=4096 x M=262144, D=256, k=100: fused, chunked torch
           (chunks 4096, 16384, 65536), bare GEMM floor; 3 repeats
  ida_scores 100,000 pairs x M=1,000,000, D=256, k=50: fused (chunks of 4096
           pairs), reference in chunks of 32 pairs on the first 128 pairs;
           1 repeat (about 20 minutes on 2 cores, half of it the memory child)
--quick: losses at N=1024, D=128 (fused and reference; --compile adds the
compiled reference), similarity_topk 1024 x 16384 and ida_scores 1000 pairs
x 20000, D=128 (the reference on all pairs): under a minute on 2 idle cores.

Usage (from the repository root):
  python3 benchmarks/bench.py --quick
  python3 benchmarks/bench.py --json benchmarks/results/latest-cpu.json
  python3 benchmarks/bench.py --only losses --sizes 8192 --losses cckd,ekd
  python3 benchmarks/bench.py --only topk --topk-shape 4096,262144 --repeats 1
  python3 benchmarks/bench.py --only ida --ida-shape 100000,1000000 --ida-subset 128
  python3 benchmarks/bench.py --sizes 4096 --no-compile --no-memory
  python3 benchmarks/bench.py --case '{"op": "cckd", "backend": "fused",
                                       "mode": "fwd+bwd", "n": 8192, "d": 256}'
The last form measures one case's peak extra memory in this process and
prints it as JSON (what each child does). The Markdown tables go to stdout,
progress to stderr. The JSON holds {"machine", "config", "records"}, one
record per case, backend and pass, with median_s, times_s,
peak_extra_bytes, the ratios above and error / memory_error. The load
average before and after is recorded: other processes on the cores make the
timings unreliable.

TORCHINDUCTOR_COMPILE_THREADS defaults to 1 here, so that no pool of compile
workers competes with the timed runs for the cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (str(REPO_ROOT), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import cases  # noqa: E402
import relkd  # noqa: E402
from cases import EXTRA_LOSS_NAMES, IDA, LOSS_NAMES, TOPK, Case  # noqa: E402

FULL_LOSS_SIZES = (4096, 8192, 32768)
QUICK_LOSS_SIZES = (1024,)
FULL_DIM, QUICK_DIM = 256, 128
FULL_TOPK_SHAPE, QUICK_TOPK_SHAPE = (4096, 262144), (1024, 16384)
TOPK_K = 100
CHUNK_SIZES = (4096, 16384, 65536)
TOPK_REFERENCE_MAX_ELEMENTS = 1 << 22  # the reference sorts all N x M similarities
FULL_IDA_SHAPE, QUICK_IDA_SHAPE = (100_000, 1_000_000), (1000, 20000)
IDA_K = 50
IDA_FUSED_CHUNK = relkd.ida.DEFAULT_CHUNK_SIZE // 2  # pairs per fused search
IDA_REFERENCE_CHUNK = 32   # pairs per reference chunk: ~2.3 GB at M = 1,000,000
IDA_REFERENCE_SUBSET = 128  # pairs the reference runs at full size (then extrapolated)
MEMORY_TIMEOUT_S = 3600
MIN_TIMED_S = 0.5   # fast cases repeat until their timed runs add up to this
MAX_REPEATS = 50


@dataclass
class Plan:
    """Which backends run at a size, and how often."""
    backends: Sequence[str]
    repeats: int
    warmups: int  # full-size warm-up runs ("compiled" always gets >= 2)


def loss_plan(n: int, quick: bool, device: str = "cpu") -> Plan:
    """Per batch size: eager and compiled reference only where their N x N
    matrices are affordable; fewer repeats where one pass takes seconds. On
    CUDA every backend runs at every size: where the reference runs out of
    GPU memory, the recorded error is its OOM point."""
    if device.startswith("cuda"):
        return Plan(("fused", "reference", "compiled", "gemm"), repeats=5 if n <= 8192 else 3,
                    warmups=1)
    if quick:
        return Plan(("fused", "reference", "compiled", "gemm"), repeats=3, warmups=1)
    if n <= 4096:
        return Plan(("fused", "reference", "compiled", "gemm"), repeats=5, warmups=1)
    if n <= 8192:
        return Plan(("fused", "reference", "gemm"), repeats=2, warmups=1)
    return Plan(("fused", "gemm"), repeats=2, warmups=0)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401,PLC0415
    except ImportError:
        return False
    return True


def topk_plan(n: int, m: int) -> Plan:
    """The reference (and its compiled form) only where sorting all N x M
    similarities is affordable."""
    backends = ["fused", "chunked", "gemm"] + (["faiss"] if faiss_available() else [])
    if n * m <= TOPK_REFERENCE_MAX_ELEMENTS:
        backends[1:1] = ["reference", "compiled"]
    return Plan(tuple(backends), repeats=3, warmups=1)


def ida_plan(quick: bool) -> Plan:
    """One pass at full size (minutes each); a few in the quick sweep."""
    return Plan(("fused", "reference"), repeats=3 if quick else 1, warmups=1 if quick else 0)


@dataclass
class Measurement:
    """A case with its plan and, once run, its results."""
    case: Case
    repeats: int
    warmups: int
    times_s: List[float] = field(default_factory=list)
    contended_s: List[float] = field(default_factory=list)  # --contention: with a busy process
    error: Optional[str] = None
    memory: Dict = field(default_factory=dict)

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times_s) if self.times_s else None


# ------------------------------------------------------------------ the sweep
def build_sweep(args) -> List[Measurement]:
    """Every measurement the arguments select, grouped by shape."""
    sweep: List[Measurement] = []
    passes = [p for p in args.passes if p in cases.PASSES + cases.EXTRA_PASSES]
    if args.only in ("all", "losses"):
        for n in args.sizes:
            plan = loss_plan(n, args.quick, args.device)
            for op in args.losses:
                for mode in passes:
                    for backend in selected(plan.backends, args):
                        if mode == "hvp" and backend == "compiled":
                            continue  # torch.compile does not run double backward
                        if backend == "gemm" and not cases.gemm_floor_products(
                                op, mode, args.dim, args.dim):
                            continue  # no relation matrix (FCD): no floor
                        case = cases.make_case(op, backend, mode, n, args.dim, dtype=args.dtype,
                                               device=args.device, seed=args.seed)
                        sweep.append(planned(case, plan, args))
    if args.only in ("all", "topk") and "fwd" in passes:
        n, m = args.topk_shape
        plan = topk_plan(n, m)
        chunks = sorted({min(c, m) for c in args.chunks})
        for backend in selected(plan.backends, args):
            for chunk in chunks if backend in ("chunked", "gemm") else [None]:
                case = Case(TOPK, backend, "fwd", n, args.dim, m=m, k=args.topk_k, chunk=chunk,
                            dtype=args.dtype, device=args.device, seed=args.seed)
                sweep.append(planned(case, plan, args))
    # IDA at full size takes about an hour on 2 cores: only when asked for
    # (--only ida), or in the quick sweep.
    if (args.only == "ida" or (args.only == "all" and args.quick)) and "fwd" in passes:
        n, m = args.ida_shape
        plan = ida_plan(args.quick)
        for backend in selected(plan.backends, args):
            reference = backend == "reference"
            subset = args.ida_subset if reference and args.ida_subset < n else None
            case = Case(IDA, backend, "fwd", n, args.dim, m=m, k=args.ida_k,
                        chunk=args.ida_chunk if reference else IDA_FUSED_CHUNK,
                        dtype=args.dtype, device=args.device, seed=args.seed, subset=subset)
            sweep.append(planned(case, plan, args))
    return sweep


def selected(backends: Sequence[str], args) -> List[str]:
    return [b for b in backends if b in args.backends and (b != "compiled" or args.compile)]


def planned(case: Case, plan: Plan, args) -> Measurement:
    warmups = max(plan.warmups, 2) if case.backend == "compiled" else plan.warmups
    return Measurement(case, args.repeats or plan.repeats, warmups)


# ------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wants_more(times: List[float], repeats: int) -> bool:
    """At least `repeats` calls, more (up to MAX_REPEATS) while they add up
    to less than MIN_TIMED_S, so that millisecond cases get a stable median."""
    return len(times) < repeats or (sum(times) < MIN_TIMED_S and len(times) < MAX_REPEATS)


def time_runs(run: Callable[[], None], repeats: int, warmups: int, device: str) -> List[float]:
    """Wall-clock seconds of calls of run() after `warmups` calls, as many as
    wants_more asks for."""
    for _ in range(warmups):
        run()
    times: List[float] = []
    while wants_more(times, repeats):
        times.append(time_call(run, device))
    return times


def time_call(run: Callable[[], None], device: str) -> float:
    """Wall-clock seconds of one call of run(), the device synchronised."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


CONTENTION_MIN_REPEATS = 7  # alternating pairs per case under --contention


def busy_process() -> subprocess.Popen:
    """One competing single-threaded busy process (a training machine's data
    loader, say) for --contention."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def time_quiet_and_busy(run: Callable[[], None], repeats: int, warmups: int,
                        device: str) -> tuple:
    """(quiet, busy) wall-clock seconds of `repeats` calls each, alternating:
    one call with the busy process stopped (SIGSTOP), one beside it running.
    Alternating keeps this shared machine's drift out of the ratio; stopping
    the process instead of starting one per call keeps its start-up out."""
    for _ in range(warmups):
        run()
    busy = busy_process()
    quiet_s: List[float] = []
    busy_s: List[float] = []
    try:
        for _ in range(repeats):
            for times, signal_name in ((quiet_s, signal.SIGSTOP), (busy_s, signal.SIGCONT)):
                busy.send_signal(signal_name)
                time.sleep(0.02)  # let the scheduler settle
                times.append(time_call(run, device))
    finally:
        busy.kill()
        busy.wait()
    return quiet_s, busy_s


def record_error(measurement: Measurement, exc: Exception) -> None:
    """A failed case (e.g. a compilation failure or OOM) is recorded, not fatal."""
    measurement.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
    if measurement.case.device.startswith("cuda"):
        torch.cuda.empty_cache()  # an out-of-memory case leaves the next one its memory


def time_interleaved(group: List[Measurement], inputs) -> None:
    """--interleave: the cases of one shape timed in turn, one call of each
    per round, so that the machine's drift during the group affects every
    backend alike (rounds go on while any case wants more calls)."""
    runs = []
    for measurement in group:
        try:
            cases.warm_up_tiny(measurement.case)
            run = cases.prepare(measurement.case, inputs)
            for _ in range(measurement.warmups):
                run()
            runs.append((measurement, run))
        except Exception as exc:  # noqa: BLE001
            record_error(measurement, exc)
    while any(m.error is None and wants_more(m.times_s, m.repeats) for m, _ in runs):
        for measurement, run in runs:
            if measurement.error is None:
                try:
                    measurement.times_s.append(time_call(run, measurement.case.device))
                except Exception as exc:  # noqa: BLE001
                    record_error(measurement, exc)


def time_measurement(measurement: Measurement, inputs, contention: bool = False) -> None:
    case = measurement.case
    try:
        cases.warm_up_tiny(case)
        run = cases.prepare(case, inputs)
        if contention:  # quiet and beside a busy process, alternating
            measurement.times_s, measurement.contended_s = time_quiet_and_busy(
                run, max(measurement.repeats, CONTENTION_MIN_REPEATS), measurement.warmups,
                case.device)
        else:
            measurement.times_s = time_runs(run, measurement.repeats, measurement.warmups,
                                            case.device)
    except Exception as exc:  # noqa: BLE001
        record_error(measurement, exc)


# ------------------------------------------------------------------- memory
_MEMORY_CONTEXT = None


def memory_context():
    """A forkserver whose server has imported torch and relkd: every memory
    child is a fresh process (its own RSS high-water mark, no OpenMP state
    inherited from the timing runs) without paying the imports again."""
    global _MEMORY_CONTEXT
    if _MEMORY_CONTEXT is None:
        _MEMORY_CONTEXT = multiprocessing.get_context("forkserver")
        _MEMORY_CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "relkd", "cases"])
    return _MEMORY_CONTEXT


def measure_memory_in_subprocess(case: Case, timeout_s: float = MEMORY_TIMEOUT_S) -> Dict:
    """cases.probe_peak_memory(case) in a child process; errors (including
    the child being killed, e.g. out of memory) come back as memory_error."""
    context = memory_context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=cases.child_probe, args=(case.to_json(), sender))
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            child.terminate()
            return {"memory_error": f"timed out after {timeout_s:.0f} s"}
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", None
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    if status == "ok":
        return payload
    return {"memory_error": payload or f"memory child exited with code {child.exitcode}"}


def measure_memory(measurement: Measurement) -> None:
    case = measurement.case
    if measurement.error is not None:
        return  # the op itself failed: nothing to measure
    if case.device.startswith("cuda"):
        try:
            measurement.memory = cases.probe_peak_memory(case)
        except Exception as exc:  # noqa: BLE001
            measurement.memory = {"memory_error": f"{type(exc).__name__}: {exc}"}
    else:
        measurement.memory = measure_memory_in_subprocess(case)


# ------------------------------------------------------------------ running
def run_sweep(sweep: List[Measurement], measure_peak: bool, contention: bool = False,
              interleave: bool = False) -> None:
    """Time every measurement (inputs shared by all cases of a shape; with
    `interleave`, the cases of a shape in turn), then measure its peak
    memory; progress on stderr."""
    inputs_by_key: Dict[tuple, object] = {}
    for index, measurement in enumerate(sweep, 1):
        case = measurement.case
        key = cases.inputs_key(case)
        started = time.perf_counter()
        if key not in inputs_by_key:
            inputs_by_key.clear()  # one shape at a time
            inputs_by_key[key] = cases.build_inputs(case)
            log(f"inputs for {case.name}: {time.perf_counter() - started:.1f} s")
            if interleave:
                started = time.perf_counter()
                time_interleaved([m for m in sweep if cases.inputs_key(m.case) == key],
                                 inputs_by_key[key])
                log(f"timed the {case.name} cases in turn: {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        if not interleave:
            time_measurement(measurement, inputs_by_key[key], contention)
        timed = time.perf_counter() - started
        if measure_peak:
            measure_memory(measurement)
        result = format_time(measurement.median_s) if measurement.times_s else "error"
        log(f"[{index}/{len(sweep)}] {case.name} {describe_backend(case.backend, case.chunk)} "
            f"{case.mode}: {result} "
            f"(timing {timed:.1f} s, total {time.perf_counter() - started:.1f} s)"
            + (f" error: {measurement.error[:200]}" if measurement.error else ""))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- ratios
def to_records(sweep: List[Measurement]) -> List[Dict]:
    """One JSON record per measurement, with the ratios against the eager
    reference (same op, shape and pass), the best chunked baseline and the
    best bare-GEMM floor."""
    def best_median(backend: str, case: Case) -> Optional[float]:
        medians = [m.median_s for m in sweep
                   if m.case.backend == backend and m.median_s is not None
                   and cases.inputs_key(m.case) == cases.inputs_key(case)
                   and m.case.mode == case.mode and m.case.op == case.op]
        return min(medians) if medians else None

    def eager(case: Case) -> Optional[Measurement]:
        for m in sweep:
            if (m.case.backend == "reference" and m.case.op == case.op and m.case.mode == case.mode
                    and cases.inputs_key(m.case) == cases.inputs_key(case)):
                return m
        return None

    records = []
    for m in sweep:
        case = m.case
        record = {
            "case": case.name, "kind": case.kind, "op": case.op, "backend": case.backend,
            "chunk": case.chunk, "N": case.n, "D": case.d, "M": case.m, "k": case.k,
            "dtype": case.dtype, "device": case.device, "pass": case.mode,
            "repeats": m.repeats, "warmups": m.warmups, "median_s": m.median_s,
            "times_s": m.times_s, "peak_extra_bytes": m.memory.get("peak_extra_bytes"),
            "memory_method": m.memory.get("memory_method"),
            "ratio_vs_eager": None, "memory_ratio_vs_eager": None,
            "error": m.error, "memory_error": m.memory.get("memory_error"),
        }
        reference = eager(case)
        if reference is not None and reference.median_s and m.median_s and case.kind != "ida":
            record["ratio_vs_eager"] = reference.median_s / m.median_s
        ref_memory = reference.memory.get("peak_extra_bytes") if reference else None
        if ref_memory and record["peak_extra_bytes"] is not None:
            record["memory_ratio_vs_eager"] = record["peak_extra_bytes"] / ref_memory
        if case.kind == "ida":
            record.update(ida_fields(m, sweep))
        gemm = best_median("gemm", case)
        record["time_over_gemm_floor"] = m.median_s / gemm if gemm and m.median_s else None
        flops = cases.floor_flops(case)
        record["floor_flops"] = flops
        record["floor_tflops"] = flops / m.median_s / 1e12 if flops and m.median_s else None
        record["median_contended_s"] = (statistics.median(m.contended_s) if m.contended_s
                                        else None)
        record["slowdown_under_contention"] = (record["median_contended_s"] / m.median_s
                                               if m.contended_s and m.median_s else None)
        if case.kind == "topk":
            chunked, faiss = best_median("chunked", case), best_median("faiss", case)
            record["ratio_vs_chunked"] = chunked / m.median_s if chunked and m.median_s else None
            record["ratio_vs_faiss"] = faiss / m.median_s if faiss and m.median_s else None
            record["best_of_backend"] = (m.median_s is not None
                                         and m.median_s == best_median(case.backend, case))
        records.append(record)
    return records


def ida_time_all_pairs(m: Measurement) -> Optional[float]:
    """The time for all N pairs: measured, or extrapolated from the subset."""
    if m.median_s is None:
        return None
    return m.median_s * m.case.n / (m.case.subset or m.case.n)


def ida_fields(m: Measurement, sweep: List[Measurement]) -> Dict:
    reference = next((r for r in sweep if r.case.kind == "ida" and r.case.backend == "reference"
                      and cases.inputs_key(r.case) == cases.inputs_key(m.case)), None)
    mine, theirs = ida_time_all_pairs(m), reference and ida_time_all_pairs(reference)
    return {"pairs_run": m.case.subset or m.case.n, "time_all_pairs_s": mine,
            "extrapolated": m.case.subset is not None,
            "ratio_vs_reference": theirs / mine if theirs and mine else None}


# ------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str, load_before: Optional[List[float]]) -> Dict:
    """What the numbers depend on; load averages before and after the sweep
    show whether other processes competed for the cores."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "relkd": relkd.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(), "device": device, "git_commit": git_commit(),
        "fused_devices": relkd.ops.fused_devices(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "relkd_tensor_cores": os.environ.get("RELKD_TENSOR_CORES", "0"),
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def bf16_mm_tflops(device: str) -> float:
    """The machine's bfloat16 torch.mm rate: the median of 5 square
    products (8192 on a GPU, 1024 on a CPU), in TFLOP/s. The floor_tflops of
    every record are reported against it (fraction_of_bf16_mm)."""
    n = 8192 if device.startswith("cuda") else 1024
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(torch.bfloat16).to(device) for _ in range(2))
    times = time_runs(lambda: torch.mm(a, b), repeats=5, warmups=2, device=device)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def add_rate_fractions(records: List[Dict], rate: Optional[float]) -> None:
    for r in records:
        r["fraction_of_bf16_mm"] = (r["floor_tflops"] / rate
                                    if rate and r.get("floor_tflops") else None)


# ------------------------------------------------------------------ tables
def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def format_bytes(size: Optional[float]) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def format_ratio(ratio: Optional[float], suffix: str = "x") -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3g}{suffix}"


def format_percent(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{100 * ratio:.3g}%"


def describe_backend(backend: str, chunk: Optional[int] = None) -> str:
    names = {"reference": "reference (eager)", "compiled": "reference + torch.compile",
             "chunked": "chunked torch", "gemm": "bare GEMM", "faiss": "FAISS IndexFlatIP"}
    name = names.get(backend, backend)
    return f"{name} (chunk {chunk})" if chunk else name


def time_cell(record: Dict) -> str:
    if record["error"]:
        return "error: " + record["error"].splitlines()[0][:80].replace("|", "/")
    return format_time(record["median_s"])


def memory_cell(record: Dict) -> str:
    if record["memory_error"]:
        return "error: " + record["memory_error"].splitlines()[0][:60].replace("|", "/")
    return format_bytes(record["peak_extra_bytes"])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   text_columns: int) -> str:
    """A Markdown table; the columns after the first `text_columns` (the
    numbers) are right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rate_cell(record: Dict) -> str:
    """The floor's FLOPs over this time, and that against the bf16 mm rate."""
    tflops = record.get("floor_tflops")
    if tflops is None:
        return ""
    fraction = record.get("fraction_of_bf16_mm")
    return f"{tflops:.3g}" + (f" ({format_percent(fraction)})" if fraction else "")


def loss_table(records: List[Dict]) -> str:
    contention = any(r["median_contended_s"] for r in records)
    headers = ["loss", "N x D", "pass", "backend", "median", "peak extra memory",
               "speedup vs eager", "memory vs eager", "x GEMM floor",
               "floor TFLOP/s (of bf16 mm)"]
    headers += ["slowdown, one busy process"] if contention else []
    rows = [[r["op"], f"{r['N']} x {r['D']}", r["pass"],
             describe_backend(r["backend"], r["chunk"]),
             time_cell(r), memory_cell(r), format_ratio(r["ratio_vs_eager"]),
             format_percent(r["memory_ratio_vs_eager"]),
             "" if r["backend"] == "gemm" else format_ratio(r["time_over_gemm_floor"]),
             rate_cell(r)]
            + ([format_ratio(r["slowdown_under_contention"])] if contention else [])
            for r in records if r["kind"] == "loss"]
    return markdown_table(headers, rows, text_columns=4)


def topk_table(records: List[Dict]) -> str:
    headers = ["N x M, D, k", "backend", "best", "median", "peak extra memory",
               "speedup vs best chunked", "speedup vs FAISS", "x bare-GEMM floor",
               "floor TFLOP/s (of bf16 mm)"]
    rows = [[f"{r['N']} x {r['M']}, {r['D']}, {r['k']}",
             describe_backend(r["backend"], r["chunk"]),
             "*" if r["best_of_backend"] and r["backend"] in ("chunked", "gemm") else "",
             time_cell(r), memory_cell(r), format_ratio(r["ratio_vs_chunked"]),
             format_ratio(r.get("ratio_vs_faiss")), format_ratio(r["time_over_gemm_floor"]),
             rate_cell(r)]
            for r in records if r["kind"] == "topk"]
    return markdown_table(headers, rows, text_columns=3)


def ida_table(records: List[Dict]) -> str:
    headers = ["pairs x M, D, k", "backend", "pairs run", "median", "all pairs",
               "peak extra memory", "speedup vs reference"]
    rows = []
    for r in records:
        if r["kind"] != "ida":
            continue
        name = "fused" if r["backend"] == "fused" else "reference in chunks"
        all_pairs = format_time(r["time_all_pairs_s"]) if not r["error"] else "-"
        rows.append([f"{r['N']} x {r['M']}, {r['D']}, {r['k']}",
                     f"{name} ({r['chunk']} pairs per chunk)", str(r["pairs_run"]),
                     time_cell(r), all_pairs + (" (extrapolated)" if r["extrapolated"] else ""),
                     memory_cell(r), format_ratio(r["ratio_vs_reference"])])
    return markdown_table(headers, rows, text_columns=2)


def report(machine: Dict, records: List[Dict]) -> str:
    threads = f"{machine['torch_threads']} threads"
    where = machine.get("gpu") or f"{machine['cpu']} ({threads})"
    parts = [f"relkd {machine['relkd']} benchmark: {where}, torch {machine['torch']}, "
             f"{machine['date']}, load average {machine['load_average_before']} before, "
             f"{machine['load_average_after']} after. Median of repeats; peak extra memory "
             f"of one pass. Floor TFLOP/s: the GEMM floor's FLOPs over the time, against "
             f"the measured bf16 torch.mm rate ({machine.get('bf16_mm_tflops') or 0:.3g} "
             f"TFLOP/s)."]
    if any(r["kind"] == "loss" for r in records):
        dtypes = ", ".join(sorted({r["dtype"] for r in records if r["kind"] == "loss"}))
        parts += ["", f"Losses ({dtypes}):", "", loss_table(records)]
    if any(r["kind"] == "topk" for r in records):
        dtypes = ", ".join(sorted({r["dtype"] for r in records if r["kind"] == "topk"}))
        parts += ["", f"similarity_topk (exact cosine k-NN, {dtypes}; "
                      f"* = fastest chunk size):", "", topk_table(records)]
    if any(r["kind"] == "ida" for r in records):
        dtypes = ", ".join(sorted({r["dtype"] for r in records if r["kind"] == "ida"}))
        parts += ["", f"ida_scores (IDA score alignment, mode shift, {dtypes}):", "",
                  ida_table(records)]
    return "\n".join(parts)


# --------------------------------------------------------------------- CLI
def int_list(text: str) -> List[int]:
    return [int(part) for part in text.split(",") if part]


def name_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return names
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sweep, under a minute on 2 cores")
    parser.add_argument("--only", choices=("all", "losses", "topk", "ida"), default="all")
    parser.add_argument("--sizes", type=int_list,
                        help="loss batch sizes N (default 4096,8192,32768; quick 1024)")
    parser.add_argument("--dim", type=int,
                        help=f"embedding dim D (default {FULL_DIM}, quick {QUICK_DIM})")
    parser.add_argument("--losses", type=name_list(LOSS_NAMES + EXTRA_LOSS_NAMES),
                        default=list(LOSS_NAMES),
                        help=f"comma-separated subset of {','.join(LOSS_NAMES)} (the default), "
                             f"or {','.join(EXTRA_LOSS_NAMES)} (RKD with its O(N^3 D) angle "
                             "term, the default weights)")
    parser.add_argument("--backends", type=name_list(cases.BACKENDS), default=list(cases.BACKENDS),
                        help=f"comma-separated subset of {','.join(cases.BACKENDS)} (each size "
                             f"runs those of its plan)")
    parser.add_argument("--passes", type=name_list(cases.PASSES + cases.EXTRA_PASSES),
                        default=list(cases.PASSES),
                        help="fwd+bwd, fwd or both (similarity_topk has fwd only); hvp: "
                             "a Hessian-vector product (double backward) of each loss")
    parser.add_argument("--repeats", type=int, help="timed repeats (default: per size)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile'd reference (default: on, off in --quick)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory children")
    parser.add_argument("--contention", action="store_true",
                        help="time every case alternately alone and beside one busy process "
                             "(stopped and resumed between calls) and report the slowdown")
    parser.add_argument("--interleave", action="store_true",
                        help="time the cases of each shape in turn, one call each per round "
                             "(the machine's drift then affects every backend alike)")
    parser.add_argument("--topk-shape", type=int_list,
                        help="similarity_topk N,M (default 4096,262144; quick 1024,16384)")
    parser.add_argument("--topk-k", type=int, default=TOPK_K)
    parser.add_argument("--chunks", type=int_list, default=list(CHUNK_SIZES),
                        help="chunk sizes of the chunked-torch and GEMM baselines")
    parser.add_argument("--ida-shape", type=int_list,
                        help="ida_scores pairs,M (default 100000,1000000; quick 1000,20000)")
    parser.add_argument("--ida-k", type=int, default=IDA_K)
    parser.add_argument("--ida-chunk", type=int, default=IDA_REFERENCE_CHUNK,
                        help="pairs per chunk of the IDA reference")
    parser.add_argument("--ida-subset", type=int,
                        help=f"pairs the IDA reference runs, its time then extrapolated to all "
                             f"(default {IDA_REFERENCE_SUBSET}; quick: all)")
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision for the run (float32 torch.mm "
                             "in every backend; with RELKD_TENSOR_CORES=auto, 'medium' runs "
                             "relkd's bf16 tensor-core kernels, 'high' its TF32 ones, 'highest' "
                             "3xTF32); recorded "
                             "in the JSON's machine")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--case", help="measure one case's peak memory in this process (JSON)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_LOSS_SIZES if args.quick else FULL_LOSS_SIZES)
    args.dim = args.dim or (QUICK_DIM if args.quick else FULL_DIM)
    args.topk_shape = tuple(args.topk_shape
                            or (QUICK_TOPK_SHAPE if args.quick else FULL_TOPK_SHAPE))
    if len(args.topk_shape) != 2:
        parser.error("--topk-shape takes N,M")
    args.ida_shape = tuple(args.ida_shape or (QUICK_IDA_SHAPE if args.quick else FULL_IDA_SHAPE))
    if len(args.ida_shape) != 2:
        parser.error("--ida-shape takes pairs,M")
    if args.ida_subset is None:
        args.ida_subset = args.ida_shape[0] if args.quick else IDA_REFERENCE_SUBSET
    if args.compile is None:
        args.compile = not args.quick
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(cases.probe_peak_memory(Case(**json.loads(args.case)))))
        return 0
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    sweep = build_sweep(args)
    if not sweep:
        log("nothing selected")
        return 1
    load_before = load_average()
    if load_before and load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]} before the sweep; other processes "
            f"may distort the timings")
    started = time.perf_counter()
    if args.interleave and args.contention:
        log("--interleave and --contention cannot be combined")
        return 2
    run_sweep(sweep, args.memory, args.contention, args.interleave)
    log(f"done in {time.perf_counter() - started:.1f} s")
    machine = machine_info(args.device, load_before)
    machine["bf16_mm_tflops"] = bf16_mm_tflops(args.device)
    records = to_records(sweep)
    add_rate_fractions(records, machine["bf16_mm_tflops"])
    print(report(machine, records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items() if k != "case"}
        args.json.write_text(json.dumps({"machine": machine, "config": config,
                                         "records": records}, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
