"""Configuration of the survey simulator (:mod:`lsst_prod.sim`).

Every field carries its unit in its name or description.  The defaults describe
a tiny survey (2 detectors of 1024x1024, 2 bands, 6 nights over ~2.2 years,
24 visits) that simulates in about a minute on two cores; tests use much
smaller ones (see ``tests/sim``).

The conventions behind the fields (zero point, distortion, PSF, raw contract)
are written down in ``docs/simulator.md``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Bands the simulator knows colours for.
KNOWN_BANDS = ("u", "g", "r", "i", "z", "y")

# Rubin-like nominal values (SMTN-002): AB magnitude giving 1 e-/s at airmass 1,
# dark-sky brightness and first-order extinction.
_DEFAULT_ZP = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
_DEFAULT_SKY = {"u": 23.05, "g": 22.25, "r": 21.20, "i": 20.46, "z": 19.61, "y": 18.60}
_DEFAULT_EXT = {"u": 0.47, "g": 0.21, "r": 0.13, "i": 0.10, "z": 0.07, "y": 0.18}

#: Largest PSF FWHM anywhere in the focal plane (pixels): a sanity bound (point-source stamps of
#: 10 FWHM half-width stay within the renderer's 256-pixel limit); stages size their PSF stamps
#: and apertures from the measured seeing, so there is no tighter cap.
MAX_PSF_FWHM_PIX = 25.0
#: lowest altitude at which a field is observed (deg): the airmass formula and the simulated sky need the
#: field above the horizon at every hour angle of the cadence
MIN_ALTITUDE_DEG = 0.0


def _range(lo: float, hi: float, name_lo: str, name_hi: str, strict: bool = True) -> None:
    if (lo >= hi) if strict else (lo > hi):
        op = "<" if strict else "<="
        raise ValueError(f"{name_lo} ({lo}) must be {op} {name_hi} ({hi})")


class SimulationConfig(BaseModel):
    """Everything the simulator needs; the same config and seed give identical output."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # ------------------------------------------------------------------ global
    seed: int = Field(12345, ge=0, lt=2**63, description="master random seed; every random stream derives from it")
    instrument: str = Field("SimCam", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=32,
                            description="instrument (camera) name")

    # ------------------------------------------------------------------ camera
    n_detectors: int = Field(2, ge=1, le=189, description="number of detectors (near-square grid)")
    detector_nx: int = Field(1024, ge=64, le=8192, description="imaging columns per detector, pixels")
    detector_ny: int = Field(1024, ge=64, le=8192, description="imaging rows per detector, pixels")
    overscan_pix: int = Field(32, ge=4, le=256, description="serial overscan columns per row, pixels")
    detector_gap_pix: int = Field(40, ge=0, le=2000, description="gap between adjacent detectors, pixels")
    pixel_scale_arcsec: float = Field(0.2, gt=0.01, le=2.0, description="nominal pixel scale, arcsec/pixel")
    gains_e_per_adu: tuple[float, ...] | None = Field(
        None, description="gain per detector (cycled), e-/ADU; None: camera.make_camera defaults (1.0-1.2)")
    read_noise_e: tuple[float, ...] | None = Field(
        None, description="read noise per detector (cycled), electrons rms; None: make_camera defaults (5-6 e-)")
    saturation_adu: float = Field(60000.0, gt=1000, le=65535, description="raw value (ADU) at which pixels clip")
    bias_level_adu: float = Field(1000.0, ge=100, le=20000, description="nominal bias (overscan) level, ADU")

    # ---------------------------------------------------------------- pointing
    field_ra_deg: float = Field(150.0, ge=0.0, lt=360.0, description="field centre right ascension, deg (ICRS)")
    field_dec_deg: float = Field(2.0, ge=-80.0, le=80.0, description="field centre declination, deg (ICRS)")
    dither_radius_arcsec: float = Field(60.0, ge=0.0, le=3600.0,
                                        description="commanded pointings are uniform in a disk of this radius, arcsec")
    rotation_deg: float = Field(0.0, ge=-360.0, le=360.0, description="mean commanded rotation (ROTPA), deg")
    rotation_dither_deg: float = Field(10.0, ge=0.0, le=180.0,
                                       description="commanded rotation is uniform in rotation_deg +- this, deg")
    pointing_error_rms_arcsec: float = Field(2.0, ge=0.0, le=120.0,
                                             description="true - commanded boresight, rms per axis, arcsec")
    rotation_error_rms_arcsec: float = Field(30.0, ge=0.0, le=7200.0,
                                             description="true - commanded rotation, rms, arcsec")
    distortion_k_per_pix2: float = Field(
        1.5e-9, ge=-1e-7, le=1e-7,
        description="radial cubic optical distortion r_true = r (1 + k r^2), r in focal-plane pixels, "
                    "k in pixel^-2 (1.5e-9 moves the default camera's corner, r = 1162 px, by 2.4 px)")
    camera_distortion_model_error: float = Field(
        0.05, ge=-0.5, le=0.5,
        description="fractional error of the camera model's optical distortion (what the pipeline is given as "
                    "the optical design's k) against the true k: the as-built telescope differs from its design")

    # ------------------------------------------------------------------- bands
    bands: tuple[str, ...] = Field(("g", "r"), min_length=1, description="bands observed (physical filter '<band>_sim')")
    zero_point_mag: dict[str, float] = Field(
        default_factory=lambda: dict(_DEFAULT_ZP),
        description="nominal zero point per band: AB magnitude giving 1 e-/s at airmass 1, mag")
    sky_mag_per_arcsec2: dict[str, float] = Field(
        default_factory=lambda: dict(_DEFAULT_SKY), description="dark-sky surface brightness per band, AB mag/arcsec^2")
    extinction_mag_per_airmass: dict[str, float] = Field(
        default_factory=lambda: dict(_DEFAULT_EXT), description="first-order extinction k per band, mag/airmass")

    # ----------------------------------------------------------------- cadence
    start_day_obs: dt.date = Field(dt.date(2025, 1, 20), description="first observing night (local evening date)")
    n_nights: int = Field(6, ge=1, le=2000, description="number of observing nights")
    night_spacing_days: int = Field(64, ge=1, le=3650, description="days between consecutive nights of a season")
    nights_per_season: int = Field(2, ge=1, le=2000,
                                   description="nights per observing season; the next season starts "
                                               "season_spacing_days after the previous one")
    season_spacing_days: int = Field(365, ge=1, le=3650, description="days between season starts")
    visits_per_night_per_band: int = Field(2, ge=1, le=200, description="visits per night in each band")
    exposure_time_s: float = Field(30.0, gt=0.0, le=3600.0, description="exposure time, s")
    hour_angle_min_h: float = Field(-2.5, ge=-8.0, le=8.0, description="hour angle of a night's first visit, hours")
    hour_angle_max_h: float = Field(2.5, ge=-8.0, le=8.0, description="hour angle of a night's last visit, hours")
    site_latitude_deg: float = Field(-30.2446, ge=-90.0, le=90.0, description="site geodetic latitude, deg")
    site_longitude_deg: float = Field(-70.7494, ge=-180.0, le=180.0, description="site longitude, deg East")

    # ------------------------------------------------------ observing conditions
    seeing_min_arcsec: float = Field(0.6, gt=0.1, le=5.0, description="smallest visit seeing FWHM (boresight), arcsec")
    seeing_max_arcsec: float = Field(1.1, gt=0.1, le=5.0, description="largest visit seeing FWHM (boresight), arcsec")
    psf_fwhm_growth_frac: float = Field(
        0.08, ge=0.0, le=0.5,
        description="PSF FWHM grows as (1 + growth (r/r_corner)^2) with focal-plane radius r; fraction")
    psf_g_max: float = Field(0.05, ge=0.0, le=0.2, description="largest PSF reduced-shear |g| anywhere in the focal plane")
    psf_model: Literal["kolmogorov", "moffat"] = Field(
        "kolmogorov", description="PSF profile: 'kolmogorov' (Kolmogorov atmosphere convolved with the obscured "
                                  "Airy of the telescope) or 'moffat' (Moffat of index psf_moffat_beta)")
    psf_moffat_beta: float = Field(3.5, ge=1.5, le=20.0, description="Moffat index (psf_model 'moffat')")
    telescope_diameter_m: float = Field(8.36, gt=0.1, le=100.0,
                                        description="primary mirror diameter (diffraction of psf_model 'kolmogorov'), m")
    telescope_obscuration: float = Field(0.61, ge=0.0, lt=0.95,
                                         description="linear central obscuration, fraction of the diameter")
    zero_point_offset_rms_mmag: float = Field(
        30.0, ge=0.0, le=1000.0, description="rms of the per-visit transparency offset (extinction), mmag")
    qe_rms_frac: float = Field(0.02, ge=0.0, le=0.3, description="rms of the per-detector, per-band QE factor, fraction")
    sky_factor_min: float = Field(0.9, gt=0.0, le=100.0, description="per-visit sky brightness factor, lower bound")
    sky_factor_max: float = Field(1.5, gt=0.0, le=100.0, description="per-visit sky brightness factor, upper bound")

    # ------------------------------------------------------------------- stars
    star_density_per_deg2: float = Field(200000.0, ge=0.0, le=5e6,
                                         description="stars per deg^2 between star_mag_min and star_mag_max")
    star_mag_min: float = Field(16.0, ge=5.0, le=30.0, description="brightest star, r-band AB mag")
    star_mag_max: float = Field(24.0, ge=5.0, le=30.0, description="faintest star, r-band AB mag")
    star_mag_slope: float = Field(0.2, ge=0.0, le=1.0,
                                  description="star counts dlog10(N)/dm (power law in flux), per mag")
    variable_fraction: float = Field(0.07, ge=0.0, le=1.0, description="fraction of stars that vary")
    var_amp_min_mag: float = Field(0.1, ge=0.0, le=3.0, description="smallest variability semi-amplitude, mag")
    var_amp_max_mag: float = Field(0.5, ge=0.0, le=3.0, description="largest variability semi-amplitude, mag")
    var_period_min_d: float = Field(0.3, gt=0.0, le=1e4, description="shortest variability period, days")
    var_period_max_d: float = Field(30.0, gt=0.0, le=1e4, description="longest variability period, days")

    # ---------------------------------------------------------------- galaxies
    galaxy_density_per_deg2: float = Field(20000.0, ge=0.0, le=1e6,
                                           description="galaxies per deg^2 between galaxy_mag_min and galaxy_mag_max")
    galaxy_mag_min: float = Field(18.0, ge=5.0, le=30.0, description="brightest galaxy, r-band AB mag")
    galaxy_mag_max: float = Field(24.5, ge=5.0, le=30.0, description="faintest galaxy, r-band AB mag")
    galaxy_mag_slope: float = Field(0.35, ge=0.0, le=1.0, description="galaxy counts dlog10(N)/dm, per mag")
    galaxy_hlr_min_arcsec: float = Field(0.2, gt=0.0, le=10.0, description="smallest disk half-light radius, arcsec")
    galaxy_hlr_max_arcsec: float = Field(1.5, gt=0.0, le=10.0, description="largest disk half-light radius, arcsec")
    galaxy_g_rms: float = Field(0.2, ge=0.0, le=0.5, description="rms per component of intrinsic reduced shear g1, g2")

    # ----------------------------------------------------- transients, asteroids
    n_transients: int = Field(3, ge=0, le=10000, description="transients (each in exactly one visit)")
    transient_mag_min: float = Field(18.0, ge=5.0, le=30.0, description="brightest transient, r-band AB mag")
    transient_mag_max: float = Field(21.0, ge=5.0, le=30.0, description="faintest transient, r-band AB mag")
    n_asteroids: int = Field(3, ge=0, le=10000, description="asteroids (each in exactly one visit)")
    asteroid_mag_min: float = Field(18.0, ge=5.0, le=30.0, description="brightest asteroid, r-band AB mag")
    asteroid_mag_max: float = Field(21.0, ge=5.0, le=30.0, description="faintest asteroid, r-band AB mag")
    asteroid_rate_min_deg_per_day: float = Field(0.05, ge=0.0, le=20.0, description="slowest asteroid, deg/day")
    asteroid_rate_max_deg_per_day: float = Field(0.5, ge=0.0, le=20.0, description="fastest asteroid, deg/day")

    # -------------------------------------------------------- detector effects
    cosmic_ray_rate_per_mpix_per_s: float = Field(1.0, ge=0.0, le=1000.0,
                                                  description="cosmic-ray events per 10^6 pixels per second of exposure")
    cosmic_ray_e_min: float = Field(500.0, gt=0.0, le=1e6, description="smallest cosmic-ray deposit per pixel, electrons")
    cosmic_ray_e_max: float = Field(20000.0, gt=0.0, le=1e6, description="largest cosmic-ray deposit per pixel, electrons")
    n_bad_columns: int = Field(3, ge=0, le=1000, description="bad (hot or dead) columns per detector")
    flat_vignetting_frac: float = Field(0.04, ge=0.0, le=0.5,
                                        description="flat-field drop at the focal-plane corner (smooth vignetting), fraction")
    flat_pixel_rms_frac: float = Field(0.01, ge=0.0, le=0.1, description="pixel-to-pixel flat-field rms, fraction")
    bias_structure_amp_adu: float = Field(3.0, ge=0.0, le=100.0, description="amplitude of the fixed 2-D bias pattern, ADU")
    row_offset_amp_adu: float = Field(3.0, ge=0.0, le=100.0, description="amplitude of the per-exposure row drift, ADU")

    # -------------------------------------------------------- reference catalog
    refcat_mag_limit: float = Field(20.7, ge=5.0, le=30.0,
                                    description="faint limit of the Gaia-like refcat: TRUE G brighter than this, mag")
    refcat_bright_limit: float = Field(3.0, ge=-2.0, le=15.0,
                                       description="bright (saturation) limit: stars with TRUE G brighter are absent, mag")
    refcat_epoch_mjd: float = Field(57388.0, ge=40000.0, le=80000.0,
                                    description="reference epoch of the catalog positions, MJD (TDB; J2016.0 = 57388.0)")
    refcat_pos_err_min_mas: float = Field(0.1, gt=0.0, le=1000.0, description="position error of the brightest stars, mas")
    refcat_pos_err_max_mas: float = Field(2.0, gt=0.0, le=1000.0, description="position error at the magnitude limit, mas")
    refcat_pm_err_scale_per_yr: float = Field(1.0, ge=0.0, le=100.0,
                                              description="proper-motion error = this x position error, (mas/yr)/mas")
    refcat_parallax_err_scale: float = Field(1.2, ge=0.0, le=100.0,
                                             description="parallax error = this x position error, mas/mas")
    refcat_var_flag_completeness: float = Field(
        0.85, ge=0.0, le=1.0, description="phot_variable_flag: detection probability of a large-amplitude variable")
    refcat_var_flag_false_positive_rate: float = Field(
        0.005, ge=0.0, le=0.5, description="phot_variable_flag: fraction of constant stars flagged (G >= 13)")

    # --------------------------------------------------------------- rendering
    render_margin_pix: int = Field(40, ge=0, le=1000,
                                   description="objects whose centre is up to this far outside a detector are drawn, px")
    folding_threshold: float = Field(5e-3, gt=0.0, le=0.05, description="GalSim FFT folding threshold")

    # ------------------------------------------------------------- validators
    @field_validator("bands")
    @classmethod
    def _known_bands(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [b for b in v if b not in KNOWN_BANDS]
        if unknown:
            raise ValueError(f"unknown band(s) {unknown}; the simulator knows {list(KNOWN_BANDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"bands {list(v)} contain duplicates")
        return v

    @field_validator("gains_e_per_adu", "read_noise_e")
    @classmethod
    def _positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None:
            if len(v) == 0:
                raise ValueError("must be None or a non-empty list")
            if any(not (x > 0) for x in v):
                raise ValueError(f"values must be > 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SimulationConfig":
        for name in ("zero_point_mag", "sky_mag_per_arcsec2", "extinction_mag_per_airmass"):
            table = getattr(self, name)
            missing = [b for b in self.bands if b not in table]
            if missing:
                raise ValueError(f"{name} lacks band(s) {missing} (has {sorted(table)})")
        _range(self.refcat_bright_limit, self.refcat_mag_limit, "refcat_bright_limit", "refcat_mag_limit")
        _range(self.seeing_min_arcsec, self.seeing_max_arcsec, "seeing_min_arcsec", "seeing_max_arcsec", strict=False)
        worst = self.seeing_max_arcsec * (1.0 + self.psf_fwhm_growth_frac) / self.pixel_scale_arcsec
        if worst > MAX_PSF_FWHM_PIX + 1e-9:
            raise ValueError(
                f"seeing_max_arcsec x (1 + psf_fwhm_growth_frac) / pixel_scale_arcsec = {worst:.2f} px exceeds "
                f"{MAX_PSF_FWHM_PIX} px (the renderer's point-source stamps would exceed 256 px)")
        _range(self.hour_angle_min_h, self.hour_angle_max_h, "hour_angle_min_h", "hour_angle_max_h", strict=False)
        self._check_above_horizon()
        _range(self.sky_factor_min, self.sky_factor_max, "sky_factor_min", "sky_factor_max", strict=False)
        _range(self.star_mag_min, self.star_mag_max, "star_mag_min", "star_mag_max")
        _range(self.galaxy_mag_min, self.galaxy_mag_max, "galaxy_mag_min", "galaxy_mag_max")
        _range(self.transient_mag_min, self.transient_mag_max, "transient_mag_min", "transient_mag_max", strict=False)
        _range(self.asteroid_mag_min, self.asteroid_mag_max, "asteroid_mag_min", "asteroid_mag_max", strict=False)
        _range(self.asteroid_rate_min_deg_per_day, self.asteroid_rate_max_deg_per_day,
               "asteroid_rate_min_deg_per_day", "asteroid_rate_max_deg_per_day", strict=False)
        _range(self.var_amp_min_mag, self.var_amp_max_mag, "var_amp_min_mag", "var_amp_max_mag", strict=False)
        _range(self.var_period_min_d, self.var_period_max_d, "var_period_min_d", "var_period_max_d", strict=False)
        _range(self.galaxy_hlr_min_arcsec, self.galaxy_hlr_max_arcsec, "galaxy_hlr_min_arcsec",
               "galaxy_hlr_max_arcsec", strict=False)
        _range(self.cosmic_ray_e_min, self.cosmic_ray_e_max, "cosmic_ray_e_min", "cosmic_ray_e_max", strict=False)
        _range(self.refcat_pos_err_min_mas, self.refcat_pos_err_max_mas, "refcat_pos_err_min_mas",
               "refcat_pos_err_max_mas", strict=False)
        if self.n_bad_columns > self.detector_nx // 4:
            raise ValueError(f"n_bad_columns ({self.n_bad_columns}) must be <= detector_nx / 4 ({self.detector_nx // 4})")
        if self.n_nights > self.nights_per_season and \
                (self.nights_per_season - 1) * self.night_spacing_days >= self.season_spacing_days:
            raise ValueError(f"(nights_per_season - 1) x night_spacing_days = "
                             f"{(self.nights_per_season - 1) * self.night_spacing_days} must be < season_spacing_days "
                             f"({self.season_spacing_days}) so that seasons do not overlap")
        # the inverse distortion must stay monotonic over the focal plane
        r_max = self.focal_plane_radius_pix()
        if 3.0 * abs(self.distortion_k_per_pix2) * r_max**2 > 0.2:
            raise ValueError(f"|distortion_k_per_pix2| = {abs(self.distortion_k_per_pix2):g} is too large for a focal "
                             f"plane of radius {r_max:.0f} px (3 |k| r^2 must be < 0.2)")
        # visit IDs: (day_obs - 20000000) * 10000 + seq must fit in 33 bits
        last = self.night_dates()[-1]
        if last.year < 2000:
            raise ValueError(f"nights must be in year 2000 or later (last night {last})")
        max_visit = (int(last.strftime("%Y%m%d")) - 20000000) * 10000 + 9999
        if max_visit >= 2**33:
            raise ValueError(f"last night {last} gives visit IDs above 2^33; start earlier or observe fewer nights")
        if self.visits_per_night_per_band * len(self.bands) > 9999:
            raise ValueError("more than 9999 visits per night")
        return self

    def _check_above_horizon(self) -> None:
        """The field must be above the horizon at every hour angle observed (the airmass is undefined
        below it): altitude = asin(sin(lat) sin(dec) + cos(lat) cos(dec) cos(HA)) is lowest at the largest
        |HA| of the night's range, and at most 90 - |lat - dec| (at transit)."""
        lat, dec = math.radians(self.site_latitude_deg), math.radians(self.field_dec_deg)
        transit = 90.0 - abs(self.site_latitude_deg - self.field_dec_deg)
        if transit <= MIN_ALTITUDE_DEG:
            raise ValueError(
                f"field_dec_deg = {self.field_dec_deg} never rises above the horizon at site_latitude_deg = "
                f"{self.site_latitude_deg} (highest altitude {transit:.1f} deg, at transit); a field must reach "
                f"altitude > {MIN_ALTITUDE_DEG:g} deg: |site_latitude_deg - field_dec_deg| must be < "
                f"{90.0 - MIN_ALTITUDE_DEG:g} deg")
        ha = max(abs(self.hour_angle_min_h), abs(self.hour_angle_max_h))
        alt = math.degrees(math.asin(max(-1.0, min(1.0, math.sin(lat) * math.sin(dec)
                                                    + math.cos(lat) * math.cos(dec) * math.cos(math.radians(15.0 * ha))))))
        if alt <= MIN_ALTITUDE_DEG:
            raise ValueError(
                f"field_dec_deg = {self.field_dec_deg} at site_latitude_deg = {self.site_latitude_deg} is at "
                f"altitude {alt:.1f} deg at hour angle {ha:g} h (hour_angle_min_h / hour_angle_max_h = "
                f"{self.hour_angle_min_h:g} / {self.hour_angle_max_h:g}): it must be above {MIN_ALTITUDE_DEG:g} "
                f"deg; narrow the hour-angle range or move the field")

    # ------------------------------------------------------------ helpers
    def focal_plane_radius_pix(self) -> float:
        """Radius of the farthest detector corner from the boresight, pixels (same layout as make_camera)."""
        ncol = int(math.ceil(math.sqrt(self.n_detectors)))
        nrow = int(math.ceil(self.n_detectors / ncol))
        half_w = (ncol - 1) / 2.0 * (self.detector_nx + self.detector_gap_pix) + self.detector_nx / 2.0
        half_h = (nrow - 1) / 2.0 * (self.detector_ny + self.detector_gap_pix) + self.detector_ny / 2.0
        return math.hypot(half_w, half_h)

    def night_dates(self) -> list[dt.date]:
        """The observing nights (local evening dates), in order."""
        out = []
        for i in range(self.n_nights):
            season, k = divmod(i, self.nights_per_season)
            out.append(self.start_day_obs + dt.timedelta(days=season * self.season_spacing_days
                                                         + k * self.night_spacing_days))
        return out

    @property
    def physical_filters(self) -> dict[str, str]:
        """physical_filter -> band."""
        return {f"{b}_sim": b for b in self.bands}

    @property
    def n_visits(self) -> int:
        return self.n_nights * self.visits_per_night_per_band * len(self.bands)
