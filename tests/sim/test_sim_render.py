"""Rendering: determinism, the raw contract, and pixels vs truth."""

from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.sim import survey as survey_mod
from lsst_prod.sim.instrument import bad_columns, bias_structure, defects_mask, electrons_to_raw, flat_field
from lsst_prod.sim.render import render_ccd
from lsst_prod.sim.survey import build_survey


def _isr(config, survey, r, det):
    """Minimal inverse of the raw contract using the truth: electrons (flat-fielded) and the true overscan level."""
    raw = r.raw.astype(np.float64)
    nx = det.nx
    level = raw[:, nx:].mean(axis=1, keepdims=True)
    bias = bias_structure(config, det)
    flat = flat_field(config, survey.camera, det, r.ccdvisit["physical_filter"])
    return (raw[:, :nx] - level - bias) * det.gain / flat


def test_same_seed_identical_pixels_and_truth(small, make_config):
    v = build_survey(small).visits[0].visit
    a = render_ccd(small, v, 1)
    survey_mod._build.cache_clear()  # rebuild the sky and cadence from scratch
    b = render_ccd(small, v, 1)
    assert np.array_equal(a.raw, b.raw)
    assert a.header == b.header
    assert a.ccdvisit == b.ccdvisit
    assert a.sources.keys() == b.sources.keys()
    for k in a.sources:
        assert np.array_equal(a.sources[k], b.sources[k]), k
    other = make_config(seed=2025)
    c = render_ccd(other, build_survey(other).visits[0].visit, 1)
    assert not np.array_equal(a.raw, c.raw)


@pytest.fixture(scope="module")
def empty(make_config):
    """No objects, no cosmic rays: sky + electronics only."""
    config = make_config(star_density_per_deg2=0, galaxy_density_per_deg2=0, n_transients=0, n_asteroids=0,
                          cosmic_ray_rate_per_mpix_per_s=0.0, seed=99)
    survey = build_survey(config)
    return config, survey, [render_ccd(config, survey.visits[0].visit, d.id, keep_images=True)
                            for d in survey.camera.detectors]


def test_raw_contract_levels_noise_and_gain(empty):
    config, survey, renders = empty
    for r in renders:
        det = survey.camera.detector(r.detector)
        assert r.raw.dtype == np.uint16 and r.raw.shape == (det.ny, det.nx + det.overscan)
        assert len(r.sources["truth_id"]) == 0
        ov = r.raw[:, det.nx:].astype(np.float64)
        # overscan: B + slow row drift (|.| <= ~1.75 x amplitude) + read noise
        assert abs(np.median(ov) - det.bias_level_adu) < 2.0 * config.row_offset_amp_adu
        resid = ov - ov.mean(axis=1, keepdims=True)
        sig = det.read_noise / det.gain
        assert np.std(resid) * np.sqrt(det.overscan / (det.overscan - 1)) == pytest.approx(sig, rel=0.05)
        # imaging after the inverse contract: sky electrons
        e = _isr(config, survey, r, det)
        good = defects_mask(config, det) == 0
        sky = r.ccdvisit["sky_e_per_pix"]
        assert np.mean(e[good]) == pytest.approx(sky, rel=0.005)
        # gain from mean/variance of a flat-sky region (in ADU, flat-corrected), read noise removed
        bad_x = {c.x for c in bad_columns(config, det)}
        cols = [x for x in range(20, 236) if x not in bad_x]
        adu = e[20:236, cols] / det.gain
        var = np.var(adu) - sig**2 - 1.0 / 12.0
        gain = np.mean(adu) / var
        assert gain == pytest.approx(det.gain, rel=0.03)
        # bias structure really is in the raw: the column means follow it
        colmean = (r.raw[:, :det.nx].astype(float) - ov.mean(axis=1, keepdims=True)).mean(axis=0)
        expected = bias_structure(config, det).mean(axis=0) + sky / det.gain
        keep = np.array([x not in bad_x for x in range(det.nx)])
        assert np.max(np.abs(colmean - expected)[keep]) < 0.1 * sky / det.gain


def test_empty_truth_sources_table_keeps_its_schema(empty):
    import pyarrow as pa

    from lsst_prod.sim.truth import truth_sources_table

    config, _, renders = empty
    t = truth_sources_table(config, renders[0].sources, renders[0].visit, renders[0].detector)
    assert t.num_rows == 0
    assert t.schema.field("kind").type == pa.string() and t.schema.field("x").type == pa.float64()


def test_gains_differ_between_detectors(empty):
    _, survey, _ = empty
    gains = {d.gain for d in survey.camera.detectors}
    assert len(gains) == 2


def test_defect_columns_hold_garbage(empty):
    config, survey, renders = empty
    r = renders[0]
    det = survey.camera.detector(r.detector)
    for c in bad_columns(config, det):
        col = r.raw[c.y0:c.y1, c.x].astype(float)
        if c.kind == "hot":
            assert np.median(col) > det.bias_level_adu + 900
        else:  # dead: no sky signal
            assert np.median(col) < det.bias_level_adu + 20
    m = defects_mask(config, det)
    assert m.dtype == np.uint8 and m.sum() == sum(c.y1 - c.y0 for c in bad_columns(config, det))


def test_flat_has_unit_mean_and_percent_structure(small):
    survey = build_survey(small)
    for det in survey.camera.detectors:
        for pf in survey.camera.physical_filters:
            f = flat_field(small, survey.camera, det, pf).astype(np.float64)
            assert f.dtype == np.float64 and f.shape == (det.ny, det.nx)
            assert f.mean() == pytest.approx(1.0, abs=1e-6)
            assert 0.005 < f.std() < 0.05


def test_saturation_clips_exactly(small):
    survey = build_survey(small)
    det = survey.camera.detectors[0]
    e = np.full((det.ny, det.nx), 100.0)
    e[100:103, 50:53] = 1e6
    flat = np.ones((det.ny, det.nx), dtype=np.float32)
    raw = electrons_to_raw(small, det, e, flat, np.zeros_like(flat), [], np.zeros(det.ny), np.random.default_rng(0))
    assert raw.max() == det.saturation_adu
    assert np.all(raw[100:103, 50:53] == det.saturation_adu)
    assert np.count_nonzero(raw >= det.saturation_adu) == 9


@pytest.fixture(scope="module")
def bright(make_config):
    """A field of bright stars (no galaxies) on one 512x512 detector."""
    config = make_config(n_detectors=1, detector_nx=512, detector_ny=512, star_density_per_deg2=60000,
                          star_mag_min=15.5, star_mag_max=19.0, galaxy_density_per_deg2=0, variable_fraction=0.0,
                          bands=("r",), seed=7)
    survey = build_survey(config)
    v = survey.visits[0].visit
    return config, survey, render_ccd(config, v, 0, keep_images=True)


def test_bright_star_centroid_and_flux_match_truth(bright):
    config, survey, r = bright
    det = survey.camera.detector(0)
    e = _isr(config, survey, r, det) - r.ccdvisit["sky_e_per_pix"] - r.cosmic_ray_e
    defects = defects_mask(config, det)
    s = r.sources
    sat = det.saturation_adu * det.gain
    ok = ((s["kind"] == "star") & ~s["is_saturated"] & (s["flux_e"] > 2e5)
          & (s["peak_e"] + r.ccdvisit["sky_e_per_pix"] < 0.8 * sat)
          & (s["x"] > 30) & (s["x"] < det.nx - 31) & (s["y"] > 30) & (s["y"] < det.ny - 31)
          & ((s["nn_dist_pix"] > 40) | (s["nn_flux_ratio"] < 0.002)))
    idx = np.flatnonzero(ok)
    assert idx.size >= 2, "test field has too few bright isolated stars"
    yy, xx = np.mgrid[0:det.ny, 0:det.nx]
    n_checked = 0
    for i in idx:
        x, y, flux = s["x"][i], s["y"][i], s["flux_e"][i]
        ix, iy = int(round(x)), int(round(y))
        box = (slice(iy - 25, iy + 26), slice(ix - 25, ix + 26))
        if defects[box].any():
            continue
        aper = np.hypot(xx[box] - x, yy[box] - y) <= 25
        assert e[box][aper].sum() == pytest.approx(flux, rel=0.01)
        # iterative Gaussian-weighted centroid
        cx, cy = float(ix), float(iy)
        sw = s["psf_fwhm_pix"][i] / 2.355
        for _ in range(20):
            w = np.exp(-((xx[box] - cx) ** 2 + (yy[box] - cy) ** 2) / (2 * sw**2)) * e[box]
            cx, cy = (w * xx[box]).sum() / w.sum(), (w * yy[box]).sum() / w.sum()
        assert abs(cx - x) < 0.05 and abs(cy - y) < 0.05, (cx - x, cy - y)
        n_checked += 1
    assert n_checked >= 2


def test_saturated_truth_matches_pixels(bright):
    _, survey, r = bright
    det = survey.camera.detector(0)
    s = r.sources
    assert s["is_saturated"].any(), "expected some saturated stars in the bright field"
    for i in range(len(s["x"])):
        ix, iy = int(np.floor(s["x"][i] + 0.5)), int(np.floor(s["y"][i] + 0.5))
        core = r.raw[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2]
        if s["is_saturated"][i]:
            assert core.max() == det.saturation_adu
        elif s["peak_e"][i] < 0.5 * det.saturation_adu * det.gain:
            assert core.max() < det.saturation_adu


def test_truth_sources_are_on_the_detector_with_neighbours(small):
    survey = build_survey(small)
    r = render_ccd(small, survey.visits[1].visit, 0)
    det = survey.camera.detector(0)
    s = r.sources
    assert len(s["x"]) > 20
    assert np.all((s["x"] >= -0.5) & (s["x"] < det.nx - 0.5) & (s["y"] >= -0.5) & (s["y"] < det.ny - 0.5))
    assert np.all(s["nn_dist_pix"] > 0) and np.all(np.isfinite(s["nn_dist_pix"]))
    assert np.all(s["nn_flux_ratio"] > 0)
    assert set(s["kind"]) <= {"star", "galaxy", "transient", "asteroid"}
    assert np.all(s["flux_e"] > 0)
