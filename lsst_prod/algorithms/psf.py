"""PSFEx-like pixel PSF model: star selection and a spatially varying pixel basis.

Model: every pixel ``(i, j)`` of a ``stamp_size`` x ``stamp_size`` centred PSF image
is a polynomial of total degree ``spatial_order`` in the detector position
``u = (x - x0)/sx, v = (y - y0)/sy`` (``[-1, 1]`` over the detector).

Fit (:func:`fit_psf`): each star's stamp is recentred on its adaptive-moments
centroid by an FFT phase shift (band-limited, i.e. sinc, interpolation: exact for
a Nyquist-sampled PSF, which a pixelized PSF with FWHM >= ~2.5 pixels is; no
Lanczos kernel truncation error), normalised to unit sum and weighted per pixel
by ``flux^2 / variance``.  The coefficients of all pixels come from one batched
weighted least-squares solve.  Three passes: after each, every star's
normalisation is refined by a PSF-fit amplitude and stars whose reduced chi^2
is an outlier (median + ``clip`` x 1.4826 MAD, binaries, galaxies, unflagged
cosmic rays) are rejected.

Few stars (:func:`fit_psf` with ``fallback=True``): the spatial order is lowered as the star count
falls (down to a constant pixel model); below ``min_stars`` for even a constant empirical model, an
elliptical Moffat profile (FWHM, beta, shear g1/g2: four numbers that a single star constrains) is
fitted to the stars' recentred stamps (:func:`fit_moffat_psf`) and stored as a constant pixel model
flagged ``fallback`` (FITS ``FALLBACK = T``).  Only when no star at all is usable is it an error.

Evaluation (:meth:`PsfModel.image_at`): polynomial sum, FFT shift to the
sub-pixel phase of ``(x, y)``, crop, unit sum.  Sizes come from Gaussian-weighted
*adaptive* second moments (Bernstein & Jarvis 2002; the same estimator as
GalSim's HSM ``FindAdaptiveMom``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.apcorr import KOLMOGOROV_WING_INDEX
from lsst_prod.algorithms.footprints import Footprints
from lsst_prod.errors import AlgorithmError

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_STAR_BAD = int(masks.UNUSABLE | masks.INTRP | masks.SUSPECT | masks.NO_DATA)
_PAD = 4
_CORE_HALF = 12  # stars are centroided, and dropped for unusable pixels, within this half-size


#: PSF model stamp width in FWHM.  The model need not hold the total flux: the aperture correction
#: (stars' apertures of 4 FWHM, the Kolmogorov x Airy wing beyond from theory) carries PSF fluxes to
#: the total.  What the stamp must hold is where a star's pixels constrain the model: beyond a
#: half-width of ~3.5 FWHM the pixels are sky noise and neighbours' light, and a larger stamp only
#: makes the spatially varying model noisier.  Measured on dp-mini (200,000 stars/deg^2, 1.0-1.1"):
#: 12-FWHM stamps gave spatially coherent PSF-flux errors of 1-7 % and flux pulls of 1.5-2.2 above
#: S/N 100; 7-FWHM stamps 0.6 % and 1.1-1.4 (docs/algorithms-measurement.md).
PSF_STAMP_PER_FWHM = 7.0
#: Aperture-correction reference radius in FWHM: a Kolmogorov profile has 99.6-99.7 % of its flux within 8 FWHM.
APCORR_RADIUS_PER_FWHM = 8.0
MIN_PSF_STAMP_PIXELS = 25
MIN_APCORR_RADIUS_PIXELS = 25.0


def psf_stamp_size(fwhm_pix: float, minimum: int = MIN_PSF_STAMP_PIXELS, per_fwhm: float = PSF_STAMP_PER_FWHM) -> int:
    """Odd PSF model stamp size (pixels) for a seeing of ``fwhm_pix``: ``max(minimum, per_fwhm x FWHM)``."""
    size = max(int(minimum), int(math.ceil(per_fwhm * float(fwhm_pix))))
    return size + 1 - size % 2


def apcorr_radius(fwhm_pix: float, minimum: float = MIN_APCORR_RADIUS_PIXELS,
                  per_fwhm: float = APCORR_RADIUS_PER_FWHM) -> float:
    """Aperture-correction reference radius (pixels): ``max(minimum, per_fwhm x FWHM)``."""
    return float(max(float(minimum), per_fwhm * float(fwhm_pix)))


def candidates_fwhm(cand: "PsfCandidates") -> float:
    """Median Gaussian-equivalent FWHM (pixels) of PSF candidates' adaptive moments (NaN if none)."""
    if cand.n == 0:
        return float("nan")
    det = np.maximum(cand.ixx * cand.iyy - cand.ixy**2, 1e-12)
    return float(FWHM_PER_SIGMA * np.median(det**0.25))


# --------------------------------------------------------------------------- moments
def _gauss_weight(m: int, xc, yc, wxx, wyy, wxy) -> np.ndarray:
    """(n, m, m) elliptical Gaussian weights exp(-d^T W^-1 d / 2) centred on (xc, yc)."""
    grid = np.arange(m, dtype=np.float64)
    dx, dy = grid[None, None, :] - xc[:, None, None], grid[None, :, None] - yc[:, None, None]
    wxx, wyy, wxy = wxx[:, None, None], wyy[:, None, None], wxy[:, None, None]
    q = (wyy * dx**2 - 2 * wxy * dx * dy + wxx * dy**2) / (wxx * wyy - wxy**2)
    return np.exp(-0.5 * np.minimum(q, 100.0))


def adaptive_moments(
    stamps: np.ndarray, sigma0: float = 2.0, max_iter: int = 50, tol: float = 1e-7, variance: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Adaptive moments of a stack (n, m, m) of stamps (pixels, stamp coordinates).

    The elliptical Gaussian weight W is iterated to the fixed point where the
    weighted covariance M equals W/2 (the HSM definition).  Each step uses the
    update that is exact for a Gaussian source, ``W <- (M^-1 - W^-1)^-1`` and
    centroid ``+= W' M^-1 mu`` (falling back to ``W <- 2 M``, ``+= 2 mu``), which
    converges in a few iterations instead of ~25.

    Returns arrays ``x, y`` (centroid), ``ixx, iyy, ixy`` (pixels^2), ``sum_w``
    (sum of weight x image, = flux/2 for a Gaussian), ``ok`` (converged) and,
    if ``variance`` stamps are given, ``snr`` of the weighted flux.
    """
    st = np.asarray(stamps, dtype=np.float64)
    n, m, _ = st.shape
    grid = np.arange(m, dtype=np.float64)
    xc, yc = np.full(n, (m - 1) / 2.0), np.full(n, (m - 1) / 2.0)
    w = np.tile([sigma0**2, sigma0**2, 0.0], (n, 1))  # wxx, wyy, wxy
    ok, done, s0 = np.ones(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n)
    for _ in range(max_iter):
        idx = np.flatnonzero(ok & ~done)
        if len(idx) == 0:
            break
        dx = grid[None, None, :] - xc[idx, None, None]
        dy = grid[None, :, None] - yc[idx, None, None]
        iw = st[idx] * _gauss_weight(m, xc[idx], yc[idx], w[idx, 0], w[idx, 1], w[idx, 2])
        s0[idx] = sw = iw.sum(axis=(1, 2))
        sws = np.where(sw > 0, sw, 1.0)
        mx, my = (iw * dx).sum(axis=(1, 2)) / sws, (iw * dy).sum(axis=(1, 2)) / sws
        mxx = (iw * dx**2).sum(axis=(1, 2)) / sws - mx**2
        myy = (iw * dy**2).sum(axis=(1, 2)) / sws - my**2
        mxy = (iw * dx * dy).sum(axis=(1, 2)) / sws - mx * my
        mdet = mxx * myy - mxy**2
        valid = (sw > 0) & (mxx > 0) & (myy > 0) & (mdet > 1e-8)
        ok[idx[~valid]], mdet = False, np.where(valid, mdet, 1.0)
        wo = w[idx]
        wdet = wo[:, 0] * wo[:, 1] - wo[:, 2] ** 2
        # D = M^-1 - W^-1 ; the new W is D^-1 when D is positive definite.
        dxx, dyy = myy / mdet - wo[:, 1] / wdet, mxx / mdet - wo[:, 0] / wdet
        dxy = -mxy / mdet + wo[:, 2] / wdet
        ddet = dxx * dyy - dxy**2
        ddet_s = np.where(ddet > 0, ddet, 1.0)
        cxx, cyy, cxy = dyy / ddet_s, dxx / ddet_s, -dxy / ddet_s
        tr_old = wo[:, 0] + wo[:, 1]
        newton = (ddet > 0) & (dxx > 0) & (cxx + cyy > 0.3 * tr_old) & (cxx + cyy < 3.0 * tr_old)
        nxx, nyy, nxy = np.where(newton, cxx, 2 * mxx), np.where(newton, cyy, 2 * myy), np.where(newton, cxy, 2 * mxy)
        # Centroid step: C M^-1 mu (= 2 mu at convergence).
        gx, gy = (myy * mx - mxy * my) / mdet, (mxx * my - mxy * mx) / mdet
        sx, sy = np.where(newton, nxx * gx + nxy * gy, 2 * mx), np.where(newton, nxy * gx + nyy * gy, 2 * my)
        sx, sy = np.clip(sx, -2.0, 2.0), np.clip(sy, -2.0, 2.0)
        change = np.abs(nxx - wo[:, 0]) + np.abs(nyy - wo[:, 1]) + np.abs(nxy - wo[:, 2]) + np.abs(sx) + np.abs(sy)
        upd, v = idx[valid], valid
        w[upd] = np.column_stack([nxx[v], nyy[v], nxy[v]])
        xc[upd], yc[upd] = np.clip(xc[upd] + sx[v], 0, m - 1), np.clip(yc[upd] + sy[v], 0, m - 1)
        done[idx[valid & (change < tol * (nxx + nyy))]] = True
        ok &= (w[:, 0] < m * m) & (w[:, 1] < m * m) & (w[:, 0] > 0.01) & (w[:, 1] > 0.01)
    ok &= done
    out = {"x": xc, "y": yc, "ixx": w[:, 0], "iyy": w[:, 1], "ixy": w[:, 2], "sum_w": s0, "ok": ok}
    if variance is not None:
        wt = _gauss_weight(m, xc, yc, w[:, 0], w[:, 1], w[:, 2])
        noise = np.sqrt(np.maximum((wt * wt * np.asarray(variance, np.float64)).sum(axis=(1, 2)), 1e-30))
        out["snr"] = (wt * st).sum(axis=(1, 2)) / noise
    return out


def _fft_shift(stack: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Move the content of (n, L, L) (L odd) by (+dx, +dy) pixels (sinc interpolation)."""
    stack = np.asarray(stack, dtype=np.float64)
    size = stack.shape[-1]
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    dx = np.reshape(np.asarray(dx, dtype=np.float64), (-1, 1, 1))
    dy = np.reshape(np.asarray(dy, dtype=np.float64), (-1, 1, 1))
    phase = np.exp(-2j * np.pi * (kx[None] * dx + ky[None] * dy))
    return np.fft.irfft2(np.fft.rfft2(stack) * phase, s=(size, size))


def _cutouts(arr: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    o = np.arange(-half, half + 1)
    return arr[iy[:, None, None] + o[None, :, None], ix[:, None, None] + o[None, None, :]]


def _inside(shape: tuple[int, int], ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    return (ix - half >= 0) & (iy - half >= 0) & (ix + half < shape[1]) & (iy + half < shape[0])


# --------------------------------------------------------------------------- selection
@dataclass(frozen=True, eq=False)
class PsfCandidates:
    """Selected PSF stars: footprint index, centroid (pixels), S/N, adaptive moments (pixels^2)."""

    footprint: np.ndarray
    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray
    ixx: np.ndarray
    iyy: np.ndarray
    ixy: np.ndarray

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def _robust_plane_inliers(val: np.ndarray, x: np.ndarray, y: np.ndarray, clip: float, floor: float,
                          min_plane: int = 10) -> np.ndarray:
    """Inliers of ``val ~ a + b x + c y`` by iterative MAD clipping (floor on the scale).

    The clipping starts from a constant (median, MAD): a plane least-squares fitted to every point is
    pulled by the outliers, and with a handful of points it can end on them (a sparse detector's 7 stars
    and 2 galaxies of S/N > 50: the plane through all nine kept one star).  The plane is fitted only to
    at least ``min_plane`` inliers, and an iteration that would leave fewer is not taken.
    """
    val = np.asarray(val, float)
    dev = np.abs(val - np.median(val))
    keep = dev < clip * max(1.4826 * float(np.median(dev)), floor)
    if keep.sum() < min_plane:
        return keep
    a = np.column_stack([np.ones_like(x), x, y])
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(a[keep], val[keep], rcond=None)
        res = val - a @ coef
        scale = max(1.4826 * np.median(np.abs(res[keep] - np.median(res[keep]))), floor)
        new = np.abs(res) < clip * scale
        if new.sum() < min_plane or np.array_equal(new, keep):
            break
        keep = new
    return keep


def select_psf_candidates(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, footprints: Footprints,
    min_snr: float = 50.0, stamp_size: int = 25, max_candidates: int = 400,
    size_clip: float = 3.0, max_ellipticity: float = 0.3,
) -> PsfCandidates:
    """Pick isolated, bright, unsaturated, clean single-peak sources on the stellar locus.

    ``image`` is background-subtracted (electrons).  Criteria: one peak in the
    footprint; the ``stamp_size`` circle around it inside the image, free of
    other footprints and of BAD/SAT/CR/INTRP/SUSPECT/NO_DATA pixels; converged
    adaptive moments; adaptive-moment S/N >= ``min_snr``; ``|e| < max_ellipticity``;
    ``ln(ixx + iyy)``, ``e1`` and ``e2`` within ``size_clip`` robust sigma of a
    plane in (x, y) fitted to the candidates (the stellar locus may vary across
    the detector).  At most ``max_candidates`` (highest S/N) are returned.
    """
    fp = footprints
    counts = np.bincount(fp.peak_footprint, minlength=fp.n_footprints)
    peaks = np.flatnonzero(counts[fp.peak_footprint] == 1)
    ix = np.round(fp.peak_x[peaks]).astype(np.int64)
    iy = np.round(fp.peak_y[peaks]).astype(np.int64)
    half = stamp_size // 2
    inside = _inside(image.shape, ix, iy, half)
    peaks, ix, iy = peaks[inside], ix[inside], iy[inside]
    empty = np.zeros(0)
    if len(peaks) == 0:
        return PsfCandidates(np.zeros(0, np.int64), empty, empty, empty, empty, empty, empty)
    own = fp.peak_footprint[peaks] + 1
    o = np.arange(-half, half + 1)
    circle = (o[:, None] ** 2 + o[None, :] ** 2) <= half * half
    lab = _cutouts(fp.labels, ix, iy, half)
    isolated = np.all(((lab == 0) | (lab == own[:, None, None])) | ~circle, axis=(1, 2))
    clean = np.all(((_cutouts(mask, ix, iy, half) & np.uint32(_STAR_BAD)) == 0) | ~circle, axis=(1, 2))
    sel = isolated & clean
    peaks, ix, iy, own = peaks[sel], ix[sel], iy[sel], own[sel]
    mom = adaptive_moments(_cutouts(image, ix, iy, half), tol=1e-4, variance=_cutouts(variance, ix, iy, half))
    snr = mom["snr"]
    t = mom["ixx"] + mom["iyy"]
    e1 = (mom["ixx"] - mom["iyy"]) / np.where(t > 0, t, 1.0)
    e2 = 2 * mom["ixy"] / np.where(t > 0, t, 1.0)
    good = mom["ok"] & (snr >= min_snr) & (np.hypot(e1, e2) < max_ellipticity) & (t > 0)
    gi = np.flatnonzero(good)
    if len(gi) >= 5:
        xs = (ix[gi] + mom["x"][gi] - half) / max(image.shape[1], 1)
        ys = (iy[gi] + mom["y"][gi] - half) / max(image.shape[0], 1)
        keep = _robust_plane_inliers(np.log(t[gi]), xs, ys, size_clip, 0.02)
        keep &= _robust_plane_inliers(e1[gi], xs, ys, size_clip, 0.01)
        keep &= _robust_plane_inliers(e2[gi], xs, ys, size_clip, 0.01)
        gi = gi[keep]
    gi = gi[np.argsort(-snr[gi], kind="stable")][:max_candidates]
    return PsfCandidates(
        footprint=(own[gi] - 1).astype(np.int64),
        x=ix[gi] + mom["x"][gi] - half,
        y=iy[gi] + mom["y"][gi] - half,
        snr=snr[gi],
        ixx=mom["ixx"][gi],
        iyy=mom["iyy"][gi],
        ixy=mom["ixy"][gi],
    )


# --------------------------------------------------------------------------- parametric fallback
#: Moffat beta search range: 1.5 (very broad wings) to 10 (nearly Gaussian); a Kolmogorov core is ~4.8
#: (Trujillo et al. 2001), instrumental PSFs 2.5-4.
MOFFAT_BETA_RANGE = (1.5, 10.0)
_MOFFAT_OVERSAMPLE = 5


def moffat_image(size: int, fwhm: float, beta: float, g1: float = 0.0, g2: float = 0.0,
                 dx: float = 0.0, dy: float = 0.0, oversample: int = _MOFFAT_OVERSAMPLE) -> np.ndarray:
    """Unit-sum (size, size) pixel-integrated elliptical Moffat centred at stamp pixel (c + dx, c + dy),
    c = size // 2.

    ``I(r) ~ (1 + r^2 / alpha^2)^-beta`` with ``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))`` (``fwhm`` of the
    round profile), sheared by the area-preserving (g1, g2) of GalSim's convention; pixel integration
    by ``oversample`` x ``oversample`` sub-pixel sampling.
    """
    alpha = float(fwhm) / (2.0 * math.sqrt(2.0 ** (1.0 / float(beta)) - 1.0))
    c = size // 2
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    grid = (np.arange(size)[:, None] + sub[None, :]).ravel() - c
    xx, yy = grid[None, :] - dx, grid[:, None] - dy
    gsq = min(g1 * g1 + g2 * g2, 0.81)
    norm = 1.0 / math.sqrt(1.0 - gsq)
    # inverse of the shear matrix (1 / sqrt(1 - g^2)) [[1 + g1, g2], [g2, 1 - g1]]
    u = norm * ((1.0 - g1) * xx - g2 * yy)
    v = norm * (-g2 * xx + (1.0 + g1) * yy)
    img = (1.0 + (u * u + v * v) / (alpha * alpha)) ** (-float(beta))
    img = img.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
    return img / img.sum()


def fit_moffat_psf(data: np.ndarray, sigma: np.ndarray, clip: float = 3.0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Fit one elliptical Moffat (FWHM, beta, g1, g2) to stars' centred stamps.

    ``data`` (n, S, S): stamps recentred on their centroids (stamp pixel S // 2), any normalisation;
    ``sigma`` (n, S, S) their per-pixel errors (``inf`` = no weight).  Each star has its own free
    amplitude (solved linearly); the four shape parameters are common.  The start is the adaptive
    moments of the stamps' sum (Gaussian FWHM, beta 3.5).  With >= 3 stars, a star whose reduced
    chi^2 exceeds ``clip`` x the median (a binary, a galaxy, an unflagged cosmic ray) is dropped
    and the fit repeated once.

    Returns (params [fwhm, beta, g1, g2], median reduced chi^2 of the used stars, per-star amplitudes,
    used mask).
    """
    from scipy.optimize import least_squares

    data = np.asarray(data, np.float64)
    n, size, _ = data.shape
    w = np.where(np.isfinite(sigma) & (sigma > 0), 1.0 / np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1.0), 0.0)
    mom = adaptive_moments(np.sum(np.where(w > 0, data, 0.0), axis=0)[None], sigma0=2.0)
    ixx, iyy, ixy = float(mom["ixx"][0]), float(mom["iyy"][0]), float(mom["ixy"][0])
    if mom["ok"][0] and ixx > 0 and iyy > 0:
        fwhm0 = FWHM_PER_SIGMA * max(ixx * iyy - ixy * ixy, 1e-6) ** 0.25
        e1, e2 = (ixx - iyy) / (ixx + iyy), 2.0 * ixy / (ixx + iyy)
        e = math.hypot(e1, e2)
        gfac = 1.0 / (1.0 + math.sqrt(max(1.0 - e * e, 1e-6)))  # e = 2 g / (1 + g^2) -> g
        g10, g20 = e1 * gfac, e2 * gfac
    else:
        fwhm0, g10, g20 = size / 7.0, 0.0, 0.0
    lo_b, hi_b = MOFFAT_BETA_RANGE
    used = np.ones(n, bool)

    def amplitudes(model, sel):
        wm = w[sel] * model[None]
        return (wm * w[sel] * data[sel]).sum(axis=(1, 2)) / np.maximum((wm * wm).sum(axis=(1, 2)), 1e-300)

    def resid(p, sel):
        model = moffat_image(size, math.exp(p[0]), p[1], p[2], p[3])
        amp = amplitudes(model, sel)
        return (w[sel] * (data[sel] - amp[:, None, None] * model[None])).ravel()

    p0 = np.array([math.log(max(fwhm0, 1.0)), 3.5, float(np.clip(g10, -0.5, 0.5)), float(np.clip(g20, -0.5, 0.5))])
    bounds = ([math.log(0.5), lo_b, -0.8, -0.8], [math.log(float(size)), hi_b, 0.8, 0.8])
    for attempt in range(2):
        sol = least_squares(resid, p0, bounds=bounds, args=(used,), x_scale=[0.05, 0.5, 0.02, 0.02])
        model = moffat_image(size, math.exp(sol.x[0]), sol.x[1], sol.x[2], sol.x[3])
        amp = amplitudes(model, np.ones(n, bool))
        npix = np.maximum((w > 0).reshape(n, -1).sum(axis=1), 1)
        chi2 = ((w * (data - amp[:, None, None] * model[None])) ** 2).reshape(n, -1).sum(axis=1) / npix
        if attempt or used.sum() < 3:
            break
        new = used & (chi2 <= clip * np.median(chi2[used]))
        if new.sum() == used.sum() or new.sum() < 1:
            break
        used, p0 = new, sol.x
    params = np.array([math.exp(sol.x[0]), sol.x[1], sol.x[2], sol.x[3]])
    return params, float(np.median(chi2[used])), amp, used


# --------------------------------------------------------------------------- model
def place_centred(centred: np.ndarray, x: float, y: float, size: int | None = None) -> np.ndarray:
    """A centred (S, S) PSF image (S odd) as a (size, size) unit-sum stamp centred at stamp pixel
    (size//2 + dx, size//2 + dy), ``dx = x - round(x)`` (the ``image_at`` convention): zero-padded and
    moved by sinc interpolation."""
    s = int(centred.shape[-1])
    size = s if size is None else int(size)
    big = max(size, s) + 2 * _PAD
    big += 1 - big % 2
    cc = big // 2
    canvas = np.zeros((big, big))
    canvas[cc - s // 2 : cc - s // 2 + s, cc - s // 2 : cc - s // 2 + s] = centred
    dx, dy = float(x) - np.rint(float(x)), float(y) - np.rint(float(y))  # rint == Python round()
    shifted = _fft_shift(canvas[None], dx, dy)[0]
    c = size // 2
    out = shifted[cc - c : cc - c + size, cc - c : cc - c + size]
    return out / out.sum()


def _poly_terms(order: int) -> list[tuple[int, int]]:
    return [(i, d - i) for d in range(order + 1) for i in range(d, -1, -1)]


def _uv(x: Any, y: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Detector pixels -> [-1, 1] polynomial coordinates (exact for integer shapes)."""
    hy, hx = max((shape[0] - 1) / 2.0, 0.5), max((shape[1] - 1) / 2.0, 0.5)
    return (np.asarray(x, np.float64) - (shape[1] - 1) / 2.0) / hx, (np.asarray(y, np.float64) - (shape[0] - 1) / 2.0) / hy


def _basis(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """(n, n_terms) monomials u^i v^j, total degree <= order."""
    u, v = np.atleast_1d(u).astype(np.float64), np.atleast_1d(v).astype(np.float64)
    return np.stack([u**i * v**j for i, j in _poly_terms(order)], axis=1)


@dataclass(frozen=True, eq=False)
class PsfModel:
    """Spatially varying pixel PSF.

    coeffs: float64 (n_terms, S, S); spatial_order; detector_shape (ny, nx);
    fit statistics: n_stars used, n_rejected, residual_rms (rms of the
    normalised-stamp residuals as a fraction of the model peak), chi2 (median
    reduced chi^2 of the used stars), profile_error (:func:`profile_error`: the rms model error of a
    pixel as a fraction of the model's value there, beyond the stars' noise; 0 for a model written
    before it was measured).
    """

    coeffs: np.ndarray
    spatial_order: int
    detector_shape: tuple[int, int]
    n_stars: int
    n_rejected: int
    residual_rms: float
    chi2: float
    #: "" for the empirical pixel model; "moffat" for the parametric fallback fitted to too few stars
    fallback: str = ""
    #: fractional per-pixel model error (DAOPHOT's "profile error", measured on the PSF stars)
    profile_error: float = 0.0
    #: the fallback's parameters: fwhm (pixels), beta, g1, g2
    fallback_params: tuple[float, ...] = ()

    @property
    def is_fallback(self) -> bool:
        return bool(self.fallback)

    @property
    def stamp_size(self) -> int:
        return int(self.coeffs.shape[-1])

    def centred_image(self, x: float, y: float) -> np.ndarray:
        """(S, S) model with its centre on the central pixel, unit sum."""
        u, v = _uv(x, y, self.detector_shape)
        img = np.zeros(self.coeffs.shape[1:])
        for b, c in zip(_basis(u, v, self.spatial_order)[0], self.coeffs):
            img += b * c  # element-wise: bit-identical whatever the array's memory layout
        return img / img.sum()

    def image_at(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """(size, size) unit-sum PSF centred at stamp pixel (size//2 + dx, size//2 + dy).

        ``dx = x - round(x)``, ``dy = y - round(y)`` (Python/numpy rounding, half
        to even): place its pixel ``size//2`` on image pixel ``(round(x), round(y))``.
        """
        return place_centred(self.centred_image(x, y), x, y, size)

    def moments_at(self, x: float, y: float) -> tuple[float, float, float]:
        """Adaptive second moments (ixx, iyy, ixy) of the model at (x, y), pixels^2."""
        m = adaptive_moments(self.centred_image(x, y)[None])
        return float(m["ixx"][0]), float(m["iyy"][0]), float(m["ixy"][0])

    def sigma_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent sigma (det of the adaptive moments)^(1/4), pixels."""
        ixx, iyy, ixy = self.moments_at(x, y)
        return float((ixx * iyy - ixy**2) ** 0.25)

    def fwhm_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent FWHM = 2.3548 sigma_at, pixels."""
        return FWHM_PER_SIGMA * self.sigma_at(x, y)

    def to_fits(self) -> tuple[np.ndarray, dict[str, Any]]:
        """(coeffs float64 (n_terms, S, S), header dict) for a FITS image HDU."""
        ny, nx = self.detector_shape
        hdr = {
            "PSFTYPE": "PIXPOLY", "POLORDER": int(self.spatial_order), "NTERMS": int(self.coeffs.shape[0]),
            "STAMPSZ": self.stamp_size, "OVERSAMP": 1, "DET_NX": int(nx), "DET_NY": int(ny),
            "NSTARS": int(self.n_stars), "NREJECT": int(self.n_rejected),
            "RESIDRMS": float(self.residual_rms), "PSFCHI2": float(self.chi2),
            "POLYTERM": " ".join(f"{i}{j}" for i, j in _poly_terms(self.spatial_order)),
            "FALLBACK": bool(self.fallback), "PROFERR": float(self.profile_error),
        }
        if self.fallback:
            hdr["PARMODEL"] = self.fallback.upper()
            for key, val in zip(("PARFWHM", "PARBETA", "PARG1", "PARG2"), self.fallback_params):
                hdr[key] = float(val)
        return np.array(self.coeffs, dtype=np.float64, copy=True), hdr

    @classmethod
    def from_fits(cls, array: np.ndarray, header: Any) -> "PsfModel":
        """Inverse of :meth:`to_fits` (``header`` any mapping, e.g. an astropy Header)."""
        if str(header["PSFTYPE"]).strip() != "PIXPOLY":
            raise ValueError(f"not a PIXPOLY PSF: {header['PSFTYPE']!r}")
        order = int(header["POLORDER"])
        coeffs = np.array(array, dtype=np.float64)
        if coeffs.shape != (len(_poly_terms(order)), int(header["STAMPSZ"]), int(header["STAMPSZ"])):
            raise ValueError(f"PSF array shape {coeffs.shape} inconsistent with the header")
        fallback = str(header["PARMODEL"]).strip().lower() if bool(header.get("FALLBACK", False)) else ""
        params = tuple(float(header[k]) for k in ("PARFWHM", "PARBETA", "PARG1", "PARG2") if k in header) \
            if fallback else ()
        return cls(
            coeffs=coeffs, spatial_order=order, detector_shape=(int(header["DET_NY"]), int(header["DET_NX"])),
            n_stars=int(header["NSTARS"]), n_rejected=int(header["NREJECT"]),
            residual_rms=float(header["RESIDRMS"]), chi2=float(header["PSFCHI2"]),
            fallback=fallback, fallback_params=params, profile_error=float(header.get("PROFERR", 0.0)),
        )


def fit_psf(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray,
    detector_shape: tuple[int, int], stamp_size: int = 25, spatial_order: int = 2, oversampling: int = 1,
    min_stars: int | None = None, clip: float = 4.0, n_iter: int = 3, labels: np.ndarray | None = None,
    min_stars_per_term: float = 0.0, fallback: bool = False, wing_radius_fwhm: float | None = None,
) -> PsfModel:
    """Fit a :class:`PsfModel` to stars near (x, y) (pixels) of a background-subtracted image.

    Stars whose stamp leaves the image or holds unusable pixels are dropped.
    ``labels`` (detection footprint labels, 0 = none): pixels of OTHER
    footprints in a star's stamp (neighbours, which large stamps in seeing of
    1-2" always hold) are zeroed before the sub-pixel shift and get zero weight
    (grown by 1 pixel), as PSFEx does with its vignettes.
    Raises :class:`AlgorithmError` when fewer than ``min_stars`` (default
    ``max(2 n_terms, 10)``) usable stars remain.  Only ``oversampling=1``
    (native pixels) is implemented.  ``min_stars_per_term``: the spatial order is lowered while
    fewer usable stars than this many per polynomial term remain (each term of the model is a whole
    stamp of pixels: a quadratic fitted to 28 stars at 1.1" made 3 % spatially coherent PSF-flux
    errors on the tiny test survey; 8 per term, the stages' default, removed them).
    ``fallback``: with fewer than ``min_stars`` usable stars (before or after the outlier clip), fit the
    parametric Moffat of :func:`fit_moffat_psf` to the (one or more) usable stars instead of raising;
    the model returned is constant, ``fallback == "moffat"``.  An AlgorithmError remains when no star is
    usable at all.  ``wing_radius_fwhm``: beyond this many FWHM from the centre every coefficient image is
    replaced by the Kolmogorov wing ``A_k r^-11/3`` fitted to its own pixels there (:func:`smooth_wings`).
    """
    if stamp_size % 2 != 1 or stamp_size < 5:
        raise ValueError(f"stamp_size must be odd and >= 5, got {stamp_size}")
    if oversampling != 1:
        raise ValueError("only oversampling=1 is supported (the PSF must be Nyquist-sampled, FWHM >~ 2.5 px)")
    n_terms = len(_poly_terms(spatial_order))
    min_stars = max(2 * n_terms, 10) if min_stars is None else int(min_stars)
    half, bhalf = stamp_size // 2, stamp_size // 2 + _PAD
    core = min(half, _CORE_HALF)
    # Stamps larger than the core may leave the image or hold unusable pixels: those get zero weight
    # (the arrays are padded with NO_DATA); a star is dropped only for such pixels within its core.
    ny0, nx0 = image.shape
    image = np.pad(np.asarray(image), bhalf)
    variance = np.pad(np.asarray(variance), bhalf)
    mask = np.pad(np.asarray(mask, dtype=np.uint32), bhalf, constant_values=np.uint32(masks.NO_DATA))
    labels = None if labels is None else np.pad(np.asarray(labels), bhalf)
    ix = np.rint(np.asarray(x, np.float64)).astype(np.int64) + bhalf
    iy = np.rint(np.asarray(y, np.float64)).astype(np.int64) + bhalf
    ok = _inside((ny0, nx0), ix - bhalf, iy - bhalf, core)
    ix, iy = ix[ok], iy[ok]
    # Centroid, re-centre the cutout on the nearest pixel, drop edge / masked stars.
    mom = adaptive_moments(_cutouts(image, ix, iy, core), tol=1e-3)
    ix, iy = ix + np.round(mom["x"] - core).astype(np.int64), iy + np.round(mom["y"] - core).astype(np.int64)
    ok = mom["ok"] & _inside((ny0, nx0), ix - bhalf, iy - bhalf, core + _PAD)
    ix, iy = ix[ok], iy[ok]
    ok = np.all((_cutouts(mask, ix, iy, core + _PAD) & np.uint32(masks.UNUSABLE | masks.NO_DATA)) == 0, axis=(1, 2))
    ix, iy = ix[ok], iy[ok]
    if len(ix) < (1 if fallback else min_stars):
        raise AlgorithmError(f"only {len(ix)} PSF candidates" + (": no star constrains the PSF width" if fallback else ""),
                             n_candidates=int(len(ix)), n_required=1 if fallback else min_stars)
    mom = adaptive_moments(_cutouts(image, ix, iy, core), tol=1e-6)
    ok = mom["ok"]
    ix, iy, fx, fy = ix[ok], iy[ok], mom["x"][ok] - core, mom["y"][ok] - core  # centroid - centre pixel
    raw = _cutouts(image, ix, iy, bhalf).astype(np.float64)
    keep = (_cutouts(mask, ix, iy, bhalf) & np.uint32(masks.UNUSABLE | masks.NO_DATA)) == 0
    raw[~keep] = 0.0
    if labels is not None:
        lab = _cutouts(labels, ix, iy, bhalf)
        own = lab[:, bhalf, bhalf][:, None, None]
        other = ((lab != 0) & (lab != own)) | ~keep
        raw[other] = 0.0
        grown = other.copy()
        grown[:, 1:, :] |= other[:, :-1, :]
        grown[:, :-1, :] |= other[:, 1:, :]
        grown[:, :, 1:] |= other[:, :, :-1]
        grown[:, :, :-1] |= other[:, :, 1:]
        keep = ~grown
    else:
        grown = ~keep
        grown[:, 1:, :] |= ~keep[:, :-1, :]
        grown[:, :-1, :] |= ~keep[:, 1:, :]
        grown[:, :, 1:] |= ~keep[:, :, :-1]
        grown[:, :, :-1] |= ~keep[:, :, 1:]
        keep = ~grown
    data = _fft_shift(raw, -fx, -fy)[:, _PAD:-_PAD, _PAD:-_PAD]
    keep = keep[:, _PAD:-_PAD, _PAD:-_PAD]
    var = np.where(keep, np.maximum(_cutouts(variance, ix, iy, half).astype(np.float64), 1e-12), np.inf)
    data = np.where(keep, data, 0.0)
    flux = data.sum(axis=(1, 2))
    ok = flux > 0
    data, var, flux, ix, iy, fx, fy = data[ok], var[ok], flux[ok], ix[ok], iy[ok], fx[ok], fy[ok]
    n_keep = np.maximum(keep[ok].reshape(int(ok.sum()), -1).sum(axis=1), 1)
    n0 = len(ix)
    ny, nx = detector_shape
    if fallback and n0 < min_stars:
        if n0 == 0:
            raise AlgorithmError("no usable PSF star: none constrains the PSF width", n_stars=0, n_required=1)
        return _moffat_fallback(data, var, flux, n0, (ny, nx), n_rejected=0)
    while spatial_order > 0 and n0 < min_stars_per_term * len(_poly_terms(spatial_order)):
        spatial_order -= 1
    n_terms = len(_poly_terms(spatial_order))
    a = _basis(*_uv(ix - bhalf + fx, iy - bhalf + fy, (ny, nx)), spatial_order)
    aa = (a[:, :, None] * a[:, None, :]).reshape(n0, n_terms * n_terms)
    use = np.ones(n0, dtype=bool)
    npix = stamp_size * stamp_size
    for it in range(n_iter):
        if use.sum() < min_stars:
            break
        d = (data / flux[:, None, None]).reshape(n0, npix)
        w = (flux[:, None, None] ** 2 / var).reshape(n0, npix)
        wu = w * use[:, None]
        normal = (wu.T @ aa).reshape(npix, n_terms, n_terms)
        rhs = (wu * d).T @ a
        # ridge relative to each pixel's own scale: pixels seen by few stars (stamp borders off-image or
        # masked) leave the spatial terms undetermined; they then shrink to zero
        ridge = 1e-9 * np.trace(normal, axis1=1, axis2=2)[:, None, None] / n_terms + 1e-12
        coef = np.linalg.solve(normal + ridge * np.eye(n_terms)[None], rhs[..., None])[..., 0]  # (npix, T)
        model = a @ coef.T  # (n0, npix)
        amp = (w * d * model).sum(axis=1) / np.maximum((w * model * model).sum(axis=1), 1e-30)
        chi2 = (w * (d - amp[:, None] * model) ** 2).sum(axis=1) / n_keep
        if it < n_iter - 1:
            flux = flux * np.where(use & (amp > 0), amp, 1.0)
            med = np.median(chi2[use])
            mad = 1.4826 * np.median(np.abs(chi2[use] - med))
            use &= chi2 < med + clip * max(mad, 0.05 * med)
    n_used = int(use.sum())
    if wing_radius_fwhm and n_used >= min_stars:
        coef = smooth_wings(coef, stamp_size, wing_radius_fwhm)
        model = a @ coef.T
        amp = (w * d * model).sum(axis=1) / np.maximum((w * model * model).sum(axis=1), 1e-30)
        chi2 = (w * (d - amp[:, None] * model) ** 2).sum(axis=1) / n_keep
    if n_used < min_stars and fallback:
        return _moffat_fallback(data[use], var[use], flux[use], n_used, (ny, nx), n_rejected=n0 - n_used)
    if n_used < min_stars:
        raise AlgorithmError(f"only {n_used} usable PSF stars", n_stars=n_used, n_required=min_stars)
    coeffs = coef.T.reshape(n_terms, stamp_size, stamp_size)
    resid = (d - amp[:, None] * model)[use] / model[use].max(axis=1, keepdims=True)
    valid = np.isfinite(var.reshape(n0, npix))[use]
    with np.errstate(divide="ignore"):
        pe = profile_error((d - amp[:, None] * model)[use], (1.0 / w)[use], (amp[:, None] * model)[use])
    return PsfModel(
        coeffs=coeffs, spatial_order=int(spatial_order), detector_shape=(int(ny), int(nx)),
        n_stars=n_used, n_rejected=int(n0 - n_used),
        residual_rms=float(np.sqrt(np.mean(resid[valid] ** 2))), chi2=float(np.median(chi2[use])),
        profile_error=pe,
    )


def stamp_fwhm(stamp: np.ndarray) -> float:
    """Gaussian-equivalent FWHM (pixels) of a centred PSF stamp from its adaptive moments (the core's size:
    unweighted moments are the wings'); NaN when they do not converge."""
    mom = adaptive_moments(np.asarray(stamp, np.float64)[None])
    det = float(mom["ixx"][0] * mom["iyy"][0] - mom["ixy"][0] ** 2) if mom["ok"][0] else 0.0
    return FWHM_PER_SIGMA * det**0.25 if det > 0 else float("nan")


def smooth_wings(coef: np.ndarray, stamp_size: int, radius_fwhm: float,
                 index: float = KOLMOGOROV_WING_INDEX) -> np.ndarray:
    """The pixel model's coefficients (npix, n_terms) with their wings made smooth.

    A pixel far from the centre holds little of any PSF star's light, so its fitted value is mostly their
    noise, and the spatial polynomial multiplies that noise towards the detector's edges: on dp-mini the
    pixels 12-19 px (2.2-3.5 FWHM) from the centre scattered by +-3e-4 of the total flux about annulus
    means of 1e-4 to 2e-6, which a star 1,000x brighter than a neighbour 19 px away turns into phantom
    light of 100-300 e- per pixel on it (the neighbour's flux 1/5 of its truth in one visit).  Beyond
    ``radius_fwhm`` x the FWHM of the constant term (its adaptive moments), each coefficient image k is
    replaced by ``A_k r^-index``, ``A_k`` fitted (least squares, equal weights: sky-limited pixels) to that
    image's own pixels there: one number per spatial term from hundreds of pixels instead of one per pixel.
    The index is the Kolmogorov wing's 11/3, the one :func:`~lsst_prod.algorithms.apcorr.extended_psf_image`
    uses beyond the stamp (on dp-mini the pixel model's annulus means follow it from 1.5 FWHM to the stamp's
    edge).  What it loses: structure in the wings that is not round (diffraction spikes, the wings'
    ellipticity), which the pixel model could not measure at this noise anyway.  Unchanged when the stamp
    ends before ``radius_fwhm`` FWHM + 2 px.
    """
    size = int(stamp_size)
    half = size // 2
    c0 = coef[:, 0].reshape(size, size)
    fwhm = stamp_fwhm(c0 / c0.sum())
    r_c = float(radius_fwhm) * fwhm
    if not (fwhm > 0 and r_c + 2.0 < half):
        return coef
    yy, xx = np.mgrid[:size, :size] - half
    r = np.hypot(xx, yy).ravel()
    outer = r > r_c
    law = r[outer] ** (-float(index))
    amps = law @ coef[outer] / float(law @ law)  # (n_terms,)
    out = np.array(coef, dtype=np.float64, copy=True)
    out[outer] = law[:, None] * amps[None, :]
    return out


def profile_error(resid: np.ndarray, var: np.ndarray, model: np.ndarray) -> float:
    """The PSF model's fractional per-pixel error ``e`` measured on the stars it was fitted to.

    ``resid`` = star - fitted model, ``var`` the pixels' noise variance and ``model`` the fitted model
    (amplitude x PSF), all in the same units (any shape; non-finite or infinite ``var`` marks pixels
    without data).  The model is taken to err by ``e x model`` per pixel, independently from pixel to
    pixel, as DAOPHOT's "profile error" does, so that ``E[resid^2] = var + e^2 model^2``; ``e^2`` is the
    least-squares solution of that relation with weights ``1 / var^2`` (the variance of ``resid^2`` at
    ``e = 0``): ``sum((resid^2 - var) model^2 / var^2) / sum(model^4 / var^2)``, 0 when negative (a model
    within the noise).  The fit has absorbed a little of the stars' noise and error (n_terms of the
    spatial polynomial over n stars), so this slightly underestimates ``e``.
    """
    resid, var, model = (np.asarray(a, np.float64).ravel() for a in (resid, var, model))
    ok = np.isfinite(resid) & np.isfinite(var) & (var > 0) & np.isfinite(model)
    if not ok.any():
        return 0.0
    r2, v, m2 = resid[ok] ** 2, var[ok], model[ok] ** 2
    den = float(np.sum(m2 * m2 / (v * v)))
    if not den > 0:
        return 0.0
    return float(np.sqrt(max(float(np.sum((r2 - v) * m2 / (v * v))) / den, 0.0)))


def _moffat_fallback(data: np.ndarray, var: np.ndarray, flux: np.ndarray, n_in: int, detector_shape: tuple[int, int],
                     n_rejected: int) -> PsfModel:
    """The parametric fallback of :func:`fit_psf`: a constant Moffat fitted to recentred stamps."""
    norm = flux[:, None, None]
    sigma = np.sqrt(var) / norm  # inf where a pixel has no weight
    params, chi2, amp, used = fit_moffat_psf(data / norm, sigma)
    size = data.shape[-1]
    model = moffat_image(size, *params)
    d = data[used] / norm[used]
    valid = np.isfinite(sigma[used])
    resid = (d - amp[used][:, None, None] * model[None]) / model.max()
    pe = profile_error(d - amp[used][:, None, None] * model[None], sigma[used] ** 2,
                       amp[used][:, None, None] * model[None])
    return PsfModel(
        coeffs=model[None], spatial_order=0, detector_shape=(int(detector_shape[0]), int(detector_shape[1])),
        n_stars=int(used.sum()), n_rejected=int(n_rejected + n_in - used.sum()),
        residual_rms=float(np.sqrt(np.mean(resid[valid] ** 2))), chi2=float(chi2),
        fallback="moffat", fallback_params=tuple(float(v) for v in params), profile_error=pe,
    )
