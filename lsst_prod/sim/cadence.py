"""Cadence and observing conditions: the visits, their pointing, time, airmass, PSF and photometry.

Scheduling (no Sun, Moon or weather model; the default nights put the field in
its observing season):

* night ``D`` (local evening date) has ``n = visits_per_night_per_band x
  n_bands`` visits at hour angles evenly spaced in [hour_angle_min_h,
  hour_angle_max_h]; band ``(k + night_index) mod n_bands`` takes the k-th;
* the mid-exposure time of a visit at hour angle H is the UT instant nearest
  local mean midnight (``MJD(D) + 1 - lon/360``) at which
  ``LST = GMST + lon/15 = RA/15 + H``, with GMST = 18.697374558 +
  24.06570982441908 (MJD_UT - 51544.5) hours (UT1 = UTC); consecutive visits are
  at least ``exptime + 5 s`` apart;
* ``day_obs`` is the UTC date of ``start - 12 h`` (Rubin's convention) and
  ``seq`` counts the visits of a day_obs from 1 in time order;
  ``visit = (day_obs - 20000000) * 10000 + seq``;
* times are stored as TAI MJD (UTC -> TAI with astropy's leap seconds).

Conditions: altitude/azimuth from the hour angle, commanded declination and
site latitude; airmass from Kasten & Young (1989)
``X = 1 / (sin(alt) + 0.50572 (alt + 6.07995 deg)^-1.6364)``.

Photometry (see :func:`zero_point`)::

    ZP(visit, det) = zp_band + 2.5 log10(exptime) - k_band (X - 1) - transparency + 2.5 log10(qe[det, band])
    sky_e_per_pix  = pixel_area_arcsec2 * 10**(0.4 (zp_band + 2.5 log10(exptime) + 2.5 log10(qe) - mu_sky)) * sky_factor
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..camera import Camera
from ..config.simulation import SimulationConfig
from ..errors import ConfigError
from .astrometry import earth_barycentric_au, offset_position
from .spec import focal_plane_extent, physical_filter_of, rng_for

_MJD_UNIX_EPOCH = 40587.0
_SIDEREAL_RATE_H_PER_D = 24.06570982441908
_MIN_GAP_S = 5.0


@dataclass(frozen=True)
class VisitTruth:
    """Everything true about one visit (the per-detector part is in :func:`zero_point` etc.)."""

    visit: int
    day_obs: int
    seq: int
    band: str
    physical_filter: str
    mjd_start: float  # TAI
    mjd_mid: float  # TAI
    exptime: float  # s
    cmd_ra: float  # deg, commanded boresight
    cmd_dec: float
    cmd_rotation: float  # deg, commanded ROTPA
    true_ra: float  # deg, true boresight
    true_dec: float
    true_rotation: float  # deg
    pixel_scale_arcsec: float
    distortion_k: float  # pixel^-2
    hour_angle_h: float  # at mid-exposure
    airmass: float
    altitude: float  # deg
    azimuth: float  # deg, North through East
    zenith_distance: float  # deg
    seeing_fwhm_boresight_arcsec: float  # PSF FWHM at the boresight (the visit's seeing)
    psf_fwhm_growth: float  # FWHM x (1 + growth (r/r_ref)^2)
    psf_r_ref_pix: float  # focal-plane radius of the farthest detector corner
    psf_g1_0: float  # PSF shear g = g_0 + g_u u/r_ref + g_v v/r_ref (detector axes)
    psf_g1_u: float
    psf_g1_v: float
    psf_g2_0: float
    psf_g2_u: float
    psf_g2_v: float
    transparency_mag: float  # extinction offset (positive = fainter)
    sky_factor: float
    earth_x_au: float  # Earth's barycentric position at mid-exposure
    earth_y_au: float
    earth_z_au: float

    @property
    def earth_xyz_au(self) -> np.ndarray:
        return np.array([self.earth_x_au, self.earth_y_au, self.earth_z_au])

    @property
    def psf_fwhm_pix_boresight(self) -> float:
        return self.seeing_fwhm_boresight_arcsec / self.pixel_scale_arcsec

    def record(self, instrument: str) -> dict[str, Any]:
        """The visit dimension record for ``Repository.insert_visits``."""
        return {
            "visit": int(self.visit),
            "instrument": instrument,
            "band": self.band,
            "physical_filter": self.physical_filter,
            "day_obs": int(self.day_obs),
            "exposure_time": float(self.exptime),
            "mjd_start": float(self.mjd_start),
            "mjd_mid": float(self.mjd_mid),
            "ra": float(self.cmd_ra),
            "dec": float(self.cmd_dec),
            "rotation": float(self.cmd_rotation),
            "airmass": float(self.airmass),
            "altitude": float(self.altitude),
            "azimuth": float(self.azimuth),
            "zenith_distance": float(self.zenith_distance),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "VisitTruth":
        """Rebuild from a truth_ccdvisits row (extra keys are ignored)."""
        kw = {}
        for f in dataclasses.fields(cls):
            v = row[f.name]
            kw[f.name] = v if f.type in ("str",) else (int(v) if f.type == "int" else float(v))
        return cls(**kw)


# -------------------------------------------------------------------- site
def gmst_hours(mjd_ut: np.ndarray | float) -> np.ndarray:
    return np.mod(18.697374558 + _SIDEREAL_RATE_H_PER_D * (np.asarray(mjd_ut, dtype=np.float64) - 51544.5), 24.0)


def hour_angle_hours(mjd_ut, ra_deg: float, lon_deg: float) -> np.ndarray:
    """Hour angle in (-12, 12] hours."""
    lst = gmst_hours(mjd_ut) + lon_deg / 15.0
    return 12.0 - np.mod(12.0 - (lst - ra_deg / 15.0), 24.0)


def alt_az(ha_h: float, dec_deg: float, lat_deg: float) -> tuple[float, float]:
    """(altitude, azimuth North through East) in deg."""
    h = math.radians(ha_h * 15.0)
    d = math.radians(dec_deg)
    p = math.radians(lat_deg)
    sin_alt = math.sin(p) * math.sin(d) + math.cos(p) * math.cos(d) * math.cos(h)
    alt = math.asin(max(-1.0, min(1.0, sin_alt)))
    az = math.atan2(-math.cos(d) * math.sin(h), math.sin(d) * math.cos(p) - math.cos(d) * math.sin(p) * math.cos(h))
    return math.degrees(alt), math.degrees(az) % 360.0


def airmass_kasten_young(alt_deg: float) -> float:
    if alt_deg <= 0.0:
        raise ValueError(f"field below the horizon (altitude {alt_deg:.1f} deg): change hour angles or field")
    return 1.0 / (math.sin(math.radians(alt_deg)) + 0.50572 * (alt_deg + 6.07995) ** -1.6364)


def _utc_to_tai_mjd(mjd_utc: np.ndarray) -> np.ndarray:
    from astropy.time import Time

    return Time(np.asarray(mjd_utc, dtype=np.float64), format="mjd", scale="utc").tai.mjd


def mjd_of_date(d: dt.date) -> float:
    return float((d - dt.date(1970, 1, 1)).days) + _MJD_UNIX_EPOCH


def day_obs_of(mjd_utc: float) -> int:
    """Rubin's day_obs: the UTC date of (time - 12 h)."""
    d = dt.date(1970, 1, 1) + dt.timedelta(days=int(math.floor(mjd_utc - 0.5 - _MJD_UNIX_EPOCH)))
    return int(d.strftime("%Y%m%d"))


def visit_id(day_obs: int, seq: int) -> int:
    return (int(day_obs) - 20000000) * 10000 + int(seq)


def _psf_coefficients(rng: np.random.Generator, g_max: float, hw: float, hh: float, r_ref: float) -> list[float]:
    c = rng.uniform(-0.5, 0.5, size=6) * g_max  # g1_0, g1_u, g1_v, g2_0, g2_u, g2_v
    worst = 0.0
    for su in (-1, 1):
        for sv in (-1, 1):
            uu, vv = su * hw / r_ref, sv * hh / r_ref
            g1 = c[0] + c[1] * uu + c[2] * vv
            g2 = c[3] + c[4] * uu + c[5] * vv
            worst = max(worst, math.hypot(g1, g2))
    if worst > g_max > 0:
        c *= g_max / worst
    return [float(x) for x in c]


# ------------------------------------------------------------------ visits
def make_visits(config: SimulationConfig, camera: Camera) -> list[VisitTruth]:
    """All visits of the survey, in time order."""
    bands = list(config.bands)
    nb = len(bands)
    n_per_night = config.visits_per_night_per_band * nb
    hw, hh, r_ref = focal_plane_extent(camera)
    lon = config.site_longitude_deg
    ra_f = config.field_ra_deg

    plan: list[dict[str, Any]] = []
    last_mid = -np.inf
    for night_index, night in enumerate(config.night_dates()):
        midnight_ut = mjd_of_date(night) + 1.0 - lon / 360.0
        if n_per_night == 1:
            has = [0.5 * (config.hour_angle_min_h + config.hour_angle_max_h)]
        else:
            has = list(np.linspace(config.hour_angle_min_h, config.hour_angle_max_h, n_per_night))
        rng = rng_for(config.seed, "night", night.toordinal())
        for k, ha in enumerate(has):
            # time of mid-exposure nearest local midnight with the wanted hour angle
            ha_now = float(hour_angle_hours(midnight_ut, ra_f, lon))
            delta_h = ((ha - ha_now + 12.0) % 24.0) - 12.0
            mid = midnight_ut + delta_h / _SIDEREAL_RATE_H_PER_D
            mid = max(mid, last_mid + (config.exposure_time_s + _MIN_GAP_S) / 86400.0)
            last_mid = mid
            band = bands[(k + night_index) % nb]
            dither_r = config.dither_radius_arcsec * math.sqrt(rng.uniform())
            dither_t = rng.uniform(0.0, 2.0 * math.pi)
            plan.append({
                "mid_utc": mid,
                "band": band,
                "dither": (dither_r * math.cos(dither_t), dither_r * math.sin(dither_t)),
                "rot": config.rotation_deg + rng.uniform(-config.rotation_dither_deg, config.rotation_dither_deg),
                "perr": rng.normal(0.0, config.pointing_error_rms_arcsec, size=2),
                "rerr": rng.normal(0.0, config.rotation_error_rms_arcsec),
                "seeing": rng.uniform(config.seeing_min_arcsec, config.seeing_max_arcsec),
                "transp": rng.normal(0.0, config.zero_point_offset_rms_mmag) / 1000.0,
                "sky": rng.uniform(config.sky_factor_min, config.sky_factor_max),
                # |g| <= g_max over the layout grown by the render margin (+ distortion slack)
                "psf": _psf_coefficients(rng, config.psf_g_max, hw + config.render_margin_pix + 10.0,
                                         hh + config.render_margin_pix + 10.0, r_ref),
            })

    half = config.exposure_time_s / 2.0 / 86400.0
    mid_utc = np.array([p["mid_utc"] for p in plan])
    start_tai = _utc_to_tai_mjd(mid_utc - half)
    mid_tai = start_tai + half
    earth = earth_barycentric_au(mid_tai)

    visits: list[VisitTruth] = []
    seq_of_day: dict[int, int] = {}
    for i, p in enumerate(plan):
        day_obs = day_obs_of(p["mid_utc"] - half)
        seq = seq_of_day.get(day_obs, 0) + 1
        seq_of_day[day_obs] = seq
        cmd_ra, cmd_dec = offset_position(ra_f, config.field_dec_deg, *p["dither"])
        true_ra, true_dec = offset_position(cmd_ra, cmd_dec, *p["perr"])
        ha = float(hour_angle_hours(p["mid_utc"], float(cmd_ra), lon))
        alt, az = alt_az(ha, float(cmd_dec), config.site_latitude_deg)
        if alt <= 0.0:  # the config's check covers the nominal hour angles; visits packed later can drift
            raise ConfigError(
                f"simulation: visit {i + 1} of {len(plan)} (night {day_obs_of(p['mid_utc'] - half)}) would be "
                f"below the horizon: altitude {alt:.1f} deg at hour angle {ha:.2f} h for field_dec_deg = "
                f"{config.field_dec_deg} at site_latitude_deg = {config.site_latitude_deg}; narrow "
                f"hour_angle_min_h / hour_angle_max_h or observe fewer visits_per_night_per_band")
        airmass = airmass_kasten_young(alt)
        rot = float(p["rot"])
        g = p["psf"]
        visits.append(VisitTruth(
            visit=visit_id(day_obs, seq),
            day_obs=day_obs,
            seq=seq,
            band=p["band"],
            physical_filter=physical_filter_of(p["band"]),
            mjd_start=float(start_tai[i]),
            mjd_mid=float(mid_tai[i]),
            exptime=float(config.exposure_time_s),
            cmd_ra=float(cmd_ra),
            cmd_dec=float(cmd_dec),
            cmd_rotation=rot,
            true_ra=float(true_ra),
            true_dec=float(true_dec),
            true_rotation=rot + float(p["rerr"]) / 3600.0,
            pixel_scale_arcsec=float(config.pixel_scale_arcsec),
            distortion_k=float(config.distortion_k_per_pix2),
            hour_angle_h=ha,
            airmass=airmass,
            altitude=alt,
            azimuth=az,
            zenith_distance=90.0 - alt,
            seeing_fwhm_boresight_arcsec=float(p["seeing"]),
            psf_fwhm_growth=float(config.psf_fwhm_growth_frac),
            psf_r_ref_pix=r_ref,
            psf_g1_0=g[0], psf_g1_u=g[1], psf_g1_v=g[2], psf_g2_0=g[3], psf_g2_u=g[4], psf_g2_v=g[5],
            transparency_mag=float(p["transp"]),
            sky_factor=float(p["sky"]),
            earth_x_au=float(earth[i, 0]),
            earth_y_au=float(earth[i, 1]),
            earth_z_au=float(earth[i, 2]),
        ))
    ids = [v.visit for v in visits]
    if len(set(ids)) != len(ids):  # cannot happen with seq per day_obs, but the IDs are a contract
        raise AssertionError("duplicate visit IDs")
    return visits


# ------------------------------------------------------------------ PSF
def psf_at(vt: VisitTruth, u, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF (FWHM in pixels, g1, g2) at focal-plane position (u, v) pixels, in detector axes.

    FWHM = seeing/pixel_scale x (1 + growth (r/r_ref)^2); g = g_0 + g_u u/r_ref + g_v v/r_ref.
    """
    uu = np.asarray(u, dtype=np.float64) / vt.psf_r_ref_pix
    vv = np.asarray(v, dtype=np.float64) / vt.psf_r_ref_pix
    fwhm = vt.psf_fwhm_pix_boresight * (1.0 + vt.psf_fwhm_growth * (uu * uu + vv * vv))
    g1 = vt.psf_g1_0 + vt.psf_g1_u * uu + vt.psf_g1_v * vv
    g2 = vt.psf_g2_0 + vt.psf_g2_u * uu + vt.psf_g2_v * vv
    return fwhm, g1, g2


# ----------------------------------------------------------- photometry
def qe_factors(config: SimulationConfig, camera: Camera) -> dict[tuple[int, str], float]:
    """Per (detector, band) QE factor 1 + N(0, qe_rms_frac), clipped to [0.5, 1.5]."""
    out = {}
    for det in camera.detectors:
        for band in config.bands:
            rng = rng_for(config.seed, "qe", det.id, band)
            out[(det.id, band)] = float(np.clip(1.0 + rng.normal(0.0, config.qe_rms_frac), 0.5, 1.5))
    return out


def zero_point(config: SimulationConfig, vt: VisitTruth, qe: float) -> float:
    """TRUE zero point: AB magnitude giving 1 electron in the exposure on a detector of QE factor ``qe``."""
    b = vt.band
    return (config.zero_point_mag[b] + 2.5 * math.log10(vt.exptime)
            - config.extinction_mag_per_airmass[b] * (vt.airmass - 1.0)
            - vt.transparency_mag + 2.5 * math.log10(qe))


def sky_e_per_pix(config: SimulationConfig, vt: VisitTruth, qe: float) -> float:
    """Mean sky level, electrons per pixel (before the flat), on a detector of QE factor ``qe``."""
    b = vt.band
    zp_sky = config.zero_point_mag[b] + 2.5 * math.log10(vt.exptime) + 2.5 * math.log10(qe)
    return config.pixel_scale_arcsec**2 * 10.0 ** (0.4 * (zp_sky - config.sky_mag_per_arcsec2[b])) * vt.sky_factor
