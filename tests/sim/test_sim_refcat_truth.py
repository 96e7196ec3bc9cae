"""Reference catalog contents and the object truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsst_prod.sim.refcat import error_law, make_refcat
from lsst_prod.sim.render import render_ccd
from lsst_prod.sim.spec import KIND_STAR, njy_to_mag
from lsst_prod.sim.survey import build_survey
from lsst_prod.sim.truth import truth_objects_table


@pytest.fixture(scope="module")
def refcat_setup(make_config):
    config = make_config(detector_nx=512, detector_ny=512, dither_radius_arcsec=30.0)
    survey = build_survey(config)
    return config, survey, make_refcat(config, survey.sky)


def test_refcat_columns_and_units(refcat_setup):
    config, _, ref = refcat_setup
    expected = ["ref_id", "ra", "dec", "ra_err", "dec_err", "pmra", "pmdec", "pmra_err", "pmdec_err", "parallax",
                "parallax_err", "epoch_mjd", "g_flux", "g_fluxErr", "r_flux", "r_fluxErr", "is_variable"]
    assert ref.column_names == expected
    units = json.loads(ref.schema.metadata[b"units"])
    assert units["ra"] == "deg" and units["ra_err"] == "mas" and units["pmra"] == "mas/yr" and units["g_flux"] == "nJy"
    assert ref.schema.field("parallax").metadata[b"unit"] == b"mas"
    assert np.all(ref.column("epoch_mjd").to_numpy() == config.refcat_epoch_mjd)


def test_refcat_only_stars_and_limit(refcat_setup):
    config, survey, ref = refcat_setup
    sky = survey.sky
    band = config.effective_refcat_band
    assert band == "r"
    ids = ref.column("ref_id").to_numpy()
    idx = np.flatnonzero(sky.ref_id >= 0)
    assert np.array_equal(sky.ref_id[idx], ids)
    assert np.all(sky.kind[idx] == KIND_STAR)
    assert np.all(sky.mag[band][idx] < config.refcat_mag_limit)
    brighter = (sky.kind == KIND_STAR) & (sky.mag[band] < config.refcat_mag_limit)
    assert brighter.sum() == idx.size  # complete
    assert np.array_equal(ref.column("is_variable").to_numpy(), sky.is_variable[idx])


def test_refcat_errors_as_configured(refcat_setup):
    config, survey, ref = refcat_setup
    sky = survey.sky
    idx = np.flatnonzero(sky.ref_id >= 0)
    assert idx.size > 200
    m = sky.mag["r"][idx]
    err = ref.column("ra_err").to_numpy()
    assert np.allclose(err, error_law(m, config.refcat_mag_limit, config.refcat_pos_err_min_mas,
                                      config.refcat_pos_err_max_mas))
    assert err.min() >= config.refcat_pos_err_min_mas and err.max() <= config.refcat_pos_err_max_mas
    assert np.allclose(ref.column("pmra_err").to_numpy(), config.refcat_pm_err_scale_per_yr * err)
    assert np.allclose(ref.column("parallax_err").to_numpy(), config.refcat_parallax_err_scale * err)
    # the scatter of the reported values around the truth is what the errors say
    cosd = np.cos(np.deg2rad(sky.dec[idx]))
    pulls = {
        "ra": (ref.column("ra").to_numpy() - sky.ra[idx]) * cosd * 3.6e6 / err,
        "dec": (ref.column("dec").to_numpy() - sky.dec[idx]) * 3.6e6 / err,
        "pmra": (ref.column("pmra").to_numpy() - sky.pmra[idx]) / ref.column("pmra_err").to_numpy(),
        "parallax": (ref.column("parallax").to_numpy() - sky.parallax[idx]) / ref.column("parallax_err").to_numpy(),
    }
    for b in config.bands:
        f_err = ref.column(f"{b}_fluxErr").to_numpy()
        f_true = sky.flux_njy(b)[idx]
        frac = f_err / f_true
        assert frac.min() >= config.refcat_flux_err_min_frac - 1e-12
        assert frac.max() <= config.refcat_flux_err_max_frac + 1e-12
        pulls[b] = (ref.column(f"{b}_flux").to_numpy() - f_true) / f_err
    n = idx.size
    for name, p in pulls.items():
        assert abs(np.mean(p)) < 4 / np.sqrt(n), name
        assert np.std(p) == pytest.approx(1.0, abs=5 / np.sqrt(2 * n)), name


def test_refcat_density_per_detector_at_default_density(refcat_setup):
    """>= 60 reference stars per 1024^2 detector at the default density (scaled from this 512^2 run)."""
    config, survey, _ = refcat_setup
    v = survey.visits[0]
    r = render_ccd(config, v.visit, 0)
    n_ref = int(np.sum(survey.sky.ref_id[np.searchsorted(survey.sky.truth_id, r.sources["truth_id"])] >= 0))
    assert n_ref * 4 >= 60 * 1.2


def test_truth_objects_table(refcat_setup):
    config, survey, _ = refcat_setup
    t = truth_objects_table(config, survey.sky)
    for c in ["truth_id", "kind", "ra", "dec", "pmra", "pmdec", "parallax", "g_flux", "r_flux", "is_variable",
              "var_amp_mag", "var_period_d", "var_phase", "bulge_frac", "bulge_hlr_arcsec", "disk_hlr_arcsec", "g1",
              "g2", "ref_id"]:
        assert c in t.column_names, c
    assert t.schema.field("truth_id").type == "int64" and t.schema.field("ref_id").type == "int64"
    kinds = set(t.column("kind").to_pylist())
    assert kinds == {"star", "galaxy", "transient", "asteroid"}
    stars = np.array(t.column("kind").to_pylist()) == "star"
    pm = np.hypot(t.column("pmra").to_numpy(), t.column("pmdec").to_numpy())[stars]
    plx = t.column("parallax").to_numpy()[stars]
    assert np.median(pm) < 15 and pm.max() > 20 and pm.max() <= 150
    assert plx.min() >= 0.1 and plx.max() <= 20
    var = t.column("is_variable").to_numpy()[stars]
    assert 0.02 < var.mean() < 0.15
    amp = t.column("var_amp_mag").to_numpy()[stars][var]
    assert amp.min() >= 0.1 and amp.max() <= 0.5
    gr = njy_to_mag(t.column("g_flux").to_numpy()) - njy_to_mag(t.column("r_flux").to_numpy())
    assert 0.1 - 1e-9 <= np.min(gr[stars]) and np.max(gr[stars]) <= 1.6 + 1e-9


def test_transients_and_asteroids_appear_in_exactly_one_visit(make_config):
    config = make_config(n_transients=4, n_asteroids=4, seed=11)
    survey = build_survey(config)
    seen: dict[int, list[tuple[int, int]]] = {}
    for v in survey.visits:
        for det in survey.camera.detectors:
            s = render_ccd(config, v.visit, det.id).sources
            for tid, kind in zip(s["truth_id"], s["kind"]):
                if kind in ("transient", "asteroid"):
                    seen.setdefault(int(tid), []).append((v.visit, det.id))
    sky = survey.sky
    single = np.flatnonzero(sky.kind >= 2)
    assert single.size == 8
    for k in single:
        tid = int(sky.truth_id[k])
        assert len(seen.get(tid, [])) == 1, (tid, seen.get(tid))
        assert seen[tid][0][0] == sky.visit[k]


def test_variable_flux_follows_the_light_curve(make_config):
    config = make_config(variable_fraction=1.0, galaxy_density_per_deg2=0, seed=5)
    survey = build_survey(config)
    sky = survey.sky
    v = survey.visits[0]
    f = sky.fluxes(v, config.refcat_epoch_mjd)
    k = np.flatnonzero(sky.kind == KIND_STAR)[:20]
    phase = 2 * np.pi * (v.mjd_mid - config.refcat_epoch_mjd) / sky.var_period_d[k] + sky.var_phase[k]
    m = sky.mag[v.band][k] + sky.var_amp_mag[k] * np.sin(phase)
    assert np.allclose(njy_to_mag(f[k]), m, atol=1e-9)
