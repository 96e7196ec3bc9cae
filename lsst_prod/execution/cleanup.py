"""Leftovers of a killed driver: its Parsl processes on this host and its Slurm jobs.

A driver killed with SIGKILL cannot shut Parsl down: its interchange keeps
running, and its Slurm blocks keep their cores until their walltime.  Every
Slurm block of a run carries ``--comment=lsst-prod:<run>``; ``restart`` (after
taking the run's lock, so the owner is known to be dead) cancels those jobs
and terminates the local processes the dead driver started, found by the token
the driver put in their environment (not by command line: Parsl renames its
processes).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

#: Environment variable holding the token of the driver that started a process.
DRIVER_TOKEN_VAR = "LSST_PROD_DRIVER_TOKEN"


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


def kill_orphan_processes(token: str | None) -> int:
    """Terminate this host's processes started by a dead driver: those whose environment holds
    its token (``DRIVER_TOKEN_VAR``, set by the driver lock and inherited by every process the
    driver starts).  Returns how many were terminated."""
    import psutil

    if not token:
        return 0
    victims = []
    for pid in processes_with_token(token):
        try:
            victims.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
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
    psutil.wait_procs(alive, timeout=5)
    if victims:
        log.warning("terminated %d processes left by a dead driver (token %s)", len(victims), token[:8])
    return len(victims)


def processes_with_token(token: str) -> list[int]:
    """PIDs of this host's processes carrying a driver token (tests and diagnostics)."""
    import psutil

    out = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(DRIVER_TOKEN_VAR) == token:
                out.append(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
    return out
