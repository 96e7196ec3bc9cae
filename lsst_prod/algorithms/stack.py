"""Stack warps into a coadd: weighted mean with PSF-matched outlier rejection, and the coadd PSF.

Weights are constant per input, ``weight_scale / median(variance)``: per-pixel
inverse variances include each star's own Poisson noise and bias its flux.

Outlier rejection (transients, asteroids, satellite trails, left-over cosmic
rays) never compares the warps as they are: with unequal seeing a star's core
legitimately differs between warps and per-pixel sigma clipping eats its flux.
:func:`stack_warps` instead

1. convolves every warp to a Gaussian PSF of ``target_fwhm_factor`` x the worst
   FWHM (Gaussian kernel, or :func:`psf_match_kernel` for inputs with a PSF
   stamp); the variance is propagated and rescaled by the robust chi^2;
2. fits each matched warp's residual PSF mismatch against the per-pixel median
   (Moffat wings are not matched by a Gaussian kernel: up to 10% of a star's
   peak at 2x worse seeing), ``sum_k (a_k + b_k x + c_k y) (G_k * med - med)``
   with Gaussians G_k of 1/3, 2/3, 4/3 the target sigma (robust weighted least
   squares on the sources), subtracts it (20-100x less mismatch) and takes
   the median again: the reference;
3. seeds outliers where a warp deviates by > ``clip_nsigma`` sigma AND by >
   ``frac_i`` x the reference peaks' envelope ``peak / (1 + (d / r0)^2)``,
   r0 = ``protect_core_fwhm`` x target (protects bright stars from the remaining
   mismatch), ``frac_i = clip_flux_fraction x clip(|FWHM_i/median - 1| / 0.5, 0.1, 1)``;
4. takes the connected region above ``footprint_nsigma`` around each seed and
   keeps it only if it carries net flux (:func:`_carry_net_flux`: a PSF
   mismatch - ellipticity, position-varying PSF, shift - has lobes of both signs
   that cancel within a FWHM; an artefact adds or removes flux);
5. grows the kept regions by ``grow_fwhm`` x the warp's FWHM, and leaves those
   pixels of the ORIGINAL warp out of the mean (CLIPPED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.psf import FWHM_PER_SIGMA, adaptive_moments, place_centred
from lsst_prod.algorithms.resample import PixelMapping, lanczos_order, overlap_box, warp_psf
from lsst_prod.errors import NoWorkFound

_NOT_PROPAGATED = int(masks.DETECTED | masks.DETECTED_NEGATIVE | masks.NO_DATA | masks.CLIPPED)


# --------------------------------------------------------------------------- PSF matching
def psf_match_kernel(psf_in: np.ndarray, psf_target: np.ndarray, regularization: float = 1e-3) -> np.ndarray:
    """Unit-sum kernel K with K * psf_in ~= psf_target (square, odd, equal-size centred stamps).

    Fourier ratio regularised as ``conj(P_in) P_t / (|P_in|^2 + reg max|P_in|^2)``:
    exact where psf_in has power (the target must be the broader PSF).
    """
    a, b = np.asarray(psf_in, np.float64), np.asarray(psf_target, np.float64)
    if a.shape != b.shape or a.shape[0] % 2 == 0 or a.shape[0] != a.shape[1]:
        raise ValueError(f"PSF stamps must be square, odd and of equal size: {a.shape}, {b.shape}")
    fa, fb = np.fft.rfft2(np.fft.ifftshift(a / a.sum())), np.fft.rfft2(np.fft.ifftshift(b / b.sum()))
    p = np.abs(fa) ** 2
    k = np.fft.fftshift(np.fft.irfft2(fb * np.conj(fa) / (p + regularization * p.max()), s=a.shape))
    return k / k.sum()


def match_to_gaussian(image: np.ndarray, fwhm_in: float, fwhm_target: float, valid: np.ndarray | None = None,
                      variance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Convolve an image to a Gaussian PSF of ``fwhm_target`` pixels (kernel sigma^2 = s_target^2 - s_in^2).

    Invalid pixels are excluded by normalised convolution.  Returns (matched
    image, matched variance (white-noise propagation) or None, coverage = kernel
    weight on valid pixels, 1 in clean areas).
    """
    s2 = (fwhm_target**2 - fwhm_in**2) / FWHM_PER_SIGMA**2
    if s2 < 0:
        raise ValueError(f"target FWHM {fwhm_target} is sharper than the input's {fwhm_in}")
    r = np.arange(-int(np.ceil(4 * np.sqrt(s2))), int(np.ceil(4 * np.sqrt(s2))) + 1)
    g = np.exp(-0.5 * r**2 / max(s2, 1e-6))  # a delta for a vanishing kernel
    return _convolve_masked(image, valid, variance, g / g.sum(), None)


def _conv(arr: np.ndarray, g1: np.ndarray | None, k2: np.ndarray | None) -> np.ndarray:
    """Separable (g1) or 2-d (k2) convolution; the array is reflected at its edges (not a data edge)."""
    if k2 is not None:
        h = k2.shape[0] // 2
        return fftconvolve(np.pad(arr, h, mode="reflect"), k2, mode="same")[h:-h or None, h:-h or None]
    return ndimage.correlate1d(ndimage.correlate1d(arr, g1, axis=0, mode="reflect"), g1, axis=1, mode="reflect")


def _convolve_masked(image, valid, variance, g1, k2):
    img = np.asarray(image, np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    cov = _conv(ok.astype(np.float64), g1, k2)
    safe = np.where(cov > 1e-3, cov, 1.0)
    matched = _conv(np.where(ok, img, 0.0), g1, k2) / safe
    if variance is None:
        return matched, None, cov
    v = np.where(ok, np.asarray(variance, np.float64), 0.0)
    return matched, _conv(v, None if g1 is None else g1**2, None if k2 is None else k2**2) / safe**2, cov


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True, eq=False)
class WarpInput:
    """One warp on the coadd grid, photometrically scaled: image_njy (NaN and/or NO_DATA where no
    data), variance_njy2, mask (uint32), psf_fwhm_pix (coadd pixels), weight_scale (extra weight
    factor, normally 1), psf_image (optional unit-sum centred odd stamp of the warp's PSF, e.g. from
    ``warp_psf``: exact PSF matching instead of the Gaussian approximation)."""

    image_njy: np.ndarray
    variance_njy2: np.ndarray
    mask: np.ndarray
    psf_fwhm_pix: float
    weight_scale: float = 1.0
    psf_image: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Coadd:
    """A stacked patch: image (float32 nJy, NaN where no input), variance (float32 nJy^2 per pixel),
    mask (uint32: NO_DATA, CLIPPED, propagated planes), n_images / n_clipped (int16: inputs used /
    rejected per pixel), weights ((n_inputs,): constant weight of each input, 0 if unusable),
    clipped_fraction ((n_inputs,): rejected fraction of each input's usable pixels), clipped_pixels
    (per input: flat indices of its rejected pixels), target_fwhm_pix (PSF of the matched images, NaN
    without rejection), method, clip_nsigma."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_images: np.ndarray
    n_clipped: np.ndarray
    weights: np.ndarray
    clipped_fraction: np.ndarray
    clipped_pixels: tuple[np.ndarray, ...]
    target_fwhm_pix: float
    method: str
    clip_nsigma: float | None


# --------------------------------------------------------------------------- outlier rejection
def _grow(flag: np.ndarray, radius: float) -> np.ndarray:
    """Dilate by a disc of ``radius`` pixels (distance transform on the flagged bounding box only)."""
    b = _box(flag, int(np.ceil(radius)))
    if b is None or radius <= 0:
        return flag
    out = flag.copy()
    out[b] = ndimage.distance_transform_edt(~flag[b]) <= radius
    return out


def _envelope(ref: np.ndarray, r0: float, rmax: float, min_peak: float) -> np.ndarray:
    """max(|ref|, max over peaks p of |ref(p)| / (1 + (d_p / r0)^2)) for d_p <= rmax; peaks above min_peak."""
    a = np.abs(np.nan_to_num(ref))
    out = a.copy()
    py, px = np.nonzero((a == ndimage.maximum_filter(a, size=3, mode="nearest")) & (a > min_peak))
    r = int(np.ceil(rmax))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    env = np.where(xx**2 + yy**2 <= rmax**2, 1.0 / (1.0 + (xx**2 + yy**2) / r0**2), 0.0)
    ny, nx = a.shape
    for y, x in zip(py, px):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, ny), max(x - r, 0), min(x + r + 1, nx)
        e = env[y0 - y + r: y1 - y + r, x0 - x + r: x1 - x + r]
        np.maximum(out[y0:y1, x0:x1], a[y, x] * e, out=out[y0:y1, x0:x1])
    return out


def _mismatch_fit(resid, basis, xy, weight, use, n_iter=3, clip=5.0, max_pix=200_000):
    """resid ~ sum_k (a_k + b_k x + c_k y) basis_k: robust weighted least squares (normal equations)."""
    idx = np.flatnonzero(use)
    idx = idx[:: max(1, len(idx) // max_pix)]
    if len(idx) < 30 * len(basis):
        return 0.0
    a = np.column_stack([b.ravel()[idx] * t for b in basis for t in (1.0, xy[0].ravel()[idx], xy[1].ravel()[idx])])
    r, w = resid.ravel()[idx], weight.ravel()[idx]
    keep = np.ones(len(idx), bool)
    for _ in range(n_iter):
        aw = a[keep] * w[keep, None]
        coef = np.linalg.solve(aw.T @ a[keep] + 1e-12 * np.eye(a.shape[1]), aw.T @ r[keep])
        keep = np.abs(r - a @ coef) * np.sqrt(w) < clip  # transients and variables drop out of the fit
    return sum(b * (c[0] + c[1] * xy[0] + c[2] * xy[1]) for b, c in zip(basis, coef.reshape(len(basis), 3)))


def _box(flag: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """Bounding box (slices) of the True pixels, grown by ``margin``; None if there are none."""
    ys, xs = np.flatnonzero(flag.any(axis=1)), np.flatnonzero(flag.any(axis=0))
    return None if len(ys) == 0 else tuple(slice(max(v[0] - margin, 0), min(v[-1] + 1 + margin, n))
                                            for v, n in ((ys, flag.shape[0]), (xs, flag.shape[1])))


def _nanmedian0(a: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN (sort-based: much faster than np.nanmedian for a short axis 0)."""
    s, c = np.sort(a, axis=0), np.isfinite(a).sum(axis=0)
    lo = np.take_along_axis(s, np.maximum((c - 1) // 2, 0)[None], 0)[0]
    return 0.5 * (lo + np.take_along_axis(s, (c // 2)[None], 0)[0])


def _carry_net_flux(lab, hit, resid, source, significant, radius, net_flux_fraction, ref, scale_tolerance):
    """The labels in ``hit`` whose region carries net flux: |sum resid| > net_flux_fraction x sum |resid|
    (significant pixels only) over the region grown by ``radius`` into ``source`` pixels.

    A matched warp differs from the reference by a PSF mismatch, the star convolved with the
    difference of two unit-sum kernels (shift, size, ellipticity, wings): its positive and negative
    lobes cancel within about one FWHM.  An artefact (cosmic ray, trail, transient, asteroid) adds or
    removes flux: |sum| ~ sum |.|.

    A region whose net flux is within ``scale_tolerance`` of the reference image's (``ref``) own flux
    there is kept out as well: the warp then differs from the reference by a
    photometric scale (its calibration, aperture correction, a residual PSF mismatch in the core), not
    by an artefact.  Without this, one epoch of a bright star 1 % brighter than the others is many sigma
    off, its core is clipped and its wings are not, and the coadd star loses core light that its PSF
    model has (dp-mini: 40 % of the S/N 300-1000 stars clipped, their PSF fluxes 2 % low).
    """
    keep = []
    objs = ndimage.find_objects(lab)
    r = int(np.ceil(radius))
    ny, nx = lab.shape
    for h in hit:
        sy, sx = objs[h - 1]
        b = (slice(max(sy.start - r, 0), min(sy.stop + r, ny)), slice(max(sx.start - r, 0), min(sx.stop + r, nx)))
        reg = lab[b] == h
        ap = reg | ((ndimage.distance_transform_edt(~reg) <= radius) & source[b])
        dr = resid[b][ap]
        total = np.abs(dr)[np.abs(dr) > significant[b][ap]].sum()
        net = abs(dr.sum())
        if net > net_flux_fraction * total and net > scale_tolerance * abs(ref[b][ap].sum()):
            keep.append(h)
    return np.array(keep, dtype=lab.dtype)


def _outliers(warps, usable, target, clip_nsigma, footprint_nsigma, clip_flux_fraction, protect_core_fwhm,
              grow_fwhm, min_inputs, net_flux_fraction=0.5, scale_tolerance=0.0):
    """Per-input bool maps of the pixels rejected by the PSF-matched comparison (module docstring)."""
    n, shape = len(warps), warps[0].image_njy.shape
    out = [np.zeros(shape, bool) for _ in range(n)]
    margin = int(np.ceil(4 * target + grow_fwhm * max(w.psf_fwhm_pix for w in warps))) + 2
    box = _box(sum(u.astype(np.int16) for u in usable) >= min_inputs, margin)  # nothing to do elsewhere
    if box is None:
        return out
    bshape = usable[0][box].shape
    matched = np.full((n,) + bshape, np.nan, dtype=np.float32)
    mvar = np.full((n,) + bshape, np.inf, dtype=np.float32)
    strict = np.zeros((n,) + bshape, bool)  # the whole kernel on valid pixels (no edge renormalisation)
    for i, w in enumerate(warps):
        use = usable[i][box]
        if not use.any():
            continue
        if w.psf_image is not None:
            r = np.arange(w.psf_image.shape[0]) - w.psf_image.shape[0] // 2
            g = np.exp(-0.5 * (r * FWHM_PER_SIGMA / target) ** 2)
            k2 = psf_match_kernel(w.psf_image, g[:, None] * g[None, :])
            m, v, cov = _convolve_masked(w.image_njy[box], use, w.variance_njy2[box], None, k2)
        else:
            m, v, cov = match_to_gaussian(w.image_njy[box], w.psf_fwhm_pix, target, use, w.variance_njy2[box])
        ok, strict[i] = cov > 0.5, cov > 0.99
        chi = (m / np.sqrt(np.maximum(v, 1e-30)))[strict[i]][::7]  # correlated noise: rescale by robust chi^2
        c = (1.4826 * np.median(np.abs(chi - np.median(chi)))) ** 2 if chi.size > 50 else 1.0
        matched[i], mvar[i] = np.where(ok, m, np.nan), np.where(ok, v * c, np.inf)
    count = strict.sum(axis=0)
    good = count >= min_inputs
    ref_var = ((np.pi / 2) / np.maximum(np.where(strict, 1.0 / mvar, 0.0).sum(axis=0), 1e-30)).astype(np.float32)
    st = target / FWHM_PER_SIGMA
    xy = np.meshgrid(np.linspace(-1, 1, bshape[1]), np.linspace(-1, 1, bshape[0]))

    def median():  # of the strictly valid matched values, in row blocks (bounded temporary memory)
        out = np.zeros(bshape, np.float32)
        for r0 in range(0, bshape[0], 256):
            rs = slice(r0, r0 + 256)
            out[rs] = _nanmedian0(np.where(strict[:, rs], matched[:, rs], np.nan))
        return np.where(count > 0, out, 0.0)

    # residual PSF mismatch: fit each warp against the median, subtract, take the median again: all the
    # warps then share the median's effective PSF, whichever warps cover a pixel
    ref = median()
    basis = [ndimage.gaussian_filter(ref, f * st, mode="constant") - ref for f in (1 / 3, 2 / 3, 4 / 3)]
    sources = good & (np.abs(ref) > 10.0 * np.sqrt(ref_var))
    for i in range(n):
        if strict[i].any():
            resid = np.where(good, np.nan_to_num(matched[i] - ref), 0.0)
            w8 = 1.0 / (mvar[i] + ref_var)
            matched[i] -= _mismatch_fit(resid, basis, xy, w8, sources & strict[i])
    ref = median()
    fw = np.array([w.psf_fwhm_pix for w in warps])
    frac = clip_flux_fraction * np.clip(np.abs(fw / np.median(fw[[u.any() for u in usable]]) - 1) / 0.5, 0.1, 1)
    floor = clip_nsigma * np.sqrt(np.median(ref_var[good])) if good.any() else 0.0
    envelope = _envelope(ref, protect_core_fwhm * target, 4.0 * target, floor / frac.max())
    for i, w in enumerate(warps):
        if not strict[i].any():
            continue
        # seeds only where the comparison is clean; near data edges (renormalised kernel) the outlier
        # region may only grow from a seed
        judged = (strict[i] & good) | (np.isfinite(matched[i]) & ~strict[i] & (count >= max(min_inputs - 1, 1)))
        d = np.where(judged, np.abs(matched[i] - ref), np.nan)
        sig = np.sqrt(mvar[i] + ref_var)
        with np.errstate(invalid="ignore"):
            outside = judged & (d > frac[i] * envelope)  # beyond the possible PSF mismatch
            flag = outside & strict[i] & (d > clip_nsigma * sig)
            if flag.any():  # hysteresis: the connected region above footprint_nsigma around each seed
                lab, _ = ndimage.label(outside & (d > footprint_nsigma * sig))
                hit = np.unique(lab[flag])
                hit = _carry_net_flux(lab, hit[hit > 0], np.where(judged, matched[i] - ref, 0.0),
                                      judged & (envelope > footprint_nsigma * sig), footprint_nsigma * sig,
                                      target, net_flux_fraction, ref, scale_tolerance)
                flag = np.isin(lab, hit)
        out[i][box] = _grow(flag, grow_fwhm * w.psf_fwhm_pix) & usable[i][box]
    return out


def stack_warps(
    warps: Sequence[WarpInput], method: str = "mean", clip_nsigma: float | None = 5.0, footprint_nsigma: float = 2.0,
    clip_flux_fraction: float = 0.05, protect_core_fwhm: float = 0.75, grow_fwhm: float = 1.0,
    target_fwhm_factor: float = 1.1, min_clip_inputs: int = 3, bad_mask: int = int(masks.UNUSABLE),
    mask_propagation_threshold: float = 0.2, clip_scale_tolerance: float = 0.03,
) -> Coadd:
    """Coadd warps on a common pixel grid (inputs in nJy).

    ``method="mean"`` (the only statistic: a median or clipped mean has no
    well-defined PSF): weighted mean, weights ``weight_scale / median(variance)``,
    with PSF-matched outlier rejection (module docstring), off when ``clip_nsigma``
    is None, with fewer than ``min_clip_inputs`` inputs, or at pixels covered by
    fewer.  Pixels with a ``bad_mask`` bit are left out.  An input plane (not
    DETECTED*, NO_DATA, CLIPPED) is set in the coadd where the inputs having it
    carry more than ``mask_propagation_threshold`` of the weight of the inputs
    with data there.  Memory: ~13 bytes x inputs x pixels of the region covered
    by >= ``min_clip_inputs`` inputs; split very deep stacks into sub-boxes
    (with a margin of 4 target FWHM + the grow radius).  ``clip_scale_tolerance``: an outlier region
    whose net flux is within this fraction of the reference's flux there is a photometric scale
    difference, not an artefact, and is not clipped (:func:`_carry_net_flux`).
    """
    if method != "mean":
        raise ValueError(f"method must be 'mean', got {method!r}")
    if len(warps) == 0:
        raise ValueError("no warps to stack")
    n, shape = len(warps), warps[0].image_njy.shape
    if any(not (w.image_njy.shape == w.variance_njy2.shape == w.mask.shape == shape) for w in warps):
        raise ValueError("all warps must share the coadd's shape")
    has_data, usable, weights = [], [], np.zeros(n)
    for i, w in enumerate(warps):
        m = np.asarray(w.mask, np.uint32)
        data = np.isfinite(w.image_njy) & np.isfinite(w.variance_njy2) & (w.variance_njy2 > 0)
        has_data.append(data & ((m & masks.NO_DATA) == 0))
        usable.append(has_data[i] & ((m & np.uint32(bad_mask)) == 0))
        if usable[i].any():
            weights[i] = float(w.weight_scale) / float(np.median(w.variance_njy2[usable[i]]))
    clipped, target = [np.zeros(shape, bool)] * n, float("nan")
    if clip_nsigma is not None and n >= min_clip_inputs and weights.any():
        target = target_fwhm_factor * max(w.psf_fwhm_pix for w, u in zip(warps, usable) if u.any())
        clipped = _outliers(warps, usable, target, clip_nsigma, footprint_nsigma, clip_flux_fraction,
                            protect_core_fwhm, grow_fwhm, min_clip_inputs, scale_tolerance=clip_scale_tolerance)
    n_img, n_clip = np.zeros(shape, np.int16), np.zeros(shape, np.int16)
    boxes = [_box(d) for d in has_data]
    sw, sx, sv = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for w, u, c, wt, b in zip(warps, usable, clipped, weights, boxes):
        if b is not None and wt > 0:
            use = u[b] & ~c[b]
            sw[b] += use * wt
            sx[b] += np.where(use, w.image_njy[b], 0.0) * wt
            sv[b] += np.where(use, w.variance_njy2[b], 0.0) * (wt * wt)
            n_img[b] += use
            n_clip[b] += c[b]
    with np.errstate(invalid="ignore", divide="ignore"):
        image, variance = np.where(sw > 0, sx / sw, np.nan), np.where(sw > 0, sv / sw**2, np.nan)
    # masks: weight-fraction propagation of the input planes, then NO_DATA and CLIPPED
    wsum, acc = np.zeros(shape), {}
    for w, d, wt, b in zip(warps, has_data, weights, boxes):
        if b is None:
            continue
        wt = max(wt, 1e-300)
        wsum[b] += d[b] * wt
        m = np.where(d[b], np.asarray(w.mask[b], np.uint32), np.uint32(0))
        for bit in masks.PLANES.values():
            if not int(bit) & _NOT_PROPAGATED and np.bitwise_or.reduce(m, axis=None) & bit:
                acc.setdefault(int(bit), np.zeros(shape))[b] += ((m & bit) != 0) * wt
    out_mask = np.zeros(shape, np.uint32)
    for bit, frac in acc.items():
        out_mask[frac > mask_propagation_threshold * wsum] |= np.uint32(bit)
    out_mask[n_img == 0] |= masks.NO_DATA
    out_mask[n_clip > 0] |= masks.CLIPPED
    return Coadd(
        image=image.astype(np.float32), variance=variance.astype(np.float32), mask=out_mask, n_images=n_img,
        n_clipped=n_clip, weights=weights,
        clipped_fraction=np.array([c.sum() / max(int(u.sum()), 1) for c, u in zip(clipped, usable)]),
        clipped_pixels=tuple(np.flatnonzero(c) for c in clipped), target_fwhm_pix=target, method=method,
        clip_nsigma=clip_nsigma,
    )


# --------------------------------------------------------------------------- coadd PSF
def coadd_psf(psfs_at_position: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Coadd PSF at a position: weighted sum of the (warped) input PSF stamps, each and the result unit-sum.

    Use the pixel weights (``Coadd.weights`` of the inputs covering the
    position): a star's coadd image is then ``flux x`` this stamp.  Stamps of
    different odd sizes (inputs of different seeing) are zero-padded to the largest.
    """
    stamps = [np.asarray(p, dtype=np.float64) for p in psfs_at_position]
    size = max((p.shape[0] for p in stamps), default=0)
    # inputs of different seeing have stamps of different (odd) sizes: centre them on the largest
    padded = [np.pad(p, ((size - p.shape[0]) // 2, (size - p.shape[1]) // 2)) if p.ndim == 2 else p for p in stamps]
    st, w = np.asarray(padded, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if st.ndim != 3 or len(w) != len(st) or not np.any(w > 0):
        raise ValueError("need (n, S, S) stamps and n weights, some positive")
    out = np.tensordot(w, st / st.sum(axis=(1, 2), keepdims=True), axes=1)
    return out / out.sum()


@dataclass(frozen=True)
class CoaddPsfInput:
    """One input detector of a coadd: PSF model (its pixels), WCS, shape (ny, nx), pixel weight of its visit.

    ``mapping`` (coadd -> this input's pixels over the part of the coadd it covers) replaces ``wcs``:
    a coadd stores its inputs so (:func:`pack_psf_inputs`), the WCS pair is then not needed.
    """

    psf: Any
    wcs: Any
    shape: tuple[int, int]
    weight: float
    mapping: PixelMapping | None = None
    visit: int = -1
    detector: int = -1
    #: the input's single-frame aperture correction (total / PSF flux), its mean over the detector; NaN unknown
    apcorr: float = float("nan")


def psf_input_box(src_wcs: Any, src_shape: tuple[int, int], coadd_wcs: Any, bbox: tuple[int, int, int, int],
                  margin: int) -> tuple[int, int, int, int] | None:
    """The coadd-WCS pixels over which an input's mapping is needed for the coadd PSF: the bounding box of
    its edge grown by ``margin`` on every side, ``bbox`` grown as much (so a lattice node up to ``margin``
    beyond the input's data, or beyond the coadd, is evaluated where it is, not moved to the edge)."""
    grown = (bbox[0] - margin, bbox[1] - margin, bbox[2] + margin, bbox[3] + margin)
    return overlap_box(src_wcs, src_shape, coadd_wcs, grown, margin=margin)


class CoaddPsf:
    """PSF of a coadd with the PsfModel protocol (``image_at``, ``moments_at``, ``sigma_at``, ``fwhm_at``).

    Positions are 0-based pixels of the coadd arrays, whose pixel (0, 0) is
    pixel ``(bbox[0], bbox[1])`` of ``coadd_wcs``.  At a position, the inputs
    whose warp has data there (the footprint rule of ``warp_exposure``) are
    resampled with ``warp_psf`` and summed with their weights; pixels clipped
    or masked in single inputs are ignored (as in Rubin's CoaddPsf).

    ``grid_spacing`` None: evaluated exactly at every position (~0.5 ms per
    contributing input).  An integer L: the set of contributing inputs is still
    found exactly at the position (the coadd PSF jumps where an input's edge
    passes), but the weighted sum of THOSE inputs' PSFs is interpolated
    bilinearly between the four nodes of an L-pixel lattice around it (their
    smooth variation across a detector), then moved to the position's sub-pixel
    phase: each input's PSF is resampled once per node, each (node, input set)
    summed once, and both kept (up to ``cache_size`` stamps of ~15 kB).
    ``fallback`` (a PsfModel) answers where no input has data
    (a footprint reaching into the uncovered part of a patch); without it that
    is a ValueError.
    """

    def __init__(self, inputs: Sequence[CoaddPsfInput], coadd_wcs: Any, bbox: tuple[int, int, int, int],
                 stamp_size: int | None = None, kernel: str = "lanczos3", grid_spacing: int | None = None,
                 fallback: Any = None, cache_size: int = 8192) -> None:
        if stamp_size is None:  # the largest input PSF stamp (they follow each input's seeing)
            stamp_size = max((int(getattr(i.psf, "stamp_size", 25)) for i in inputs), default=25)
        if stamp_size % 2 == 0:
            raise ValueError("stamp_size must be odd")
        if grid_spacing is not None and int(grid_spacing) < 1:
            raise ValueError(f"grid_spacing must be a positive number of pixels, got {grid_spacing}")
        self.coadd_wcs, self.bbox, self.kernel = coadd_wcs, tuple(int(v) for v in bbox), kernel
        self.stamp_size, self._a = int(stamp_size), lanczos_order(kernel)
        self.grid_spacing = None if grid_spacing is None else int(grid_spacing)
        self.fallback, self._cache_size = fallback, int(cache_size)
        margin = self.grid_spacing or 4
        boxes = [None if i.weight <= 0 else i.mapping.box if i.mapping is not None
                 else psf_input_box(i.wcs, i.shape, coadd_wcs, self.bbox, margin) for i in inputs]
        self.inputs = [i for i, b in zip(inputs, boxes) if b is not None]
        self._boxes = [b for b in boxes if b is not None]
        self._maps: dict[int, PixelMapping | None] = {k: i.mapping for k, i in enumerate(self.inputs)
                                                      if i.mapping is not None}
        self._cache: dict[tuple, np.ndarray] = {}

    def _mapping(self, i: int) -> PixelMapping | None:
        if i not in self._maps:
            try:
                self._maps[i] = PixelMapping.build(self.inputs[i].wcs, self.coadd_wcs, self._boxes[i])
            except NoWorkFound:  # a sliver (< 3 pixels) of the coadd: the input has no data in it
                self._maps[i] = None
        return self._maps[i]

    def contributing(self, x: float, y: float) -> list[int]:
        """Indices into ``self.inputs`` of the inputs whose warp has data at coadd pixel (x, y)."""
        tx, ty, a, out = float(x) + self.bbox[0], float(y) + self.bbox[1], self._a, []
        for i, (inp, b) in enumerate(zip(self.inputs, self._boxes)):
            if b[0] <= tx <= b[2] - 1 and b[1] <= ty <= b[3] - 1 and (m := self._mapping(i)) is not None:
                sx, sy = (int(np.floor(v[0])) - a + 1 for v in m.src_points([tx], [ty]))
                if sx >= 0 and sy >= 0 and sx + 2 * a <= inp.shape[1] and sy + 2 * a <= inp.shape[0]:
                    out.append(i)
        return out

    def _sum_at(self, tx: float, ty: float, idx: tuple[int, ...], size: int, node: tuple[int, int] | None = None
                ) -> np.ndarray:
        """Weighted sum of the inputs ``idx``'s PSFs at coadd-WCS pixel (tx, ty), each input's position
        held inside its mapping's box (which reaches the lattice spacing beyond its data).  At a lattice
        ``node`` each input's warped PSF is kept: another set of inputs at the same node reuses it."""
        stamps = []
        for i in idx:
            key = None if node is None else ("input", node, i)
            st = self._cache.get(key) if key is not None else None
            if st is None:
                b = self._boxes[i]
                px, py = min(max(tx, b[0]), b[2] - 1), min(max(ty, b[1]), b[3] - 1)
                st = warp_psf(self.inputs[i].psf, self.inputs[i].wcs, self.coadd_wcs, px, py, size, self.kernel,
                              mapping=self._mapping(i))
                if key is not None:
                    self._remember(key, st)
            stamps.append(st)
        return coadd_psf(stamps, [self.inputs[i].weight for i in idx])

    def _remember(self, key: tuple, value: np.ndarray) -> np.ndarray:
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = value
        return value

    def image_at(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """Unit-sum (size, size) coadd PSF centred at stamp pixel (size//2 + dx, size//2 + dy)."""
        size = self.stamp_size if size is None else int(size)
        idx = tuple(self.contributing(x, y))
        if not idx:
            if self.fallback is not None:
                return self.fallback.image_at(x, y, size)
            raise ValueError(f"no input covers coadd pixel ({x}, {y})")
        if self.grid_spacing is None:
            key = (float(x), float(y), size)
            if key not in self._cache:
                self._remember(key, self._sum_at(key[0] + self.bbox[0], key[1] + self.bbox[1], idx, size))
            return self._cache[key].copy()
        step = self.grid_spacing
        fx, fy = float(x) / step, float(y) / step
        i0, j0 = int(np.floor(fx)), int(np.floor(fy))
        wx, wy = fx - i0, fy - j0
        centred = np.zeros((self.stamp_size, self.stamp_size))
        for i, j, w in ((i0, j0, (1 - wx) * (1 - wy)), (i0 + 1, j0, wx * (1 - wy)), (i0, j0 + 1, (1 - wx) * wy),
                        (i0 + 1, j0 + 1, wx * wy)):
            if w <= 0:
                continue
            key = (i, j, idx)
            node = self._cache.get(key)
            if node is None:
                node = self._remember(key, self._sum_at(i * step + self.bbox[0], j * step + self.bbox[1], idx,
                                                        self.stamp_size, node=(i, j)))
            centred += w * node
        return place_centred(centred, x, y, size)

    def input_aperture_correction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The coadd's aperture correction implied by its inputs' at each (x, y): a star's coadd image is
        the weighted mean of its epochs, each ``flux / apcorr_i`` in its PSF's shape, and the coadd PSF the
        weighted mean of those shapes, so its PSF flux is ``flux x sum(w_i / apcorr_i) / sum(w_i)`` over
        the inputs covering it (Rubin's coadd aperture-correction map, with each input's correction its
        mean over the detector).  NaN where no input covers a position or one covering lacks its correction."""
        out = np.full(np.shape(x), np.nan)
        for k, (xi, yi) in enumerate(zip(np.ravel(x), np.ravel(y))):
            idx = self.contributing(xi, yi) if np.isfinite(xi) and np.isfinite(yi) else []
            if idx:
                w = np.array([self.inputs[i].weight for i in idx])
                a = np.array([self.inputs[i].apcorr for i in idx])
                out.flat[k] = w.sum() / (w / a).sum()
        return out

    def moments_at(self, x: float, y: float) -> tuple[float, float, float]:
        """Adaptive second moments (ixx, iyy, ixy) of the coadd PSF at (x, y), pixels^2."""
        m = adaptive_moments(self.image_at(round(float(x)), round(float(y)))[None])
        return float(m["ixx"][0]), float(m["iyy"][0]), float(m["ixy"][0])

    def sigma_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent sigma (det of the adaptive moments)^(1/4), pixels."""
        ixx, iyy, ixy = self.moments_at(x, y)
        return float((ixx * iyy - ixy**2) ** 0.25)

    def fwhm_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent FWHM = 2.3548 sigma_at, pixels."""
        return FWHM_PER_SIGMA * self.sigma_at(x, y)


#: rows of a coadd's (or warp's) PSFINPUT table: one per input detector; the PSF's coefficients are
#: PSFCOEF[coef_offset : + n_terms(psf_order) x psf_stamp^2], the coadd -> input mapping's nodes
#: PSFMAP[map_offset : + map_nx + map_ny + 2 map_nx map_ny] (columns, rows, source x, source y)
PSF_INPUT_COLUMNS = ("visit", "detector", "weight", "ny", "nx", "psf_order", "psf_stamp", "coef_offset",
                     "box_x0", "box_y0", "box_x1", "box_y1", "map_nx", "map_ny", "map_offset", "apcorr")
PSF_INPUT_HDUS = ("PSFINPUT", "PSFCOEF", "PSFMAP")


def pack_psf_inputs(inputs: Sequence[CoaddPsfInput]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Image HDUs (name -> (array, header)) holding ``inputs`` (each with a PIXPOLY ``psf`` and a
    ``mapping``): what :func:`unpack_psf_inputs` reads back.  Empty dict for no inputs."""
    rows, coefs, maps, co, mo = [], [], [], 0, 0
    for inp in inputs:
        if inp.mapping is None or inp.mapping.nodes is None:
            raise ValueError(f"input visit {inp.visit} detector {inp.detector} has no stored mapping")
        c = np.asarray(inp.psf.coeffs, np.float64)
        xs, ys, sx, sy = inp.mapping.nodes
        flat = np.concatenate([xs, ys, np.ravel(sx), np.ravel(sy)])
        rows.append([inp.visit, inp.detector, inp.weight, inp.shape[0], inp.shape[1], inp.psf.spatial_order,
                     c.shape[-1], co, *inp.mapping.box, len(xs), len(ys), mo, inp.apcorr])
        coefs.append(c.ravel())
        maps.append(flat)
        co, mo = co + c.size, mo + flat.size
    if not rows:
        return {}
    return {"PSFINPUT": (np.asarray(rows, np.float64), {"COLUMNS": ",".join(PSF_INPUT_COLUMNS)}),
            "PSFCOEF": (np.concatenate(coefs), {}), "PSFMAP": (np.concatenate(maps), {})}


def unpack_psf_inputs(extra: dict[str, tuple[np.ndarray, Any]]) -> list[CoaddPsfInput]:
    """The inputs stored by :func:`pack_psf_inputs` in ``extra`` (an Exposure's extra HDUs); empty list
    when ``extra`` holds none."""
    from lsst_prod.algorithms.psf import PsfModel, _poly_terms

    if not all(h in extra for h in PSF_INPUT_HDUS):
        return []
    table = np.asarray(extra["PSFINPUT"][0], np.float64).reshape(-1, len(PSF_INPUT_COLUMNS))
    coef, flat = np.asarray(extra["PSFCOEF"][0], np.float64).ravel(), np.asarray(extra["PSFMAP"][0], np.float64).ravel()
    col = {n: k for k, n in enumerate(PSF_INPUT_COLUMNS)}
    out = []
    for r in table:
        order, s = int(r[col["psf_order"]]), int(r[col["psf_stamp"]])
        n_terms, o = len(_poly_terms(order)), int(r[col["coef_offset"]])
        shape = (int(r[col["ny"]]), int(r[col["nx"]]))
        psf = PsfModel(coef[o:o + n_terms * s * s].reshape(n_terms, s, s), order, shape, 0, 0, float("nan"),
                       float("nan"))
        nx, ny, m = int(r[col["map_nx"]]), int(r[col["map_ny"]]), int(r[col["map_offset"]])
        xs, ys = flat[m:m + nx], flat[m + nx:m + nx + ny]
        sx = flat[m + nx + ny:m + nx + ny + nx * ny]
        sy = flat[m + nx + ny + nx * ny:m + nx + ny + 2 * nx * ny]
        box = tuple(int(r[col[c]]) for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
        mapping = PixelMapping.from_nodes(box, xs, ys, sx, sy)
        out.append(CoaddPsfInput(psf, None, shape, float(r[col["weight"]]), mapping, int(r[col["visit"]]),
                                 int(r[col["detector"]]), float(r[col["apcorr"]])))
    return out


# --------------------------------------------------------------------------- selections
def select_best_seeing(fwhms: Sequence[float], quantile: float = 0.25) -> np.ndarray:
    """Indices (ascending) of the inputs with FWHM <= the ``quantile`` of the FWHMs (at least the best one)."""
    f = np.asarray(fwhms, dtype=np.float64)
    if f.size == 0:
        return np.zeros(0, np.int64)
    keep = f <= np.quantile(f, quantile)
    keep[np.argmin(f)] = True
    return np.flatnonzero(keep)


def select_period(mjds: Sequence[float], start: float, end: float) -> np.ndarray:
    """Indices (ascending) of the inputs observed in [start, end) (MJD)."""
    m = np.asarray(mjds, dtype=np.float64)
    return np.flatnonzero((m >= start) & (m < end))
