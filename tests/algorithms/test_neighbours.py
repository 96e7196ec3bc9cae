"""Crowded-field kernels of lsst_prod.algorithms.neighbours: the sparse simultaneous PSF-amplitude fit and the
neighbour subtraction for PSF stars, against dense least squares and simulator truth."""

from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms.neighbours import fit_psf_amplitudes, psf_model_image, subtract_other_sources
from lsst_prod.algorithms.psf import fit_psf

try:
    from ._psf_double import GalSimPsf
except ImportError:  # tests/algorithms is not a package
    from _psf_double import GalSimPsf

SKY = 400.0
N_CROWD = 300


def _crowd(rng, n, shape, fwhm, min_sep, border=5.0):
    """n positions at least ``min_sep`` px apart (rejection sampling)."""
    pts = np.empty((0, 2))
    while len(pts) < n:
        p = rng.uniform(border, np.array(shape[::-1]) - border)
        if len(pts) == 0 or np.min(np.hypot(*(pts - p).T)) > min_sep:
            pts = np.vstack([pts, p])
    return pts[:, 0], pts[:, 1]


def test_sparse_amplitudes_equal_dense_least_squares():
    """The sparse normal equations give the dense weighted least-squares solution (stamps off the image,
    zero-weight pixels and a weight map included) to rounding."""
    rng = np.random.default_rng(5)
    shape, psf = (120, 150), GalSimPsf(fwhm=6.0, size=25)
    x, y = _crowd(rng, 45, shape, 6.0, 4.0, border=-3.0)
    image = rng.normal(0.0, 20.0, shape) + 50.0
    weight = rng.uniform(0.5, 2.0, shape) * (rng.uniform(size=shape) > 0.05)
    amp = fit_psf_amplitudes(image, weight, psf, x, y, chunk=7)
    design = np.stack([psf_model_image(shape, psf, [a], [b], [1.0]).ravel() for a, b in zip(x, y)])
    w = weight.ravel()
    dense = np.linalg.solve((design * w) @ design.T, design @ (w * image.ravel()))
    np.testing.assert_allclose(amp, dense, rtol=1e-8, atol=1e-8 * np.abs(dense).max())


def test_sparse_amplitudes_recover_blended_fluxes():
    """Noise-free crowded field, stars down to 0.8 FWHM apart with flux ratios up to 100: the simultaneous fit
    returns every flux to 1e-6; fitting each star alone is off by up to tens of per cent."""
    rng = np.random.default_rng(6)
    shape, fwhm = (200, 200), 6.0
    psf = GalSimPsf(fwhm=fwhm, size=31)
    x, y = _crowd(rng, 120, shape, fwhm, 0.8 * fwhm)
    flux = np.exp(rng.uniform(np.log(1e3), np.log(1e5), len(x)))
    image = psf_model_image(shape, psf, x, y, flux)
    weight = np.full(shape, 1.0 / SKY)
    amp = fit_psf_amplitudes(image, weight, psf, x, y)
    np.testing.assert_allclose(amp, flux, rtol=1e-6)
    alone = np.array([fit_psf_amplitudes(image, weight, psf, [a], [b])[0] for a, b in zip(x, y)])
    assert np.max(np.abs(alone / flux - 1)) > 0.1


def test_other_sources_subtracted_from_whole_pixel_peaks():
    """Noise-free crowded field (stars >= 1 FWHM apart: resolved), positions given as whole-pixel peaks as
    detection gives them: after the centroid refinement and the simultaneous amplitudes, the kept (PSF) stars
    are left with their neighbours' light removed to < 1 % of their own peak pixel, and < 1 % of each dropped
    star's flux remains in its core; without the refinement (rint positions) the residual is several times
    larger."""
    rng = np.random.default_rng(8)
    shape, fwhm = (300, 300), 8.0
    psf = GalSimPsf(fwhm=fwhm, size=49)
    x, y = _crowd(rng, 230, shape, fwhm, fwhm, border=-10.0)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(5e5), len(x)))
    image = psf_model_image(shape, psf, x, y, flux)
    var = SKY + image
    weight = np.full(shape, 1.0 / SKY)
    inside = (x > 30) & (x < 270) & (y > 30) & (y < 270)
    keep = inside & (flux > 5e4)
    assert keep.sum() >= 10
    own = psf_model_image(shape, psf, x[keep], y[keep], flux[keep])
    cleaned = subtract_other_sources(image, var, weight, psf, np.rint(x), np.rint(y), keep)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]

    def worst(resid):
        kept = max(np.abs(resid[np.hypot(xx - a, yy - b) < fwhm]).max() / (f * psf.image_at(a, b).max())
                   for a, b, f in zip(x[keep], y[keep], flux[keep]))
        dropped = max(abs(resid[np.hypot(xx - a, yy - b) < 0.5 * fwhm].sum())
                      / (f * psf.image_at(a, b)[np.hypot(xx[:49, :49] - 24 - (a - round(a)),
                                                          yy[:49, :49] - 24 - (b - round(b))) < 0.5 * fwhm].sum())
                      for a, b, f in zip(x[~keep & inside], y[~keep & inside], flux[~keep & inside]))
        return kept, dropped

    kept, dropped = worst(cleaned - own)
    print("refined", kept, dropped)
    assert kept < 0.01 and dropped < 0.01
    amp = fit_psf_amplitudes(image, weight, psf, np.rint(x), np.rint(y))
    drop = ~keep & (amp > 0)
    rough = image - psf_model_image(shape, psf, np.rint(x)[drop], np.rint(y)[drop], amp[drop]) - own
    kept0, dropped0 = worst(rough)
    print(f"kept {kept:.2e} dropped {dropped:.2e}; whole-pixel positions: kept {kept0:.2e} dropped {dropped0:.2e}")
    assert kept0 > 3 * kept and dropped0 > 3 * dropped
