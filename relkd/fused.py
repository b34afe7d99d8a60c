"""Fused implementations of the relation losses (``backend="fused"``).

Normalisation and the O(N*k) arithmetic on mined pairs stay in PyTorch;
everything that touches all N^2 (or N x M) pairs is a relkd op (ops.py), so
no function here allocates a relation matrix. Each takes a GlobalBatch: a
process's rows against the columns of the (possibly distributed) batch, and
returns the process's share of the loss (the whole loss for one process).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _second_order as second_order
from . import ops
from ._common import EPS, compute_dtype, masked_sum, normalize, row_norms, teacher
from .distributed import GlobalBatch, all_reduce_sum, all_reduce_with_grad


def _columns(gb: GlobalBatch, all_rows: Tensor, prepare) -> Optional[Tensor]:
    """The column operand of a pair op: None when the columns are the rows
    (one process), else the prepared global batch."""
    return None if gb.group is None else prepare(all_rows)


def _normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x_i / max(|x_i|, 1e-12) in `dtype`: F.normalize's values, one pass
    forward and backward on the CPU (ops.normalize_rows)."""
    return ops.normalize_rows(x.to(dtype), EPS)


def _half_operands(*inputs: Optional[Tensor]) -> Optional[torch.dtype]:
    """The 16-bit dtype in which pairwise_loss / topk_sim take the embeddings:
    the inputs' own when they are all bfloat16 or all float16 on CUDA with the
    tensor-core kernels on (RELKD_TENSOR_CORES=1 or auto; read at each call,
    or once when torch.compile traces), else None (float operands). The
    products are then the 16-bit products an eager computation in that dtype
    makes, run on tensor cores; the losses stay float32 (SPEC: half inputs)."""
    given = [t for t in inputs if t is not None]
    dtype = given[0].dtype
    if (dtype in ops.HALF_DTYPES and given[0].is_cuda
            and all(t.dtype == dtype for t in given)
            and os.environ.get("RELKD_TENSOR_CORES", "0") in ("1", "auto")):
        return dtype
    return None


def _operands(half: Optional[torch.dtype], *xs: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """xs rounded to `half` (the kernels' operands), or as they are for None."""
    return tuple(x.to(half) if half is not None and x is not None else x for x in xs)


def _row_ids(gb: GlobalBatch) -> Optional[Tensor]:
    if gb.group is None:
        return None
    return gb.offset + torch.arange(gb.fs.shape[0], device=gb.fs.device)


# The O(N*k) loss arithmetic of the fused path, written independently of
# relkd.reference (see relkd/_common.py for why); RAD's penalty is
# ops.relation_penalty.
def _taylor_rbf_coefficients(kernel: str, gamma: float, order: int) -> list:
    """CCKD's phi(u) = sum_p c_p u^p (SPEC §4): c_0 = e^{-2 gamma},
    c_p = c_{p-1} * 2 gamma / p; bilinear: phi(u) = u."""
    if kernel == "bilinear":
        return [0.0, 1.0]
    coef = [math.exp(-2.0 * gamma)]
    for p in range(1, order + 1):
        coef.append(coef[-1] * 2.0 * gamma / p)
    return coef


def _rank_divisors(fpr_levels: Sequence[float]) -> list:
    """EKD's integer divisors q = round(1 / fpr) (SPEC §3.2)."""
    return [round(1.0 / level) for level in fpr_levels]


def _soft_rank(v: Tensor, anchors: Tensor, temperature: float) -> Tensor:
    """EKD's rank(v) = sum_a 1 / (1 + exp(clamp(-(v - a) / T, -50, 50))) (SPEC §3.5)."""
    u = ((v[:, None] - anchors[None, :]) / temperature).clamp(-50.0, 50.0)
    return torch.sigmoid(u).sum(1)


# ------------------------------------------------------------------------ FCD
def fcd_loss(fs: Tensor, ft: Tensor, metric: str, normalize_features: bool,
             detach_teacher: bool) -> Tensor:
    """SPEC §1 with the one-pass normalisation; O(N*D), no relation matrix."""
    dtype = compute_dtype(fs, ft)
    unit = metric == "cosine" or normalize_features
    x, z = ((_normalize(f, dtype) if unit else f.to(dtype))
            for f in (fs, teacher(ft, detach_teacher)))
    n = x.shape[0]
    total = (x - z).square().sum() if metric == "l2" else n - (x * z).sum()
    return total / n


# ------------------------------------------------------------------------ RAD
def rad_loss(gb: GlobalBatch, bank: Optional[Tensor], bank_labels: Optional[Tensor],
             indices: Optional[Tensor], *, k: int, metric: str, margin: float, mine_by: str,
             detach_teacher: bool) -> Tensor:
    """SPEC §2 with topk_sim mining and pair_dot relations (never N x k x D)."""
    dtype = compute_dtype(gb.fs, gb.ft) if bank is None else compute_dtype(gb.fs, gb.ft, bank)
    x = _normalize(gb.fs, dtype)
    z = _normalize(teacher(gb.ft, detach_teacher), dtype)
    y = None if gb.y is None else gb.y.long()
    half = _half_operands(gb.fs, gb.ft, bank)
    if bank is None:
        x_c = x if gb.group is None else _normalize(gb.fs_all, dtype)
        z_c = z if gb.group is None else _normalize(teacher(gb.ft_all, detach_teacher), dtype)
        if indices is None:
            q, c = _operands(half, *((z, z_c) if mine_by == "teacher" else (x, x_c)))
            y_c = None if gb.y_all is None else gb.y_all.long()
            if gb.group is None:  # one process: the columns are the rows
                indices = ops.topk_sim_self(q.detach(), k, y)[1]
            else:
                indices = ops.topk_sim(q.detach(), c.detach(), k, y, y_c, None, True,
                                       gb.offset)[1]
        s = ops.pair_dot(x, x_c, indices)
        t = ops.pair_dot(z, z_c, indices)
    else:
        # Relations to the normalised bank without copying it: scale the raw
        # dot products by the bank rows' inverse norms.
        if bank.shape[0] == 0:  # no candidate at all: one zero row, never mined
            bank = bank.new_zeros(1, bank.shape[1])
            bank_labels, indices = None, torch.full_like(x[:, :1], -1, dtype=torch.long)
        b = bank.detach().to(dtype).contiguous()
        inv_norm = 1.0 / row_norms(b).clamp(min=EPS)
        if indices is None:
            q = _operands(half, z if mine_by == "teacher" else x)[0]
            b_q = bank.detach().contiguous() if half else b  # 16-bit: the bank itself
            c_labels = None if bank_labels is None else bank_labels.long()
            indices = ops.topk_sim(q.detach(), b_q, k, y if c_labels is not None else None,
                                   c_labels, inv_norm)[1]
        scale = inv_norm[indices.clamp(min=0)]
        s = ops.pair_dot(x, b, indices) * scale
        t = ops.pair_dot(z, b, indices) * scale
    total, count = ops.relation_penalty(s, t, indices, metric, margin)
    count = all_reduce_sum(count, gb.group)
    return total / count.clamp(min=1).to(dtype)


# ----------------------------------------------------------------------- CCKD
def cckd_loss(gb: GlobalBatch, *, kernel: str, gamma: float, order: int,
              detach_teacher: bool) -> Tensor:
    """SPEC §4: pairwise_loss('cckd') over all N^2 pairs, / N^2."""
    dtype = compute_dtype(gb.fs, gb.ft)
    x = _normalize(gb.fs, dtype)
    z = _normalize(teacher(gb.ft, detach_teacher), dtype)
    x_c = _columns(gb, gb.fs_all, lambda f: _normalize(f, dtype))
    z_c = _columns(gb, gb.ft_all, lambda f: _normalize(teacher(f, detach_teacher), dtype))
    coef = torch.tensor(_taylor_rbf_coefficients(kernel, gamma, order), dtype=dtype,
                        device=x.device)
    operands = _operands(_half_operands(gb.fs, gb.ft), x, z, x_c, z_c)
    total = ops.pairwise_loss("cckd", *operands, params=coef)
    return total / (gb.n_global ** 2)


# ------------------------------------------------------------------------ EKD
def ekd_loss(gb: GlobalBatch, s_anchor: Tensor, t_anchor: Tensor, *, training: bool,
             topk: int, temperature: float, fpr_levels: Sequence[float], momentum: float,
             pos_weight: float, neg_weight: float) -> Tuple[Tensor, Tensor, Tensor]:
    """SPEC §3: exact global thresholds and top-k negatives by
    negative_pair_select, the positive term by pairwise_loss('ekd_pos')."""
    dtype = compute_dtype(gb.fs, gb.ft)
    single = gb.group is None
    x = _normalize(gb.fs, dtype)
    z = _normalize(gb.ft.detach(), dtype)
    x_c = x if single else _normalize(gb.fs_all, dtype)
    z_c = z if single else _normalize(gb.ft_all.detach(), dtype)
    y, y_all = gb.y.long(), gb.y_all.long()
    # Column operands of the selection: None = the rows themselves.
    sel_x, sel_z, sel_y = (None, None, None) if single else (x_c.detach(), z_c, y_all)
    group_name = "" if single else gb.group.group_name
    divisors = _rank_divisors(fpr_levels)
    # The op returns `topk` slots; there are at most n(n-1)/2 negative pairs.
    topk = min(topk, gb.n_global * (gb.n_global - 1) // 2)
    # The anchors carry no gradient (SPEC §3.4-3.5), as on the reference path.
    s_anchor, t_anchor = s_anchor.detach(), t_anchor.detach()

    thr_s, _, top_i, top_j, n_neg = ops.negative_pair_select(
        x.detach(), y, divisors, topk, sel_x, sel_y, gb.offset, group_name)
    s_anchor, t_anchor = s_anchor.to(dtype), t_anchor.to(dtype)
    if training:
        thr_t = ops.negative_pair_select(z, y, divisors, 0, sel_z, sel_y, gb.offset,
                                         group_name)[0]
        has_neg = n_neg > 0
        s_anchor = torch.where(has_neg, momentum * thr_s + (1 - momentum) * s_anchor, s_anchor)
        t_anchor = torch.where(has_neg, momentum * thr_t + (1 - momentum) * t_anchor, t_anchor)

    # Positive pairs: sorted by label, they sit in diagonal blocks of tiles
    # and pairwise_loss skips every other tile.
    params = torch.cat([s_anchor.new_tensor([temperature]), s_anchor, t_anchor])
    perm_r = torch.argsort(y, stable=True)
    half = _half_operands(gb.fs, gb.ft)
    if single:
        pos_sum = ops.pairwise_loss("ekd_pos", *_operands(half, x[perm_r], z[perm_r]),
                                    labels_r=y[perm_r], params=params)
    else:
        perm_c = torch.argsort(y_all, stable=True)
        pos_sum = ops.pairwise_loss("ekd_pos", *_operands(half, x[perm_r], z[perm_r],
                                                          x_c[perm_c], z_c[perm_c]),
                                    y[perm_r], y_all[perm_c], gb.offset + perm_r, perm_c,
                                    params)
    n_pos = ops.positive_pair_count(y_all)
    loss_pos = pos_sum / n_pos.clamp(min=1).to(dtype)

    # Hard negatives: this process's rows among the global top-k pairs. A rank
    # without rows (an empty DDP shard) has none: its share is 0, but it took
    # part in every collective above.
    n_rows = x.shape[0]
    n_hard = (top_i >= 0).sum()
    if n_rows == 0:
        loss_neg = x.sum() * 0
    else:
        local = (top_i >= gb.offset) & (top_i < gb.offset + n_rows)
        rows = torch.where(local, top_i - gb.offset, torch.full_like(top_i, -1))
        # One pass per side, its backward summing each row's terms in a
        # fixed order (not two P x D gathers and their scatter-add).
        s_hard = ops.pair_list_dot(x, None if single else x_c, rows, top_j)
        t_hard = ops.pair_list_dot(z, None if single else z_c, rows, top_j)
        diff = (_soft_rank(s_hard, s_anchor, temperature)
                - _soft_rank(t_hard, t_anchor, temperature))
        loss_neg = masked_sum(diff * diff, local) / n_hard.clamp(min=1).to(dtype)
    return pos_weight * loss_pos + neg_weight * loss_neg, s_anchor, t_anchor


# ------------------------------------------------------------------------- SP
SP_ROW_CHUNK = 2048  # rows per float64 block of the Gram identity


def _row_blocks(n: int):
    """Row ranges of SP_ROW_CHUNK rows; one empty range for n = 0 (an empty
    DDP shard), so that the per-row results are empty tensors, not absent."""
    return [(lo, min(n, lo + SP_ROW_CHUNK)) for lo in range(0, max(n, 1), SP_ROW_CHUNK)]


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """a^T b in float64, a block of rows at a time (no N x D float64 copy)."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for lo, hi in _row_blocks(a.shape[0]):
        out += a[lo:hi].double().T @ b[lo:hi].double()
    return out


def _sp_gram_forward_torch(f_s, f_t, a_s, a_t):
    """torch.ops.relkd.sp_gram_forward in PyTorch ops (the devices without it)."""
    if a_s is None:
        a_s, a_t = f_s, f_t
    gram_s, gram_t, cross_st = _gram(a_s, a_s), _gram(a_t, a_t), _gram(a_s, a_t)
    r_s, r_t, cross = [], [], []
    for lo, hi in _row_blocks(f_s.shape[0]):
        fs, ft = f_s[lo:hi].double(), f_t[lo:hi].double()
        r_s.append(((fs @ gram_s) * fs).sum(1))
        r_t.append(((ft @ gram_t) * ft).sum(1))
        cross.append(((fs @ cross_st) * ft).sum(1))
    return gram_s, gram_t, cross_st, torch.cat(r_s), torch.cat(r_t), torch.cat(cross)


def _sp_identity_sum(r_s: Tensor, r_t: Tensor, cross: Tensor, n_all: int) -> Tensor:
    """L of _SPGramIdentity from the per-row r_s, r_t and c."""
    m_s, m_t = r_s.clamp(min=0).clamp(min=EPS * EPS), r_t.clamp(min=0).clamp(min=EPS * EPS)
    # sqrt(m_s) sqrt(m_t), not sqrt(m_s m_t): m ~ |f|^4 N D^2, whose product
    # overflows float64 from |f| ~ 1e37 (float32 inputs near their max).
    terms = (r_s.clamp(min=0) / m_s + r_t.clamp(min=0) / m_t
             - 2 * cross / (torch.sqrt(m_s) * torch.sqrt(m_t)))
    return terms.sum() / (n_all * n_all)


class _SPGramIdentity(torch.autograd.Function):
    """SPEC §5's identity: with G = F F^T, row i of rownorm(G) has
    |G_i|^2 = f_i^T (F^T F) f_i and G_s,i . G_t,i = f_i^T (Fs^T Ft) g_i, so

        N^2 L = sum_i r_s,i / m_s,i + r_t,i / m_t,i - 2 c_i / sqrt(m_s,i m_t,i)

    with r = |G_i|^2, m = max(r, eps^2), c the cross term (exact, the eps
    clamp included). Rows f (this process's) and a (the whole batch; None in
    one process, where it is f) are streamed in float64 blocks; only D x D
    Gram matrices and per-row scalars are kept. The backward is written out:
    besides the direct row terms, every row of the batch receives the
    gradient through the Gram matrices (2 a W for F^T F, a U for Fs^T Ft);
    a double backward differentiates the identity in PyTorch ops. Float64
    because the loss subtracts two O(N) sums."""

    @staticmethod
    def forward(ctx, f_s, f_t, a_s, a_t, n_all: int):
        ctx.single = a_s is None
        if f_s.device.type == "cpu":  # one C++ op: a few regions, dynamic chunks
            gram_s, gram_t, cross_st, r_s, r_t, cross = torch.ops.relkd.sp_gram_forward(
                f_s, f_t, a_s, a_t)
        else:
            gram_s, gram_t, cross_st, r_s, r_t, cross = _sp_gram_forward_torch(f_s, f_t, a_s,
                                                                               a_t)
        if ctx.single:
            a_s, a_t = f_s, f_t
        ctx.save_for_backward(f_s, f_t, a_s, a_t, gram_s, gram_t, cross_st, r_s, r_t, cross)
        ctx.n_all = n_all
        return _sp_identity_sum(r_s, r_t, cross, n_all).to(f_s.dtype)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # once: non-reentrant checkpointing refuses a second unpack
        if not torch.is_grad_enabled():
            return _SPGramIdentity.first_order(ctx, saved, grad)
        # create_graph=True: the written-out derivative treats the Gram
        # matrices as constants, so its graph would be wrong. The same
        # gradients instead, with a graph whose backward differentiates the
        # identity in PyTorch ops (O(N D + D^2) memory, as forward).
        f_s, f_t, a_s, a_t = saved[:4]
        wanted = list(ctx.needs_input_grad[:4])
        with torch.no_grad():
            firsts = _SPGramIdentity.first_order(ctx, saved, torch.ones_like(grad))[:4]

        def value(f_s, f_t, a_s, a_t):
            r_s, r_t, cross = _sp_gram_forward_torch(f_s, f_t, a_s, a_t)[3:]
            return _sp_identity_sum(r_s, r_t, cross, ctx.n_all)

        inputs = (f_s, f_t) + ((None, None) if ctx.single else (a_s, a_t))
        return tuple(second_order.gradients_with_graph(
            [value], inputs, wanted, grad, [g for g, w in zip(firsts, wanted) if w])) + (None,)

    @staticmethod
    def first_order(ctx, saved, grad):
        f_s, f_t, a_s, a_t, gram_s, gram_t, cross_st, r_s, r_t, cross = saved
        scale = grad.double() / (ctx.n_all * ctx.n_all)
        eps2 = EPS * EPS
        m_s, m_t = r_s.clamp(min=0).clamp(min=eps2), r_t.clamp(min=0).clamp(min=eps2)
        root = torch.sqrt(m_s) * torch.sqrt(m_t)  # as _sp_identity_sum: no overflow

        def d_norm_term(r, m):  # d/dr of r/m - 2c/sqrt(m m'): r/m is 1 unless clamped
            d = torch.where(r >= eps2, (cross / root) / m, torch.full_like(r, 1.0 / eps2))
            return torch.where(r >= 0, d, torch.zeros_like(d))  # clamp(min=0)

        w_s = scale * d_norm_term(r_s, m_s)
        w_t = scale * d_norm_term(r_t, m_t)
        u = scale * (-2.0 / root)
        need = list(ctx.needs_input_grad)
        if f_s.device.type == "cpu":
            need_s, need_t = need[0] or need[2], need[1] or need[3]
            g_fs, g_ft, g_as, g_at = torch.ops.relkd.sp_gram_backward(
                f_s, f_t, None if ctx.single else a_s, None if ctx.single else a_t,
                gram_s, gram_t, cross_st, w_s, w_t, u, need_s, need_t)
            grads = [g if n_ else None for g, n_ in zip((g_fs, g_ft, g_as, g_at), need)]
            return tuple(grads) + (None,)
        if ctx.single:  # the batch is the rows: their two gradient parts add up
            need[2], need[3] = need[0], need[1]
        grads = [torch.zeros_like(t) if need[i] else None
                 for i, t in enumerate((f_s, f_t, a_s, a_t))] + [None]
        w_gram_s = torch.zeros_like(gram_s)
        w_gram_t = torch.zeros_like(gram_t)
        u_cross = torch.zeros_like(cross_st)
        for lo, hi in _row_blocks(f_s.shape[0]):
            fs, ft = f_s[lo:hi].double(), f_t[lo:hi].double()
            ws, wt, uu = w_s[lo:hi, None], w_t[lo:hi, None], u[lo:hi, None]
            if need[0]:
                grads[0][lo:hi] = 2 * ws * (fs @ gram_s) + uu * (ft @ cross_st.T)
            if need[1]:
                grads[1][lo:hi] = 2 * wt * (ft @ gram_t) + uu * (fs @ cross_st)
            w_gram_s += (ws * fs).T @ fs
            w_gram_t += (wt * ft).T @ ft
            u_cross += (uu * fs).T @ ft
        for lo, hi in _row_blocks(a_s.shape[0]):
            as_, at_ = a_s[lo:hi].double(), a_t[lo:hi].double()
            if need[2]:
                grads[2][lo:hi] = 2 * as_ @ w_gram_s + at_ @ u_cross.T
            if need[3]:
                grads[3][lo:hi] = 2 * at_ @ w_gram_t + as_ @ u_cross
        if ctx.single:
            grads[0] = None if grads[0] is None else grads[0] + grads[2]
            grads[1] = None if grads[1] is None else grads[1] + grads[3]
            grads[2] = grads[3] = None
        return tuple(grads)


def _rows(f: Tensor) -> Tensor:
    """(N, ...) flattened to (N, features); also for N = 0 (an empty DDP shard)."""
    return f.reshape(f.shape[0], math.prod(f.shape[1:]))


def sp_loss(gb: GlobalBatch, *, detach_teacher: bool) -> Tensor:
    """SPEC §5. D < N: the Gram identity (_SPGramIdentity), O(N D^2) time and
    O(D^2) memory beyond the inputs. D >= N: the direct form, whose N x N
    rows cost no more memory than the N x D features."""
    dtype = compute_dtype(gb.fs, gb.ft)
    n_all = gb.n_global
    f_s = _rows(gb.fs).to(dtype)
    f_t = _rows(teacher(gb.ft, detach_teacher)).to(dtype)
    a_s = _columns(gb, gb.fs_all, lambda f: _rows(f).to(dtype))
    a_t = _columns(gb, gb.ft_all, lambda f: _rows(teacher(f, detach_teacher)).to(dtype))
    if max(f_s.shape[1], f_t.shape[1]) < n_all:
        return _SPGramIdentity.apply(f_s, f_t, a_s, a_t, n_all)
    g_s = normalize(f_s @ (f_s if a_s is None else a_s).T, dtype)
    g_t = normalize(f_t @ (f_t if a_t is None else a_t).T, dtype)
    return (g_s - g_t).pow(2).sum() / (n_all * n_all)


# ------------------------------------------------------------------------ RKD
def rkd_loss(gb: GlobalBatch, *, distance_weight: float, angle_weight: float) -> Tensor:
    """SPEC §6: distance_weight * the distance term + angle_weight * the
    angle term, each skipped at weight 0."""
    dtype = compute_dtype(gb.fs, gb.ft)
    e_s, e_t = gb.fs.to(dtype), gb.ft.detach().to(dtype)
    c_s = _columns(gb, gb.fs_all, lambda f: f.to(dtype))
    c_t = _columns(gb, gb.ft_all, lambda f: f.detach().to(dtype))
    loss = e_s.sum() * 0
    if distance_weight != 0:
        loss = loss + distance_weight * _rkd_distance_term(gb, e_s, e_t, c_s, c_t)
    if angle_weight != 0:
        # This rank's anchors, the global batch's other two points: the
        # ranks' sums add up to the sum over every angle.
        angles = ops.rkd_angle_loss(e_s, e_t, c_s, c_t)
        loss = loss + angle_weight * angles / gb.n_global ** 3
    return loss


def _rkd_distance_term(gb: GlobalBatch, e_s: Tensor, e_t: Tensor, c_s: Optional[Tensor],
                       c_t: Optional[Tensor]) -> Tensor:
    """SPEC §6, distance term: mu by a pairwise_loss('rkd_dist_sum') pass, then
    pairwise_loss('rkd_distance'); the gradient reaches the student's mu."""
    ids = _row_ids(gb)
    n = gb.n_global
    pairs = n * (n - 1)
    # 16-bit inputs as 16-bit operands: the same values, on tensor cores.
    e_s, e_t, c_s, c_t = _operands(_half_operands(gb.fs, gb.ft), e_s, e_t, c_s, c_t)
    dist_s = ops.pairwise_loss("rkd_dist_sum", e_s, None, c_s, None, ids_r=ids)
    with torch.no_grad():
        dist_t = ops.pairwise_loss("rkd_dist_sum", e_t, None, c_t, None, ids_r=ids)
    if gb.group is not None:
        dist_s = all_reduce_with_grad(dist_s, gb.group)
        dist_t = all_reduce_sum(dist_t, gb.group)
    params = torch.stack([dist_s / pairs, dist_t / pairs])
    total = ops.pairwise_loss("rkd_distance", e_s, e_t, c_s, c_t, ids_r=ids, params=params)
    return total / (n * n)


def exclusivity_term(w: Tensor) -> Tensor:
    """SPEC §7 by the O(F P) identity (1/(F(F-1))) sum_p [(sum_i |w_ip|)^2 - sum_i w_ip^2]."""
    w = w.reshape(w.shape[0], math.prod(w.shape[1:]))  # F = 0 too
    w = normalize(w, compute_dtype(w))
    n_filters = w.shape[0]
    if n_filters < 2:
        return w.sum() * 0
    col = w.abs().sum(0)
    return ((col * col).sum() - (w * w).sum()) / (n_filters * (n_filters - 1))


