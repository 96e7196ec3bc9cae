"""The Gaia-like reference catalog: noisy astrometry and photometry of the brighter stars.

Selection: stars whose TRUE mean magnitude in ``config.effective_refcat_band``
is brighter than ``refcat_mag_limit`` (variables included, flagged).

Errors grow with magnitude ``m`` (in the refcat band) as::

    s(m) = s_min + (s_max - s_min) * 10**(0.4 (m - limit))

for the position (mas, on ra cos dec and on dec), with ``pm_err = scale_pm x
s_pos`` (mas/yr), ``parallax_err = scale_plx x s_pos`` (mas) and, for every
band's flux, a fractional error with the same law.  Every reported value is
truth + N(0, err); reported positions are at ``refcat_epoch_mjd``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config.simulation import SimulationConfig
from .astrometry import offset_position
from .sky import SkyCatalog
from .spec import KIND_STAR, rng_for
from .truth import arrow_table

REF_ID_OFFSET = 1_000_000


def select_reference_stars(config: SimulationConfig, sky: SkyCatalog) -> np.ndarray:
    """Indices (into ``sky``) of the reference stars, ascending."""
    m = sky.mag[config.effective_refcat_band]
    return np.flatnonzero((sky.kind == KIND_STAR) & (m < config.refcat_mag_limit))


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
    m = sky.mag[config.effective_refcat_band][idx]
    lim = config.refcat_mag_limit
    s_pos = error_law(m, lim, config.refcat_pos_err_min_mas, config.refcat_pos_err_max_mas)
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
    frac = error_law(m, lim, config.refcat_flux_err_min_frac, config.refcat_flux_err_max_frac)
    for b in config.bands:
        f = sky.flux_njy(b)[idx]
        err = frac * f
        cols[f"{b}_flux"] = f + rng.normal(0.0, 1.0, n) * err
        cols[f"{b}_fluxErr"] = err
    cols["is_variable"] = sky.is_variable[idx]
    return arrow_table(cols, config, "refcat", {"epoch_mjd": config.refcat_epoch_mjd,
                                                "mag_limit": lim, "limit_band": config.effective_refcat_band})
