"""Pipeline stages, in execution order.  Adding a stage: one kernel module, one stage module, tests.

Stage classes are imported on first use, so planning, reports and ``--help``
do not pay for the numerical libraries.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

from .base import Stage

#: Stage name -> "module:Class", in pipeline order (the planner enumerates them in this order).
_STAGE_PATHS: dict[str, str] = {
    "single_frame": "lsst_prod.stages.single_frame:SingleFrameStage",
    "visit_summary": "lsst_prod.stages.visit_summary:VisitSummaryStage",
    "relcal": "lsst_prod.stages.relcal:RelcalStage",
    "warp": "lsst_prod.stages.coadd:WarpStage",
    "coadd": "lsst_prod.stages.coadd:CoaddStage",
    "objects": "lsst_prod.stages.objects:ObjectsStage",
    "forced": "lsst_prod.stages.objects:ForcedStage",
}


class _StageRegistry(MutableMapping[str, type[Stage]]):
    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, type[Stage]] = {}

    def __getitem__(self, name: str) -> type[Stage]:
        if name not in self._loaded:
            module, cls = self._paths[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), cls)
        return self._loaded[name]

    def __setitem__(self, name: str, cls: type[Stage]) -> None:
        self._paths[name] = f"{cls.__module__}:{cls.__qualname__}"
        self._loaded[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._paths[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


STAGES = _StageRegistry(_STAGE_PATHS)
