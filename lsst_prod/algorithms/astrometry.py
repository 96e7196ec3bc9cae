"""Astrometric calibration: reference-catalogue epoch propagation and a TAN-SIP WCS fit.

:func:`propagate_positions` moves catalogue stars (e.g. Gaia DR3 at J2016.0) to the
epoch of the exposure: proper motion plus annual parallax as seen from the Earth
(the geocentric astrometric place, without aberration or light deflection, which
the WCS absorbs as a plate-scale/offset term over a CCD).

:func:`fit_wcs` solves the WCS of one detector from its source centroids:

1. project the reference stars and the sources (through the raw-header WCS)
   onto the tangent plane at the detector centre;
2. find the pointing error by voting: a 2-D histogram of the offsets between
   every bright source and every bright reference star within the search radius
   has a sharp peak at the true offset (robust to distortion and rotation, which
   only blur the peak by ~1");
3. iterate: match sources to reference stars (mutual nearest within a radius that
   shrinks with the fit rms), fit the pixel -> tangent-plane mapping as a
   polynomial by linear least squares (order 1 first, then ``sip_order``) with
   sigma clipping;
4. re-centre the tangent point on the detector centre and express the polynomial
   as CD matrix + SIP A/B (and an AP/BP inverse fitted on a grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import get_body_barycentric
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from ..errors import AlgorithmError

MAS = np.pi / 180.0 / 3.6e6  # radians per milliarcsecond
JULIAN_YEAR_DAYS = 365.25


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray):
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    cr, sr, cd, sd = np.cos(ra), np.sin(ra), np.cos(dec), np.sin(dec)
    pos = np.stack([cd * cr, cd * sr, sd])
    east = np.stack([-sr, cr, np.zeros_like(ra)])
    north = np.stack([-sd * cr, -sd * sr, cd])
    return pos, east, north


def propagate_positions(
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    pmra_mas_yr: np.ndarray,
    pmdec_mas_yr: np.ndarray,
    parallax_mas: np.ndarray,
    ref_epoch_mjd: np.ndarray | float,
    target_mjd: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) at ``target_mjd`` (TAI) of stars given at ``ref_epoch_mjd``.

    ``pmra_mas_yr`` includes the cos(dec) factor.  The star moves on a straight
    line in space (zero radial velocity), so the direction seen from the Earth at
    barycentric position ``b`` (AU, astropy's built-in ephemeris) is along
    ``u + mu * dt - parallax * b`` with ``u`` the catalogue direction, ``mu`` the
    proper-motion vector (rad/yr) and ``parallax`` in radians.  Missing (NaN)
    proper motions and non-positive parallaxes are treated as zero.
    """
    pos, east, north = _unit_vectors(np.asarray(ra_deg, float), np.asarray(dec_deg, float))
    pmra = np.nan_to_num(np.asarray(pmra_mas_yr, float)) * MAS
    pmdec = np.nan_to_num(np.asarray(pmdec_mas_yr, float)) * MAS
    plx = np.nan_to_num(np.asarray(parallax_mas, float))
    plx = np.where(plx > 0, plx, 0.0) * MAS
    dt = (float(target_mjd) - np.asarray(ref_epoch_mjd, float)) / JULIAN_YEAR_DAYS
    earth = get_body_barycentric("earth", Time(float(target_mjd), format="mjd", scale="tai"))
    b = earth.xyz.to_value(u.au).reshape(3, 1) if pos.ndim == 2 else earth.xyz.to_value(u.au)
    vec = pos + (pmra * east + pmdec * north) * dt - plx * b
    ra = np.rad2deg(np.arctan2(vec[1], vec[0])) % 360.0
    dec = np.rad2deg(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
    return ra, dec


def _project(ra_deg, dec_deg, ra0_deg: float, dec0_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic standard coordinates (xi east, eta north) in arcsec about (ra0, dec0)."""
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    ra0, dec0 = np.deg2rad(ra0_deg), np.deg2rad(dec0_deg)
    cosc = np.sin(dec) * np.sin(dec0) + np.cos(dec) * np.cos(dec0) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cosc
    eta = (np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(ra - ra0)) / cosc
    return np.rad2deg(xi) * 3600.0, np.rad2deg(eta) * 3600.0


def _deproject(xi_arcsec, eta_arcsec, ra0_deg: float, dec0_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_project`."""
    xi, eta = np.deg2rad(np.asarray(xi_arcsec) / 3600.0), np.deg2rad(np.asarray(eta_arcsec) / 3600.0)
    ra0, dec0 = np.deg2rad(ra0_deg), np.deg2rad(dec0_deg)
    denom = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.arctan2(xi, denom)
    dec = np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denom))
    return np.rad2deg(ra) % 360.0, np.rad2deg(dec)


def _poly_terms(order: int, min_degree: int = 0) -> list[tuple[int, int]]:
    return [(p, d - p) for d in range(min_degree, order + 1) for p in range(d, -1, -1)]


def _poly_design(u_: np.ndarray, v_: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    return np.stack([u_**p * v_**q for p, q in terms], axis=1)


@dataclass(frozen=True)
class AstrometricSolution:
    """Result of :func:`fit_wcs`.

    ``wcs`` is an astropy WCS (TAN-SIP; use ``pixel_to_world``/``all_pix2world``,
    0-based pixels), ``header`` the same as FITS cards.  Residuals are on-sky
    distances between matched sources and reference stars (arcsec) after the fit.
    """

    wcs: WCS = field(repr=False)
    header: dict[str, Any] = field(repr=False)
    n_matched: int
    rms_arcsec: float
    offset_mean_arcsec: float
    offset_std_arcsec: float
    matched_src_index: np.ndarray = field(repr=False)
    matched_ref_index: np.ndarray = field(repr=False)
    initial_offset_arcsec: tuple[float, float] = (0.0, 0.0)
    sip_order: int = 0


def _match(sx, sy, tree: cKDTree, radius: float):
    """Mutual-unique nearest neighbours within ``radius``: (src index, ref index)."""
    dist, ref = tree.query(np.column_stack([sx, sy]), distance_upper_bound=radius)
    src = np.flatnonzero(np.isfinite(dist))
    ref, dist = ref[src], dist[src]
    order = np.argsort(dist)
    _, first = np.unique(ref[order], return_index=True)  # closest source wins each reference
    keep = order[first]
    return src[keep], ref[keep]


def _fit_poly(u_, v_, xi, eta, terms, nsigma: float, n_clip: int = 5):
    """Least-squares polynomial (u, v) -> (xi, eta) with sigma clipping; returns coefs and kept mask."""
    design = _poly_design(u_, v_, terms)
    keep = np.ones(len(u_), bool)
    for _ in range(n_clip):
        cx, *_ = np.linalg.lstsq(design[keep], xi[keep], rcond=None)
        cy, *_ = np.linalg.lstsq(design[keep], eta[keep], rcond=None)
        res = np.hypot(xi - design @ cx, eta - design @ cy)
        sigma = 1.4826 * np.median(res[keep]) / 1.1774  # median of a 2-D Rayleigh = 1.1774 sigma
        new_keep = res <= nsigma * max(sigma, 1e-4) * 1.1774
        if np.array_equal(new_keep, keep) or new_keep.sum() < len(terms) + 2:
            break
        keep = new_keep
    return cx, cy, keep


def _choose_order(u_, v_, xi, eta, max_order: int) -> int:
    """Polynomial order (<= max_order, >= 2 matches per coefficient) with the lowest BIC."""
    best, best_bic = 1, np.inf
    for order in range(1, max_order + 1):
        design = _poly_design(u_, v_, _poly_terms(order))
        if len(u_) < 2 * design.shape[1]:
            break
        rss = sum(float(np.sum((design @ np.linalg.lstsq(design, t, rcond=None)[0] - t) ** 2)) for t in (xi, eta))
        n, k = 2 * len(u_), 2 * design.shape[1]
        bic = n * np.log(max(rss, 1e-30) / n) + k * np.log(n)
        if bic < best_bic:
            best, best_bic = order, bic
    return best


def fit_wcs(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    initial_wcs: WCS,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    ref_mag: np.ndarray,
    search_radius_arcsec: float = 10.0,
    sip_order: int = 3,
    detector_shape: tuple[int, int] | None = None,
    n_bright: int = 200,
    min_matches: int = 10,
    nsigma: float = 3.0,
    max_iter: int = 12,
) -> AstrometricSolution:
    """Fit a TAN-SIP WCS of one detector to a reference catalogue.

    Parameters
    ----------
    x, y, flux:
        Source centroids (0-based pixels) and fluxes (any unit; only used to rank).
    initial_wcs:
        TAN WCS from the raw header (pointing error up to ~search radius).
    ref_ra, ref_dec, ref_mag:
        Reference stars at the epoch of the exposure (deg, deg, mag).
    search_radius_arcsec:
        Largest pointing error searched by the offset vote.
    sip_order:
        Largest total order of the pixel -> sky polynomial (1 = plain TAN); the
        order used is the one with the lowest BIC among those with at least two
        matches per coefficient.
    detector_shape:
        (ny, nx); default ``initial_wcs.pixel_shape`` or the sources' extent.

    Raises :class:`~lsst_prod.errors.AlgorithmError` (metadata ``n_matched``) with
    fewer than ``min_matches`` matches.
    """
    x, y, flux = np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)
    ref_ra, ref_dec, ref_mag = np.asarray(ref_ra, float), np.asarray(ref_dec, float), np.asarray(ref_mag, float)
    if detector_shape is None:
        if initial_wcs.pixel_shape is not None:
            detector_shape = (int(initial_wcs.pixel_shape[1]), int(initial_wcs.pixel_shape[0]))
        else:
            detector_shape = (int(np.ceil(y.max())) + 1, int(np.ceil(x.max())) + 1) if len(x) else (1, 1)
    ny, nx = detector_shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    scale = max(xc, yc, 1.0)  # polynomial variables u, v in [-1, 1]
    ra0, dec0 = (float(v) for v in initial_wcs.all_pix2world([[xc, yc]], 0)[0])
    ok_src = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    src_idx = np.flatnonzero(ok_src)
    sra, sdec = initial_wcs.all_pix2world(x[src_idx], y[src_idx], 0)
    sxi, seta = _project(sra, sdec, ra0, dec0)
    rxi, reta = _project(ref_ra, ref_dec, ra0, dec0)
    # reference stars that can land on the detector: its tangent-plane box plus the search radius
    cxi, ceta = _project(*initial_wcs.all_pix2world([0, nx - 1, 0, nx - 1], [0, 0, ny - 1, ny - 1], 0), ra0, dec0)
    margin = search_radius_arcsec + 2.0
    ref_ok = np.isfinite(rxi) & np.isfinite(reta) & (np.abs(rxi) < np.abs(cxi).max() + margin)
    ref_ok &= np.abs(reta) < np.abs(ceta).max() + margin
    ref_idx = np.flatnonzero(ref_ok)
    if len(src_idx) < min_matches or len(ref_idx) < min_matches:
        raise AlgorithmError(
            "too few sources or reference stars for astrometry",
            n_matched=0, n_sources=int(len(src_idx)), n_refs=int(len(ref_idx)),
        )  # fmt: skip

    # --- 1. pointing offset by voting -------------------------------------------------
    bs = np.argsort(-flux[src_idx])[:n_bright]
    br = ref_idx[np.argsort(np.nan_to_num(ref_mag[ref_idx], nan=99.0))[: max(n_bright, len(bs))]]
    dxi = rxi[br][None, :] - sxi[bs][:, None]
    deta = reta[br][None, :] - seta[bs][:, None]
    near = np.hypot(dxi, deta) < search_radius_arcsec
    bin_size = 0.5
    nb = int(np.ceil(2 * search_radius_arcsec / bin_size))
    hist, edges, _ = np.histogram2d(
        dxi[near], deta[near], bins=nb, range=[[-search_radius_arcsec, search_radius_arcsec]] * 2
    )
    smooth = ndimage.uniform_filter(hist, size=3, mode="constant") * 9  # counts in 1.5" boxes
    i, j = np.unravel_index(np.argmax(smooth), smooth.shape)
    peak = np.array([edges[i] + bin_size / 2, edges[j] + bin_size / 2])
    close = near & (np.hypot(dxi - peak[0], deta - peak[1]) < 2.0)
    background = float(np.mean(smooth))  # chance pairs per box
    significance = (smooth[i, j] - background) / np.sqrt(background + 1.0)
    if close.sum() < min_matches or significance < 6.0:
        raise AlgorithmError(
            "no consistent pointing offset found", n_matched=int(close.sum()), significance=float(significance)
        )
    offset = np.array([np.median(dxi[close]), np.median(deta[close])])

    # --- 2. match and fit, shrinking the radius -------------------------------------
    tree = cKDTree(np.column_stack([rxi[ref_idx], reta[ref_idx]]))
    u_, v_ = (x[src_idx] - xc) / scale, (y[src_idx] - yc) / scale
    pred_xi, pred_eta = sxi + offset[0], seta + offset[1]
    radius, order, prev = 2.0, 1, None  # first pass: 2" radius, linear fit
    for _ in range(max_iter):
        ms, mr = _match(pred_xi, pred_eta, tree, radius)
        fit_order = order
        if len(ms) < max(min_matches, len(_poly_terms(fit_order)) + 2):
            raise AlgorithmError("too few astrometric matches", n_matched=int(len(ms)))
        terms = _poly_terms(fit_order)
        cx, cy, keep = _fit_poly(u_[ms], v_[ms], rxi[ref_idx[mr]], reta[ref_idx[mr]], terms, nsigma)
        design_all = _poly_design(u_, v_, terms)
        pred_xi, pred_eta = design_all @ cx, design_all @ cy
        res = np.hypot(pred_xi[ms] - rxi[ref_idx[mr]], pred_eta[ms] - reta[ref_idx[mr]])[keep]
        rms = float(np.sqrt(np.mean(res**2)))
        radius = float(np.clip(5.0 * rms, 0.5, 2.0))
        target = _choose_order(u_[ms[keep]], v_[ms[keep]], rxi[ref_idx[mr[keep]]], reta[ref_idx[mr[keep]]], sip_order)
        state = (fit_order, tuple(ms[keep]), tuple(mr[keep]))
        if fit_order == target and state == prev:
            break
        prev, order = state, target
    ms, mr, order = ms[keep], mr[keep], fit_order
    if len(ms) < min_matches:
        raise AlgorithmError("too few astrometric matches after clipping", n_matched=int(len(ms)))

    # --- 3. re-centre the tangent point on the detector centre; build TAN-SIP ------
    crval = (ra0, dec0)
    mra, mdec = ref_ra[ref_idx[mr]], ref_dec[ref_idx[mr]]
    for _ in range(3):
        xi_c, eta_c = cx[0], cy[0]  # sky position of the detector centre in the current plane
        crval = tuple(float(v) for v in _deproject(xi_c, eta_c, *crval))
        mxi, meta = _project(mra, mdec, *crval)
        design = _poly_design(u_[ms], v_[ms], terms)
        cx, *_ = np.linalg.lstsq(design, mxi, rcond=None)
        cy, *_ = np.linalg.lstsq(design, meta, rcond=None)
    header = _tan_sip_header(cx, cy, terms, order, crval, (xc, yc), scale, detector_shape)
    wcs = WCS(fits.Header(header))
    fxi, feta = _project(*wcs.all_pix2world(x[src_idx[ms]], y[src_idx[ms]], 0), *crval)
    mxi, meta = _project(mra, mdec, *crval)
    dist = np.hypot(fxi - mxi, feta - meta)  # residuals through the final astropy WCS
    return AstrometricSolution(
        wcs=wcs,
        header=header,
        n_matched=int(len(ms)),
        rms_arcsec=float(np.sqrt(np.mean(dist**2))),
        offset_mean_arcsec=float(np.mean(dist)),
        offset_std_arcsec=float(np.std(dist)),
        matched_src_index=src_idx[ms].astype(np.int64),
        matched_ref_index=ref_idx[mr].astype(np.int64),
        initial_offset_arcsec=(float(offset[0]), float(offset[1])),
        sip_order=int(order),
    )


def _tan_sip_header(cx, cy, terms, order, crval, centre, scale, shape) -> dict[str, Any]:
    """FITS cards of the TAN(-SIP) WCS equivalent to the tangent-plane polynomial (arcsec)."""
    coef = {t: (a / scale ** sum(t) / 3600.0, b / scale ** sum(t) / 3600.0) for t, a, b in zip(terms, cx, cy)}
    cd = np.array([[coef[(1, 0)][0], coef[(0, 1)][0]], [coef[(1, 0)][1], coef[(0, 1)][1]]])
    header: dict[str, Any] = {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN-SIP" if order > 1 else "RA---TAN",
        "CTYPE2": "DEC--TAN-SIP" if order > 1 else "DEC--TAN",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": crval[0],
        "CRVAL2": crval[1],
        "CRPIX1": centre[0] + 1.0,
        "CRPIX2": centre[1] + 1.0,
        "CD1_1": float(cd[0, 0]),
        "CD1_2": float(cd[0, 1]),
        "CD2_1": float(cd[1, 0]),
        "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
        "NAXIS1": int(shape[1]),
        "NAXIS2": int(shape[0]),
    }
    if order <= 1:
        return header
    cdinv = np.linalg.inv(cd)
    high = _poly_terms(order, 2)
    header["A_ORDER"] = header["B_ORDER"] = order
    for p, q in high:
        a, b = cdinv @ np.array(coef[(p, q)])
        header[f"A_{p}_{q}"], header[f"B_{p}_{q}"] = float(a), float(b)
    # inverse (AP, BP) of one order higher, fitted on a grid over the detector
    ny, nx = shape
    gu, gv = np.meshgrid(np.linspace(0, nx - 1, 40) - centre[0], np.linspace(0, ny - 1, 40) - centre[1])
    gu, gv = gu.ravel(), gv.ravel()
    fu = gu + sum(header[f"A_{p}_{q}"] * gu**p * gv**q for p, q in high)
    fv = gv + sum(header[f"B_{p}_{q}"] * gu**p * gv**q for p, q in high)
    inv_terms = _poly_terms(order + 1, 1)
    s = max(centre[0], centre[1], 1.0)
    design = _poly_design(fu / s, fv / s, inv_terms)
    ap, *_ = np.linalg.lstsq(design, gu - fu, rcond=None)
    bp, *_ = np.linalg.lstsq(design, gv - fv, rcond=None)
    header["AP_ORDER"] = header["BP_ORDER"] = order + 1
    for (p, q), a, b in zip(inv_terms, ap, bp):
        header[f"AP_{p}_{q}"], header[f"BP_{p}_{q}"] = float(a / s ** (p + q)), float(b / s ** (p + q))
    return header
