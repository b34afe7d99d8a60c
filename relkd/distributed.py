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

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validation as check


def resolve_group(process_group=None, gather: bool = False):
    """The process group a loss relates over, or None for a single process."""
    if process_group is None and not check.flag(gather, "gather"):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group / gather=True: torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    group = process_group if process_group is not None else dist.group.WORLD
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


def _gather_sizes(n: int, group, device: Optional[torch.device] = None) -> List[int]:
    """Every rank's row count. Under torch.compile the ranks' counts must be
    equal (DistributedSampler gives equal shards): a count read from another
    rank is data the graph cannot specialise on, so the compiled graph takes
    n on every rank and checks at run time that it holds."""
    dev = _comm_device(group, device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=dev), group=group)
    if torch.compiler.is_compiling():
        # On the host: a failed device-side assert would poison the CUDA context.
        torch._assert_async(torch.cat(sizes).cpu().eq(n).all(), UNEQUAL_SHARDS)
        return [n] * world
    return [int(s) for s in sizes]


UNEQUAL_SHARDS = ("relkd under torch.compile with process_group / gather=True needs the same "
                  "batch size on every rank (e.g. DistributedSampler, drop_last=True)")


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
    sizes = sizes if sizes is not None else _gather_sizes(x.shape[0], group, x.device)
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGatherWithGrad.apply(x, group, sizes)
    return _all_gather_rows(x, sizes, group)


def gather_rows(x: Tensor, group) -> Tensor:
    """Rows of x from every rank in rank order, without gradient."""
    return _all_gather_rows(x, _gather_sizes(x.shape[0], group, x.device), group)


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


def global_batch(fs: Tensor, ft: Tensor, y: Optional[Tensor], group) -> GlobalBatch:
    """Gathers fs (with grad), ft (with grad if it requires it) and y."""
    if group is None:
        return GlobalBatch(fs, ft, y, fs, ft, y, 0, None)
    sizes = _gather_sizes(fs.shape[0], group, fs.device)
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
    all_gather_with_grad = torch.compiler.disable(all_gather_with_grad)  # always a collective
    gather_rows = torch.compiler.disable(gather_rows)
    all_reduce_with_grad = torch.compiler.disable(all_reduce_with_grad)
    all_reduce_sum = _eager_with_group(all_reduce_sum, 1)
    global_batch = _eager_with_group(global_batch, 3)
