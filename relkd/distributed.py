"""Global-batch relations under torch.distributed (SPEC §8).

With ``process_group=`` (or ``gather=True`` under an initialised default
group) a batch-relation loss relates each rank's rows to the columns of the
whole global batch. The fused path computes local rows x global columns; the
reference path computes the single-process loss on the gathered batch and
returns 1/world of it. Either way each rank returns its *share*: the shares
sum to the single-process loss, and each rank's gradient for its own rows is
the single-process gradient.

DDP averages parameter gradients over ranks, so a training loop that wants
the exact global-batch gradient multiplies the share by the world size.
"""
from __future__ import annotations

import contextvars
import functools
import math
import numbers
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validation as check
from ._group_state import check_group, is_non_member


def resolve_group(process_group=None, gather: bool = False):
    """The process group a loss relates over, or None for a single process."""
    if process_group is None and not check.flag(gather, "gather"):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group / gather=True: torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    group = process_group if process_group is not None else dist.group.WORLD
    check_group(group)
    if is_non_member(group):
        raise ValueError(f"process_group: this rank (global rank {dist.get_rank()}) is not a "
                         "member of the group (dist.new_group returned NON_GROUP_MEMBER here); "
                         "call the loss without process_group on ranks outside the group")
    return group if dist.get_world_size(group) > 1 else None


# torch.compile of the gathers' and all-reduces' backward: tested exact with
# torch 2.13; torch 2.11 compiles it to wrong gradients (measured: every
# batch-relation loss, with and without fullgraph). Before 2.13 the
# collectives are therefore kept out of compiled graphs (the end of this
# module): a plain compile runs them eagerly between graphs, exact, and
# fullgraph=True fails instead of computing a wrong gradient.
COMPILED_COLLECTIVES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)


_BACKEND_DEVICES = {"gloo": "cpu", "nccl": "cuda"}


def _backend_device_types(group) -> Dict[str, str]:
    """Device type -> backend of a group: "gloo" -> {cpu: gloo}, "nccl" ->
    {cuda: nccl}, "cpu:gloo,cuda:nccl" -> both. Other backends (MPI, UCC, ...)
    are taken to serve every device: {} here."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:
        return dict(part.split(":", 1) for part in backend.split(","))
    device = _BACKEND_DEVICES.get(backend)
    return {device: backend} if device else {}


def _comm_device(group, device: Optional[torch.device] = None) -> torch.device:
    """Where collectives of this group take tensors that live on `device`:
    that device where the group has a backend for its type, else the device
    the group's backend serves (the CPU for gloo, the current GPU for NCCL).
    Every relkd collective goes through here, so CPU tensors on NCCL, CUDA
    tensors on gloo and mixed "cpu:gloo,cuda:nccl" groups all work."""
    device = torch.device("cpu") if device is None else torch.device(device)
    served = _backend_device_types(group)
    if not served or device.type in served:
        return device
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(next(iter(served)))


# What a rank's row-count exchange carries beside its count and its call's
# options (_call_code): for up to _SLOTS tensors about to be gathered,
# (ndim, values per row, dtype code), so that ranks whose batches differ in
# feature dim or dtype raise a ValueError instead of handing the gather
# mismatched buffers (gloo aborts the process; NCCL's behaviour is
# undefined). Fixed length: a rank that rejected its inputs (fail_together)
# sends it without knowing what the others gather.
_SLOTS = 3
_ABSENT = (0, 0, 0)


# Codes by name: the same in every process of one torch version.
_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)
_DTYPE_CODES = {d: code for code, d in enumerate(_DTYPES, start=1)}


def _signature(x: Optional[Tensor]) -> tuple:
    if x is None:
        return _ABSENT
    return x.dim(), math.prod(x.shape[1:]), _DTYPE_CODES.get(x.dtype, -1)


def _exchange_sizes(n: int, group, device: Optional[torch.device],
                    tensors: Sequence[Optional[Tensor]] = (), call_code: int = 0) -> Tensor:
    """(world, 2 + 3 * _SLOTS) int64 on the host: every rank's row count,
    the code of its call's options (_call_code) and its tensors' signatures."""
    dev = _comm_device(group, device)
    own = [n, call_code] + [v for i in range(_SLOTS)
                            for v in (_signature(tensors[i]) if i < len(tensors) else _ABSENT)]
    rows = [torch.zeros(len(own), dtype=torch.long, device=dev)
            for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, torch.tensor(own, dtype=torch.long, device=dev), group=group)
    return torch.stack(rows).cpu()


def _compiled_exchange(n: int, group, device: Optional[torch.device],
                       tensors: Sequence[Optional[Tensor]] = ()) -> Tensor:
    """_exchange_sizes inside a compiled graph (options code 0), checked on
    the host for a rank that rejected its inputs (a failed device-side assert
    would poison the CUDA context)."""
    table = _exchange_sizes(n, group, device, tensors)
    torch._assert_async((table[:, 0] != _REJECTED).all(), SOME_REJECTED)
    return table


def _call_code(call: Optional[dict]) -> int:
    """A number for a call's options, the same in every process: ranks that
    call a loss with different options (k, fused or reference, train/eval,
    ...) run different collectives, which abort, hang or pair up wrongly.
    Only plain values: a bank (too large to hash at every call) and EKD's
    anchors (state; DDP's buffer broadcast keeps it in step) are not compared."""
    if not call:
        return 0
    text = repr([(k, _canonical(v)) for k, v in call.items()])
    return zlib.crc32(text.encode()) + 1  # never 0, the code of "no options"


def _canonical(v):
    """v as the loss reads it: every real number a float (0, 0.0 and
    numpy's 0.0 are one option), numpy's bools Python's."""
    if isinstance(v, check.bools()):  # numpy's too, as check.flag takes them
        return bool(v)
    if isinstance(v, str) or v is None:
        return v
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (tuple, list)):
        return tuple(_canonical(x) for x in v)
    return repr(v)


def _describe_call(call: dict) -> str:
    name, *options = call.items()
    return f"{name[1]}(" + ", ".join(f"{k}={v!r}" for k, v in options) + ")"


def _gather_sizes(n: int, group, device: Optional[torch.device] = None,
                  named: Sequence[Tuple[str, Optional[Tensor]]] = (),
                  call: Optional[dict] = None) -> List[int]:
    """Every rank's row count: the first collective of every relkd call
    that has collectives (see fail_together). `named`: the (argument name,
    tensor) about to be gathered, whose feature shape and dtype every rank
    must share; `call`: {"loss": name, option: value, ...}, which every rank
    must share too (checked in eager mode; a compiled graph holds its
    options as constants). Under torch.compile the ranks' counts must be equal
    (DistributedSampler gives equal shards): a count read from another rank
    is data the graph cannot specialise on, so the compiled graph takes n on
    every rank and checks at run time that it holds."""
    assert len(named) <= _SLOTS
    tensors = [t for _, t in named]
    if torch.compiler.is_compiling():
        table = _compiled_exchange(n, group, device, tensors)
        # Column 1 (the options code) is 0 here and the call's code on an eager
        # rank: not compared under compile (see the eager branch).
        shape = torch.cat([table[:, :1], table[:, 2:]], dim=1)
        torch._assert_async((shape == shape[dist.get_rank(group)]).all(), UNEQUAL_SHARDS)
        return [n] * table.shape[0]
    pending = _BEFORE_FIRST_COLLECTIVE.get()
    if pending:  # reached: an error from here on (this gather's included) is not the inputs'
        pending[0] = False
    table = _exchange_sizes(n, group, device, tensors, _call_code(call)).tolist()
    rejected = [rank for rank, row in enumerate(table) if row[0] == _REJECTED]
    if rejected:
        raise RuntimeError(f"relkd: rank(s) {rejected} {REJECTED}")
    own = table[dist.get_rank(group)][1]
    # 0: a compiled rank (whose options are constants of its graph) or a call
    # without options: not compared.
    other = [rank for rank, row in enumerate(table) if own and row[1] and row[1] != own]
    if other:
        raise ValueError(
            f"{call['loss'] if call else 'relkd'}: rank(s) {other} of the process group called "
            "it with other options than this rank (every rank must pass the same options, "
            f"backend and train/eval mode); this rank: {_describe_call(call) if call else '-'}")
    for slot, (name, _) in enumerate(named):
        signatures = [tuple(row[2 + 3 * slot: 5 + 3 * slot]) for row in table]
        if len(set(signatures)) > 1:
            raise ValueError(f"{name}: the ranks of the process group must pass the same "
                             "feature shape and dtype, got " + ", ".join(
                                 f"rank {rank}: {_describe(sig)}"
                                 for rank, sig in enumerate(signatures)))
    return [row[0] for row in table]


def _describe(signature: tuple) -> str:
    ndim, per_row, code = signature
    if signature == _ABSENT:
        return "None"
    dtype = str(_DTYPES[code - 1]) if 1 <= code <= len(_DTYPES) else "unknown dtype"
    shape = "(rows,)" if ndim == 1 else f"(rows, {per_row})" if ndim == 2 else \
        f"{ndim} dims, {per_row} values per row"
    return f"{shape} {dtype}"


# A rank whose inputs fail validation raises before its first collective and
# would leave the other ranks waiting in it until the group's timeout (a hang
# of minutes). So the first collective of every relkd call that has any is
# the row-count gather, and a rank that fails before it still takes part in
# it, with the count _REJECTED, before raising its own error: the other ranks
# read that count and raise too, and every rank has run the same collectives
# (the group stays usable for the next step). Eager mode only: a check that
# raises inside a compiled function still leaves the others waiting (where
# Dynamo falls back to eager for the failing call, the others' compiled
# exchange sees the rejection and raises).
_REJECTED = -1
_BEFORE_FIRST_COLLECTIVE = contextvars.ContextVar("relkd_before_first_collective",
                                                   default=None)


def fail_together(group_args: Callable):
    """Decorates a relkd entry point whose first collective under a group is
    _gather_sizes; group_args(*args, **kwargs) -> (process_group, gather,
    a tensor argument or None) names its group and where its tensors live.
    A nested entry point (CoupleFace's RAD, then its FCD) joins the outer
    call's watch while that has not reached its exchange yet, and keeps its
    own after: each exchange is answered once."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():  # first: Dynamo cannot trace ContextVar.get
                return fn(*args, **kwargs)
            outer = _BEFORE_FIRST_COLLECTIVE.get()
            if outer is not None and outer[0]:
                return fn(*args, **kwargs)
            pending = [True]
            token = _BEFORE_FIRST_COLLECTIVE.set(pending)
            try:
                return fn(*args, **kwargs)
            except Exception:
                if pending[0]:
                    _reject_on_peers(group_args, args, kwargs)
                raise
            finally:
                _BEFORE_FIRST_COLLECTIVE.reset(token)

        return call

    return wrap


def _reject_on_peers(group_args: Callable, args, kwargs) -> None:
    """Takes part in the row-count gather with _REJECTED, if there is a group.
    Never raises: the caller's own error is the one to report."""
    try:
        process_group, gather, like = group_args(*args, **kwargs)
        group = resolve_group(process_group, gather)
        if group is not None:
            _exchange_sizes(_REJECTED, group, like.device if isinstance(like, Tensor) else None)
    except Exception:  # noqa: BLE001 (e.g. no group at all: an error alike on every rank)
        pass


REJECTED = ("of the process group rejected their inputs (the error raised there says "
            "why); this rank stops too instead of waiting for them in the next collective")
SOME_REJECTED = "relkd: rank(s) " + REJECTED  # the compiled check cannot say which
UNEQUAL_SHARDS = ("relkd under torch.compile with process_group / gather=True needs the same "
                  "batch size on every rank (e.g. DistributedSampler, drop_last=True), "
                  "and the same feature shapes and dtypes")


def _summed_over_ranks(x: Tensor, group) -> Tensor:
    """A new tensor holding x summed over the ranks (x itself is not touched,
    even where the collective runs on x's own device)."""
    out = x.detach().to(_comm_device(group, x.device), copy=True)
    dist.all_reduce(out, group=group)
    return out.to(x.device)


def _all_gather_rows(x: Tensor, sizes: List[int], group) -> Tensor:
    """Concatenation over ranks of x (rows may differ per rank)."""
    dev = _comm_device(group, x.device)
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


def share_of_mean(local_mean: Tensor, n_local: int, group,
                  call: Optional[dict] = None) -> Tensor:
    """This rank's share of a mean over the global batch (SPEC §8): the local
    mean times n_local / n_global, so that the shares sum to the global mean."""
    if group is None:
        return local_mean
    if torch.compiler.is_compiling():  # the counts summed in the graph: any shard sizes
        counts = _compiled_exchange(n_local, group, local_mean.device)[:, 0]
        n_all = counts.sum().clamp(min=1).to(local_mean.device, local_mean.dtype)
        return local_mean * (n_local / n_all)
    # Eager: the row-count exchange, the first collective (fail_together).
    n_all = sum(_gather_sizes(n_local, group, local_mean.device, call=call))
    return local_mean * (n_local / max(n_all, 1))


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, sizes: List[int]) -> Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank holds the gradient of its own loss share with respect to
        # all rows; the gradient of the summed shares is their sum. The sum
        # is itself differentiable, for a double backward (create_graph=True).
        total = all_reduce_with_grad(grad, ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start:start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(x: Tensor, group=None, sizes: Optional[List[int]] = None) -> Tensor:
    """Rows of x from every rank, concatenated in rank order, differentiable:
    the backward sums the column gradients of all ranks into each rank's rows.
    Ranks may hold different numbers of rows (`sizes`, gathered if None)."""
    group = group if group is not None else dist.group.WORLD
    sizes = sizes if sizes is not None else _gather_sizes(x.shape[0], group, x.device,
                                                          [("x", x)])
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGatherWithGrad.apply(x, group, sizes)
    return _all_gather_rows(x, sizes, group)


def gather_rows(x: Tensor, group, name: str = "x", call: Optional[dict] = None) -> Tensor:
    """Rows of x from every rank in rank order, without gradient (`name`:
    x's argument name, for the error where ranks differ in its shape or
    dtype; `call`: as _gather_sizes)."""
    sizes = _gather_sizes(x.shape[0], group, x.device, [(name, x)], call)
    return _all_gather_rows(x, sizes, group)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _summed_over_ranks(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_with_grad(grad, ctx.group), None


def all_reduce_with_grad(x: Tensor, group) -> Tensor:
    """Sum of x over ranks; the gradient of every rank's share reaches every
    rank's x (used for global normalisers that depend on the student, RKD's mu)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceWithGrad.apply(x, group)
    return _summed_over_ranks(x, group)


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Sum of a no-grad tensor over ranks (None group: x itself)."""
    return x if group is None else _summed_over_ranks(x, group)


@dataclass
class GlobalBatch:
    """A rank's rows and the global batch they relate to. Single process:
    the columns are the rows and offset is 0."""

    fs: Tensor
    ft: Tensor
    y: Optional[Tensor]
    fs_all: Tensor
    ft_all: Tensor
    y_all: Optional[Tensor]
    offset: int
    group: object = None

    @property
    def n_global(self) -> int:
        return self.fs_all.shape[0]

    @property
    def world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)


def global_batch(fs: Tensor, ft: Tensor, y: Optional[Tensor], group,
                 call: Optional[dict] = None) -> GlobalBatch:
    """Gathers fs (with grad), ft (with grad if it requires it) and y;
    `call`: the loss's options, which every rank must share (_gather_sizes)."""
    if group is None:
        return GlobalBatch(fs, ft, y, fs, ft, y, 0, None)
    sizes = _gather_sizes(fs.shape[0], group, fs.device, [("fs", fs), ("ft", ft), ("y", y)],
                          call)
    offset = sum(sizes[: dist.get_rank(group)])
    fs_all = all_gather_with_grad(fs, group, sizes)
    ft_all = all_gather_with_grad(ft, group, sizes)
    y_all = None if y is None else _all_gather_rows(y, sizes, group)
    return GlobalBatch(fs, ft, y, fs_all, ft_all, y_all, offset, group)


def _eager_with_group(fn, group_at: int):
    """fn, kept out of compiled graphs when given a group (argument group_at):
    without one (a single process) it stays traceable, no graph break."""
    eager = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = kwargs["group"] if "group" in kwargs else args[group_at]
        return fn(*args, **kwargs) if group is None else eager(*args, **kwargs)

    return call


if not COMPILED_COLLECTIVES:  # see COMPILED_COLLECTIVES
    _exchange_sizes = torch.compiler.disable(_exchange_sizes)  # always a collective
    all_gather_with_grad = torch.compiler.disable(all_gather_with_grad)  # always a collective
    gather_rows = torch.compiler.disable(gather_rows)
    all_reduce_with_grad = torch.compiler.disable(all_reduce_with_grad)
    all_reduce_sum = _eager_with_group(all_reduce_sum, 1)
    global_batch = _eager_with_group(global_batch, 3)
