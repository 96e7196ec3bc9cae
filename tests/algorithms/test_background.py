from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.background import estimate_background

N = 1024


def _sky(shape):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    return 1000.0 + 80.0 * xx / nx - 50.0 * yy / ny + 40.0 * ((xx - 500.0) / nx) ** 2


@pytest.fixture(scope="module")
def star_field(draw_moffat_field):
    rng = np.random.default_rng(11)
    n = 400
    x, y = rng.uniform(5, N - 5, n), rng.uniform(5, N - 5, n)
    flux = 10 ** rng.uniform(3.5, 6.0, n)
    stars = draw_moffat_field((N, N), x, y, flux, fwhm=4.0)
    sky = _sky((N, N))
    image = rng.poisson(sky + stars).astype(np.float32)
    return sky, image


def test_gradient_recovered_under_stars(star_field):
    sky, image = star_field
    bg = estimate_background(image, np.zeros(image.shape, np.uint32), mesh_size=128, filter_size=3)
    sigma = np.sqrt(sky)
    r = (bg.image - sky) / sigma
    assert bg.image.dtype == np.float32 and bg.image.shape == image.shape
    assert abs(r.mean()) < 0.05  # bias from unmasked star wings: ~0.03 sigma
    assert r.std() < 0.05
    assert np.abs(r).max() < 0.25
    assert abs((bg.rms / sigma).mean() - 1) < 0.05
    assert bg.mesh_level.shape == (8, 8) and bg.mesh_rms.shape == (8, 8)
    np.testing.assert_allclose(bg.mesh_x, np.arange(8) * 128 + 63.5)
    truth_at_mesh = sky[np.ix_(bg.mesh_y.astype(int), bg.mesh_x.astype(int))]
    assert np.abs(bg.mesh_level - truth_at_mesh).max() < 0.25 * np.sqrt(sky.max())
    np.testing.assert_array_equal(bg.mesh_valid_fraction, 1.0)


def test_masked_pixels_ignored(star_field):
    sky, image = star_field
    img = image.copy()
    mask = np.zeros(img.shape, np.uint32)
    img[:, 300] = 60000.0  # garbage bad column
    mask[:, 300] |= masks.BAD
    img[600:700, 600:700] = np.nan
    mask[600:700, 600:700] |= masks.NO_DATA
    img[100:110, 800:810] = 1e6
    mask[100:110, 800:810] |= masks.DETECTED
    bg = estimate_background(img, mask)
    r = (bg.image - sky) / np.sqrt(sky)
    assert np.all(np.isfinite(bg.image)) and np.all(np.isfinite(bg.rms))
    assert abs(r.mean()) < 0.06 and np.abs(r).max() < 0.3
    assert bg.mesh_valid_fraction.min() < 1.0
    assert bg.mesh_valid_fraction[0, 2] == pytest.approx(127 / 128)


def test_non_divisible_shape():
    rng = np.random.default_rng(2)
    sky = _sky((700, 900))
    img = rng.normal(sky, np.sqrt(sky)).astype(np.float32)
    bg = estimate_background(img, None, mesh_size=128)
    assert bg.image.shape == (700, 900)
    assert bg.mesh_level.shape == (6, 8)
    assert bg.mesh_x[-1] == pytest.approx((896 + 899) / 2)
    assert np.abs((bg.image - sky) / np.sqrt(sky)).max() < 0.35


# --------------------------------------------------------------------------- statistic="mean"
# A PSF-fit flux is linear in the pixels: its bias is N_eff (E[pixel] - background), N_eff = 4 pi sigma^2
# (~30-60 px).  The background that leaves fluxes unbiased is therefore the MEAN sky, not its mode: on a
# Poisson sky SExtractor's mode (2.5 median - 1.5 mean) sits 0.3-0.4 e- low, which biases a faint star's
# flux by +0.4 N_eff e- (+0.07 to +0.14 of its error in the background-limited regime).


@pytest.mark.parametrize("level", [100.0, 400.0, 1100.0])
def test_mean_is_unbiased_on_poisson_sky(level):
    rng = np.random.default_rng(int(level))
    shape = (1024, 1024)
    rn = 5.0
    img = (rng.poisson(level, shape) + rng.normal(0.0, rn, shape)).astype(np.float32)
    sigma = np.sqrt(level + rn * rn)
    mean = estimate_background(img, None, statistic="mean")
    mode = estimate_background(img, None, statistic="mode")
    # per-cell mean noise sigma/128 -> ~0.001 sigma over 64 cells: 0.004 is 4x the noise
    assert abs(mean.image.mean() - level) / sigma < 0.004
    assert abs(mean.global_level - level) / sigma < 0.004
    # the mode's bias, which this estimator removes (measured -0.029, -0.019, -0.007...-0.012 sigma)
    assert (mode.image.mean() - level) / sigma < -0.004
    assert abs((mean.rms / sigma).mean() - 1.0) < 0.01  # a 4-sigma clip keeps 99.994 % of a Gaussian


def test_mean_gradient_and_masked_stars(draw_moffat_field):
    """Sky gradient under 400 stars whose 5-sigma footprints (grown) are masked: the mean of the
    remaining pixels recovers the sky to < 0.01 sigma on average (the faint wings left outside the
    footprints are real light: at most a few 1e-3 sigma here), 0.03 sigma rms."""
    from lsst_prod.algorithms.detect import detect_sources

    rng = np.random.default_rng(5)
    n = 400
    x, y = rng.uniform(5, N - 5, n), rng.uniform(5, N - 5, n)
    flux = 10 ** rng.uniform(3.0, 5.5, n)
    sky = _sky((N, N))
    image = rng.poisson(sky + draw_moffat_field((N, N), x, y, flux, fwhm=4.0)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint32)
    first = estimate_background(image, mask)  # first pass: mode, nothing masked
    detect_sources(image - first.image, sky.astype(np.float32), mask, 4.0 / 2.3548, threshold=5.0)
    assert (mask & masks.DETECTED).any()
    bg = estimate_background(image, mask, statistic="mean")
    r = (bg.image - sky) / np.sqrt(sky)
    assert abs(r.mean()) < 0.01
    assert r.std() < 0.03 and np.abs(r).max() < 0.2
    assert np.all(bg.mesh_valid_fraction > 0.5)


def test_mean_fills_empty_cells_and_small_images():
    rng = np.random.default_rng(9)
    sky = _sky((N, N))
    img = rng.normal(sky, np.sqrt(sky)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[0:256, 0:256] |= masks.NO_DATA  # four whole cells without data
    img[0:256, 0:256] = np.nan
    img[:, 500] = 6e4  # an unmasked hot column: clipped
    bg = estimate_background(img, mask, statistic="mean")
    r = (bg.image - sky) / np.sqrt(sky)
    assert np.all(np.isfinite(bg.image)) and np.all(np.isfinite(bg.rms))
    assert np.all(bg.mesh_valid_fraction[:2, :2] == 0)
    assert np.abs(r[256:, 256:]).max() < 0.2 and np.abs(r).max() < 0.5
    for shape in [(100, 300), (60, 60), (1024, 100)]:  # one row / one cell / one column of cells
        small = rng.normal(500.0, np.sqrt(500.0), shape).astype(np.float32)
        b = estimate_background(small, None, statistic="mean")
        assert b.image.shape == shape and b.image.dtype == np.float32
        assert np.abs(b.image - 500.0).max() < 0.3 * np.sqrt(500.0)
    with pytest.raises(ValueError):
        estimate_background(img, mask, statistic="median")


def test_background_without_sources_leaves_the_catalogued_wings_out():
    """A crowded noise-free-PSF field (Kolmogorov FWHM 4 px stars drawn to 25 FWHM, 2400 stars on 800^2, the
    fainter ones uncatalogued) with a flat offset of -2 per pixel and noise of 2 per pixel: subtracting the
    catalogued stars' full-wing models before the masked mean gives the offset plus the uncatalogued light
    and the catalogued light beyond the models' 12 FWHM (the level that leaves PSF fluxes measured with
    neighbour models unbiased) to 0.04 per pixel (-0.02 over three seeds); the plain
    masked mean also takes in the catalogued stars' wings beyond their footprints (+1.9 per pixel here)."""
    import galsim
    from scipy.signal import fftconvolve

    from lsst_prod.algorithms.background import background_without_sources

    class StampPsf:
        def __init__(self, stamp, fwhm):
            self.stamp, self.fwhm = stamp, fwhm

        def image_at(self, x, y, size=None):
            return self.stamp

        def fwhm_at(self, x, y):
            return self.fwhm

    prof = galsim.Kolmogorov(fwhm=4.0)
    kern = prof.drawImage(nx=201, ny=201, scale=1.0).array.astype(float) / prof.flux
    fwhm = 2.3548200450309493 * galsim.Image(kern[60:141, 60:141]).FindAdaptiveMom().moments_sigma
    stamp = kern[88:113, 88:113].copy()
    c_stamp = stamp.sum()
    rng = np.random.default_rng(7)
    shape, n = (800, 800), 2400
    x = rng.integers(0, shape[1], n).astype(float)
    y = rng.integers(0, shape[0], n).astype(float)
    flux = 10 ** rng.uniform(2.0, 5.5, n)
    cat = flux > 300.0

    def draw(sel):
        img = np.zeros(shape)
        np.add.at(img, (y[sel].astype(int), x[sel].astype(int)), flux[sel])
        return fftconvolve(img, kern, mode="same")

    stars, undetected = draw(np.ones(n, bool)), draw(~cat)
    # the catalogued stars' light beyond the models' 12-FWHM box (a smooth pedestal: background too)
    half = int(np.ceil(12 * fwhm))
    far_kern = kern.copy()
    far_kern[100 - half : 101 + half, 100 - half : 101 + half] = 0.0
    far = np.zeros(shape)
    np.add.at(far, (y[cat].astype(int), x[cat].astype(int)), flux[cat])
    far = fftconvolve(far, far_kern, mode="same")
    offset, sigma = -2.0, 2.0
    image = stars + offset + rng.normal(0.0, sigma, shape)
    footprints = fftconvolve(stars, np.ones((3, 3)) / 9.0, mode="same") > 2.5 * sigma  # ~5 sigma, smoothed
    mask = footprints.astype(np.uint32) * np.uint32(masks.DETECTED)
    expected = offset + (undetected + far)[~footprints].mean()
    bg = background_without_sources(image, mask, StampPsf(stamp / c_stamp, fwhm), x[cat], y[cat],
                                    flux[cat] * c_stamp, fwhm)
    inner = (slice(100, 700), slice(100, 700))
    assert np.mean(bg.image[inner]) == pytest.approx(expected, abs=0.04)  # measured -0.02 (3 seeds)
    plain = estimate_background(image, mask, mesh_size=256, statistic="mean")
    assert np.mean(plain.image[inner]) - expected > 1.0
