"""Conventions of SPEC's notation section that the reference and the fused
path share: the normalisation, the compute dtype, the teacher's detaching,
and a masked sum with static shapes. The loss math itself is written twice,
on purpose: literally in relkd/reference.py (the oracle) and independently in
relkd/fused.py and the kernels (csrc/pair_math.h), so that a bug in one
shows up in the fused-vs-reference tests instead of hiding in shared code."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12  # torch.nn.functional.normalize's eps (SPEC notation)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half inputs, else the promoted input dtype (SPEC notation)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_max_abs(x: Tensor) -> Tensor:
    """max_c |x_ic| (N, 1), by two reductions instead of an |x| copy."""
    return torch.maximum(x.amax(dim=1, keepdim=True), -x.amin(dim=1, keepdim=True))


def _power_of_two_scale(big: Tensor) -> Tensor:
    """Per row of x (N, D), from big = _row_max_abs(x): a power of two s
    (N, 1) with max_c |x_ic| s in
    [1, 4) (s a normal number: [2, 4) in the dtype's top octave): x * s is
    exact, and its squared norm neither overflows nor underflows. torch's
    norm squares in the input's dtype, so float32 rows with entries beyond
    about 1.8e19 (float64: 1.3e154) got the norm inf and F.normalize made
    them zero vectors. Rows holding inf or NaN get the smallest normal
    number (their norms stay inf or NaN)."""
    with torch.no_grad():
        tiny = torch.finfo(big.dtype).tiny  # s stays normal: flush-to-zero cannot make it 0
        return torch.exp2(-torch.floor(torch.log2(big.clamp(min=tiny)))).clamp(min=tiny)


def _scaled_norms(x: Tensor) -> Tensor:
    """|x_i| (N, 1) from the rows scaled by _power_of_two_scale."""
    with torch.no_grad():
        s = _power_of_two_scale(_row_max_abs(x))
    return (x * s).norm(dim=1, keepdim=True) / s


def _rescue_scale(x: Tensor, norms: Tensor) -> Tensor:
    """(N, 1): _power_of_two_scale for the finite rows of x whose torch norm
    (norms, (N, 1)) overflowed, 1 elsewhere (x * 1: the same bits)."""
    with torch.no_grad():
        big = _row_max_abs(x)  # once: the scale comes from it too
        overflow = torch.isinf(norms) & torch.isfinite(big)
        return torch.where(overflow, _power_of_two_scale(big), torch.ones_like(big))


def row_norms(x: Tensor) -> Tensor:
    """|x_i| (N,) of a floating (N, D) tensor, without overflow where the norm
    itself is finite: torch's norm, and the rows where it overflowed again,
    scaled (_power_of_two_scale). No copy of x in eager mode (banks of
    millions of rows pass here): only those rows are rescaled, after a host
    check. Compiled graphs and torch.func's transforms cannot branch on data:
    there every row goes through its scale (1 where torch's norm is finite:
    the same bits); the compiler fuses x * s into the reduction, torch.func
    makes it a copy of x."""
    norms = x.norm(dim=1)
    if x.shape[1] == 0:
        return norms
    if torch.compiler.is_compiling() or _functorch_wrapped(x):
        s = _rescue_scale(x, norms.unsqueeze(1))
        return ((x * s).norm(dim=1, keepdim=True) / s).squeeze(1)
    overflow = torch.isinf(norms)
    if not bool(overflow.any()):
        return norms
    rows = overflow.nonzero().squeeze(1)
    return norms.index_copy(0, rows, _scaled_norms(x[rows]).squeeze(1))


def _functorch_wrapped(x: Tensor) -> bool:
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:
        return False
    return is_functorch_wrapped_tensor(x)


def normalize(x: Tensor, dtype: torch.dtype, eps: float = EPS) -> Tensor:
    """x_i / max(|x_i|, eps) in `dtype`: exactly F.normalize (values and
    gradients; inf and NaN rows too) where |x_i|^2 stays within the dtype's
    range. A finite row whose |x_i|^2 overflows (F.normalize's zero vector)
    is first scaled by an exact power of two, with its gradient. One
    formula for every row (scale 1 elsewhere: the same bits), so autograd
    saves what F.normalize saves; no host synchronisation."""
    x = x.to(dtype)
    if x.shape[1] == 0:
        return F.normalize(x, p=2.0, dim=1, eps=eps)
    with torch.no_grad():
        s = _rescue_scale(x, x.norm(p=2.0, dim=1, keepdim=True))
    xs = x * s
    return xs / xs.norm(p=2.0, dim=1, keepdim=True).clamp_min(eps * s).expand_as(xs)


def teacher(ft: Tensor, detach_teacher: bool) -> Tensor:
    return ft.detach() if detach_teacher else ft


def masked_sum(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of values[valid] with static shapes; masked entries get exactly zero
    gradient (also where they are NaN or inf)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum()
