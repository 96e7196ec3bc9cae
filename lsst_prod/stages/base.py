"""What a stage is: quantum dimensions, inputs/outputs, resources and run_quantum.

A stage declares how its quanta are enumerated (``plan``) and what each one
reads and writes, so the planner builds the graph without running anything.
``run_quantum`` is thin: read inputs -> pure kernel -> write outputs through
the :class:`QuantumContext`, which writes atomically and remembers every ref.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config.stages import StageConfig
from ..repo import DataId, DatasetRef, Repository

if TYPE_CHECKING:
    from ..graph.planner import PlanningContext


@dataclass(frozen=True)
class Resources:
    """What one quantum of a stage needs (the site maps it onto executors)."""

    cores: int = 1
    memory_gib: float = 2.0
    walltime_s: int = 1800
    mpi_ranks: int = 0  # 0 = not an MPI stage


@dataclass(frozen=True)
class QuantumSpec:
    """A planned unit of work: stage x data ID with the datasets it reads and writes."""

    stage: str
    data_id: DataId
    inputs: tuple[tuple[str, DataId], ...]
    outputs: tuple[tuple[str, DataId], ...]

    @property
    def quantum_id(self) -> str:
        return f"{self.stage}:{self.data_id}"


@dataclass
class QuantumContext:
    """Everything a running quantum may touch: its inputs, its output run, its config."""

    repo: Repository
    run: str
    stage: str
    data_id: DataId
    config: StageConfig
    inputs: dict[tuple[str, DataId], DatasetRef]
    release_id: int
    attempt: int = 1
    log: logging.LoggerAdapter | None = None
    comm: Any = None  # mpi4py communicator for MPI stages (rank 0 writes outputs)
    extra: dict[str, Any] = field(default_factory=dict)  # campaign context: sky map config, bands
    outputs: list[DatasetRef] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    #: inputs the stage itself set aside for what they contain (too few stars...), as opposed to
    #: ``left_out`` (their producer failed): recorded in the attempt's summary, shown by ``report``;
    #: ``restart`` does not re-run the quantum for them (the same data would be set aside again)
    excluded: list[dict[str, Any]] = field(default_factory=list)

    def input_ref(self, dataset_type: str, data_id: Mapping[str, Any] | None = None) -> DatasetRef:
        """The ref of one input; ``data_id`` may be omitted when there is one of that type."""
        matches = [ref for (t, d), ref in self.inputs.items() if t == dataset_type]
        if data_id is not None:
            want = DataId(data_id)
            matches = [ref for ref in matches if ref.data_id == want.subset(list(ref.data_id))]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} inputs of type {dataset_type} for {self.data_id} (expected 1)")
        return matches[0]

    def input_path(self, dataset_type: str, data_id: Mapping[str, Any] | None = None) -> Path:
        return self.repo.path_of(self.input_ref(dataset_type, data_id))

    @property
    def left_out(self) -> list[dict[str, Any]]:
        """Inputs planned for this quantum that it runs without (their producers failed):
        ``[{"dataset_type", "data_id", "producer", "reason"}]`` (empty for a complete quantum)."""
        return list(self.extra.get("left_out") or [])

    def exclude(self, dataset_type: str, data_id: Mapping[str, Any], reason: str) -> None:
        """Record that this quantum ran without one of its inputs because of what it holds."""
        self.excluded.append({"dataset_type": dataset_type, "data_id": DataId(data_id).to_dict(), "reason": reason})

    def inputs_of(self, dataset_type: str) -> list[DatasetRef]:
        return sorted((ref for (t, _), ref in self.inputs.items() if t == dataset_type), key=lambda r: r.data_id)

    def put(self, dataset_type: str, writer: Callable[[Path], None], data_id: Mapping[str, Any] | None = None) -> DatasetRef:
        """Write one output atomically (path fixed by run/type/data ID: idempotent)."""
        ref = self.repo.stage_file(dataset_type, data_id or self.data_id, self.run, writer)
        self.outputs = [r for r in self.outputs if not (r.dataset_type == ref.dataset_type and r.data_id == ref.data_id)]
        self.outputs.append(ref)
        return ref


class Stage(ABC):
    """Base class; subclasses set the class attributes and implement plan/run_quantum."""

    name: ClassVar[str]
    dimensions: ClassVar[tuple[str, ...]]
    input_types: ClassVar[tuple[str, ...]]
    output_types: ClassVar[tuple[str, ...]]
    resources: ClassVar[Resources] = Resources()
    description: ClassVar[str] = ""
    #: Inputs this stage *gathers* from many producers: dataset type -> the minimum number of
    #: them a quantum needs.  When a producer of such an input fails (or is blocked), the
    #: quantum runs on what exists and the missing input is recorded as left out; only below
    #: the minimum is the quantum blocked.  Every input type not listed here is required: a
    #: failed producer of it blocks the quantum.  A stage with a finer minimum (per band, per
    #: reference star...) raises :class:`~lsst_prod.errors.InsufficientInputs` from
    #: ``run_quantum``.
    gather: ClassVar[Mapping[str, int]] = {}

    @abstractmethod
    def plan(self, ctx: "PlanningContext", config: StageConfig) -> list[QuantumSpec]:
        """Enumerate this stage's quanta for the campaign (no I/O beyond the registry)."""

    @abstractmethod
    def run_quantum(self, ctx: QuantumContext) -> None:
        """Read inputs, run the kernels, write outputs through ``ctx.put``."""
