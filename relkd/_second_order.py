"""Second derivatives of the fused ops whose backward returns a closed-form
first derivative (pairwise_loss, rkd_angle_loss).

Their register_autograd backward (relkd/ops.py) calls `gradients_with_graph`
when autograd records the backward (create_graph=True: double backward,
gradient penalties, Hessian-vector products). It differentiates a plain
PyTorch transcription of the op's loss, so the gradient it returns carries
an exact graph. The transcriptions hold the N x M (and, for the angle term,
N x M x M) matrices that the fused ops avoid: a double backward costs the
reference path's memory. The formulas are those of csrc/pair_math.h and
csrc/cpu/rkd_angle.cpp (docs/SPEC.md); tests/test_pairwise_loss.py and
tests/test_rkd_angle.py check that the gradient they give is the kernels'
and run gradgradcheck; tests/test_losses_fused.py and test_distributed.py
compare Hessian-vector products with the reference's."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

RKD_EPS = reference.RKD_EPS  # the clamp of squared distances (pair_math.h rkd_distance)

# pairwise_loss kinds: which (row, column) pairs count, and whether the
# teacher's embeddings take a gradient (csrc/cpu/pair_kinds.h).
PAIR_MASKS = {"cckd": "all", "ekd_pos": "upper_same_label", "rkd_dist_sum": "off_diagonal",
              "rkd_distance": "off_diagonal"}
TEACHER_GRAD_KINDS = ("cckd",)


def gradients_with_graph(loss_of: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                         wanted: Sequence[bool], grad_loss: Tensor) -> List[Optional[Tensor]]:
    """grad_loss times the partial derivative of loss_of(*inputs) with
    respect to inputs[i] for each wanted i, with create_graph=True; None
    elsewhere. An input may be a function of another (RKD's mu of the
    student, DDP's gathered columns of the rows): autograd.grad with respect
    to the inputs themselves would add that path to the partial derivative,
    and the caller's graph adds it again. So the loss is differentiated with
    respect to fresh aliases of the wanted inputs, the others held fixed."""
    with torch.enable_grad():
        aliases = [x.view_as(x) if w else None if x is None else x.detach()
                   for x, w in zip(inputs, wanted)]
        loss = loss_of(*aliases)
        wrt = [x for x, w in zip(aliases, wanted) if w]
        got = iter(torch.autograd.grad(loss, wrt, grad_loss, create_graph=True,
                                       allow_unused=True))
    out: List[Optional[Tensor]] = []
    for x, w in zip(aliases, wanted):
        if not w:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(x) if g is None else g)
    return out


def _pair_mask(kind: str, n_r: int, n_c: int, labels_r: Optional[Tensor],
               labels_c: Optional[Tensor], ids_r: Optional[Tensor], ids_c: Optional[Tensor],
               device: torch.device) -> Optional[Tensor]:
    """The ordered pairs (i, j) the kind sums over (pair_math.h ordered_mask);
    None for all of them."""
    mask = PAIR_MASKS[kind]
    if mask == "all":
        return None
    id_r = torch.arange(n_r, device=device) if ids_r is None else ids_r
    id_c = torch.arange(n_c, device=device) if ids_c is None else ids_c
    if mask == "off_diagonal":
        return id_r[:, None] != id_c[None, :]
    return (id_r[:, None] < id_c[None, :]) & (labels_r[:, None] == labels_c[None, :])


def _distance(x_r: Tensor, x_c: Tensor) -> Tensor:
    """RKD's distances from dot products and squared norms; the clamp passes
    no gradient."""
    sq_r, sq_c = (x_r * x_r).sum(1), (x_c * x_c).sum(1)
    return (sq_r[:, None] + sq_c[None, :] - 2 * (x_r @ x_c.T)).clamp(min=RKD_EPS).sqrt()


def _soft_rank(v: Tensor, anchors: Tensor, temperature: Tensor) -> Tensor:
    """EKD's rank (SPEC §3.5), one anchor at a time (no N x M x A tensor)."""
    rank = torch.zeros_like(v)
    for a in anchors:
        rank = rank + reference.ekd_sigmoid(v - a, temperature)
    return rank


def pairwise_loss(kind: str, xs_r: Tensor, xt_r: Optional[Tensor], xs_c: Optional[Tensor],
                  xt_c: Optional[Tensor], labels_r: Optional[Tensor],
                  labels_c: Optional[Tensor], ids_r: Optional[Tensor],
                  ids_c: Optional[Tensor], params: Tensor) -> Tensor:
    """relkd::pairwise_loss's value as differentiable PyTorch (same args)."""
    dtype = params.dtype  # float32 for 16-bit embeddings, as the op computes
    if xs_c is None:  # symmetric: the columns are the rows
        xs_c, xt_c, labels_c, ids_c = xs_r, xt_r, labels_r, ids_r
    xs_r, xs_c = xs_r.to(dtype), xs_c.to(dtype)
    if kind == "rkd_dist_sum":
        terms = _distance(xs_r, xs_c)
    else:
        xt_r, xt_c = xt_r.to(dtype), xt_c.to(dtype)
        if kind == "cckd":
            diff = (reference.polynomial(params, xs_r @ xs_c.T)
                    - reference.polynomial(params, xt_r @ xt_c.T))
            terms = diff * diff
        elif kind == "ekd_pos":
            # Positive pairs are few: the ranks of the masked entries only
            # (the graph keeps O(pairs x anchors), not O(N M x anchors)).
            mask = _pair_mask(kind, xs_r.shape[0], xs_c.shape[0], labels_r, labels_c, ids_r,
                              ids_c, xs_r.device)
            n_anchor = (params.numel() - 1) // 2
            temperature = params[0]
            s_anchor, t_anchor = params[1:1 + n_anchor], params[1 + n_anchor:]
            diff = (_soft_rank((xs_r @ xs_c.T)[mask], s_anchor, temperature)
                    - _soft_rank((xt_r @ xt_c.T)[mask], t_anchor, temperature))
            return (diff * diff).sum()
        else:  # rkd_distance: smooth L1 (beta 1) of the scaled distances' difference
            terms = F.smooth_l1_loss(_distance(xs_r, xs_c) / params[0],
                                     _distance(xt_r, xt_c).detach() / params[1],
                                     reduction="none")
    mask = _pair_mask(kind, xs_r.shape[0], xs_c.shape[0], labels_r, labels_c, ids_r, ids_c,
                      xs_r.device)
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum()


def rkd_angle_loss(es_r: Tensor, et_r: Tensor, es_c: Optional[Tensor],
                   et_c: Optional[Tensor]) -> Tensor:
    """relkd::rkd_angle_loss's value as differentiable PyTorch; the teacher
    takes no gradient."""
    if es_c is None:
        es_c, et_c = es_r, et_r

    def angles(x_r: Tensor, x_c: Tensor) -> Tensor:
        unit = reference.rkd_unit_differences(x_r, x_c)
        return torch.bmm(unit, unit.transpose(1, 2))

    psi_t = angles(et_r.detach(), et_c.detach())
    return F.smooth_l1_loss(angles(es_r, es_c), psi_t, reduction="sum")
