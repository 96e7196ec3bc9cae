"""Leftovers of a killed driver: its Parsl processes on this host and its Slurm jobs.

A driver killed with SIGKILL cannot shut Parsl down: its interchange keeps
running, and its Slurm blocks keep their cores until their walltime.  Every
Slurm block of a run carries ``--comment=lsst-prod:<run>``; ``restart`` (after
taking the run's lock, so the owner is known to be dead) cancels those jobs
and terminates local Parsl processes started for the run's Parsl directory.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

PARSL_PROCESS_MARKERS = ("interchange.py", "process_worker_pool.py")


def job_comment(run: str) -> str:
    return f"lsst-prod:{run}"


def cancel_run_jobs(run: str, timeout_s: float = 20.0) -> list[str]:
    """scancel the Slurm jobs whose comment names ``run``; returns their IDs."""
    if shutil.which("squeue") is None:
        return []
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return []
    jobs = [line.split("|", 1)[0] for line in out.stdout.splitlines()
            if "|" in line and line.split("|", 1)[1].strip() == job_comment(run)]
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=timeout_s)
        log.warning("cancelled Slurm jobs %s left by a previous driver of %s", ",".join(jobs), run)
    return jobs


def kill_orphan_parsl_processes(parsl_dir: Path) -> int:
    """Terminate this host's Parsl interchange/worker processes that belong to ``parsl_dir``."""
    import psutil

    key = str(Path(parsl_dir).resolve())
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if key in cmd and any(m in cmd for m in PARSL_PROCESS_MARKERS):
            victims.append(proc)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if victims:
        log.warning("terminated %d Parsl processes left in %s", len(victims), key)
    return len(victims)
