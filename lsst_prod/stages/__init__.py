"""Pipeline stages, in execution order.  Adding a stage: one kernel module, one stage module, tests."""

from __future__ import annotations

from .base import Stage
from .single_frame import SingleFrameStage

#: Stage name -> class, in pipeline order (the planner enumerates them in this order).
STAGES: dict[str, type[Stage]] = {
    SingleFrameStage.name: SingleFrameStage,
}
