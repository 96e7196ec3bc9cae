from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.cosmicray import find_cosmic_rays, psf_contrast_limit, repair_cosmic_rays

SKY, RN, N = 1000.0, 5.0, 1024


def _inject(rng, n_single=120, n_track=120):
    """CR image (electrons): single hot pixels and 2-8 pixel tracks, 500-20000 e-/pixel."""
    cr = np.zeros((N, N))
    events = []
    for i in range(n_single + n_track):
        amp = 10 ** rng.uniform(np.log10(500), np.log10(20000))
        x0, y0 = rng.uniform(10, N - 10, 2)
        if i < n_single:
            pix = {(int(y0), int(x0))}
        else:
            length, theta = int(rng.integers(2, 9)), rng.uniform(0, np.pi)
            t = np.linspace(0, length - 1, 4 * length)
            pix = set(zip(np.round(y0 + t * np.sin(theta)).astype(int), np.round(x0 + t * np.cos(theta)).astype(int)))
        pix = sorted(pix)
        for p in pix:
            cr[p] += amp
        events.append(pix)
    return cr, events


def _observe(rng, expected):
    img = rng.poisson(expected).astype(np.float64) + rng.normal(0, RN, expected.shape)
    return img.astype(np.float32), (np.maximum(img, 0) + RN**2).astype(np.float32)


@pytest.fixture(scope="module", params=[2.5, 6.0])
def cr_field(request, draw_moffat_field):
    fwhm = request.param
    rng = np.random.default_rng(int(fwhm * 10))
    n = 250
    x, y = rng.uniform(20, N - 20, n), rng.uniform(20, N - 20, n)
    peak_frac = 1.0 / (1.13 * fwhm**2)
    flux = 10 ** rng.uniform(3.0, np.log10(50000.0 / peak_frac), n)  # peaks up to ~50000 e-
    stars = draw_moffat_field((N, N), x, y, flux, fwhm=fwhm)
    crimg, events = _inject(rng)
    img, var = _observe(rng, SKY + stars + crimg)
    mask = np.zeros((N, N), np.uint32)
    cr = find_cosmic_rays(img, var, mask, psf_fwhm_pix=fwhm)
    return fwhm, stars, crimg, events, img, var, mask, cr


def test_finds_cosmic_rays(cr_field):
    fwhm, stars, crimg, events, img, var, mask, cr = cr_field
    truth = crimg > 0
    found = np.array([any(cr[p] for p in ev) for ev in events])
    assert found.mean() >= 0.97
    assert cr[truth].mean() >= 0.93
    singles = np.array([len(ev) == 1 for ev in events])
    assert found[singles].mean() >= 0.97 and found[~singles].mean() >= 0.97


def test_does_not_flag_stars(cr_field):
    fwhm, stars, crimg, events, img, var, mask, cr = cr_field
    near_cr = ndimage.binary_dilation(crimg > 0, structure=np.ones((3, 3)), iterations=2)
    on_stars = cr & ~near_cr & (stars > 3 * np.sqrt(SKY))
    assert on_stars.sum() == 0
    # Elsewhere: only a few noise seeds (plus their 1.5-sigma growth ring).
    assert (cr & ~near_cr).sum() <= 25


@pytest.mark.parametrize("fwhm", [2.5, 3.0, 4.0, 6.0])
def test_bright_isolated_stars_never_flagged(fwhm, draw_moffat_field):
    rng = np.random.default_rng(100 + int(fwhm * 10))
    gx, gy = np.meshgrid(np.arange(40, 512, 48), np.arange(40, 512, 48))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    peak_frac = 1.0 / (1.13 * fwhm**2)
    flux = rng.uniform(0.3, 1.0, x.size) * 55000.0 / peak_frac
    stars = draw_moffat_field((512, 512), x, y, flux, fwhm=fwhm, g1=0.05)
    img, var = _observe(rng, SKY + stars)
    assert stars.max() > 30000
    cr = find_cosmic_rays(img, var, np.zeros((512, 512), np.uint32), psf_fwhm_pix=fwhm)
    assert not cr[stars > 0.1 * np.sqrt(SKY)].any()  # nothing on (or near) a star
    assert cr.sum() <= 3  # pure-noise seeds: ~0.2 per Mpix measured


def test_contrast_limit_of_psf_is_small():
    # Noise-free pixelized PSFs have fine-structure contrast well below objlim=2.
    assert psf_contrast_limit(2.5) < 0.7
    assert psf_contrast_limit(6.0) < 0.3


def test_masked_pixels_skipped_and_repair(draw_moffat_field):
    rng = np.random.default_rng(9)
    crimg = np.zeros((256, 256))
    crimg[100, 100] = 3000.0
    crimg[50, 60:64] = 1500.0
    img, var = _observe(rng, SKY + crimg)
    mask = np.zeros((256, 256), np.uint32)
    img[:, 200] = 40000.0  # garbage bad column (not interpolated)
    mask[:, 200] |= masks.BAD
    img[150, 30] = 20000.0  # an already-interpolated saturated pixel (value kept)
    mask[150, 30] |= masks.SAT | masks.INTRP
    cr = find_cosmic_rays(img, var, mask, psf_fwhm_pix=3.0)
    assert cr[100, 100] and cr[50, 60:64].all()
    assert not cr[:, 199:202].any() and not cr[149:152, 29:32].any()
    rep = repair_cosmic_rays(img, mask, cr, variance=var)
    assert rep.n_pixels == int(cr.sum())
    assert np.all(rep.mask[cr] & masks.CR) and np.all(rep.mask[cr] & masks.INTRP)
    assert not np.any(rep.mask[~cr] & masks.CR)
    assert np.abs(rep.image[cr] - SKY).max() < 4 * np.sqrt(SKY)
    assert np.abs(rep.variance[cr] - SKY).max() < 0.3 * SKY
    assert img[100, 100] > 3000  # inputs untouched
    none = repair_cosmic_rays(img, mask, np.zeros_like(cr))
    assert none.n_pixels == 0 and none.variance is None
