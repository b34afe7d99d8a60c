"""Argument checks of the public API (SPEC §9): bad input raises a ValueError
that names the argument and what was expected, before any kernel runs."""
from __future__ import annotations

import math
import numbers
import operator
import os
import sys
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("auto", "fused", "reference")


def tensor(x, name: str, expected: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, "
                         f"got {type(x).__name__}")
    return x


def embeddings(x, name: str, *, n: Optional[int] = None, dim: Optional[int] = None,
               flatten: bool = False) -> Tensor:
    """A floating (N, D) tensor; with flatten=True any (N, ...) is accepted."""
    expected = "(N, D)" if n is None else f"({n}, D)" if dim is None else f"({n}, {dim})"
    x = tensor(x, name, expected)
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {expected}, "
                         f"got dtype {x.dtype}")
    if x.dim() != 2 and not (flatten and x.dim() >= 2):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows to match fs, i.e. shape {expected}, "
                         f"got {tuple(x.shape)}")
    if dim is not None and x.dim() == 2 and x.shape[1] != dim:
        raise ValueError(f"{name}: expected dim D={dim} to match fs, i.e. shape {expected}, "
                         f"got {tuple(x.shape)}")
    return x


def labels(y, name: str, n: int) -> Tensor:
    y = tensor(y, name, f"({n},)")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name}: expected integer labels (int64 or int32) of shape ({n},), "
                         f"got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(y.shape)}")
    return y


def index_matrix(idx, name: str, n: int, m: int, check_values: bool = True) -> Tensor:
    """An int64 (n, k) matrix of indices into m rows, -1 = padding. The value
    range check reads the tensor (a host sync); check_values=False leaves it
    to the kernel, which checks it too."""
    idx = tensor(idx, name, f"({n}, k)")
    if idx.dtype != torch.int64:
        raise ValueError(f"{name}: expected int64 of shape ({n}, k), got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != n or idx.shape[1] < 1:
        raise ValueError(f"{name}: expected shape ({n}, k) with k >= 1, got {tuple(idx.shape)}")
    if check_values and idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= m):
        raise ValueError(f"{name}: values must lie in [-1, {m}) (-1 = padding), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def bools() -> tuple:
    """bool and, if numpy is in use, numpy.bool_: flags, not numbers."""
    numpy = sys.modules.get("numpy")
    return (bool, numpy.bool_) if numpy is not None else (bool,)


def _integer(k) -> Optional[int]:
    """k as a Python int if it is an integer (int, numpy integer, ...), else None."""
    if isinstance(k, bools()) or not isinstance(k, numbers.Integral):
        return None
    return operator.index(k)


def positive_int(k, name: str) -> int:
    value = _integer(k)
    if value is None or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {k!r}")
    return value


def non_negative_int(k, name: str) -> int:
    value = _integer(k)
    if value is None or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {k!r}")
    return value


def number(v, name: str, *, positive: bool = False, non_negative: bool = False) -> float:
    """A finite real number (Python or numpy scalar) as a float: no option
    means anything at NaN or +-inf (a margin or weight of inf would only turn
    the loss into inf or NaN), so those are rejected."""
    if isinstance(v, bools()) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    try:
        v = float(v)
    except OverflowError:  # an int beyond float's range
        v = math.inf
    if not -math.inf < v < math.inf:  # NaN too; comparisons, which torch.compile traces
        raise ValueError(f"{name}: expected a number, finite, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    if non_negative and not v >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
    return float(v)


def flag(value, name: str) -> bool:
    """A bool (or numpy.bool_). Anything else raises: bool("False") is True,
    so coercing would silently turn a string or a tensor into the opposite
    of what was meant."""
    if not isinstance(value, bools()):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def choice(value, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, "
                         f"got {value!r}")
    return value


def backend(value) -> str:
    return choice(value, "backend", BACKENDS)


def fpr_values(levels, name: str = "fprs") -> tuple:
    """False-positive rates at which to read a ROC: numbers in (0, 1]."""
    expected = "a non-empty sequence of false-positive rates in (0, 1]"
    try:
        levels = tuple(float(f) for f in levels)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {expected}, got {levels!r}") from None
    if not levels or any(not 0 < f <= 1 for f in levels):
        raise ValueError(f"{name}: expected {expected}, got {levels!r}")
    return levels


# The smallest EKD FPR level: its divisor round(1/f) = 2^62 still fits the
# kernels' int64, and n_neg // q is already 0 (the hardest negative) for
# every batch; smaller levels would only overflow.
MIN_FPR_LEVEL = 2.0 ** -62


def fpr_levels(levels) -> tuple:
    """EKD's FPR levels: each f must give an integer divisor q = round(1/f) >= 2
    (SPEC §3.2), i.e. 0 < f < 2/3; above that the rank position n_neg // q
    would lie past the last negative pair. At least MIN_FPR_LEVEL."""
    expected = ("a non-empty sequence of FPR levels f with 2^-62 <= f < 2/3 (so that "
                "round(1/f) >= 2 fits an int64)")
    try:
        levels = tuple(float(f) for f in levels)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_levels: expected {expected}, got {levels!r}") from None
    if not levels or any(not (MIN_FPR_LEVEL <= f < 1) or round(1.0 / f) < 2 for f in levels):
        raise ValueError(f"fpr_levels: expected {expected}, got {levels!r}")
    return levels


def same_device(**named: Optional[Tensor]) -> None:
    present = {k: v for k, v in named.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def finite(**named: Optional[Tensor]) -> None:
    """With RELKD_CHECK_FINITE=1, NaN/Inf inputs raise instead of propagating."""
    if os.environ.get("RELKD_CHECK_FINITE", "0") != "1":
        return
    for name, t in named.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf (RELKD_CHECK_FINITE=1)")


def weight_list(weights: Iterable) -> list:
    out = []
    for i, w in enumerate(weights):
        w = tensor(w, f"weights[{i}]", "(F, ...)")
        if w.dim() < 2 or not w.is_floating_point():
            raise ValueError(f"weights[{i}]: expected a floating weight of shape (F, ...) "
                             f"with at least 2 dims, got {w.dtype} {tuple(w.shape)}")
        out.append(w)
    if not out:
        raise ValueError("weights: expected at least one Conv/Linear weight, got none")
    return out
