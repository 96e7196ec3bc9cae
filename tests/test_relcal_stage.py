"""The relcal stage end to end: single_frame -> relcal (MPI, mpiexec) on the tiny survey.

2 MPI ranks give the serial (1 rank) solution to 1e-9 relative; the calibrated Source tables
and the solution are written; the report carries the stage's summary.
"""

from __future__ import annotations

import numpy as np
import pytest

from _helpers import report_json, write_campaign
from lsst_prod.cli import main
from lsst_prod.repo import Repository
from lsst_prod.repo.formats import read_parquet

pytestmark = pytest.mark.slow


def _solution(repo: Repository, run: str) -> dict[str, np.ndarray]:
    (ref,) = repo.query("relcal_solution", [run])
    t = read_parquet(repo.path_of(ref))
    return {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.column_names}


def test_relcal_two_ranks_equal_one_rank(workdir, capsys):
    campaign = write_campaign(workdir)
    base = campaign.read_text()
    for ranks in (2, 1):
        campaign.write_text(base.replace("  single_frame: {}\n", f"  single_frame: {{}}\n  relcal: {{mpi_ranks: {ranks}, "
                                                                  "astrometry_order: 3}\n"))
        assert main(["submit", str(campaign), "--run", f"relcal/{ranks}", "--no-progress"]) == 0
    repo = Repository.open(workdir / "repo")
    two, one = _solution(repo, "relcal/2"), _solution(repo, "relcal/1")
    assert np.array_equal(two["ccdVisitId"], one["ccdVisitId"]) and len(two["ccdVisitId"]) == 8
    for col in ("zeroPoint", "zeroPointErr"):
        np.testing.assert_allclose(two[col], one[col], rtol=1e-9, atol=0)
    assert list(two["astromCorrection"]) != [] and all(a == b or _close_json(a, b)
                                                       for a, b in zip(two["astromCorrection"], one["astromCorrection"]))
    report = report_json(workdir / "repo", "relcal/2", capsys)
    (q,) = [q for q in report["quanta"] if q["stage"] == "relcal"]
    summary = q["attempts"][-1]["summary"]
    assert summary["mpi_size"] == 2 and summary["n_stars"] > 100 and summary["phot_chi2_dof"] < 3
    assert len(repo.query("source_calibrated", ["relcal/2"])) == 8


def _close_json(a: str, b: str) -> bool:
    import json

    da, db = json.loads(a), json.loads(b)
    return all(np.allclose(np.asarray(da[k]), np.asarray(db[k]), rtol=1e-9, atol=1e-12) for k in da)
