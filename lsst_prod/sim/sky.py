"""The simulated sky: stars (with proper motion, parallax, variability), galaxies, transients, asteroids.

All objects live in a spherical cap around the field centre that covers every
visit's focal plane (plus dithers, pointing errors and the render margin).

Magnitudes are drawn in the r band and the other bands follow from colours:

* stars: ``g - r`` from a two-population mixture (turn-off/halo stars around
  0.35, M dwarfs around 1.3) and a simple stellar locus
  ``u-g = 0.8 + 1.3 (g-r)`` (max 2.9), ``r-i = 0.38 (g-r) - 0.05 + 4 max(0, g-r-1.2)``,
  ``i-z = 0.45 (r-i)``, ``z-y = 0.25 (i-z)``; a metallicity-like hidden parameter
  ``feh`` (:func:`star_feh`: N(-0.8, 0.4) dex for the blue population, N(-0.2, 0.25) for
  the M dwarfs, clipped to [-3, 0.5]) adds the UV excess ``u-g += 0.15 (feh + 0.5)``
  and shapes the Gaia-like photometry of the reference catalogue (``refcat.py``);
* galaxies: ``g-r ~ U(0.3, 1.0)``, ``u-g = 0.5 + (g-r)``, ``r-i = 0.2 + 0.3 (g-r)``,
  ``i-z = 0.1 + 0.2 (g-r)``, ``z-y = 0.05 + 0.1 (g-r)``.

Variable stars: ``m(t) = m_mean + A sin(2 pi (t - t_ref) / P + phase)`` in every
band (t: TAI MJD at mid-exposure, t_ref = refcat_epoch_mjd).  The ``{band}_flux``
stored for every object is the flux at the mean magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..camera import Camera
from ..config.simulation import KNOWN_BANDS, SimulationConfig
from .astrometry import inverse_gnomonic, offset_position, positions_at_epoch, true_pixel_to_sky
from .cadence import VisitTruth
from .spec import KIND_ASTEROID, KIND_GALAXY, KIND_STAR, KIND_TRANSIENT, focal_plane_extent, mag_to_njy, rng_for


@dataclass
class SkyCatalog:
    """Column arrays of every simulated object (one row per object, ``truth_id`` ascending)."""

    truth_id: np.ndarray  # int64
    kind: np.ndarray  # int8: KIND_STAR, KIND_GALAXY, KIND_TRANSIENT, KIND_ASTEROID
    ra: np.ndarray  # deg, at epoch_mjd
    dec: np.ndarray
    epoch_mjd: np.ndarray  # refcat epoch for stars/galaxies; mid-exposure of the visit for transients/asteroids
    pmra: np.ndarray  # mas/yr, includes cos(dec)
    pmdec: np.ndarray
    parallax: np.ndarray  # mas
    mag: dict[str, np.ndarray]  # AB mag at the mean magnitude, every known band
    is_variable: np.ndarray
    var_amp_mag: np.ndarray
    var_period_d: np.ndarray
    var_phase: np.ndarray  # radians
    bulge_frac: np.ndarray
    bulge_hlr_arcsec: np.ndarray
    disk_hlr_arcsec: np.ndarray
    g1: np.ndarray  # intrinsic reduced shear, sky frame (West, North)
    g2: np.ndarray
    visit: np.ndarray  # int64: the one visit of a transient/asteroid, else -1
    rate_ra_deg_per_day: np.ndarray  # asteroids: d(ra cos dec)/dt
    rate_dec_deg_per_day: np.ndarray
    ref_id: np.ndarray  # int64, -1 when not in the reference catalog (set by refcat.assign_ref_ids)
    feh: np.ndarray  # metallicity-like hidden parameter of stars, dex (NaN for other objects)

    def __len__(self) -> int:
        return int(self.truth_id.size)

    def flux_njy(self, band: str) -> np.ndarray:
        """Flux at the mean magnitude, nJy."""
        return mag_to_njy(self.mag[band])

    # ---- per-visit views
    def present(self, vt: VisitTruth) -> np.ndarray:
        """Which objects exist in this visit (transients and asteroids only in theirs)."""
        single = (self.kind == KIND_TRANSIENT) | (self.kind == KIND_ASTEROID)
        return ~single | (self.visit == vt.visit)

    def positions(self, vt: VisitTruth, ref_epoch_mjd: float) -> tuple[np.ndarray, np.ndarray]:
        """TRUE (ra, dec) in deg of every object at the visit's mid-exposure time."""
        ra, dec = positions_at_epoch(self.ra, self.dec, self.pmra, self.pmdec, self.parallax, vt.mjd_mid,
                                     vt.earth_xyz_au, ref_epoch_mjd)
        ast = self.kind == KIND_ASTEROID
        if np.any(ast):
            dt_d = vt.mjd_mid - self.epoch_mjd[ast]
            ra_a, dec_a = offset_position(self.ra[ast], self.dec[ast], self.rate_ra_deg_per_day[ast] * dt_d * 3600.0,
                                          self.rate_dec_deg_per_day[ast] * dt_d * 3600.0)
            ra = ra.copy()
            dec = dec.copy()
            ra[ast], dec[ast] = ra_a, dec_a
        return ra, dec

    def fluxes(self, vt: VisitTruth, ref_epoch_mjd: float) -> np.ndarray:
        """Flux in nJy in the visit's band at its mid-exposure (variability included; 0 if absent)."""
        f = self.flux_njy(vt.band).copy()
        var = self.is_variable
        if np.any(var):
            ph = 2.0 * np.pi * (vt.mjd_mid - ref_epoch_mjd) / self.var_period_d[var] + self.var_phase[var]
            f[var] *= 10.0 ** (-0.4 * self.var_amp_mag[var] * np.sin(ph))
        f[~self.present(vt)] = 0.0
        return f


# ----------------------------------------------------------------- helpers
def power_law_mags(rng: np.random.Generator, n: int, m_min: float, m_max: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm proportional to 10**(slope m) on [m_min, m_max]."""
    u = rng.uniform(size=n)
    if slope <= 0:
        return m_min + (m_max - m_min) * u
    a, b = 10.0 ** (slope * m_min), 10.0 ** (slope * m_max)
    return np.log10(a + u * (b - a)) / slope


def cap_radius_deg(config: SimulationConfig, camera: Camera) -> float:
    """Radius of the sky cap that holds every object any visit can see."""
    _, _, r_fp = focal_plane_extent(camera)
    r_fp = r_fp * (1.0 + abs(config.distortion_k_per_pix2) * r_fp**2) + config.render_margin_pix + 250.0
    arcsec = (r_fp * config.pixel_scale_arcsec + config.dither_radius_arcsec
              + 6.0 * config.pointing_error_rms_arcsec + 10.0)
    return arcsec / 3600.0


def uniform_in_cap(rng: np.random.Generator, n: int, ra0: float, dec0: float, radius_deg: float):
    """n positions uniform on the sphere within ``radius_deg`` of (ra0, dec0)."""
    cos_r = math.cos(math.radians(radius_deg))
    z = rng.uniform(cos_r, 1.0, size=n)  # cos(angular distance)
    theta = np.arccos(z)
    phi = rng.uniform(0.0, 2.0 * np.pi, size=n)
    # tangent-plane direction then exact inverse gnomonic (tan of the angular distance)
    t = np.tan(theta)
    return inverse_gnomonic(ra0, dec0, t * np.sin(phi), t * np.cos(phi))


def cap_area_deg2(radius_deg: float) -> float:
    return 2.0 * math.pi * (1.0 - math.cos(math.radians(radius_deg))) * (180.0 / math.pi) ** 2


def _mags_from_colours(r: np.ndarray, gr, ug, ri, iz, zy) -> dict[str, np.ndarray]:
    g = r + gr
    i = r - ri
    z = i - iz
    return {"u": g + ug, "g": g, "r": r.copy(), "i": i, "z": z, "y": z - zy}


def star_colours(rng: np.random.Generator, r: np.ndarray) -> dict[str, np.ndarray]:
    n = r.size
    red = rng.uniform(size=n) < 0.4
    gr = np.where(red, np.clip(rng.normal(1.3, 0.15, n), 0.8, 1.6), np.clip(rng.normal(0.35, 0.1, n), 0.1, 0.8))
    ug = np.minimum(0.8 + 1.3 * gr, 2.9)
    ri = 0.38 * gr - 0.05 + 4.0 * np.maximum(0.0, gr - 1.2)
    iz = 0.45 * ri
    zy = 0.25 * iz
    return _mags_from_colours(r, gr, ug, ri, iz, zy)


#: metallicity of the stellar locus above (``feh`` at which the UV excess is zero), dex
FEH_LOCUS = -0.5
#: UV excess: d(u-g)/d(feh), mag/dex
UV_EXCESS_MAG_PER_DEX = 0.15


def star_feh(rng: np.random.Generator, gr: np.ndarray) -> np.ndarray:
    """Metallicity-like hidden parameter (dex): blue (turn-off/halo, g-r <= 0.8) stars N(-0.8, 0.4),
    red (M dwarf, disc) stars N(-0.2, 0.25); clipped to [-3, 0.5]."""
    blue = np.asarray(gr) <= 0.8
    return np.clip(np.where(blue, rng.normal(-0.8, 0.4, gr.size), rng.normal(-0.2, 0.25, gr.size)), -3.0, 0.5)


def apply_uv_excess(mags: dict[str, np.ndarray], feh: np.ndarray) -> None:
    """Metal-poor stars are brighter in u at a given g-r: ``u-g += 0.15 (feh - FEH_LOCUS)`` (in place)."""
    mags["u"] = mags["u"] + UV_EXCESS_MAG_PER_DEX * (np.asarray(feh) - FEH_LOCUS)


def galaxy_colours(rng: np.random.Generator, r: np.ndarray) -> dict[str, np.ndarray]:
    gr = rng.uniform(0.3, 1.0, r.size)
    return _mags_from_colours(r, gr, 0.5 + gr, 0.2 + 0.3 * gr, 0.1 + 0.2 * gr, 0.05 + 0.1 * gr)


def _empty(n: int, value: float = 0.0, dtype=np.float64) -> np.ndarray:
    return np.full(n, value, dtype=dtype)


# ----------------------------------------------------------------- the sky
def make_sky(config: SimulationConfig, camera: Camera, visits: list[VisitTruth]) -> SkyCatalog:
    """Generate every object; deterministic in ``config.seed`` (stars and galaxies do not depend on the cadence)."""
    radius = cap_radius_deg(config, camera)
    area = cap_area_deg2(radius)
    parts: list[dict[str, np.ndarray]] = []

    # ---- stars
    rng = rng_for(config.seed, "stars")
    n = int(rng.poisson(config.star_density_per_deg2 * area))
    ra, dec = uniform_in_cap(rng, n, config.field_ra_deg, config.field_dec_deg, radius)
    r = power_law_mags(rng, n, config.star_mag_min, config.star_mag_max, config.star_mag_slope)
    mags = star_colours(rng, r)
    gr = mags["g"] - mags["r"]
    # distances: fainter -> farther; M dwarfs (red) nearer
    log_plx = rng.normal(-0.3 - 0.1 * (r - 20.0) + 0.5 * (gr > 1.0), 0.4)
    plx = np.clip(10.0**log_plx, 0.1, 20.0)
    v_t = 10.0 ** rng.normal(math.log10(40.0), 0.3, n)  # km/s
    pm = np.minimum(v_t * plx / 4.74, 150.0)
    pa = rng.uniform(0.0, 2.0 * np.pi, n)
    is_var = rng.uniform(size=n) < config.variable_fraction
    amp = np.where(is_var, rng.uniform(config.var_amp_min_mag, config.var_amp_max_mag, n), 0.0)
    per = np.where(is_var, 10.0 ** rng.uniform(math.log10(config.var_period_min_d),
                                                 math.log10(config.var_period_max_d), n), 0.0)
    phase = np.where(is_var, rng.uniform(0.0, 2.0 * np.pi, n), 0.0)
    feh = star_feh(rng_for(config.seed, "stars_feh"), gr)  # own stream: the draws above are unchanged
    apply_uv_excess(mags, feh)
    parts.append(dict(kind=_empty(n, KIND_STAR, np.int8), ra=ra, dec=dec, epoch_mjd=_empty(n, config.refcat_epoch_mjd),
                      pmra=pm * np.sin(pa), pmdec=pm * np.cos(pa), parallax=plx, mags=mags, is_variable=is_var,
                      var_amp_mag=amp, var_period_d=per, var_phase=phase, feh=feh))

    # ---- galaxies
    rng = rng_for(config.seed, "galaxies")
    n = int(rng.poisson(config.galaxy_density_per_deg2 * area))
    ra, dec = uniform_in_cap(rng, n, config.field_ra_deg, config.field_dec_deg, radius)
    r = power_law_mags(rng, n, config.galaxy_mag_min, config.galaxy_mag_max, config.galaxy_mag_slope)
    mags = galaxy_colours(rng, r)
    lo, hi = math.log10(config.galaxy_hlr_min_arcsec), math.log10(config.galaxy_hlr_max_arcsec)
    frac = (r - config.galaxy_mag_min) / (config.galaxy_mag_max - config.galaxy_mag_min)
    disk = 10.0 ** np.clip(hi + (lo - hi) * frac + rng.normal(0.0, 0.1, n), lo, hi)
    bulge = np.maximum(disk * rng.uniform(0.2, 0.5, n), 0.05)
    bf = rng.beta(1.2, 2.5, n)
    g1 = rng.normal(0.0, config.galaxy_g_rms, n)
    g2 = rng.normal(0.0, config.galaxy_g_rms, n)
    gabs = np.hypot(g1, g2)
    shrink = np.where(gabs > 0.7, 0.7 / np.maximum(gabs, 1e-12), 1.0)
    parts.append(dict(kind=_empty(n, KIND_GALAXY, np.int8), ra=ra, dec=dec, epoch_mjd=_empty(n, config.refcat_epoch_mjd),
                      mags=mags, bulge_frac=bf, bulge_hlr_arcsec=bulge, disk_hlr_arcsec=disk,
                      g1=g1 * shrink, g2=g2 * shrink))

    # ---- transients and asteroids: placed on a random detector of a random visit
    dets = list(camera.detectors)
    for kind, count, stream in ((KIND_TRANSIENT, config.n_transients, "transients"),
                                (KIND_ASTEROID, config.n_asteroids, "asteroids")):
        rng = rng_for(config.seed, stream)
        n = count if visits else 0
        ra = np.empty(n)
        dec = np.empty(n)
        ep = np.empty(n)
        vis = np.empty(n, dtype=np.int64)
        for j in range(n):
            vt = visits[int(rng.integers(len(visits)))]
            det = dets[int(rng.integers(len(dets)))]
            x = rng.uniform(20.0, det.nx - 21.0)
            y = rng.uniform(20.0, det.ny - 21.0)
            a, d = true_pixel_to_sky(vt, det, x, y)
            ra[j], dec[j], ep[j], vis[j] = float(a), float(d), vt.mjd_mid, vt.visit
        if kind == KIND_TRANSIENT:
            r = rng.uniform(config.transient_mag_min, config.transient_mag_max, n)
            gr = rng.uniform(-0.2, 0.8, n)
            mags = _mags_from_colours(r, gr, 0.3 + 0.5 * gr, 0.1 + 0.3 * gr, 0.05 + 0.2 * gr, 0.05 * gr)
            extra = {}
        else:
            r = rng.uniform(config.asteroid_mag_min, config.asteroid_mag_max, n)
            gr = rng.normal(0.55, 0.05, n)
            mags = _mags_from_colours(r, gr, 1.3 + 0 * gr, 0.18 + 0 * gr, 0.03 + 0 * gr, 0.02 + 0 * gr)
            speed = rng.uniform(config.asteroid_rate_min_deg_per_day, config.asteroid_rate_max_deg_per_day, n)
            ang = rng.uniform(0.0, 2.0 * np.pi, n)
            extra = dict(rate_ra_deg_per_day=speed * np.sin(ang), rate_dec_deg_per_day=speed * np.cos(ang))
        parts.append(dict(kind=_empty(n, kind, np.int8), ra=ra, dec=dec, epoch_mjd=ep, mags=mags, visit=vis, **extra))

    return _concat(parts)


def _concat(parts: list[dict[str, np.ndarray]]) -> SkyCatalog:
    cols_f = ["ra", "dec", "epoch_mjd", "pmra", "pmdec", "parallax", "var_amp_mag", "var_period_d", "var_phase",
              "bulge_frac", "bulge_hlr_arcsec", "disk_hlr_arcsec", "g1", "g2", "rate_ra_deg_per_day",
              "rate_dec_deg_per_day", "feh"]
    out: dict[str, list[np.ndarray]] = {c: [] for c in cols_f + ["kind", "is_variable", "visit"]}
    mags: dict[str, list[np.ndarray]] = {b: [] for b in KNOWN_BANDS}
    for p in parts:
        n = p["kind"].size
        for c in cols_f:
            out[c].append(np.asarray(p.get(c, _empty(n, np.nan if c == "feh" else 0.0)), dtype=np.float64))
        out["kind"].append(p["kind"])
        out["is_variable"].append(np.asarray(p.get("is_variable", _empty(n, False, bool)), dtype=bool))
        out["visit"].append(np.asarray(p.get("visit", _empty(n, -1, np.int64)), dtype=np.int64))
        for b in KNOWN_BANDS:
            mags[b].append(np.asarray(p["mags"][b], dtype=np.float64))
    cat = {c: np.concatenate(v) for c, v in out.items()}
    ntot = cat["ra"].size
    return SkyCatalog(truth_id=np.arange(1, ntot + 1, dtype=np.int64),
                      mag={b: np.concatenate(v) for b, v in mags.items()},
                      ref_id=np.full(ntot, -1, dtype=np.int64), **cat)


__all__ = ["SkyCatalog", "make_sky", "power_law_mags", "cap_radius_deg", "star_colours", "star_feh",
           "apply_uv_excess"]
