"""`python -m relkd.demo`: distil a small face-recognition student from a
ResNet teacher with each relkd loss and compare their TPR at low FPR on
held-out identities. See README ("Demo") and `--help`."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch

import relkd

from .models import ResNetTeacher, StudentCNN, count_macs
from .report import (BASELINE, GAP_FPR, TEACHER, VerificationProtocol, format_table, gap_closed,
                     plot_roc, summarise, write_json)
from .training import (DEFAULT, QUICK, RUNS, DemoData, Run, embed, load_or_train_teacher,
                       train_student)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m relkd.demo",
        description="Distil a small face-recognition student from a ResNet teacher with each "
                    "relkd loss; compare TPR at low FPR on held-out identities.")
    p.add_argument("--quick", action="store_true",
                   help="a tiny configuration (under a minute on 2 CPU cores): a smoke test")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat the students over this many seeds and report mean ± std")
    p.add_argument("--data", metavar="DIR",
                   help="an ImageFolder of aligned face crops (one folder per identity) "
                        "instead of the synthetic faces; held-out identities split by identity")
    p.add_argument("--cache", metavar="DIR",
                   default=os.path.join(os.path.expanduser("~"), ".cache", "relkd"),
                   help="where the trained teacher is kept (default: ~/.cache/relkd)")
    p.add_argument("--out", metavar="DIR", default="demo-output",
                   help="where results.json and roc.png go (default: demo-output)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (float16 autocast) or cpu; default: cuda if available")
    p.add_argument("--runs", metavar="NAMES",
                   help="comma-separated subset of the runs (the no-KD baseline always runs): "
                        + ", ".join(r.name for r in RUNS[1:]))
    p.add_argument("--weight", action="append", default=[], metavar="NAME=W[:INNER]",
                   help="override a run's KD weight (and its inner weight: RAD's beta in "
                        "CoupleFace, lam in EC-KD), e.g. --weight EKD=7; repeatable")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on 300 validation identities (synthetic faces only) instead "
                        "of the test identities: for choosing weights")
    p.add_argument("--ida", choices=["shift", "asnorm", "none"], default="shift",
                   help="also score every network with IDA-aligned cosines (relkd.IDAScorer, "
                        "SPEC §10; support set: the network's own embeddings of the training "
                        "faces) in this mode; none: cosine only (default: shift)")
    p.add_argument("--ida-k", type=int, default=50, metavar="K",
                   help="IDA support-set size (default: 50)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected an int >= 1, got {args.seeds}")
    if args.ida_k < 1:
        p.error(f"--ida-k: expected an int >= 1, got {args.ida_k}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected an int >= 1, got {args.threads}")
    if args.data is not None and not os.path.isdir(args.data):
        p.error(f"--data: not a directory: {args.data!r}")
    if args.data is not None and args.validation:
        p.error("--validation: only for the synthetic faces, not with --data")
    try:
        args.runs = select_runs(args.runs, args.weight)
    except ValueError as e:
        p.error(str(e))
    return args


def _find(name: str, what: str) -> Run:
    known = {r.name.lower(): r for r in RUNS[1:]}
    if name.strip().lower() not in known:
        raise ValueError(f"{what}: unknown run {name.strip()!r}; known: "
                         f"{', '.join(r.name for r in RUNS[1:])}")
    return known[name.strip().lower()]


def select_runs(names: Optional[str], weights: Sequence[str] = ()) -> List[Run]:
    """The baseline and the named runs (default: all), with --weight overrides."""
    chosen = RUNS[1:] if names is None else [
        _find(n, "--runs") for n in names.split(",") if n.strip()]
    overrides = {}
    for item in weights:
        name, _, value = item.partition("=")
        run = _find(name, "--weight")
        weight, _, inner = value.partition(":")
        try:
            w, i = float(weight), float(inner) if inner else run.inner
        except ValueError:
            raise ValueError(f"--weight: expected NAME=W or NAME=W:INNER with numbers, "
                             f"got {item!r}") from None
        if not all(math.isfinite(v) for v in (w, 0.0 if i is None else i)):
            raise ValueError(f"--weight: expected finite numbers, got {item!r}")
        if inner and run.inner is None:
            raise ValueError(f"--weight: {run.name} has one term, so no inner weight: got "
                             f"{item!r}")
        overrides[run.name] = dataclasses.replace(run, weight=w, inner=i)
    return [RUNS[0]] + [overrides.get(r.name, r) for r in RUNS[1:] if r in chosen]


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__, "relkd": relkd.__version__,
            "python": platform.python_version(), "load_average": _load()}


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _row(name: str, network: str, seed: int, metrics: dict, seconds: float,
         scoring: str = "cosine") -> dict:
    return {"name": name, "network": network, "seed": seed, "scoring": scoring,
            "metrics": metrics, "seconds": seconds}


def _evaluate(protocol: VerificationProtocol, args, net, data: DemoData, device,
              name: str, network: str, seed: int, seconds: float,
              train_embeddings: Optional[torch.Tensor] = None) -> List[dict]:
    """The net's rows: cosine scores, plus IDA-aligned ones (--ida) whose
    support set is the net's own embeddings of the training faces: identities
    disjoint from the held-out ones, so no support labels are needed."""
    test = embed(net, data.test_images, device)
    rows = [_row(name, network, seed, protocol.evaluate(test), seconds)]
    if args.ida != "none":
        support = embed(net, data.train_images, device) if train_embeddings is None \
            else train_embeddings
        scorer = relkd.IDAScorer(support, k=min(args.ida_k, support.shape[0]), mode=args.ida)
        rows.append(_row(name, network, seed, protocol.evaluate_ida(test, scorer), seconds,
                         scoring=ida_scoring(args)))
    return rows


def ida_scoring(args) -> str:
    return f"IDA-{args.ida} k={args.ida_k}"


def _tprs(rows: List[dict]) -> str:
    """TPR@GAP_FPR of one net's rows: '0.8122' or '0.8122 (IDA-shift k=50: 0.8230)'."""
    text = f"{rows[0]['metrics']['tpr'][GAP_FPR]:.4f}"
    extra = ", ".join(f"{r['scoring']}: {r['metrics']['tpr'][GAP_FPR]:.4f}" for r in rows[1:])
    return f"{text} ({extra})" if extra else text


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = QUICK if args.quick else DEFAULT
    runs = args.runs
    show = not args.no_progress
    started = time.time()
    info = machine()
    print(f"relkd demo{' (--quick)' if args.quick else ''}: {device}, {info['cpu']}, "
          f"{info['torch_threads']} threads, load average {info['load_average']}", flush=True)

    data = DemoData(config, args.data, args.validation)
    protocol = VerificationProtocol(data.test_labels, config.max_impostors)
    data_seconds = time.time() - started
    print(f"data: {data.description}; verification: {protocol.describe()} "
          f"({data_seconds:.0f} s)", flush=True)

    start = time.time()
    teacher, teacher_path, cached = load_or_train_teacher(config, data, device, args.cache, show)
    teacher_seconds = time.time() - start
    teacher_train_emb = embed(teacher, data.train_images, device)
    rows = _evaluate(protocol, args, teacher, data, device, TEACHER, TEACHER, 0,
                     teacher_seconds, teacher_train_emb)
    teacher_metrics = rows[0]["metrics"]
    print(f"teacher: {'loaded from' if cached else 'trained and saved to'} {teacher_path} "
          f"({teacher_seconds:.0f} s); TPR@{GAP_FPR:g} {_tprs(rows)}, "
          f"AUC {teacher_metrics['auc']:.4f}", flush=True)

    for seed in range(args.seeds):
        baseline_tpr = None
        for run in runs:
            start = time.time()
            student = train_student(run, seed, config, data, teacher_train_emb, device, show)
            seconds = time.time() - start
            new = _evaluate(protocol, args, student, data, device, run.name, "student", seed,
                            seconds)
            rows += new
            metrics = new[0]["metrics"]
            tpr = metrics["tpr"][GAP_FPR]
            if run.name == BASELINE:
                baseline_tpr, gap = tpr, ""
            else:
                closed = gap_closed(tpr, baseline_tpr, teacher_metrics["tpr"][GAP_FPR])
                gap = (" (no gap to the teacher to close)" if closed is None
                       else f" ({100 * closed:.0f}% of the gap to the teacher)")
            print(f"{run.name} (seed {seed}): TPR@{GAP_FPR:g} {_tprs(new)}{gap}, "
                  f"AUC {metrics['auc']:.4f}, {seconds:.0f} s", flush=True)

    summaries = summarise(rows, protocol.fprs)
    teacher_macs = count_macs(ResNetTeacher(config.embedding_dim), (1, 32, 32))
    student_macs = count_macs(StudentCNN(config.embedding_dim), (1, 32, 32))
    total = time.time() - started
    print()
    print(f"Students: {student_macs / 1e6:.2f} M multiply-adds per 32x32 face, "
          f"teacher {teacher_macs / 1e6:.1f} M ({teacher_macs / student_macs:.0f}x); "
          f"{config.student_steps} steps of {config.identities_per_batch} identities x "
          f"{config.images_per_batch_identity} images; seeds {args.seeds}.")
    print(f"{'Validation' if args.validation else 'Held-out'} identities: "
          f"{protocol.describe()}; gap@{GAP_FPR:g} = "
          f"(TPR_kd - TPR_noKD) / (TPR_teacher - TPR_noKD).")
    print("KD weights: " + "; ".join(r.describe() for r in runs[1:]))
    print(format_table(summaries, protocol.fprs))
    print(f"total {total:.0f} s (teacher {'cached' if cached else 'trained'}: "
          f"{teacher_seconds:.0f} s); load average at the end {_load()}")

    payload = {
        "command": "python -m relkd.demo " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": dataclasses.asdict(config), "data": data.description,
        "verification": {"pairs": protocol.describe(), "fprs": list(protocol.fprs),
                         "gap_fpr": GAP_FPR,
                         "ida": None if args.ida == "none" else {
                             "mode": args.ida, "k": args.ida_k,
                             "support": "the network's embeddings of the training faces"}},
        "machine": info, "device": str(device), "seeds": args.seeds,
        "teacher": {"path": teacher_path, "cached": cached, "macs": teacher_macs},
        "student_macs": student_macs,
        "runs": [{"name": r.name, "note": r.note, "weight": r.weight, "inner_weight": r.inner}
                 for r in runs],
        "seconds": {"total": total, "data": data_seconds, "teacher": teacher_seconds},
        "load_average_end": _load(), "summary": summaries, "rows": rows,
    }
    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, "roc.png")
    write_json(json_path, payload)
    which = "validation" if args.validation else "held-out"
    plot_roc(png_path, rows, f"relkd demo: {len(data.test_labels.unique())} {which} identities, "
             f"{protocol.describe()}", protocol.fprs)
    print(f"wrote {json_path} and {png_path}")
    return payload
