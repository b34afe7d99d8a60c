"""Second derivatives of the fused ops whose backward returns a closed-form
first derivative (pairwise_loss, rkd_angle_loss; SP's Gram identity).

Under create_graph=True (double backward, gradient penalties,
Hessian-vector products) their backward (relkd/ops.py, fused.py) returns
the kernel's gradients through `gradients_with_graph`: a function whose own
backward is the Hessian-vector product. The loss is a sum over row blocks of
the relation matrix, so that product is a sum over blocks: each block's
loss is written in differentiable PyTorch (the transcriptions below),
differentiated twice and freed before the next. Memory: O(N D) plus one
block of BLOCK_ENTRIES relation entries (the angle term: n_c^2 angles per
vertex), not the N x M matrices. A third derivative is exact too, at the
reference's memory (every block's graph kept). The formulas are those of
csrc/pair_math.h and csrc/cpu/rkd_angle.cpp (docs/SPEC.md);
tests/test_pairwise_loss.py and test_rkd_angle.py run gradgradcheck and
check the block sum; test_losses_fused.py and test_distributed.py compare
Hessian-vector products with the reference's."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

# pairwise_loss kinds: which (row, column) pairs count (csrc/cpu/pair_kinds.h).
PAIR_MASKS = {"cckd": "all", "ekd_pos": "upper_same_label", "rkd_dist_sum": "off_diagonal",
              "rkd_distance": "off_diagonal"}


BLOCK_ENTRIES = 1 << 21  # relation-matrix entries per block of a Hessian-vector product

_KEEP_INPUTS = [0]  # open double_backward() blocks, process-wide
_KEEP_INPUTS_LOCK = threading.Lock()


@contextlib.contextmanager
def double_backward() -> Iterator[None]:
    """While this block is open, relkd's fused ops that compute their
    gradient in the forward pass (pairwise_loss, rkd_angle_loss: EKD, CCKD,
    RKD) keep their inputs, so that a gradient taken with create_graph=True
    can be differentiated again. Outside it they keep only the gradient: the
    inputs would cost O(N D) memory in every training step (CCKD at N =
    8192, D = 256: 32 MiB peak instead of 26), and a double backward raises.
    The switch is process-wide, not per thread: autograd's device threads,
    DataParallel's workers and activation checkpointing's recomputation
    (which reruns the forward during backward: keep the backward inside the
    block too) see it."""
    with _KEEP_INPUTS_LOCK:
        _KEEP_INPUTS[0] += 1
    try:
        yield
    finally:
        with _KEEP_INPUTS_LOCK:
            _KEEP_INPUTS[0] -= 1


def keeping_inputs() -> bool:
    return _KEEP_INPUTS[0] > 0


NOT_KEPT = ("a gradient with create_graph=True (double backward) through relkd's {op} "
            "(EKD, CCKD, RKD) needs the op's inputs, which it keeps only when the forward runs "
            "inside `with relkd.double_backward():` (they would cost O(N D) memory in every "
            "training step); run the loss's forward (and, with activation checkpointing, the "
            "backward) inside it")


def row_blocks(n_rows: int, entries_per_row: int) -> List[Tuple[int, int]]:
    """Row ranges of at most BLOCK_ENTRIES relation entries each."""
    rows = max(1, BLOCK_ENTRIES // max(entries_per_row, 1))
    return [(lo, min(n_rows, lo + rows)) for lo in range(0, n_rows, rows)]


def _leaf(x: Optional[Tensor], wanted: bool, graphed: bool) -> Optional[Tensor]:
    """What a block loss differentiates in place of input x. Wanted inputs
    become float32 (16-bit embeddings: neither the products nor the loss
    scale rounded to 16 bits) fresh nodes, so that derivatives with respect
    to them are partial: detached leaves, or, when the result must keep a
    graph (graphed), aliases that still lead back to x."""
    if x is None or not wanted:
        return None if x is None else x.detach()
    wide = x.dtype in (torch.float16, torch.bfloat16)
    if graphed:
        return x.float() if wide else x.view_as(x)
    return (x.detach().float() if wide else x.detach()).requires_grad_()


class _GradientWithHessian(torch.autograd.Function):
    """grad_loss * the kernel's gradients as a differentiable function of
    (grad_loss, inputs). The loss is a sum of block losses (row blocks of
    the relation matrix), so its Hessian-vector product is the sum of the
    blocks' products: backward builds one block's graph at a time, takes
    <cotangent, its gradient> and differentiates that, then frees the graph.
    Memory: one block (BLOCK_ENTRIES) at a time, not the N x M matrices. A
    backward that must itself be differentiable (create_graph=True again: a
    third derivative) keeps every block's graph instead."""

    @staticmethod
    def forward(ctx, block_losses, wanted, grad_loss, *tensors):
        inputs, firsts = tensors[:len(wanted)], tensors[len(wanted):]
        ctx.block_losses, ctx.wanted = block_losses, wanted
        ctx.save_for_backward(grad_loss, *inputs, *firsts)
        dtypes = [x.dtype for x, w in zip(inputs, wanted) if w]
        return tuple((grad_loss * f).to(dt) for f, dt in zip(firsts, dtypes))

    @staticmethod
    def backward(ctx, *cotangents):
        grad_loss, *saved = ctx.saved_tensors
        wanted = ctx.wanted
        inputs, firsts = saved[:len(wanted)], saved[len(wanted):]
        graphed = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [_leaf(x, w, graphed) for x, w in zip(inputs, wanted)]
            wrt = [x for x, w in zip(leaves, wanted) if w]
            hvp: List[Optional[Tensor]] = [None] * len(wrt)
            inners = []  # <cotangent, the block's gradient>
            for block_loss in ctx.block_losses:
                loss = block_loss(*leaves)
                if not loss.requires_grad:  # an empty block
                    continue
                grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
                inner = sum((g * c.to(g.dtype)).sum() for g, c in zip(grads, cotangents)
                            if g is not None and g.requires_grad)
                if not isinstance(inner, Tensor):
                    continue
                if graphed:
                    inners.append(inner)
                for i, h in enumerate(torch.autograd.grad(inner, wrt, allow_unused=True,
                                                          create_graph=graphed)):
                    if h is not None:
                        hvp[i] = h if hvp[i] is None else hvp[i] + h
        if graphed:  # d/d grad_loss as a function of the inputs, for the next order
            d_grad_loss = sum(inners, grad_loss.new_zeros(()))
        else:  # the kernel's gradients already hold it
            d_grad_loss = sum(((c.to(f.dtype) * f).sum() for c, f in zip(cotangents, firsts)),
                              grad_loss.new_zeros(()))
        dtypes = [x.dtype for x, w in zip(inputs, wanted) if w]
        out = iter(None if h is None else (grad_loss * h).to(dt) for h, dt in zip(hvp, dtypes))
        return (None, None, d_grad_loss.to(grad_loss.dtype),
                *[next(out) if w else None for w in wanted], *[None] * len(firsts))


def gradients_with_graph(block_losses: Sequence[Callable[..., Tensor]],
                         inputs: Sequence[Optional[Tensor]], wanted: Sequence[bool],
                         grad_loss: Tensor, firsts: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """grad_loss * firsts (the kernel's gradients with respect to the wanted
    inputs, in order) with a graph whose backward is the Hessian-vector
    product of sum(block_losses) (each a function of all inputs); None for
    the other inputs. Differentiating with respect to detached leaves takes
    partial derivatives: an input may be a function of another (RKD's mu of
    the student, DDP's gathered columns of the rows), a path that the
    caller's graph adds once."""
    outs = iter(_GradientWithHessian.apply(tuple(block_losses), tuple(wanted), grad_loss,
                                           *inputs, *firsts))
    return [next(outs) if w else None for w in wanted]


def pairwise_blocks(kind: str, n_r: int, n_c: int) -> List[Callable[..., Tensor]]:
    """pairwise_loss as a sum over row blocks, each against all columns
    with global ids (as a DDP rank calls it), in differentiable PyTorch."""
    def block(lo: int, hi: int) -> Callable[..., Tensor]:
        def loss(xs_r, xt_r, xs_c, xt_c, labels_r, labels_c, ids_r, ids_c, params):
            if ids_r is None:
                ids_r = torch.arange(n_r, device=xs_r.device)
            if xs_c is None:  # symmetric: the columns are all the rows
                xs_c, xt_c, labels_c, ids_c = xs_r, xt_r, labels_r, ids_r
            rows = slice(lo, hi)
            return pairwise_loss(kind, xs_r[rows], None if xt_r is None else xt_r[rows], xs_c,
                                 xt_c, None if labels_r is None else labels_r[rows], labels_c,
                                 ids_r[rows], ids_c, params)
        return loss
    return [block(lo, hi) for lo, hi in row_blocks(n_r, n_c)]


def rkd_angle_blocks(n_r: int, n_c: int) -> List[Callable[..., Tensor]]:
    """rkd_angle_loss as a sum over blocks of vertices (n_c^2 angles each)."""
    def block(lo: int, hi: int) -> Callable[..., Tensor]:
        def loss(es_r, et_r, es_c, et_c):
            if es_c is None:
                es_c, et_c = es_r, et_r
            return rkd_angle_loss(es_r[lo:hi], et_r[lo:hi], es_c, et_c)
        return loss
    return [block(lo, hi) for lo, hi in row_blocks(n_r, n_c * n_c)]


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
    squared = sq_r[:, None] + sq_c[None, :] - 2 * (x_r @ x_c.T)
    return squared.clamp(min=reference.RKD_EPS).sqrt()


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
