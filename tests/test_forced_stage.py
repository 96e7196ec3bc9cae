"""ForcedStage on a hand-made quantum: stars of relcal's astrometric solution (relcal_stars) are measured
where they are at the calexp's epoch, in the calexp's own WCS frame (relcal's per-ccdvisit correction
removed); without relcal_stars every object stays at its coadd position, and the stage says so."""

from __future__ import annotations

import json
import logging

import galsim
import numpy as np
import pytest
from astropy.wcs import WCS

from lsst_prod.algorithms.apcorr import ApertureCorrection
from lsst_prod.algorithms.astrometry import propagate_positions
from lsst_prod.algorithms.psf import PsfModel
from lsst_prod.algorithms.relcal_astrometry import gnomonic, inverse_gnomonic
from lsst_prod.config.stages import ForcedConfig
from lsst_prod.repo import DataId, Repository
from lsst_prod.repo.formats import Exposure, read_columns, read_parquet, table_from_columns, write_exposure, write_parquet
from lsst_prod.stages.base import QuantumContext
from lsst_prod.stages.objects import ForcedStage

MAS_PER_RAD = np.rad2deg(1.0) * 3.6e6
RA0, DEC0, T0 = 150.0, 2.2, 61000.0
SHAPE, SKY, FWHM = (128, 128), 100.0, 4.0
SHIFT_MAS = (25.0, -15.0)  # relcal's correction of this ccdvisit: the calexp WCS is off by minus this
RUN = "t/1"


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [64.5, 64.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _psf() -> PsfModel:
    stamp = galsim.Moffat(beta=3.5, fwhm=FWHM).drawImage(nx=25, ny=25, scale=1.0, method="no_pixel").array
    return PsfModel(stamp[None] / stamp.sum(), 0, SHAPE, 10, 0, 0.0, 1.0)


def _on_calexp(ra, dec, wcs):
    """Pixel where light from calibrated (ra, dec) falls: the calexp WCS is off by -SHIFT_MAS."""
    xi, eta = gnomonic(ra, dec, RA0, DEC0)
    r, d = inverse_gnomonic(xi - SHIFT_MAS[0] / MAS_PER_RAD, eta - SHIFT_MAS[1] / MAS_PER_RAD, RA0, DEC0)
    return wcs.all_world2pix(r, d, 0)


def _stars(mjd):
    """Three stars (one moving 80 mas/yr with 6 mas parallax, two nearly still) and one galaxy."""
    xi = np.array([-6.0, 5.0, 0.5, 7.0]) / 3600 / 57.29578  # arcsec -> rad
    eta = np.array([-4.0, 6.0, -7.0, -5.0]) / 3600 / 57.29578
    ra, dec = inverse_gnomonic(xi, eta, RA0, DEC0)
    pmra, pmdec, plx = np.array([64.0, 1.0, -2.0, 0.0]), np.array([-48.0, 0.5, 1.0, 0.0]), np.array([6.0, 0.3, 0.0, 0.0])
    now = propagate_positions(ra, dec, pmra, pmdec, plx, T0, mjd)
    return ra, dec, pmra, pmdec, plx, now


def _setup(tmp_path, with_stars: bool, apcorr_err: float | None = None, config: ForcedConfig | None = None):
    rng = np.random.default_rng(4)
    repo = Repository.create(tmp_path / "repo")
    mjd = T0 + 1.5 * 365.25  # the moving star is 120 mas (0.6 px) from its T0 position, 0.43 px on the calexp
    wcs, psf = _wcs(), _psf()
    ra, dec, pmra, pmdec, plx, (nra, ndec) = _stars(mjd)
    flux = np.array([4e5, 2e5, 1e5, 3e5])
    x, y = _on_calexp(nra, ndec, wcs)
    model = np.zeros(SHAPE)
    for i in range(4):
        st = psf.image_at(x[i], y[i], 25) * flux[i]
        if i == 3:  # the galaxy: a wider profile
            st = galsim.Gaussian(sigma=3.0).drawImage(nx=25, ny=25, scale=1.0, method="no_pixel",
                                                      offset=(x[i] - round(x[i]), y[i] - round(y[i]))).array * flux[i]
        ix, iy = int(round(x[i])), int(round(y[i]))
        model[iy - 12: iy + 13, ix - 12: ix + 13] += st
    var = SKY + model
    image = model + rng.normal(size=SHAPE) * np.sqrt(var)
    did = DataId(instrument="SimCam", visit=1, detector=0)
    extra = {}
    if apcorr_err is not None:  # a constant aperture correction of 1 known to apcorr_err
        apc = ApertureCorrection(0, np.array([1.0]), np.array([[apcorr_err**2]]), SHAPE, 20, 0.0, apcorr_err, 0.0)
        extra["APCORR"] = (np.zeros(1, np.float32), {"APCDICT": json.dumps(apc.to_dict())})
    exp = Exposure(image.astype(np.float32), np.zeros(SHAPE, np.uint32), var.astype(np.float32),
                   {"BAND": "r", "MAGZERO": 31.4, "MJD-MID": mjd}, dict(wcs.to_header()), psf.to_fits(), extra)
    inputs = {("calexp", did): repo.stage_file("calexp", did, RUN, lambda p: write_exposure(p, exp))}
    # Objects at the coadd (mean-epoch) position = the stars' positions at T0 with this parallax-free model
    # (the test's mean epoch is T0); the galaxy is extended
    obj = {"objectId": np.arange(1, 5, dtype=np.int64), "coord_ra": ra, "coord_dec": dec,
           "detect_isPrimary": np.ones(4, bool), "refExtendedness": np.array([0.0, 0.0, 0.0, 1.0]),
           "refBand": np.array(["r"] * 4), "r_psfFlux": flux, "r_psfFluxErr": flux / 300,
           "r_ixx": np.full(4, 2.9), "r_iyy": np.full(4, 2.9)}
    odid = DataId(skymap="s", tract=1, patch=2)
    inputs[("object", odid)] = repo.stage_file("object", odid, RUN,
                                               lambda p: write_parquet(p, table_from_columns(obj, {}, {})))
    inst = DataId(instrument="SimCam")
    corr = {"ccdvisit_id": 1, "order": 0, "center_ra": RA0, "center_dec": DEC0, "x0": 63.5, "y0": 63.5,
            "scale": 63.5, "xi_coeffs": [SHIFT_MAS[0]], "eta_coeffs": [SHIFT_MAS[1]]}
    sol = {"visit": np.array([1]), "detector": np.array([0]), "zeroPoint": np.array([31.4]),
           "astromCorrection": np.array([json.dumps(corr)])}
    inputs[("relcal_solution", inst)] = repo.stage_file("relcal_solution", inst, RUN,
                                                        lambda p: write_parquet(p, table_from_columns(sol, {}, {})))
    if with_stars:  # the three stars (no galaxy), their solution exact, at T0
        stars = {"starId": np.array([10, 11, 12], np.int64), "ra": ra[:3], "dec": dec[:3], "pmRa": pmra[:3],
                 "pmDec": pmdec[:3], "parallax": plx[:3], "epochMjd": np.full(3, T0), "raErr": np.full(3, 3.0),
                 "decErr": np.full(3, 3.0), "pmRaErr": np.full(3, 1.0), "pmDecErr": np.full(3, 1.0),
                 "nMeasurements": np.full(3, 20, np.int64), "refId": np.array([-1, 5, -1], np.int64)}
        inputs[("relcal_stars", inst)] = repo.stage_file("relcal_stars", inst, RUN,
                                                         lambda p: write_parquet(p, table_from_columns(stars, {}, {})))
    ctx = QuantumContext(repo, RUN, "forced", did, config or ForcedConfig(), inputs, release_id=1,
                         log=logging.LoggerAdapter(logging.getLogger("test_forced_stage"), {}))
    return ctx, flux, (x, y)


def _run(ctx):
    ForcedStage().run_quantum(ctx)
    (ref,) = [r for r in ctx.outputs if r.dataset_type == "forcedSource"]
    return read_columns(ctx.repo.path_of(ref)), read_parquet(ctx.repo.path_of(ref)).schema.metadata


def test_stars_are_measured_where_they_are_at_the_epoch(tmp_path):
    ctx, flux, (x, y) = _setup(tmp_path, with_stars=True)
    fs, meta = _run(ctx)
    order = np.argsort(fs["objectId"])
    fs = {k: v[order] for k, v in fs.items()}
    assert fs["coord_propagated"].tolist() == [True, True, True, False]
    assert fs["relcalStarId"].tolist() == [10, 11, 12, -1]
    # measured exactly where the light is (proper motion, parallax, relcal's correction removed)
    assert np.hypot(fs["x"][:3] - x[:3], fs["y"][:3] - y[:3]).max() < 1e-3
    pull = (fs["psfFlux"][:3] - flux[:3]) / fs["psfFluxErr"][:3]
    print("pulls at the propagated positions", np.round(pull, 2))
    assert np.all(np.abs(pull) < 4)
    assert ctx.summary["n_moved"] == 3 and ctx.summary["positions"] == "relcal_stars"
    assert ctx.summary["relcal_correction_applied"] is True
    assert ctx.summary["object_epochs"]["1/2"]["n_matched"] == 3
    assert json.loads(meta[b"positions"]) == "relcal_stars"


def test_without_relcal_stars_objects_stay_at_their_coadd_positions(tmp_path, caplog):
    """The run still succeeds and says so; the moving star (0.43 px from its coadd position on this
    calexp) comes out low by the expected 1.3 % (a Moffat of FWHM 4 px fitted 0.43 px off:
    1 - sum(p0 p_d) / sum(p0^2)), 7 sigma."""
    ctx, flux, (x, y) = _setup(tmp_path, with_stars=False)
    with caplog.at_level(logging.WARNING, logger="test_forced_stage"):
        fs, meta = _run(ctx)
    assert "no relcal_stars input" in caplog.text
    assert ctx.summary["n_moved"] == 0 and ctx.summary["positions"].startswith("object")
    assert json.loads(meta[b"positions"]).startswith("object")
    i = int(np.flatnonzero(fs["objectId"] == 1)[0])
    assert not fs["coord_propagated"][i] and fs["relcalStarId"][i] == -1
    psf = _psf()
    off = np.hypot(fs["x"][i] - x[0], fs["y"][i] - y[0])
    p0 = psf.image_at(fs["x"][i], fs["y"][i], 25)
    pd = np.zeros(SHAPE)
    ix, iy = int(round(fs["x"][i])), int(round(fs["y"][i]))
    stp = psf.image_at(x[0], y[0], 25)
    jx, jy = int(round(x[0])), int(round(y[0]))
    pd[jy - 12: jy + 13, jx - 12: jx + 13] = stp
    expect = (p0 * pd[iy - 12: iy + 13, ix - 12: ix + 13]).sum() / (p0 * p0).sum()
    ratio = fs["psfFlux"][i] / flux[0]
    print(f"offset {off:.2f} px: ratio {ratio:.4f}, expected {expect:.4f} +- {fs['psfFluxErr'][i] / flux[0]:.4f}")
    assert off > 0.4 and expect < 0.99
    assert abs(ratio - expect) < 4 * fs["psfFluxErr"][i] / flux[0]
    assert (ratio - 1) / (fs["psfFluxErr"][i] / flux[0]) < -5  # a significant bias


def test_plan_adds_relcal_stars_when_produced(monkeypatch):
    """The planner gives each forced quantum relcal_stars when relcal produces it, and not otherwise."""
    from types import SimpleNamespace

    import lsst_prod.stages.objects as objects_mod

    inst = DataId(instrument="SimCam")
    did = DataId(instrument="SimCam", visit=1, detector=0)
    base = {("calexp", did), ("object", DataId(skymap="s", tract=1, patch=2)), ("relcal_solution", inst)}
    monkeypatch.setattr(objects_mod, "detector_patches", lambda ctx, v, det: [(1, 2)])
    for produced, expect in ((base | {("relcal_stars", inst)}, True), (base, False)):
        ctx = SimpleNamespace(instrument="SimCam", produced=produced, visits=[{"visit": 1}], detectors=[0])
        (spec,) = ForcedStage().plan(ctx, ForcedConfig())
        assert (("relcal_stars", inst) in spec.inputs) is expect
        assert ("relcal_solution", inst) in spec.inputs


def test_errors_carry_the_aperture_correction_uncertainty(tmp_path):
    """With the calexp's aperture correction known to 1 %, psfFluxErrCalib = 1 % of |psfFlux| and psfFluxErr
    is the statistical error (the same run with calibration_errors off) in quadrature with it."""
    ctx, _, _ = _setup(tmp_path / "a", with_stars=True, apcorr_err=0.01)
    fs, _ = _run(ctx)
    ctx0, _, _ = _setup(tmp_path / "b", with_stars=True, apcorr_err=0.01, config=ForcedConfig(calibration_errors=False))
    fs0, _ = _run(ctx0)
    o, o0 = np.argsort(fs["objectId"]), np.argsort(fs0["objectId"])
    np.testing.assert_allclose(fs["psfFlux"][o], fs0["psfFlux"][o0])
    np.testing.assert_allclose(fs["psfFluxErrCalib"][o], 0.01 * np.abs(fs["psfFlux"][o]))
    np.testing.assert_allclose(fs["psfFluxErr"][o], np.hypot(fs0["psfFluxErr"][o0], fs["psfFluxErrCalib"][o]))
    assert np.all(fs0["psfFluxErrCalib"] == 0)
    assert np.all(fs["psfFluxErr"][o] > 2 * fs0["psfFluxErr"][o0])  # S/N ~ 500-1000 stars: calibration-limited
