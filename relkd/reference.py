"""Pure-PyTorch reference of every relkd loss: a literal transcription of
docs/SPEC.md, float64-capable, and the oracle every fused kernel is tested
against.

It materialises the full N x N (or N x M) relation matrices, so it is meant
for checking and for small batches; ``backend="reference"`` selects it.
Functions here take already-validated arguments (``relkd.functional``
validates user input) and return 0-dim tensors in the compute dtype.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import EPS, compute_dtype, masked_sum, normalize, teacher  # noqa: F401  (notation)

RKD_EPS = 1e-12  # clamp of squared distances in RKD (SPEC §6)


# --------------------------------------------------------------------- mining
def topk_rows(sim: Tensor, valid: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Per row, the k valid entries of `sim` in mining order (SPEC §2): larger
    first, NaN below every number, ties to the smaller column; slots without
    a valid candidate get (-inf, -1)."""
    n, m = sim.shape
    key = torch.where(torch.isnan(sim), torch.full_like(sim, -math.inf), sim)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    # Then valid before invalid, keeping the value order within each group.
    valid_sorted = valid.gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(valid_sorted, dim=1, descending=True, stable=True).indices)
    kept = min(k, m)
    idx = order[:, :kept]
    ok = valid.gather(1, idx)
    values = torch.where(ok, sim.gather(1, idx), torch.full_like(sim[:, :kept], -math.inf))
    indices = torch.where(ok, idx, torch.full_like(idx, -1))
    if kept < k:
        values = torch.cat([values, sim.new_full((n, k - kept), -math.inf)], dim=1)
        indices = torch.cat([indices, idx.new_full((n, k - kept), -1)], dim=1)
    return values, indices


def similarity_topk(
    a: Tensor,
    b: Optional[Tensor] = None,
    k: int = 1,
    a_labels: Optional[Tensor] = None,
    b_labels: Optional[Tensor] = None,
    exclude_self: bool = True,
) -> Tuple[Tensor, Tensor]:
    """k nearest rows of b (or of a itself) by cosine, per row of a (SPEC §2)."""
    dtype = compute_dtype(a) if b is None else compute_dtype(a, b)
    x = normalize(a, dtype)
    c = x if b is None else normalize(b, dtype)
    sim = x @ c.T
    valid = torch.ones_like(sim, dtype=torch.bool)
    if b is None:
        if exclude_self:
            valid &= ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        if a_labels is not None:
            valid &= a_labels[:, None] != a_labels[None, :]
    elif a_labels is not None and b_labels is not None:
        valid &= a_labels[:, None] != b_labels[None, :]
    return topk_rows(sim, valid, k)


# ------------------------------------------------------------------------ FCD
def fcd_loss(fs: Tensor, ft: Tensor, metric: str = "l2", normalize_features: bool = True,
             detach_teacher: bool = True) -> Tensor:
    """SPEC §1: mean_i |x_i - z_i|^2 (l2) or mean_i (1 - x_i . z_i) (cosine)."""
    dtype = compute_dtype(fs, ft)
    ft = teacher(ft, detach_teacher)
    if metric == "cosine" or normalize_features:
        x, z = normalize(fs, dtype), normalize(ft, dtype)
    else:
        x, z = fs.to(dtype), ft.to(dtype)
    if metric == "l2":
        return (x - z).pow(2).sum(1).mean()
    return (1 - (x * z).sum(1)).mean()


# ------------------------------------------------------------------------ RAD
def rad_phi(d: Tensor, metric: str, margin: float) -> Tensor:
    if metric == "hinge":
        return torch.clamp(d - margin, min=0)
    if metric == "l2":
        return d * d
    return d.abs()


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of values[valid]; 0 (with zero gradients) when nothing is valid."""
    return masked_sum(values, valid) / valid.sum().clamp(min=1).to(values.dtype)


def rad_loss(fs: Tensor, ft: Tensor, y: Optional[Tensor] = None, bank: Optional[Tensor] = None,
             bank_labels: Optional[Tensor] = None, indices: Optional[Tensor] = None, *,
             k: int = 16, metric: str = "hinge", margin: float = 0.03,
             mine_by: str = "teacher", detach_teacher: bool = True) -> Tensor:
    """SPEC §2: mean over mined pairs (i, j in J_i) of phi(s_ij - t_ij)."""
    dtype = compute_dtype(fs, ft) if bank is None else compute_dtype(fs, ft, bank)
    x = normalize(fs, dtype)
    z = normalize(teacher(ft, detach_teacher), dtype)
    if bank is None:
        s_all, t_all = x @ x.T, z @ z.T
    else:
        if len(bank) == 0:  # no candidate at all: 0 with zero gradients (SPEC §9)
            return (x.sum() + z.sum()) * 0
        b = normalize(bank.detach(), dtype)
        s_all, t_all = x @ b.T, z @ b.T
    if indices is None:
        score = (t_all if mine_by == "teacher" else s_all).detach()
        valid = torch.ones_like(score, dtype=torch.bool)
        if bank is None:
            valid &= ~torch.eye(len(x), dtype=torch.bool, device=x.device)
            if y is not None:
                valid &= y[:, None] != y[None, :]
        elif bank_labels is not None:
            valid &= y[:, None] != bank_labels[None, :]
        indices = topk_rows(score, valid, k)[1]
    mined = indices >= 0
    safe = indices.clamp(min=0)
    d = s_all.gather(1, safe) - t_all.gather(1, safe)
    return masked_mean(rad_phi(d, metric, margin), mined)


def coupleface_loss(fs: Tensor, ft: Tensor, y: Optional[Tensor] = None, *, alpha: float = 1.0,
                    beta: float = 1.0, detach_teacher: bool = True, **rad_kwargs) -> Tensor:
    """SPEC §2: alpha * FCD(l2) + beta * RAD."""
    fcd = fcd_loss(fs, ft, "l2", True, detach_teacher)
    rad = rad_loss(fs, ft, y, detach_teacher=detach_teacher, **rad_kwargs)
    return alpha * fcd + beta * rad


# ------------------------------------------------------------------------ EKD
def fpr_divisors(fpr_levels: Sequence[float]) -> list:
    """The integers q_a = round(1 / fpr_a) of SPEC §3.2."""
    return [int(round(1.0 / f)) for f in fpr_levels]


def ekd_sigmoid(u: Tensor, temperature: float) -> Tensor:
    return 1.0 / (1.0 + torch.exp(torch.clamp(-u / temperature, -50, 50)))


def ekd_rank(v: Tensor, anchors: Tensor, temperature: float) -> Tensor:
    return ekd_sigmoid(v[:, None] - anchors[None, :], temperature).sum(1)


def ekd_pair_loss(s: Tensor, t: Tensor, s_anchor: Tensor, t_anchor: Tensor,
                  temperature: float) -> Tensor:
    """Mean of (rank_s(s) - rank_t(t))^2; 0 for no pairs."""
    if s.numel() == 0:
        return s.sum()
    diff = ekd_rank(s, s_anchor, temperature) - ekd_rank(t, t_anchor, temperature)
    return (diff * diff).mean()


def sort_desc_nan_last(v: Tensor) -> Tensor:
    """Stable descending order with NaN below every number (SPEC §9)."""
    key = torch.where(torch.isnan(v), torch.full_like(v, -math.inf), v)
    return torch.sort(key, descending=True, stable=True).indices


def ekd_loss(fs: Tensor, ft: Tensor, y: Tensor, s_anchor: Tensor, t_anchor: Tensor, *,
             training: bool = True, topk: int = 2000, temperature: float = 0.01,
             fpr_levels: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
             momentum: float = 0.01, pos_weight: float = 0.02,
             neg_weight: float = 0.01) -> Tuple[Tensor, Tensor, Tensor]:
    """SPEC §3. Returns (loss, new s_anchor, new t_anchor)."""
    dtype = compute_dtype(fs, ft)
    n = len(fs)
    x = normalize(fs, dtype)
    z = normalize(ft.detach(), dtype)
    iu = torch.triu_indices(n, n, 1, device=fs.device)
    s = (x @ x.T)[iu[0], iu[1]]
    t = (z @ z.T)[iu[0], iu[1]]
    same = y[iu[0]] == y[iu[1]]
    s_anchor = s_anchor.to(dtype)
    t_anchor = t_anchor.to(dtype)
    neg_s, neg_t = s[~same], t[~same]
    n_neg = len(neg_s)
    order = None
    if n_neg > 0:
        with torch.no_grad():
            order = sort_desc_nan_last(neg_s)
            positions = torch.tensor([n_neg // q for q in fpr_divisors(fpr_levels)],
                                     device=fs.device)
            thr_s = neg_s[order][positions]
            thr_t = neg_t[sort_desc_nan_last(neg_t)][positions]
            if training:
                s_anchor = momentum * thr_s + (1 - momentum) * s_anchor
                t_anchor = momentum * thr_t + (1 - momentum) * t_anchor
    s_anchor, t_anchor = s_anchor.detach(), t_anchor.detach()
    loss_pos = ekd_pair_loss(s[same], t[same], s_anchor, t_anchor, temperature)
    if order is not None:
        hard = order[:topk]
        loss_neg = ekd_pair_loss(neg_s[hard], neg_t[hard], s_anchor, t_anchor, temperature)
    else:
        loss_neg = s.sum() * 0
    loss = pos_weight * loss_pos + neg_weight * loss_neg
    return loss, s_anchor, t_anchor


# ----------------------------------------------------------------------- CCKD
def cckd_coefficients(kernel: str, gamma: float, order: int) -> list:
    """phi(u) = sum_p coef[p] u^p (SPEC §4)."""
    if kernel == "bilinear":
        return [0.0, 1.0]
    return [_rbf_taylor_coefficient(2 * gamma, p) for p in range(order + 1)]


def _rbf_taylor_coefficient(a: float, p: int) -> float:
    """e^-a a^p / p! (a Poisson probability for a > 0), in log space: p! and
    a^p alone overflow a float from p = 171 on."""
    if a == 0:
        return 1.0 if p == 0 else 0.0
    sign = -1.0 if a < 0 and p % 2 else 1.0
    try:
        return sign * math.exp(-a + p * math.log(abs(a)) - math.lgamma(p + 1))
    except OverflowError:  # a < 0 far from the kernel's range: the sum diverges
        return sign * math.inf


def polynomial(coef: Sequence[float], u: Tensor) -> Tensor:
    out = torch.zeros_like(u)
    for p, c in enumerate(coef):
        out = out + c * u.pow(p)
    return out


def cckd_loss(fs: Tensor, ft: Tensor, *, kernel: str = "gaussian", gamma: float = 0.4,
              order: int = 2, detach_teacher: bool = True) -> Tensor:
    """SPEC §4: (1/N^2) sum_{i,j} (phi(s_ij) - phi(t_ij))^2."""
    dtype = compute_dtype(fs, ft)
    x = normalize(fs, dtype)
    z = normalize(teacher(ft, detach_teacher), dtype)
    coef = cckd_coefficients(kernel, gamma, order)
    diff = polynomial(coef, x @ x.T) - polynomial(coef, z @ z.T)
    return (diff * diff).mean()


# ------------------------------------------------------------------------- SP
def sp_loss(fs: Tensor, ft: Tensor, *, detach_teacher: bool = True) -> Tensor:
    """SPEC §5: (1/N^2) |rownorm(Fs Fs^T) - rownorm(Ft Ft^T)|_F^2."""
    dtype = compute_dtype(fs, ft)
    n = len(fs)
    f_s = fs.reshape(n, -1).to(dtype)
    f_t = teacher(ft, detach_teacher).reshape(n, -1).to(dtype)
    g_s = normalize(f_s @ f_s.T, dtype)
    g_t = normalize(f_t @ f_t.T, dtype)
    return (g_s - g_t).pow(2).sum() / (n * n)


# ------------------------------------------------------------------------ RKD
def rkd_pdist(e: Tensor) -> Tensor:
    """Pairwise distances as the official RKD code computes them (SPEC §6)."""
    sq = e.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * (e @ e.T)).clamp(min=RKD_EPS).sqrt()
    dist = dist.clone()
    idx = torch.arange(len(e), device=e.device)
    dist[idx, idx] = 0
    return dist


def rkd_normalized_distances(e: Tensor) -> Tensor:
    dist = rkd_pdist(e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return dist / dist[off].mean()


def rkd_unit_differences(e_r: Tensor, e_c: Tensor) -> Tensor:
    """unit[a, b] = normalize(e_c[b] - e_r[a]), F.normalize(p=2, eps=EPS)'s
    value and gradient, from a clamped squared norm: F.normalize's second
    derivative is NaN at a zero difference, this one's is that of the clamp
    (0 for b = a, whose difference is identically 0; of order 1/EPS^2
    between duplicate rows, where the function itself is x / EPS)."""
    diff = e_c[None, :, :] - e_r[:, None, :]
    return diff / (diff * diff).sum(2, keepdim=True).clamp(min=EPS * EPS).sqrt()


def rkd_angles(e: Tensor) -> Tensor:
    unit = rkd_unit_differences(e, e)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_loss(fs: Tensor, ft: Tensor, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """SPEC §6: distance_weight * L_D + angle_weight * L_A on raw embeddings."""
    dtype = compute_dtype(fs, ft)
    e_s, e_t = fs.to(dtype), ft.detach().to(dtype)
    loss = e_s.sum() * 0
    if distance_weight != 0:
        with torch.no_grad():
            psi_t = rkd_normalized_distances(e_t)
        psi_s = rkd_normalized_distances(e_s)
        loss = loss + distance_weight * F.smooth_l1_loss(psi_s, psi_t, reduction="mean")
    if angle_weight != 0:
        with torch.no_grad():
            ang_t = rkd_angles(e_t)
        ang_s = rkd_angles(e_s)
        loss = loss + angle_weight * F.smooth_l1_loss(ang_s, ang_t, reduction="mean")
    return loss


# ------------------------------------------------------------------- EC-KD
def exclusivity_loss(weights: Iterable[Tensor]) -> Tensor:
    """SPEC §7, pair form: sum over layers of
    (1/(F(F-1))) sum_{i != j} sum_p |w_ip| |w_jp| of the row-normalised w."""
    total = None
    for weight in weights:
        w = weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # F = 0 too
        w = normalize(w, compute_dtype(w))
        n_filters = w.shape[0]
        a = w.abs()
        if n_filters < 2:
            term = a.sum() * 0
        else:
            pair = a @ a.T
            off = ~torch.eye(n_filters, dtype=torch.bool, device=w.device)
            term = pair[off].sum() / (n_filters * (n_filters - 1))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights: expected at least one weight tensor")
    return total


# ------------------------------------------------------------------------ IDA
IDA_MIN_SIGMA = 1e-6  # clamp of a support set's standard deviation (SPEC §10)


def ida_moments(values: Tensor, found: Tensor) -> Tuple[Tensor, Tensor]:
    """SPEC §10: (mu, sigma) of each row's support similarities `values`
    (N, k) where `found` (padding ignored): mean and population std, sigma
    clamped at 1e-6; (0, 1) for an empty support set."""
    count = found.sum(1)
    n = count.clamp(min=1).to(values.dtype)
    mean = torch.where(found, values, torch.zeros_like(values)).sum(1) / n
    deviation = torch.where(found, values - mean[:, None], torch.zeros_like(values))
    std = ((deviation * deviation).sum(1) / n).sqrt()
    empty = count == 0
    mu = torch.where(empty, torch.zeros_like(mean), mean)
    sigma = torch.where(empty, torch.ones_like(std), std.clamp(min=IDA_MIN_SIGMA))
    return mu, sigma


def ida_align(s: Tensor, mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor,
              mode: str = "shift", lam: float = 1.0) -> Tensor:
    """SPEC §10: the aligned score of pairs with cosine s (broadcasting)."""
    if mode == "shift":
        return s - lam * (mu_a + mu_b) / 2
    return 0.5 * ((s - mu_a) / sigma_a + (s - mu_b) / sigma_b)


def ida_support_stats(u: Tensor, support: Tensor, k: int, u_labels: Optional[Tensor] = None,
                      support_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """SPEC §10: (mu_u, sigma_u) of the k support rows most similar to each
    row of u, same-label rows excluded when both labels are given."""
    values, indices = similarity_topk(u, support, k, u_labels, support_labels)
    return ida_moments(values, indices >= 0)


def ida_scores(a: Tensor, b: Tensor, support: Tensor, k: int = 50, lam: float = 1.0,
               mode: str = "shift", a_labels: Optional[Tensor] = None,
               b_labels: Optional[Tensor] = None,
               support_labels: Optional[Tensor] = None) -> Tensor:
    """SPEC §10: IDA-aligned verification scores of the pairs (a_i, b_i)."""
    dtype = compute_dtype(a, b, support)
    a, b, support = a.to(dtype), b.to(dtype), support.to(dtype)
    s = (normalize(a, dtype) * normalize(b, dtype)).sum(1)
    mu_a, sigma_a = ida_support_stats(a, support, k, a_labels, support_labels)
    mu_b, sigma_b = ida_support_stats(b, support, k, b_labels, support_labels)
    return ida_align(s, mu_a, sigma_a, mu_b, sigma_b, mode, lam)
