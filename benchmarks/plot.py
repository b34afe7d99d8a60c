"""Time vs N, log-log, of every loss in one or more bench.py JSON files: one
panel per loss, a line per backend (fused, eager reference, reference under
torch.compile, GEMM floor) and a line style per dtype and D. A case that failed
(the eager reference out of memory, typically) is drawn as an x on the
panel's top edge at its N.

Usage (from the repository root):
  python3 benchmarks/plot.py benchmarks/results/<run>/bench.json --out docs/gpu-losses.png
  python3 benchmarks/plot.py a.json b.json --pass fwd --out fwd.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

BACKENDS = {  # backend -> (label, colour)
    "fused": ("relkd fused", "tab:blue"),
    "reference": ("eager reference", "tab:orange"),
    "compiled": ("reference + torch.compile", "tab:green"),
    "gemm": ("GEMM floor (torch.mm)", "black"),
}
STYLES = ["-", "--", ":", "-."]  # one per (dtype, D)


def load_records(paths: Sequence[Path], pass_: str) -> List[Dict]:
    records = []
    for path in paths:
        for r in json.loads(path.read_text())["records"]:
            if r["kind"] == "loss" and r["pass"] == pass_ and r["backend"] in BACKENDS:
                records.append(r)
    return records


def series(records: List[Dict]) -> Dict[tuple, Dict[int, Optional[float]]]:
    """(op, backend, variant: dtype and D) -> {N: median seconds, None where
    it failed}; the fastest record where several files hold a point."""
    out: Dict[tuple, Dict[int, Optional[float]]] = defaultdict(dict)
    for r in records:
        points = out[(r["op"], r["backend"], f"{r['dtype']}, D={r['D']}")]
        time = r["median_s"] if not r["error"] else None
        known = points.get(r["N"])
        points[r["N"]] = time if known is None else min(known, time) if time else known
    return out


def plot(records: List[Dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(records)
    ops = sorted({op for op, _, _ in data})
    variants = sorted({variant for _, _, variant in data})
    cols = min(3, len(ops))
    rows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for (series_op, backend, variant), points in sorted(data.items()):
            if series_op != op:
                continue
            label, colour = BACKENDS[backend]
            style = STYLES[variants.index(variant) % len(STYLES)]
            ran = sorted((n, t) for n, t in points.items() if t is not None)
            if ran:
                ax.plot([n for n, _ in ran], [t for _, t in ran], style, color=colour,
                        marker="o", markersize=3,
                        label=f"{label}, {variant}" if len(variants) > 1 else label)
            failed = [n for n, t in points.items() if t is None]
            if failed:  # drawn against the axes' top edge, whatever the scale
                ax.plot(failed, [1.0] * len(failed), "x", color=colour, markersize=8,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("N (batch rows)")
        ax.set_ylabel("median time (s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    legend: Dict[str, object] = {}  # every series once, whichever panels hold it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = sorted(legend), [legend[label] for label in sorted(legend)]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               frameon=False)
    fig.suptitle(title + " (x on the top edge: the case failed, e.g. out of memory)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 4), 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="bench.py --json outputs")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--pass", dest="pass_", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    parser.add_argument("--title", default=None)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    records = load_records(args.json, args.pass_)
    if not records:
        print(f"plot.py: no loss records with pass {args.pass_} in {args.json}", file=sys.stderr)
        return 1
    machine = json.loads(args.json[0].read_text())["machine"]
    where = machine.get("gpu") or machine.get("cpu") or machine.get("device")
    dims = ", ".join(f"D={d}" for d in sorted({r["D"] for r in records}))
    title = args.title or f"relkd losses, {args.pass_}, {dims}: {where}"
    plot(records, args.out, title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
