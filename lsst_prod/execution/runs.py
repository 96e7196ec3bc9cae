"""Run life cycle: plan + submit a campaign, restart what failed or never finished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..config.campaign import Campaign, load_campaign
from ..errors import PlanningError
from ..names import check_run_name
from ..graph.graph import QuantumGraph
from ..graph.planner import plan
from ..provenance.db import quanta
from ..provenance.report import partial_quanta
from ..repo import Repository
from ..repo.atomic import sha256_file, sweep_temporaries, write_bytes_atomic
from .cleanup import cancel_run_jobs, kill_orphan_processes
from .driver import Driver, DriverLock, RunResult, plan_dir


def new_run_name(campaign: Campaign) -> str:
    """``RELEASE/UTC-timestamp``; :func:`submit` adds ``-2``, ``-3``... if that run exists."""
    return f"{campaign.config.release}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _claim_run(repo: Repository, run: str, default_name: bool) -> tuple[str, Path]:
    """Create the run's ``_plan`` directory atomically (``mkdir`` succeeds for one process only).

    An existing run name is refused (PlanningError, nothing written); a default name that is
    taken (same release, same UTC second) gets a numbered suffix instead."""
    existing = {r["name"] for r in repo.registry.list_runs()}
    for k in range(1, 1000):
        name = run if k == 1 else f"{run}-{k}"
        check_run_name(name)
        pdir = plan_dir(repo, name)
        if name not in existing:
            try:
                pdir.parent.mkdir(parents=True, exist_ok=True)
                pdir.mkdir()
                return name, pdir
            except FileExistsError:
                pass
        if not default_name:
            raise PlanningError(f"run {run!r} already exists in {repo.root}; choose another --run, or "
                                f"`lsst-prod restart {run}` to finish it")
    raise PlanningError(f"could not find a free run name after {run!r}-999")


def _release_claim(pdir: Path) -> None:
    """Undo :func:`_claim_run` when planning failed before anything ran."""
    for d in (pdir, pdir.parent):
        try:
            d.rmdir()
        except OSError:
            break


def newest_run(repo: Repository) -> str:
    runs = repo.registry.list_runs(kind="processing")
    if not runs:
        raise PlanningError(f"no processing run in {repo.root}; submit a campaign first")
    return runs[-1]["name"]


def submit(repo: Repository, campaign: Campaign, run: str | None = None, progress: Any = None,
           announce: Any = None) -> RunResult:
    """Plan ``campaign`` into a new run and execute it.

    The run directory is claimed and the driver lock taken before anything is written, so a
    refused submit (run name taken, lock held) leaves every existing run untouched."""
    default_name = run is None
    run, pdir = _claim_run(repo, check_run_name(run or new_run_name(campaign)), default_name)
    with DriverLock(pdir / "driver.lock"):
        if announce is not None:
            announce(run)
        try:
            graph = plan(repo, campaign, run)
        except BaseException:
            (pdir / "driver.lock").unlink(missing_ok=True)
            _release_claim(pdir)
            raise
        graph.save(pdir / "graph.json")
        write_bytes_atomic(pdir / "campaign.yaml", campaign.path.read_bytes())
        write_bytes_atomic(pdir / "site.yaml", campaign.site_path.read_bytes())
        info = {"campaign": str(campaign.path), "release": campaign.config.release,
                "release_id": campaign.config.release_id, "site": str(campaign.site_path),
                "skymap": campaign.config.skymap.model_dump(mode="json"), "bands": list(campaign.config.bands)}
        driver = Driver(repo, campaign, graph, run, progress)
        driver.writer.plan(graph, info)
        return driver.execute()


def load_run(repo: Repository, run: str, site_override: str | Path | None = None) -> tuple[Campaign, QuantumGraph]:
    pdir = plan_dir(repo, run)
    if not (pdir / "graph.json").exists():
        raise PlanningError(f"run {run!r} has no saved plan in {pdir}")
    campaign = load_campaign(pdir / "campaign.yaml", site_override=site_override or pdir / "site.yaml")
    return campaign, QuantumGraph.load(pdir / "graph.json")


def _file_differs(repo: Repository, ref, hash_it: bool) -> bool:
    path = repo.path_of(ref)
    try:
        if path.stat().st_size != ref.size:
            return True
    except FileNotFoundError:
        return True
    return hash_it and sha256_file(path) != ref.checksum


def quanta_to_rerun(repo: Repository, run: str, graph: QuantumGraph, verify: bool = False) -> set[str]:
    """Quanta that failed, never finished, ran on partial inputs, or whose registered outputs are
    missing or changed, plus everything downstream of them.

    Outputs are checked by existence and size; ``verify`` also hashes them and every pre-existing
    input (raw, calibrations, reference catalogue) against the checksum the plan recorded, so a
    replaced or restored input re-runs exactly the quanta that read it and their dependents."""
    with repo.engine.connect() as c:
        status = {r.quantum_id: r.status for r in
                  c.execute(sa.select(quanta.c.quantum_id, quanta.c.status).where(quanta.c.run == run))}
    bad = {q.id for q in graph if status.get(q.id) not in ("succeeded", "nowork")}
    # gather quanta that ran without some inputs: run them again on everything (their lost
    # producers are in ``bad`` already, unless an earlier restart brought them back)
    bad |= {qid for qid in partial_quanta(repo, run) if qid in graph}
    changed_inputs: dict[str, bool] = {}
    for q in graph:
        if q.id in bad or status.get(q.id) != "succeeded":
            continue
        if verify:
            for ref in q.prerequisites:
                if ref.path not in changed_inputs:
                    changed_inputs[ref.path] = _file_differs(repo, ref, hash_it=True)
                if changed_inputs[ref.path]:
                    bad.add(q.id)
                    break
            if q.id in bad:
                continue
        for dtype, did in q.spec.outputs:
            ref = repo.find(dtype, did, [run])
            if ref is None:
                continue  # a stage may legitimately write nothing for an optional output
            if _file_differs(repo, ref, hash_it=verify):
                bad.add(q.id)
                break
    return bad | graph.descendants(bad)


def restart(repo: Repository, run: str, progress: Any = None, site_override: str | Path | None = None,
            verify: bool = False) -> RunResult:
    campaign, graph = load_run(repo, run, site_override)
    pdir = plan_dir(repo, run)
    with DriverLock(pdir / "driver.lock") as lock:
        # the lock is ours, so any previous driver is dead: clear what it left running
        kill_orphan_processes(lock.previous.get("token"))
        cancel_run_jobs(run)
        sweep_temporaries(repo.root / run)
        driver = Driver(repo, campaign, graph, run, progress)
        driver.writer.plan(graph, None)
        driver.writer.record_lost_in_flight(lock.previous)
        to_run = quanta_to_rerun(repo, run, graph, verify=verify)
        if not to_run:
            return RunResult(run)
        driver.writer.set_status(sorted(to_run), "planned")
        return driver.execute(to_run)
