"""Truth tables (Parquet) and the helpers that give every column a unit and a description.

Every table written by the simulator carries, per field, ``unit`` and
``description`` metadata, and at schema level ``units`` (JSON column -> unit)
plus ``lsst_prod.sim`` (JSON: simulator version, seed, instrument).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config.simulation import SimulationConfig
from .cadence import VisitTruth
from .sky import SkyCatalog
from .spec import KIND_NAMES, SIM_VERSION

# column -> (unit, description); "{band}" entries are expanded per band
COLUMN_DOCS: dict[str, tuple[str, str]] = {
    # truth_objects
    "truth_id": ("", "unique object ID (1..N)"),
    "kind": ("", "'star', 'galaxy', 'transient' or 'asteroid'"),
    "ra": ("deg", "right ascension (ICRS)"),
    "dec": ("deg", "declination (ICRS)"),
    "epoch_mjd": ("d", "epoch of ra/dec: refcat epoch (stars, galaxies) or the visit's TAI mid-exposure"),
    "pmra": ("mas/yr", "proper motion in right ascension, times cos(dec)"),
    "pmdec": ("mas/yr", "proper motion in declination"),
    "parallax": ("mas", "parallax"),
    "{band}_flux": ("nJy", "flux at the mean magnitude in {band}"),
    "{band}_fluxErr": ("nJy", "flux error in {band}"),
    "is_variable": ("", "sinusoidal variable: m = m_mean + A sin(2 pi (t - t_ref)/P + phase)"),
    "var_amp_mag": ("mag", "variability semi-amplitude A"),
    "var_period_d": ("d", "variability period P"),
    "var_phase": ("rad", "variability phase at t_ref = refcat epoch"),
    "bulge_frac": ("", "fraction of the galaxy flux in the de Vaucouleurs bulge"),
    "bulge_hlr_arcsec": ("arcsec", "bulge half-light radius (circularised, before shear)"),
    "disk_hlr_arcsec": ("arcsec", "exponential disk half-light radius (before shear)"),
    "g1": ("", "intrinsic reduced shear, +g1 elongated East-West"),
    "g2": ("", "intrinsic reduced shear, +g2 elongated North-West/South-East"),
    "visit": ("", "visit ID"),
    "rate_ra_deg_per_day": ("deg/d", "asteroid rate in ra cos(dec)"),
    "rate_dec_deg_per_day": ("deg/d", "asteroid rate in dec"),
    "ref_id": ("", "ID in the reference catalog, -1 if absent"),
    # refcat
    "ra_err": ("mas", "error of ra cos(dec)"),
    "dec_err": ("mas", "error of dec"),
    "pmra_err": ("mas/yr", "error of pmra"),
    "pmdec_err": ("mas/yr", "error of pmdec"),
    "parallax_err": ("mas", "error of parallax"),
    "phot_g_mean_flux": ("nJy", "Gaia-like G flux (AB-normalised), truth + noise"),
    "phot_g_mean_fluxErr": ("nJy", "error of phot_g_mean_flux"),
    "phot_bp_mean_flux": ("nJy", "Gaia-like BP flux (AB-normalised), truth + noise"),
    "phot_bp_mean_fluxErr": ("nJy", "error of phot_bp_mean_flux"),
    "phot_rp_mean_flux": ("nJy", "Gaia-like RP flux (AB-normalised), truth + noise"),
    "phot_rp_mean_fluxErr": ("nJy", "error of phot_rp_mean_flux"),
    "bp_rp": ("mag", "BP - RP colour from the reported fluxes"),
    "phot_variable_flag": ("", "flagged variable by the Gaia-like catalogue (incomplete, with false positives)"),
    # truth_ccdvisits
    "detector": ("", "detector ID"),
    "band": ("", "band"),
    "physical_filter": ("", "physical filter"),
    "day_obs": ("", "observing night YYYYMMDD"),
    "seq": ("", "sequence number within day_obs"),
    "mjd_start": ("d", "TAI MJD of shutter open"),
    "mjd_mid": ("d", "TAI MJD of mid-exposure"),
    "exptime": ("s", "exposure time"),
    "seeing_fwhm_arcsec": ("arcsec", "PSF FWHM at the detector centre"),
    "seeing_fwhm_boresight_arcsec": ("arcsec", "PSF FWHM at the boresight (the visit's seeing)"),
    "psf_fwhm_pix": ("pixel", "PSF FWHM at the detector centre (truth_sources: at the source)"),
    "psf_g1": ("", "PSF reduced shear g1, detector axes (at the detector centre / source)"),
    "psf_g2": ("", "PSF reduced shear g2, detector axes (at the detector centre / source)"),
    "sky_e_per_pix": ("electron", "mean sky per pixel, before the flat"),
    "zero_point": ("mag", "TRUE zero point: AB magnitude giving 1 electron in the exposure"),
    "transparency_mag": ("mag", "per-visit extinction offset (ZP = ... - transparency)"),
    "qe_factor": ("", "per-detector, per-band QE factor in the zero point"),
    "sky_factor": ("", "per-visit sky brightness factor"),
    "airmass": ("", "airmass at mid-exposure (Kasten & Young)"),
    "altitude": ("deg", "altitude at mid-exposure"),
    "azimuth": ("deg", "azimuth at mid-exposure, North through East"),
    "zenith_distance": ("deg", "zenith distance at mid-exposure"),
    "hour_angle_h": ("h", "hour angle at mid-exposure"),
    "true_ra": ("deg", "TRUE boresight right ascension"),
    "true_dec": ("deg", "TRUE boresight declination"),
    "true_rotation": ("deg", "TRUE rotation (position angle of +y, North through East)"),
    "cmd_ra": ("deg", "commanded boresight right ascension (header RA)"),
    "cmd_dec": ("deg", "commanded boresight declination (header DEC)"),
    "cmd_rotation": ("deg", "commanded rotation (header ROTPA)"),
    "pixel_scale_arcsec": ("arcsec/pixel", "nominal pixel scale (true mapping uses it too)"),
    "distortion_k": ("1/pixel^2", "radial distortion r_true = r (1 + k r^2), focal-plane pixels"),
    "psf_fwhm_growth": ("", "PSF FWHM = seeing/scale x (1 + growth (r/r_ref)^2)"),
    "psf_r_ref_pix": ("pixel", "focal-plane reference radius of the PSF/flat variations"),
    "psf_g1_0": ("", "PSF g1 = g1_0 + g1_u u/r_ref + g1_v v/r_ref"),
    "psf_g1_u": ("", "PSF g1 gradient along focal-plane u"),
    "psf_g1_v": ("", "PSF g1 gradient along focal-plane v"),
    "psf_g2_0": ("", "PSF g2 = g2_0 + g2_u u/r_ref + g2_v v/r_ref"),
    "psf_g2_u": ("", "PSF g2 gradient along focal-plane u"),
    "psf_g2_v": ("", "PSF g2 gradient along focal-plane v"),
    "earth_x_au": ("AU", "Earth barycentric x (ICRS) at mid-exposure"),
    "earth_y_au": ("AU", "Earth barycentric y (ICRS) at mid-exposure"),
    "earth_z_au": ("AU", "Earth barycentric z (ICRS) at mid-exposure"),
    "seeing_fwhm_boresight": ("arcsec", "visit seeing"),
    "gain": ("electron/adu", "detector gain"),
    "read_noise": ("electron", "detector read noise"),
    "n_cosmic_rays": ("", "number of cosmic-ray events added"),
    "n_cosmic_ray_pixels": ("", "number of pixels hit by cosmic rays"),
    # truth_sources
    "x": ("pixel", "TRUE 0-based column of the centre at the visit's epoch"),
    "y": ("pixel", "TRUE 0-based row of the centre at the visit's epoch"),
    "flux_nJy": ("nJy", "flux at the visit's epoch (variability included)"),
    "flux_e": ("electron", "expected electrons of the whole profile (flux_nJy at the true zero point)"),
    "mag": ("mag", "AB magnitude at the visit's epoch"),
    "is_saturated": ("", "noise-free model (all objects + sky) reaches saturation in the 3x3 pixels around the centre"),
    "nn_dist_pix": ("pixel", "distance to the nearest other drawn object (inf if none)"),
    "nn_flux_ratio": ("", "flux_e of that neighbour / flux_e of this object"),
    "peak_e": ("electron", "peak pixel of the object's own noise-free image"),
}


def doc_for(name: str, bands: Sequence[str]) -> tuple[str, str]:
    if name in COLUMN_DOCS:
        return COLUMN_DOCS[name]
    for b in bands:
        for suffix in ("_flux", "_fluxErr"):
            if name == f"{b}{suffix}":
                unit, desc = COLUMN_DOCS["{band}" + suffix]
                return unit, desc.format(band=b)
    return "", ""


def arrow_table(columns: Mapping[str, Any], config: SimulationConfig, kind: str,
                extra_meta: Mapping[str, Any] | None = None) -> pa.Table:
    """A pyarrow Table with unit/description metadata on every field."""
    fields = []
    arrays = []
    units = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.dtype == object:
            arr = pa.array(values, type=pa.string())  # typed even when empty
        else:
            arr = pa.array(values)
        unit, desc = doc_for(name, config.bands)
        units[name] = unit
        fields.append(pa.field(name, arr.type, metadata={"unit": unit, "description": desc}))
        arrays.append(arr)
    meta = {"dataset": kind, "version": SIM_VERSION, "seed": config.seed, "instrument": config.instrument}
    if extra_meta:
        meta.update(extra_meta)
    schema = pa.schema(fields, metadata={"units": json.dumps(units), "lsst_prod.sim": json.dumps(meta)})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet(table: pa.Table, path: Path | str) -> None:
    pq.write_table(table, str(path), compression="zstd")


# ------------------------------------------------------------------ tables
def truth_objects_table(config: SimulationConfig, sky: SkyCatalog) -> pa.Table:
    cols: dict[str, Any] = {
        "truth_id": sky.truth_id,
        "kind": np.array(KIND_NAMES, dtype=object)[sky.kind.astype(int)],
        "ra": sky.ra,
        "dec": sky.dec,
        "epoch_mjd": sky.epoch_mjd,
        "pmra": sky.pmra,
        "pmdec": sky.pmdec,
        "parallax": sky.parallax,
    }
    for b in config.bands:
        cols[f"{b}_flux"] = sky.flux_njy(b)
    cols.update({
        "is_variable": sky.is_variable,
        "var_amp_mag": sky.var_amp_mag,
        "var_period_d": sky.var_period_d,
        "var_phase": sky.var_phase,
        "bulge_frac": sky.bulge_frac,
        "bulge_hlr_arcsec": sky.bulge_hlr_arcsec,
        "disk_hlr_arcsec": sky.disk_hlr_arcsec,
        "g1": sky.g1,
        "g2": sky.g2,
        "visit": sky.visit,
        "rate_ra_deg_per_day": sky.rate_ra_deg_per_day,
        "rate_dec_deg_per_day": sky.rate_dec_deg_per_day,
        "ref_id": sky.ref_id,
    })
    return arrow_table(cols, config, "truth_objects", {"refcat_epoch_mjd": config.refcat_epoch_mjd})


def truth_ccdvisits_table(config: SimulationConfig, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    rows = sorted(rows, key=lambda r: (r["visit"], r["detector"]))
    names = list(rows[0].keys()) if rows else []
    cols = {n: [r[n] for r in rows] for n in names}
    return arrow_table(cols, config, "truth_ccdvisits")


def truth_sources_table(config: SimulationConfig, columns: Mapping[str, Any], visit: int, detector: int) -> pa.Table:
    return arrow_table(columns, config, "truth_sources", {"visit": int(visit), "detector": int(detector)})


def visit_truth_from_row(row: Mapping[str, Any]) -> VisitTruth:
    """Rebuild a :class:`VisitTruth` (for true_sky_to_pixel etc.) from a truth_ccdvisits row."""
    return VisitTruth.from_row(row)


def read_table(path: Path | str) -> pa.Table:
    return pq.read_table(str(path))
