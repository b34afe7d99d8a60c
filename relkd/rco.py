"""Route-constrained optimisation (RCO): Jin et al., "Knowledge Distillation
via Route Constrained Optimization", ICCV 2019.

A student learns better from the teacher's training *route* than from the
converged teacher alone: RCO distils from a sequence of the teacher's
intermediate checkpoints ("anchor points"), easiest first, moving to the
next anchor as training proceeds. `RouteConstrainedTeacher` holds that
route and serves the current anchor teacher; its embeddings feed any relkd
loss as ``ft``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from . import _validation as check

Checkpoint = Union[str, "os.PathLike[str]", dict]


class RouteConstrainedTeacher(nn.Module):
    """Serves the teacher of the current stage of an RCO route.

    Jin et al., "Knowledge Distillation via Route Constrained Optimization",
    ICCV 2019. Call ``step()`` once per training step; calling the module
    runs the current anchor in eval mode without gradient. Checkpoints given
    as paths are loaded when their stage begins, so only one is in memory
    at a time.

    Args:
        teacher: an nn.Module with the teacher's architecture (deep-copied;
            its parameters are frozen).
        checkpoints: the route, in training order: a list of state_dicts or
            paths to them (str or os.PathLike; torch.save files, checked to
            exist at construction; a dict with a "state_dict" or "model" key
            also works). At least one.
        total_steps: the student's planned number of steps, for the default
            equal-interval schedule: anchor a of A serves the integer steps
            in [a * total_steps / A, (a + 1) * total_steps / A).
        switch_steps: instead (not beside total_steps), the A - 1
            increasing steps at which to move to the next anchor.

    ``state_dict()`` holds the current anchor's weights and the step and
    stage, so a run resumed from it continues at the same point of the
    route; loading a state saved with another route length or schedule
    raises.

    Forward: the teacher's own arguments, passed through; returns what the
    teacher returns (e.g. (N, D) embeddings for any relkd loss's ft).
    """

    def __init__(self, teacher: nn.Module, checkpoints: Sequence[Checkpoint],
                 total_steps: Optional[int] = None,
                 switch_steps: Optional[Sequence[int]] = None):
        """Checks the route (ValueError naming the argument) and loads the
        first anchor; see the class docstring for each argument."""
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
        self.checkpoints = self._route(checkpoints)
        self.switch_steps = self._schedule(len(self.checkpoints), total_steps, switch_steps)
        self._total_steps = None if switch_steps is not None else total_steps
        self.teacher = copy.deepcopy(teacher)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.step_count = 0
        self.stage = -1
        self._enter_stage(self.stage_at(0))

    @staticmethod
    def _route(checkpoints) -> list:
        """The checkpoints as a list of state_dicts and path strings. A single
        path or state_dict is refused (list() would split it into characters
        or keys); paths must exist now, not when their stage begins hours
        into a run."""
        if isinstance(checkpoints, (str, os.PathLike, Mapping)):
            raise ValueError("checkpoints: expected a list of checkpoints (state_dicts or "
                             f"paths), got a single {type(checkpoints).__name__}; wrap it in "
                             "a list")
        route = []
        for i, state in enumerate(checkpoints):
            if isinstance(state, (str, os.PathLike)):
                path = os.fspath(state)
                if not os.path.isfile(path):
                    raise ValueError(f"checkpoints[{i}]: no such file: {path!r}")
                route.append(path)
            elif isinstance(state, Mapping):
                route.append(state)
            else:
                raise ValueError(f"checkpoints[{i}]: expected a state_dict or a path, got "
                                 f"{type(state).__name__}")
        if not route:
            raise ValueError("checkpoints: expected at least one teacher checkpoint")
        return route

    @staticmethod
    def _schedule(anchors: int, total_steps: Optional[int],
                  switch_steps: Optional[Sequence[int]]) -> List[int]:
        if switch_steps is not None:
            if total_steps is not None:
                raise ValueError("total_steps: the equal-interval schedule's length, unused "
                                 "beside switch_steps; give one of them")
            steps = [check.non_negative_int(s, "switch_steps") for s in switch_steps]
            if len(steps) != anchors - 1 or steps != sorted(steps):
                raise ValueError(f"switch_steps: expected {anchors - 1} increasing steps "
                                 f"(one per checkpoint after the first), got {list(steps)}")
            return steps
        if total_steps is not None:  # a plain int: numpy ints would reach the state_dict
            total_steps = check.positive_int(total_steps, "total_steps")
        if anchors == 1:
            return []
        if total_steps is None:
            raise ValueError("total_steps: required for the equal-interval schedule "
                             "(or give switch_steps)")
        # Anchor a starts at the first integer step >= a * total_steps / A.
        return [-(-a * total_steps // anchors) for a in range(1, anchors)]

    def stage_at(self, step: int) -> int:
        """Index of the anchor that serves training step `step`."""
        return sum(step >= s for s in self.switch_steps)

    def _enter_stage(self, stage: int) -> None:
        if stage == self.stage:
            return
        state = self.checkpoints[stage]
        if isinstance(state, str):
            state = torch.load(state, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
        self.teacher.load_state_dict(state)
        self.teacher.eval()
        self.stage = stage

    def step(self) -> None:
        """Advance one training step, switching anchors on schedule."""
        self.step_count += 1
        self._enter_stage(min(self.stage_at(self.step_count), len(self.checkpoints) - 1))

    # The step and stage travel with the weights in state_dict(): without them
    # a resumed run would restart at stage 0 holding the last stage's weights
    # and later switch back to an earlier teacher.
    def get_extra_state(self) -> dict:
        return {"step_count": self.step_count, "stage": self.stage,
                "anchors": len(self.checkpoints), "switch_steps": list(self.switch_steps)}

    def set_extra_state(self, state: dict) -> None:
        route = (len(self.checkpoints), list(self.switch_steps))
        saved = (state["anchors"], [int(s) for s in state["switch_steps"]])
        if saved != route and saved == (route[0], self._rounded_schedule()):
            # Saved by relkd 0.2.0, whose equal intervals rounded a T / A to
            # the nearest step: the run continues on the schedule it began.
            self.switch_steps = saved[1]
        elif saved != route:
            raise ValueError(f"state_dict: saved for a route of {saved[0]} anchors switching at "
                             f"{saved[1]}, but this one has {route[0]} switching at {route[1]}; "
                             f"to resume that run, pass switch_steps={saved[1]} (without "
                             "total_steps)")
        self.step_count = int(state["step_count"])
        # The anchor's weights are loaded from the same state_dict.
        self.stage = int(state["stage"])

    def _rounded_schedule(self) -> Optional[List[int]]:
        """The equal-interval schedule as relkd 0.2.0 computed it (round, not
        ceil), for states saved by that version; None without total_steps."""
        anchors, total = len(self.checkpoints), self._total_steps
        if total is None:
            return None
        return [round(a * total / anchors) for a in range(1, anchors)]

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The current anchor teacher's output for these inputs."""
        self.teacher.eval()
        return self.teacher(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"anchors={len(self.checkpoints)}, stage={self.stage}, "
                f"step={self.step_count}, switch_steps={self.switch_steps}")
