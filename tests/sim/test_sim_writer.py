"""simulate_to_repo: every dataset lands in the repository, in parallel or not, idempotently."""

from __future__ import annotations

import json

import fitsio
import numpy as np
import pyarrow.parquet as pq
import pytest

from lsst_prod.camera import Camera
from lsst_prod.repo import Repository
from lsst_prod.sim.writer import simulate_to_repo

TYPES = ["camera", "raw", "bias", "flat", "defects", "refcat", "truth_objects", "truth_ccdvisits", "truth_sources"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, make_config):
    config = make_config(seed=31)
    root = tmp_path_factory.mktemp("simrepo")
    calls = []
    summary = simulate_to_repo(config, root, progress=lambda d, t: calls.append((d, t)), max_workers=2)
    return config, root, summary, calls


def _checksums(root, dataset_type):
    repo = Repository.open(root)
    try:
        return {json.dumps(dict(r.data_id), sort_keys=True, default=str): r.checksum for r in repo.query(dataset_type)}
    finally:
        repo.close()


def test_everything_is_registered(written):
    config, root, summary, calls = written
    n_ccd = summary["n_visits"] * summary["n_detectors"]
    assert summary["n_raws"] == n_ccd == 4 and summary["workers"] == 2
    assert calls[0] == (0, n_ccd) and calls[-1] == (n_ccd, n_ccd)
    repo = Repository.open(root)
    try:
        counts = {t: len(repo.query(t)) for t in TYPES}
        assert counts == {"camera": 1, "raw": 4, "bias": 2, "flat": 4, "defects": 2, "refcat": 1, "truth_objects": 1,
                          "truth_ccdvisits": 1, "truth_sources": 4}
        visits = repo.visits(config.instrument)
        assert sorted(v["visit"] for v in visits) == sorted(summary["visits"])
        v0 = visits[0]
        cam = Camera.from_json(repo.get_path("camera", {"instrument": "SimCam"}, ["SimCam/calib"]).read_text())
        det = cam.detector(1)
        raw, hdr = fitsio.read(str(repo.get_path("raw", {"instrument": "SimCam", "visit": v0["visit"], "detector": 1},
                                                 ["SimCam/raw"])), header=True)
        assert raw.dtype == np.uint16 and raw.shape == (det.ny, det.nx + det.overscan)
        assert hdr["EXPID"] == v0["visit"] and hdr["DETECTOR"] == 1 and hdr["FILTER"] == v0["physical_filter"]
        assert hdr["RA"] == pytest.approx(v0["ra"]) and hdr["MJD-OBS"] == pytest.approx(v0["mjd_start"])
        assert hdr["DATASEC"] == f"[1:{det.nx},1:{det.ny}]"
        assert hdr["BIASSEC"] == f"[{det.nx + 1}:{det.nx + det.overscan},1:{det.ny}]"
        for key in ("TELESCOP", "INSTRUME", "OBSID", "DETNAME", "DATE-OBS", "EXPTIME", "DARKTIME", "ROTPA", "AIRMASS",
                    "ALTITUDE", "AZIMUTH", "DAYOBS", "SEQNUM", "GAIN", "RDNOISE", "SATURATE", "BUNIT", "CTYPE1",
                    "CRVAL1", "CRPIX1", "CD1_1", "CD2_2"):
            assert key in hdr, key
        flat = fitsio.read(str(repo.get_path("flat", {"instrument": "SimCam", "detector": 0, "physical_filter": "r_sim"},
                                             ["SimCam/calib"])))
        assert flat.dtype == np.float32 and flat.mean() == pytest.approx(1.0, abs=1e-5)
        bias = fitsio.read(str(repo.get_path("bias", {"instrument": "SimCam", "detector": 0}, ["SimCam/calib"])))
        assert bias.dtype == np.float32 and bias.shape == (det.ny, det.nx)
        defects = fitsio.read(str(repo.get_path("defects", {"instrument": "SimCam", "detector": 0}, ["SimCam/calib"])))
        assert defects.dtype == np.uint8 and defects.sum() > 0
        ccd = pq.read_table(repo.get_path("truth_ccdvisits", {}, ["truth"]))
        assert ccd.num_rows == 4
        src = pq.read_table(repo.get_path("truth_sources", {"instrument": "SimCam", "visit": v0["visit"], "detector": 1},
                                          ["truth"]))
        assert src.num_rows > 0 and json.loads(src.schema.metadata[b"units"])["x"] == "pixel"
    finally:
        repo.close()


def test_serial_run_is_identical_and_rerun_is_idempotent(written, tmp_path):
    config, root, summary, _ = written
    simulate_to_repo(config, tmp_path, max_workers=1)
    for t in TYPES:  # byte-identical files whatever the parallelism
        assert _checksums(tmp_path, t) == _checksums(root, t), t
    before = _checksums(tmp_path, "raw")
    again = simulate_to_repo(config, tmp_path, max_workers=1)
    assert again["n_raws"] == summary["n_raws"]
    assert _checksums(tmp_path, "raw") == before
    repo = Repository.open(tmp_path)
    try:
        assert len(repo.query("raw")) == 4 and len(repo.visits(config.instrument)) == 2
    finally:
        repo.close()
