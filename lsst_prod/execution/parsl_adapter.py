"""The one module that knows Parsl's API (tested with parsl 2026.10.26).

Parsl moves (checkpointing left ``Config`` in late 2025, executors gain and
lose options); everything version-specific stays here: building executors
from a site, loading/cleaning up the DataFlowKernel, submitting a function to
a chosen executor and recognising "the worker was lost" failures.  Retries
are NOT delegated to Parsl (``retries=0``): the driver decides them per error
class and records every attempt in provenance.

Executors built from a site:

* ``threads`` (local, ``executor: threads``): one ThreadPoolExecutor for everything.
* ``htex_<class>`` for each memory class: a HighThroughputExecutor whose
  provider is a LocalProvider (local) or a SlurmProvider (slurm); workers of
  a class may use ``memory_gib`` each (enforced by the worker, see worker.py).
* ``mpi``: a HighThroughputExecutor with one worker per block; that worker
  launches the MPI ranks (``srun``/``mpiexec``, see :mod:`.mpi`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..config.site import SiteConfig

log = logging.getLogger(__name__)

MPI_LABEL = "mpi"


def executor_label(site: SiteConfig, memory_class: int | None, mpi: bool = False) -> str:
    """The executor a quantum goes to."""
    if site.executor == "threads":
        return "threads"
    if mpi:
        return MPI_LABEL
    return f"htex_{site.classes()[memory_class or 0].name}"


def _provider(site: SiteConfig, worker_init: str, first: bool, cores: int | None = None, comment: str | None = None):
    from parsl.launchers import SingleNodeLauncher, SrunLauncher
    from parsl.providers import LocalProvider, SlurmProvider

    if site.scheduler == "local":
        return LocalProvider(init_blocks=1 if first else 0, min_blocks=0, max_blocks=1, worker_init=worker_init)
    s = site.slurm
    assert s is not None
    lines = [line for line in s.scheduler_options.splitlines() if line.strip()]
    if comment:
        lines.append(f"--comment={comment}")  # lets a restart find (and cancel) a dead driver's blocks
    options = "\n".join(line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in lines)
    return SlurmProvider(
        partition=s.partition,
        account=s.account,
        qos=s.qos,
        nodes_per_block=s.nodes_per_block,
        cores_per_node=cores or s.cores_per_node,
        mem_per_node=int(math.floor(s.memory_per_node_gib)) if s.memory_per_node_gib else None,
        init_blocks=s.init_blocks if first else 0,
        min_blocks=s.min_blocks if first else 0,
        max_blocks=s.max_blocks,
        walltime=s.walltime,
        scheduler_options=options,
        worker_init=worker_init,
        cmd_timeout=s.cmd_timeout_s,
        exclusive=s.exclusive,
        launcher=SrunLauncher() if s.launcher == "srun" else SingleNodeLauncher(),
    )


def build_executors(site: SiteConfig, with_mpi: bool = True, job_comment: str | None = None) -> list:
    from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor

    if site.executor == "threads":
        return [ThreadPoolExecutor(label="threads", max_threads=site.workers())]
    worker_init = _worker_init(site)
    executors = []
    node_mem = site.slurm.memory_per_node_gib if site.slurm and site.slurm.memory_per_node_gib else None
    for i, mc in enumerate(site.classes()):
        workers = mc.max_workers_per_node or site.workers()
        if node_mem:
            workers = max(1, min(workers, int(node_mem // mc.memory_gib)))
        executors.append(HighThroughputExecutor(
            label=f"htex_{mc.name}",
            address=site.address or ("127.0.0.1" if site.scheduler == "local" else None),
            max_workers_per_node=workers,
            cores_per_worker=1.0,
            mem_per_worker=None if mc.memory_gib >= 1e5 else mc.memory_gib,
            heartbeat_period=site.heartbeat_period_s,
            heartbeat_threshold=3 * site.heartbeat_period_s,
            poll_period=10,
            provider=_provider(site, worker_init, first=(i == 0), comment=job_comment),
        ))
    if with_mpi:
        executors.append(HighThroughputExecutor(
            label=MPI_LABEL,
            address=site.address or ("127.0.0.1" if site.scheduler == "local" else None),
            max_workers_per_node=1,
            heartbeat_period=site.heartbeat_period_s,
            heartbeat_threshold=3 * site.heartbeat_period_s,
            poll_period=10,
            provider=_provider(site, worker_init, first=False, cores=site.mpi.max_ranks, comment=job_comment),
        ))
    return executors


def _worker_init(site: SiteConfig) -> str:
    """The site's worker_init, plus this interpreter's scripts directory on PATH so that the
    worker pool and ``mpiexec`` of the driver's environment are found."""
    bindir = str(Path(sys.executable).parent)
    lines = [f'export PATH="{bindir}:$PATH"']
    if site.worker_init.strip():
        lines.append(site.worker_init.strip())
    return "\n".join(lines)


class ParslSession:
    """A loaded Parsl DataFlowKernel for one site; use as a context manager."""

    def __init__(self, site: SiteConfig, run_dir: Path, with_mpi: bool = True, job_comment: str | None = None) -> None:
        self.job_comment = job_comment
        self.site = site
        self.run_dir = Path(run_dir)
        self.with_mpi = with_mpi
        self.dfk = None
        self._apps: dict[tuple[Callable, str], Any] = {}

    def build_config(self):
        from parsl.config import Config

        return Config(
            executors=build_executors(self.site, self.with_mpi, self.job_comment),
            run_dir=str(self.run_dir),
            retries=0,
            strategy="simple",
            strategy_period=2,
            max_idletime=self.site.idle_timeout_s,
            initialize_logging=False,
            usage_tracking=0,
        )

    def __enter__(self) -> "ParslSession":
        import parsl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        _attach_parsl_log(self.run_dir / "parsl.log")
        _ensure_scripts_on_path()
        self.dfk = parsl.load(self.build_config())
        return self

    def submit(self, fn: Callable[..., Any], *args: Any, executor: str) -> Future:
        from parsl.app.python import PythonApp

        key = (fn, executor)
        if key not in self._apps:
            self._apps[key] = PythonApp(fn, data_flow_kernel=self.dfk, executors=[executor], cache=False)
        return self._apps[key](*args)

    def __exit__(self, *exc: Any) -> None:
        if self.dfk is not None:
            try:
                self.dfk.cleanup()
            finally:
                import parsl

                try:
                    parsl.clear()
                except Exception:  # pragma: no cover - best effort
                    pass
                self.dfk = None


def is_worker_lost(exc: BaseException) -> bool:
    """True if a future failed because the worker/manager/block died (not the task's own error)."""
    name = type(exc).__name__
    return name in {"WorkerLost", "ManagerLost", "BadStateException"} or "lost" in str(exc).lower()


def _ensure_scripts_on_path() -> None:
    """HTEX starts ``interchange.py`` and ``process_worker_pool.py`` through PATH: put the running
    interpreter's scripts directory first, so a driver started without activating its venv works."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path


def _attach_parsl_log(path: Path) -> None:
    """Parsl's own log goes to a file at INFO (DEBUG costs ~30% of throughput)."""
    plog = logging.getLogger("parsl")
    for h in list(plog.handlers):
        if getattr(h, "_lsst_prod", False):
            plog.removeHandler(h)
    handler = logging.FileHandler(path)
    handler._lsst_prod = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    plog.addHandler(handler)
    plog.setLevel(logging.INFO)
    plog.propagate = False
