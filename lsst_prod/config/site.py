"""Sites: where quanta run.  Data only; lsst_prod.execution turns a site into Parsl executors.

A site is either this machine (``scheduler: local``) or a Slurm cluster
(``scheduler: slurm`` with a ``slurm:`` block).  Quanta are routed to a
*memory class* (an executor whose workers may use up to ``memory_gib``): the
smallest class that fits the stage's declared memory; a quantum that runs out
of memory is retried on the next larger class, up to the largest.  MPI stages
run as ``mpi.launcher`` (srun or mpiexec) jobs of N ranks started by a worker
of the ``mpi`` executor.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..names import SafeName
from .yamlio import load_yaml, validate

_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MemoryClass(_Strict):
    """An executor whose workers may each use up to ``memory_gib`` (enforced per quantum)."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$")
    memory_gib: float = Field(..., gt=0, le=1_000_000, description="memory one quantum may use, GiB")
    max_workers_per_node: int | None = Field(None, ge=1, le=4096, description="default: what cores and memory allow")


class SlurmConfig(_Strict):
    """How blocks of workers are requested from Slurm (one sbatch job per block)."""

    partition: SafeName
    account: SafeName | None = None
    qos: SafeName | None = None
    walltime: str = Field("01:00:00", description="[D-]HH:MM:SS per block")
    nodes_per_block: int = Field(1, ge=1, le=100_000)
    init_blocks: int = Field(1, ge=0, le=10_000)
    min_blocks: int = Field(0, ge=0, le=10_000)
    max_blocks: int = Field(1, ge=1, le=10_000)
    cores_per_node: int = Field(..., ge=1, le=4096, description="cores requested per node")
    memory_per_node_gib: float | None = Field(None, gt=0, le=100_000, description="--mem per node, GiB")
    exclusive: bool = Field(False, description="#SBATCH --exclusive")
    scheduler_options: str = Field("", max_length=10_000, description="extra sbatch options, one per line ('--constraint=cpu' or '#SBATCH ...')")
    launcher: Literal["srun", "single_node"] = Field(
        "single_node", description="how the worker pool starts in a block: one srun step per node, or directly")
    cmd_timeout_s: int = Field(30, ge=5, le=3600, description="timeout of sbatch/squeue/scancel calls")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        if not _WALLTIME.match(v):
            raise ValueError(f"walltime {v!r} must look like HH:MM:SS or D-HH:MM:SS")
        return v

    @field_validator("scheduler_options")
    @classmethod
    def _sbatch_lines(cls, v: str) -> str:
        # each line is one sbatch option, with or without its '#SBATCH' prefix; nothing that a
        # shell would run (the lines land in the generated batch script)
        for i, line in enumerate(v.splitlines(), 1):
            opt = line.strip()
            opt = opt[len("#SBATCH"):].strip() if opt.startswith("#SBATCH") else opt
            if line.strip() and not opt.startswith("-"):
                raise ValueError(f"line {i} of scheduler_options ({line[:60]!r}) is not an sbatch option "
                                 f"('--name=value' or '#SBATCH --name=value')")
        return v

    @model_validator(mode="after")
    def _blocks(self) -> "SlurmConfig":
        if self.min_blocks > self.max_blocks:
            raise ValueError(f"min_blocks ({self.min_blocks}) > max_blocks ({self.max_blocks})")
        if self.init_blocks > self.max_blocks:
            raise ValueError(f"init_blocks ({self.init_blocks}) > max_blocks ({self.max_blocks})")
        return self


class MpiConfig(_Strict):
    launcher: Literal["srun", "mpiexec"] = Field("mpiexec", description="srun (inside a Slurm block) or mpiexec")
    max_ranks: int = Field(2, ge=1, le=1_000_000, description="largest number of ranks an MPI quantum may ask for")
    launcher_options: str = Field("", max_length=1000, pattern=r"^[^\n\r;&|`$<>]*$", description="extra options for the launcher, e.g. --mpi=pmi2")


class SiteConfig(_Strict):
    """A site: this machine (scheduler: local) or a Slurm cluster (scheduler: slurm)."""

    name: SafeName
    description: str = Field("", max_length=10_000)
    scheduler: Literal["local", "slurm"] = "local"
    executor: Literal["htex", "threads"] = Field(
        "htex", description="htex: Parsl worker processes; threads: a pool in the driver (local only)")
    max_workers: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field("auto", description="parallel quanta per node; auto = cores")
    worker_init: str = Field("", max_length=10_000, description="shell lines run before a worker starts (e.g. activate a venv)")
    scratch_dir: str | None = Field(None, min_length=1, max_length=1024, pattern=r"^[^\n\r\x00]*$", description="Parsl run directory; default REPO/<run>/_parsl")
    shared_filesystem: bool = Field(True, description="workers see the repository at the same path")
    address: str | None = Field(None, pattern=r"^[A-Za-z0-9.:\-\[\]]{1,255}$", description="address workers use to reach the driver's interchange "
                                                  "(default: 127.0.0.1 locally, probed on Slurm)")
    idle_timeout_s: float = Field(120.0, gt=0, le=1e6, description="an idle block is released after this long, s")
    heartbeat_period_s: int = Field(10, ge=1, le=3600, description="HTEX heartbeat; a worker silent for 3 periods is lost")
    memory_classes: list[MemoryClass] = Field(default_factory=list,
                                              description="executors by memory per quantum, smallest first")
    slurm: SlurmConfig | None = None
    mpi: MpiConfig = Field(default_factory=MpiConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "SiteConfig":
        if self.scheduler == "slurm":
            if self.slurm is None:
                raise ValueError("scheduler 'slurm' needs a 'slurm:' block (partition, cores_per_node, ...)")
            if self.executor == "threads":
                raise ValueError("executor 'threads' runs in the driver: it cannot run on Slurm")
            if not self.shared_filesystem:
                raise ValueError("shared_filesystem: false is not supported yet (workers read the repository)")
        elif self.slurm is not None:
            raise ValueError("a 'slurm:' block needs scheduler: slurm")
        names = [m.name for m in self.memory_classes]
        if len(set(names)) != len(names):
            raise ValueError(f"memory class names repeat: {names}")
        mems = [m.memory_gib for m in self.memory_classes]
        if mems != sorted(mems):
            raise ValueError(f"memory_classes must be ordered from smallest to largest (got {mems} GiB)")
        if self.slurm and self.slurm.memory_per_node_gib and mems and mems[-1] > self.slurm.memory_per_node_gib:
            raise ValueError(f"memory class {names[-1]!r} ({mems[-1]} GiB) exceeds memory_per_node_gib "
                             f"({self.slurm.memory_per_node_gib})")
        if self.mpi.launcher == "srun" and self.scheduler != "slurm":
            raise ValueError("mpi.launcher 'srun' needs scheduler: slurm (use mpiexec on a local site)")
        return self

    def workers(self) -> int:
        if self.max_workers == "auto":
            if self.slurm is not None:
                return self.slurm.cores_per_node
            return max(1, os.cpu_count() or 1)
        return int(self.max_workers)

    def classes(self) -> list[MemoryClass]:
        """Memory classes, with an unlimited 'default' class when none is configured."""
        if self.memory_classes:
            return list(self.memory_classes)
        return [MemoryClass(name="default", memory_gib=1e6)]

    def class_for(self, memory_gib: float) -> int:
        """Index of the smallest memory class that holds ``memory_gib`` (the largest if none does)."""
        for i, m in enumerate(self.classes()):
            if m.memory_gib >= memory_gib:
                return i
        return len(self.classes()) - 1


def load_site(path: str | Path) -> SiteConfig:
    doc = load_yaml(path)
    site = validate(doc, SiteConfig)
    assert isinstance(site, SiteConfig)
    return site
