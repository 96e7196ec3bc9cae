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


def _sparse_linear_fit(image: np.ndarray, weight: np.ndarray, st: np.ndarray, ix: np.ndarray, iy: np.ndarray,
                       chunk: int = 256) -> np.ndarray:
    """Weighted least-squares coefficients of the basis stamps ``st`` (N, s, s), stamp k centred on pixel
    (ix[k], iy[k]): minimises sum w (image - sum_k c_k B_k)^2.  The normal matrix is sparse (stamps overlap
    only within a stamp width): O(N x overlapping x s^2) time, O(N s^2) memory, sparse direct solve.
    Coefficients of stamps with no weight are 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve
    from scipy.spatial import cKDTree

    n, s = st.shape[0], st.shape[1]
    h = s // 2
    ny, nx = image.shape
    pad = h + 1 + int(max(0, -ix.min(), -iy.min(), ix.max() - (nx - 1), iy.max() - (ny - 1)))  # sources off the image
    wp = np.pad(np.asarray(weight, np.float64), pad)
    dp = np.pad(np.asarray(image, np.float64), pad)
    off = np.arange(-h, h + 1)
    rhs, diag = np.zeros(n), np.zeros(n)
    for a in range(0, n, chunk):  # (chunk, s, s) windows at a time
        b = min(a + chunk, n)
        yy = iy[a:b, None, None] + off[None, :, None] + pad
        xx = ix[a:b, None, None] + off[None, None, :] + pad
        w = wp[yy, xx]
        rhs[a:b] = (w * st[a:b] * dp[yy, xx]).sum((1, 2))
        diag[a:b] = (w * st[a:b] ** 2).sum((1, 2))
    pairs = cKDTree(np.column_stack([ix, iy])).query_pairs(np.sqrt(2.0) * (s - 1), output_type="ndarray")
    vals = np.zeros(len(pairs))
    for m, (i, j) in enumerate(pairs):
        dx, dy = ix[j] - ix[i], iy[j] - iy[i]
        if abs(dx) >= s or abs(dy) >= s:
            continue
        # overlap in stamp i's frame: rows/cols where stamp j also is
        ya, yb, xa, xb = max(0, dy), min(s, s + dy), max(0, dx), min(s, s + dx)
        w = wp[iy[i] - h + ya + pad:iy[i] - h + yb + pad, ix[i] - h + xa + pad:ix[i] - h + xb + pad]
        vals[m] = (w * st[i, ya:yb, xa:xb] * st[j, ya - dy:yb - dy, xa - dx:xb - dx]).sum()
    ok = diag > 0
    rows = np.r_[np.arange(n), pairs[:, 0], pairs[:, 1]]
    cols = np.r_[np.arange(n), pairs[:, 1], pairs[:, 0]]
    data = np.r_[np.where(ok, diag, 1.0), vals, vals]
    normal = coo_matrix((data, (rows, cols)), shape=(n, n)).tocsc()
    coef = np.atleast_1d(spsolve(normal, np.where(ok, rhs, 0.0)))
    return np.where(ok & np.isfinite(coef), coef, 0.0)


def _stamps(psf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, s, s) unit-sum PSF model stamps at (x, y), one size."""
    first = psf.image_at(float(x[0]), float(y[0]))
    s = first.shape[0]
    return np.stack([first] + [psf.image_at(float(a), float(b), s) for a, b in zip(x[1:], y[1:])])


def fit_psf_amplitudes(image: np.ndarray, weight: np.ndarray, psf, x: np.ndarray, y: np.ndarray,
                       chunk: int = 256) -> np.ndarray:
    """Simultaneous least-squares PSF amplitudes (electrons) of every source at fixed positions.

    Minimises sum w (image - sum_k a_k P_k)^2 with P_k = ``psf.image_at(x_k, y_k)`` (unit sum) and the
    per-pixel weight ``w`` (1 / background variance, 0 on unusable pixels).  The normal matrix is sparse:
    a source couples only to those whose stamps overlap it, so the cost is O(n x neighbours x stamp area)
    and the memory O(n x stamp area), not O(n x image) as one dense design over a crowded region (445
    peaks x a 1024^2 window: 3.6 GB); solved with a sparse direct solver.  Rows with no weight get 0.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return np.zeros(0)
    return _sparse_linear_fit(image, weight, _stamps(psf, x, y), np.rint(x).astype(int), np.rint(y).astype(int),
                              chunk)


def fit_psf_photometry(image: np.ndarray, weight: np.ndarray, psf, x: np.ndarray, y: np.ndarray,
                       n_iter: int = 3, max_step: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simultaneous PSF photometry and astrometry of every source (ALLSTAR-like): amplitudes and positions
    by Gauss-Newton on sum w (image - sum_k a_k P(x - x_k, y - y_k))^2, each step linear in
    (a_k, a_k dx_k, a_k dy_k) with the basis (P_k, -dP_k/dx, -dP_k/dy) (sparse, :func:`_sparse_linear_fit`);
    steps are clipped to ``max_step`` pixels and not taken for sources with a non-positive amplitude.
    Returns (x, y, amplitude)."""
    x, y = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    n = len(x)
    if n == 0:
        return x, y, np.zeros(0)
    for _ in range(max(int(n_iter), 1)):
        p = _stamps(psf, x, y)
        gy, gx = np.gradient(p, axis=(1, 2))
        basis = np.concatenate([p, -gx, -gy])
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        c = _sparse_linear_fit(image, weight, basis, np.r_[ix, ix, ix], np.r_[iy, iy, iy])
        amp, bx, by = c[:n], c[n:2 * n], c[2 * n:]
        ok = amp > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = np.clip(np.where(ok, bx / amp, 0.0), -max_step, max_step)
            dy = np.clip(np.where(ok, by / amp, 0.0), -max_step, max_step)
        x, y = x + np.nan_to_num(dx), y + np.nan_to_num(dy)
    return x, y, fit_psf_amplitudes(image, weight, psf, x, y)


def subtract_other_sources(image: np.ndarray, variance: np.ndarray, weight: np.ndarray, psf, x: np.ndarray,
                           y: np.ndarray, keep: np.ndarray, n_iter: int = 3) -> np.ndarray:
    """``image`` minus the PSF models of every source not in ``keep`` (DAOPHOT's neighbour subtraction
    for PSF stars).  Positions start at ``x, y`` (detection peaks: whole pixels); positions and amplitudes
    of ALL sources are fitted at once (:func:`fit_psf_photometry`, ``n_iter`` Gauss-Newton steps), so that
    neither a kept star's light goes to its neighbours nor a neighbour's centroid is pulled by a bright star.
    Negative amplitudes are not subtracted.  ``variance`` is unused (the weights are background-only).
    Returns float64."""
    x, y, amp = fit_psf_photometry(image, weight, psf, x, y, n_iter=n_iter)
    drop = ~np.asarray(keep, bool) & (amp > 0)
    return np.asarray(image, np.float64) - psf_model_image(image.shape, psf, x[drop], y[drop], amp[drop])
