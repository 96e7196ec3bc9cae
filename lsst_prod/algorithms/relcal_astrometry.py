"""Relative astrometric calibration: a polynomial correction per ccdvisit, position + proper motion per star.

Model, for the measurement of star ``s`` in ccdvisit ``k`` (epoch ``t_k``)::

    (xi, eta)_obs + P_k(u, v) = proj_k(star s at t_k)

``(xi, eta)_obs`` is the single-frame position projected (gnomonic) about the ccdvisit's
centre, ``P_k`` a polynomial of total order ``order`` (1 by default: offset, rotation,
scale, shear) in the normalised detector coordinates ``u, v`` with coefficients in mas,
and the star moves on ``position(T0) + pm * (t - T0) + parallax * (parallax factor at
t)``, with ``T0 = stars.epoch_mjd`` and the parallax fixed (reference catalogue value, else
0).  The star unknowns are offsets from a nominal track (``AstrometricStars``): East/North
position offsets at ``T0`` (mas) and proper-motion offsets (mas/yr), so the equations are
linear to far below a micro-arcsecond (the nominal is within ~1 arcsec of the truth):

    y = (xi, eta)_obs - proj_k(nominal at t_k) = J (dpos + dpm * (t_k - T0)) - P_k(u, v)

``J`` is the 2x2 derivative of the projection with respect to East/North at the star.
Reference stars add priors: their catalogue position at the catalogue epoch (through the
same linear motion) and proper motion, with the catalogue errors.  Weak priors
(``pm_prior_mas_yr`` on every star's proper-motion offset, ``coeff_prior_mas`` on the
coefficients) keep stars seen at a single epoch and ccdvisits with no path to a
reference star solvable.  Normal equations, MPI decomposition and solve: see
:mod:`lsst_prod.algorithms.relcal_normals` and :mod:`~lsst_prod.algorithms.relcal_photometry`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .astrometry import propagate_positions
from .relcal_match import MatchResult
from .relcal_normals import (
    JULIAN_YEAR_DAYS,
    MAS_PER_RAD,
    CcdVisits,
    NormalsLayout,
    PairIndex,
    PartialNormals,
    ResidualStats,
    accumulate_normals,
    check_ccdvisit_counts,
    normalised_pixels,
    poly_basis,
    poly_terms,
    schur_solve,
)


# --------------------------------------------------------------------------- spherical helpers


def _frames(ra_deg, dec_deg):
    ra, dec = np.deg2rad(np.asarray(ra_deg, float)), np.deg2rad(np.asarray(dec_deg, float))
    cr, sr, cd, sd = np.cos(ra), np.sin(ra), np.cos(dec), np.sin(dec)
    pos = np.stack([cd * cr, cd * sr, sd], axis=-1)
    east = np.stack([-sr, cr, np.zeros_like(ra)], axis=-1)
    north = np.stack([-sd * cr, -sd * sr, cd], axis=-1)
    return pos, east, north


def gnomonic(ra_deg, dec_deg, ra0_deg, dec0_deg) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (xi East, eta North; radians) about (ra0, dec0); arrays broadcast."""
    ra, dec = np.deg2rad(np.asarray(ra_deg, float)), np.deg2rad(np.asarray(dec_deg, float))
    ra0, dec0 = np.deg2rad(np.asarray(ra0_deg, float)), np.deg2rad(np.asarray(dec0_deg, float))
    dra = ra - ra0
    cosc = np.sin(dec) * np.sin(dec0) + np.cos(dec) * np.cos(dec0) * np.cos(dra)
    xi = np.cos(dec) * np.sin(dra) / cosc
    eta = (np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(dra)) / cosc
    return xi, eta


def inverse_gnomonic(xi, eta, ra0_deg, dec0_deg) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`gnomonic` (degrees out)."""
    xi, eta = np.asarray(xi, float), np.asarray(eta, float)
    ra0, dec0 = np.deg2rad(np.asarray(ra0_deg, float)), np.deg2rad(np.asarray(dec0_deg, float))
    denom = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.arctan2(xi, denom)
    dec = np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denom))
    return np.rad2deg(ra) % 360.0, np.rad2deg(dec)


def _projection_jacobian(ra_deg, dec_deg, ra0_deg, dec0_deg) -> np.ndarray:
    """(n, 2, 2): d(xi, eta) / d(East, North displacement at the star)."""
    s, es, ns = _frames(ra_deg, dec_deg)
    p0, e0, n0 = _frames(ra0_deg, dec0_deg)
    p0, e0, n0 = (np.broadcast_to(a, s.shape) for a in (p0, e0, n0))
    D = np.sum(s * p0, -1)
    xi, eta = np.sum(s * e0, -1) / D, np.sum(s * n0, -1) / D
    J = np.empty(D.shape + (2, 2))
    for j, d in enumerate((es, ns)):
        pd = np.sum(p0 * d, -1)
        J[..., 0, j] = (np.sum(e0 * d, -1) - xi * pd) / D
        J[..., 1, j] = (np.sum(n0 * d, -1) - eta * pd) / D
    return J


# --------------------------------------------------------------------------- stars


@dataclass(frozen=True, eq=False)
class AstrometricStars:
    """Global star table: nominal track, parallax, reference priors (every rank holds the same).

    ``ra, dec`` (deg) barycentric at ``epoch_mjd``, ``pmra`` (with cos dec) / ``pmdec``
    (mas/yr), ``parallax`` (mas, fixed); ``ref_index`` (-1 = none); priors:
    ``ref_epoch_mjd``, ``ref_offset`` (S, 2) catalogue position minus the nominal track at
    the catalogue epoch (East, North; mas), ``ref_pos_err`` (S, 2) mas, ``ref_pm_offset``
    (S, 2) and ``ref_pm_err`` (S, 2) mas/yr; NaN errors = no prior.
    """

    epoch_mjd: float
    ra: np.ndarray = field(repr=False)
    dec: np.ndarray = field(repr=False)
    pmra: np.ndarray = field(repr=False)
    pmdec: np.ndarray = field(repr=False)
    parallax: np.ndarray = field(repr=False)
    ref_index: np.ndarray = field(repr=False)
    ref_epoch_mjd: np.ndarray = field(repr=False)
    ref_offset: np.ndarray = field(repr=False)
    ref_pos_err: np.ndarray = field(repr=False)
    ref_pm_offset: np.ndarray = field(repr=False)
    ref_pm_err: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.ra)


def make_astrometric_stars(
    match: MatchResult,
    epoch_mjd: float,
    ref_ra: np.ndarray | None = None,
    ref_dec: np.ndarray | None = None,
    ref_ra_err: np.ndarray | None = None,
    ref_dec_err: np.ndarray | None = None,
    ref_pmra: np.ndarray | None = None,
    ref_pmdec: np.ndarray | None = None,
    ref_pmra_err: np.ndarray | None = None,
    ref_pmdec_err: np.ndarray | None = None,
    ref_parallax: np.ndarray | None = None,
    ref_epoch_mjd: np.ndarray | float | None = None,
    *,
    ref_error_floor_mas: float = 0.0,
) -> AstrometricStars:
    """Nominal tracks and priors: reference stars from the catalogue (ra/dec deg, their
    errors mas on ra cos dec and dec, pm mas/yr, parallax mas), the others at their mean
    observed position with zero proper motion and parallax.  ``epoch_mjd`` (T0) is best
    near the middle of the observations (the stage uses the mean ccdvisit epoch)."""
    S = match.n_stars
    T0 = float(epoch_mjd)
    ra, dec = match.star_ra.astype(float).copy(), match.star_dec.astype(float).copy()
    pmra, pmdec, plx = np.zeros(S), np.zeros(S), np.zeros(S)
    ref_epoch = np.full(S, np.nan)
    ref_offset, ref_pos_err = np.zeros((S, 2)), np.full((S, 2), np.nan)
    ref_pm_offset, ref_pm_err = np.zeros((S, 2)), np.full((S, 2), np.nan)
    r = match.star_ref_index
    has = np.flatnonzero(r >= 0)
    if len(has) and ref_ra is not None:
        rr = r[has]

        def col(a, default=np.nan):
            return np.full(len(rr), default) if a is None else np.asarray(a, float)[rr]

        epoch = np.broadcast_to(np.asarray(T0 if ref_epoch_mjd is None else ref_epoch_mjd, float),
                                (len(ref_ra),))[rr]
        c_ra, c_dec = col(ref_ra), col(ref_dec)
        c_pmra, c_pmdec = col(ref_pmra), col(ref_pmdec)
        c_plx = col(ref_parallax, 0.0)
        pm_ok = np.isfinite(c_pmra) & np.isfinite(c_pmdec)
        pmra[has], pmdec[has] = np.where(pm_ok, c_pmra, 0.0), np.where(pm_ok, c_pmdec, 0.0)
        plx[has] = np.where(np.isfinite(c_plx) & (c_plx > 0), c_plx, 0.0)
        zero = np.zeros(len(rr))
        # nominal = the catalogue star moved (barycentric: no parallax) to T0
        n_ra, n_dec = propagate_positions(c_ra, c_dec, pmra[has], pmdec[has], zero, epoch, T0)
        ra[has], dec[has] = n_ra, n_dec
        # nominal track back at the catalogue epoch vs the catalogue position (~0 by construction)
        off = np.zeros((len(rr), 2))
        for t in np.unique(epoch):
            sel = epoch == t
            b_ra, b_dec = propagate_positions(n_ra[sel], n_dec[sel], pmra[has][sel], pmdec[has][sel], zero[sel],
                                              T0, float(t))
            xi, eta = gnomonic(c_ra[sel], c_dec[sel], b_ra, b_dec)
            off[sel] = np.column_stack([xi, eta]) * MAS_PER_RAD
        ref_epoch[has] = epoch
        ref_offset[has] = off
        pos_err = np.column_stack([col(ref_ra_err), col(ref_dec_err)])
        ref_pos_err[has] = np.hypot(pos_err, ref_error_floor_mas)
        pm_err = np.column_stack([col(ref_pmra_err), col(ref_pmdec_err)])
        ref_pm_err[has] = np.where(pm_ok[:, None], pm_err, np.nan)
    return AstrometricStars(T0, ra, dec, pmra, pmdec, plx, r.astype(np.int64).copy(), ref_epoch, ref_offset,
                            ref_pos_err, ref_pm_offset, ref_pm_err)


# --------------------------------------------------------------------------- parts and normals


@dataclass(frozen=True, eq=False)
class AstrometricPart:
    """Linearised astrometric measurements of a subset of ccdvisits (one MPI rank's share).

    Rows sorted by (ccdvisit, star); ``y`` (n, 2) observed minus nominal (xi, eta) in mas,
    ``sigma`` (n, 2) mas with the floor, ``star_design`` (n, 2, 4) = [J, J dt], ``basis``
    (n, n_terms) at the normalised pixel position, ``row`` index into the input arrays.
    """

    layout: NormalsLayout = field(repr=False)
    order: int
    ccdvisit_index: np.ndarray = field(repr=False)
    star_index: np.ndarray = field(repr=False)
    pair_index: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    sigma: np.ndarray = field(repr=False)
    star_design: np.ndarray = field(repr=False)
    basis: np.ndarray = field(repr=False)
    used: np.ndarray = field(repr=False)
    row: np.ndarray = field(repr=False)
    n_input: int = 0

    @property
    def n_measurements(self) -> int:
        return len(self.row)


def make_astrometric_part(
    ccdvisits: CcdVisits,
    stars: AstrometricStars,
    pairs: PairIndex,
    ccdvisit_index: np.ndarray,
    star_index: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    ra_err: np.ndarray,
    dec_err: np.ndarray,
    *,
    order: int = 1,
    error_floor_mas: float = 1.0,
) -> AstrometricPart:
    """Source rows (pixels; single-frame ra/dec in deg; raErr/decErr in deg on the sky)
    of some ccdvisits -> :class:`AstrometricPart`, linearised about the nominal tracks."""
    if not 1 <= order <= 3:
        raise ValueError("astrometric correction order must be 1, 2 or 3")
    k = np.asarray(ccdvisit_index, np.int64)
    s = np.asarray(star_index, np.int64)
    arrs = [np.asarray(a, float) for a in (x, y, ra, dec, ra_err, dec_err)]
    ok = (s >= 0) & np.all([np.isfinite(a) for a in arrs], axis=0) & (arrs[4] > 0) & (arrs[5] > 0)
    rows = np.flatnonzero(ok)
    rows = rows[np.lexsort((s[rows], k[rows]))]
    kk, ss = k[rows], s[rows]
    px, py, sra, sdec, era, edec = (a[rows] for a in arrs)
    t = ccdvisits.mjd[kk]
    nom_ra, nom_dec = np.empty(len(rows)), np.empty(len(rows))
    by_epoch = np.argsort(t, kind="stable")
    epochs, starts = np.unique(t[by_epoch], return_index=True)
    for tt, sel in zip(epochs, np.split(by_epoch, starts[1:])):
        st = ss[sel]
        nom_ra[sel], nom_dec[sel] = propagate_positions(stars.ra[st], stars.dec[st], stars.pmra[st], stars.pmdec[st],
                                                        stars.parallax[st], stars.epoch_mjd, float(tt))
    c_ra, c_dec = ccdvisits.center_ra[kk], ccdvisits.center_dec[kk]
    xo, eo = gnomonic(sra, sdec, c_ra, c_dec)
    xn, en = gnomonic(nom_ra, nom_dec, c_ra, c_dec)
    yy = np.column_stack([xo - xn, eo - en]) * MAS_PER_RAD
    J = _projection_jacobian(nom_ra, nom_dec, c_ra, c_dec)
    dt = (t - stars.epoch_mjd) / JULIAN_YEAR_DAYS
    star_design = np.concatenate([J, J * dt[:, None, None]], axis=2)
    sigma = np.hypot(np.column_stack([era, edec]) * 3.6e6, error_floor_mas)
    u, v = normalised_pixels(ccdvisits, kk, px, py)
    basis = poly_basis(u, v, order)
    layout = NormalsLayout(pairs, 2 * basis.shape[1], 4)
    return AstrometricPart(layout, int(order), kk, ss, pairs.lookup(kk, ss), yy, sigma, star_design, basis,
                           np.ones(len(rows), bool), rows, int(len(k)))


def _ccd_design(basis: np.ndarray) -> np.ndarray:
    n, nt = basis.shape
    A = np.zeros((n, 2, 2 * nt))
    A[:, 0, :nt] = -basis
    A[:, 1, nt:] = -basis
    return A


def accumulate_astrometric_normal_equations(part: AstrometricPart) -> PartialNormals:
    """Normal-equation sums of the part's used measurements (any subset of ccdvisits)."""
    return accumulate_normals(part.layout, part.ccdvisit_index, part.star_index, part.pair_index,
                              _ccd_design(part.basis), part.star_design, 1.0 / part.sigma**2, part.y, part.used)


# --------------------------------------------------------------------------- solution


@dataclass(frozen=True)
class AstrometricCorrection:
    """The correction of one ccdvisit: add ``P(u, v)`` (mas) to the single-frame (xi, eta)
    about (``center_ra``, ``center_dec``), ``u = (x - x0) / scale``, ``v = (y - y0) / scale``."""

    ccdvisit_id: int
    order: int
    center_ra: float
    center_dec: float
    x0: float
    y0: float
    scale: float
    xi_coeffs: tuple[float, ...]
    eta_coeffs: tuple[float, ...]


def apply_astrometric_correction(coeffs: AstrometricCorrection, x, y, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """Corrected (ra, dec) in deg of sources at pixel (x, y) with single-frame (ra, dec) in deg."""
    u = (np.asarray(x, float) - coeffs.x0) / coeffs.scale
    v = (np.asarray(y, float) - coeffs.y0) / coeffs.scale
    b = poly_basis(u, v, coeffs.order)
    xi, eta = gnomonic(ra, dec, coeffs.center_ra, coeffs.center_dec)
    xi = xi + (b @ np.asarray(coeffs.xi_coeffs)) / MAS_PER_RAD
    eta = eta + (b @ np.asarray(coeffs.eta_coeffs)) / MAS_PER_RAD
    return inverse_gnomonic(xi, eta, coeffs.center_ra, coeffs.center_dec)


def remove_astrometric_correction(correction: AstrometricCorrection, x, y, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`apply_astrometric_correction`: the single-frame-WCS (ra, dec) (deg) whose
    calibrated position is (ra, dec), for sources at pixel (x, y) of that ccdvisit.  The correction
    P(u, v) (a few to a hundred mas) is subtracted from the standard coordinates; it varies over
    thousands of pixels, so (x, y) found from the calibrated position is exact to far below a
    micro-arcsecond."""
    c = correction
    b = poly_basis((np.asarray(x, float) - c.x0) / c.scale, (np.asarray(y, float) - c.y0) / c.scale, c.order)
    xi, eta = gnomonic(ra, dec, c.center_ra, c.center_dec)
    xi = xi - (b @ np.asarray(c.xi_coeffs, float)) / MAS_PER_RAD
    eta = eta - (b @ np.asarray(c.eta_coeffs, float)) / MAS_PER_RAD
    return inverse_gnomonic(xi, eta, c.center_ra, c.center_dec)


class CorrectedWcs:
    """A calexp's single-frame WCS with relcal's correction of its ccdvisit applied: the pixel <->
    sky mapping of the calibrated frame, with the two astropy methods the resampling kernels call
    (``all_pix2world``, ``all_world2pix``; origin 0 or 1 as astropy's).  ``sip`` is the wrapped
    WCS's (the resampling uses ``all_world2pix`` when it is set) or True."""

    def __init__(self, wcs, correction: AstrometricCorrection):
        self.wcs, self.correction = wcs, correction
        self.sip = getattr(wcs, "sip", None) or True

    def all_pix2world(self, x, y, origin: int, **_kw):
        x, y = np.asarray(x, float), np.asarray(y, float)
        ra, dec = self.wcs.all_pix2world(x, y, origin)
        return apply_astrometric_correction(self.correction, x - origin, y - origin, ra, dec)

    def all_world2pix(self, ra, dec, origin: int, **kw):
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        x, y = self.wcs.all_world2pix(ra, dec, origin, **kw)
        for _ in range(2):  # the correction at the pixel found, then once more at the corrected pixel
            ra_sf, dec_sf = remove_astrometric_correction(self.correction, x - origin, y - origin, ra, dec)
            x, y = self.wcs.all_world2pix(ra_sf, dec_sf, origin, **kw)
        return x, y


def correction_from_dict(c: dict) -> AstrometricCorrection:
    """The correction as relcal writes it (``relcal_solution``'s ``astromCorrection`` JSON)."""
    return AstrometricCorrection(int(c["ccdvisit_id"]), int(c["order"]), float(c["center_ra"]), float(c["center_dec"]),
                                 float(c["x0"]), float(c["y0"]), float(c["scale"]),
                                 tuple(float(v) for v in c["xi_coeffs"]), tuple(float(v) for v in c["eta_coeffs"]))


@dataclass(frozen=True, eq=False)
class AstrometricSolution:
    """Result of :func:`solve_astrometric` / :func:`fit_astrometry`.

    Per ccdvisit: ``coeffs_xi``/``coeffs_eta`` (K, n_terms) mas (terms of
    ``relcal_normals.poly_terms(order)``), ``coeffs_err`` (K, 2 n_terms) marginal errors or
    None, tangent points ``center_ra/center_dec`` and pixel normalisation ``x0, y0,
    scale`` (use :meth:`correction` + :func:`apply_astrometric_correction`),
    ``ccdvisit_n_stars``, ``ccdvisit_tied_to_reference``.  Per star (NaN without used
    measurements): ``star_ra, star_dec`` (deg at ``epoch_mjd``, barycentric),
    ``star_pmra, star_pmdec`` (mas/yr), ``star_parallax`` (mas, fixed),
    ``star_pos_err``/``star_pm_err`` (S, 2) conditional on the ccdvisit corrections,
    ``star_params`` (S, 4) the solved offsets from the nominal tracks, ``star_n_measurements``.
    Scalars as :class:`~lsst_prod.algorithms.relcal_photometry.PhotometricSolution`, with
    ``rms_mas`` the rms 2-D residual of the used measurements (mas).
    """

    order: int
    epoch_mjd: float
    ccdvisit_id: np.ndarray = field(repr=False)
    coeffs_xi: np.ndarray = field(repr=False)
    coeffs_eta: np.ndarray = field(repr=False)
    coeffs_err: np.ndarray | None = field(repr=False)
    center_ra: np.ndarray = field(repr=False)
    center_dec: np.ndarray = field(repr=False)
    x0: np.ndarray = field(repr=False)
    y0: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    ccdvisit_n_stars: np.ndarray = field(repr=False)
    ccdvisit_tied_to_reference: np.ndarray = field(repr=False)
    star_ra: np.ndarray = field(repr=False)
    star_dec: np.ndarray = field(repr=False)
    star_pmra: np.ndarray = field(repr=False)
    star_pmdec: np.ndarray = field(repr=False)
    star_parallax: np.ndarray = field(repr=False)
    star_pos_err: np.ndarray = field(repr=False)
    star_pm_err: np.ndarray = field(repr=False)
    star_params: np.ndarray = field(repr=False)
    star_n_measurements: np.ndarray = field(repr=False)
    chi2: float
    chi2_reference: float
    dof: int
    n_stars: int
    n_reference_stars: int
    n_measurements: int
    n_clipped: int = 0
    rms_mas: float = float("nan")
    n_iterations: int = 1
    clipped: np.ndarray | None = field(default=None, repr=False)
    method: str = ""
    #: per ccdvisit: too few stars for the full polynomial, terms above order 1 held at 0
    ccdvisit_reduced: np.ndarray | None = field(default=None, repr=False)

    @property
    def reduced_chi2(self) -> float:
        return (self.chi2 + self.chi2_reference) / max(self.dof, 1)

    def with_residuals(self, stats: ResidualStats, n_iterations: int, clipped: np.ndarray | None = None):
        """This solution with the figures of the residual pass over the rows it used (summed
        over all parts/ranks): exact ``chi2``, ``rms_mas``, ``n_clipped``, ``n_iterations``."""
        return dataclasses.replace(self, chi2=stats.chi2, rms_mas=stats.rms, n_iterations=int(n_iterations),
                                   n_clipped=stats.n_rows - stats.n_used, clipped=clipped)

    def correction(self, ccdvisit_index: int) -> AstrometricCorrection:
        k = int(ccdvisit_index)
        return AstrometricCorrection(int(self.ccdvisit_id[k]), self.order, float(self.center_ra[k]),
                                     float(self.center_dec[k]), float(self.x0[k]), float(self.y0[k]),
                                     float(self.scale[k]), tuple(map(float, self.coeffs_xi[k])),
                                     tuple(map(float, self.coeffs_eta[k])))

    def to_dict(self) -> dict[str, float | int]:
        return {"chi2": self.chi2, "chi2_reference": self.chi2_reference, "dof": self.dof, "n_stars": self.n_stars,
                "n_reference_stars": self.n_reference_stars, "n_measurements": self.n_measurements,
                "n_clipped": self.n_clipped, "rms_mas": self.rms_mas, "n_iterations": self.n_iterations,
                "n_ccdvisits": int(len(self.ccdvisit_id)),
                "n_ccdvisits_untied": int(np.sum(~self.ccdvisit_tied_to_reference))}


def _star_priors(stars: AstrometricStars, pm_prior_mas_yr: float):
    """Information (S, 4, 4), information-weighted mean (S, 4) and the prior rows for chi2."""
    S = len(stars)
    info, vec = np.zeros((S, 4, 4)), np.zeros((S, 4))
    info[:, 2, 2] = info[:, 3, 3] = 1.0 / pm_prior_mas_yr**2
    dT = np.nan_to_num((stars.ref_epoch_mjd - stars.epoch_mjd) / JULIAN_YEAR_DAYS)
    rows = []  # (design (S,4), y (S,), w (S,)) of each reference prior equation
    for c in range(2):
        a = np.zeros((S, 4))
        a[:, c], a[:, c + 2] = 1.0, dT
        rows.append((a, stars.ref_offset[:, c], stars.ref_pos_err[:, c]))
        a = np.zeros((S, 4))
        a[:, c + 2] = 1.0
        rows.append((a, stars.ref_pm_offset[:, c], stars.ref_pm_err[:, c]))
    out = []
    for a, yv, err in rows:
        ok = np.isfinite(err) & (err > 0)
        w = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
        yv = np.where(ok, yv, 0.0)
        info += w[:, None, None] * a[:, :, None] * a[:, None, :]
        vec += (w * yv)[:, None] * a
        out.append((a, yv, w))
    return info, vec, out


def solve_astrometric(
    normals: PartialNormals,
    ccdvisits: CcdVisits,
    stars: AstrometricStars,
    *,
    pm_prior_mas_yr: float = 100.0,
    coeff_prior_mas: float = 1000.0,
    min_stars_per_ccdvisit: int | None = None,
    min_stars_linear: int | None = None,
    reduced_prior_mas: float = 1.0,
    method: str = "auto",
    compute_errors: bool = False,
) -> AstrometricSolution:
    """Solve for the ccdvisit corrections and the star positions/proper motions.

    A ccdvisit with fewer than ``min_stars_per_ccdvisit`` (default: twice the number of
    polynomial terms) used stars cannot constrain the full polynomial: its terms above order 1
    are held at 0 by a prior of ``reduced_prior_mas`` (its single-frame distortion is kept), so
    it is still calibrated by an offset and a linear map.  Raises :class:`ThinCcdVisits` (an
    AlgorithmError) if a ccdvisit has fewer than ``min_stars_linear`` stars (default twice the 3
    terms of order 1, at most ``min_stars_per_ccdvisit``; at order <= 1 that minimum alone).
    ``compute_errors``: marginal coefficient errors (costly for the sparse path).
    """
    L = normals.layout
    K, S, p = L.pairs.n_ccdvisits, L.pairs.n_stars, L.n_ccd_params
    nt = p // 2
    order = int(round((np.sqrt(8 * nt + 1) - 3) / 2))
    if K != len(ccdvisits) or S != len(stars):
        raise ValueError("normals, ccdvisit table and star table disagree in size")
    full_min = min_stars_per_ccdvisit or 2 * nt
    linear_terms = len(poly_terms(1))
    reduced_min = min(full_min, min_stars_linear or 2 * linear_terms) if order > 1 else full_min
    check_ccdvisit_counts(normals, ccdvisits.ccdvisit_id, reduced_min, "astrometric")
    prior = np.full((K, p), 1.0 / coeff_prior_mas**2)
    reduced = np.rint(normals.ccd_count) < full_min
    if order > 1 and reduced.any():
        high = np.array([p_ + q_ > 1 for p_, q_ in poly_terms(order)] * 2)
        prior[np.ix_(reduced, high)] = 1.0 / reduced_prior_mas**2
    info, vec, prior_rows = _star_priors(stars, pm_prior_mas_yr)
    has_ref = np.isfinite(stars.ref_pos_err).all(axis=1) & (normals.star_count > 0)
    res = schur_solve(normals, ccd_prior_info=prior, star_prior_matrix=info,
                      star_prior_vector=vec, star_anchor=has_ref, method=method, ccd_cov=compute_errors)
    observed = normals.star_count > 0
    phi = res.star_params
    chi2_ref = 0.0
    for a, yv, w in prior_rows:
        chi2_ref += float(np.sum((w * (yv - np.sum(a * phi, axis=1)) ** 2)[has_ref]))
    # new star positions: nominal + (East, North) offset at T0
    ra, dec = inverse_gnomonic(phi[:, 0] / MAS_PER_RAD, phi[:, 1] / MAS_PER_RAD, stars.ra, stars.dec)
    nan = np.where(observed, 1.0, np.nan)
    cov = res.star_cov
    pos_err = np.sqrt(np.stack([cov[:, 0, 0], cov[:, 1, 1]], axis=1)) * nan[:, None]
    pm_err = np.sqrt(np.stack([cov[:, 2, 2], cov[:, 3, 3]], axis=1)) * nan[:, None]
    n_meas = normals.n_measurements
    held = int(reduced.sum()) * (p - 2 * linear_terms) if order > 1 else 0  # terms held at 0 by their prior
    dof = int(2 * n_meas + 4 * has_ref.sum() - K * p + held - 4 * observed.sum())
    x0, y0, scale = ccdvisits.pixel_normalisation()
    coeffs_err = None
    if res.ccd_cov is not None:
        coeffs_err = np.sqrt(np.diagonal(res.ccd_cov, axis1=1, axis2=2))
    return AstrometricSolution(
        order=order, epoch_mjd=stars.epoch_mjd, ccdvisit_id=ccdvisits.ccdvisit_id.copy(),
        coeffs_xi=res.ccd_params[:, :nt], coeffs_eta=res.ccd_params[:, nt:], coeffs_err=coeffs_err,
        center_ra=ccdvisits.center_ra.copy(), center_dec=ccdvisits.center_dec.copy(), x0=x0, y0=y0, scale=scale,
        ccdvisit_reduced=reduced if order > 1 else np.zeros(K, bool),
        ccdvisit_n_stars=np.rint(normals.ccd_count).astype(np.int64), ccdvisit_tied_to_reference=res.ccd_tied,
        star_ra=ra * nan, star_dec=dec * nan, star_pmra=(stars.pmra + phi[:, 2]) * nan,
        star_pmdec=(stars.pmdec + phi[:, 3]) * nan, star_parallax=stars.parallax.copy(), star_pos_err=pos_err,
        star_pm_err=pm_err, star_params=phi, star_n_measurements=np.rint(normals.star_count).astype(np.int64),
        chi2=float(res.chi2_data), chi2_reference=chi2_ref, dof=dof, n_stars=int(observed.sum()),
        n_reference_stars=int(has_ref.sum()), n_measurements=n_meas, method=res.method,
    )  # fmt: skip


def astrometric_residuals(part: AstrometricPart, solution: AstrometricSolution) -> np.ndarray:
    """(n, 2) residuals (xi, eta; mas) of the part's rows: observed + correction - model."""
    coeffs = np.concatenate([solution.coeffs_xi, solution.coeffs_eta], axis=1)[part.ccdvisit_index]
    model = np.einsum("nmj,nj->nm", part.star_design, solution.star_params[part.star_index])
    model += np.einsum("nmi,ni->nm", _ccd_design(part.basis), coeffs)
    return part.y - model


def clip_astrometric_part(
    part: AstrometricPart, solution: AstrometricSolution, nsigma: float = 4.0
) -> tuple[AstrometricPart, ResidualStats]:
    """New ``used`` flags: (r_xi/s_xi)^2 + (r_eta/s_eta)^2 <= (nsigma * max(1, sqrt(chi2/dof)))^2."""
    r = astrometric_residuals(part, solution)
    scale = max(1.0, float(np.sqrt(solution.reduced_chi2)))
    with np.errstate(invalid="ignore"):
        new_used = np.sum((r / part.sigma) ** 2, axis=1) <= (nsigma * scale) ** 2
    ru = r[part.used]
    stats = ResidualStats(part.n_measurements, int(part.used.sum()), int((~new_used).sum()),
                          int((new_used != part.used).sum()), float(np.sum(ru**2)),
                          float(np.sum((ru / part.sigma[part.used]) ** 2)))
    return dataclasses.replace(part, used=new_used), stats


def fit_astrometry(
    parts: AstrometricPart | Sequence[AstrometricPart],
    ccdvisits: CcdVisits,
    stars: AstrometricStars,
    *,
    nsigma: float = 4.0,
    max_iter: int = 10,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
    **solve_kwargs,
) -> AstrometricSolution:
    """Iterate accumulate (over the parts) / solve / clip until no flag changes (see fit_photometry)."""
    parts = [parts] if isinstance(parts, AstrometricPart) else list(parts)
    want_errors = solve_kwargs.pop("compute_errors", False)  # only for the final solution
    for it in range(1, max_iter + 1):
        normals = sum(accumulate_astrometric_normal_equations(pt) for pt in parts)
        if allreduce is not None:  # MPI: this rank's parts are summed with every other rank's
            normals = PartialNormals.from_arrays(allreduce(normals.to_arrays()), normals.layout)
        sol = solve_astrometric(normals, ccdvisits, stars, compute_errors=False, **solve_kwargs)
        clipped = [clip_astrometric_part(pt, sol, nsigma) for pt in parts]
        stats = sum((c[1] for c in clipped), ResidualStats())
        if allreduce is not None:
            stats = ResidualStats.from_array(allreduce(stats.to_array()))
        if stats.n_changed == 0 or it == max_iter:
            break
        parts = [c[0] for c in clipped]
    if want_errors:
        sol = solve_astrometric(normals, ccdvisits, stars, compute_errors=True, **solve_kwargs)
    flags = []
    for pt in parts:
        f = np.zeros(pt.n_input, bool)
        f[pt.row[~pt.used]] = True
        flags.append(f)
    return sol.with_residuals(stats, it, np.concatenate(flags))
