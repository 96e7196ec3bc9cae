"""Astrometric calibration: reference-catalogue epoch propagation and a TAN-SIP WCS fit.

:func:`propagate_positions` moves catalogue stars (e.g. Gaia DR3 at J2016.0) to the
epoch of the exposure: proper motion plus annual parallax as seen from the Earth
(the geocentric astrometric place, without aberration or light deflection, which
the WCS absorbs as a plate-scale/offset term over a CCD).

:func:`fit_wcs` solves the WCS of one detector from its source centroids:

1. project the reference stars and the sources (through the raw-header WCS)
   onto the tangent plane at the detector centre;
2. find the similarity (pointing offset, rotation about the boresight, scale)
   between them: first by voting -- for each trial rotation, a 2-D histogram of
   the offsets between bright sources and reference stars has a sharp peak at
   the true offset -- and, if that candidate is not verified, by matching
   triangles of bright stars (:mod:`.pattern_match`).  Every candidate is
   verified: the number of matches must be far above the chance expectation
   (Poisson, times the number of hypotheses searched);
3. iterate: match sources to reference stars (mutual nearest within a radius that
   shrinks with the fit rms), fit the pixel -> tangent-plane mapping (a
   similarity of the header WCS with few stars, else a polynomial up to
   ``sip_order``, chosen by BIC) by linear least squares with sigma clipping;
4. re-centre the tangent point on the detector centre and express the polynomial
   as CD matrix + SIP A/B (and an AP/BP inverse fitted on a grid).

:func:`reserve_mask` picks the reference stars held out of the fit (the same in
every visit); :func:`match_to_reference` matches calibrated positions to them.
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
from .pattern_match import (
    Footprint,
    SearchSpace,
    Similarity,
    Verification,
    mutual_nearest,
    triangle_candidates,
    verify_transform,
)

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
    initial_rotation_deg: float = 0.0
    initial_scale: float = 1.0
    match_method: str = "vote"
    n_verified: int = 0
    n_expected_chance: float = float("nan")
    log10_false_alarm: float = float("nan")
    radial_distortion: bool = False
    n_params: int = 0


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


def _similarity_design(U, V):
    """Rows for xi (first n) and eta (last n) of the 4-parameter similarity (a, b, p, q):
    xi = a + p U - q V, eta = b + q U + p V."""
    one, zero = np.ones_like(U), np.zeros_like(U)
    return np.vstack([np.column_stack([one, zero, U, -V]), np.column_stack([zero, one, V, U])])


# WCS models, written (order, radial).  order 0: a similarity of the header-WCS plane coordinates
# (U, V) (4 parameters: offset, rotation, scale); order >= 1: a polynomial of that total order in the
# pixel variables (u, v) per axis.  radial: plus the third-order (Seidel) distortion of an axially
# symmetric telescope about the optical axis, c |W|^2 W with W the offset from the rotator axis (the
# header's reference point) in the header-WCS plane: ONE more parameter, which a handful of stars
# constrain, where a general quadratic + cubic needs 14 more per axis.
def _n_total(model: tuple[int, bool]) -> int:
    """Parameters of a model over both axes."""
    order, radial = model
    return (4 if order == 0 else 2 * len(_poly_terms(order))) + int(radial)


def _n_params(order: int) -> int:
    """Coefficients per axis (the similarity has 4 in all, i.e. 2 per axis)."""
    return 2 if order == 0 else len(_poly_terms(order))


#: a model is fitted only with at least this many more constraints (2 per match) than parameters
_MIN_DOF = 3


def _enough(n_matches: int, model: tuple[int, bool]) -> bool:
    return 2 * n_matches >= _n_total(model) + _MIN_DOF


def _candidate_models(max_order: int) -> list[tuple[int, bool]]:
    """Models up to polynomial order ``max_order``, fewest parameters first.  The radial term needs
    a cubic SIP to be written, hence ``max_order >= 3``; order 3 and above hold it already."""
    out: list[tuple[int, bool]] = []
    for order in range(0, max_order + 1):
        out.append((order, False))
        if max_order >= 3 and order <= 2:
            out.append((order, True))
    return sorted(out, key=_n_total)


def _model_design(model, u_, v_, U, V, R):
    """(2n, P) design of ``model`` for [xi; eta]; R (complex) the radial basis |W|^2 W (see above)."""
    order, radial = model
    if order == 0:
        design = _similarity_design(U, V)
    else:
        d = _poly_design(u_, v_, _poly_terms(order))
        z = np.zeros_like(d)
        design = np.vstack([np.hstack([d, z]), np.hstack([z, d])])
    if radial:
        design = np.column_stack([design, np.r_[R.real, R.imag]])
    return design


def _fit_model(model, u_, v_, U, V, R, xi, eta, nsigma: float, n_clip: int = 5):
    """Fit ``model`` with sigma clipping.  Returns (coef, kept mask)."""
    if model[0] >= 1 and not model[1]:
        cx, cy, keep = _fit_poly(u_, v_, xi, eta, _poly_terms(model[0]), nsigma, n_clip)
        return np.r_[cx, cy], keep
    design = _model_design(model, u_, v_, U, V, R)
    n = len(u_)
    keep = np.ones(n, bool)
    for _ in range(n_clip):
        kk = np.r_[keep, keep]
        coef, *_ = np.linalg.lstsq(design[kk], np.r_[xi, eta][kk], rcond=None)
        pxi, peta = _predict(model, coef, u_, v_, U, V, R)
        res = np.hypot(xi - pxi, eta - peta)
        sigma = 1.4826 * np.median(res[keep]) / 1.1774
        new_keep = res <= nsigma * max(sigma, 1e-4) * 1.1774
        if np.array_equal(new_keep, keep) or new_keep.sum() < max(_n_total(model) // 2 + 2, 4):
            break
        keep = new_keep
    return coef, keep


def _predict(model, coef, u_, v_, U, V, R):
    p = _model_design(model, u_, v_, U, V, R) @ coef
    n = len(p) // 2
    return p[:n], p[n:]


def _choose_model(u_, v_, U, V, R, xi, eta, max_order: int) -> tuple[int, bool]:
    """The model (<= max_order, at least as many matches as parameters over both axes, i.e. two
    constraints per parameter) with the lowest BIC."""
    best, best_bic = (0, False), np.inf
    for model in _candidate_models(max_order):
        if not _enough(len(u_), model):
            break
        coef, _ = _fit_model(model, u_, v_, U, V, R, xi, eta, nsigma=np.inf, n_clip=1)
        pxi, peta = _predict(model, coef, u_, v_, U, V, R)
        rss = float(np.sum((pxi - xi) ** 2 + (peta - eta) ** 2))
        n, k = 2 * len(u_), _n_total(model)
        # BIC, or the small-sample corrected AIC (AICc) where that penalty is the larger (a few
        # constraints per parameter: BIC alone then prefers models that fit the noise)
        penalty = max(k * np.log(n), 2 * k + 2 * k * (k + 1) / max(n - k - 1, 1e-9))
        bic = n * np.log(max(rss, 1e-30) / n) + penalty
        if bic < best_bic:
            best, best_bic = model, bic
    return best


def _model_to_poly(model, coef, initial_wcs: WCS, plane, radial_basis, centre, scale, shape):
    """Coefficients (cx, cy) in (u, v) of the polynomial that equals the model in ``plane``: the
    model itself for a plain polynomial, else a fit on a grid over the detector (exact: U, V are the
    header WCS's, linear in pixels for TAN or a polynomial of the SIP's order with the camera's optical
    distortion, and the radial term is a cubic in U, V)."""
    order, radial = model
    if order >= 1 and not radial:
        n = len(coef) // 2
        return coef[:n], coef[n:]
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 13), np.linspace(0, ny - 1, 13))
    gx, gy = gx.ravel(), gy.ravel()
    U, V = _project(*initial_wcs.all_pix2world(gx, gy, 0), *plane)
    gu, gv = (gx - centre[0]) / scale, (gy - centre[1]) / scale
    pxi, peta = _predict(model, coef, gu, gv, U, V, radial_basis(U, V, plane))
    design = _poly_design(gu, gv, _poly_terms(_poly_order_of(model, initial_wcs)))
    cx, *_ = np.linalg.lstsq(design, pxi, rcond=None)
    cy, *_ = np.linalg.lstsq(design, peta, rcond=None)
    return cx, cy


def _poly_order_of(model, initial_wcs: WCS) -> int:
    """Order of the pixel polynomial that writes ``model`` exactly (the header's SIP order): a model
    relative to the header WCS (a similarity of it, or with the radial term) keeps that WCS's own SIP
    (the camera's optical distortion, :func:`~lsst_prod.camera.with_optical_distortion`)."""
    order, radial = model
    if order >= 1 and not radial:
        return order
    sip = initial_wcs.sip
    return max(order, 3 if radial else 1, int(sip.a_order) if sip is not None else 0)


def reserve_mask(ref_id: np.ndarray, fraction: float, salt: int = 0x5EED_A57E) -> np.ndarray:
    """Deterministic reservation of reference stars: True for about ``fraction`` of ids.

    A 64-bit integer hash (splitmix64 finaliser) of the id, mapped to [0, 1):
    the same star is reserved in every visit, on every machine.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(ref_id).astype(np.int64).view(np.uint64) ^ np.uint64(salt)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


def match_to_reference(ra, dec, ref_ra, ref_dec, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-unique nearest (source index, reference index) pairs within ``radius_arcsec`` on the sky."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    ref_ra, ref_dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    if len(ra) == 0 or len(ref_ra) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ok = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    ra0, dec0 = float(np.median(ref_ra)), float(np.median(ref_dec))
    sxi, seta = _project(ra[ok], dec[ok], ra0, dec0)
    rxi, reta = _project(ref_ra, ref_dec, ra0, dec0)
    si, ri = mutual_nearest(sxi, seta, cKDTree(np.column_stack([rxi, reta])), radius_arcsec)
    return ok[si], ri


#: each failed search widens the pointing search radius by this factor (80" -> 4' -> 12')
SEARCH_WIDENING = 3.0


def search_radii(first_arcsec: float, max_arcsec: float | None) -> list[float]:
    """Pointing search radii tried in turn: ``first``, then x ``SEARCH_WIDENING`` up to ``max`` (its last)."""
    radii = [float(first_arcsec)]
    if max_arcsec is None:
        return radii
    while radii[-1] < float(max_arcsec) - 1e-9:
        radii.append(min(radii[-1] * SEARCH_WIDENING, float(max_arcsec)))
    return radii


def _pattern_windows(rx, ry, n_r: int, centre: complex, search_r: float, r_det: float, tiled: bool):
    """Index arrays of reference stars (brightness-ordered) to match triangles against.  First radius:
    windows in brightness rank.  Wider radii: the ``n_r`` brightest within 1.5 detector half-diagonals of
    each node of a grid (spacing one half-diagonal) over the disk the detector centre can reach."""
    n = len(rx)
    if not tiled:
        starts = [0] + [s0 for s0 in (n_r // 2, n_r, 2 * n_r, 4 * n_r) if s0 + n_r // 2 < n]
        return [np.arange(s0, min(s0 + n_r, n)) for s0 in starts]
    tree = cKDTree(np.column_stack([rx, ry]))
    k = int(np.ceil(search_r / r_det))
    grid = np.arange(-k, k + 1) * r_det
    gx, gy = np.meshgrid(grid, grid)
    d = np.hypot(gx, gy).ravel()
    order = np.argsort(d, kind="stable")  # nearest the nominal position first
    out = []
    for i in order:
        if d[i] > search_r + r_det:
            continue
        idx = np.sort(np.asarray(tree.query_ball_point([centre.real + gx.ravel()[i], centre.imag + gy.ravel()[i]],
                                                      1.5 * r_det), dtype=np.int64))[:n_r]
        if len(idx) >= 3:
            out.append(idx)
    return out


def _vote(bx, by, rx, ry, pivot: complex, radius: float, rotations: np.ndarray, bin_size: float = 0.5):
    """Offset vote for each trial rotation about ``pivot``; the best (significance, similarity, n_peak)."""
    tree_r = cKDTree(np.column_stack([rx, ry]))
    nb = int(np.ceil(2 * radius / bin_size))
    best = (-np.inf, Similarity(), 0)
    zs = bx + 1j * by
    for theta in rotations:
        z = np.exp(1j * theta) * (zs - pivot) + pivot
        pairs = cKDTree(np.column_stack([z.real, z.imag])).sparse_distance_matrix(tree_r, radius, output_type="ndarray")
        if len(pairs) == 0:
            continue
        dxi, deta = rx[pairs["j"]] - z.real[pairs["i"]], ry[pairs["j"]] - z.imag[pairs["i"]]
        ix = np.clip(((dxi + radius) / bin_size).astype(np.int64), 0, nb - 1)
        iy = np.clip(((deta + radius) / bin_size).astype(np.int64), 0, nb - 1)
        hist = np.bincount(ix * nb + iy, minlength=nb * nb).reshape(nb, nb).astype(float)
        smooth = ndimage.uniform_filter(hist, size=3, mode="constant") * 9  # counts in 1.5" boxes
        i, j = np.unravel_index(np.argmax(smooth), smooth.shape)
        background = len(pairs) * (3 * bin_size) ** 2 / (np.pi * radius**2)  # chance pairs per box
        significance = (smooth[i, j] - background) / np.sqrt(background + 1.0)
        if significance > best[0]:
            peak = np.array([(i + 0.5) * bin_size - radius, (j + 0.5) * bin_size - radius])
            close = np.hypot(dxi - peak[0], deta - peak[1]) < 2.0
            shift = complex(np.median(dxi[close]), np.median(deta[close]))
            best = (float(significance), Similarity.about(float(theta), shift, pivot), int(close.sum()))
    return best


def fit_wcs(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    initial_wcs: WCS,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    ref_mag: np.ndarray,
    search_radius_arcsec: float = 80.0,
    sip_order: int = 3,
    detector_shape: tuple[int, int] | None = None,
    n_bright: int = 200,
    min_matches: int = 5,
    nsigma: float = 3.0,
    max_iter: int = 12,
    max_rotation_deg: float = 1.5,
    max_scale_error: float = 0.01,
    match_tolerance_arcsec: float = 1.5,
    max_false_alarm: float = 1e-6,
    method: str = "auto",
    max_search_radius_arcsec: float | None = None,
) -> AstrometricSolution:
    """Fit a TAN-SIP WCS of one detector to a reference catalogue.

    Parameters
    ----------
    x, y, flux:
        Source centroids (0-based pixels) and fluxes (any unit; only used to rank).
    initial_wcs:
        TAN WCS from the raw header.  Its reference point (CRVAL) is taken as the
        rotator axis (the boresight, for raw headers).
    ref_ra, ref_dec, ref_mag:
        Reference stars at the epoch of the exposure (deg, deg, mag).
    search_radius_arcsec, max_rotation_deg, max_scale_error:
        Largest pointing error (shift of the boresight), rotator error (about
        the boresight) and plate-scale error searched.
    sip_order:
        Largest total order of the pixel -> sky polynomial (1 = plain TAN); the
        order used is the one with the lowest BIC among those with at least two
        matches per coefficient (order 0: a similarity of the header WCS).
    detector_shape:
        (ny, nx); default ``initial_wcs.pixel_shape`` or the sources' extent.
    match_tolerance_arcsec, max_false_alarm:
        A candidate solution is accepted when, matching within the tolerance, the
        probability of as many matches by chance (times the number of independent
        hypotheses searched) is below ``max_false_alarm``.
    method:
        ``"auto"`` (rotation-scanned offset vote, then triangle pattern matching
        if the vote's candidate is not verified), ``"vote"`` or ``"pattern"``.
    max_search_radius_arcsec:
        When no candidate is verified within ``search_radius_arcsec``, the search is repeated
        with the radius widened x3 (:func:`search_radii`) up to this (None: no widening).  The
        false-alarm test of each widened search counts every hypothesis of the wider disk
        (n_hypotheses grows as the radius squared), so a larger radius needs more matches,
        or smaller residuals, to be accepted.

    Raises :class:`~lsst_prod.errors.AlgorithmError` (metadata ``n_matched``, and
    for an unverified match ``n_expected``, ``log10_false_alarm``) when no
    verified solution with at least ``min_matches`` matches exists.
    """
    if method not in ("auto", "vote", "pattern"):
        raise ValueError(f"method must be 'auto', 'vote' or 'pattern', not {method!r}")
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
    src_idx = src_idx[np.argsort(-flux[src_idx], kind="stable")]  # brightest first
    sra, sdec = initial_wcs.all_pix2world(x[src_idx], y[src_idx], 0)
    sxi, seta = _project(sra, sdec, ra0, dec0)
    rxi, reta = _project(ref_ra, ref_dec, ra0, dec0)
    # the detector in the header-WCS plane, and the rotator axis
    cxi, ceta = _project(*initial_wcs.all_pix2world([0, nx - 1, 0, nx - 1], [0, 0, ny - 1, ny - 1], 0), ra0, dec0)
    corners = cxi + 1j * ceta
    footprint = Footprint(corners[0], corners[1] - corners[0], corners[2] - corners[0])
    pivot = complex(*_project(*(float(v) for v in initial_wcs.wcs.crval), ra0, dec0))
    r_det = footprint.half_diagonal
    d_axis = abs(footprint.centre - pivot)  # a rotation about the axis also moves the detector by theta * d_axis
    theta_max = np.deg2rad(max_rotation_deg)
    tol = float(match_tolerance_arcsec)
    if len(src_idx) < min_matches:
        raise AlgorithmError("too few sources or reference stars for astrometry", n_matched=0,
                             n_sources=int(len(src_idx)), n_refs=int(len(ref_ra)))
    ref_fin = np.isfinite(rxi) & np.isfinite(reta)
    radii = search_radii(search_radius_arcsec, max_search_radius_arcsec)
    tried: list[tuple[str, Verification]] = []
    accepted: tuple[str, Verification] | None = None
    mag_lim = None  # the vote's reference stars: as deep as the 4 n_bright brightest near the detector
    for search_r in radii:
        # reference stars that can land on the detector under any searched hypothesis
        margin = search_r + theta_max * (d_axis + r_det) + max_scale_error * r_det + tol + 2.0
        ref_ok = ref_fin & (np.abs(rxi) < np.abs(cxi).max() + margin) & (np.abs(reta) < np.abs(ceta).max() + margin)
        ref_idx = np.flatnonzero(ref_ok)
        ref_idx = ref_idx[np.argsort(np.nan_to_num(ref_mag[ref_idx], nan=99.0), kind="stable")]  # brightest first
        if len(ref_idx) < min_matches:
            if search_r == radii[-1]:
                raise AlgorithmError("too few sources or reference stars for astrometry", n_matched=0,
                                     n_sources=int(len(src_idx)), n_refs=int(len(ref_idx)))
            continue
        rx, ry = rxi[ref_idx], reta[ref_idx]
        ref_tree = cKDTree(np.column_stack([rx, ry]))
        # the detector centre moves by up to the pointing error plus theta * d_axis: every hypothesis of the
        # widest radius searched so far counts against chance (the smaller disks are inside it)
        search = SearchSpace(search_r + theta_max * d_axis, theta_max, max_scale_error, r_det)

        def verify(transform: Similarity) -> Verification:
            return verify_transform(transform, sxi, seta, rx, ry, footprint, tolerance=tol, search=search,
                                    max_false_alarm=max_false_alarm, min_matches=min_matches, ref_tree=ref_tree)

        # --- 1. a verified similarity: offset vote over trial rotations, then triangles ----
        if method in ("auto", "vote"):
            step = min(1.0 / max(r_det, 1.0), 2 * theta_max + 1e-12)  # blur <= 0.5" at the corners
            n_rot = int(np.ceil(theta_max / step))
            rotations = np.linspace(-n_rot * step, n_rot * step, 2 * n_rot + 1) if n_rot else np.zeros(1)
            radius = search_r + 0.5 * step * d_axis + 2.0
            nb = min(n_bright, len(sxi))
            n_vr = 4 * n_bright  # the brightest sources' counterparts, over a region a few times the detector
            if mag_lim is None:
                mag_lim = float(np.nan_to_num(ref_mag[ref_idx[min(n_vr, len(ref_idx)) - 1]], nan=99.0))
            # a wider search keeps the reference density (stars brighter than the first radius' limit)
            n_use = max(n_vr, int(np.searchsorted(np.nan_to_num(ref_mag[ref_idx], nan=99.0), mag_lim, side="right")))
            significance, transform, _ = _vote(sxi[:nb], seta[:nb], rx[:n_use], ry[:n_use], pivot, radius, rotations)
            if np.isfinite(significance):
                result = verify(transform)
                tried.append(("vote", result))
                if result.accepted:
                    accepted = ("vote", result)
        if accepted is None and method in ("auto", "pattern"):
            # The brightest sources against windows of reference stars in brightness rank: the
            # brightest reference stars are often saturated, hence missing from the sources.  Beyond the
            # first radius, in tiles of the detector's size over the searched disk (the brightest stars
            # of a region 50x the detector's are mostly off it).
            n_s, n_r = 30, 50
            for sel in _pattern_windows(rx, ry, n_r, footprint.centre, search_r, r_det, tiled=search_r != radii[0]):
                candidates = triangle_candidates(
                    sxi[:n_s], seta[:n_s], rx[sel], ry[sel], tolerance=tol,
                    max_rotation_rad=theta_max, max_scale_error=max_scale_error, max_shift=search_r + tol,
                    pivot=pivot, radius=r_det,
                )  # fmt: skip
                for transform, _support in candidates:
                    result = verify(transform)
                    tried.append(("pattern", result))
                    if result.accepted:  # the most supported verified candidate
                        accepted = ("pattern", result)
                        break
                if accepted is not None:
                    break
        if accepted is not None:
            break
    if accepted is None:
        best = min(tried, key=lambda t: (t[1].log10_false_alarm, -t[1].n_matched))[1] if tried else None
        raise AlgorithmError(
            "no verified astrometric match (pointing offset, rotation) found",
            n_matched=int(best.n_matched) if best else 0,
            n_expected=round(float(best.n_expected), 3) if best else float("nan"),
            log10_false_alarm=round(float(best.log10_false_alarm), 2) if best else 0.0,
            n_sources=int(len(src_idx)), n_refs=int(len(ref_idx)), methods="+".join(sorted({t[0] for t in tried})),
            search_radius_arcsec=float(radii[-1]),
        )  # fmt: skip
    method_used, verified = accepted
    transform = verified.transform

    # --- 2. match and fit, shrinking the radius -------------------------------------
    u_, v_ = (x[src_idx] - xc) / scale, (y[src_idx] - yc) / scale
    U, V = sxi, seta
    r_scale = max(d_axis + r_det, 1.0)  # |W| <= ~1 over the detector

    def radial_basis(U_, V_, plane):
        """|W|^2 W, W = (position - rotator axis) / r_scale in the header-WCS plane about ``plane``."""
        axis = complex(*_project(*(float(v) for v in initial_wcs.wcs.crval), *plane))
        w = (np.asarray(U_) + 1j * np.asarray(V_) - axis) / r_scale
        return w * np.abs(w) ** 2 * r_scale

    R = radial_basis(U, V, (ra0, dec0))
    pred_xi, pred_eta = transform.apply(sxi, seta)
    radius = 2.0
    model = (1, False) if _enough(verified.n_matched, (1, False)) else (0, False)
    prev = None
    for _ in range(max_iter):
        ms, mr = mutual_nearest(pred_xi, pred_eta, ref_tree, radius)
        fit_model = model
        if len(ms) < min_matches or not _enough(len(ms), fit_model):
            raise AlgorithmError("too few astrometric matches", n_matched=int(len(ms)))
        coef, keep = _fit_model(fit_model, u_[ms], v_[ms], U[ms], V[ms], R[ms], rx[mr], ry[mr], nsigma)
        pred_xi, pred_eta = _predict(fit_model, coef, u_, v_, U, V, R)
        res = np.hypot(pred_xi[ms] - rx[mr], pred_eta[ms] - ry[mr])[keep]
        rms = float(np.sqrt(np.mean(res**2)))
        radius = float(np.clip(5.0 * rms, 0.5, 2.0))
        k = keep
        target = _choose_model(u_[ms[k]], v_[ms[k]], U[ms[k]], V[ms[k]], R[ms[k]], rx[mr[k]], ry[mr[k]], sip_order)
        state = (fit_model, tuple(ms[keep]), tuple(mr[keep]))
        if fit_model == target and state == prev:
            break
        prev, model = state, target
    ms, mr, model = ms[keep], mr[keep], fit_model
    order = model[0]
    if len(ms) < min_matches:
        raise AlgorithmError("too few astrometric matches after clipping", n_matched=int(len(ms)))

    # --- 3. re-centre the tangent point on the detector centre; build TAN-SIP ------
    poly_order = _poly_order_of(model, initial_wcs)
    terms = _poly_terms(poly_order)
    crval = (ra0, dec0)
    mra, mdec = ref_ra[ref_idx[mr]], ref_dec[ref_idx[mr]]
    cx, cy = _model_to_poly(model, coef, initial_wcs, crval, radial_basis, (xc, yc), scale, detector_shape)
    for _ in range(3):
        xi_c, eta_c = cx[0], cy[0]  # sky position of the detector centre in the current plane
        crval = tuple(float(v) for v in _deproject(xi_c, eta_c, *crval))
        mxi, meta = _project(mra, mdec, *crval)
        mU, mV = _project(sra[ms], sdec[ms], *crval)
        design = _model_design(model, u_[ms], v_[ms], mU, mV, radial_basis(mU, mV, crval))
        c0, *_ = np.linalg.lstsq(design, np.r_[mxi, meta], rcond=None)
        cx, cy = _model_to_poly(model, c0, initial_wcs, crval, radial_basis, (xc, yc), scale, detector_shape)
    header = _tan_sip_header(cx, cy, terms, poly_order, crval, (xc, yc), scale, detector_shape)
    wcs = WCS(fits.Header(header))
    fxi, feta = _project(*wcs.all_pix2world(x[src_idx[ms]], y[src_idx[ms]], 0), *crval)
    mxi, meta = _project(mra, mdec, *crval)
    dist = np.hypot(fxi - mxi, feta - meta)  # residuals through the final astropy WCS
    shift = transform.shift_at(0j)  # of the detector centre
    return AstrometricSolution(
        wcs=wcs,
        header=header,
        n_matched=int(len(ms)),
        rms_arcsec=float(np.sqrt(np.mean(dist**2))),
        offset_mean_arcsec=float(np.mean(dist)),
        offset_std_arcsec=float(np.std(dist)),
        matched_src_index=src_idx[ms].astype(np.int64),
        matched_ref_index=ref_idx[mr].astype(np.int64),
        initial_offset_arcsec=(float(shift.real), float(shift.imag)),
        sip_order=int(poly_order if model[1] else order),
        radial_distortion=bool(model[1]),
        n_params=int(_n_total(model)),
        initial_rotation_deg=transform.rotation_deg,
        initial_scale=transform.scale,
        match_method=method_used,
        n_verified=int(verified.n_matched),
        n_expected_chance=float(verified.n_expected),
        log10_false_alarm=float(verified.log10_false_alarm),
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
