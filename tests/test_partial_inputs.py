"""One failed single-frame quantum does not stop a release: the gather stages (visit_summary,
relcal, warp, coadd, objects, forced) run on what exists, `report` names what they left out,
and `restart` (the injection only hits attempt 1) re-runs exactly the failed quantum and the
quanta downstream of it, which then run on everything."""

from __future__ import annotations

import json

import pytest

from _helpers import inject_single_frame, last_line, report_json, write_campaign
from lsst_prod.cli import main
from lsst_prod.execution.runs import load_run, quanta_to_rerun
from lsst_prod.repo import Repository

pytestmark = pytest.mark.slow

CHAIN = ("  single_frame: {}\n  visit_summary: {}\n  relcal: {mpi_ranks: 1, astrometry_order: 3}\n  warp: {}\n"
         "  coadd: {kinds: [deep]}\n  objects: {}\n  forced: {}\n")


def test_failed_single_frame_leaves_the_release_running(workdir, capsys):
    repo_path = workdir / "repo"
    repo = Repository.open(repo_path)
    visit = min(v["visit"] for v in repo.visits())
    extra = inject_single_frame(visit, 1)
    campaign = write_campaign(workdir, extra=extra)
    campaign.write_text(campaign.read_text().replace("  single_frame: {}\n", CHAIN))
    assert main(["submit", str(campaign), "--no-progress"]) == 1  # one quantum failed
    out = capsys.readouterr().out
    run = last_line(out)
    assert "ran on partial inputs" in out
    failed_id = f"single_frame:instrument=SimCam, visit={visit}, detector=1"

    report = report_json(repo_path, run, capsys)
    st = report["stages"]
    assert report["totals"]["failed"] == 1 and report["failures"][0]["quantum_id"] == failed_id
    # every gather stage ran: a Visit row, the global calibration, coadds, objects, forced photometry
    for stage in ("visit_summary", "relcal", "coadd", "objects", "forced"):
        assert st[stage]["succeeded"] >= 1, (stage, st[stage])
    assert st["relcal"]["succeeded"] == 1 and st["relcal"]["partial"] == 1
    assert st["visit_summary"]["partial"] == 1
    # only what needs the lost calexp itself is blocked: its forced photometry, and warps that
    # only that detector covered
    blocked = [f for f in report["failures"] if f["status"] == "blocked"]
    assert {f["quantum_id"].split(":")[0] for f in blocked} <= {"forced", "warp"}
    assert any(f["quantum_id"] == f"forced:instrument=SimCam, visit={visit}, detector=1" for f in blocked)
    relcal = next(p for p in report["partial"] if p["stage"] == "relcal")
    assert sorted(x["dataset_type"] for x in relcal["left_out"]) == ["ccdVisit", "source"]
    assert all(x["producer"] == failed_id and "AlgorithmError" in x["reason"] for x in relcal["left_out"])
    assert report["totals"]["partial"] >= 2
    # validate computes its metrics on what exists and says what was left out
    capsys.readouterr()
    main(["validate", run, "--repo", str(repo_path), "--json"])
    lo = json.loads(capsys.readouterr().out)["left_out"]
    assert lo["single_frame"]["failed"] == 1
    assert lo["relcal"]["partial"] == 1 and lo["relcal"]["inputs_left_out"] == 2

    # restart: exactly the failed quantum and everything downstream of it (the gathers among them)
    repo = Repository.open(repo_path)
    _, graph = load_run(repo, run)
    planned = quanta_to_rerun(repo, run, graph)
    repo.close()
    assert planned == {failed_id} | graph.descendants([failed_id])
    partial_ids = {p["quantum_id"] for p in report["partial"]}
    assert partial_ids <= planned
    assert main(["restart", run, "--repo", str(repo_path), "--no-progress"]) == 0
    report2 = report_json(repo_path, run, capsys)
    assert report2["complete"] and report2["partial"] == [] and report2["totals"]["inputs_left_out"] == 0
    by_id = {q["quantum_id"]: q for q in report2["quanta"]}
    assert {qid for qid, q in by_id.items() if len(q["attempts"]) >= 2} <= planned
    assert all(by_id[qid]["status"] in ("succeeded", "nowork") for qid in planned)
    assert all(len(q["attempts"]) == 1 for qid, q in by_id.items() if qid not in planned)
    assert by_id[failed_id]["attempts"][-1]["outcome"] == "succeeded"
    assert last_line(out) == run
