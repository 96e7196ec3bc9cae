"""Cosmic-ray detection (L.A.Cosmic-like, with a PSF sharpness test) and repair.

A pixel seeds a cosmic ray (CR) when all of these hold:

1. **Laplacian edge significance** (van Dokkum 2001).  ``L+`` is the Laplacian
   of the 2x block-replicated image, negative values clipped, averaged back to
   the native grid; computed directly on the native grid as the mean of
   ``max(2 I - I_h - I_v, 0)`` over the four (horizontal, vertical) neighbour
   pairs, so a single hot pixel of amplitude A gives ``L+ = 2A``.  The
   significance is ``S' = (L+ - med5(L+)) / (2 N)`` with ``N`` the noise from the
   5x5 median of the variance plane (so the CR's own Poisson noise does not
   hide it) and ``med5`` removing the smooth Laplacian of extended wings.
   ``S' > n_sigma``.
2. **Fine-structure contrast** ``(L+ - med5 L+) / (2 F) > objlim`` with
   ``F = med3(I) - med7(med3(I))``: a star has large fine structure, a CR
   (one or a few pixels wide) has none.  ``objlim`` defaults to
   ``max(2, 3 x`` the largest contrast of a noise-free pixelized Gaussian PSF of
   the given FWHM at any sub-pixel phase``)``.
3. **Sharper than the PSF** (the SDSS/LSST "condition 3"): for at least one of
   the four directions (row, column, two diagonals), with ``B`` the local
   background ``med7(med3(I))``, ``R(d)`` the centred pixelized PSF at distance
   ``d`` relative to its peak and ``k = psf_noise_k``,
   ``sharpness x R(d) (I - B - k sigma_I) > (a + b)/2 - B + k sigma_ab``.
   No star can satisfy it (its neighbours are at least ``R(d)`` of its peak).
4. **Significant itself**: ``I - B > n_sigma N`` (rejects ~4-sigma noise pixels
   whose negative neighbours inflate the Laplacian).

Seeds are grown into 8-connected neighbours with ``S' > n_sigma`` and then with
``S' > grow_sigma`` (L.A.Cosmic's two growth steps).  The search is repeated on
the repaired image (``n_iter``) to pick up pixels hidden by a brighter
neighbour.  All statistics are evaluated only at pre-selected pixels (a
superset of ``S' > n_sigma``), with vectorised window gathers: no full-image
median filters.  Pixels with ``skip_planes`` (BAD, SAT, NO_DATA, INTRP) are
never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.special import erf

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.interpolate import interpolate_masked

_PAD = 4
_SKIP = int(masks.BAD | masks.SAT | masks.NO_DATA | masks.INTRP)
_NEIGH8 = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
_DIRS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx) of the neighbour pairs


def _lplus(image: np.ndarray) -> np.ndarray:
    """Clipped Laplacian of the 2x-subsampled image, rebinned (image units)."""
    p = np.pad(image, 1, mode="edge")
    c2 = 2.0 * p[1:-1, 1:-1]
    lft, rgt, up, dn = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    out = np.maximum(c2 - lft - up, 0)
    out += np.maximum(c2 - rgt - up, 0)
    out += np.maximum(c2 - lft - dn, 0)
    out += np.maximum(c2 - rgt - dn, 0)
    return 0.25 * out


def _windows(padded: np.ndarray, yy: np.ndarray, xx: np.ndarray, half: int) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) windows of a ``_PAD``-padded array centred on (yy, xx)."""
    o = np.arange(-half, half + 1)
    return padded[(yy + _PAD)[:, None, None] + o[None, :, None], (xx + _PAD)[:, None, None] + o[None, None, :]]


def _fine_structure(win9: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From (n, 9, 9) windows: (med3 at the centre - med7(med3), med7(med3)); NaN = ignore."""
    n = win9.shape[0]
    med = np.nanmedian if np.isnan(win9).any() else np.median
    m3 = med(sliding_window_view(win9, (3, 3), axis=(1, 2)).reshape(n, 7, 7, 9), axis=-1)
    m7 = med(m3.reshape(n, 49), axis=1)
    return m3[:, 3, 3] - m7, m7


def _pixelized_gaussian(fwhm: float, dx: float, dy: float, size: int = 31) -> np.ndarray:
    s = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    e = np.arange(size + 1) - size // 2 - 0.5
    px = np.diff(0.5 * erf((e - dx) / (np.sqrt(2.0) * s)))
    py = np.diff(0.5 * erf((e - dy) / (np.sqrt(2.0) * s)))
    return np.outer(py, px)


def psf_contrast_limit(psf_fwhm_pix: float) -> float:
    """Largest fine-structure contrast of a noise-free pixelized Gaussian PSF (any phase)."""
    best = 0.0
    for dx, dy in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.5), (0.25, 0.1)):
        img = _pixelized_gaussian(psf_fwhm_pix, dx, dy)
        lp = _lplus(img)
        num = lp - ndimage.median_filter(lp, 5)
        m3 = ndimage.median_filter(img, 3)
        f = np.maximum(m3 - ndimage.median_filter(m3, 7), 1e-3 * img.max())
        core = num > 0.02 * num.max()
        best = max(best, float((num / (2.0 * f))[core].max()))
    return best


def _psf_neighbour_ratios(psf_fwhm_pix: float) -> np.ndarray:
    """R(d) for the four directions: centred pixelized Gaussian, neighbour / peak."""
    g = _pixelized_gaussian(psf_fwhm_pix, 0.0, 0.0, size=5)
    return np.array([g[2 + dy, 2 + dx] / g[2, 2] for dy, dx in _DIRS])


def _sprime(var_p, lp_p, yy, xx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Laplacian significance S' at (yy, xx); also its numerator and the noise N."""
    noise = np.sqrt(np.maximum(np.median(_windows(var_p, yy, xx, 2).reshape(len(yy), -1), axis=1), 1e-12))
    lwin = _windows(lp_p, yy, xx, 2).reshape(len(yy), -1)
    num = lwin[:, 12] - np.median(lwin, axis=1)
    return num / (2.0 * noise), num, noise


def _star_tests(img_p, var_p, yy, xx, num, noise, objlim, ratios, sharpness, k, n_sigma, flag_p=None):
    """At (yy, xx): (fine-structure contrast test, sharpness & significance tests); True = CR-like.

    Pixels where the padded bool ``flag_p`` is True are left out of the fine structure.
    """
    win = _windows(img_p, yy, xx, 4)
    if flag_p is not None:
        win = np.where(_windows(flag_p, yy, xx, 4), np.nan, win)
    f, back = _fine_structure(win)
    ok = num / (2.0 * np.maximum(f, 0.01 * noise)) > objlim
    c = img_p[yy + _PAD, xx + _PAD]
    sig_c = np.sqrt(np.maximum(var_p[yy + _PAD, xx + _PAD], 0))
    sharp = np.zeros(len(yy), dtype=bool)
    significant = c - back > n_sigma * noise
    for (dy, dx), r in zip(_DIRS, ratios):
        ya, xa, yb, xb = yy + _PAD + dy, xx + _PAD + dx, yy + _PAD - dy, xx + _PAD - dx
        mean_ab = 0.5 * (img_p[ya, xa] + img_p[yb, xb])
        sig_ab = 0.5 * np.sqrt(np.maximum(var_p[ya, xa] + var_p[yb, xb], 0))
        sharp |= sharpness * r * (c - back - k * sig_c) > mean_ab - back + k * sig_ab
    return ok, sharp & significant


def find_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    psf_fwhm_pix: float,
    n_sigma: float = 5.0,
    grow_sigma: float = 1.5,
    objlim: float | None = None,
    sharpness: float = 0.7,
    psf_noise_k: float = 2.5,
    n_iter: int = 2,
    skip_planes: int = _SKIP,
) -> np.ndarray:
    """Return a bool (ny, nx) array, True on cosmic-ray pixels.

    Parameters
    ----------
    image, variance:
        Calibrated image (electrons) and its variance (electrons^2); the
        background need not be subtracted.
    mask:
        uint32 mask planes; pixels with ``skip_planes`` are never flagged.
    psf_fwhm_pix:
        PSF FWHM, pixels (sets ``objlim`` and the sharpness ratios).
    n_sigma:
        Laplacian significance of a seed; ``grow_sigma`` for the final growth.
    objlim:
        Fine-structure contrast limit; default from the PSF (module docstring).
    sharpness:
        Safety factor (< 1) on the PSF neighbour ratios of the sharpness test.
    psf_noise_k:
        Noise allowance (sigma) on both sides of the sharpness test.
    n_iter:
        Searches, each on the image with the CRs found so far repaired.
    """
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    ny, nx = img.shape
    usable = (np.asarray(mask) & np.uint32(skip_planes)) == 0
    usable &= np.isfinite(img) & np.isfinite(var)
    if objlim is None:
        objlim = max(2.0, 3.0 * psf_contrast_limit(psf_fwhm_pix))
    ratios = _psf_neighbour_ratios(psf_fwhm_pix)
    var_p = np.pad(np.where(usable, var, np.nan), _PAD, mode="reflect")
    var_p = np.where(np.isfinite(var_p), var_p, np.float32(np.nanmedian(var_p)))
    cr = np.zeros((ny, nx), dtype=bool)
    # Unusable pixels not already interpolated (by ISR) may hold garbage: refill
    # them so that their edges do not look like sharp features.
    refill = ~usable & (((np.asarray(mask) & masks.INTRP) == 0) | ~np.isfinite(img))
    work = interpolate_masked(img, refill, sigma=1.0) if refill.any() else img.copy()
    flag_p = np.zeros(var_p.shape, dtype=bool)  # CR pixels found so far (padded)
    noise_min2 = ndimage.minimum_filter(var_p, size=3)[_PAD:-_PAD, _PAD:-_PAD]
    for _ in range(max(int(n_iter), 1)):
        lp = _lplus(work)
        cand = (lp > 0) & (lp * lp > (2.0 * n_sigma) ** 2 * noise_min2) & usable & ~cr
        yy, xx = np.nonzero(cand)
        if len(yy) == 0:
            break
        img_p = np.pad(work, _PAD, mode="reflect")
        lp_p = np.pad(lp, _PAD, mode="reflect")
        sp, num, noise = _sprime(var_p, lp_p, yy, xx)
        sel = sp > n_sigma
        yy, xx = yy[sel], xx[sel]
        fine, sharp = _star_tests(img_p, var_p, yy, xx, num[sel], noise[sel], objlim, ratios, sharpness, psf_noise_k, n_sigma)
        seed = fine & sharp
        if not seed.any():
            break
        new = np.zeros_like(cr)
        new[yy[seed], xx[seed]] = True
        flag_p[yy[seed] + _PAD, xx[seed] + _PAD] = True
        # L.A.Cosmic growth: into neighbours above n_sigma until convergence,
        # then one more ring above grow_sigma; grown pixels must pass the
        # fine-structure test (not the sharpness one: a track is not sharp along itself).
        for thresh, rounds in ((n_sigma, 16), (grow_sigma, 1)):
            for _ in range(rounds):
                cy, cx = np.nonzero(new)
                ny_ = (cy[:, None] + _NEIGH8[:, 0]).ravel()
                nx_ = (cx[:, None] + _NEIGH8[:, 1]).ravel()
                ok = (ny_ >= 0) & (ny_ < ny) & (nx_ >= 0) & (nx_ < nx)
                flat = np.unique(ny_[ok] * nx + nx_[ok])
                gy, gx = flat // nx, flat % nx
                keep = usable[gy, gx] & ~new[gy, gx] & ~cr[gy, gx]
                gy, gx = gy[keep], gx[keep]
                if len(gy) == 0:
                    break
                sp, num, noise = _sprime(var_p, lp_p, gy, gx)
                add = sp > thresh
                if add.any():  # never grow into a star: fine structure without the CR pixels
                    add[add] = _star_tests(
                        img_p, var_p, gy[add], gx[add], num[add], noise[add],
                        objlim, ratios, sharpness, psf_noise_k, n_sigma, flag_p=flag_p,
                    )[0]
                if not add.any():
                    break
                new[gy[add], gx[add]] = True
                flag_p[gy[add] + _PAD, gx[add] + _PAD] = True
        cr |= new
        work = interpolate_masked(work, new, sigma=1.0)
    return cr & usable


@dataclass(frozen=True, eq=False)
class CosmicRayRepair:
    """Repaired planes: image (electrons), mask (CR|INTRP added), variance or None."""

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray | None
    n_pixels: int


def repair_cosmic_rays(
    image: np.ndarray,
    mask: np.ndarray,
    cr: np.ndarray,
    variance: np.ndarray | None = None,
    sigma: float = 1.0,
) -> CosmicRayRepair:
    """Interpolate over ``cr`` pixels (new arrays; inputs are not modified).

    The fill is the Gaussian normalized convolution of
    :func:`~lsst_prod.algorithms.interpolate.interpolate_masked` from the
    pixels that are neither CR nor unusable; ``variance`` (if given) is filled
    the same way so that it no longer carries the CR's Poisson noise.
    """
    cr = np.asarray(cr, dtype=bool)
    exclude = cr | ((np.asarray(mask) & masks.UNUSABLE) != 0)
    new_mask = np.array(mask, dtype=np.uint32, copy=True)
    new_mask[cr] |= masks.CR | masks.INTRP
    if not cr.any():
        return CosmicRayRepair(np.array(image, np.float32), new_mask, None if variance is None else np.array(variance, np.float32), 0)
    new_image = np.array(image, dtype=np.float32, copy=True)
    filled = interpolate_masked(image, exclude, sigma=sigma)
    new_image[cr] = filled[cr]
    new_var = None
    if variance is not None:
        new_var = np.array(variance, dtype=np.float32, copy=True)
        new_var[cr] = interpolate_masked(variance, exclude, sigma=sigma)[cr]
    return CosmicRayRepair(new_image, new_mask, new_var, int(cr.sum()))
