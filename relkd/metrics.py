"""Open-set face verification metrics in plain PyTorch.

The pieces are separate so that another scoring rule (for instance
support-set score alignment) reuses the same pairs and the same metrics:

    a, b, genuine = verification_pairs(labels)
    scores = pair_scores(emb, a, b)                      # cosine similarity
    scores = pair_scores(emb, a, b, score_fn=my_scores)  # any (x, y) -> (n,) rule
    numbers = verification_metrics(scores, genuine)      # TPR@FPR, AUC

TPR at FPR f uses the threshold that accepts at most floor(f * impostors)
impostor pairs: the (floor(f * impostors) + 1)-th highest impostor score; a
pair is accepted when its score is strictly above it.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validation as check
from ._common import normalize

__all__ = ["verification_pairs", "pair_scores", "cosine_scores", "tpr_at_fpr", "roc_auc",
           "roc_curve", "verification_metrics", "DEFAULT_FPRS"]

DEFAULT_FPRS = (1e-2, 1e-3, 1e-4)


def verification_pairs(labels: Tensor, max_impostors: Optional[int] = None,
                       seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Every genuine pair (i < j, same label) and every impostor pair, or a
    uniform sample of max_impostors distinct impostor pairs (fixed by seed).
    Returns int64 index tensors a, b (genuine pairs first) and the bool
    tensor genuine. Memory is O(pairs returned) when max_impostors is given."""
    labels = check.tensor(labels, "labels", "(n,)")
    labels = check.labels(labels, "labels", len(labels) if labels.dim() else 0).cpu()
    if max_impostors is not None:
        check.positive_int(max_impostors, "max_impostors")
    n = labels.shape[0]
    gi, gj = _genuine_pairs(labels)
    total_impostors = n * (n - 1) // 2 - gi.numel()
    if max_impostors is None or total_impostors <= max_impostors:
        i, j = torch.triu_indices(n, n, offset=1)
        impostor = labels[i] != labels[j]
        ii, ij = i[impostor], j[impostor]
    else:
        ii, ij = _sample_impostors(labels, max_impostors, torch.Generator().manual_seed(seed))
    a, b = torch.cat([gi, ii]), torch.cat([gj, ij])
    genuine = torch.zeros(a.numel(), dtype=torch.bool)
    genuine[:gi.numel()] = True
    return a, b, genuine


def _genuine_pairs(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """All (i, j), i < j, with labels[i] == labels[j], identity by identity."""
    order = labels.argsort(stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    firsts, seconds, start = [], [], 0
    for count in counts.tolist():
        members = order[start:start + count].sort().values
        p, q = torch.triu_indices(count, count, offset=1)
        firsts.append(members[p])
        seconds.append(members[q])
        start += count
    empty = torch.empty(0, dtype=torch.int64)
    return torch.cat(firsts) if firsts else empty, torch.cat(seconds) if seconds else empty


def _sample_impostors(labels: Tensor, m: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """m distinct uniformly drawn pairs i < j with different labels: draws
    batches of random pairs, keeps the new impostor ones, until m are found."""
    n = labels.shape[0]
    keys = torch.empty(0, dtype=torch.int64)
    while keys.numel() < m:
        i = torch.randint(0, n, (2 * m,), generator=gen)
        j = torch.randint(0, n, (2 * m,), generator=gen)
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)
        keep = labels[lo] != labels[hi]
        fresh = torch.unique(torch.cat([keys, lo[keep] * n + hi[keep]]))
        keys = fresh
    keys = keys[torch.randperm(keys.numel(), generator=gen)[:m]].sort().values
    return keys // n, keys % n


def cosine_scores(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity of the rows of x and y: (n,)."""
    return (normalize(x, torch.float32) * normalize(y, torch.float32)).sum(dim=1)


@torch.no_grad()
def pair_scores(embeddings: Tensor, a: Tensor, b: Tensor,
                score_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                chunk_size: int = 1 << 17) -> Tensor:
    """score_fn(embeddings[a], embeddings[b]) for every pair (default: cosine
    similarity), computed chunk_size pairs at a time so memory stays
    O(chunk_size * D) however many pairs there are. Returns float32 scores
    on the CPU."""
    embeddings = check.embeddings(embeddings, "embeddings")
    check.positive_int(chunk_size, "chunk_size")
    for name, idx in (("a", a), ("b", b)):
        idx = check.tensor(idx, name, "(n,)")
        if idx.dim() != 1 or idx.dtype not in (torch.int16, torch.int32, torch.int64):
            # (uint8 and bool index tensors are masks to torch)
            raise ValueError(f"{name}: expected integer row indices of shape (n,), got "
                             f"{idx.dtype} {tuple(idx.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"b: expected the shape of a, (n,) = {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    a, b = a.to(embeddings.device), b.to(embeddings.device)
    n = embeddings.shape[0]
    if score_fn is None:
        unit = normalize(embeddings, torch.float32)
        if n * n <= 1 << 26:  # the whole similarity matrix is cheaper than gathering rows
            return (unit @ unit.t())[a, b].cpu()
        score_fn = lambda x, y: (x * y).sum(dim=1)  # noqa: E731 (rows already unit)
        embeddings = unit
    out = [score_fn(embeddings[ca], embeddings[cb]).float().cpu()
           for ca, cb in zip(a.split(chunk_size), b.split(chunk_size))]
    return torch.cat(out) if out else torch.empty(0)


def _split(scores: Tensor, genuine: Tensor) -> Tuple[Tensor, Tensor]:
    """(genuine scores, impostor scores sorted ascending)."""
    scores = check.tensor(scores, "scores", "(n,)")
    genuine = check.tensor(genuine, "genuine", "(n,)")
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores: expected a floating tensor of shape (n,), got "
                         f"{scores.dtype} {tuple(scores.shape)}")
    if genuine.shape != scores.shape or genuine.dtype != torch.bool:
        raise ValueError(f"genuine: expected a bool tensor of the shape of scores "
                         f"{tuple(scores.shape)}, got {genuine.dtype} {tuple(genuine.shape)}")
    scores, genuine = scores.detach().cpu(), genuine.cpu()
    if bool(scores.isnan().any()):  # NaN sorts above every impostor: AUC 1.0, silently
        raise ValueError(f"scores: {int(scores.isnan().sum())} of {scores.numel()} are NaN "
                         "(a diverged model?); TPR and AUC are undefined for them")
    pos, neg = scores[genuine], scores[~genuine]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"genuine: expected both genuine and impostor pairs, got "
                         f"{pos.numel()} genuine and {neg.numel()} impostor")
    return pos, neg.sort().values


def _tprs(pos: Tensor, neg_sorted: Tensor, fprs: Sequence[float]) -> Dict[float, float]:
    m = neg_sorted.numel()
    out = {}
    for f in fprs:
        allowed = int(f * m + 1e-9)  # impostors that may lie above (1e-9: 0.29 * 100)
        threshold = float("-inf") if allowed >= m else neg_sorted[m - 1 - allowed]
        out[f] = float((pos > threshold).double().mean())
    return out


def _auc(pos: Tensor, neg_sorted: Tensor) -> float:
    below = torch.searchsorted(neg_sorted, pos, right=False).double()
    at_or_below = torch.searchsorted(neg_sorted, pos, right=True).double()
    return float(((below + at_or_below) / 2).mean() / neg_sorted.numel())


def tpr_at_fpr(scores: Tensor, genuine: Tensor,
               fprs: Sequence[float] = DEFAULT_FPRS) -> Dict[float, float]:
    """{fpr: TPR}: the share of genuine pairs scored strictly above the
    (floor(fpr * impostors) + 1)-th highest impostor score (-inf when that
    allows every impostor), so at most a share fpr of impostors is accepted."""
    fprs = check.fpr_values(fprs)
    return _tprs(*_split(scores, genuine), fprs)


def roc_auc(scores: Tensor, genuine: Tensor) -> float:
    """Area under the ROC curve = P(genuine score > impostor score), ties
    counted one half (the Mann-Whitney statistic)."""
    return _auc(*_split(scores, genuine))


def roc_curve(scores: Tensor, genuine: Tensor, points: int = 200,
              min_fpr: Optional[float] = None) -> Tuple[list, list]:
    """(fprs, tprs) at `points` FPRs spaced evenly on a log axis from
    min_fpr (default: one impostor in all) to 1, for plotting."""
    check.positive_int(points, "points")
    pos, neg_sorted = _split(scores, genuine)
    low = (1.0 / neg_sorted.numel() if min_fpr is None
           else check.number(min_fpr, "min_fpr", positive=True))
    if low > 1:
        raise ValueError(f"min_fpr: expected a false-positive rate in (0, 1], got {min_fpr!r}")
    fprs = _log_grid(low, points)
    tprs = _tprs(pos, neg_sorted, fprs)
    return fprs, [tprs[f] for f in fprs]


def verification_metrics(scores: Tensor, genuine: Tensor, fprs: Sequence[float] = DEFAULT_FPRS,
                         curve_points: int = 0) -> dict:
    """{"tpr": {fpr: TPR}, "auc": AUC, "genuine_pairs": n, "impostor_pairs": m}
    of one set of pair scores, plus "roc": {"fpr": [...], "tpr": [...]} (as
    roc_curve) when curve_points > 0. The impostor scores are sorted once."""
    fprs = check.fpr_values(fprs)
    check.non_negative_int(curve_points, "curve_points")
    pos, neg_sorted = _split(scores, genuine)
    out = {"tpr": _tprs(pos, neg_sorted, fprs), "auc": _auc(pos, neg_sorted),
           "genuine_pairs": pos.numel(), "impostor_pairs": neg_sorted.numel()}
    if curve_points:
        curve_fprs = _log_grid(1.0 / neg_sorted.numel(), curve_points)
        curve = _tprs(pos, neg_sorted, curve_fprs)
        out["roc"] = {"fpr": curve_fprs, "tpr": [curve[f] for f in curve_fprs]}
    return out


def _log_grid(low: float, points: int) -> list:
    return torch.logspace(math.log10(low), 0.0, points, dtype=torch.float64).tolist()
