"""Single-frame source measurement: centroids, shapes, PSF/aperture/Gaussian fluxes, flags.

Input: a background-subtracted image (electrons), its variance (electrons^2) and
mask, the detection :class:`~lsst_prod.algorithms.footprints.Footprints` and a PSF
model.  Output: a dict of numpy columns, one row per peak (the children of its
footprint) plus one parent row per footprint with several peaks; names follow
Rubin DP1 ``Source``, fluxes stay in electrons.  Algorithms (Gaussian-weighted
Newton centroid, background-weighted PSF fit with simultaneous blends, exact
``sep`` apertures, ``galsim.hsm`` adaptive moments, PSF-relative extendedness)
and measured figures: docs/algorithms-measurement.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, Sequence

import galsim
import numpy as np
import sep
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator
from scipy.spatial import cKDTree

from . import masks
from .apcorr import KOLMOGOROV_WING_INDEX, kolmogorov_wing_amplitude
from .footprints import Footprints


class PsfModel(Protocol):
    """The PSF interface the measurement relies on (pixels, unit-sum stamps)."""

    def image_at(self, x: float, y: float, size: int | None = None) -> np.ndarray: ...
    def sigma_at(self, x: float, y: float) -> float: ...
    def fwhm_at(self, x: float, y: float) -> float: ...
    def moments_at(self, x: float, y: float) -> tuple[float, float, float]: ...


DEFAULT_APERTURE_RADII = (3, 6, 9, 12, 17, 25, 35, 50, 70)
_ISOLATED, _PARENT, _CHILD = 0, 1, 2
_MAX_LOST_WEIGHT = 0.2  # psfFlux_flag when more of sum(p^2) than this is unusable/off-image
_MAX_HALF = 48  # largest half-size (pixels) of the adaptive-moments window
_FWHM_PER_SIGMA = 2.3548200450309493
#: a neighbour's model is extended beyond its stamp by the Kolmogorov wing out to where the wing falls
#: below this fraction of the background rms per pixel (a wing at this level biases a faint star's
#: psfFlux by ~0.001 sqrt(N_eff) ~ 0.01 sigma), and at most _MAX_WING_HALF pixels
_WING_FLOOR = 1e-3
_MAX_WING_HALF = 128


def aperture_column(radius: float) -> str:
    """Column prefix of an aperture of ``radius`` pixels (``ap03``, ``ap12``, ...)."""
    return f"ap{int(round(radius)):02d}"


def _gather(arr: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill: float | None = None):
    """Stamps (n, 2h+1, 2h+1) of ``arr`` centred on integer pixels (off-image: ``fill``, default 0),
    and the inside-the-image mask."""
    off = np.arange(-half, half + 1)
    ys, xs = iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]
    ny, nx = arr.shape
    inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    out = arr[np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)]
    return np.where(inside, out, np.zeros((), arr.dtype) if fill is None else fill), inside


def _add_stamp(dst: np.ndarray, stamp: np.ndarray, x0: int, y0: int, scale: float) -> None:
    """dst[y0:, x0:] += scale * stamp, clipped to dst (x0, y0 in dst coordinates)."""
    ny, nx = dst.shape
    sy, sx = stamp.shape
    ya, yb, xa, xb = max(y0, 0), min(y0 + sy, ny), max(x0, 0), min(x0 + sx, nx)
    if ya < yb and xa < xb:
        dst[ya:yb, xa:xb] += scale * stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]


def _centroid(data, good, var, sigma, cx, cy, max_iter: int = 30, tol: float = 1e-5):
    """Newton solve of sum(w * (x - xc) * I) = 0 with a Gaussian weight w(sigma) about xc.

    ``data, good, var`` are (n, k, k) stamps, ``cx, cy`` start positions relative to
    the stamp centre.  Returns cx, cy, xErr, yErr (pixels) and a failure flag.
    """
    h = data.shape[1] // 2
    off = np.arange(-h, h + 1, dtype=np.float64)
    s2 = (sigma**2)[:, None, None]
    cx, cy = cx.astype(np.float64).copy(), cy.astype(np.float64).copy()
    x_start, y_start, active = cx.copy(), cy.copy(), np.ones(len(cx), bool)
    for it in range(max_iter + 1):
        dx, dy = off[None, None, :] - cx[:, None, None], off[None, :, None] - cy[:, None, None]
        w = np.exp(-0.5 * (dx * dx + dy * dy) / s2) * good
        wd = w * data
        fx, fy = (wd * dx).sum((1, 2)), (wd * dy).sum((1, 2))
        jxx, jyy = -(wd * (1.0 - dx * dx / s2)).sum((1, 2)), -(wd * (1.0 - dy * dy / s2)).sum((1, 2))
        jxy = (wd * dx * dy / s2).sum((1, 2))
        det = jxx * jyy - jxy * jxy
        valid = (det > 0) & (jxx < 0) & np.isfinite(det)  # -J positive definite: a maximum of the light
        if it == max_iter or not active.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            sx, sy = -(jyy * fx - jxy * fy) / det, -(jxx * fy - jxy * fx) / det
        step = np.hypot(sx, sy)
        scale = np.where(step > 1.0, 1.0 / np.maximum(step, 1e-30), 1.0)  # at most 1 px per step
        upd = active & valid & np.isfinite(step)
        cx[upd] += (sx * scale)[upd]
        cy[upd] += (sy * scale)[upd]
        active &= upd & (step > tol)
    w2v = w * w * var
    sxx, syy, sxy = (w2v * dx * dx).sum((1, 2)), (w2v * dy * dy).sum((1, 2)), (w2v * dx * dy).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ia, ib, ic = jyy / det, -jxy / det, jxx / det  # J^-1 = [[ia, ib], [ib, ic]]
        cxx = ia * ia * sxx + 2 * ia * ib * sxy + ib * ib * syy
        cyy = ib * ib * sxx + 2 * ib * ic * sxy + ic * ic * syy
    shift = np.hypot(cx - x_start, cy - y_start)
    bad = ~valid | ~np.isfinite(cx + cy + cxx + cyy) | (shift > np.maximum(2.0, 1.5 * sigma))
    bad |= (np.abs(cx) > h - 2 * sigma) | (np.abs(cy) > h - 2 * sigma) | (cxx <= 0) | (cyy <= 0)
    return cx, cy, np.sqrt(np.abs(cxx)), np.sqrt(np.abs(cyy)), bad


def _psf_centroid(psf, d, v, g, bw, x, y, n_iter: int = 8):
    """Gauss-Newton fit of (amplitude, x, y) of the PSF model to one stamp, unusable pixels dropped.

    For sources whose Gaussian weight would fall on unusable or off-image pixels
    (saturated cores, edges).  ``d, v, g, bw`` are square stamps centred on pixel
    (rint(x), rint(y)).  Returns x, y, xErr, yErr (pixels) and success.
    """
    size = d.shape[0]
    c, ix, iy = size // 2, int(np.rint(x)), int(np.rint(y))
    wts = np.where(g, 1.0 / bw, 0.0)
    for _ in range(n_iter):
        p = np.zeros_like(d)
        _add_stamp(p, psf.image_at(x, y, size), int(np.rint(x)) - ix, int(np.rint(y)) - iy, 1.0)
        amp = float((wts * p * d).sum() / (wts * p * p).sum())
        gy, gx = np.gradient(p)
        design = np.stack([p, -amp * gx, -amp * gy]).reshape(3, -1)
        try:
            ninv = np.linalg.inv((design * wts.ravel()) @ design.T)
        except np.linalg.LinAlgError:
            return x, y, np.nan, np.nan, False
        step = ninv @ (design @ (wts * (d - amp * p)).ravel())
        x, y = x + float(np.clip(step[1], -1, 1)), y + float(np.clip(step[2], -1, 1))
        if abs(x - ix) > c / 2 or abs(y - iy) > c / 2 or not amp > 0:
            return x, y, np.nan, np.nan, False
        if max(abs(step[1]), abs(step[2])) < 1e-4:
            break
    cov = ninv @ ((design * (wts * wts * v).ravel()) @ design.T) @ ninv
    if not (np.isfinite(cov[1:, 1:]).all() and 0 < cov[1, 1] < size**2 and 0 < cov[2, 2] < size**2):
        # a nearly singular normal matrix (usable pixels on one row at the stamp's edge) gives a
        # variance rounded negative, or larger than the stamp: no centroid, rather than an
        # exception that fails the quantum or an error of millions of pixels
        return x, y, np.nan, np.nan, False
    return x, y, math.sqrt(cov[1, 1]), math.sqrt(cov[2, 2]), True


def _nonnegative_normal_solve(normal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """argmin_a (a^T N a / 2 - b^T a) subject to a >= 0, for a symmetric positive semi-definite N:
    scipy's NNLS on the Cholesky factor (N + tiny ridge = L L^T: |L^T a - L^-1 b|^2)."""
    from scipy.linalg import cho_factor, solve_triangular
    from scipy.optimize import nnls

    k = len(rhs)
    ridge = 1e-10 * max(float(np.trace(normal)) / max(k, 1), 1e-300)
    low, _ = cho_factor(normal + ridge * np.eye(k), lower=True)
    low = np.tril(low)
    a, _ = nnls(low.T, solve_triangular(low, rhs, lower=True))
    return a


def _fit_blend(image, var, good, bgvar, stamps, ixs, iys):
    """Simultaneous amplitudes of K PSF stamps centred on pixels (ixs, iys), weights 1/bgvar.

    Returns amplitudes (K,), their covariance (from the full variance), the origin (x0, y0) of the
    local window (union of the stamps) and a function of the amplitudes giving the model over that
    window.  The design is sparse (K stamps of S^2 pixels, not K x window): a skipped parent of a
    crowded coadd holds ~1000 peaks over a whole patch, whose dense design was 32 GB; sparse, it is
    K S^2 values and a K x K normal matrix.
    """
    from scipy import sparse

    c = stamps.shape[1] // 2
    wy = slice(max(int(iys.min()) - c, 0), min(int(iys.max()) + c + 1, image.shape[0]))
    wx = slice(max(int(ixs.min()) - c, 0), min(int(ixs.max()) + c + 1, image.shape[1]))
    d, v, g = image[wy, wx], var[wy, wx], good[wy, wx]
    h, w = d.shape
    k_idx, p_idx, vals = [], [], []
    off = np.arange(stamps.shape[1])
    for k in range(len(ixs)):
        y0, x0 = int(iys[k]) - c - wy.start, int(ixs[k]) - c - wx.start
        ys, xs = y0 + off, x0 + off
        oky, okx = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
        st = stamps[k][np.ix_(oky, okx)]
        pix = (ys[oky][:, None] * w + xs[okx][None, :]).ravel()
        k_idx.append(np.full(pix.size, k))
        p_idx.append(pix)
        vals.append(st.ravel())
    X = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(k_idx), np.concatenate(p_idx))),
                          shape=(len(ixs), h * w))
    wts = np.where(g, 1.0 / (bgvar[wy, wx] if np.ndim(bgvar) == 2 else bgvar), 0.0).ravel()
    normal = (X.multiply(wts[None, :]) @ X.T).toarray()
    rhs = X @ (wts * d.ravel())
    ninv = np.linalg.pinv(normal)
    amp = ninv @ rhs
    noise = (X.multiply((wts * wts * v.ravel())[None, :]) @ X.T).toarray()
    cov = ninv @ noise @ ninv
    if (amp < 0).any() and len(amp) > 1:
        # Children of a blend are sources: a fit that makes one negative has traded flux between two
        # nearly degenerate stamps (a peak placed 0.8 FWHM from its neighbour on dp-mini: -54,788 and
        # +57,235 e for two stars of 1,432 and 1,651).  Non-negative least squares (as scarlet
        # constrains its children): the free children's amplitudes and covariance from their own normal
        # equations; the ones held at 0 keep the unconstrained fit's errors.
        amp = _nonnegative_normal_solve(normal, rhs)
        free = amp > 0
        if free.any():
            nf = np.linalg.pinv(normal[np.ix_(free, free)])
            cf = nf @ noise[np.ix_(free, free)] @ nf
            held = np.flatnonzero(~free)
            diag = np.diag(cov)[held]
            cov = np.zeros_like(cov)
            cov[np.ix_(free, free)] = cf
            cov[held, held] = diag

    def model(a: np.ndarray) -> np.ndarray:
        return np.asarray(X.T @ np.asarray(a, float)).reshape(h, w)

    return amp, cov, (wx.start, wy.start), model


def _hsm_moments(data, good, x0, y0, xc, yc, guess_sig):
    """Adaptive moments (ixx, iyy, ixy) in pixels^2 with GalSim HSM, or None on failure."""
    img = galsim.Image(np.ascontiguousarray(data, dtype=np.float64), xmin=x0, ymin=y0)
    wt = None if good.all() else galsim.Image(np.ascontiguousarray(good, dtype=np.int32), xmin=x0, ymin=y0)
    try:
        res = galsim.hsm.FindAdaptiveMom(
            img, weight=wt, guess_sig=guess_sig, guess_centroid=galsim.PositionD(xc, yc), strict=False
        )
    except (galsim.GalSimError, RuntimeError, ValueError):
        return None
    if res.moments_status != 0 or not np.isfinite(res.moments_sigma) or res.moments_sigma <= 0:
        return None
    e1, e2 = res.observed_shape.e1, res.observed_shape.e2
    trace = 2.0 * res.moments_sigma**2 / math.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-12))
    return 0.5 * trace * (1 + e1), 0.5 * trace * (1 - e1), 0.5 * trace * e2


def _weighted_measures(d, v, g, pw, bw, m, xc, yc, psf_flux, psf_err):
    """Gaussian flux and PSF-relative excesses under the elliptical weight W(m) about (xc, yc).

    ``d, v, g``: window data, variance, usable mask; ``pw``: unit PSF model on the
    window; ``bw``: background variance.  Returns gaussianFlux, its error and, if
    psfFlux > 0, the flux excess ``1 - psfFlux sum(W p) / sum(W I)`` and the moment
    excess ``(<r^2>_WI - <r^2>_Wp) / <r^2>_Wp``, each with its error (else Nones).
    """
    det = m[0] * m[1] - m[2] ** 2
    ddx, ddy = np.arange(d.shape[1])[None, :] - xc, np.arange(d.shape[0])[:, None] - yc
    wgt = np.exp(-0.5 * (m[1] * ddx * ddx - 2 * m[2] * ddx * ddy + m[0] * ddy * ddy) / det) * g
    swi, w2v = float((wgt * d).sum()), wgt * wgt * v
    flux, err = 2.0 * swi, 2.0 * math.sqrt(float(w2v.sum()))
    if not (np.isfinite(psf_flux) and psf_flux > 0 and swi > 0 and pw.any()):
        return flux, err, None, None, None, None
    aw = np.where(g, pw / bw, 0.0)
    aw /= float((aw * pw).sum())  # psfFlux = sum(aw * d)
    swp = float((wgt * pw).sum())
    ratio = psf_flux * swp / swi
    rel_var = (psf_err / psf_flux) ** 2 + float(w2v.sum()) / swi**2
    rel_var -= 2.0 * float((aw * wgt * v).sum()) / (psf_flux * swi)  # Cov(psfFlux, sum(W I))
    r2 = ddx * ddx + ddy * ddy
    q_src, q_psf = float((wgt * r2 * d).sum()) / swi, float((wgt * r2 * pw).sum()) / swp
    q_err = math.sqrt(float((w2v * (r2 - q_src) ** 2).sum())) / swi
    return flux, err, 1.0 - ratio, ratio * math.sqrt(max(rel_var, 0.0)), (q_src - q_psf) / q_psf, q_err / q_psf


def _local_sky(image, usable, x, y, r_in: float, r_out: float, binning: int = 4):
    """Mean and standard deviation (electrons/pixel) of the usable pixels in an annulus.

    Sums are taken on a ``binning``-binned image (exact annulus in binned pixels):
    ``binning**2`` times cheaper than at full resolution.
    """
    b, (ny, nx) = binning, image.shape
    g = np.pad(usable.astype(np.float64), ((0, (-ny) % b), (0, (-nx) % b)))
    d = np.pad(image, ((0, (-ny) % b), (0, (-nx) % b))) * g  # g is 0/1, so d * d = image^2 * g

    def annulus_sum(a: np.ndarray) -> np.ndarray:
        binned = np.ascontiguousarray(a.reshape(a.shape[0] // b, b, a.shape[1] // b, b).sum((1, 3)))
        return sep.sum_circann(binned, (x + 0.5) / b - 0.5, (y + 0.5) / b - 0.5, r_in / b, r_out / b, subpix=0)[0]

    n, s1, s2 = annulus_sum(g), annulus_sum(d), annulus_sum(d * d)
    ok = n > 10
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(ok, s1 / n, np.nan)
        return mean, np.where(ok, np.sqrt(np.maximum(s2 / n - mean * mean, 0.0)), np.nan), ~ok


def _distance_to_unusable(unusable: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance (pixels) from each position to the nearest unusable pixel centre (0 if on one)."""
    if not unusable.any():
        return np.full(len(x), np.inf)
    ey, ex = np.nonzero(unusable & ~ndimage.binary_erosion(unusable, border_value=1))
    dist, _ = cKDTree(np.column_stack([ex, ey])).query(np.column_stack([x, y]))
    ix = np.clip(np.rint(x).astype(int), 0, unusable.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, unusable.shape[0] - 1)
    return np.where(unusable[iy, ix], 0.0, dist)


def _psf_moments(psf: PsfModel, x: np.ndarray, y: np.ndarray, step: float = 64.0):
    """Function (xs, ys) -> PSF adaptive moments (n, 3), pixels^2.

    The PSF varies on detector scales, so ``moments_at`` is evaluated on a
    ``step``-pixel grid over the sources and interpolated bilinearly (error ~1e-4
    for a quadratic variation); direct calls when there are fewer sources than nodes.
    """
    gx = np.arange(math.floor(x.min() / step) * step, x.max() + 2 * step, step) if len(x) else np.zeros(0)
    gy = np.arange(math.floor(y.min() / step) * step, y.max() + 2 * step, step) if len(y) else np.zeros(0)
    if len(gx) * len(gy) >= len(x):
        return lambda xs, ys: np.array([psf.moments_at(float(a), float(b)) for a, b in zip(xs, ys)]).reshape(-1, 3)
    grid = np.array([[psf.moments_at(float(a), float(b)) for b in gy] for a in gx])  # (nx, ny, 3)
    interp = RegularGridInterpolator((gx, gy), grid, bounds_error=False, fill_value=None)
    return lambda xs, ys: interp(np.column_stack([xs, ys]))


def _rows(fp: Footprints):
    """Row table: kind, footprint, peak, parent row and number of children of every row."""
    order = np.lexsort((-fp.peak_significance, fp.peak_footprint))
    pfp = fp.peak_footprint[order]
    starts = np.flatnonzero(np.r_[True, pfp[1:] != pfp[:-1]]) if len(pfp) else np.zeros(0, int)
    rows: list[tuple[int, int, int, int, int]] = []
    for s, e in zip(starts, np.r_[starts[1:], len(pfp)].astype(int)):
        f = int(pfp[s])
        if e - s == 1:
            rows.append((_ISOLATED, f, int(order[s]), -1, 0))
            continue
        prow = len(rows)
        rows.append((_PARENT, f, int(order[s]), -1, int(e - s)))
        rows += [(_CHILD, f, int(order[k]), prow, 0) for k in range(s, e)]
    table = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return tuple(table[:, k] for k in range(5))


def measure_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    footprints: Footprints,
    psf: PsfModel,
    background_rms: float | np.ndarray | None = None,
    aperture_radii: Sequence[float] = DEFAULT_APERTURE_RADII,
    calib_radius: float = 12.0,
    sky_annulus: tuple[float, float] = (50.0, 70.0),
    extendedness_threshold: float = 0.015,
    extendedness_nsigma: float = 4.0,
    size_threshold: float = 0.05,
    size_nsigma: float = 4.0,
    subtract_neighbours: bool = False,
    neighbour_wings: bool = True,
    diffraction: tuple[float, float] = (0.0, 0.0),
) -> dict[str, np.ndarray]:
    """Measure every peak of ``footprints`` on a background-subtracted image.

    ``image`` (electrons) and ``variance`` (electrons^2) are [y, x] arrays, pixel
    centres at integers; ``mask`` holds :mod:`~lsst_prod.algorithms.masks` planes.
    ``background_rms`` (electrons/pixel, scalar or image) sets the psfFlux weights
    (default: median variance of the undetected pixels of each PSF stamp).  Radii
    and annulus are in pixels.  ``extendedness`` is 1 when 1 - psfFlux / (PSF-predicted
    Gaussian flux) > ``extendedness_threshold + extendedness_nsigma * error``;
    ``sizeExtendedness`` likewise for the weighted second moment.  Returns a dict of
    1-d arrays (columns listed in docs/algorithms-measurement.md).

    ``subtract_neighbours``: after the first PSF fit, every source is measured again (centroid, psfFlux,
    apertures, moments, Gaussian flux) on the image minus the PSF models of all OTHER sources scaled by
    their first-pass psfFlux (DAOPHOT/ALLSTAR-like, one iteration); sources with a saturated centre, a
    flagged or non-positive fit are not subtracted, and their neighbours within two stamp half-widths get
    ``psfFlux_flag_unmodelledNeighbour``.  ``neighbour_wings``: the neighbours' models go on beyond the
    PSF stamp with the Kolmogorov ``r^-11/3`` wing (:func:`~lsst_prod.algorithms.apcorr.extended_psf_image`'s
    normalisation; ``diffraction`` = (lambda/D in pixels, obscuration) adds the Airy wing) while it is above
    ``_WING_FLOOR`` of the background rms.  Without ``subtract_neighbours`` (the default) only the other
    children of a source's own blend are subtracted (their positive amplitudes), as before.
    """
    ny, nx = image.shape
    img = np.where(np.isfinite(image), image, 0.0).astype(np.float64)
    var = np.where(np.isfinite(variance) & (variance > 0), variance, 0.0).astype(np.float64)
    mask = np.asarray(mask, dtype=np.uint32)
    unusable = ((mask & masks.UNUSABLE) != 0) | ~np.isfinite(image) | ~(variance > 0)
    usable, detected = ~unusable, (mask & (masks.DETECTED | masks.DETECTED_NEGATIVE)) != 0
    kind, fp_of, peak_of, parent_index, n_child = _rows(footprints)
    n = len(kind)
    is_child, is_parent = kind == _CHILD, kind == _PARENT
    fitted, kids_all = ~is_parent, np.flatnonzero(kind == _CHILD)
    x, y = footprints.peak_x[peak_of].astype(np.float64), footprints.peak_y[peak_of].astype(np.float64)
    ix0, iy0 = np.rint(x).astype(int), np.rint(y).astype(int)
    size = int(psf.image_at(float(nx // 2), float(ny // 2)).shape[0]) if n else 25
    c = size // 2  # half-size of the PSF stamps

    # --- background variance: psfFlux weights and variance_value -------------------
    if background_rms is None:
        sky_var = var[usable & ~detected]
        global_bgvar = float(np.median(sky_var)) if sky_var.size else float(np.median(var) or 1.0)
        vst, inside = _gather(var, ix0, iy0, c, fill=np.nan)
        sel = inside & _gather(usable & ~detected, ix0, iy0, c)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows fall back below
            bgvar = np.nanmedian(np.where(sel, vst, np.nan).reshape(n, -1), axis=1) if n else np.zeros(0)
        bgvar, bgvar_img = np.where(np.isfinite(bgvar) & (bgvar > 0), bgvar, global_bgvar), None
    else:
        bgvar_img = np.broadcast_to(np.asarray(background_rms, np.float64) ** 2, image.shape)
        bgvar = bgvar_img[np.clip(iy0, 0, ny - 1), np.clip(ix0, 0, nx - 1)].copy()

    # --- pass 1: centroids on the undeblended image --------------------------------
    psf_moments = _psf_moments(psf, x, y)
    m0 = psf_moments(x, y)
    sigma = np.maximum(m0[:, 0] * m0[:, 1] - m0[:, 2] ** 2, 1e-6) ** 0.25  # Gaussian-equivalent sigma
    hc = int(np.clip(math.ceil(4.0 * sigma.max()) + 2, 5, 30)) if n else 5
    x_err, y_err, centroid_flag = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool)

    def centroid(rows: np.ndarray, stamps: np.ndarray, keep_bad: bool = False) -> None:
        ix, iy = np.rint(x[rows]).astype(int), np.rint(y[rows]).astype(int)
        g, v = _gather(usable, ix, iy, hc)[0], _gather(var, ix, iy, hc)[0]
        cx, cy, ex, ey, bad = _centroid(stamps, g, v, sigma[rows], x[rows] - ix, y[rows] - iy)
        if keep_bad:  # a second pass: keep the first-pass centroid (and its error) where this one fails
            rows, ix, iy, cx, cy, ex, ey = (a[~bad] for a in (rows, ix, iy, cx, cy, ex, ey))
            bad = bad[~bad]
        x[rows], y[rows] = np.where(bad, x[rows], ix + cx), np.where(bad, y[rows], iy + cy)
        x_err[rows], y_err[rows], centroid_flag[rows] = np.where(bad, np.nan, ex), np.where(bad, np.nan, ey), bad

    centroid(np.arange(n), _gather(img, ix0, iy0, hc)[0])
    off = np.arange(-hc, hc + 1)  # isolated sources whose weight hits unusable pixels: PSF-fit centroid
    w0 = np.exp(-0.5 * (off[None, :, None] ** 2 + off[None, None, :] ** 2) / sigma[:, None, None] ** 2)
    lost_w = 1.0 - (w0 * _gather(usable, ix0, iy0, hc)[0]).sum((1, 2)) / w0.sum((1, 2))
    for r in np.flatnonzero((kind == _ISOLATED) & (lost_w > 0.01)):
        ixr, iyr = np.rint(x[r : r + 1]).astype(int), np.rint(y[r : r + 1]).astype(int)
        d, v, g = (_gather(a, ixr, iyr, c)[0][0] for a in (img, var, usable))
        bw = bgvar[r] if bgvar_img is None else _gather(bgvar_img, ixr, iyr, c, 1.0)[0][0]
        xr, yr, exr, eyr, ok = _psf_centroid(psf, d, v, g, bw, float(x[r]), float(y[r]))
        if ok:
            x[r], y[r], x_err[r], y_err[r], centroid_flag[r] = xr, yr, exr, eyr, False

    # --- PSF fluxes: vectorised for isolated sources, simultaneous for blends --------
    pstamps, pix, piy = np.zeros((n, size, size)), np.zeros(n, int), np.zeros(n, int)
    psf_flux, psf_err = np.full(n, np.nan), np.full(n, np.nan)
    blends = {int(p): np.flatnonzero(parent_index == p) for p in np.flatnonzero(is_parent)}
    local: dict[int, tuple[int, int, np.ndarray]] = {}  # parent row -> (x0, y0, model of its children)
    blend_cov: dict[int, np.ndarray] = {}

    def fit_psf(rows: np.ndarray, src: np.ndarray = img, own: bool = False) -> None:
        """PSF fluxes of ``rows`` (and of every blend) on ``src``; ``own``: src is the image minus the
        neighbour model, to which each source's own model (or its blend's) is added back."""
        pix[rows], piy[rows] = np.rint(x[rows]).astype(int), np.rint(y[rows]).astype(int)
        for r in rows:
            pstamps[r] = psf.image_at(float(x[r]), float(y[r]), size)
        d, v, g = (_gather(a, pix[rows], piy[rows], c)[0] for a in (src, var, usable))
        if own:
            for j, r in enumerate(rows):
                add_own(d[j], int(r), int(pix[r]) - c, int(piy[r]) - c)
        bw = bgvar[rows, None, None] if bgvar_img is None else _gather(bgvar_img, pix[rows], piy[rows], c, 1.0)[0]
        wp = np.where(g, pstamps[rows] / bw, 0.0)
        den = (wp * pstamps[rows]).sum((1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            psf_flux[rows], psf_err[rows] = (wp * d).sum((1, 2)) / den, np.sqrt((wp * wp * v).sum((1, 2))) / den
        for prow, kids in blends.items():
            bv = float(np.mean(bgvar[kids])) if bgvar_img is None else bgvar_img
            # the blend's own children's stamps back in; the rest (and the children's wings beyond their
            # stamps, which the design does not hold) stays subtracted
            for k in kids if own else ():
                add_own(src, int(k), 0, 0, wing=False)
            amp, cov, (x0, y0), design = _fit_blend(src, var, usable, bv, pstamps[kids], pix[kids], piy[kids])
            for k in kids if own else ():
                add_own(src, int(k), 0, 0, -1.0, wing=False)
            psf_flux[kids], psf_err[kids], blend_cov[prow] = amp, np.sqrt(np.maximum(np.diag(cov), 0.0)), cov
            local[prow] = (x0, y0, design(np.maximum(amp, 0.0)))

    def deblend(r: int, dst: np.ndarray, x0: int, y0: int) -> None:
        """In ``dst`` (origin x0, y0) replace the footprint's model by child ``r``'s own model."""
        lx, ly, mod = local[int(parent_index[r])]
        _add_stamp(dst, mod, lx - x0, ly - y0, -1.0)
        _add_stamp(dst, pstamps[r], pix[r] - c - x0, piy[r] - c - y0, max(psf_flux[r], 0.0))

    fit_psf(np.flatnonzero(fitted))
    if len(kids_all):  # pass 2: re-centroid children on the deblended image, then refit
        stamps = _gather(img, pix[kids_all], piy[kids_all], hc)[0]
        for j, r in enumerate(kids_all):
            deblend(r, stamps[j], pix[r] - hc, piy[r] - hc)
        centroid(kids_all, stamps)
        fit_psf(kids_all)

    # --- neighbour subtraction: measure again on image - sum of the OTHER sources' models ----------
    fit_ok = np.isfinite(psf_flux) & np.isfinite(psf_err) & (psf_flux > 0)
    sat_centre = (np.bitwise_or.reduce(_gather(mask, pix, piy, 1)[0].reshape(n, 9), axis=1) & masks.SAT) != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lost1 = 1.0 - (pstamps**2 * _gather(usable, pix, piy, c)[0]).sum((1, 2)) / (pstamps**2).sum((1, 2))
    in_model = fitted & fit_ok & (lost1 <= _MAX_LOST_WEIGHT) & ~sat_centre  # a saturated core's fit is not trusted
    if not subtract_neighbours:
        in_model[:] = False  # below: the old per-blend deblending (local models) only
    m_amp, m_pix, m_piy, m_stamp = np.where(in_model, psf_flux, 0.0), pix.copy(), piy.copy(), pstamps.copy()
    wings: dict[int, tuple[int, np.ndarray]] = {}  # row -> (half-size, unit wing stamp, zero on the model stamp)
    if subtract_neighbours and neighbour_wings and in_model.any():
        mc = psf_moments(np.array([nx / 2.0]), np.array([ny / 2.0]))[0]
        fwhm_c = _FWHM_PER_SIGMA * max(mc[0] * mc[1] - mc[2] ** 2, 1e-12) ** 0.25
        idx = KOLMOGOROV_WING_INDEX
        a_w = kolmogorov_wing_amplitude(fwhm_c, c + 0.5, diffraction)
        if np.isfinite(a_w) and a_w > 0:
            with np.errstate(divide="ignore"):
                reach = (m_amp * a_w / (_WING_FLOOR * np.sqrt(bgvar))) ** (1.0 / idx)
            for r in np.flatnonzero(in_model & (reach > c + 1)):
                h = int(min(math.ceil(reach[r]), _MAX_WING_HALF))
                off = np.arange(-h, h + 1, dtype=np.float64)
                rr = np.hypot(off[None, :] - (x[r] - m_pix[r]), off[:, None] - (y[r] - m_piy[r]))
                w = a_w * np.maximum(rr, 1.0) ** (-idx)
                w[h - c : h + c + 1, h - c : h + c + 1] = 0.0
                wings[int(r)] = (h, w)

    def add_own(dst: np.ndarray, r: int, x0: int, y0: int, sign: float = 1.0, wing: bool = True) -> None:
        """Add ``sign`` x the model that was subtracted for source ``r`` into ``dst`` (origin x0, y0);
        ``wing=False``: its stamp part only."""
        if m_amp[r] > 0:
            _add_stamp(dst, m_stamp[r], int(m_pix[r]) - c - x0, int(m_piy[r]) - c - y0, sign * m_amp[r])
            if wing and r in wings:
                h, w = wings[r]
                _add_stamp(dst, w, int(m_pix[r]) - h - x0, int(m_piy[r]) - h - y0, sign * m_amp[r])

    model = np.zeros_like(img)
    for r in np.flatnonzero(in_model):
        add_own(model, int(r), 0, 0)
    resid = img - model
    if subtract_neighbours and in_model.any():  # pass 3: centroids and PSF fluxes on image - neighbours
        rows = np.flatnonzero(fitted & (lost_w <= 0.01) & ~centroid_flag)  # PSF-fit centroids stay as they are
        ixr, iyr = np.rint(x[rows]).astype(int), np.rint(y[rows]).astype(int)
        stamps = _gather(resid, ixr, iyr, hc)[0]
        for j, r in enumerate(rows):
            add_own(stamps[j], int(r), int(ixr[j]) - hc, int(iyr[j]) - hc)
        centroid(rows, stamps, keep_bad=True)
        fit_psf(np.flatnonzero(fitted), resid, own=True)
    bad_nb = fitted & ~in_model & (sat_centre | (fit_ok & (lost1 > _MAX_LOST_WEIGHT)))
    unmodelled = np.zeros(n, bool)
    if subtract_neighbours and bad_nb.any() and n > 1:
        tree, pts = cKDTree(np.column_stack([x[bad_nb], y[bad_nb]])), np.column_stack([x, y])
        cnt = np.array([len(h) for h in tree.query_ball_point(pts, 2.0 * c)])
        unmodelled = fitted & (cnt - bad_nb.astype(int) > 0)
    ixf, iyf = np.rint(x).astype(int), np.rint(y).astype(int)
    g_st, in_st = _gather(usable, pix, piy, c)
    p2 = (pstamps**2).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        lost = 1.0 - (pstamps**2 * g_st).sum((1, 2)) / p2
        psf_edge = fitted & ((pstamps**2 * ~in_st).sum((1, 2)) / p2 > 1e-3)
        psf_area = np.where(fitted, pstamps.sum((1, 2)) ** 2 / p2, np.nan)
    psf_flag = fitted & ~((lost <= _MAX_LOST_WEIGHT) & np.isfinite(psf_flux) & np.isfinite(psf_err))
    for prow, kids in blends.items():
        psf_flux[prow], psf_err[prow] = psf_flux[kids].sum(), math.sqrt(max(float(blend_cov[prow].sum()), 0.0))
        psf_flag[prow], psf_edge[prow] = psf_flag[kids].any(), psf_edge[kids].any()

    # --- apertures; for children the other children's PSF models are subtracted -----
    out: dict[str, np.ndarray] = {}
    radii = np.array(sorted({float(r) for r in aperture_radii} | {float(calib_radius)}))
    jc = int(np.argmin(np.abs(radii - calib_radius)))
    blendedness = np.zeros(n)
    # neighbours' model flux per aperture: the model image's aperture minus the source's own part of it
    neighbours = np.stack([sep.sum_circle(model, x, y, rad, subpix=0)[0] for rad in radii], axis=1) if n else \
        np.zeros((0, len(radii)))
    ones = np.ones(len(radii))

    def own_aperture(r: int, xc: float, yc: float) -> np.ndarray:
        """Apertures (all radii) centred on (xc, yc) of the model subtracted for source ``r``."""
        cx, cy = (c + xc - m_pix[r]) * ones, (c + yc - m_piy[r]) * ones
        own = sep.sum_circle(m_stamp[r], cx, cy, radii, subpix=0)[0]
        if r in wings:
            h, w = wings[r]
            own = own + sep.sum_circle(w, cx - c + h, cy - c + h, radii, subpix=0)[0]
        return m_amp[r] * own

    for r in np.flatnonzero(m_amp > 0):
        neighbours[r] -= own_aperture(int(r), x[r], y[r])
    for prow, kids in blends.items():  # a parent's own light is its children's
        for k in kids[m_amp[kids] > 0]:
            neighbours[prow] -= own_aperture(int(k), x[prow], y[prow])
    for r in kids_all:  # blendedness (and, without subtract_neighbours, the siblings' aperture light)
        lx, ly, mod = local[int(parent_index[r])]
        tot = sep.sum_circle(mod, (x[r] - lx) * ones, (y[r] - ly) * ones, radii, subpix=0)[0]
        cx, cy = (c + x[r] - pix[r]) * ones, (c + y[r] - piy[r]) * ones
        own1 = max(psf_flux[r], 0.0) * sep.sum_circle(pstamps[r], cx, cy, radii, subpix=0)[0]
        if not subtract_neighbours:
            neighbours[r] = tot - own1
        blendedness[r] = min(max(1.0 - own1[jc] / tot[jc], 0.0), 1.0) if tot[jc] > 0 else 0.0
    dist_bad = _distance_to_unusable(unusable, x, y)
    for j, rad in enumerate(radii):
        flux, ferr, fl = sep.sum_circle(img, x, y, rad, var=var, subpix=0)
        name = aperture_column(rad)
        out[f"{name}Flux"], out[f"{name}FluxErr"] = flux - neighbours[:, j], ferr
        out[f"{name}Flux_flag"] = ((fl & sep.APER_TRUNC) != 0) | (dist_bad < rad + 0.7072)
    cal = aperture_column(calib_radius)
    out.update(calibFlux=out[f"{cal}Flux"], calibFluxErr=out[f"{cal}FluxErr"], calibFlux_flag=out[f"{cal}Flux_flag"])
    sky, sky_err, sky_flag = _local_sky(img, usable & ~detected, x, y, *sky_annulus)

    # --- adaptive moments, Gaussian flux, extendedness (per source) -----------------
    psf_mom = psf_moments(x, y)
    mom, shape_flag = np.full((n, 3), np.nan), np.ones(n, bool)
    g_flux, g_err, g_flag = np.full(n, np.nan), np.full(n, np.nan), np.ones(n, bool)
    ext, size_ext = np.full(n, np.nan), np.full(n, np.nan)
    bbox = footprints.bbox[fp_of].reshape(n, 4)
    for i in range(n):
        half = max(8, math.ceil(5.0 * sigma[i]))
        if is_parent[i]:
            half = int(min(max(bbox[i, 2] - bbox[i, 0], bbox[i, 3] - bbox[i, 1]) // 2 + 4, _MAX_HALF))
        for _ in range(4):  # grow the window until it holds 4 adaptive sigmas
            wy = slice(max(iyf[i] - half, 0), min(iyf[i] + half + 1, ny))
            wx = slice(max(ixf[i] - half, 0), min(ixf[i] + half + 1, nx))
            d, g, v = resid[wy, wx].copy(), usable[wy, wx], var[wy, wx]
            for k in blends[i] if is_parent[i] else (i,):  # the source's own model (a parent's: its children's)
                add_own(d, int(k), wx.start, wy.start)
            if is_child[i] and not subtract_neighbours:
                deblend(i, d, wx.start, wy.start)
            res = _hsm_moments(d, g, wx.start, wy.start, x[i], y[i], float(sigma[i]))
            need = math.ceil(4.0 * math.sqrt(max(res[0], res[1]))) if res is not None else 0
            if res is None or need <= half or half >= _MAX_HALF:
                break
            half = min(need + 2, _MAX_HALF)
        shape_flag[i] = res is None
        m = np.array(res) if res is not None else psf_mom[i]  # fall back on the PSF's shape
        mom[i] = m if res is not None else np.nan
        if not (m[0] * m[1] - m[2] ** 2 > 0 and m[0] > 0):
            continue
        pw = np.zeros_like(d)  # this source's unit PSF model on the window
        if fitted[i]:
            _add_stamp(pw, pstamps[i], pix[i] - c - wx.start, piy[i] - c - wy.start, 1.0)
        bw = bgvar_img[wy, wx] if bgvar_img is not None else bgvar[i]
        res = _weighted_measures(d, v, g, pw, bw, m, x[i] - wx.start, y[i] - wy.start, psf_flux[i], psf_err[i])
        g_flux[i], g_err[i] = res[0], res[1]
        g_flag[i] = shape_flag[i] or 3.0 * math.sqrt(max(m[0], m[1])) > half
        if fitted[i] and res[2] is not None:
            ext[i] = float(res[2] > extendedness_threshold + extendedness_nsigma * res[3])
            size_ext[i] = float(res[4] > size_threshold + size_nsigma * res[5])

    # --- pixel flags: any pixel of the footprint, or of the 3x3 centre -------------
    def in_footprint(bits: np.uint32) -> np.ndarray:
        labels = footprints.labels[(mask & bits) != 0].ravel()
        return (np.bincount(labels, minlength=footprints.n_footprints + 1)[1:] > 0)[fp_of]

    centre = np.bitwise_or.reduce(_gather(mask, ixf, iyf, 1)[0].reshape(n, 9), axis=1).astype(np.uint32)
    shape_flag |= (centre & masks.UNUSABLE) != 0  # adaptive moments of a masked core are unreliable
    g_flag |= shape_flag
    touches = (bbox[:, 0] <= 0) | (bbox[:, 1] <= 0) | (bbox[:, 2] >= nx) | (bbox[:, 3] >= ny)
    out.update(
        x=x, y=y, xErr=x_err, yErr=y_err, centroid_flag=centroid_flag,
        ixx=mom[:, 0], iyy=mom[:, 1], ixy=mom[:, 2], shape_flag=shape_flag,
        ixxPSF=psf_mom[:, 0], iyyPSF=psf_mom[:, 1], ixyPSF=psf_mom[:, 2],
        psfFlux=psf_flux, psfFluxErr=psf_err, psfFlux_flag=psf_flag, psfFlux_flag_edge=psf_edge,
        psfFlux_flag_unmodelledNeighbour=unmodelled,
        psfFlux_area=psf_area, gaussianFlux=g_flux, gaussianFluxErr=g_err, gaussianFlux_flag=g_flag,
        sky=sky, skyErr=sky_err, sky_flag=sky_flag, extendedness=ext, sizeExtendedness=size_ext,
        footprintArea_value=footprints.area[fp_of].astype(np.int64),
        parent_index=parent_index, deblend_nChild=n_child, footprint_index=fp_of,
        peak_index=np.where(is_parent, -1, peak_of),
        pixelFlags_saturated=in_footprint(masks.SAT), pixelFlags_saturatedCenter=(centre & masks.SAT) != 0,
        pixelFlags_cr=in_footprint(masks.CR), pixelFlags_crCenter=(centre & masks.CR) != 0,
        pixelFlags_edge=in_footprint(masks.EDGE | masks.NO_DATA) | touches, pixelFlags_bad=in_footprint(masks.BAD),
        pixelFlags_interpolated=in_footprint(masks.INTRP), pixelFlags_interpolatedCenter=(centre & masks.INTRP) != 0,
        variance_value=bgvar, blendedness_abs=blendedness,
    )  # fmt: skip
    return out
