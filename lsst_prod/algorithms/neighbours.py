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
    which: np.ndarray, radius: float, fwhm: float | None = None, min_edge_fwhm: float = 3.0,
    diffraction: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Aperture flux (electrons) of sources ``which`` after subtracting all OTHER sources' PSF models.

    Returns (flux, error, flag, area) for the selected rows; ``area`` is the aperture's area on the
    image (pixels^2, for a local-background subtraction).  Apertures are exact (``subpix=0``).
    Without ``fwhm`` the flag is set when the aperture leaves the image.  With ``fwhm`` (pixels), an
    aperture that leaves the image is completed with the star's own model over its off-image part
    (the PSF model stamp, extended beyond it by the Kolmogorov (x Airy, ``diffraction`` = (lambda/D in
    pixels, obscuration)) ``r^-11/3`` wing:
    :func:`~lsst_prod.algorithms.apcorr.extended_psf_image`), and is flagged only when the centre is
    closer than ``min_edge_fwhm`` FWHM to the edge (there the missing light is more than the wing).
    """
    from .apcorr import extended_psf_image

    which = np.asarray(which)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    psf_flux = np.asarray(psf_flux, float)
    model = psf_model_image(image.shape, psf, x, y, psf_flux)
    residual = np.ascontiguousarray(image, dtype=np.float64) - model
    var = np.ascontiguousarray(variance, dtype=np.float64)
    res_flux, err, flag = sep.sum_circle(residual, x[which], y[which], radius, var=var, subpix=0)
    truncated = (np.asarray(flag) & sep.APER_TRUNC) != 0
    area = np.full(len(which), np.pi * radius * radius)
    if truncated.any():
        a, _, _ = sep.sum_circle(np.ones(image.shape), x[which][truncated], y[which][truncated], radius, subpix=0)
        area[truncated] = a
    ny, nx = image.shape
    # Add back each star's OWN model within the aperture (its neighbours stay subtracted); with ``fwhm``,
    # its whole aperture including the part off the image.
    own = np.empty(len(which))
    for k, i in enumerate(which):
        stamp = psf.image_at(x[i], y[i])
        if fwhm is not None and truncated[k]:
            # the residual holds the on-image light minus the own model stamp (psf_model_image clips it to
            # the image): add that stamp back on the image, and the extended model off it
            h = int(np.ceil(radius)) + 2
            dx, dy = x[i] - np.rint(x[i]), y[i] - np.rint(y[i])
            centred = psf.image_at(float(np.rint(x[i])), float(np.rint(y[i])))  # centred on its middle pixel
            ext = _shift(extended_psf_image(centred, fwhm, h, diffraction=diffraction), dx, dy)
            h = ext.shape[0] // 2  # at least the model stamp's half-width
            reg = np.zeros_like(ext)
            hs = stamp.shape[0] // 2
            if hs <= h:
                reg[h - hs : h + hs + 1, h - hs : h + hs + 1] = stamp
            sx = np.arange(-h, h + 1) + int(np.rint(x[i]))
            sy = np.arange(-h, h + 1) + int(np.rint(y[i]))
            on = ((sy >= 0) & (sy < ny))[:, None] & ((sx >= 0) & (sx < nx))[None, :]
            both = np.ascontiguousarray(np.where(on, reg, ext))
            f, _, _ = sep.sum_circle(both, [h + dx], [h + dy], radius, subpix=0)
            own[k] = psf_flux[i] * f[0] if np.isfinite(psf_flux[i]) else np.nan
            continue
        h = stamp.shape[0] // 2
        cxs, cys = h + (x[i] - np.rint(x[i])), h + (y[i] - np.rint(y[i]))
        f, _, _ = sep.sum_circle(np.ascontiguousarray(stamp, dtype=np.float64), [cxs], [cys], radius, subpix=0)
        own[k] = psf_flux[i] * f[0] if np.isfinite(psf_flux[i]) else np.nan
    if fwhm is None:
        out_flag = truncated
    else:
        d_edge = np.minimum.reduce([x[which], y[which], nx - 1 - x[which], ny - 1 - y[which]])
        out_flag = truncated & (d_edge < min_edge_fwhm * float(fwhm))
    return np.asarray(res_flux) + own, np.asarray(err), out_flag, area


def _shift(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Sub-pixel shift of a centred stamp by (dx, dy) pixels (FFT phase: band-limited interpolation)."""
    ny, nx = stamp.shape
    kx = np.fft.fftfreq(nx)[None, :]
    ky = np.fft.fftfreq(ny)[:, None]
    ph = np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.ifft2(np.fft.fft2(stamp) * ph).real
