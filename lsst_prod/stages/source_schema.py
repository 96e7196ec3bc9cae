"""The Source table: measurement columns (electrons, pixels) -> DP1 Source columns (nJy, degrees).

Column names and units follow Rubin's DP1 schema (shared/reference/schemas);
``*_instFlux`` columns keep the instrumental values in electrons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.wcs import WCS

APERTURE_RADII = (3, 6, 9, 12, 17, 25, 35, 50, 70)

SOURCE_UNITS: dict[str, str] = {
    "coord_ra": "deg", "coord_dec": "deg", "ra": "deg", "dec": "deg", "raErr": "deg", "decErr": "deg",
    "ra_dec_Cov": "deg**2", "x": "pixel", "y": "pixel", "xErr": "pixel", "yErr": "pixel",
    "calibFlux": "nJy", "calibFluxErr": "nJy", "psfFlux": "nJy", "psfFluxErr": "nJy", "gaussianFlux": "nJy",
    "gaussianFluxErr": "nJy", "sky": "nJy", "skyErr": "nJy", "ixx": "pixel**2", "iyy": "pixel**2", "ixy": "pixel**2",
    "ixxPSF": "pixel**2", "iyyPSF": "pixel**2", "ixyPSF": "pixel**2", "psfFlux_area": "pixel",
    "footprintArea_value": "pixel", "localBackground_instFlux": "count", "localBackground_instFluxErr": "count",
    "psfFlux_instFlux": "count", "psfFlux_instFluxErr": "count",
    **{f"ap{r:02d}Flux": "nJy" for r in APERTURE_RADII},
    **{f"ap{r:02d}FluxErr": "nJy" for r in APERTURE_RADII},
    **{f"apFlux_{r}_0_instFlux": "count" for r in APERTURE_RADII},
    **{f"apFlux_{r}_0_instFluxErr": "count" for r in APERTURE_RADII},
}

_PASS_THROUGH = (
    "x", "y", "xErr", "yErr", "ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF", "extendedness", "sizeExtendedness",
    "footprintArea_value", "deblend_nChild", "blendedness_abs", "psfFlux_flag", "psfFlux_area", "centroid_flag",
    "pixelFlags_saturated", "pixelFlags_saturatedCenter", "pixelFlags_cr", "pixelFlags_crCenter", "pixelFlags_edge",
    "pixelFlags_bad", "pixelFlags_interpolated", "pixelFlags_interpolatedCenter", "variance_value",
    "psfFlux_flag_unmodelledNeighbour",
)


def build_source_columns(
    cols: dict[str, np.ndarray], *, source_ids: np.ndarray, ra: np.ndarray, dec: np.ndarray, wcs: WCS, calib: float,
    apcorr: np.ndarray, apcorr_err: np.ndarray | float, visit: int, detector: int, band: str, physical_filter: str,
    psf_used: np.ndarray, psf_candidate: np.ndarray, astrometry_used: np.ndarray, photometry_used: np.ndarray,
    astrometry_reserved: np.ndarray | None = None,
) -> dict[str, Any]:
    """Assemble the DP1-named Source columns; fluxes in nJy (PSF flux aperture-corrected).

    ``calib_astrometry_used``: matched to a reference star and kept by the WCS fit;
    ``calib_astrometry_reserved``: matched to a reference star held out of the fit (the same
    stars in every visit), for validating the astrometry.
    """
    n = len(source_ids)
    parent = np.asarray(cols["parent_index"])
    out: dict[str, Any] = {"sourceId": source_ids}
    out["coord_ra"], out["coord_dec"] = np.asarray(ra, float), np.asarray(dec, float)
    out["ra"], out["dec"] = out["coord_ra"], out["coord_dec"]
    # position errors: pixel errors through the local Jacobian of the WCS (deg per pixel)
    scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
    out["raErr"] = (np.asarray(cols["xErr"]) * scale).astype(np.float32)
    out["decErr"] = (np.asarray(cols["yErr"]) * scale).astype(np.float32)
    out["ra_dec_Cov"] = np.zeros(n, np.float32)
    out["parentSourceId"] = np.where(parent >= 0, source_ids[np.clip(parent, 0, None)], 0).astype(np.int64)
    for name in _PASS_THROUGH:
        if name in cols:
            out[name] = np.asarray(cols[name])
    out["psfFlux_instFlux"] = np.asarray(cols["psfFlux"], float)
    out["psfFlux_instFluxErr"] = np.asarray(cols["psfFluxErr"], float)
    out["psfFlux"] = out["psfFlux_instFlux"] * apcorr * calib
    # As Rubin's ApplyApCorr: the aperture-correction uncertainty is part of the corrected flux error.
    apcorr_err = np.broadcast_to(np.asarray(apcorr_err, float), (n,))
    out["psfFluxErr"] = np.hypot(out["psfFlux_instFluxErr"] * apcorr, out["psfFlux_instFlux"] * apcorr_err) * calib
    out["psfFlux_apCorr"] = np.asarray(apcorr, float)
    out["psfFlux_apCorrErr"] = np.array(apcorr_err, float)
    for r in APERTURE_RADII:
        key = f"ap{r:02d}Flux"
        if key not in cols:
            continue
        out[key] = np.asarray(cols[key], float) * calib
        out[key + "Err"] = np.asarray(cols[key + "Err"], float) * calib
        out[key + "_flag"] = np.asarray(cols[key + "_flag"], bool)
        out[f"apFlux_{r}_0_instFlux"] = np.asarray(cols[key], float)
        out[f"apFlux_{r}_0_instFluxErr"] = np.asarray(cols[key + "Err"], float)
        out[f"apFlux_{r}_0_flag"] = out[key + "_flag"]
    out["calibFlux"] = np.asarray(cols["calibFlux"], float) * calib
    out["calibFluxErr"] = np.asarray(cols["calibFluxErr"], float) * calib
    out["gaussianFlux"] = np.asarray(cols["gaussianFlux"], float) * calib
    out["gaussianFluxErr"] = np.asarray(cols["gaussianFluxErr"], float) * calib
    out["sky"] = np.asarray(cols["sky"], float) * calib
    out["skyErr"] = np.asarray(cols["skyErr"], float) * calib
    out["localBackground_instFlux"] = np.asarray(cols["sky"], float)
    out["localBackground_instFluxErr"] = np.asarray(cols["skyErr"], float)
    out["calib_psf_candidate"] = np.asarray(psf_candidate, bool)
    out["calib_psf_used"] = np.asarray(psf_used, bool)
    out["calib_astrometry_used"] = np.asarray(astrometry_used, bool)
    out["calib_astrometry_reserved"] = (np.zeros(n, bool) if astrometry_reserved is None
                                        else np.asarray(astrometry_reserved, bool))  # fmt: skip
    out["calib_photometry_used"] = np.asarray(photometry_used, bool)
    out["sky_source"] = np.zeros(n, bool)
    out["visit"] = np.full(n, visit, np.int64)
    out["detector"] = np.full(n, detector, np.int32)
    out["band"] = np.full(n, band)
    out["physical_filter"] = np.full(n, physical_filter)
    return out
