"""The one module that knows Parsl's API (tested with parsl 2026.10.26).

Parsl moves (checkpointing left ``Config`` in late 2025, executors gain and
lose options); everything version-specific stays here: building the
``Config`` from a site, loading/cleaning up the DataFlowKernel, submitting a
function as a python app and recognising "the worker was lost" failures.
Retries are NOT delegated to Parsl (``retries=0``): the driver decides them
per error class and records every attempt in provenance.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..config.site import SiteConfig

log = logging.getLogger(__name__)


class ParslSession:
    """A loaded Parsl DataFlowKernel for one site; use as a context manager."""

    def __init__(self, site: SiteConfig, run_dir: Path) -> None:
        self.site = site
        self.run_dir = Path(run_dir)
        self.dfk = None
        self.label = "threads" if site.executor == "threads" else "htex_local"
        self._app = None

    def build_config(self):
        import parsl
        from parsl.config import Config

        workers = self.site.workers()
        if self.site.executor == "threads":
            from parsl.executors import ThreadPoolExecutor

            executor = ThreadPoolExecutor(label=self.label, max_threads=workers)
        else:
            from parsl.executors import HighThroughputExecutor
            from parsl.providers import LocalProvider

            executor = HighThroughputExecutor(
                label=self.label,
                address="127.0.0.1",
                max_workers_per_node=workers,
                cores_per_worker=1.0,
                heartbeat_period=self.site.heartbeat_period_s,
                heartbeat_threshold=3 * self.site.heartbeat_period_s,
                poll_period=10,
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=self.site.worker_init),
            )
        del parsl
        return Config(
            executors=[executor],
            run_dir=str(self.run_dir),
            retries=0,
            strategy="simple",
            initialize_logging=False,
            usage_tracking=0,
        )

    def __enter__(self) -> "ParslSession":
        import parsl
        from parsl.app.python import PythonApp

        self.run_dir.mkdir(parents=True, exist_ok=True)
        _attach_parsl_log(self.run_dir / "parsl.log")
        _ensure_scripts_on_path()
        self.dfk = parsl.load(self.build_config())
        self._PythonApp = PythonApp
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._app is None or self._app.func is not fn:
            self._app = self._PythonApp(fn, data_flow_kernel=self.dfk, executors=[self.label], cache=False)
        return self._app(*args)

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
    """True if a future failed because the worker/manager died (not the task's own error)."""
    name = type(exc).__name__
    return name in {"WorkerLost", "ManagerLost", "BadStateException", "DependencyError"} or "lost" in str(exc).lower()


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
