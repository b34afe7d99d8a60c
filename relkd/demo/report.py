"""The demo's evaluation and outputs: verification rows, the table, the JSON
and the ROC plot.

A row is one way of scoring one network's embeddings of the held-out faces:
{"name", "network", "seed", "scoring", "metrics", "seconds"}. Two scorings
exist: "cosine" (`evaluate`) and IDA-aligned cosine (`evaluate_ida`, SPEC
§10, against the same network's embeddings of the training faces); the
table, the JSON and the plot take the rows as they come."""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence

from torch import Tensor

from ..ida import IDAScorer
from ..metrics import DEFAULT_FPRS, pair_scores, verification_metrics, verification_pairs

__all__ = ["VerificationProtocol", "gap_closed", "summarise", "format_table", "write_json",
           "plot_roc", "GAP_FPR", "TEACHER", "BASELINE"]

GAP_FPR = 1e-3                 # the FPR of the "share of the gap closed" column
TEACHER = "teacher"
BASELINE = "CosFace (no KD)"   # the student without distillation


class VerificationProtocol:
    """Open-set verification on the held-out identities: all genuine pairs
    and all (or max_impostors sampled) impostor pairs, fixed once so every
    network is scored on the same pairs."""

    def __init__(self, labels: Tensor, max_impostors: Optional[int], fprs=DEFAULT_FPRS,
                 curve_points: int = 200):
        self.a, self.b, self.genuine = verification_pairs(labels, max_impostors)
        self.fprs, self.curve_points = tuple(fprs), curve_points

    def evaluate(self, embeddings: Tensor,
                 score_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> dict:
        """Metrics of one set of embeddings: TPR at each FPR, AUC, ROC points.
        score_fn(x, y) -> (n,) replaces cosine similarity (see pair_scores)."""
        scores = pair_scores(embeddings, self.a, self.b, score_fn)
        return self._metrics(scores)

    def evaluate_ida(self, embeddings: Tensor, scorer: IDAScorer) -> dict:
        """Metrics of IDA-aligned scores: each pair's cosine aligned by both
        faces' support-set statistics in scorer's gallery (SPEC §10). Each
        face's statistics are computed once, not once per pair."""
        mu, sigma = scorer.statistics(embeddings)
        a, b = self.a.to(mu.device), self.b.to(mu.device)
        cosine = pair_scores(embeddings, self.a, self.b).to(mu)
        aligned = scorer.align(cosine, (mu[a], sigma[a]), (mu[b], sigma[b])).float().cpu()
        return self._metrics(aligned)

    def _metrics(self, scores: Tensor) -> dict:
        """verification_metrics, or, for a network whose scores hold NaN (it
        diverged; the metrics refuse those), NaN metrics and their count, so
        that one run does not end a sweep of others."""
        bad = int(scores.isnan().sum())
        if not bad:
            return verification_metrics(scores, self.genuine, self.fprs, self.curve_points)
        n_gen = int(self.genuine.sum())
        out = {"tpr": {f: math.nan for f in self.fprs}, "auc": math.nan, "genuine_pairs": n_gen,
               "impostor_pairs": len(self.genuine) - n_gen, "nan_scores": bad}
        if self.curve_points:
            out["roc"] = {"fpr": [math.nan] * self.curve_points,
                          "tpr": [math.nan] * self.curve_points}
        return out

    def describe(self) -> str:
        n_gen = int(self.genuine.sum())
        return f"{n_gen:,} genuine and {len(self.genuine) - n_gen:,} impostor pairs"


# --------------------------------------------------------------- aggregation
def gap_closed(tpr: float, baseline: float, teacher: float) -> Optional[float]:
    """(tpr - baseline) / (teacher - baseline); None when the teacher is no
    better than the baseline (nothing to close)."""
    gap = teacher - baseline
    return None if gap <= 1e-12 else (tpr - baseline) / gap


def summarise(rows: List[dict], fprs: Sequence[float]) -> List[dict]:
    """One summary per (name, scoring), in first-seen order: mean and
    population std over seeds of every TPR, the AUC, and the share of the
    teacher-student gap at GAP_FPR closed (KD runs, per seed against the
    baseline of the same seed and scoring, then averaged)."""
    teacher = {r["scoring"]: r for r in rows if r["network"] == TEACHER}
    baseline = {(r["scoring"], r["seed"]): r for r in rows if r["name"] == BASELINE}
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["scoring"]), []).append(r)
    out = []
    for (name, scoring), members in groups.items():
        summary = {"name": name, "scoring": scoring, "network": members[0]["network"],
                   "seeds": [m["seed"] for m in members],
                   "seconds": _mean_std([m["seconds"] for m in members])}
        for f in fprs:
            summary[f"tpr@{f:g}"] = _mean_std([m["metrics"]["tpr"][f] for m in members])
        summary["auc"] = _mean_std([m["metrics"]["auc"] for m in members])
        gaps = []
        for m in members:
            base = baseline.get((scoring, m["seed"]))
            t = teacher.get(scoring)
            if m["network"] == "student" and name != BASELINE and base and t:
                gaps.append(gap_closed(m["metrics"]["tpr"][GAP_FPR],
                                        base["metrics"]["tpr"][GAP_FPR],
                                        t["metrics"]["tpr"][GAP_FPR]))
        summary["gap_closed"] = _mean_std(gaps) if gaps and None not in gaps else None
        out.append(summary)
    return out


def _mean_std(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "values": list(values)}


# ---------------------------------------------------------------------- table
def _cell(stat: Optional[dict], fmt: str, with_std: bool) -> str:
    if stat is None:
        return "-"
    text = format(stat["mean"], fmt)
    return f"{text} ± {format(stat['std'], fmt)}" if with_std else text


def format_table(summaries: List[dict], fprs: Sequence[float]) -> str:
    """One line per run and scoring (grouped by scoring): TPR at each FPR,
    AUC, share of the gap closed at GAP_FPR, training seconds; mean ± std
    when there are several seeds."""
    with_std = any(len(s["seeds"]) > 1 for s in summaries)
    several_scorings = len({s["scoring"] for s in summaries}) > 1
    header = ["run"] + [f"TPR@{f:g}" for f in fprs] + ["AUC", f"gap@{GAP_FPR:g}", "train s"]
    scorings = list(dict.fromkeys(s["scoring"] for s in summaries))
    summaries = sorted(summaries, key=lambda s: scorings.index(s["scoring"]))  # one block each
    lines = []
    for s in summaries:
        name = f"{s['name']} [{s['scoring']}]" if several_scorings else s["name"]
        gap = s["gap_closed"]
        gap_text = "-" if gap is None else (
            f"{100 * gap['mean']:.0f}%" + (f" ± {100 * gap['std']:.0f}" if with_std else ""))
        lines.append([name] + [_cell(s[f"tpr@{f:g}"], ".4f", with_std) for f in fprs]
                     + [_cell(s["auc"], ".4f", with_std), gap_text,
                        _cell(s["seconds"], ".0f", False)])
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt_row(header))
    return "\n".join([fmt_row(header), rule] + [fmt_row(r) for r in lines])


# ----------------------------------------------------------------- JSON, plot
def _jsonable(value):
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
        f.write("\n")


def plot_roc(path: str, rows: List[dict], title: str, fprs: Sequence[float]) -> None:
    """ROC curves of the first seed of every run, log-scale FPR, one panel
    per scoring; the teacher dashed. Needs matplotlib (installed by `make demo`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the ROC plot needs matplotlib: pip install 'relkd[demo]' "
                          "(make demo installs it)") from None
    first_seed = min(r["seed"] for r in rows)
    shown = [r for r in rows if r["network"] == TEACHER or r["seed"] == first_seed]
    scorings = list(dict.fromkeys(r["scoring"] for r in shown))
    fig, axes = plt.subplots(1, len(scorings), figsize=(8 * len(scorings), 6), dpi=110,
                             squeeze=False)
    for ax, scoring in zip(axes[0], scorings):
        _roc_panel(ax, plt, [r for r in shown if r["scoring"] == scoring], fprs)
        ax.set_title(title if len(scorings) == 1 else f"{title}\nscores: {scoring}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _roc_panel(ax, plt, rows: List[dict], fprs: Sequence[float]) -> None:
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7 is grey
    students = 0
    for r in rows:
        roc = r["metrics"]["roc"]
        label = f"{r['name']} ({r['metrics']['tpr'][GAP_FPR]:.3f})"
        if r["network"] == TEACHER:
            style = dict(color="black", linestyle="--", linewidth=2)
        elif r["name"] == BASELINE:
            style = dict(color="0.5", linewidth=2)
        else:
            style = dict(color=palette[students % len(palette)], linewidth=1.3)
            students += 1
        ax.plot(roc["fpr"], roc["tpr"], label=label, **style)
    for f in fprs:
        ax.axvline(f, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xscale("log")
    # Below 1e-5 a curve rests on a handful of impostor pairs: noise.
    ax.set_xlim(max(1e-5, min(rows[0]["metrics"]["roc"]["fpr"])), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false positive rate (impostor pairs accepted)")
    ax.set_ylabel("true positive rate (genuine pairs accepted)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title=f"run (TPR@{GAP_FPR:g})", title_fontsize=8)
