"""The Gaia-like reference catalog: noisy astrometry, G/BP/RP photometry, a colour
transformation to the survey bands, and an imperfect variability flag.

Photometry (all magnitudes AB-normalised: a flat f_nu spectrum has G = BP = RP = its AB mag;
Gaia's own Vega zero points would only add constants)

* **True G, BP, RP** are synthetic photometry of the star's true SED: the AB magnitude is
  interpolated linearly in wavelength through the six survey-band magnitudes (at the bands'
  effective wavelengths, held flat beyond u and y) and integrated, photon-counting, over
  smooth top-hat passbands (:data:`GAIA_PASSBANDS`).  The stars' metallicity-like hidden
  parameter ``feh`` adds what six broad-band points cannot describe (line blanketing in the
  blue): ``X += GAIA_FEH_MAG_PER_DEX[X] * (feh - FEH_LOCUS)``.
* **Selection**: TRUE ``G < refcat_mag_limit`` (20.7) and ``G >= refcat_bright_limit`` (3):
  the brightest stars are absent, as in Gaia.
* **Errors** (:func:`gaia_mag_errors`): Gaia DR3's mean-magnitude uncertainties
  (sigma^2 = floor^2 + a z + b z^2, z = 10^(0.4 (G - 20)), through 0.3/1/6 mmag at G = 13/17/20
  for G, 0.9/12/108 for BP, 0.6/6/52 for RP), multiplied by ``1 + ((13 - G)/2.5)^2`` for
  G < 13 (window gating and saturation make the bright stars worse).
  Reported = truth + N(0, err), in flux (``phot_*_mean_flux``, nJy).
* **Survey bands** (:class:`GaiaTransformation`): ``m_b = G + P_b(BP - RP)``, ``P_b`` a cubic
  fitted once, by least squares, on a fixed library of 20 000 synthetic stars drawn from the
  simulator's own stellar population (``sky.star_colours`` + ``sky.star_feh``, fixed seed:
  the "published" transformation is the same for every simulation); BP-RP is clamped to
  the library's range.  Its residuals ``m_true - m_transformed`` depend on the star (its
  ``feh``); their library rms per band is ``GaiaTransformation.scatter``
  (grizy 10-20 mmag, u ~60 mmag because of the UV excess) and is added in quadrature to the
  propagated G/BP/RP errors in ``{band}_fluxErr``, as a systematic floor.
  ``{band}_flux`` is what a Rubin refcat carries: the Gaia photometry through the
  transformation, never the truth.

Astrometry: errors grow with G as ``s(G) = s_min + (s_max - s_min) 10**(0.4 (G - limit))``
(position, mas on ra cos dec and on dec), ``pm_err = scale_pm x s_pos``,
``parallax_err = scale_plx x s_pos``; reported = truth + N(0, err) at ``refcat_epoch_mjd``.

Variability (``phot_variable_flag``, :func:`variability_flag_probability`): a variable of
semi-amplitude A is flagged with probability ``c A^4 / (A^4 + A50^4)``, ``c`` =
``refcat_var_flag_completeness``, ``A50 = 2 sigma_epoch(G)``, ``sigma_epoch`` = sqrt(40
transits) x the G error, floor 2 mmag; a constant star is flagged with probability
``refcat_var_flag_false_positive_rate`` (x ``1 + ((13 - G)/2.5)^2`` for G < 13).  The truth
(``is_variable``) is in truth_objects only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config.simulation import KNOWN_BANDS, SimulationConfig
from .astrometry import offset_position
from .sky import FEH_LOCUS, SkyCatalog, apply_uv_excess, star_colours, star_feh
from .spec import AB_NJY_ZERO_POINT, KIND_STAR, mag_to_njy, rng_for
from .truth import arrow_table

REF_ID_OFFSET = 1_000_000
MAG_PER_FRAC = 2.5 / np.log(10.0)

#: effective wavelengths of the survey bands, nm (the SED's nodes)
BAND_WAVELENGTH_NM = {"u": 368.0, "g": 480.0, "r": 621.0, "i": 754.0, "z": 869.0, "y": 971.0}
#: Gaia-like passbands: (blue edge, red edge, edge softness), nm; logistic edges
GAIA_PASSBANDS = {"G": (335.0, 1020.0, 25.0), "BP": (330.0, 670.0, 12.0), "RP": (635.0, 1020.0, 18.0)}
#: what the hidden parameter does to the Gaia magnitudes beyond the six-point SED, mag per dex
GAIA_FEH_MAG_PER_DEX = {"G": 0.032, "BP": 0.032, "RP": 0.032}
#: Gaia DR3-like mean-magnitude errors: (floor, sigma at G=17, sigma at G=20), mmag
GAIA_ERROR_POINTS_MMAG = {"G": (0.3, 1.0, 6.0), "BP": (0.9, 12.0, 108.0), "RP": (0.6, 6.0, 52.0)}
#: below this G the errors (and the false-positive variability rate) grow
GAIA_BRIGHT_DEGRADE_G = 13.0
#: field-of-view transits of a Gaia source (per-epoch error = sqrt(N) x mean error)
GAIA_N_TRANSITS = 40
TRANSFORM_ORDER = 3  # cubic B-spline
TRANSFORM_KNOT_QUANTILES = (0.1, 0.25, 0.4, 0.55, 0.65, 0.75, 0.9)
TRANSFORM_LIBRARY_SIZE = 20_000
TRANSFORM_LIBRARY_SEED = 20160101


# ------------------------------------------------------------------ photometry
def _passband(lam: np.ndarray, band: str) -> np.ndarray:
    lo, hi, w = GAIA_PASSBANDS[band]
    return 1.0 / (1.0 + np.exp(-(lam - lo) / w)) / (1.0 + np.exp(-(hi - lam) / w))


@functools.lru_cache(maxsize=1)
def _sed_grid() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Wavelength grid (nm) and, per Gaia band, photon-counting weights T(l) dl / l, normalised."""
    lam = np.linspace(250.0, 1200.0, 951)
    weights = {}
    for b in GAIA_PASSBANDS:
        w = _passband(lam, b) / lam
        weights[b] = w / w.sum()
    return lam, weights


def gaia_true_mags(mags: dict[str, np.ndarray], feh: np.ndarray) -> dict[str, np.ndarray]:
    """TRUE G, BP, RP (AB-normalised) of stars with survey-band AB magnitudes ``mags`` (all six
    bands) and hidden parameter ``feh`` (dex): synthetic photometry of the piecewise-linear SED
    plus the blanketing term."""
    lam, weights = _sed_grid()
    nodes = np.array([BAND_WAVELENGTH_NM[b] for b in KNOWN_BANDS])
    order = np.argsort(nodes)
    m_nodes = np.stack([np.asarray(mags[b], float) for b in KNOWN_BANDS])[order]  # (6, n)
    # linear interpolation in wavelength, flat beyond the end nodes: (n_lam, 6) matrix
    lam_c = np.clip(lam, nodes[order][0], nodes[order][-1])
    j = np.clip(np.searchsorted(nodes[order], lam_c, side="right") - 1, 0, len(nodes) - 2)
    t = (lam_c - nodes[order][j]) / (nodes[order][j + 1] - nodes[order][j])
    interp = np.zeros((lam.size, len(nodes)))
    interp[np.arange(lam.size), j] = 1.0 - t
    interp[np.arange(lam.size), j + 1] += t
    m_lam = interp @ m_nodes  # (n_lam, n)
    f_lam = 10.0 ** (-0.4 * (m_lam - AB_NJY_ZERO_POINT))
    d_feh = np.asarray(feh, float) - FEH_LOCUS
    out = {}
    for b, w in weights.items():
        f = w @ f_lam
        out[b] = AB_NJY_ZERO_POINT - 2.5 * np.log10(f) + GAIA_FEH_MAG_PER_DEX[b] * d_feh
    return out


def _error_coefficients(band: str) -> tuple[float, float, float]:
    """(floor^2, a, b) of sigma^2 = floor^2 + a z + b z^2 (mmag^2), z = 10^(0.4 (G - 20))."""
    floor, s17, s20 = GAIA_ERROR_POINTS_MMAG[band]
    z17 = 10.0 ** (0.4 * (17.0 - 20.0))
    f2 = floor * floor
    # a + b = s20^2 - f2 ; a z17 + b z17^2 = s17^2 - f2
    b = ((s17 * s17 - f2) - z17 * (s20 * s20 - f2)) / (z17 * z17 - z17)
    a = s20 * s20 - f2 - b
    return f2, a, b


def gaia_mag_errors(g: np.ndarray) -> dict[str, np.ndarray]:
    """Gaia DR3-like uncertainties (mag) of the mean G, BP, RP magnitudes as functions of G."""
    g = np.asarray(g, float)
    z = 10.0 ** (0.4 * (g - 20.0))
    bright = 1.0 + (np.maximum(GAIA_BRIGHT_DEGRADE_G - g, 0.0) / 2.5) ** 2
    out = {}
    for b in GAIA_PASSBANDS:
        f2, a, bb = _error_coefficients(b)
        out[b] = 1e-3 * np.sqrt(f2 + a * z + bb * z * z) * bright
    return out


@dataclass(frozen=True)
class GaiaTransformation:
    """Published Gaia -> survey transformation: ``m_b = G + P_b(c)``, ``c = clip(BP - RP,
    colour_min, colour_max)``, ``P_b`` a cubic B-spline (``knots``, ``coeffs[b]``);
    ``scatter[b]``: rms residual (mag) on the library it was fitted on."""

    knots: tuple[float, ...]
    coeffs: dict[str, tuple[float, ...]]
    colour_min: float
    colour_max: float
    scatter: dict[str, float]

    def _spline(self, band: str):
        from scipy.interpolate import BSpline

        return BSpline(np.asarray(self.knots), np.asarray(self.coeffs[band]), TRANSFORM_ORDER, extrapolate=False)

    def clamp(self, bp_rp: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(bp_rp, float), self.colour_min, self.colour_max)

    def offset(self, band: str, bp_rp: np.ndarray) -> np.ndarray:
        """P_b(BP - RP) = m_b - G."""
        return self._spline(band)(self.clamp(bp_rp))

    def slope(self, band: str, bp_rp: np.ndarray) -> np.ndarray:
        """dP_b/d(BP - RP), at the clamped colour (for propagating colour errors)."""
        return self._spline(band).derivative()(self.clamp(bp_rp))

    def apply(self, band: str, g: np.ndarray, bp_rp: np.ndarray) -> np.ndarray:
        return np.asarray(g, float) + self.offset(band, bp_rp)

    def to_dict(self) -> dict:
        return {"form": "m_band = G + cubic B-spline(clip(BP-RP, colour_min, colour_max); knots, coeffs[band])",
                "knots": list(self.knots), "coeffs": {b: list(v) for b, v in self.coeffs.items()},
                "colour_min": self.colour_min, "colour_max": self.colour_max, "scatter_mag": self.scatter}


def transformation_library(n: int = TRANSFORM_LIBRARY_SIZE, seed: int = TRANSFORM_LIBRARY_SEED):
    """(survey mags, feh, Gaia mags) of the fixed library the transformation is fitted on."""
    rng = rng_for(seed, "gaia_transformation_library")
    r = rng.uniform(14.0, 20.0, n)
    mags = star_colours(rng, r)
    feh = star_feh(rng, mags["g"] - mags["r"])
    apply_uv_excess(mags, feh)
    return mags, feh, gaia_true_mags(mags, feh)


@functools.lru_cache(maxsize=1)
def gaia_transformation() -> GaiaTransformation:
    """Fit the published transformation (cached: it does not depend on the simulation).

    Least-squares cubic B-spline in BP-RP with interior knots at the library's colour
    quantiles ``TRANSFORM_KNOT_QUANTILES``: like published transformations, it follows the
    locus (including its kink and the gap between the two populations) but not the hidden
    parameter.
    """
    from scipy.interpolate import make_lsq_spline

    mags, _, gaia = transformation_library()
    c = gaia["BP"] - gaia["RP"]
    order = np.argsort(c)
    c = c[order]
    lo, hi = float(c[0]), float(c[-1])
    inner = np.quantile(c, TRANSFORM_KNOT_QUANTILES)
    k = TRANSFORM_ORDER
    knots = np.r_[[lo] * (k + 1), inner, [hi] * (k + 1)]
    coeffs, scatter = {}, {}
    for b in KNOWN_BANDS:
        y = (mags[b] - gaia["G"])[order]
        spl = make_lsq_spline(c, y, knots, k)
        coeffs[b] = tuple(float(v) for v in spl.c)
        scatter[b] = float(np.sqrt(np.mean((y - spl(c)) ** 2)))
    return GaiaTransformation(tuple(float(v) for v in knots), coeffs, lo, hi, scatter)


def variability_flag_probability(is_variable: np.ndarray, amp_mag: np.ndarray, g: np.ndarray,
                                 completeness: float, false_positive_rate: float) -> np.ndarray:
    """Probability that a star gets ``phot_variable_flag`` (see the module docstring)."""
    g = np.asarray(g, float)
    sig_epoch = np.hypot(np.sqrt(GAIA_N_TRANSITS) * gaia_mag_errors(g)["G"], 0.002)
    a50 = 2.0 * sig_epoch
    a4 = np.asarray(amp_mag, float) ** 4
    p_var = completeness * a4 / (a4 + a50**4)
    bright = 1.0 + (np.maximum(GAIA_BRIGHT_DEGRADE_G - g, 0.0) / 2.5) ** 2
    p_const = np.minimum(false_positive_rate * bright, 1.0)
    return np.where(np.asarray(is_variable, bool), p_var, p_const)


# ------------------------------------------------------------------ selection
def _star_gaia(sky: SkyCatalog, idx: np.ndarray) -> dict[str, np.ndarray]:
    return gaia_true_mags({b: sky.mag[b][idx] for b in KNOWN_BANDS}, sky.feh[idx])


def select_reference_stars(config: SimulationConfig, sky: SkyCatalog) -> np.ndarray:
    """Indices (into ``sky``) of the reference stars, ascending: stars with
    ``refcat_bright_limit <= G_true < refcat_mag_limit``."""
    stars = np.flatnonzero(sky.kind == KIND_STAR)
    g = _star_gaia(sky, stars)["G"]
    return stars[(g < config.refcat_mag_limit) & (g >= config.refcat_bright_limit)]


def error_law(m: np.ndarray, limit: float, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * 10.0 ** (0.4 * (np.asarray(m) - limit))


def assign_ref_ids(config: SimulationConfig, sky: SkyCatalog) -> np.ndarray:
    """Set ``sky.ref_id`` for the reference stars; return their indices."""
    idx = select_reference_stars(config, sky)
    sky.ref_id[:] = -1
    sky.ref_id[idx] = REF_ID_OFFSET + np.arange(idx.size, dtype=np.int64)
    return idx


def make_refcat(config: SimulationConfig, sky: SkyCatalog) -> pa.Table:
    idx = assign_ref_ids(config, sky)
    rng = rng_for(config.seed, "refcat")
    n = idx.size
    gaia = _star_gaia(sky, idx)
    g_true = gaia["G"]
    lim = config.refcat_mag_limit
    s_pos = error_law(np.minimum(g_true, lim), lim, config.refcat_pos_err_min_mas, config.refcat_pos_err_max_mas)
    s_pm = config.refcat_pm_err_scale_per_yr * s_pos
    s_plx = config.refcat_parallax_err_scale * s_pos
    d_east = rng.normal(0.0, 1.0, n) * s_pos
    d_north = rng.normal(0.0, 1.0, n) * s_pos
    ra, dec = offset_position(sky.ra[idx], sky.dec[idx], d_east * 1e-3, d_north * 1e-3)  # mas -> arcsec
    cols = {
        "ref_id": sky.ref_id[idx],
        "ra": ra,
        "dec": dec,
        "ra_err": s_pos,
        "dec_err": s_pos.copy(),
        "pmra": sky.pmra[idx] + rng.normal(0.0, 1.0, n) * s_pm,
        "pmdec": sky.pmdec[idx] + rng.normal(0.0, 1.0, n) * s_pm,
        "pmra_err": s_pm,
        "pmdec_err": s_pm.copy(),
        "parallax": sky.parallax[idx] + rng.normal(0.0, 1.0, n) * s_plx,
        "parallax_err": s_plx,
        "epoch_mjd": np.full(n, config.refcat_epoch_mjd),
    }
    # Gaia photometry: truth + noise, in flux
    rng_p = rng_for(config.seed, "refcat_gaia_photometry")
    err = gaia_mag_errors(g_true)
    obs: dict[str, np.ndarray] = {}
    for b, name in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
        f_true = mag_to_njy(gaia[b])
        f_err = f_true * err[b] / MAG_PER_FRAC
        f = f_true + rng_p.normal(0.0, 1.0, n) * f_err
        f = np.maximum(f, 1e-3 * f_true)  # never negative (only ever at > 300 sigma)
        cols[f"phot_{name}_mean_flux"] = f
        cols[f"phot_{name}_mean_fluxErr"] = f_err
        obs[b] = AB_NJY_ZERO_POINT - 2.5 * np.log10(f)
    bp_rp = obs["BP"] - obs["RP"]
    cols["bp_rp"] = bp_rp
    # survey bands through the published transformation
    tr = gaia_transformation()
    for b in config.bands:
        m = tr.apply(b, obs["G"], bp_rp)
        s = tr.slope(b, bp_rp)
        sig = np.sqrt(err["G"] ** 2 + s * s * (err["BP"] ** 2 + err["RP"] ** 2) + tr.scatter[b] ** 2)
        f = mag_to_njy(m)
        cols[f"{b}_flux"] = f
        cols[f"{b}_fluxErr"] = f * sig / MAG_PER_FRAC
    # the variability flag: incomplete, with false positives
    rng_v = rng_for(config.seed, "refcat_variability")
    p = variability_flag_probability(sky.is_variable[idx], sky.var_amp_mag[idx], g_true,
                                     config.refcat_var_flag_completeness, config.refcat_var_flag_false_positive_rate)
    cols["phot_variable_flag"] = rng_v.uniform(size=n) < p
    return arrow_table(cols, config, "refcat", {"epoch_mjd": config.refcat_epoch_mjd, "mag_limit_G": lim,
                                                "bright_limit_G": config.refcat_bright_limit,
                                                "transformation": tr.to_dict()})


__all__ = ["make_refcat", "select_reference_stars", "assign_ref_ids", "error_law", "gaia_true_mags",
           "gaia_mag_errors", "gaia_transformation", "GaiaTransformation", "transformation_library",
           "variability_flag_probability", "REF_ID_OFFSET"]
