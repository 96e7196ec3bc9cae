from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.detect import detect_sources, significance_image

SKY, RN, FWHM = 1000.0, 5.0, 4.0
SIGMA = FWHM / 2.3548
V = SKY + RN**2


def _flux_for_snr(snr, true_psf):
    p = true_psf(FWHM, 0.0, 0.0, 0.0, 0.0, 41)
    return snr / np.sqrt((p**2).sum() / V)  # optimal (PSF-fit) S/N, sky-limited


def _observe(rng, stars):
    img = rng.poisson(SKY + stars).astype(np.float64) - SKY + rng.normal(0, RN, stars.shape)
    var = np.full(stars.shape, V, np.float32) + stars.astype(np.float32)
    return img.astype(np.float32), var


def _match(fp, x, y, radius=2.5):
    d = np.hypot(fp.peak_x[None, :] - x[:, None], fp.peak_y[None, :] - y[:, None])
    return d.min(axis=1) <= radius, d.min(axis=0) <= radius


@pytest.fixture(scope="module")
def star_field(draw_moffat_field, true_psf):
    rng = np.random.default_rng(21)
    gx, gy = np.meshgrid(np.arange(30, 1000, 50), np.arange(30, 1000, 50))
    x = gx.ravel() + rng.uniform(-5, 5, gx.size)
    y = gy.ravel() + rng.uniform(-5, 5, gx.size)
    snr = np.where(np.arange(x.size) % 4 == 0, rng.uniform(3, 10, x.size), rng.uniform(10, 60, x.size))
    stars = draw_moffat_field((1024, 1024), x, y, _flux_for_snr(snr, true_psf), fwhm=FWHM)
    img, var = _observe(rng, stars)
    mask = np.zeros(img.shape, np.uint32)
    fp = detect_sources(img, var, mask, SIGMA, threshold=5.0)
    return x, y, snr, img, var, mask, fp


def test_completeness_and_purity(star_field):
    x, y, snr, img, var, mask, fp = star_field
    found, real = _match(fp, x, y)
    bright = snr > 10
    assert found[bright].mean() >= 0.99
    assert found[snr < 4].mean() < 0.5  # well below threshold: mostly missed, as expected
    assert (~real).sum() <= 3  # spurious peaks in a 1 Mpix field
    # One peak per isolated star (a rare noise peak may land inside a star's footprint).
    assert 0 <= fp.n_peaks - fp.n_footprints <= 2
    # Peak significance tracks the injected PSF-fit S/N (Gaussian filter on a Moffat: ~0.9-1).
    d = np.hypot(fp.peak_x[:, None] - x[None, :], fp.peak_y[:, None] - y[None, :])
    j = d.argmin(axis=1)
    ratio = fp.peak_significance / snr[j]
    assert 0.8 < np.median(ratio[snr[j] > 20]) < 1.0  # measured 0.865


def test_footprint_structure_and_mask(star_field):
    x, y, snr, img, var, mask, fp = star_field
    assert fp.labels.dtype == np.int32 and fp.labels.shape == img.shape
    assert fp.labels.max() == fp.n_footprints
    np.testing.assert_array_equal(fp.area, np.bincount(fp.labels.ravel())[1:])
    for k in range(fp.n_footprints):
        x0, y0, x1, y1 = fp.bbox[k]
        assert (fp.labels[y0:y1, x0:x1] == k + 1).sum() == fp.area[k]
    for i in range(fp.n_peaks):
        assert fp.labels[int(fp.peak_y[i]), int(fp.peak_x[i])] == fp.peak_footprint[i] + 1
    np.testing.assert_array_equal((mask & masks.DETECTED) != 0, fp.labels > 0)
    # Grown by ~2 sigma: a S/N~50 star's footprint is much larger than its core.
    assert np.median(fp.area) > np.pi * (2 * SIGMA) ** 2


def test_pure_noise_matches_gaussian_statistics():
    rng = np.random.default_rng(5)
    img = rng.normal(0.0, 30.0, (1024, 1024)).astype(np.float32)
    var = np.full(img.shape, 900.0, np.float32)
    mask = np.zeros(img.shape, np.uint32)
    _, nu = significance_image(img, var, mask, SIGMA)
    assert abs(nu[20:-20, 20:-20].std() - 1.0) < 0.02  # correctly propagated smoothed noise
    lam = 1.0 / (2 * SIGMA**2)  # second spectral moment of the smoothed field

    def expected(t):  # Euler-characteristic density of a 2-D Gaussian field
        return img.size * lam / (2 * np.pi) ** 1.5 * t * np.exp(-t * t / 2)

    n5 = detect_sources(img, var, mask.copy(), SIGMA, threshold=5.0).n_footprints
    assert n5 <= 3  # expectation ~0.2 per Mpix
    n35 = detect_sources(img, var, mask.copy(), SIGMA, threshold=3.5).n_footprints
    assert 0.6 * expected(3.5) < n35 < 1.25 * expected(3.5)  # ~88 predicted


@pytest.mark.parametrize("flux_ratio", [1.0, 0.5])
def test_close_pair_one_footprint_two_peaks(flux_ratio, draw_moffat_field, true_psf):
    rng = np.random.default_rng(3)
    f = _flux_for_snr(200.0, true_psf)
    x = np.array([100.2, 100.2 + 2 * FWHM])
    y = np.array([99.7, 99.7])
    stars = draw_moffat_field((200, 200), x, y, np.array([f, f * flux_ratio]), fwhm=FWHM)
    img, var = _observe(rng, stars)
    fp = detect_sources(img, var, np.zeros(img.shape, np.uint32), SIGMA)
    assert fp.n_footprints == 1
    assert fp.n_peaks == 2
    found, _ = _match(fp, x, y, radius=1.5)
    assert found.all()
    assert fp.peaks_of(0)[0] == np.argmin(np.hypot(fp.peak_x - x[0], fp.peak_y - y[0]))


def test_bright_star_single_peak(draw_moffat_field, true_psf):
    rng = np.random.default_rng(4)
    stars = draw_moffat_field((200, 200), [100.3], [100.6], [_flux_for_snr(3000.0, true_psf)], fwhm=FWHM)
    img, var = _observe(rng, stars)
    fp = detect_sources(img, var, np.zeros(img.shape, np.uint32), SIGMA)
    assert fp.n_footprints == 1 and fp.n_peaks == 1


def test_unusable_pixels_do_not_create_detections(draw_moffat_field, true_psf):
    rng = np.random.default_rng(8)
    shape = (300, 300)
    stars = draw_moffat_field(shape, [150.0], [150.0], [_flux_for_snr(500.0, true_psf)], fwhm=FWHM)
    img, var = _observe(rng, stars)
    mask = np.zeros(shape, np.uint32)
    img[:, 50] = 5e4  # garbage bad column
    mask[:, 50] |= masks.BAD
    img[200:203, 200] = 2e4  # a cosmic ray (flagged, not repaired)
    mask[200:203, 200] |= masks.CR
    img[30, 250] = 6e4  # raw saturated pixel, not interpolated
    mask[30, 250] |= masks.SAT
    img[146:155, 146:155] = np.maximum(img[146:155, 146:155], 3e4)  # interpolated saturated core
    mask[146:155, 146:155] |= masks.SAT | masks.INTRP
    var[:, 80] = np.nan  # non-finite variance
    fp = detect_sources(img, var, mask, SIGMA)
    assert fp.n_footprints == 1 and fp.n_peaks == 1
    assert abs(fp.peak_x[0] - 150) <= 1 and abs(fp.peak_y[0] - 150) <= 1
