"""Forced PSF photometry at fixed positions (objects on calexps and difference images).

For every object the PSF model ``p_i = psf.image_at(x_i, y_i, S)`` (unit sum) is
placed at its fixed position and the amplitudes of all objects are fitted by
linear least squares:

    N a = b,   N_ij = sum_pix w p_i p_j,   b_i = sum_pix w p_i d,   w = 1 / background variance

The weights use the background variance only (a scalar or an image, by default the
median variance of the usable undetected pixels): weights including the source's
own Poisson variance would correlate with the data and bias bright sources low.
The covariance comes from the full variance V: ``C = N^-1 (X^T W V W X) N^-1``.
Unusable pixels (BAD/SAT/CR/NO_DATA, non-finite) get zero weight.

Objects whose stamps overlap are fitted *simultaneously*: the overlapping pairs
(KD-tree, Chebyshev distance < S) define a sparse normal matrix whose connected
components are solved independently, dense (pseudo-inverse) up to
``max_dense_group`` objects, else by a sparse LU factorisation (errors from batched
solves).  So a faint object next to a bright one is not biased by its wings, and
fluxes may be negative (difference images, faint objects).

:func:`propagate_object_positions` moves object positions to the epoch of the
exposure with :func:`~lsst_prod.algorithms.astrometry.propagate_positions` when
proper motions or parallaxes are known.  :func:`match_objects_to_stars` pairs
point-like Objects one-to-one with the stars of relcal's astrometric solution (and
finds the epoch of the Objects' coadd positions from the moving stars), and
:func:`remove_astrometric_correction` takes a calibrated position back to a calexp's
single-frame WCS frame, so that a star is measured where its light is on each exposure.
Figures: docs/algorithms-objects.md.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import splu
from scipy.spatial import cKDTree

from . import masks
from .apcorr import KOLMOGOROV_WING_INDEX, kolmogorov_wing_amplitude
from .astrometry import propagate_positions
from .measure import _MAX_WING_HALF, _WING_FLOOR, _gather
from .psf import stamp_fwhm
from .relcal_astrometry import gnomonic, remove_astrometric_correction  # noqa: F401 (re-exported)
from .relcal_normals import MAS_PER_RAD

JULIAN_YEAR_DAYS = 365.25


def _solve_group(nmat, mmat, b):
    """Amplitudes and their variances for one dense group."""
    ninv = np.linalg.pinv(nmat, hermitian=True)
    return ninv @ b, np.einsum("ij,jk,ki->i", ninv, mmat, ninv)


def _solve_sparse(nmat, mmat, b, batch: int = 256):
    """Amplitudes and variances of a large group: sparse LU of N, batched solves for diag(N^-1 M N^-1)."""
    n = len(b)
    lu = splu((nmat + sparse.identity(n) * 1e-12 * nmat.diagonal().max()).tocsc())
    amp, var = lu.solve(b), np.empty(n)
    for start in range(0, n, batch):
        cols = np.arange(start, min(start + batch, n))
        e = np.zeros((n, len(cols)))
        e[cols, np.arange(len(cols))] = 1.0
        z = lu.solve(e)  # columns of N^-1 (symmetric)
        var[cols] = np.einsum("ik,ik->k", z, mmat @ z)
    return amp, var


def forced_psf_photometry(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf,
    x,
    y,
    background_variance: float | np.ndarray | None = None,
    stamp_size: int | None = None,
    simultaneous: bool = True,
    max_masked_fraction: float = 0.2,
    max_dense_group: int = 300,
    wings: tuple[float, float, float] | None = None,
    profile_error: float = 0.0,
    unmodelled_threshold: float | None = 5.0,
) -> dict[str, np.ndarray]:
    """PSF fluxes (image units) of objects at fixed pixel positions (x, y).

    ``image`` is background-subtracted (a calexp or a difference image),
    ``variance`` its variance, ``mask`` the :mod:`masks` planes (or None), ``psf``
    follows the PSF protocol (``image_at``).  ``background_variance`` (scalar or
    image) sets the weights; ``stamp_size`` the PSF stamp (default: the PSF's own);
    ``simultaneous=False`` fits every object alone (for comparison).  ``wings`` = (the PSF's FWHM in
    pixels, lambda/D in pixels, obscuration): a second pass subtracts every fitted object's Kolmogorov
    (x Airy) wing beyond its stamp (:func:`neighbour_wing_image`) and fits again, so a faint object
    5-10" from a bright star is not biased by the light the stamps leave out.  ``profile_error`` (the
    PSF model's fractional per-pixel error, :func:`~lsst_prod.algorithms.psf.profile_error`): the errors
    include the model's error, a variance ``(e a_j p_j)^2`` per pixel from every fitted object j (DAOPHOT's
    profile error), so that a faint object inside a bright star's stamp, or a bright star itself, is not
    given the precision of its photons alone.  ``unmodelled_threshold``: light that no object of the list
    models (a transient, an asteroid, a cosmic ray the calexp kept) is found as peaks of at least that many
    sigma in the PSF-matched residual image, more than 1 FWHM from every fitted object; an object whose flux
    such a peak biases by more than its error (the peak's flux times the PSF's normalised autocorrelation at
    their separation) is flagged ``psfFlux_flag_unmodelled`` (:func:`unmodelled_light`; None: not looked
    for).  Not part of ``psfFlux_flag``: an extended object's own light beyond the PSF sets it too (18 % of
    the galaxies' rows on ra-wrap, 0.4 % of the point sources'), and a galaxy's PSF flux (a nucleus's
    variability) is still a measurement; a point source's light curve should leave flagged rows out.  Returns a dict
    of columns (one row per object, in input order): ``x, y, psfFlux, psfFluxErr,
    psfFlux_flag, psfFlux_flag_edge, psfFlux_flag_noGoodPixels, psfFlux_flag_masked,
    psfFlux_group, psfFlux_nGroup, pixelFlags_nodata, pixelFlags_saturatedCenter,
    pixelFlags_crCenter, pixelFlags_interpolatedCenter`` (see docs/algorithms-objects.md).
    """
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    n, (ny, nx) = len(x), image.shape
    msk = np.zeros(image.shape, np.uint32) if mask is None else np.asarray(mask, np.uint32)
    usable = ((msk & masks.UNUSABLE) == 0) & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    img = np.where(usable, image, 0.0).astype(np.float64)
    var = np.where(usable, variance, 0.0).astype(np.float64)
    if background_variance is None:
        sky = usable & ((msk & masks.DETECTED) == 0)
        background_variance = float(np.median(var[sky if sky.sum() > 100 else usable])) if usable.any() else 1.0
    bgvar = np.broadcast_to(np.asarray(background_variance, np.float64), image.shape)
    wimg = np.where(usable, 1.0 / np.where(bgvar > 0, bgvar, np.inf), 0.0)

    finite = np.isfinite(x) & np.isfinite(y)
    ix = np.where(finite, np.rint(np.where(finite, x, 0)), -1).astype(np.int64)
    iy = np.where(finite, np.rint(np.where(finite, y, 0)), -1).astype(np.int64)
    centre_on = finite & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    centre = np.where(centre_on[:, None], _gather(msk, ix, iy, 1)[0].reshape(n, 9), masks.NO_DATA)
    centre = np.bitwise_or.reduce(centre, axis=1).astype(np.uint32)
    size = int(stamp_size) if stamp_size else int(psf.image_at(float(nx // 2), float(ny // 2)).shape[0])
    c = size // 2
    # objects whose stamp touches the image are fitted (their light reaches their neighbours)
    on = finite & (ix >= -c) & (ix < nx + c) & (iy >= -c) & (iy < ny + c)
    fit = np.flatnonzero(on)
    stamps = np.zeros((n, size, size))
    for i in fit:
        stamps[i] = psf.image_at(float(x[i]), float(y[i]), size)
    ndiag, mdiag, b, p2, off2, good2 = (np.zeros(n) for _ in range(6))
    for s0 in range(0, n, 2048):  # chunks bound the memory of the gathered stamps
        sl = slice(s0, min(s0 + 2048, n))
        d, inside = _gather(img, ix[sl], iy[sl], c)
        v, w = _gather(var, ix[sl], iy[sl], c)[0], _gather(wimg, ix[sl], iy[sl], c)[0]
        st = stamps[sl]
        wp, st2 = w * st, st * st
        ndiag[sl], mdiag[sl], b[sl] = (wp * st).sum((1, 2)), (wp * wp * v).sum((1, 2)), (wp * d).sum((1, 2))
        p2[sl], off2[sl], good2[sl] = st2.sum((1, 2)), (st2 * ~inside).sum((1, 2)), (st2 * (w > 0)).sum((1, 2))

    def project(data: np.ndarray) -> np.ndarray:
        """b_i = sum_pix w p_i d for another data image (the design, N and M, is unchanged)."""
        out = np.zeros(n)
        for s0 in range(0, n, 2048):
            sl = slice(s0, min(s0 + 2048, n))
            out[sl] = (_gather(wimg, ix[sl], iy[sl], c)[0] * stamps[sl] * _gather(data, ix[sl], iy[sl], c)[0]).sum((1, 2))
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        off_frac = np.where(on, off2 / p2, 1.0)
        lost = np.where(on, 1.0 - good2 / p2, 1.0)
    fit = fit[ndiag[fit] > 0]
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    group, n_group = np.full(n, -1, np.int64), np.zeros(n, np.int64)

    pairs = np.zeros((0, 2), np.int64)
    if simultaneous and len(fit) > 1:
        pairs = cKDTree(np.column_stack([ix[fit], iy[fit]])).query_pairs(size - 1, p=np.inf, output_type="ndarray")
    pi, pj = fit[pairs[:, 0]], fit[pairs[:, 1]]

    def overlaps(pi, pj, varimg):
        """N_ij and M_ij (the latter with the variance image ``varimg``) of the pairs (pi, pj)."""
        nij, mij = np.zeros(len(pi)), np.zeros(len(pi))
        for k, (i, j) in enumerate(zip(pi, pj)):  # overlap of the two stamps, in image pixels
            xa, ya = max(ix[i], ix[j]) - c, max(iy[i], iy[j]) - c
            xb, yb = min(min(ix[i], ix[j]) + c + 1, nx), min(min(iy[i], iy[j]) + c + 1, ny)
            xa, ya = max(xa, 0), max(ya, 0)
            if xa >= xb or ya >= yb:
                continue
            wsub = wimg[ya:yb, xa:xb]
            prod = wsub * stamps[i][ya - iy[i] + c: yb - iy[i] + c, xa - ix[i] + c: xb - ix[i] + c] \
                * stamps[j][ya - iy[j] + c: yb - iy[j] + c, xa - ix[j] + c: xb - ix[j] + c]
            nij[k], mij[k] = prod.sum(), (prod * wsub * varimg[ya:yb, xa:xb]).sum()
        return nij, mij

    def painted(rows: np.ndarray, scale: np.ndarray, power: int = 1) -> np.ndarray:
        """The image of sum over ``rows`` of (scale_i x stamp_i)^power, each stamp at its object."""
        out = np.zeros(image.shape)
        for i in rows:
            xa, ya, xb, yb = max(ix[i] - c, 0), max(iy[i] - c, 0), min(ix[i] + c + 1, nx), min(iy[i] + c + 1, ny)
            if xa < xb and ya < yb:
                out[ya:yb, xa:xb] += (scale[i] * stamps[i][ya - iy[i] + c: yb - iy[i] + c,
                                                           xa - ix[i] + c: xb - ix[i] + c]) ** power
        return out

    nij, mij = overlaps(pi, pj, var)
    keep = nij != 0
    pi, pj, nij, mij = pi[keep], pj[keep], nij[keep], mij[keep]
    pos = np.full(n, -1, np.int64)
    pos[fit] = np.arange(len(fit))
    graph = sparse.coo_matrix((np.ones(len(pi)), (pos[pi], pos[pj])), shape=(len(fit), len(fit)))
    n_comp, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp, minlength=n_comp)
    group[fit], n_group[fit] = comp, sizes[comp]
    single = fit[sizes[comp] == 1]
    if np.any(sizes > 1):
        sym_r, sym_c = np.r_[pos[pi], pos[pj], pos[fit]], np.r_[pos[pj], pos[pi], pos[fit]]
        nmat = sparse.csr_matrix((np.r_[nij, nij, ndiag[fit]], (sym_r, sym_c)), shape=(len(fit),) * 2)
        mmat = sparse.csr_matrix((np.r_[mij, mij, mdiag[fit]], (sym_r, sym_c)), shape=(len(fit),) * 2)
        order = np.argsort(comp, kind="stable")
        bounds = np.searchsorted(comp[order], np.arange(n_comp + 1))

    def solve(bvec: np.ndarray) -> None:
        flux[single], err[single] = bvec[single] / ndiag[single], np.sqrt(mdiag[single]) / ndiag[single]
        for g in np.flatnonzero(sizes > 1):
            members = order[bounds[g]: bounds[g + 1]]  # positions in ``fit``
            sub = np.ix_(members, members)
            if len(members) <= max_dense_group:
                amp, avar = _solve_group(nmat[sub].toarray(), mmat[sub].toarray(), bvec[fit[members]])
            else:
                amp, avar = _solve_sparse(nmat[sub], mmat[sub], bvec[fit[members]])
            flux[fit[members]], err[fit[members]] = amp, np.sqrt(np.maximum(avar, 0.0))

    solve(b)
    wing_img = None
    if wings is not None and len(fit):
        # pass 2: the fitted objects' wings beyond their stamps off the data (each object's own stamp is left
        # as it was: its wing image is zero there), and the amplitudes fitted again
        amps = np.where(np.isfinite(flux) & (flux > 0), flux, 0.0)
        wing_img = neighbour_wing_image(image.shape, x, y, amps, c, *wings,
                                        floor=_WING_FLOOR * float(np.sqrt(np.median(bgvar[usable]))) if usable.any()
                                        else np.inf)
        if wing_img is not None:
            b = project(img - np.where(usable, wing_img, 0.0))
            solve(b)
    if profile_error > 0 and len(fit):
        # the errors again, with the model's variance (e a_j p_j)^2 of every fitted object j added to the
        # pixels' (the amplitudes, which the weights and the data set, are unchanged)
        amps = np.where(np.isfinite(flux) & (flux > 0), flux, 0.0)
        model_var = painted(fit[amps[fit] > 0], profile_error * amps, power=2)
        var_m = var + np.where(usable, model_var, 0.0)
        for s0 in range(0, n, 2048):
            sl = slice(s0, min(s0 + 2048, n))
            wp = _gather(wimg, ix[sl], iy[sl], c)[0] * stamps[sl]
            mdiag[sl] = (wp * wp * _gather(var_m, ix[sl], iy[sl], c)[0]).sum((1, 2))
        if np.any(sizes > 1):
            mij = overlaps(pi, pj, var_m)[1]
            mmat = sparse.csr_matrix((np.r_[mij, mij, mdiag[fit]], (sym_r, sym_c)), shape=(len(fit),) * 2)
        solve(b)

    unmodelled = np.zeros(n, bool)
    if unmodelled_threshold is not None and len(fit):
        model = painted(fit, np.where(np.isfinite(flux), flux, 0.0))
        if wing_img is not None:
            model += wing_img
        centre_psf = psf.image_at(float(nx // 2), float(ny // 2), size)
        unmodelled = unmodelled_light(np.where(usable, img - model, 0.0), usable, bgvar, centre_psf,
                                      x[fit], y[fit], err[fit], float(unmodelled_threshold), n_out=n, rows=fit,
                                      model=np.where(usable, model, 0.0))

    no_good = ~on | (ndiag <= 0)
    masked = on & (lost - off_frac > 1e-3)
    flux[~centre_on], err[~centre_on] = np.nan, np.nan  # fitted for their neighbours' sake only
    return {
        "x": x, "y": y, "psfFlux": flux, "psfFluxErr": err,
        "psfFlux_flag": no_good | ~centre_on | (lost > max_masked_fraction) | ~np.isfinite(flux) | ~np.isfinite(err),
        "psfFlux_flag_unmodelled": unmodelled,
        "psfFlux_flag_edge": on & (off_frac > 1e-3), "psfFlux_flag_noGoodPixels": no_good | ~centre_on,
        "psfFlux_flag_masked": masked, "psfFlux_group": group, "psfFlux_nGroup": n_group,
        "pixelFlags_nodata": (centre & masks.NO_DATA) != 0, "pixelFlags_saturatedCenter": (centre & masks.SAT) != 0,
        "pixelFlags_crCenter": (centre & masks.CR) != 0, "pixelFlags_interpolatedCenter": (centre & masks.INTRP) != 0,
    }


#: unmodelled light must be at least this fraction of the model's own (PSF-matched) light where it is: the
#: residual of a bright star's model error (1-2 % of it) is not a source of its own
UNMODELLED_MIN_MODEL_FRACTION = 0.1


def unmodelled_light(residual: np.ndarray, usable: np.ndarray, bgvar: np.ndarray, psf_stamp: np.ndarray,
                     x: np.ndarray, y: np.ndarray, err: np.ndarray, threshold: float, n_out: int,
                     rows: np.ndarray, model: np.ndarray | None = None) -> np.ndarray:
    """Which objects unmodelled light biases by more than their error (bool, ``n_out`` rows; the objects
    (x, y, err) are rows ``rows`` of it).

    ``residual`` = data - the fitted model (0 where not ``usable``), ``bgvar`` the background variance
    image, ``psf_stamp`` a unit-sum PSF (size S).  The residual is PSF-matched (``R * p / sum p^2``, the
    flux a point source there would have) and divided by its noise ``sqrt(bgvar / sum p^2)``; local
    maxima of at least ``threshold`` sigma, more than 1 FWHM from every object (nearer, a fitted object's
    own model error or variability cannot be told from extra light) and, with the fitted ``model`` image
    given, at least ``UNMODELLED_MIN_MODEL_FRACTION`` of its PSF-matched light there (a bright star's model
    error leaves residuals of 1-2 % of it), are unmodelled sources.  A peak of
    flux F at separation d biases an object by about ``F A(d)``, A the PSF's autocorrelation normalised
    to 1 at 0 (the least-squares share of a neighbour's light); the object is flagged when that exceeds
    its error.
    """
    from scipy import ndimage
    from scipy.signal import fftconvolve

    out = np.zeros(n_out, bool)
    p = np.asarray(psf_stamp, float)
    p2 = float(np.sum(p * p))
    if not (p2 > 0 and len(x)):
        return out
    matched = fftconvolve(residual, p[::-1, ::-1], mode="same") / p2
    noise = np.sqrt(np.maximum(fftconvolve(np.where(usable, bgvar, 0.0), (p * p)[::-1, ::-1], mode="same"), 0.0)) / p2
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(noise > 0, matched / noise, 0.0)
    half = p.shape[0] // 2
    auto = fftconvolve(p, p[::-1, ::-1], mode="full")[half: half + p.shape[0], half: half + p.shape[0]]
    auto = auto / auto[half, half]  # A(d), d = offset - half, normalised to 1 at 0
    mom_fwhm = stamp_fwhm(p)
    if not mom_fwhm > 0:
        mom_fwhm = 2.0
    ny, nx = residual.shape
    near = np.zeros(residual.shape, bool)
    r_ex = int(math.ceil(mom_fwhm))
    for xi, yi in zip(np.rint(x).astype(int), np.rint(y).astype(int)):
        xa, xb, ya, yb = max(xi - r_ex, 0), min(xi + r_ex + 1, nx), max(yi - r_ex, 0), min(yi + r_ex + 1, ny)
        if xa < xb and ya < yb:
            yy, xx = np.mgrid[ya:yb, xa:xb]
            near[ya:yb, xa:xb] |= np.hypot(xx - xi, yy - yi) <= mom_fwhm
    peaks = (snr >= threshold) & ~near & usable & (snr == ndimage.maximum_filter(snr, size=3))
    if model is not None:
        peaks &= matched >= UNMODELLED_MIN_MODEL_FRACTION * fftconvolve(model, p[::-1, ::-1], mode="same") / p2
    py, px = np.nonzero(peaks)
    if not len(px):
        return out
    tree = cKDTree(np.column_stack([px, py]))
    for k, (xi, yi, e) in enumerate(zip(x, y, err)):
        if not (np.isfinite(xi) and np.isfinite(yi) and np.isfinite(e) and e > 0):
            continue
        bias = 0.0
        for j in tree.query_ball_point([xi, yi], r=half, p=np.inf):
            dx, dy = int(px[j] - round(xi)), int(py[j] - round(yi))
            bias += abs(float(matched[py[j], px[j]])) * float(auto[half + dy, half + dx])
        out[rows[k]] = bias > e
    return out


def neighbour_wing_image(shape: tuple[int, int], x, y, amp, half: int, fwhm_pix: float,
                         lam_over_diam_pix: float = 0.0, obscuration: float = 0.0,
                         floor: float = 0.0) -> np.ndarray | None:
    """The sum of the objects' PSF wings beyond their (2 half + 1)^2 model stamps: ``amp`` x the
    Kolmogorov ``A r^-11/3`` (x Airy) wing normalised as :func:`~lsst_prod.algorithms.apcorr.extended_psf_image`
    does (the light a Kolmogorov PSF of ``fwhm_pix`` has beyond the stamp), zero inside each object's own
    stamp, out to where ``amp`` x wing falls below ``floor`` (image units per pixel; measure_sources' rule
    for single-frame neighbours, ``_WING_FLOOR`` of the background rms, at most ``_MAX_WING_HALF`` pixels).
    None when no wing reaches beyond its stamp."""
    x, y, amp = (np.atleast_1d(np.asarray(v, np.float64)) for v in (x, y, amp))
    idx = KOLMOGOROV_WING_INDEX
    a_w = kolmogorov_wing_amplitude(fwhm_pix, half + 0.5, (lam_over_diam_pix, obscuration))
    if not (np.isfinite(a_w) and a_w > 0):
        return None
    with np.errstate(divide="ignore"):
        reach = (amp * a_w / floor) ** (1.0 / idx) if floor > 0 else np.full(len(amp), float(_MAX_WING_HALF))
    rows = np.flatnonzero(np.isfinite(x) & np.isfinite(y) & (amp > 0) & (reach > half + 1))
    if not len(rows):
        return None
    ny, nx = shape
    out = np.zeros(shape)
    for r in rows:
        h = int(min(math.ceil(reach[r]), _MAX_WING_HALF))
        cx, cy = int(np.rint(x[r])), int(np.rint(y[r]))
        xa, xb, ya, yb = max(cx - h, 0), min(cx + h + 1, nx), max(cy - h, 0), min(cy + h + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb]
        w = a_w * np.maximum(np.hypot(xx - x[r], yy - y[r]), 1.0) ** (-idx)
        w[(np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)] = 0.0
        out[ya:yb, xa:xb] += amp[r] * w
    return out


def propagate_object_positions(ra, dec, pmra=None, pmdec=None, parallax=None, ref_mjd=51544.5, target_mjd=None):
    """Object positions (deg) at ``target_mjd`` (TAI): proper motion (mas/yr, pmra with
    cos dec) and parallax (mas) applied where known and non-zero (0 otherwise, i.e.
    NaN / None), by :func:`~lsst_prod.algorithms.astrometry.propagate_positions`.
    ``ref_mjd`` is the epoch of the positions (default J2000); without ``target_mjd``
    the positions are returned unchanged."""
    ra, dec = np.atleast_1d(np.asarray(ra, np.float64)).copy(), np.atleast_1d(np.asarray(dec, np.float64)).copy()
    if target_mjd is None:
        return ra, dec
    zero = np.zeros(len(ra))
    pmra, pmdec, parallax = (zero if v is None else np.nan_to_num(np.broadcast_to(np.asarray(v, np.float64), ra.shape))
                             for v in (pmra, pmdec, parallax))
    moving = (pmra != 0) | (pmdec != 0) | (parallax > 0)
    if moving.any():
        ref = np.broadcast_to(np.asarray(ref_mjd, np.float64), ra.shape)[moving]
        ra[moving], dec[moving] = propagate_positions(ra[moving], dec[moving], pmra[moving], pmdec[moving],
                                                      parallax[moving], ref, float(target_mjd))
    return ra, dec


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def match_objects_to_stars(obj_ra, obj_dec, obj_err_mas, star_ra, star_dec, star_err_mas, star_pmra, star_pmdec,
                           star_pm_err_mas_yr, star_epoch_mjd: float, object_epoch_mjd: float | None = None,
                           nsigma: float = 5.0, sys_err_mas: float = 10.0, search_arcsec: float = 2.0,
                           min_movers: int = 5, mover_snr: float = 5.0) -> dict[str, np.ndarray | float | int]:
    """One-to-one match of Objects (coadd positions) to stars with proper motions.

    Stars are given at ``star_epoch_mjd`` (deg; ``star_err_mas`` and ``star_pm_err_mas_yr``
    broadcast to (n_star, 2): East, North; pmra includes cos dec).  The Objects' positions
    (``obj_err_mas`` per axis) are flux-weighted means over the coadd's visits, i.e. at an
    effective epoch ``t_obj``.  Unless ``object_epoch_mjd`` is given, ``dt = t_obj - T0`` is
    derived from the data: every candidate pair (within ``search_arcsec``) with a star that
    moves significantly (|pm| > ``mover_snr`` x its error) gives ``dt_i = d.pm / |pm|^2`` from
    the offset ``d`` (Object minus star) when ``d`` lies along the motion (perpendicular
    residual < 3 sigma); ``dt`` is their weighted median (weights |pm|^2 / sigma^2), refined by
    the weighted mean within 3 sigma, with error 1 / sqrt(sum w).  Fewer than ``min_movers``
    such pairs: ``dt = 0`` (the stars' epoch), ``dt_err = 0``.

    A pair is accepted when chi2 = sum over East, North of (d - pm dt)^2 / var < ``nsigma``^2,
    var = obj_err^2 + star_err^2 + (pm_err dt)^2 + (pm dt_err)^2 + ``sys_err_mas``^2 (the
    frame difference between coadd and calibrated positions, unmodelled parallaxes); for a
    true pair chi2 follows chi2(2), so 5 sigma loses exp(-12.5) = 4e-6 of them.  Accepted pairs
    are assigned in increasing chi2, each Object and each star at most once.

    Returns ``star`` (per Object: index of its star, -1 for none), ``chi2`` (per Object, NaN
    without a star), ``dt_yr``, ``dt_err_yr``, ``n_movers`` (pairs that gave dt).
    """
    ora, odec = np.atleast_1d(np.asarray(obj_ra, float)), np.atleast_1d(np.asarray(obj_dec, float))
    sra, sdec = np.atleast_1d(np.asarray(star_ra, float)), np.atleast_1d(np.asarray(star_dec, float))
    n_o, n_s = len(ora), len(sra)
    oerr = np.broadcast_to(np.asarray(obj_err_mas, float), (n_o,))
    serr = np.broadcast_to(np.asarray(star_err_mas, float).reshape(-1, 2) if np.ndim(star_err_mas) == 2
                           else np.asarray(star_err_mas, float)[..., None], (n_s, 2))
    pm = np.column_stack([np.broadcast_to(np.asarray(star_pmra, float), (n_s,)),
                          np.broadcast_to(np.asarray(star_pmdec, float), (n_s,))])
    pm_err = np.broadcast_to(np.asarray(star_pm_err_mas_yr, float).reshape(-1, 2) if np.ndim(star_pm_err_mas_yr) == 2
                             else np.asarray(star_pm_err_mas_yr, float)[..., None], (n_s, 2))
    out = {"star": np.full(n_o, -1, np.int64), "chi2": np.full(n_o, np.nan), "dt_yr": 0.0, "dt_err_yr": 0.0,
           "n_movers": 0}
    good_o = np.isfinite(ora) & np.isfinite(odec) & np.isfinite(oerr)
    good_s = np.isfinite(sra) & np.isfinite(sdec) & np.isfinite(pm).all(1) & np.isfinite(serr).all(1)
    if not good_o.any() or not good_s.any():
        if object_epoch_mjd is not None:
            out["dt_yr"] = (float(object_epoch_mjd) - float(star_epoch_mjd)) / JULIAN_YEAR_DAYS
        return out

    def unit(ra, dec):
        r, d = np.deg2rad(ra), np.deg2rad(dec)
        return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])

    io, js = np.flatnonzero(good_o), np.flatnonzero(good_s)
    chord = 2 * np.sin(np.deg2rad(search_arcsec / 3600.0) / 2)
    pairs = cKDTree(unit(ora[io], odec[io])).sparse_distance_matrix(cKDTree(unit(sra[js], sdec[js])), chord,
                                                                      output_type="ndarray")
    i, j = io[pairs["i"]], js[pairs["j"]]
    xi, eta = gnomonic(ora[i], odec[i], sra[j], sdec[j])  # Object about its candidate star, East/North
    d = np.column_stack([xi, eta]) * MAS_PER_RAD
    var0 = oerr[i, None] ** 2 + serr[j] ** 2 + sys_err_mas**2  # (n_pairs, 2)

    if object_epoch_mjd is not None:
        dt, dt_err = (float(object_epoch_mjd) - float(star_epoch_mjd)) / JULIAN_YEAR_DAYS, 0.0
    else:
        dt, dt_err = 0.0, 0.0
        speed = np.hypot(pm[j, 0], pm[j, 1])
        speed_err = np.hypot(pm_err[j, 0], pm_err[j, 1])
        mov = (speed > mover_snr * speed_err) & (speed > 0)
        if mov.any():
            u = pm[j[mov]] / speed[mov, None]
            s2 = var0[mov].mean(1)
            t_i = (d[mov] * u).sum(1) / speed[mov]
            perp = np.abs(d[mov, 0] * u[:, 1] - d[mov, 1] * u[:, 0])
            along = perp**2 < 9 * s2
            t_i, w_i, sig_t = t_i[along], (speed[mov][along] ** 2 / s2[along]), np.sqrt(s2[along]) / speed[mov][along]
            if len(t_i) >= min_movers:
                dt0 = _weighted_median(t_i, w_i)
                near = np.abs(t_i - dt0) < 3 * sig_t
                if near.sum() >= min_movers:
                    dt = float(np.sum(w_i[near] * t_i[near]) / np.sum(w_i[near]))
                    dt_err = float(1.0 / np.sqrt(np.sum(w_i[near])))
                    out["n_movers"] = int(near.sum())
    out["dt_yr"], out["dt_err_yr"] = dt, dt_err

    resid = d - pm[j] * dt
    var = var0 + (pm_err[j] * dt) ** 2 + (pm[j] * dt_err) ** 2
    chi2 = (resid**2 / var).sum(1)
    ok = chi2 < nsigma**2
    i, j, chi2 = i[ok], j[ok], chi2[ok]
    order = np.argsort(chi2, kind="stable")
    used_o, used_s = np.zeros(n_o, bool), np.zeros(n_s, bool)
    for k in order:  # greedy in increasing chi2: one-to-one
        if used_o[i[k]] or used_s[j[k]]:
            continue
        used_o[i[k]] = used_s[j[k]] = True
        out["star"][i[k]], out["chi2"][i[k]] = j[k], chi2[k]
    return out
