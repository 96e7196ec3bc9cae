"""``lsst-prod site check``: validate a site, probe its scheduler, optionally run an MPI job through it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..config.site import SiteConfig
from ..errors import ConfigError


def probe_slurm(site: SiteConfig, timeout_s: float = 20.0) -> dict[str, Any]:
    """Ask ``sinfo`` about the site's partition; ConfigError if Slurm does not answer or lacks it."""
    assert site.slurm is not None
    if shutil.which("sinfo") is None:
        raise ConfigError(f"site {site.name!r}: scheduler slurm but no 'sinfo' on PATH")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P|%a|%D|%T|%c|%m|%N"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"site {site.name!r}: sinfo did not answer within {timeout_s} s") from None
    if proc.returncode != 0:
        raise ConfigError(f"site {site.name!r}: sinfo failed: {proc.stderr.strip()}")
    rows = []
    for line in proc.stdout.strip().splitlines():
        part, avail, nodes, state, cpus, mem, nodelist = line.split("|")
        rows.append({"partition": part.rstrip("*"), "default": part.endswith("*"), "available": avail,
                     "nodes": int(nodes), "state": state, "cpus_per_node": cpus, "memory_mb": mem,
                     "nodelist": nodelist})
    parts = {r["partition"] for r in rows}
    if site.slurm.partition not in parts:
        raise ConfigError(f"site {site.name!r}: slurm.partition {site.slurm.partition!r} is not one of "
                          f"{sorted(parts)} (sinfo)")
    return {"partitions": rows}


def _mpi_selftest_task(n_ranks: int, launcher: str, options: str, workdir: str) -> dict[str, Any]:
    """Runs on a worker of the site's mpi executor."""
    import os
    import socket

    from .mpi import run_mpi_program

    result = run_mpi_program("lsst_prod.execution.mpi_selftest", {"n_vectors": 64, "length": 1000}, n_ranks,
                             launcher, options, workdir=Path(workdir))
    result["worker_host"] = socket.gethostname()
    result["worker_slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    return result


def mpi_selftest(site: SiteConfig, n_ranks: int = 2, timeout_s: float = 300.0) -> dict[str, Any]:
    """A ``n_ranks`` MPI Allreduce through the site's ``mpi`` executor, checked against the serial sum."""
    from .parsl_adapter import MPI_LABEL, ParslSession

    if site.executor == "threads":
        raise ConfigError(f"site {site.name!r} runs quanta in threads: it has no MPI executor")
    with tempfile.TemporaryDirectory(prefix="lsst-prod-sitecheck-") as tmp:
        with ParslSession(site, Path(tmp) / "parsl", with_mpi=True) as session:
            fut = session.submit(_mpi_selftest_task, n_ranks, site.mpi.launcher, site.mpi.launcher_options,
                                 str(Path(tmp) / "mpi"), executor=MPI_LABEL)
            return fut.result(timeout=timeout_s)
