"""Source detection: PSF-matched-filter S/N image, thresholded, grown, with peaks.

For a point source of flux F on white noise of per-pixel variance V, the
maximum-likelihood amplitude is the image correlated with the PSF, and its S/N
is maximal for the matched filter.  We approximate the PSF by a Gaussian of
sigma ``psf_sigma_pix`` (kernel ``G``, unit sum) and compute

    S = G * I,        Var(S) = G^2 * V,        nu = S / sqrt(G^2 * V)

with the 2-D convolutions done separably (``G = g g^T`` and ``G^2 = g^2 (g^2)^T``,
exact on the discrete kernel).  ``nu`` is the significance *of the smoothed
image*: a threshold of 5 means a 5-sigma fluctuation of ``S``, not of a single
pixel.  (The units trap: a threshold compared with the *per-pixel* rms, as
``sep.extract(..., err=rms, filter_kernel=k, filter_type="conv")`` does, is
``2 sqrt(pi) psf_sigma`` (~6 for sigma = 1.7 px) times higher in ``nu``; sep's
default ``filter_type="matched"`` is in ``nu`` units, see the docs.)  For a
point source the peak of ``nu`` is ~ the PSF-fit S/N (exactly so for a
Gaussian PSF and sky-limited noise; 0.87 of it for a Moffat beta=3.5).

Unusable pixels (BAD, CR, NO_DATA, and SAT unless interpolated) get zero
weight: they are set to 0 in both ``I`` and ``V`` before filtering, so they can
neither create nor inflate a detection, and ``nu`` stays correctly normalised.

Pixels with ``nu > threshold`` are labelled (8-connected); regions with fewer
than ``min_pixels`` pixels are dropped; the rest are grown by a disk of radius
``grow_sigma * psf_sigma_pix`` and relabelled (so touching regions merge).
Peaks, two methods:

* ``peak_smoothing=None`` (legacy, single-frame default): local maxima (3x3) of
  the matched-filter image ``S`` with ``nu > threshold``, accepted in decreasing
  ``S`` order when at least ``min_separation_fwhm`` (default 1) PSF FWHM from
  every brighter peak and separated from each of them by a saddle deeper than
  ``max(saddle_sigma * sigma_S, saddle_fraction * S_peak)`` (the fainter peak is
  not connected to a brighter one within ``S > S_peak - depth``).  The matched
  filter broadens a star by sqrt(2), so two stars closer than ~1.2-1.7 FWHM
  (flux ratio 1-0.1) give one peak: such companions are never found.
* ``peak_smoothing=s`` (coadd objects): peaks are searched on a *lightly*
  smoothed image ``P = G_k * I / G_k * w`` (normalised convolution with the usable
  pixels w, Gaussian sigma_k = s * psf_sigma_pix, s = 0 for the raw pixels), which
  keeps the resolution of the data (sqrt(1 + s^2) broadening).  Candidates are
  3x3 local maxima of ``P`` inside footprints with ``nu > threshold``; in each
  footprint they are taken in decreasing ``P`` and a candidate is kept when it is
  at least ``min_separation_fwhm`` (default 0.75: below the 0.85 FWHM at which two
  equal Gaussians stop showing two maxima) from every kept peak and its
  *prominence* over the saddle to every kept brighter peak exceeds
  ``delta = max(saddle_sigma * sqrt(2) * sigma_P, saddle_fraction * P_peak)``:
  the candidate is not connected to a kept peak within ``P > P_peak - delta``.
  sqrt(2) sigma_P is the noise of a peak-minus-saddle difference (two nearly
  independent pixels); sigma_P includes the sources' Poisson noise, so a bright
  star's noise bumps need a larger dip.  This is SExtractor's multi-threshold
  deblending with a noise-scaled contrast (DEBLEND_CONT) and Rubin's peak
  significance test, done on the unsmoothed image so that the dip between two
  close stars is not filtered away.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.footprints import Footprints, split_footprints
from lsst_prod.algorithms.interpolate import group_windows

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_EIGHT = np.ones((3, 3), dtype=bool)


def excluded_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels that must not contribute to detection (bool)."""
    m = np.asarray(mask)
    hard = (m & (masks.BAD | masks.CR | masks.NO_DATA)) != 0
    raw_sat = ((m & masks.SAT) != 0) & ((m & masks.INTRP) == 0)
    return hard | raw_sat


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Unit-sum sampled Gaussian, float64, half-width ``ceil(truncate * sigma)``."""
    half = max(int(np.ceil(truncate * sigma)), 1)
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _separable(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    k = k.astype(a.dtype)
    return ndimage.correlate1d(ndimage.correlate1d(a, k, axis=0, mode="constant"), k, axis=1, mode="constant")


def _usable_copies(image, variance, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 copies of image and variance with unusable (masked or non-finite) pixels set to 0
    and negative variances clipped, plus the boolean map of those pixels."""
    img = np.array(image, dtype=np.float32, copy=True)
    var = np.array(variance, dtype=np.float32, copy=True)
    bad = ~(np.isfinite(img) & np.isfinite(var))
    if mask is not None:
        bad |= excluded_pixels(mask)
    img[bad] = 0.0
    var[bad] = 0.0
    np.maximum(var, 0.0, out=var)
    return img, var, bad


def significance_image(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf_sigma_pix: float
) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed image S [electrons], significance nu = S / sigma_S) for a Gaussian PSF."""
    img, var, bad = _usable_copies(image, variance, mask)
    g = gaussian_kernel_1d(psf_sigma_pix)
    smooth = _separable(img, g)
    noise2 = _separable(var, g * g)
    pos = noise2 > 0
    sig = np.zeros_like(smooth)
    sig[pos] = smooth[pos] / np.sqrt(noise2[pos])
    return smooth, sig


def _local_maxima(smooth: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """True where smooth[yy, xx] is a 3x3 local max (ties broken in raster order)."""
    p = np.pad(smooth, 1, mode="constant", constant_values=-np.inf)
    v = p[yy + 1, xx + 1]
    ok = np.ones(len(yy), dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = p[yy + 1 + dy, xx + 1 + dx]
            ok &= (v > nb) if (dy, dx) < (0, 0) else (v >= nb)
    return ok


def _select_peaks(smooth, sig, inside, sl, cand_idx, py, px, min_sep, saddle_sigma, saddle_fraction, half):
    """Accepted candidate indices within one footprint (slice ``sl``, pixels ``inside``).

    Candidates are sorted by S, brightest first.  The saddle test labels the candidate's component of
    ``S > S_peak - depth`` in a (2 half + 1)^2 window first; only when that component reaches the
    window's edge without meeting an accepted peak is the whole footprint labelled (the same answer:
    a component that meets a peak inside the window meets it in the footprint).  Labelling the whole
    footprint for every candidate cost O(peaks x area): 3.5 s (0.7 s windowed) for a 630,000-pixel
    footprint with 445 peaks of a crowded field in 2" seeing.
    """
    accepted = [cand_idx[0]]
    sub = smooth[sl]
    oy, ox = sl[0].start, sl[1].start
    ny, nx = sub.shape
    kept = np.zeros(sub.shape, bool)
    kept[py[cand_idx[0]] - oy, px[cand_idx[0]] - ox] = True
    for c in cand_idx[1:]:
        ay, ax = py[accepted], px[accepted]
        if np.min(np.hypot(ay - py[c], ax - px[c])) < min_sep:
            continue
        s_peak = smooth[py[c], px[c]]
        sigma_s = s_peak / sig[py[c], px[c]] if sig[py[c], px[c]] > 0 else 0.0
        depth = max(saddle_sigma * sigma_s, saddle_fraction * s_peak)
        cy, cx = py[c] - oy, px[c] - ox
        y0, y1, x0, x1 = max(cy - half, 0), min(cy + half + 1, ny), max(cx - half, 0), min(cx + half + 1, nx)
        lab, _ = ndimage.label(inside[y0:y1, x0:x1] & (sub[y0:y1, x0:x1] > s_peak - depth), structure=_EIGHT)
        own = lab == lab[cy - y0, cx - x0]
        if np.any(own & kept[y0:y1, x0:x1]):
            continue
        edge = ((y0 > 0) and own[0].any()) or ((y1 < ny) and own[-1].any()) or \
               ((x0 > 0) and own[:, 0].any()) or ((x1 < nx) and own[:, -1].any())
        if edge:
            lab, _ = ndimage.label(inside & (sub > s_peak - depth), structure=_EIGHT)
            if np.any(kept & (lab == lab[cy, cx])):
                continue
        accepted.append(c)
        kept[cy, cx] = True
    return accepted


def peak_image(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf_sigma_pix: float, smoothing: float
) -> tuple[np.ndarray, np.ndarray]:
    """(P, sigma_P): the peak-finding image and its per-pixel noise.

    ``P = G_k * (w I) / G_k * w`` with ``G_k`` a unit-sum Gaussian of sigma
    ``smoothing * psf_sigma_pix`` (none below 0.25 px) and w = 1 on usable pixels:
    a normalised convolution, so masked pixels (set to 0) neither make dips nor
    bumps.  ``sigma_P^2 = G_k^2 * (w V) / (G_k * w)^2``.  Pixels with less than
    half of the kernel's weight usable are -inf in ``P`` (never a peak, and they
    cut connections).
    """
    img, var, bad = _usable_copies(image, variance, mask)
    sk = float(smoothing) * float(psf_sigma_pix)
    if sk < 0.25:
        P = np.where(bad, -np.inf, img).astype(np.float32)
        return P, np.sqrt(var)
    g = gaussian_kernel_1d(sk)
    w = (~bad).astype(np.float32)
    den = _separable(w, g)
    num = _separable(img, g)
    nv = _separable(var, g * g)
    ok = den > 0.5
    P = np.full(img.shape, -np.inf, np.float32)
    sP = np.zeros(img.shape, np.float32)
    P[ok] = num[ok] / den[ok]
    sP[ok] = np.sqrt(nv[ok]) / den[ok]
    return P, sP


def _select_prominent(P, delta, inside, sl, cand_idx, py, px, min_sep, half):
    """Candidates (sorted by P, brightest first) of one footprint kept by the prominence test.

    A candidate is kept when it is ``min_sep`` from every kept peak and not connected
    to a kept peak within ``P > P_c - delta_c`` (footprint pixels only).  The
    connected component is first found in a (2 half + 1)^2 window; only when it
    reaches the window's edge without meeting a kept peak is the whole footprint
    labelled.
    """
    sub = P[sl]
    oy, ox = sl[0].start, sl[1].start
    ny, nx = sub.shape
    kept = np.zeros(sub.shape, bool)
    accepted = [cand_idx[0]]
    kept[py[cand_idx[0]] - oy, px[cand_idx[0]] - ox] = True
    for c in cand_idx[1:]:
        ay, ax = py[accepted], px[accepted]
        if np.min(np.hypot(ay - py[c], ax - px[c])) < min_sep:
            continue
        level = P[py[c], px[c]] - delta[c]
        cy, cx = py[c] - oy, px[c] - ox
        y0, y1, x0, x1 = max(cy - half, 0), min(cy + half + 1, ny), max(cx - half, 0), min(cx + half + 1, nx)
        win = inside[y0:y1, x0:x1] & (sub[y0:y1, x0:x1] > level)
        lab, _ = ndimage.label(win, structure=_EIGHT)
        own = lab == lab[cy - y0, cx - x0]
        if np.any(own & kept[y0:y1, x0:x1]):
            continue
        edge = ((y0 > 0) and own[0].any()) or ((y1 < ny) and own[-1].any()) or \
               ((x0 > 0) and own[:, 0].any()) or ((x1 < nx) and own[:, -1].any())
        if edge:
            lab, _ = ndimage.label(inside & (sub > level), structure=_EIGHT)
            if np.any(kept & (lab == lab[cy, cx])):
                continue
        accepted.append(c)
        kept[cy, cx] = True
    return accepted


def detect_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    psf_sigma_pix: float,
    threshold: float = 5.0,
    grow_sigma: float = 2.0,
    min_pixels: int = 1,
    min_separation_fwhm: float | None = None,
    saddle_sigma: float = 3.0,
    saddle_fraction: float = 0.01,
    set_mask: bool = True,
    peak_smoothing: float | None = None,
    max_footprint_peaks: int | None = None,
    link_fwhm: float = 1.5,
) -> Footprints:
    """Detect positive sources; returns :class:`Footprints`.

    Parameters
    ----------
    image:
        Background-subtracted image, electrons.
    variance:
        Per-pixel variance, electrons^2.
    mask:
        uint32 mask planes.  If ``set_mask`` (default) DETECTED is OR-ed in
        **in place** on footprint pixels (pass a copy to keep the input).
    psf_sigma_pix:
        Gaussian sigma of the PSF (matched filter), pixels.
    threshold:
        Detection threshold on the smoothed-image significance nu.
    grow_sigma:
        Footprint growth radius in units of ``psf_sigma_pix``.
    min_pixels:
        Minimum number of above-threshold pixels of a detection.
    min_separation_fwhm, saddle_sigma, saddle_fraction:
        Peak (deblending) criteria, see the module docstring
        (``min_separation_fwhm`` defaults to 1.0 for the legacy method, 0.75 otherwise).
    peak_smoothing:
        None: peaks on the matched-filter image (legacy).  A number s >= 0: peaks on the
        image smoothed by a Gaussian of s * ``psf_sigma_pix``, kept by their prominence
        over the saddles (module docstring).
    max_footprint_peaks, link_fwhm:
        None (default): footprints are the connected regions.  A number: a footprint with more peaks
        is split into footprints of at most this many, its peaks grouped friends-of-friends within
        ``link_fwhm`` FWHM and its pixels shared by the dominant peak
        (:func:`~lsst_prod.algorithms.footprints.split_footprints`): in a crowded field at bad
        seeing the grown footprints percolate over most of the image.
    """
    smooth, sig = significance_image(image, variance, mask, psf_sigma_pix)
    above = sig > threshold
    lab0, n0 = ndimage.label(above, structure=_EIGHT)
    if n0 and min_pixels > 1:
        counts = np.bincount(lab0.ravel(), minlength=n0 + 1)
        above &= counts[lab0] >= min_pixels
    r = grow_sigma * psf_sigma_pix
    if r >= 1.0 and above.any():
        rr = int(np.floor(r))
        o = np.arange(-rr, rr + 1)
        disk = (o[:, None] ** 2 + o[None, :] ** 2) <= r * r
        grown = np.zeros_like(above)
        for sl in group_windows(above, rr):
            grown[sl] |= ndimage.binary_dilation(above[sl], structure=disk)
    else:
        grown = above
    labels, nfp = ndimage.label(grown, structure=_EIGHT)
    labels = labels.astype(np.int32)

    yy, xx = np.nonzero(above)
    if peak_smoothing is None:
        rank = smooth
    else:
        rank, sigma_p = peak_image(image, variance, mask, psf_sigma_pix, peak_smoothing)
    is_max = _local_maxima(rank, yy, xx)
    py, px = yy[is_max], xx[is_max]
    pfp = labels[py, px].astype(np.int64) - 1
    order = np.lexsort((-rank[py, px], pfp))
    py, px, pfp = py[order], px[order], pfp[order]
    slices = ndimage.find_objects(labels, max_label=nfp)
    starts = np.searchsorted(pfp, np.arange(nfp + 1))
    if min_separation_fwhm is None:
        min_separation_fwhm = 1.0 if peak_smoothing is None else 0.75
    min_sep = min_separation_fwhm * _FWHM_PER_SIGMA * psf_sigma_pix
    half_legacy = int(np.ceil(3 * _FWHM_PER_SIGMA * psf_sigma_pix)) + 2
    if peak_smoothing is not None:
        pv = rank[py, px].astype(np.float64)
        delta = np.maximum(saddle_sigma * np.sqrt(2.0) * sigma_p[py, px], saddle_fraction * np.abs(pv))
        half = int(np.ceil(3 * _FWHM_PER_SIGMA * psf_sigma_pix)) + 2
    keep: list[int] = []
    for k in range(nfp):
        idx = np.arange(starts[k], starts[k + 1])
        if len(idx) == 0:
            # Maximum on the region edge (variance gradient): take the most significant pixel.
            sel = (labels[yy, xx] == k + 1)
            j = np.argmax(np.where(sel, sig[yy, xx], -np.inf))
            py, px, pfp = np.append(py, yy[j]), np.append(px, xx[j]), np.append(pfp, k)
            keep.append(len(py) - 1)
        elif len(idx) == 1:
            keep.append(int(idx[0]))
        else:
            inside = labels[slices[k]] == k + 1
            if peak_smoothing is None:
                keep.extend(_select_peaks(smooth, sig, inside, slices[k], idx, py, px, min_sep, saddle_sigma,
                                          saddle_fraction, half_legacy))
            else:
                keep.extend(_select_prominent(rank, delta, inside, slices[k], idx, py, px, min_sep, half))
    keep_a = np.array(keep, dtype=np.int64)
    py, px, pfp = py[keep_a], px[keep_a], pfp[keep_a]
    psig = sig[py, px].astype(np.float64)
    order = np.lexsort((-psig, pfp))

    bbox = np.array(
        [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.int64
    ).reshape(nfp, 4)
    area = np.bincount(labels.ravel(), minlength=nfp + 1)[1:].astype(np.int64)
    if set_mask:
        mask[labels > 0] |= masks.DETECTED
    out = Footprints(
        labels=labels,
        bbox=bbox,
        area=area,
        peak_footprint=pfp[order],
        peak_x=px[order].astype(np.float64),
        peak_y=py[order].astype(np.float64),
        peak_significance=psig[order],
    )
    if max_footprint_peaks is not None:
        out = split_footprints(out, psf_sigma_pix, int(max_footprint_peaks),
                               peak_value=smooth[py[order], px[order]].astype(np.float64), link_fwhm=link_fwhm)
    return out
