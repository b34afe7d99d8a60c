"""Memory banks for RAD's bank mode (SPEC §2).

`PrototypeBank` keeps one teacher prototype per identity, an EMA of the
teacher's normalised embeddings of that identity, as CoupleFace-style banks
do; pass ``prototypes, ids = bank.active()`` as ``bank=prototypes,
bank_labels=ids`` (the identities seen so far; unseen ones hold zero rows
that must not be mined) to RADLoss so every face
is related to the identities it is most confused with, not only to the few
in its batch.

`hardest_identities` is the offline step for ``indices=`` mode: each
identity's k most similar other identities among (up to millions of)
prototypes, by exact search in chunks; index it with the batch labels,
``indices = hard[y]``, to skip mining during training.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validation as check
from . import ops
from ._common import compute_dtype, normalize
from ._group_state import ProcessGroupHolder
from .distributed import fail_together, gather_rows, resolve_group
from .functional import similarity_topk
from .reference import EPS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class PrototypeBank(ProcessGroupHolder, nn.Module):
    """Teacher class prototypes, updated by label with an EMA: the bank of
    RADLoss's bank mode (SPEC §2), as CoupleFace (Liu et al., ECCV 2022)
    relates each face to the identities it is most confused with.

    ``update(ft, y)`` moves the prototype of every identity in the batch to
    ``normalize(momentum * old + (1 - momentum) * mean of its normalised
    embeddings)``; an identity's first batch sets it directly. Under DDP
    (process_group / gather=True) the update uses the global batch, so
    every rank holds the same bank.

    Args:
        num_classes: number of identities C (int >= 1).
        dim: embedding dim D of the teacher (int >= 1).
        momentum: EMA weight of the old prototype, in [0, 1) (default 0.9).
        process_group: update from the global batch of this
            torch.distributed group (pickled by name, shared by deepcopy,
            as the losses' process_group).
        gather: True: the same over the default group.
        device: where the buffers live (default: torch's default device).
        dtype: floating dtype of the prototypes (default float32).

    Buffers (in state_dict): prototypes (C, D), unit rows, zero rows for
    identities not seen yet; seen (C,) bool; labels: arange(C).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, *,
                 process_group: Optional[ProcessGroup] = None, gather: bool = False,
                 device: Optional[Union[torch.device, str, int]] = None,
                 dtype: torch.dtype = torch.float32):
        """Checks the options (ValueError naming the option); see the class
        docstring for each argument."""
        super().__init__()
        check.positive_int(num_classes, "num_classes")
        check.positive_int(dim, "dim")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype for the prototypes, got {dtype!r}")
        self.momentum = check.number(momentum, "momentum")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.process_group, self.gather = process_group, check.flag(gather, "gather")
        self.register_buffer("prototypes", torch.zeros(num_classes, dim, device=device,
                                                       dtype=dtype))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool, device=device))
        self.register_buffer("labels", torch.arange(num_classes, device=device))

    @torch.no_grad()
    @fail_together(lambda self, ft, y: (self.process_group, self.gather, ft))
    def update(self, ft: Tensor, y: Tensor) -> None:
        """Moves the prototypes of the identities in y (N,) towards the
        teacher embeddings ft (N, D) of their faces (no gradient)."""
        num_classes, dim = self.prototypes.shape
        ft = check.embeddings(ft, "ft", dim=None)
        if ft.shape[1] != dim:
            raise ValueError(f"ft: expected shape (N, {dim}) to match the bank, "
                             f"got {tuple(ft.shape)}")
        check.labels(y, "y", ft.shape[0])
        check.same_device(ft=ft, y=y, bank=self.prototypes)
        check.finite(ft=ft)  # a NaN would stay in the persistent prototypes
        if ft.shape[0] and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y: labels must lie in [0, {num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")
        group = resolve_group(self.process_group, self.gather)
        if group is not None:
            call = dict(loss="PrototypeBank.update", num_classes=num_classes, dim=dim,
                        momentum=self.momentum)
            ft, y = gather_rows(ft.detach(), group, "ft", call), gather_rows(y, group, "y")
        z = normalize(ft.detach(), self.prototypes.dtype)
        # Only the identities of this batch are touched: O(batch * dim), not
        # a bank-sized temporary per call (a million classes cost nothing more).
        ids, slot = torch.unique(y.long(), return_inverse=True)
        sums = z.new_zeros(len(ids), dim).index_add_(0, slot, z)
        counts = torch.bincount(slot, minlength=len(ids)).to(z.dtype)
        means = sums / counts[:, None]
        keep = torch.where(self.seen[ids, None], self.momentum, 0.0).to(z.dtype)
        self.prototypes[ids] = F.normalize(keep * self.prototypes[ids] + (1 - keep) * means,
                                           dim=1, eps=EPS)
        self.seen[ids] = True

    def active(self) -> Tuple[Tensor, Tensor]:
        """(prototypes, labels) of the identities seen so far: the bank to pass
        to RADLoss (bank=..., bank_labels=...). Unseen identities have no
        prototype yet and must not be mined."""
        if bool(self.seen.all()):
            return self.prototypes, self.labels
        return self.prototypes[self.seen], self.labels[self.seen]

    def extra_repr(self) -> str:
        c, d = self.prototypes.shape
        text = f"num_classes={c}, dim={d}, momentum={self.momentum}, gather={self.gather}"
        group = self._process_group_repr()
        return text if group is None else f"{text}, process_group={group!r}"


@torch.no_grad()
def hardest_identities(prototypes: Tensor, k: int, *, chunk_size: int = 4096,
                       path: Optional[str] = None, backend: str = "auto") -> Tensor:
    """For every identity, the k most similar other identities by cosine
    similarity of the prototypes (C, D): a (C, k) int64 tensor, -1 where
    fewer than k exist. All-zero rows (identities a PrototypeBank has not
    seen yet) are no identity: they are never chosen, and their own rows are
    all -1. On CPU with the extension, one symmetric search computes each
    similarity once (about half the time of a search per row), keeping 2k
    candidates per prototype (32 k bytes each; above
    SYMMETRIC_SEARCH_MAX_BYTES in all, and on other devices, it searches in
    chunks instead). Chunked searches run `chunk_size` rows at a time against
    all prototypes, peak memory O(chunk_size * k) beyond the prototypes. With `path`,
    the result is also written with torch.save. backend: as
    similarity_topk's ("auto", "fused" or "reference")."""
    prototypes = check.embeddings(prototypes, "prototypes")
    check.positive_int(k, "k")
    check.positive_int(chunk_size, "chunk_size")
    check.backend(backend)
    check.finite(prototypes=prototypes)
    n = prototypes.shape[0]
    present = (prototypes != 0).any(dim=1)
    ids = torch.nonzero(present).flatten()  # bank rows that hold a prototype
    bank = prototypes[ids] if len(ids) < n else prototypes
    out = torch.full((n, k), -1, dtype=torch.long, device=prototypes.device)
    if _symmetric_search_applies(bank, k, backend):
        # One search over all prototypes computing each similarity once.
        _, idx = ops.topk_sim_symmetric(normalize(bank, compute_dtype(bank)), k)
        out[ids] = torch.where(idx >= 0, ids[idx.clamp(min=0)], idx)
    else:
        for lo in range(0, len(ids), chunk_size):
            rows = ids[lo:lo + chunk_size]
            # Labels = identity ids exclude each query's own row from the candidates.
            _, idx = similarity_topk(prototypes[rows], bank, k, rows, ids, backend=backend)
            out[rows] = torch.where(idx >= 0, ids[idx.clamp(min=0)], idx)
    if path is not None:
        torch.save(out.cpu(), path)
    return out


# Candidate memory of the symmetric search (2k (value, index) pairs per
# prototype) beyond which hardest_identities searches in chunks instead.
SYMMETRIC_SEARCH_MAX_BYTES = 2 << 30


def _symmetric_search_applies(bank: Tensor, k: int, backend: str) -> bool:
    """The CPU kernel's symmetric search (topk_sim_symmetric) computes each
    similarity once instead of twice, but keeps every prototype's candidates
    for the whole search: used on CPU with the extension, unless backend is
    "reference" or those candidates would exceed SYMMETRIC_SEARCH_MAX_BYTES."""
    if backend == "reference" or bank.device.type != "cpu" or not ops.HAS_EXTENSION:
        return False
    return bank.shape[0] * 2 * k * 16 <= SYMMETRIC_SEARCH_MAX_BYTES
