"""Sites: where quanta run.  Data only; lsst_prod.execution turns a site into Parsl executors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .yamlio import load_yaml, validate


class SiteConfig(BaseModel):
    """One machine (``scheduler: local``).

    ``executor: htex`` runs quanta in Parsl's HighThroughputExecutor worker
    processes (the default: real process isolation, peak memory per quantum);
    ``threads`` runs them in a thread pool inside the driver (fast start-up,
    for tests and debugging).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    scheduler: Literal["local"] = "local"
    executor: Literal["htex", "threads"] = "htex"
    max_workers: int | Literal["auto"] = Field("auto", description="parallel quanta; auto = number of cores")
    worker_init: str = Field("", description="shell lines run before a worker starts (e.g. activate a venv)")
    scratch_dir: str | None = Field(None, description="per-run scratch for Parsl logs; default REPO/<run>/_parsl")
    heartbeat_period_s: int = Field(10, ge=1, description="HTEX heartbeat; a worker silent for 3 periods is lost")

    def workers(self) -> int:
        if self.max_workers == "auto":
            return max(1, os.cpu_count() or 1)
        return int(self.max_workers)


def load_site(path: str | Path) -> SiteConfig:
    doc = load_yaml(path)
    site = validate(doc, SiteConfig)
    assert isinstance(site, SiteConfig)
    return site
