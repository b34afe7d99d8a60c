"""How modules that hold a torch.distributed process group pickle and copy.

A ProcessGroup is a live handle on communicators: it can be neither pickled
nor copied. The rule relkd follows:

- in memory, a module keeps the group object it was given;
- ``pickle`` (and ``torch.save`` of the whole module) stores the group by
  name: "WORLD" for the default group, else the group's ``group_name``;
- the unpickled module looks that name up in its own process the first time
  it needs the group (its first forward), so it may be unpickled before
  ``init_process_group``; if the group does not exist there, that lookup
  raises a ValueError naming ``process_group`` (set ``process_group`` to a
  group of this process, or to None for one process, to go on);
- ``copy.deepcopy`` shares the group object: the copy relates over the same
  ranks.

torch names the groups it creates by a counter or a hash of the ranks, the
same in every process that creates its groups in the same order, and never
"WORLD".
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

WORLD = "WORLD"
# What dist.new_group returns on ranks outside the new group (an int, -100):
# a module may hold it there (built alike on every rank) as long as it is
# not called with it; it pickles under this name, and unpickles to an error
# at the first forward (the marker names no group another process could find).
NON_MEMBER = "NON_GROUP_MEMBER"


def is_non_member(group) -> bool:
    return (dist.is_available() and isinstance(group, int) and not isinstance(group, bool)
            and group == dist.GroupMember.NON_GROUP_MEMBER)


def check_group(group) -> None:
    """A ValueError naming process_group unless it is None, a ProcessGroup,
    or this rank's NON_GROUP_MEMBER."""
    if group is None or is_non_member(group):
        return
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError("process_group: expected a torch.distributed ProcessGroup (e.g. "
                         "dist.group.WORLD or dist.new_group(ranks)) or None, got "
                         f"{type(group).__name__} {group!r:.60}")


def group_name(group: ProcessGroup) -> str:
    """The name a group is pickled under."""
    if dist.is_available() and dist.is_initialized() and group is dist.group.WORLD:
        return WORLD
    if is_non_member(group):
        return NON_MEMBER
    name = getattr(group, "group_name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"process_group: cannot pickle {group!r}: it has no group_name to "
                         "find it by after unpickling (expected a torch.distributed "
                         "ProcessGroup)")
    return name


def resolve_group_name(name: str) -> ProcessGroup:
    """The group of this process pickled under `name`, or a ValueError."""
    pickled = f"process_group: this module was pickled holding the process group {name!r}"
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{pickled}, but torch.distributed is not initialised in this process."
                         " Call init_process_group first, or set the module's process_group "
                         "(None runs on this process alone)")
    if name == WORLD:
        return dist.group.WORLD
    if name == NON_MEMBER:  # this rank's marker in the pickling process, not a group here
        raise ValueError(f"{pickled}: it was pickled on a rank outside that group, so which "
                         "group it was is not known here. Set the module's process_group "
                         "(None runs on this process alone)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"{pickled}, which does not exist in this process ({exc}). Create "
                         "the process groups in the same order as the process that pickled "
                         "it, or set the module's process_group") from None


class ProcessGroupHolder:
    """Mixin for an nn.Module with a ``process_group`` option (see the module
    docstring for how it pickles and copies). Put it before nn.Module."""

    _process_group: Optional[ProcessGroup] = None
    _process_group_name: Optional[str] = None  # set only by unpickling

    @property
    def process_group(self) -> Optional[ProcessGroup]:
        """The group the module relates over (None: the default group with
        gather=True, else this process alone)."""
        if self._process_group is None and self._process_group_name is not None:
            self._process_group = resolve_group_name(self._process_group_name)
            self._process_group_name = None
        return self._process_group

    @process_group.setter
    def process_group(self, group: Optional[ProcessGroup]) -> None:
        check_group(group)
        self._process_group = group
        self._process_group_name = None

    def _process_group_repr(self) -> Optional[str]:
        """The group's name for extra_repr, without looking it up."""
        if self._process_group is not None:
            return group_name(self._process_group)
        return self._process_group_name

    def __getstate__(self) -> Dict[str, Any]:
        """The module's state for pickle, the group replaced by its name."""
        state = super().__getstate__()
        group = state.pop("_process_group", None)
        if group is not None:
            state["_process_group_name"] = group_name(group)
        return state

    def __deepcopy__(self, memo: Dict[int, Any]) -> ProcessGroupHolder:
        """A deep copy that shares the process group (groups cannot be
        copied, and the copy relates over the same ranks)."""
        if self._process_group is not None:
            memo[id(self._process_group)] = self._process_group  # shared, not copied
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = super().__getstate__()  # the group object, not its name
        clone.__setstate__(copy.deepcopy(state, memo))
        return clone
