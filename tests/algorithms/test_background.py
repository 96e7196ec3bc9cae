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
