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


def normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x_i / max(|x_i|, 1e-12) in `dtype` (exactly F.normalize)."""
    return F.normalize(x.to(dtype), p=2.0, dim=1, eps=EPS)


def teacher(ft: Tensor, detach_teacher: bool) -> Tensor:
    return ft.detach() if detach_teacher else ft


def masked_sum(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of values[valid] with static shapes; masked entries get exactly zero
    gradient (also where they are NaN or inf)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum()
