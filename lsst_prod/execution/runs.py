"""Run life cycle: plan + submit a campaign, restart what failed or never finished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..config.campaign import Campaign, load_campaign
from ..errors import PlanningError
from ..graph.graph import QuantumGraph
from ..graph.planner import plan
from ..provenance.db import quanta
from ..provenance.report import partial_quanta
from ..repo import Repository
from ..repo.atomic import sha256_file, sweep_temporaries, write_bytes_atomic
from .cleanup import cancel_run_jobs, kill_orphan_parsl_processes
from .driver import Driver, DriverLock, RunResult, parsl_dir, plan_dir


def new_run_name(campaign: Campaign) -> str:
    return f"{campaign.config.release}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def newest_run(repo: Repository) -> str:
    runs = repo.registry.list_runs(kind="processing")
    if not runs:
        raise PlanningError(f"no processing run in {repo.root}; submit a campaign first")
    return runs[-1]["name"]


def submit(repo: Repository, campaign: Campaign, run: str | None = None, progress: Any = None) -> RunResult:
    """Plan ``campaign`` into a new run and execute it."""
    run = run or new_run_name(campaign)
    graph = plan(repo, campaign, run)
    pdir = plan_dir(repo, run)
    graph.save(pdir / "graph.json")
    write_bytes_atomic(pdir / "campaign.yaml", campaign.path.read_bytes())
    write_bytes_atomic(pdir / "site.yaml", campaign.site_path.read_bytes())
    info = {"campaign": str(campaign.path), "release": campaign.config.release,
            "release_id": campaign.config.release_id, "site": str(campaign.site_path),
            "skymap": campaign.config.skymap.model_dump(mode="json"), "bands": list(campaign.config.bands)}
    with DriverLock(pdir / "driver.lock"):
        driver = Driver(repo, campaign, graph, run, progress)
        driver.writer.plan(graph, info)
        return driver.execute()


def load_run(repo: Repository, run: str, site_override: str | Path | None = None) -> tuple[Campaign, QuantumGraph]:
    pdir = plan_dir(repo, run)
    if not (pdir / "graph.json").exists():
        raise PlanningError(f"run {run!r} has no saved plan in {pdir}")
    campaign = load_campaign(pdir / "campaign.yaml", site_override=site_override or pdir / "site.yaml")
    return campaign, QuantumGraph.load(pdir / "graph.json")


def quanta_to_rerun(repo: Repository, run: str, graph: QuantumGraph, verify_checksums: bool = True) -> set[str]:
    """Quanta that failed, never finished, or whose registered outputs are missing/corrupt,
    plus everything downstream of them."""
    with repo.engine.connect() as c:
        status = {r.quantum_id: r.status for r in
                  c.execute(sa.select(quanta.c.quantum_id, quanta.c.status).where(quanta.c.run == run))}
    bad = {q.id for q in graph if status.get(q.id) not in ("succeeded", "nowork")}
    # gather quanta that ran without some inputs: run them again on everything (their lost
    # producers are in ``bad`` already, unless an earlier restart brought them back)
    bad |= {qid for qid in partial_quanta(repo, run) if qid in graph}
    if verify_checksums:
        for q in graph:
            if q.id in bad or status.get(q.id) != "succeeded":
                continue
            for dtype, did in q.spec.outputs:
                ref = repo.find(dtype, did, [run])
                if ref is None:
                    continue  # a stage may legitimately write nothing for an optional output
                path = repo.path_of(ref)
                if not path.exists() or sha256_file(path) != ref.checksum:
                    bad.add(q.id)
                    break
    return bad | graph.descendants(bad)


def restart(repo: Repository, run: str, progress: Any = None, site_override: str | Path | None = None) -> RunResult:
    campaign, graph = load_run(repo, run, site_override)
    pdir = plan_dir(repo, run)
    with DriverLock(pdir / "driver.lock"):
        # the lock is ours, so any previous driver is dead: clear what it left running
        kill_orphan_parsl_processes(parsl_dir(repo, run, campaign.site))
        cancel_run_jobs(run)
        sweep_temporaries(repo.root / run)
        to_run = quanta_to_rerun(repo, run, graph)
        driver = Driver(repo, campaign, graph, run, progress)
        driver.writer.plan(graph, None)
        if not to_run:
            return RunResult(run)
        driver.writer.set_status(sorted(to_run), "planned")
        return driver.execute(to_run)
