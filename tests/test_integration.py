"""End to end on a tiny simulated survey: simulate -> submit -> report -> validate, failures and restarts.

The survey is 2 detectors of 1024x1024, 2 bands, 2 nights (8 single-frame quanta);
it is simulated once per session and copied for each test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsst_prod.cli import main
from lsst_prod.execution.cleanup import processes_with_token
from lsst_prod.repo import Repository
from lsst_prod.repo.atomic import TMP_PREFIX, sha256_file

from _helpers import count_status, inject_single_frame, write_campaign  # noqa: E402


def _last_line(out: str) -> str:
    return [line for line in out.strip().splitlines() if line.strip()][-1].strip()


def _report(repo: Path, run: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["report", run, "--repo", str(repo), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _repo_state(root):
    """Files (ignoring SQLite's own -wal/-shm sidecars, which opening the registry creates) and
    the registry's datasets and runs."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm")))
    repo = Repository.open(root)
    state = (files, [r.to_dict() for r in repo.query()], repo.registry.list_runs())
    repo.close()
    return state


def test_plan_counts_and_writes_nothing(workdir, capsys):
    campaign = write_campaign(workdir)
    before = _repo_state(workdir / "repo")
    assert main(["plan", str(campaign)]) == 0
    out = capsys.readouterr().out
    assert "single_frame" in out and " 8 " in out
    assert _repo_state(workdir / "repo") == before


def test_submit_report_validate(workdir, capsys):
    campaign = write_campaign(workdir)
    campaign.write_text(campaign.read_text().replace("  single_frame: {}\n", "  single_frame: {}\n  visit_summary: {}\n"))
    assert main(["submit", str(campaign), "--no-progress"]) == 0
    run = _last_line(capsys.readouterr().out)
    assert run.startswith("dp-test/")
    report = _report(workdir / "repo", run, capsys)
    assert report["complete"] and report["totals"]["succeeded"] == 12
    summ = report["stages"]["single_frame"]["summary"]
    assert summ["n_sources_total"] > 500
    capsys.readouterr()
    # every single-frame metric is present; astrometry, zero points and completeness within the
    # demo's bounds.  The flux-pull bins are computed but not asserted here: on this tiny survey
    # (100,000 stars/deg^2, 1024^2 detectors: 22-50 PSF stars per detector) the PSF models are
    # noisier than on dp-mini and the S/N 30-300 pull widths fail their bounds (1.12-1.27); the
    # perturbation tests (tests/test_validate_perturb.py) show each of them can fail.
    main(["validate", run, "--repo", str(workdir / "repo"), "--json", "--strict"])
    m = json.loads(capsys.readouterr().out)
    from lsst_prod.validate.checks import REQUIRED

    for name in REQUIRED["single_frame"]:
        status = m["checks"][name]["status"]
        assert status != "missing", (name, m["checks"][name])
        if not name.startswith("flux_pull_"):
            assert status == "pass", (name, m["checks"][name])
    assert m["n_matched"] > 500
    # one Visit row per visit, DP1 columns
    repo_ = Repository.open(workdir / "repo")
    vrefs = repo_.query("visitSummary", [run])
    assert len(vrefs) == 4
    import pyarrow.parquet as pq_

    vis = pq_.read_table(repo_.path_of(vrefs[0])).to_pydict()
    assert {"visit", "band", "ra", "dec", "airmass", "expMidptMJD", "obsStart"} <= set(vis)
    assert vis["visit"][0] == vrefs[0].data_id["visit"] and vis["nDetectors"][0] == 2
    # IDs carry the release and trace back to the raw
    repo = Repository.open(workdir / "repo")
    src = repo.query("source", [run])[0]
    import pyarrow.parquet as pq

    sid = int(pq.read_table(repo.path_of(src), columns=["sourceId"]).column(0)[3].as_py())
    capsys.readouterr()
    assert main(["trace", run, "--repo", str(workdir / "repo"), "--source-id", str(sid)]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["decoded"]["release"] == 7
    raw_inputs = [i for i in tree["lineage"]["inputs"] if i["dataset_type"] == "raw"]
    assert raw_inputs and raw_inputs[0]["produced_by"] is None and raw_inputs[0]["checksum"].startswith("sha256:")


def test_injected_failure_then_restart(workdir, capsys):
    repo = Repository.open(workdir / "repo")
    visit = min(v["visit"] for v in repo.visits())
    extra = inject_single_frame(visit, 1)
    campaign = write_campaign(workdir, extra=extra)
    assert main(["submit", str(campaign), "--no-progress"]) == 1
    out = capsys.readouterr().out
    run = _last_line(out)
    assert "AlgorithmError" in out and "injected" in out
    report = _report(workdir / "repo", run, capsys)
    assert report["totals"]["failed"] == 1 and report["totals"]["succeeded"] == 7
    checks_before = {r.path: r.checksum for r in repo.query(None, [run])}

    assert main(["restart", run, "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    report = _report(workdir / "repo", run, capsys)
    assert report["complete"]
    by_id = {q["quantum_id"]: q for q in report["quanta"]}
    failed_q = next(q for q in by_id.values() if q["data_id"]["visit"] == visit and q["data_id"]["detector"] == 1)
    assert [a["outcome"] for a in failed_q["attempts"]] == ["failed", "succeeded"]
    assert [a["attempt"] for a in failed_q["attempts"]] == [1, 2]
    assert all(len(q["attempts"]) == 1 for q in by_id.values() if q is not failed_q)
    # the 7 good quanta were not re-run: their outputs are untouched
    after = {r.path: r.checksum for r in repo.query(None, [run])}
    assert all(after[p] == c for p, c in checks_before.items())
    assert len(after) == 8 * 4

    # nothing left to do: a second restart runs nothing
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    assert "nothing to re-run" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_driver_then_restart_same_outputs(workdir, tmp_path_factory, capsys):
    """kill -9 the driver midway; restart completes with no duplicated or missing outputs, and the
    outputs equal an undisturbed run's (same checksums for the deterministic tables)."""
    campaign = write_campaign(workdir, site="local")  # Parsl HTEX: interchange and workers outlive the driver
    run = "dp-test/killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lsst_prod.cli", "submit", str(campaign), "--run", run,
                             "--no-progress"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while count_status(workdir / "repo", run, "succeeded") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = count_status(workdir / "repo", run, "succeeded")
    assert 2 <= done_before < 8
    in_flight = count_status(workdir / "repo", run, "running") + count_status(workdir / "repo", run, "submitted")
    token = json.loads((workdir / "repo" / run / "_plan" / "driver.lock").read_text())["token"]
    orphans_before = processes_with_token(token)

    capsys.readouterr()
    assert main(["status", run, "--repo", str(workdir / "repo")]) == 0
    assert "not running" in capsys.readouterr().out
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    # no process of the dead driver survives the restart (found by its token, not its name)
    assert processes_with_token(token) == [], f"orphans left: {processes_with_token(token)} (before: {orphans_before})"
    report = _report(workdir / "repo", run, capsys)
    assert report["complete"] and report["totals"]["succeeded"] == 8
    lost = [a for q in report["quanta"] for a in q["attempts"] if a.get("error_class") == "DriverLost"]
    assert len(lost) == in_flight  # attempts in flight at the kill are recorded, not forgotten
    repo = Repository.open(workdir / "repo")
    refs = repo.query(None, [run])
    assert len(refs) == 32 and len({(r.dataset_type, r.data_id) for r in refs}) == 32
    for r in refs:
        assert sha256_file(repo.path_of(r)) == r.checksum
    assert not list((workdir / "repo").rglob(f"{TMP_PREFIX}*"))

    # an undisturbed run of the same campaign gives the same Source tables
    assert main(["submit", str(campaign), "--run", "dp-test/clean", "--no-progress"]) == 0
    clean = {(r.dataset_type, r.data_id): r.checksum for r in repo.query("source", ["dp-test/clean"])}
    killed = {(r.dataset_type, r.data_id): r.checksum for r in repo.query("source", [run])}
    assert clean.keys() == killed.keys()
    assert _table_equal(repo, "dp-test/clean", run)


def _table_equal(repo: Repository, run_a: str, run_b: str) -> bool:
    """Source tables equal column by column (file bytes differ only by the run name in the metadata)."""
    import numpy as np
    import pyarrow.parquet as pq

    for ref in repo.query("source", [run_a]):
        other = repo.find("source", ref.data_id, [run_b])
        a, b = pq.read_table(repo.path_of(ref)), pq.read_table(repo.path_of(other))
        if a.column_names != b.column_names or a.num_rows != b.num_rows:
            return False
        for name in a.column_names:
            x, y = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(zero_copy_only=False)
            if x.dtype.kind == "f":
                if not np.array_equal(x, y, equal_nan=True):
                    return False
            elif not (x == y).all():
                return False
    return True


@pytest.mark.slow
def test_htex_local_site_with_worker_crash(workdir, capsys):
    """The default site (HighThroughputExecutor + LocalProvider): a worker process that dies is
    detected, its quantum retried, and the run completes; provenance names host and pid."""
    repo = Repository.open(workdir / "repo")
    visit = min(v["visit"] for v in repo.visits())
    extra = inject_single_frame(visit, 0, "crash")
    campaign = write_campaign(workdir, site="local", extra=extra)
    assert main(["submit", str(campaign), "--no-progress"]) == 0
    run = _last_line(capsys.readouterr().out)
    report = _report(workdir / "repo", run, capsys)
    assert report["complete"]
    q = next(q for q in report["quanta"] if q["data_id"]["visit"] == visit and q["data_id"]["detector"] == 0)
    assert [a["outcome"] for a in q["attempts"]] == ["failed", "succeeded"]
    assert q["attempts"][0]["error_class"] in ("WorkerLost", "TransientError")
    pids = {a["pid"] for qq in report["quanta"] for a in qq["attempts"] if a["pid"]}
    assert os.getpid() not in pids  # quanta ran in worker processes, not in the driver


def _flip_byte(path: Path, offset_from_end: int = 5000) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) - offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def _attempts_by_quantum(repo_path: Path, run: str, capsys) -> dict[str, list[str]]:
    report = _report(repo_path, run, capsys)
    return {q["quantum_id"]: [a["error_class"] or a["outcome"] for a in q["attempts"]] for q in report["quanta"]}


@pytest.mark.slow
def test_corrupt_input_fails_clearly_and_restart_verify_reruns_exactly_what_read_it(workdir, capsys):
    """Issue #9: a flipped byte in a raw fails its quantum with CorruptInput (named file, not
    retried); after restoring it, `restart --verify` re-runs exactly that quantum and the gather
    that ran without it.  A same-size change to a finished output is invisible to a plain
    restart (existence and size) and re-run by `restart --verify` with its dependents."""
    campaign = write_campaign(workdir)
    campaign.write_text(campaign.read_text().replace("  single_frame: {}\n", "  single_frame: {}\n  visit_summary: {}\n"))
    repo = Repository.open(workdir / "repo")
    visit = min(v["visit"] for v in repo.visits())
    raw = next(r for r in repo.query("raw") if r.data_id["visit"] == visit and r.data_id["detector"] == 1)
    raw_path = repo.path_of(raw)
    original = _flip_byte(raw_path)

    assert main(["submit", str(campaign), "--no-progress"]) == 1
    run = _last_line(capsys.readouterr().out)
    attempts = _attempts_by_quantum(workdir / "repo", run, capsys)
    bad_q = f"single_frame:instrument=SimCam, visit={visit}, detector=1"
    assert attempts[bad_q] == ["CorruptInput"]  # one attempt: corruption is not retried
    report = _report(workdir / "repo", run, capsys)
    failure = next(f for f in report["failures"] if f["status"] == "failed")
    assert str(raw_path) in failure["error_message"] and "checksum" in failure["error_message"]

    raw_path.write_bytes(original)
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--verify", "--no-progress"]) == 0
    after = _attempts_by_quantum(workdir / "repo", run, capsys)
    rerun = {q for q, a in after.items() if len(a) > len(attempts[q])}
    assert rerun == {bad_q, f"visit_summary:instrument=SimCam, visit={visit}"}

    # a same-size change to a finished output: plain restart does not see it, --verify does
    other = next(r for r in repo.query("source", [run]) if r.data_id["visit"] != visit)
    _flip_byte(repo.path_of(other), offset_from_end=repo.path_of(other).stat().st_size // 2)
    capsys.readouterr()
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    assert "nothing to re-run" in capsys.readouterr().out
    assert main(["restart", run, "--repo", str(workdir / "repo"), "--verify", "--no-progress"]) == 0
    final = _attempts_by_quantum(workdir / "repo", run, capsys)
    rerun2 = {q for q, a in final.items() if len(a) > len(after[q])}
    ov, od = other.data_id["visit"], other.data_id["detector"]
    assert rerun2 == {f"single_frame:instrument=SimCam, visit={ov}, detector={od}",
                      f"visit_summary:instrument=SimCam, visit={ov}"}


@pytest.mark.slow
def test_full_disk_then_restart_same_outputs(workdir, capsys):
    """Issue #9: the repository's file system fills during a run (a real tmpfs, too small for the
    outputs): a clear message naming the lack of space, exit 1, no half-written or unregistered
    file; after space is freed, `restart` completes with the outputs of an undisturbed run."""
    import shutil as sh

    mnt = workdir / "small-fs"
    mnt.mkdir()
    inputs_mib = sum(p.stat().st_size for p in (workdir / "repo").rglob("*") if p.is_file()) / 2**20
    size_mib = int(inputs_mib + 30)  # room for the inputs and a few of the 8 quanta's outputs
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        sh.copytree(workdir / "repo", mnt / "repo")
        campaign = write_campaign(workdir)
        text = campaign.read_text().replace("repo: repo", f"repo: {mnt / 'repo'}")
        campaign.write_text(text)
        capsys.readouterr()
        code = main(["submit", str(campaign), "--run", "dp-test/full", "--no-progress"])
        out = capsys.readouterr()
        assert code == 1
        said = (out.out + out.err).lower()
        assert "no space left" in said or "disk is full" in said, said[-2000:]
        assert "storagefull" in said.replace(" ", "")
        assert not list((mnt / "repo").rglob(f"{TMP_PREFIX}*"))  # nothing half-written
        repo = Repository.open(mnt / "repo")
        registered = {repo.path_of(r) for r in repo.query(None, ["dp-test/full"])}
        on_disk = {p for p in (mnt / "repo" / "dp-test" / "full").rglob("*.*")
                   if p.is_file() and "_plan" not in p.parts and "_parsl" not in p.parts and "_running" not in p.parts}
        assert on_disk <= registered  # no unregistered output
        repo.close()

        subprocess.run(["mount", "-o", f"remount,size={size_mib + 400}m", str(mnt)], check=True)
        assert main(["restart", "dp-test/full", "--repo", str(mnt / "repo"), "--no-progress"]) == 0
        report = _report(mnt / "repo", "dp-test/full", capsys)
        assert report["complete"] and report["totals"]["succeeded"] == 8
        assert main(["submit", str(campaign), "--run", "dp-test/clean", "--no-progress"]) == 0
        assert _table_equal(Repository.open(mnt / "repo"), "dp-test/clean", "dp-test/full")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
