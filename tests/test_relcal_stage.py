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


def test_thin_ccdvisit_is_set_aside_and_the_rest_calibrated(workdir, capsys):
    """A ccdvisit with too few stars to tie it to the others is set aside (recorded, NaN zero point,
    no calibrated Source table), the calibration is solved on the rest, and the warps of its visit
    are made from the other detector.  The minimum is raised above the thinnest ccdvisit's count
    from a first run, so which ccdvisit is thin is known."""
    campaign = write_campaign(workdir)
    base = campaign.read_text()
    chain = "  single_frame: {{}}\n  relcal: {{mpi_ranks: 1, astrometry_order: 3{extra}}}\n  warp: {{}}\n"
    campaign.write_text(base.replace("  single_frame: {}\n", chain.format(extra="").replace("  warp: {}\n", "")))
    assert main(["submit", str(campaign), "--run", "thin/1", "--no-progress"]) == 0
    repo = Repository.open(workdir / "repo")
    first = _solution(repo, "thin/1")
    assert np.all(first["setAside"] == "") and np.all(np.isfinite(first["zeroPoint"]))
    counts = first["nStarsAstrometry"]
    thinnest = int(first["ccdVisitId"][np.argmin(counts)])
    minimum = int(counts.min()) + 1
    assert minimum < np.sort(counts)[1], "the test needs one ccdvisit clearly thinner than the others"
    campaign.write_text(base.replace("  single_frame: {}\n",
                                     chain.format(extra=f", min_stars_per_ccdvisit_astrometry: {minimum}")))
    assert main(["submit", str(campaign), "--run", "thin/2", "--no-progress"]) == 0
    second = _solution(repo, "thin/2")
    aside = second["setAside"] != ""
    assert thinnest in set(second["ccdVisitId"][aside].tolist())
    assert aside.sum() <= 2 and np.all(np.isnan(second["zeroPoint"][aside]))
    assert np.all(second["nStarsAstrometry"][~aside] >= minimum)
    # the others are calibrated as well as before: zero points against the truth (common offset
    # removed), over the same ccdvisits, no worse than the first run's by more than 3 mmag
    truth = read_parquet(repo.get_path("truth_ccdvisits", {}, ["truth"])).to_pydict()
    true_zp = {(int(v), int(d)): z for v, d, z in zip(truth["visit"], truth["detector"], truth["zero_point"])}

    def zp_rms(sol):
        keep = np.isin(sol["ccdVisitId"], second["ccdVisitId"][~aside])
        d = sol["zeroPoint"][keep] - [true_zp[(int(v), int(x))] for v, x in zip(sol["visit"][keep],
                                                                                 sol["detector"][keep])]
        return float(np.std(d - d.mean()))

    assert zp_rms(second) <= zp_rms(first) + 0.003, (zp_rms(first), zp_rms(second))
    assert len(repo.query("source_calibrated", ["thin/2"])) == len(counts) - aside.sum()
    (stars,) = repo.query("relcal_stars", ["thin/2"])
    st = read_parquet(repo.path_of(stars))
    assert st.num_rows > 100 and np.all(np.isfinite(st.column("pmRa").to_numpy()))
    report = report_json(workdir / "repo", "thin/2", capsys)
    (ex,) = [e for e in report["excluded"] if e["stage"] == "relcal"]
    assert ex["n_excluded"] == 2 * aside.sum() and ("usable stars" in ex["why"] or "matched" in ex["why"])
    thin_visit = int(second["visit"][aside][0])
    warps = [e for e in report["excluded"] if e["stage"] == "warp" and e["data_id"]["visit"] == thin_visit]
    warp_status = {q["quantum_id"]: q["status"] for q in report["quanta"] if q["stage"] == "warp"}
    assert all(s in ("succeeded", "nowork") for s in warp_status.values())
    assert warps and all("set aside by relcal" in e["why"] for e in warps)
