"""Neighbour-subtracted aperture photometry for calibration stars.

In a crowded field a large aperture (the aperture-correction reference, 25 px)
on a bright star also collects its neighbours' light: on the simulated
200,000 stars/deg^2 field the median excess is +0.6 % for S/N > 200 stars,
which would bias every zero point by ~6 mmag.  Subtracting every other
source's PSF model (amplitude = its PSF flux) before measuring the aperture
removes stellar neighbours; galaxies are only partly removed, and the
clipped fit of the aperture correction takes care of the rest.
"""

from __future__ import annotations

import numpy as np
import sep


def psf_model_image(shape: tuple[int, int], psf, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Sum of ``flux * PSF`` placed at each (x, y); electrons, float64 (ny, nx)."""
    model = np.zeros(shape, dtype=np.float64)
    ny, nx = shape
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)):
        if not (np.isfinite(fi) and fi > 0 and np.isfinite(xi) and np.isfinite(yi)):
            continue
        stamp = psf.image_at(xi, yi)
        h = stamp.shape[0] // 2
        cx, cy = int(np.rint(xi)), int(np.rint(yi))
        x0, x1 = max(cx - h, 0), min(cx + h + 1, nx)
        y0, y1 = max(cy - h, 0), min(cy + h + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        model[y0:y1, x0:x1] += fi * stamp[y0 - (cy - h):y1 - (cy - h), x0 - (cx - h):x1 - (cx - h)]
    return model


def aperture_flux_without_neighbours(
    image: np.ndarray, variance: np.ndarray, psf, x: np.ndarray, y: np.ndarray, psf_flux: np.ndarray,
    which: np.ndarray, radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aperture flux (electrons) of sources ``which`` after subtracting all OTHER sources' PSF models.

    Returns (flux, error, flag) for the selected rows; flag is set when the
    aperture leaves the image.
    """
    which = np.asarray(which)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    psf_flux = np.asarray(psf_flux, float)
    model = psf_model_image(image.shape, psf, x, y, psf_flux)
    residual = np.ascontiguousarray(image, dtype=np.float64) - model
    var = np.ascontiguousarray(variance, dtype=np.float64)
    res_flux, err, flag = sep.sum_circle(residual, x[which], y[which], radius, var=var, subpix=5)
    # Add back each star's OWN model within the aperture (its neighbours stay subtracted).
    own = np.empty(len(which))
    for k, i in enumerate(which):
        stamp = psf.image_at(x[i], y[i])
        h = stamp.shape[0] // 2
        cxs, cys = h + (x[i] - np.rint(x[i])), h + (y[i] - np.rint(y[i]))
        f, _, _ = sep.sum_circle(np.ascontiguousarray(stamp, dtype=np.float64), [cxs], [cys], radius, subpix=5)
        own[k] = psf_flux[i] * f[0] if np.isfinite(psf_flux[i]) else np.nan
    return np.asarray(res_flux) + own, np.asarray(err), (np.asarray(flag) & sep.APER_TRUNC) != 0
