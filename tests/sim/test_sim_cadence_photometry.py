"""Cadence, observing conditions and the zero-point convention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsst_prod.config.simulation import SimulationConfig
from lsst_prod.sim.cadence import (
    VisitTruth,
    airmass_kasten_young,
    alt_az,
    day_obs_of,
    make_visits,
    psf_at,
    sky_e_per_pix,
    zero_point,
)
from lsst_prod.sim.render import render_ccd
from lsst_prod.sim.spec import AB_NJY_ZERO_POINT, electrons_from_njy, make_sim_camera, mag_to_njy, njy_to_mag
from lsst_prod.sim.survey import build_survey


@pytest.fixture(scope="module")
def default_visits():
    config = SimulationConfig()
    camera = make_sim_camera(config)
    return config, camera, make_visits(config, camera)


def test_visit_ids_day_obs_and_times(default_visits):
    config, _, visits = default_visits
    assert len(visits) == config.n_visits
    ids = [v.visit for v in visits]
    assert len(set(ids)) == len(ids) and all(i < 2**33 for i in ids)
    mjds = [v.mjd_start for v in visits]
    assert mjds == sorted(mjds)
    tai_minus_utc = 37.0 / 86400.0
    for v in visits:
        assert v.visit == (v.day_obs - 20000000) * 10000 + v.seq and 1 <= v.seq <= 9999
        assert v.day_obs == day_obs_of(v.mjd_start - tai_minus_utc)
        assert v.mjd_mid - v.mjd_start == pytest.approx(v.exptime / 2 / 86400, abs=1e-9)
        assert 1.0 <= v.airmass < 2.0 and v.zenith_distance == pytest.approx(90 - v.altitude)
        assert config.seeing_min_arcsec <= v.seeing_fwhm_boresight_arcsec <= config.seeing_max_arcsec
        assert v.physical_filter == f"{v.band}_sim"
        # pointing: commanded within the dither disk, true within ~5 sigma of commanded
        d_cmd = math.hypot((v.cmd_ra - config.field_ra_deg) * math.cos(math.radians(v.cmd_dec)),
                           v.cmd_dec - config.field_dec_deg) * 3600
        assert d_cmd <= config.dither_radius_arcsec + 1e-6
        d_err = math.hypot((v.true_ra - v.cmd_ra) * math.cos(math.radians(v.cmd_dec)), v.true_dec - v.cmd_dec) * 3600
        assert d_err < 6 * config.pointing_error_rms_arcsec
    assert {v.band for v in visits} == set(config.bands)
    assert {v.day_obs for v in visits} == {int(d.strftime("%Y%m%d")) for d in config.night_dates()}


def test_record_has_the_registry_keys(default_visits):
    config, _, visits = default_visits
    rec = visits[0].record(config.instrument)
    assert set(rec) == {"visit", "instrument", "band", "physical_filter", "day_obs", "exposure_time", "mjd_start",
                        "mjd_mid", "ra", "dec", "rotation", "airmass", "altitude", "azimuth", "zenith_distance"}


def test_site_geometry():
    alt, az = alt_az(0.0, -30.0, -30.0)
    assert alt == pytest.approx(90.0)
    alt, az = alt_az(0.0, 2.0, -30.0)
    assert alt == pytest.approx(58.0) and az == pytest.approx(0.0, abs=1e-9)  # transits due North
    alt, az = alt_az(-2.0, 2.0, -30.0)
    assert 0 < az < 90  # rising in the North-East
    assert airmass_kasten_young(90.0) == pytest.approx(1.0, abs=1e-3)
    assert airmass_kasten_young(30.0) == pytest.approx(1.995, abs=0.01)


def test_psf_variation_bounds(default_visits):
    config, camera, visits = default_visits
    r = config.focal_plane_radius_pix()
    for v in visits:
        f0, _, _ = psf_at(v, 0.0, 0.0)
        fc, _, _ = psf_at(v, *(np.array([1, 1]) * r / math.sqrt(2)))
        assert fc / f0 == pytest.approx(1 + config.psf_fwhm_growth_frac, rel=0.01)
        hw = 1044 + config.render_margin_pix  # layout half width + render margin
        hh = 512 + config.render_margin_pix
        uu, vv = np.meshgrid(np.linspace(-hw, hw, 9), np.linspace(-hh, hh, 9))
        _, g1, g2 = psf_at(v, uu, vv)
        assert np.max(np.hypot(g1, g2)) <= config.psf_g_max + 1e-12
        assert np.max(np.hypot(g1, g2)) > 0


def test_ab_conventions():
    assert mag_to_njy(31.4) == pytest.approx(1.0)
    assert njy_to_mag(3631e9) == pytest.approx(0.0, abs=1e-3)
    assert electrons_from_njy(1000.0, AB_NJY_ZERO_POINT) == pytest.approx(1000.0)


def test_zero_point_formula_and_truth(make_config):
    config = make_config(zero_point_offset_rms_mmag=60.0)
    survey = build_survey(config)
    for v in survey.visits:
        for det in survey.camera.detectors:
            qe = survey.qe[(det.id, v.band)]
            expected = (config.zero_point_mag[v.band] + 2.5 * math.log10(config.exposure_time_s)
                        - config.extinction_mag_per_airmass[v.band] * (v.airmass - 1.0)
                        - v.transparency_mag + 2.5 * math.log10(qe))
            assert zero_point(config, v, qe) == pytest.approx(expected, abs=1e-12)
    # the truth tables carry it and flux_e follows from it
    v = survey.visits[0]
    r = render_ccd(config, v.visit, 0)
    zp = r.ccdvisit["zero_point"]
    assert zp == pytest.approx(zero_point(config, v, survey.qe[(0, v.band)]))
    s = r.sources
    assert np.allclose(s["flux_e"], s["flux_nJy"] * 10 ** (0.4 * (zp - 31.4)), rtol=1e-12)
    assert r.ccdvisit["sky_e_per_pix"] == pytest.approx(sky_e_per_pix(config, v, survey.qe[(0, v.band)]))
    # the truth row rebuilds the visit truth exactly
    assert VisitTruth.from_row(r.ccdvisit) == v


def test_transparency_offsets_scale_with_config(make_config):
    config = make_config(zero_point_offset_rms_mmag=80.0, n_nights=4, visits_per_night_per_band=4,
                         nights_per_season=4, night_spacing_days=1)
    camera = make_sim_camera(config)
    t = np.array([v.transparency_mag for v in make_visits(config, camera)])
    assert 0.04 < t.std() < 0.12


def test_field_below_the_horizon_is_a_config_error_naming_the_keys(tmp_path, capsys):
    """dec +75 from latitude -30 never rises (highest altitude 90 - 105 = -15 deg): a clear error naming
    the campaign file and the keys, not a ValueError traceback from the airmass formula."""
    import pydantic
    import yaml

    from lsst_prod.cli import main
    from lsst_prod.config.simulation import SimulationConfig

    with pytest.raises(pydantic.ValidationError, match="field_dec_deg = 75.0 never rises.*site_latitude_deg = -30"):
        SimulationConfig(field_dec_deg=75.0, site_latitude_deg=-30.0)
    # rises (transit at 35 deg) but is below the horizon at the end of a +-8 h night
    with pytest.raises(pydantic.ValidationError, match="altitude -.* at hour angle 8 h.*hour_angle_min_h"):
        SimulationConfig(field_dec_deg=-5.0, site_latitude_deg=-60.0, hour_angle_min_h=-8.0, hour_angle_max_h=8.0)
    SimulationConfig(field_dec_deg=75.0, site_latitude_deg=31.96)  # the sparse-north survey: fine
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "campaigns" / "dp-mini.yaml").read_text())
    doc["simulation"].update(field_dec_deg=75.0, site_latitude_deg=-30.0)
    doc["site"] = str(root / "sites" / "local.yaml")
    path = tmp_path / "north.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    assert main(["simulate", str(path), "--repo", str(tmp_path / "repo")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "north.yaml" in err and "field_dec_deg" in err and "site_latitude_deg" in err and "Traceback" not in err


def test_camera_carries_the_optical_designs_distortion_not_the_true_one(default_visits):
    """The pipeline's camera holds the design k (camera_distortion_model_error off the truth, 5 % by
    default); the truth tables hold the true k the pixels were rendered with."""
    config, camera, visits = default_visits
    assert camera.distortion_k_per_pix2 == pytest.approx(config.distortion_k_per_pix2 * 1.05, rel=1e-12)
    assert all(v.distortion_k == config.distortion_k_per_pix2 for v in visits)
    exact = make_sim_camera(config.model_copy(update={"camera_distortion_model_error": 0.0}))
    assert exact.distortion_k_per_pix2 == config.distortion_k_per_pix2
