"""Against the real single-node Slurm cluster of slurm/start.sh (CI starts it first).

Marked ``slurm``: skipped when no cluster answers, unless LSST_PROD_REQUIRE_SLURM=1 (CI),
which turns a missing cluster into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _helpers import ROOT, count_status, last_line, report_json, write_campaign
from lsst_prod.cli import main
from lsst_prod.repo import Repository
from lsst_prod.repo.atomic import TMP_PREFIX, sha256_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if not _cluster_up():
        if os.environ.get("LSST_PROD_REQUIRE_SLURM") == "1":
            pytest.fail("no Slurm cluster answers (run slurm/start.sh); LSST_PROD_REQUIRE_SLURM=1 requires one")
        pytest.skip("no Slurm cluster (slurm/start.sh starts one)")


@pytest.fixture
def reference(workdir):
    """An undisturbed run of the same campaign (thread executor) to compare checksums with."""
    campaign = write_campaign(workdir)
    assert main(["submit", str(campaign), "--run", "ref/undisturbed", "--no-progress"]) == 0
    repo = Repository.open(workdir / "repo")
    return {(r.dataset_type, r.data_id): r.checksum for r in repo.query(None, ["ref/undisturbed"])}


def _outputs(repo_path: Path, run: str) -> dict:
    repo = Repository.open(repo_path)
    refs = repo.query(None, [run])
    for r in refs:
        assert sha256_file(repo.path_of(r)) == r.checksum, f"{r.path} does not match its registered checksum"
    assert len({(r.dataset_type, r.data_id) for r in refs}) == len(refs), "duplicated outputs"
    assert not list((repo_path / run).rglob(f"{TMP_PREFIX}*")), "half-written temporaries left behind"
    return {(r.dataset_type, r.data_id): r.checksum for r in refs}


def _submit_bg(workdir: Path, campaign: Path, run: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lsst_prod.cli", "submit", str(campaign), "--run", run,
                             "--no-progress"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"submit exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _our_jobs(run: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, timeout=10).stdout
    return [l.split("|")[0] for l in out.splitlines() if l.split("|")[1] == f"lsst-prod:{run}" and
            l.split("|")[2] == "RUNNING"]


def test_site_check_probes_sinfo_and_runs_two_rank_mpi_via_srun(capsys):
    assert main(["site", "check", str(ROOT / "sites" / "slurm-localhost.yaml"), "--mpi", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(p["partition"] == "debug" for p in out["slurm"]["partitions"])
    m = out["mpi"]
    assert m["ranks"] == 2 and m["ok"] and m["max_rel_diff"] < 1e-12
    assert m["mpi_command"][:2] == ["srun", "--overlap"] and m["slurm_job_id"]


def test_campaign_on_slurm_records_job_ids_and_matches_undisturbed_run(workdir, reference, capsys):
    campaign = write_campaign(workdir, site="slurm-localhost")
    assert main(["submit", str(campaign), "--no-progress"]) == 0
    run = last_line(capsys.readouterr().out)
    report = report_json(workdir / "repo", run, capsys)
    assert report["complete"] and report["totals"]["succeeded"] == 8
    assert all(q["slurm_job_id"] and q["node"] for q in report["quanta"])
    assert {a["memory_class"] for q in report["quanta"] for a in q["attempts"]} == {"small"}
    assert _outputs(workdir / "repo", run) == reference


def test_cancelled_block_is_survived(workdir, reference, capsys):
    """scancel the run's blocks while quanta are in flight: the lost quanta are retried in new blocks."""
    campaign = write_campaign(workdir, site="slurm-localhost")
    run = "dp-test/scancel"
    proc = _submit_bg(workdir, campaign, run)
    _wait_for(lambda: count_status(workdir / "repo", run, "succeeded") >= 1 and count_status(workdir / "repo", run, "running") >= 1
              and _our_jobs(run), 180, "a finished quantum and one in flight", proc)
    victims = _our_jobs(run)
    subprocess.run(["scancel", *victims], check=True, timeout=10)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    report = report_json(workdir / "repo", run, capsys)
    assert report["complete"]
    attempts = [a for q in report["quanta"] for a in q["attempts"]]
    lost = [a for a in attempts if a["outcome"] == "failed"]
    assert lost and all(a["error_class"] in ("WorkerLost", "TransientError") for a in lost)
    later_jobs = {a["slurm_job_id"] for a in attempts if a["outcome"] == "succeeded"} - set(victims)
    assert later_jobs, "no quantum ran in a block started after the cancellation"
    assert _outputs(workdir / "repo", run) == reference


def test_killed_coordinator_then_restart(workdir, reference, capsys):
    campaign = write_campaign(workdir, site="slurm-localhost")
    run = "dp-test/kill-driver"
    proc = _submit_bg(workdir, campaign, run)
    _wait_for(lambda: count_status(workdir / "repo", run, "succeeded") >= 2, 180, "two finished quanta", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert count_status(workdir / "repo", run, "succeeded") < 8
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    report = report_json(workdir / "repo", run, capsys)
    assert report["complete"] and report["totals"]["succeeded"] == 8
    assert _outputs(workdir / "repo", run) == reference
    assert not _our_jobs(run)  # the dead driver's blocks were cancelled, the new ones released
