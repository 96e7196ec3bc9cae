from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.isr import overscan_levels, run_isr
from lsst_prod.camera import Detector

NX, NY, NOV = 512, 512, 32


def _detector(gain: float = 1.3, read_noise: float = 5.0) -> Detector:
    return Detector(
        id=0, name="T", nx=NX, ny=NY, overscan=NOV, fp_x0=0.0, fp_y0=0.0,
        gain=gain, read_noise=read_noise, saturation_adu=60000.0, bias_level_adu=1000.0,
    )


def _calibs(rng):
    yy, xx = np.mgrid[0:NY, 0:NX]
    bias = 3.0 * np.sin(xx / 37.0) + 0.004 * yy + 0.5 * rng.standard_normal((NY, NX))
    flat = 1.0 + 0.06 * (xx - NX / 2) / NX - 0.04 * ((yy - NY / 2) / NY) ** 2 + 0.01 * rng.standard_normal((NY, NX))
    flat /= flat.mean()
    row_offset = 4.0 * np.sin(np.arange(NY) / 90.0) + 0.003 * np.arange(NY)
    return bias, flat, row_offset


@pytest.fixture(scope="module")
def flat_field_run(simulate_raw):
    rng = np.random.default_rng(42)
    det = _detector()
    bias, flat, row_offset = _calibs(rng)
    sky = 1000.0
    defects = np.zeros((NY, NX), bool)
    raw = simulate_raw(np.full((NY, NX), sky), det, bias, flat, rng, defects=None, row_offset=row_offset)
    res = run_isr(raw, det, bias, flat, defects, edge_pixels=3)
    return det, bias, flat, row_offset, sky, res


def test_constant_image_recovered(flat_field_run):
    det, bias, flat, row_offset, sky, res = flat_field_run
    assert res.image.dtype == np.float32 and res.variance.dtype == np.float32 and res.mask.dtype == np.uint32
    assert res.image.shape == (NY, NX)
    npix = res.image.size
    sigma = np.sqrt(sky + det.read_noise**2)
    # Global level: within 4 sigma of the mean's error (plus the overscan-level noise).
    assert abs(res.image.mean() - sky) < 4 * sigma / np.sqrt(npix) + 0.5
    # No row structure left: row means scatter like noise (+ the small smoothed overscan noise).
    row_means = res.image.mean(axis=1) - sky
    assert row_means.std() < 1.5 * sigma / np.sqrt(NX) + 0.6 * det.gain
    # Overscan level tracks the injected row offset to a fraction of an ADU.
    truth = det.bias_level_adu + row_offset
    assert np.abs(res.overscan_level - truth).max() < 1.4
    assert np.abs(res.overscan_level - truth).std() < 0.35
    # Flat-field applied: no residual large-scale pattern across x.
    col_means = res.image.mean(axis=0) - sky
    assert abs(np.polyfit(np.arange(NX), col_means, 1)[0]) * NX < 1.0


def test_variance_plane_matches_pixel_variance(flat_field_run):
    det, bias, flat, row_offset, sky, res = flat_field_run
    measured = res.image.var()
    predicted = res.variance.mean()
    assert abs(measured / predicted - 1) < 0.03
    # Per flat-field bin: read noise is amplified by 1/flat.
    lo = flat < np.quantile(flat, 0.2)
    hi = flat > np.quantile(flat, 0.8)
    for sel in (lo, hi):
        assert abs(res.image[sel].var() / res.variance[sel].mean() - 1) < 0.04
    # The formula: <e> + (rn/flat)^2 with <e> from the pixel value.
    expect = np.maximum(res.image, 0) + det.read_noise**2 / flat**2
    np.testing.assert_allclose(res.variance, expect, rtol=1e-4)


def test_edge_mask(flat_field_run):
    res = flat_field_run[-1]
    edge = (res.mask & masks.EDGE) != 0
    assert edge[:3].all() and edge[-3:].all() and edge[:, :3].all() and edge[:, -3:].all()
    assert not edge[3:-3, 3:-3].any()


def test_saturation_and_defects_masked_and_interpolated(simulate_raw, draw_moffat_field):
    rng = np.random.default_rng(7)
    det = _detector(gain=1.0)
    bias, flat, row_offset = _calibs(rng)
    sky = 800.0
    electrons = np.full((NY, NX), sky) + draw_moffat_field((NY, NX), [200.3], [300.7], [3e6], fwhm=4.0)
    defects = np.zeros((NY, NX), bool)
    defects[:, 100] = True  # bad column
    defects[400:403, 50:60] = True  # small bad block
    raw = simulate_raw(electrons, det, bias, flat, rng, defects=defects, row_offset=row_offset)
    res = run_isr(raw, det, bias, flat, defects)
    m = res.mask
    sat = raw[:, :NX] >= det.saturation_adu
    assert sat.sum() > 5
    assert np.all((m[sat] & masks.SAT) != 0)
    assert np.all((m[defects] & masks.BAD) != 0)
    assert np.all((m[sat | defects] & masks.INTRP) != 0)
    assert not np.any((m[~(sat | defects)] & (masks.SAT | masks.BAD | masks.INTRP)) != 0)
    # The bad column, away from the star, is filled with sky-like values (no garbage).
    col = res.image[:250, 100]
    assert np.all(np.isfinite(res.image))
    assert abs(np.median(col) - sky) < 10
    assert col.std() < np.sqrt(sky + 25)
    assert np.abs(res.image[400:403, 50:60] - sky).max() < 6 * np.sqrt(sky)
    # The saturated core is filled with a high, positive plateau (keeps the star detectable).
    assert res.image[sat].min() > 0.2 * det.saturation_adu


def test_suspect_and_shape_checks(simulate_raw):
    rng = np.random.default_rng(3)
    det = _detector(gain=1.0)
    bias = np.zeros((NY, NX))
    flat = np.ones((NY, NX))
    electrons = np.full((NY, NX), 500.0)
    electrons[10, 10] = 57500.0  # ~0.96 saturation
    raw = simulate_raw(electrons, det, bias, flat, rng)
    res = run_isr(raw, det, bias, flat, np.zeros((NY, NX), bool), suspect_fraction=0.95)
    assert res.mask[10, 10] & masks.SUSPECT
    assert not res.mask[10, 10] & masks.SAT
    with pytest.raises(ValueError):
        run_isr(raw[:, :NX], det, bias, flat, np.zeros((NY, NX), bool))


def test_overscan_level_robust_to_hot_pixels():
    rng = np.random.default_rng(5)
    ov = 1000.0 + 4.0 * rng.standard_normal((300, 32))
    ov[::7, 3] = 30000.0  # hot overscan pixels
    lev = overscan_levels(np.round(ov), smooth_rows=1)
    assert np.abs(lev - 1000.0).max() < 4.0
    assert abs(lev.mean() - 1000.0) < 0.2
