"""Reference catalog contents and the object truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsst_prod.config.simulation import KNOWN_BANDS, SimulationConfig
from lsst_prod.sim.refcat import (
    error_law,
    gaia_mag_errors,
    gaia_transformation,
    gaia_true_mags,
    make_refcat,
    transformation_library,
    variability_flag_probability,
)
from lsst_prod.sim.render import render_ccd
from lsst_prod.sim.spec import KIND_STAR, mag_to_njy, njy_to_mag
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
                "parallax_err", "epoch_mjd", "phot_g_mean_flux", "phot_g_mean_fluxErr", "phot_bp_mean_flux",
                "phot_bp_mean_fluxErr", "phot_rp_mean_flux", "phot_rp_mean_fluxErr", "bp_rp", "g_flux", "g_fluxErr",
                "r_flux", "r_fluxErr", "phot_variable_flag"]
    assert ref.column_names == expected
    assert "is_variable" not in ref.column_names  # the truth stays in truth_objects
    units = json.loads(ref.schema.metadata[b"units"])
    assert units["ra"] == "deg" and units["ra_err"] == "mas" and units["pmra"] == "mas/yr" and units["g_flux"] == "nJy"
    assert units["phot_g_mean_flux"] == "nJy" and units["bp_rp"] == "mag"
    assert ref.schema.field("parallax").metadata[b"unit"] == b"mas"
    assert np.all(ref.column("epoch_mjd").to_numpy() == config.refcat_epoch_mjd)
    meta = json.loads(ref.schema.metadata[b"lsst_prod.sim"])
    assert meta["mag_limit_G"] == config.refcat_mag_limit and set(meta["transformation"]["coeffs"]) >= {"g", "r"}


def _true_g(sky, idx):
    return gaia_true_mags({b: sky.mag[b][idx] for b in KNOWN_BANDS}, sky.feh[idx])


def test_refcat_only_stars_and_limits(refcat_setup):
    config, survey, ref = refcat_setup
    sky = survey.sky
    ids = ref.column("ref_id").to_numpy()
    idx = np.flatnonzero(sky.ref_id >= 0)
    assert np.array_equal(sky.ref_id[idx], ids)
    assert np.all(sky.kind[idx] == KIND_STAR)
    g = _true_g(sky, idx)["G"]
    assert np.all(g < config.refcat_mag_limit) and np.all(g >= config.refcat_bright_limit)
    stars = np.flatnonzero(sky.kind == KIND_STAR)
    g_all = _true_g(sky, stars)["G"]
    assert np.sum((g_all < config.refcat_mag_limit) & (g_all >= config.refcat_bright_limit)) == idx.size  # complete


def test_bright_limit_and_bright_star_errors(make_config):
    """Stars with G < refcat_bright_limit are absent (exercised at 7: the simulator's stars start at 5);
    errors grow brightward of G = 13 (x6.8 at G = 7)."""
    config = make_config(star_mag_min=5.0, star_mag_max=14.0, star_mag_slope=0.0, star_density_per_deg2=3e5,
                         galaxy_density_per_deg2=0.0, refcat_bright_limit=7.0, seed=4)
    survey = build_survey(config)
    sky = survey.sky
    ref = make_refcat(config, sky)
    stars = np.flatnonzero(sky.kind == KIND_STAR)
    g_all = _true_g(sky, stars)["G"]
    assert np.sum(g_all < 7.0) >= 5  # there are such stars ...
    idx = np.flatnonzero(sky.ref_id >= 0)
    g = _true_g(sky, idx)["G"]
    assert g.min() >= 7.0 and idx.size == np.sum((g_all >= 7.0) & (g_all < config.refcat_mag_limit))  # ... not in it
    assert SimulationConfig().refcat_bright_limit == 3.0
    err = gaia_mag_errors(np.array([7.0, 13.0, 17.0, 20.0]))
    for b, (floor, s17, s20) in {"G": (0.3, 1.0, 6.0), "BP": (0.9, 12.0, 108.0), "RP": (0.6, 6.0, 52.0)}.items():
        np.testing.assert_allclose(1e3 * err[b][2:], [s17, s20], rtol=1e-9)  # Gaia DR3 figures at G = 17, 20
        assert floor < 1e3 * err[b][1] < 2.1 * floor  # the floor (+ photon noise) at G = 13
    assert err["G"][0] > 5 * err["G"][1] and err["BP"][0] > 3 * err["BP"][1]  # x (1 + (6/2.5)^2) = x6.8 at G = 7
    f = ref.column("phot_g_mean_flux").to_numpy()
    fe = ref.column("phot_g_mean_fluxErr").to_numpy()
    bright = g < 9.0
    assert bright.sum() >= 3 and np.all(fe[bright] / f[bright] > 0.3e-3 / 1.0857 * (1 + (4 / 2.5) ** 2))


def test_refcat_errors_and_pulls(refcat_setup):
    config, survey, ref = refcat_setup
    sky = survey.sky
    idx = np.flatnonzero(sky.ref_id >= 0)
    assert idx.size > 200
    gaia = _true_g(sky, idx)
    err = ref.column("ra_err").to_numpy()
    assert np.allclose(err, error_law(gaia["G"], config.refcat_mag_limit, config.refcat_pos_err_min_mas,
                                      config.refcat_pos_err_max_mas))
    assert err.min() >= config.refcat_pos_err_min_mas and err.max() <= config.refcat_pos_err_max_mas
    assert np.allclose(ref.column("pmra_err").to_numpy(), config.refcat_pm_err_scale_per_yr * err)
    assert np.allclose(ref.column("parallax_err").to_numpy(), config.refcat_parallax_err_scale * err)
    cosd = np.cos(np.deg2rad(sky.dec[idx]))
    pulls = {
        "ra": (ref.column("ra").to_numpy() - sky.ra[idx]) * cosd * 3.6e6 / err,
        "dec": (ref.column("dec").to_numpy() - sky.dec[idx]) * 3.6e6 / err,
        "pmra": (ref.column("pmra").to_numpy() - sky.pmra[idx]) / ref.column("pmra_err").to_numpy(),
        "parallax": (ref.column("parallax").to_numpy() - sky.parallax[idx]) / ref.column("parallax_err").to_numpy(),
    }
    for b, name in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
        f = ref.column(f"phot_{name}_mean_flux").to_numpy()
        pulls[name] = (f - mag_to_njy(gaia[b])) / ref.column(f"phot_{name}_mean_fluxErr").to_numpy()
    n = idx.size
    for name, p in pulls.items():
        assert abs(np.mean(p)) < 4 / np.sqrt(n), name
        assert np.std(p) == pytest.approx(1.0, abs=5 / np.sqrt(2 * n)), name
    # survey bands through the transformation: the errors (propagated + transformation scatter) describe
    # the scatter about the TRUTH (pull rms 0.85-1.2: the faint end is mildly non-Gaussian)
    for b in config.bands:
        m = njy_to_mag(ref.column(f"{b}_flux").to_numpy())
        e = 1.0857 * ref.column(f"{b}_fluxErr").to_numpy() / ref.column(f"{b}_flux").to_numpy()
        p = (m - sky.mag[b][idx]) / e
        assert 0.85 < np.std(p) < 1.2, b
        assert abs(np.median(p)) < 0.15, b


def test_transformation_residuals_are_realistic():
    """TRUE survey mag - G - P_b(BP-RP), on an independent sample (no noise):
    rms 10-25 mmag in grizy (stated: g 21, r 14, i 11.5, z 10, y 10), larger for metal-poor-rich mixes of
    the blue population than for the M dwarfs, no bias in any colour bin (< 5 mmag)."""
    tr = gaia_transformation()
    mags, feh, gaia = transformation_library(20000, seed=7)
    c = gaia["BP"] - gaia["RP"]
    blue = (mags["g"] - mags["r"]) <= 0.8
    bins = np.quantile(c, np.linspace(0, 1, 9))
    for b in "grizy":
        res = mags[b] - tr.apply(b, gaia["G"], c)
        rms = 1e3 * np.std(res)
        assert 9.0 < rms < 25.0, (b, rms)
        assert abs(1e3 * np.mean(res)) < 0.5
        assert 1e3 * np.std(res[blue]) > 1e3 * np.std(res[~blue])  # depends on the star (metallicity spread)
        assert abs(np.polyfit(feh, res, 1)[0]) > 0.01  # ... through the hidden parameter
        for i in range(8):
            sel = (c >= bins[i]) & (c < bins[i + 1])
            assert abs(1e3 * np.mean(res[sel])) < 5.0, (b, i)
        assert tr.scatter[b] == pytest.approx(np.std(res), rel=0.1)
    res_u = mags["u"] - tr.apply("u", gaia["G"], c)
    assert 15.0 < 1e3 * np.std(res_u) < 60.0  # u: the UV excess


def test_variability_flag_is_incomplete_with_false_positives(make_config):
    """Completeness (flagged | variable) 0.75-0.85 for the default population (ceiling 0.85), false-positive
    rate (flagged | constant) 0.3-0.8 % (configured 0.5 %)."""
    config = make_config(detector_nx=512, detector_ny=512, dither_radius_arcsec=30.0, variable_fraction=0.3, seed=9)
    survey = build_survey(config)
    sky = survey.sky
    ref = make_refcat(config, sky)
    idx = np.flatnonzero(sky.ref_id >= 0)
    flag = ref.column("phot_variable_flag").to_numpy()
    var = sky.is_variable[idx]
    assert var.sum() > 100 and (~var).sum() > 300
    completeness = flag[var].mean()
    assert 0.65 < completeness < 0.9
    # the analytic expectation over these stars
    g = _true_g(sky, idx)["G"]
    p = variability_flag_probability(var, sky.var_amp_mag[idx], g, config.refcat_var_flag_completeness,
                                     config.refcat_var_flag_false_positive_rate)
    assert abs(completeness - p[var].mean()) < 4 * np.sqrt(p[var].mean() * (1 - p[var].mean()) / var.sum())
    assert p[var].max() <= config.refcat_var_flag_completeness
    # detection probability rises with amplitude and falls with G
    assert p[var][np.argmax(sky.var_amp_mag[idx][var])] > 0.5
    pg = variability_flag_probability(np.ones(3, bool), np.full(3, 0.1), np.array([17.0, 19.5, 20.6]), 0.85, 0.005)
    assert pg[0] > pg[1] > pg[2]
    # false positives among the constant stars: many constant stars are needed for a rate of 0.5 %
    big = variability_flag_probability(np.zeros(200000, bool), np.zeros(200000), np.full(200000, 18.0), 0.85, 0.005)
    flags = np.random.default_rng(0).uniform(size=big.size) < big
    assert 0.003 < flags.mean() < 0.008
    assert flag[~var].mean() < 0.03


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
