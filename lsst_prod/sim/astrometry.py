"""The TRUE astrometric model of the simulator (what the pipeline has to recover).

Sky -> pixel for a visit (all angles in radians inside, degrees at the API)::

    1. gnomonic (TAN) projection about the TRUE boresight (a0, d0):
         D   = sin d sin d0 + cos d cos d0 cos(a - a0)
         xi  = cos d sin(a - a0) / D                        (East)
         eta = (sin d cos d0 - cos d sin d0 cos(a - a0)) / D (North)
    2. rotation by the TRUE rotation angle: ideal focal-plane pixels
         (u_i, v_i) = CD(rot_true)^-1 (xi, eta) [deg]
       with CD = camera.nominal_cd_matrix(pixel_scale, rot_true) (the camera's
       convention: rot = position angle of +y, North through East; rot = 0 has
       +x West, +y North);
    3. radial optical distortion about the boresight:
         (u, v) = (u_i, v_i) (1 + k r_i^2),  r_i^2 = u_i^2 + v_i^2   [pixels]
    4. detector pixels: (x, y) = camera.focal_plane_to_detector(det, u, v).

The inverse solves r_i (1 + k r_i^2) = r by Newton's method.

Positions at an epoch (catalogue positions at the reference epoch t_ref,
proper motion and parallax), applied as offsets in the tangent plane at the
catalogue position and mapped back with the inverse gnomonic projection::

    dt      = (t - t_ref) / 365.25                       [Julian years]
    f_ra    = X sin a - Y cos a                          [au]
    f_dec   = X cos a sin d + Y sin a sin d - Z cos d    [au]
    xi      = pmra dt + parallax f_ra                    [mas]  (pmra includes cos d)
    eta     = pmdec dt + parallax f_dec                  [mas]

with (X, Y, Z) the Earth's barycentric position (au, ICRS axes) from
``astropy.coordinates.get_body_barycentric('earth', t)``.  No aberration,
refraction or light deflection: these are "astrometric" ICRS positions, the
frame of the reference catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..camera import Detector, detector_to_focal_plane, focal_plane_to_detector, nominal_cd_matrix

MAS = np.deg2rad(1.0 / 3.6e6)  # radians per milliarcsecond
ARCSEC = np.deg2rad(1.0 / 3600.0)
JULIAN_YEAR_D = 365.25


# ----------------------------------------------------------------- projections
def gnomonic(ra0_deg: float, dec0_deg: float, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0): standard coordinates (xi East, eta North) in radians."""
    a0, d0 = np.deg2rad(ra0_deg), np.deg2rad(dec0_deg)
    a, d = np.deg2rad(np.asarray(ra_deg, dtype=np.float64)), np.deg2rad(np.asarray(dec_deg, dtype=np.float64))
    da = a - a0
    cosd = np.cos(d)
    den = np.sin(d) * np.sin(d0) + cosd * np.cos(d0) * np.cos(da)
    xi = cosd * np.sin(da) / den
    eta = (np.sin(d) * np.cos(d0) - cosd * np.sin(d0) * np.cos(da)) / den
    return xi, eta


def inverse_gnomonic(ra0_deg: float | np.ndarray, dec0_deg: float | np.ndarray, xi: np.ndarray,
                     eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`gnomonic`: standard coordinates (radians) -> (ra, dec) in degrees, ra in [0, 360)."""
    a0, d0 = np.deg2rad(ra0_deg), np.deg2rad(dec0_deg)
    xi = np.asarray(xi, dtype=np.float64)
    eta = np.asarray(eta, dtype=np.float64)
    den = np.cos(d0) - eta * np.sin(d0)
    a = a0 + np.arctan2(xi, den)
    d = np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den))
    return np.mod(np.rad2deg(a), 360.0), np.rad2deg(d)


def offset_position(ra_deg, dec_deg, east_arcsec, north_arcsec) -> tuple[np.ndarray, np.ndarray]:
    """Move (ra, dec) by tangent-plane offsets (East, North) in arcsec (exact inverse gnomonic)."""
    return inverse_gnomonic(ra_deg, dec_deg, np.asarray(east_arcsec) * ARCSEC, np.asarray(north_arcsec) * ARCSEC)


# ---------------------------------------------------------- epoch propagation
def earth_barycentric_au(mjd_tai: np.ndarray | float) -> np.ndarray:
    """Barycentric position of the Earth (au, ICRS axes), shape (n, 3), at TAI MJD(s)."""
    from astropy.coordinates import get_body_barycentric
    from astropy.time import Time

    t = Time(np.atleast_1d(np.asarray(mjd_tai, dtype=np.float64)), format="mjd", scale="tai")
    pos = get_body_barycentric("earth", t)
    return np.stack([pos.x.to_value("AU"), pos.y.to_value("AU"), pos.z.to_value("AU")], axis=-1)


def parallax_factors(ra_deg: np.ndarray, dec_deg: np.ndarray, earth_xyz_au) -> tuple[np.ndarray, np.ndarray]:
    """(f_ra, f_dec): the apparent offset (East, North) per unit parallax, in au."""
    a = np.deg2rad(np.asarray(ra_deg, dtype=np.float64))
    d = np.deg2rad(np.asarray(dec_deg, dtype=np.float64))
    x, y, z = (float(c) for c in np.asarray(earth_xyz_au, dtype=np.float64).reshape(3))
    f_ra = x * np.sin(a) - y * np.cos(a)
    f_dec = x * np.cos(a) * np.sin(d) + y * np.sin(a) * np.sin(d) - z * np.cos(d)
    return f_ra, f_dec


def positions_at_epoch(ra_deg, dec_deg, pmra_mas_yr, pmdec_mas_yr, parallax_mas, mjd: float,
                       earth_xyz_au, ref_epoch_mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """Astrometric (ICRS) positions at ``mjd`` of objects given at ``ref_epoch_mjd``; see the module doc."""
    dt_yr = (float(mjd) - float(ref_epoch_mjd)) / JULIAN_YEAR_D
    f_ra, f_dec = parallax_factors(ra_deg, dec_deg, earth_xyz_au)
    xi = (np.asarray(pmra_mas_yr) * dt_yr + np.asarray(parallax_mas) * f_ra) * MAS
    eta = (np.asarray(pmdec_mas_yr) * dt_yr + np.asarray(parallax_mas) * f_dec) * MAS
    return inverse_gnomonic(ra_deg, dec_deg, xi, eta)


# ------------------------------------------------------------------ distortion
def distort(u_i: np.ndarray, v_i: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Ideal -> distorted focal-plane pixels: (u, v) = (u_i, v_i) (1 + k r_i^2)."""
    u_i = np.asarray(u_i, dtype=np.float64)
    v_i = np.asarray(v_i, dtype=np.float64)
    f = 1.0 + k * (u_i * u_i + v_i * v_i)
    return u_i * f, v_i * f


def undistort(u: np.ndarray, v: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`distort` (Newton on r_i + k r_i^3 = r, to machine precision)."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if k == 0.0:
        return u.copy(), v.copy()
    r = np.hypot(u, v)
    ri = r.copy()
    for _ in range(50):
        step = (ri + k * ri**3 - r) / (1.0 + 3.0 * k * ri**2)
        ri = ri - step
        if np.all(np.abs(step) <= 1e-13 * np.maximum(r, 1.0)):
            break
    scale = np.divide(ri, r, out=np.ones_like(r), where=r > 0)
    return u * scale, v * scale


# ------------------------------------------------------------ visit mappings
def _get(vt: Any, name: str) -> float:
    if isinstance(vt, Mapping):
        return float(vt[name])
    return float(getattr(vt, name))


def sky_to_focal_plane(visit_truth: Any, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
    """TRUE sky -> distorted focal-plane pixels (u, v) for a visit (steps 1-3 of the module doc).

    ``visit_truth`` is a :class:`~lsst_prod.sim.cadence.VisitTruth` or any mapping
    with keys ``true_ra``, ``true_dec``, ``true_rotation`` (deg),
    ``pixel_scale_arcsec`` and ``distortion_k`` (e.g. a truth_ccdvisits row).
    """
    xi, eta = gnomonic(_get(visit_truth, "true_ra"), _get(visit_truth, "true_dec"), ra_deg, dec_deg)
    cd = nominal_cd_matrix(_get(visit_truth, "pixel_scale_arcsec"), _get(visit_truth, "true_rotation"))
    inv = np.linalg.inv(cd)
    xd, ed = np.rad2deg(xi), np.rad2deg(eta)
    u_i = inv[0, 0] * xd + inv[0, 1] * ed
    v_i = inv[1, 0] * xd + inv[1, 1] * ed
    return distort(u_i, v_i, _get(visit_truth, "distortion_k"))


def focal_plane_to_sky(visit_truth: Any, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`sky_to_focal_plane`."""
    u_i, v_i = undistort(u, v, _get(visit_truth, "distortion_k"))
    cd = nominal_cd_matrix(_get(visit_truth, "pixel_scale_arcsec"), _get(visit_truth, "true_rotation"))
    xd = cd[0, 0] * u_i + cd[0, 1] * v_i
    ed = cd[1, 0] * u_i + cd[1, 1] * v_i
    return inverse_gnomonic(_get(visit_truth, "true_ra"), _get(visit_truth, "true_dec"), np.deg2rad(xd), np.deg2rad(ed))


def true_sky_to_pixel(visit_truth: Any, detector: Detector, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """TRUE (ra, dec) [deg, at the visit's epoch] -> 0-based pixel (x, y) on ``detector``.

    The positions must already be propagated to the visit's epoch
    (:func:`positions_at_epoch`); truth_sources holds them.
    """
    u, v = sky_to_focal_plane(visit_truth, ra, dec)
    return focal_plane_to_detector(detector, u, v)


def true_pixel_to_sky(visit_truth: Any, detector: Detector, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`true_sky_to_pixel`: 0-based pixel (x, y) -> (ra, dec) in degrees."""
    u, v = detector_to_focal_plane(detector, x, y)
    return focal_plane_to_sky(visit_truth, u, v)


def local_jacobian(visit_truth: Any, detector: Detector, ra_deg, dec_deg,
                   step_arcsec: float = 0.5) -> np.ndarray:
    """d(x, y)/d(w, n) in pixels per arcsec at each position, shape (n, 2, 2).

    (w, n) are local sky offsets towards West and North (GalSim's world (u, v)
    convention); central differences of the exact mapping.
    """
    ra = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
    h = step_arcsec
    out = np.empty((ra.size, 2, 2))
    for j, (east, north) in enumerate(((-h, 0.0), (0.0, h))):  # +w is West, +n is North
        rp, dp = offset_position(ra, dec, east, north)
        rm, dm = offset_position(ra, dec, -east, -north)
        xp, yp = true_sky_to_pixel(visit_truth, detector, rp, dp)
        xm, ym = true_sky_to_pixel(visit_truth, detector, rm, dm)
        out[:, 0, j] = (xp - xm) / (2 * h)
        out[:, 1, j] = (yp - ym) / (2 * h)
    return out
