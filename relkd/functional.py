"""Functional forms of every relkd loss.

Each function validates its arguments (ValueError naming the argument, SPEC
§9), picks a backend and returns a 0-dim tensor: float32 for float16/bfloat16
inputs, else the input dtype.

backend:
  "reference"  the pure-PyTorch transcription of docs/SPEC.md (relkd.reference);
               materialises N x N, for checking and small batches.
  "fused"      relkd's kernels (relkd.fused over relkd.ops); raises
               NotImplementedError where a loss or option has none.
  "auto"       fused where available, else reference.

Batch-relation losses take ``process_group=`` (or ``gather=True``) to relate
each rank's rows to the global batch and return the rank's share (SPEC §8,
relkd.distributed).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _validation as check
from . import fused, ops, reference
from ._common import EPS, compute_dtype, normalize as normalize_rows, row_norms
from .distributed import (GlobalBatch, fail_together, gather_rows, global_batch, resolve_group,
                          share_of_mean)

__all__ = [
    "fcd_loss", "rad_loss", "coupleface_loss", "ekd_loss", "cckd_loss", "sp_loss", "rkd_loss",
    "exclusivity_loss", "similarity_topk", "fused_losses",
]

RAD_METRICS = ("hinge", "l2", "l1")
MINE_BY = ("teacher", "student")
FCD_METRICS = ("l2", "cosine")
CCKD_KERNELS = ("gaussian", "bilinear")
DEFAULT_FPR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def fused_losses() -> dict:
    """Which losses run fused kernels with backend='auto', on which devices."""
    devices = list(ops.fused_devices())
    fused_names = ["RADLoss", "CoupleFaceLoss", "EKDLoss", "CCKDLoss", "SPLoss",
                   "RKDLoss", "similarity_topk",
                   "ida_scores, IDAScorer"]
    plain = ["FCDLoss", "ExclusivityLoss", "ECKDLoss"]  # O(N*D) / O(F*P): PyTorch is the fused path
    return {**{name: devices for name in fused_names}, **{name: ["any"] for name in plain}}


def _full_precision(fn):
    """Runs a loss with autocast off: inputs are upcast to float32 explicitly
    (compute_dtype), and autocast would otherwise run the relation matmuls
    in float16/bfloat16, below SPEC's float32 accumulation."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

    return wrapper


def _loss_group(*args, **kwargs):
    """fail_together's view of a loss call: its group options and its first
    tensor argument (fs, or ft where fs is not a tensor), whose device the
    exchange takes as the other ranks' (valid) calls do."""
    tensors = [a for a in (*args, kwargs.get("fs"), kwargs.get("ft")) if isinstance(a, Tensor)]
    return (kwargs.get("process_group"), kwargs.get("gather", False),
            tensors[0] if tensors else None)


# A rank whose inputs fail validation makes the other ranks raise too
# (instead of waiting for it in a collective): see distributed.fail_together.
_fail_together = fail_together(_loss_group)


RELATION_MATRICES = "N x N relation matrices"


def _has_tangent(*tensors: Optional[Tensor]) -> bool:
    """Whether an input carries a forward-mode tangent (torch.func.jvp,
    torch.autograd.forward_ad). relkd's ops have no forward-mode rule, and
    torch's custom-op autograd would drop the tangent: a silent zero."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _under_func_grad(any_transform: bool = False) -> bool:
    """Whether torch.func.grad / vjp / jacrev (with any_transform, also
    vmap) is transforming this call: torch's custom-op autograd refuses
    functorch's grad transform, and SP's autograd.Function every transform."""
    if torch.compiler.is_compiling():
        return False
    try:
        from torch._C._functorch import TransformType, get_interpreter_stack
    except ImportError:  # a torch without functorch's interpreter stack
        return False
    stack = get_interpreter_stack() or []  # every level: grad(vmap(loss)) too
    return any(any_transform or level.key() == TransformType.Grad for level in stack)


FORWARD_AD = ("forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) has no "
              "rule in relkd's kernels")
FUNC_GRAD = ("torch's custom-op autograd does not support torch.func.grad (vjp, jacrev) "
             "through relkd's kernels")


def _transform_reason(loss: str, inputs: Sequence[Optional[Tensor]]) -> str:
    """Why a function transform keeps `loss` off relkd's ops ("" if none)."""
    if _has_tangent(*inputs):
        return FORWARD_AD
    if _under_func_grad():
        return FUNC_GRAD
    if loss == "SPLoss" and _under_func_grad(any_transform=True):
        return ("SP's fused path is a Python autograd.Function, which torch.func's "
                "transforms (vmap) refuse")
    return ""


def _use_fused(loss: str, backend: str, device: torch.device,
               cost: str = RELATION_MATRICES, inputs: Sequence[Optional[Tensor]] = ()) -> bool:
    """Backend choice: True for the fused path, False for the reference.
    "fused" raises where there is no fused path; "auto" falls back to the
    reference with a FallbackWarning (once per loss and reason) naming the
    memory it costs. `inputs` with a forward-mode tangent have none."""
    check.backend(backend)
    if backend == "reference":
        return False
    reason = _transform_reason(loss, inputs)
    if not reason and not ops.HAS_EXTENSION:
        reason = ops.EXTENSION_ERROR
    elif not reason and device.type not in ops.fused_devices():
        reason = (f"this build of relkd has no fused kernels for {device.type} tensors "
                  f"(compiled for: {', '.join(ops.fused_devices())})")
    if backend == "fused":
        ops.require_extension(f"{loss}(backend='fused')")
        if reason:
            raise NotImplementedError(f"{loss}(backend='fused'): {reason}; use "
                                      "backend='reference' or 'auto'")
        return True
    if reason:
        ops.warn_fallback(loss, reason, cost)
    return not reason


def _zero(fs: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0 loss whose gradient is zeros (not None) for fs (SPEC §9)."""
    return fs.to(dtype).sum() * 0


def _student_teacher(fs, ft, *, same_dim: bool, flatten: bool = False):
    fs = check.embeddings(fs, "fs", flatten=flatten)
    ft = check.embeddings(ft, "ft", n=fs.shape[0],
                          dim=fs.shape[1] if same_dim else None, flatten=flatten)
    return fs, ft


def _label_free_relation(loss: str, fs, ft, *, backend: str, process_group, gather: bool,
                         fused_fn, reference_fn, options: dict, flatten: bool = False,
                         cost: str = RELATION_MATRICES):
    """The shared path of the batch-relation losses without labels (CCKD, SP,
    RKD): validate, gather the global batch, 0 below two rows, dispatch.
    `options`: the loss's, which every rank of a group must share."""
    check.backend(backend)
    fs, ft = _student_teacher(fs, ft, same_dim=False, flatten=flatten)
    check.same_device(fs=fs, ft=ft)
    check.finite(fs=fs, ft=ft)
    use_fused = _use_fused(loss, backend, fs.device, cost, (fs, ft))  # may raise: before
    gb = global_batch(fs, ft, None, resolve_group(process_group, gather),  # the collectives
                      dict(loss=loss, **options, fused=use_fused))
    if gb.n_global < 2:
        return _zero(fs, compute_dtype(fs, ft))
    return _by_backend(use_fused, gb, fused_fn, lambda f, t, _: reference_fn(f, t))


def _by_backend(use_fused: bool, gb: GlobalBatch, fused_fn, reference_fn):
    """Fused: this rank's share directly. Reference: the single-process loss
    of the gathered batch, 1/world of it per rank."""
    if use_fused:
        return fused_fn(gb)
    loss = reference_fn(gb.fs_all, gb.ft_all, gb.y_all)
    return loss if gb.world == 1 else loss / gb.world


def _world_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


# ------------------------------------------------------------------------ FCD
@_full_precision
@_fail_together
def fcd_loss(fs: Tensor, ft: Tensor, metric: str = "l2", normalize: bool = True, *,
             detach_teacher: bool = True, backend: str = "auto", process_group=None,
             gather: bool = False) -> Tensor:
    """Feature consistency distillation (CoupleFace, EC-KD), SPEC §1.

    l2: mean_i |x_i - z_i|^2 (x, z the L2-normalised rows; raw with
    normalize=False); cosine: mean_i (1 - x_i . z_i).
    fs, ft: (N, D). O(N*D): plain PyTorch is also the fused path. With
    process_group / gather, this rank's share of the global-batch mean.
    """
    check.choice(metric, "metric", FCD_METRICS)
    check.flag(normalize, "normalize")
    check.flag(detach_teacher, "detach_teacher")
    check.backend(backend)
    fs, ft = _student_teacher(fs, ft, same_dim=True)
    check.same_device(fs=fs, ft=ft)
    check.finite(fs=fs, ft=ft)
    group = resolve_group(process_group, gather)
    if fs.shape[0] == 0:
        local = _zero(fs, compute_dtype(fs, ft))
    else:
        # O(N*D): the fused form differs only in its one-pass normalisation,
        # so it needs the compiled ops but no fused device.
        use_ops = backend != "reference" and ops.HAS_EXTENSION
        transformed = _transform_reason("FCDLoss", (fs, ft))
        if use_ops and transformed:
            if backend == "fused":
                raise NotImplementedError(f"FCDLoss(backend='fused'): {transformed}; use "
                                          "backend='reference' or 'auto'")
            use_ops = False  # O(N D) either way: no warning
        fcd = fused.fcd_loss if use_ops else reference.fcd_loss
        local = fcd(fs, ft, metric, normalize, detach_teacher)
    return share_of_mean(local, fs.shape[0], group, dict(
        loss="FCDLoss", metric=metric, normalize=normalize, detach_teacher=detach_teacher))


# ------------------------------------------------------------------------ RAD
def _check_rad(fs, ft, y, bank, bank_labels, indices, k, metric, margin, mine_by):
    check.positive_int(k, "k")
    check.choice(metric, "metric", RAD_METRICS)
    check.number(margin, "margin")
    check.choice(mine_by, "mine_by", MINE_BY)
    fs, ft = _student_teacher(fs, ft, same_dim=bank is not None)
    n = fs.shape[0]
    if y is not None:
        check.labels(y, "y", n)
    if bank is not None:
        check.embeddings(bank, "bank", dim=None)
        if bank.shape[1] != fs.shape[1]:
            raise ValueError(f"bank: expected shape (M, {fs.shape[1]}) to match the dim of fs, "
                             f"got {tuple(bank.shape)}")
        if bank_labels is not None:
            check.labels(bank_labels, "bank_labels", bank.shape[0])
            if y is None:
                raise ValueError("bank_labels: excluding a row's own identity from the bank "
                                 "needs y (labels of shape (N,))")
        elif y is not None and indices is None and not torch.compiler.is_compiling():
            _warn_y_without_bank_labels()
    elif bank_labels is not None:
        raise ValueError("bank_labels: given without bank")
    if indices is not None:
        # The kernels check the values' range as well; eager mode checks here
        # too, for a message that names the argument (under torch.compile a
        # host-side check would break the graph).
        check.index_matrix(indices, "indices", n, n if bank is None else bank.shape[0],
                           check_values=not torch.compiler.is_compiling())
        if indices.shape[1] != k:
            raise ValueError(f"indices: expected k={k} columns (the loss's k), got "
                             f"{indices.shape[1]}; pass k={indices.shape[1]} or slice the "
                             "neighbours you want")
        if bank_labels is not None:
            raise ValueError("bank_labels: only used to mine the bank, and indices= skips "
                             "mining; drop one of them")
    check.same_device(fs=fs, ft=ft, y=y, bank=bank, bank_labels=bank_labels, indices=indices)
    check.finite(fs=fs, ft=ft, bank=bank)
    return fs, ft


_WARNED_Y_WITHOUT_BANK_LABELS = []


def _warn_y_without_bank_labels() -> None:
    """Once per process: SPEC §2 mines every bank row when bank_labels is None
    (y then excludes nothing), which a caller who meant y to exclude each
    row's own prototype would not notice."""
    if not _WARNED_Y_WITHOUT_BANK_LABELS:
        warnings.warn("y: in bank mode the labels exclude a row's own identity only together "
                      "with bank_labels (the bank rows' identities, e.g. "
                      "PrototypeBank.active()[1]); without them every bank row is mined, a "
                      "row's own prototype included (SPEC §2)", UserWarning,
                      stacklevel=_user_stacklevel())
        _WARNED_Y_WITHOUT_BANK_LABELS.append(True)  # after: an error filter raises each time


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, seen from its caller, of the first frame
    outside the relkd package: the user's line, however many relkd wrappers
    (modules, _full_precision) lie between."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


@_full_precision
@_fail_together
def rad_loss(fs: Tensor, ft: Tensor, y: Optional[Tensor] = None, bank: Optional[Tensor] = None,
             bank_labels: Optional[Tensor] = None, indices: Optional[Tensor] = None, *,
             k: int = 16, metric: str = "hinge", margin: float = 0.03, mine_by: str = "teacher",
             detach_teacher: bool = True, backend: str = "auto", process_group=None,
             gather: bool = False) -> Tensor:
    """Relation-aware distillation over mined informative relations
    (CoupleFace's mutual relation distillation), SPEC §2.

    L = mean over mined pairs (i, j in J_i) of phi(s_ij - t_ij), J_i = the k
    candidates with the largest teacher (mine_by="teacher") or student
    similarity; phi = max(0, d - margin) (hinge), d^2 (l2) or |d| (l1).

    fs, ft: (N, D) student / teacher embeddings (ft may have another dim in
    batch mode); y: (N,) labels, same-label candidates are excluded;
    bank: (M, D) e.g. teacher class prototypes, bank_labels: (M,);
    indices: (N, k) int64 precomputed neighbours (-1 = padding), skips mining.
    Defaults (hinge, margin 0.03, teacher-mined) follow the one public
    implementation of CoupleFace's idea; the paper's equations are not public.
    """
    fs, ft = _check_rad(fs, ft, y, bank, bank_labels, indices, k, metric, margin, mine_by)
    check.flag(detach_teacher, "detach_teacher")
    group = resolve_group(process_group, gather)
    if group is not None and indices is not None and bank is None:
        raise ValueError("indices: precomputed batch neighbours are not supported with "
                         "process_group / gather (their column numbers are per rank)")
    use_fused = _use_fused("RADLoss", backend, fs.device, inputs=(fs, ft))
    rad = dict(k=k, metric=metric, margin=margin, mine_by=mine_by, detach_teacher=detach_teacher)
    gb = global_batch(fs, ft, y, group, dict(
        loss="RADLoss", **rad, fused=use_fused, bank=bank is not None,
        bank_labels=bank_labels is not None, indices=indices is not None))
    if bank is None and gb.n_global < 2:
        return _zero(fs, compute_dtype(fs, ft))
    if use_fused:
        return fused.rad_loss(gb, bank, bank_labels, indices, **rad)
    idx_all = (indices if indices is None or group is None
               else gather_rows(indices, group, "indices"))
    return _by_backend(False, gb, None, lambda f, t, yy: reference.rad_loss(
        f, t, yy, bank, bank_labels, idx_all, **rad))


@_full_precision
@_fail_together
def coupleface_loss(fs: Tensor, ft: Tensor, y: Optional[Tensor] = None,
                    bank: Optional[Tensor] = None, bank_labels: Optional[Tensor] = None,
                    indices: Optional[Tensor] = None, *, alpha: float = 1.0, beta: float = 1.0,
                    k: int = 16, metric: str = "hinge", margin: float = 0.03,
                    mine_by: str = "teacher", detach_teacher: bool = True,
                    backend: str = "auto", process_group=None, gather: bool = False) -> Tensor:
    """CoupleFace (feature consistency + mutual relation distillation), SPEC §2:
    alpha * FCD(l2) + beta * RAD. Shapes and RAD options as rad_loss; fs and
    ft must have the same dim (for FCD)."""
    check.number(alpha, "alpha")
    check.number(beta, "beta")
    fs, ft = _student_teacher(fs, ft, same_dim=True)
    rad = rad_loss(fs, ft, y, bank, bank_labels, indices, k=k, metric=metric, margin=margin,
                   mine_by=mine_by, detach_teacher=detach_teacher, backend=backend,
                   process_group=process_group, gather=gather)
    fcd = fcd_loss(fs, ft, "l2", True, detach_teacher=detach_teacher, backend=backend,
                   process_group=process_group, gather=gather)
    return alpha * fcd + beta * rad


# ------------------------------------------------------------------------ EKD
@_full_precision
@_fail_together
def ekd_loss(fs: Tensor, ft: Tensor, y: Tensor, s_anchor: Tensor, t_anchor: Tensor, *,
             training: bool = True, topk: int = 2000, temperature: float = 0.01,
             fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS, momentum: float = 0.01,
             pos_weight: float = 0.02, neg_weight: float = 0.01, backend: str = "auto",
             process_group=None, gather: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Evaluation-oriented knowledge distillation (EKD, CVPR 2022), SPEC §3.

    L = pos_weight * mean_pos (rank_s(s) - rank_t(t))^2
      + neg_weight * mean_{top-k hardest negatives} (rank_s(s) - rank_t(t))^2,
    rank(v) = sum_a sigmoid((v - anchor_a) / temperature), anchors = EMA of the
    negative-pair similarities at the FPR levels (moved only when training).

    fs, ft: (N, D); y: (N,) labels (required); s_anchor, t_anchor: (A,) with
    A = len(fpr_levels). Returns (loss, new s_anchor, new t_anchor).
    Equal (up to floating point) to Tencent/TFace's ekd.py.
    """
    check.backend(backend)
    check.flag(training, "training")
    levels = check.fpr_levels(fpr_levels)
    check.non_negative_int(topk, "topk")
    check.number(temperature, "temperature", positive=True)
    check.number(momentum, "momentum")
    check.number(pos_weight, "pos_weight")
    check.number(neg_weight, "neg_weight")
    fs, ft = _student_teacher(fs, ft, same_dim=False)
    n = fs.shape[0]
    if y is None:
        raise ValueError(f"y: EKD needs identity labels of shape ({n},), got None")
    check.labels(y, "y", n)
    for name, a in (("s_anchor", s_anchor), ("t_anchor", t_anchor)):
        check.tensor(a, name, f"({len(levels)},)")
        if a.dim() != 1 or a.shape[0] != len(levels):
            raise ValueError(f"{name}: expected shape ({len(levels)},) (one per fpr level), "
                             f"got {tuple(a.shape)}")
    check.same_device(fs=fs, ft=ft, y=y, s_anchor=s_anchor, t_anchor=t_anchor)
    check.finite(fs=fs, ft=ft)
    group = resolve_group(process_group, gather)
    dtype = compute_dtype(fs, ft)
    use_fused = _use_fused("EKDLoss", backend, fs.device, inputs=(fs, ft))  # may raise: before
    options = dict(training=training, topk=topk, temperature=temperature, fpr_levels=levels,
                   momentum=momentum, pos_weight=pos_weight, neg_weight=neg_weight)
    gb = global_batch(fs, ft, y, group, dict(loss="EKDLoss", **options, fused=use_fused))
    if gb.n_global < 2:
        return _zero(fs, dtype), s_anchor.to(dtype), t_anchor.to(dtype)
    if use_fused:
        return fused.ekd_loss(gb, s_anchor, t_anchor, **options)
    loss, s_new, t_new = reference.ekd_loss(gb.fs_all, gb.ft_all, gb.y_all, s_anchor, t_anchor,
                                            **options)
    return (loss if gb.world == 1 else loss / gb.world), s_new, t_new


# ----------------------------------------------------------------------- CCKD
@_full_precision
@_fail_together
def cckd_loss(fs: Tensor, ft: Tensor, *, kernel: str = "gaussian", gamma: float = 0.4,
              order: int = 2, detach_teacher: bool = True, backend: str = "auto",
              process_group=None, gather: bool = False) -> Tensor:
    """Correlation congruence (CCKD, ICCV 2019), SPEC §4.

    L = (1/N^2) sum_{i,j} (phi(s_ij) - phi(t_ij))^2 over all pairs, diagonal
    included; phi = order-P Taylor expansion of exp(-gamma |x_i - x_j|^2) on
    unit vectors (kernel="gaussian") or phi(u) = u (kernel="bilinear").
    fs: (N, Ds), ft: (N, Dt).
    """
    check.choice(kernel, "kernel", CCKD_KERNELS)
    check.number(gamma, "gamma")
    check.non_negative_int(order, "order")
    check.flag(detach_teacher, "detach_teacher")
    options = dict(kernel=kernel, gamma=gamma, order=order, detach_teacher=detach_teacher)
    return _label_free_relation(
        "CCKDLoss", fs, ft, backend=backend, process_group=process_group, gather=gather,
        options=options,
        fused_fn=lambda g: fused.cckd_loss(g, **options),
        reference_fn=lambda f, t: reference.cckd_loss(f, t, **options))


# ------------------------------------------------------------------------- SP
@_full_precision
@_fail_together
def sp_loss(fs: Tensor, ft: Tensor, *, detach_teacher: bool = True, backend: str = "auto",
            process_group=None, gather: bool = False) -> Tensor:
    """Similarity-preserving distillation (SP, ICCV 2019), SPEC §5.

    L = (1/N^2) |rownorm(Fs Fs^T) - rownorm(Ft Ft^T)|_F^2 on the flattened,
    unnormalised features fs: (N, ...), ft: (N, ...). The fused path uses the
    Gram identity (O(N D^2), no N x N) when D < N.
    """
    check.flag(detach_teacher, "detach_teacher")
    options = dict(detach_teacher=detach_teacher)
    return _label_free_relation(
        "SPLoss", fs, ft, backend=backend, process_group=process_group, gather=gather,
        options=options, flatten=True, fused_fn=lambda g: fused.sp_loss(g, **options),
        reference_fn=lambda f, t: reference.sp_loss(f, t, **options))


# ------------------------------------------------------------------------ RKD
@_full_precision
@_fail_together
def rkd_loss(fs: Tensor, ft: Tensor, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0, backend: str = "auto", process_group=None,
             gather: bool = False) -> Tensor:
    """Relational knowledge distillation (RKD, CVPR 2019), SPEC §6.

    L = distance_weight * mean smoothL1(d_s / mu_s, d_t / mu_t)
      + angle_weight * mean smoothL1(angle_s, angle_t)
    on raw embeddings fs: (N, Ds), ft: (N, Dt); teacher side without gradient.
    The fused path takes the angle term's vertices a few at a time (O(N^3 D)
    work as the reference, but O(N D + N^2) memory per vertex instead of
    N x N x D differences and N x N x N angles).
    """
    check.number(distance_weight, "distance_weight")
    check.number(angle_weight, "angle_weight")
    options = dict(distance_weight=distance_weight, angle_weight=angle_weight)
    return _label_free_relation(
        "RKDLoss", fs, ft, backend=backend, process_group=process_group, gather=gather,
        options=options, cost="N x N x D differences and N x N x N angles" if angle_weight != 0
        else RELATION_MATRICES, fused_fn=lambda g: fused.rkd_loss(g, **options),
        reference_fn=lambda f, t: reference.rkd_loss(f, t, **options))


# ------------------------------------------------------------------- EC-KD
def _weights_of(weights) -> list:
    if isinstance(weights, torch.nn.Module):
        return [m.weight for m in weights.modules()
                if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
                and m.weight is not None]
    if isinstance(weights, Tensor):
        return [weights]
    return list(weights)


@_full_precision
def exclusivity_loss(weights, *, backend: str = "auto", process_group=None,
                     gather: bool = False) -> Tensor:
    """Exclusivity of filters (EC-KD), SPEC §7: summed over weights of
    (1/(F(F-1))) sum_{i != j} sum_p |w_ip| |w_jp| on row-normalised w (F, P).

    weights: a tensor (F, ...), a list of them, or an nn.Module (every
    Conv/Linear weight). O(F*P) by the column-sum identity; the exact
    weighting of the EC-KD paper is not public, this form is relkd's. With
    process_group / gather (SPEC §8's share rule for a loss that every rank
    computes alike): 1/world of it, so that the shares sum to the loss.
    """
    check.backend(backend)
    ws = check.weight_list(_weights_of(weights))
    check.same_device(**{f"weights[{i}]": w for i, w in enumerate(ws)})
    check.finite(**{f"weights[{i}]": w for i, w in enumerate(ws)})
    world = _world_size(resolve_group(process_group, gather))
    if backend == "reference":
        total = reference.exclusivity_loss(ws)
    else:
        total = fused.exclusivity_term(ws[0])
        for w in ws[1:]:
            total = total + fused.exclusivity_term(w)
    return total if world == 1 else total / world


# ------------------------------------------------------------------- mining
@_full_precision
def similarity_topk(a: Tensor, b: Optional[Tensor] = None, k: Optional[int] = None,
                    a_labels: Optional[Tensor] = None, b_labels: Optional[Tensor] = None,
                    exclude_self: Optional[bool] = None,
                    backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Exact k-nearest-neighbour search by cosine similarity, SPEC §2.

    For every row of a: (N, D), the k rows of b: (M, D) (or of a itself when
    b is None) with the largest cosine similarity, sorted descending, ties to
    the smaller index. Returns (values, indices), each (N, k); slots without
    a valid candidate hold (-inf, -1). Values are float32 for half inputs and
    carry no gradient on either backend (this is a search, not a loss).

    Exclusions: with b None, a_labels excludes same-label rows and
    exclude_self (default True) the row itself; with b given, a_labels and
    b_labels (both or neither) exclude pairs of equal labels, and
    exclude_self does not apply. Fused memory: O(N*k) plus one tile per
    thread, so b may hold millions of rows (e.g. identity prototypes).
    """
    if k is None:
        raise ValueError("k: expected an int >= 1, got None (k is required)")
    check.positive_int(k, "k")
    a = check.embeddings(a, "a")
    if b is not None:
        b = check.embeddings(b, "b", dim=None)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"b: expected shape (M, {a.shape[1]}) to match the dim of a, "
                             f"got {tuple(b.shape)}")
    if a_labels is not None:
        check.labels(a_labels, "a_labels", a.shape[0])
    if b is None:
        if b_labels is not None:
            raise ValueError("b_labels: given without b (with b None, a_labels serve both)")
        exclude_self = True if exclude_self is None else check.flag(exclude_self, "exclude_self")
    else:
        if exclude_self is not None:
            raise ValueError("exclude_self: only applies when b is None (a searched against "
                             "itself); against b, exclude pairs with a_labels and b_labels")
        if (a_labels is None) != (b_labels is None):
            missing = "b_labels" if b_labels is None else "a_labels"
            raise ValueError(f"{missing}: a_labels and b_labels exclude equal-label pairs "
                             "together; give both or neither")
        if b_labels is not None:
            check.labels(b_labels, "b_labels", b.shape[0])
    check.same_device(a=a, b=b, a_labels=a_labels, b_labels=b_labels)
    check.finite(a=a, b=b)
    if not _use_fused("similarity_topk", backend, a.device, cost="N x M similarities"):
        values, indices = reference.similarity_topk(a, b, k, a_labels, b_labels,
                                                    bool(exclude_self))
        return values.detach(), indices
    dtype = compute_dtype(a) if b is None else compute_dtype(a, b)
    x = normalize_rows(a.detach(), dtype).contiguous()
    if b is None:
        labels = None if a_labels is None else a_labels.long()
        if exclude_self:
            return ops.topk_sim_self(x, k, labels)
        return ops.topk_sim(x, x, k, labels, labels, None, False, 0)
    return bank_topk(x, *bank_operand(b, dtype), k, a_labels, b_labels)


BANK_COPY_MAX_BYTES = 64 << 20  # banks up to this size are searched as a normalised copy


def bank_operand(b: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """A bank (M, D) as topk_sim searches it. A bank of at most
    BANK_COPY_MAX_BYTES in `dtype`: a normalised copy and no scale (the
    search then compares plain products, about 15 % faster on small banks).
    A larger one: its raw rows in `dtype` (no copy when they already are) and
    their inverse norms as c_scale, so that a bank of millions of
    unnormalised rows is never copied to normalise it."""
    if b.shape[0] * b.shape[1] * torch.empty((), dtype=dtype).element_size() <= BANK_COPY_MAX_BYTES:
        return normalize_rows(b.detach(), dtype).contiguous(), None
    c = b.detach().to(dtype).contiguous()
    return c, 1.0 / row_norms(c).clamp(min=EPS)


def bank_topk(x: Tensor, c: Tensor, inv_norm: Optional[Tensor], k: int,
              x_labels: Optional[Tensor], c_labels: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Fused k-NN of normalised rows x (N, D) among a bank_operand; labels
    exclude a candidate only when both sides have them (SPEC §2)."""
    use_labels = x_labels is not None and c_labels is not None
    return ops.topk_sim(x, c, k, x_labels.long() if use_labels else None,
                        c_labels.long() if use_labels else None, inv_norm, False, 0)
