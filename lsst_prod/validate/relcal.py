"""Relative-calibration metrics against truth (added to ``lsst-prod validate`` when a run has relcal).

* ``relcal_zp_rms_mmag`` (<= 5): rms over ccdvisits of (recovered - injected zero point) after
  removing the common offset (the absolute level is the reference catalogue's business).  The
  recovered zero point is the effective one of the calibrated catalogue: per ccdvisit, the
  median over bright isolated stars (PSF S/N > 100) of 2.5 log10(calibrated psfFlux / true
  flux); it includes the aperture correction, which a bare ``zeroPoint`` column would not
  (``relcal_zp_rms_mmag_header`` compares that column with truth, for information).
* ``relcal_astrometry_rms_mas`` (<= 10): rms of the angular distance between the relcal-corrected
  positions (``source_calibrated``) of bright isolated unsaturated stars (PSF S/N > 300), away from
  the detector's edges and bad columns (the single-frame metrics' "clean" rule), and their true
  positions at each epoch.
The same quantities for the single-frame calibration (``*_single_frame``) are reported beside
them, on the same ccdvisits and stars.  Sources are matched one-to-one to truth within 2 px
(``matching.unique_match``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..repo import Repository
from ..repo.formats import read_columns
from . import checks as C
from .matching import separation_mas, unique_match
from .single_frame import clean_pixels, detector_defects

BRIGHT_SNR = 300.0
PHOT_SNR = 100.0
ZP_RMS_MAX_MMAG = 5.0
ASTROMETRY_RMS_MAX_MAS = 10.0



def relcal_metrics(repo: Repository, run: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(metrics, checks), or None if the run has no relcal solution."""
    sols = repo.query("relcal_solution", [run])
    if not sols:
        return None
    truth = read_columns(repo.get_path("truth_ccdvisits", {}, ["truth"]))
    tkey = {(int(v), int(d)): i for i, (v, d) in enumerate(zip(truth["visit"], truth["detector"]))}
    zp_rel, zp_sf, zp_true = [], [], []
    for ref in sols:
        s = read_columns(repo.path_of(ref))
        for v, d, zr, zs in zip(s["visit"], s["detector"], s["zeroPoint"], s["zeroPointSingleFrame"]):
            if not np.isfinite(zr):  # set aside by relcal (too few stars)
                continue
            zp_rel.append(zr)
            zp_sf.append(zs)
            zp_true.append(truth["zero_point"][tkey[(int(v), int(d))]])
    zp_rel, zp_sf, zp_true = map(np.asarray, (zp_rel, zp_sf, zp_true))
    eff_rel, eff_sf = [], []

    def rms_mmag(d: np.ndarray) -> float:
        return float(1000 * np.std(d - np.mean(d)))

    sep_rel, sep_sf = [], []
    defects: dict[tuple[str, int], tuple | None] = {}  # per detector, read once
    for cref in repo.query("source_calibrated", [run]):
        did = cref.data_id
        cal = read_columns(repo.path_of(cref))
        sf = read_columns(repo.path_of(repo.find("source", did, [run])))
        t = read_columns(repo.get_path("truth_sources", did, ["truth"]))
        leaf = cal["deblend_nChild"] == 0
        j = unique_match(np.column_stack([t["x"], t["y"]]), np.column_stack([cal["x"][leaf], cal["y"][leaf]]), 2.0)
        ok = (j >= 0) & (t["kind"] == "star") & ~t["is_saturated"].astype(bool) & (
            (t["nn_dist_pix"] > 3 * t["psf_fwhm_pix"]) | (t["nn_flux_ratio"] < 0.01))
        key = (did["instrument"], int(did["detector"]))
        if key not in defects:
            defects[key] = detector_defects(repo, *key)
        if defects[key] is not None:  # the single-frame metrics' "clean" rule: edges and bad columns out
            ok &= clean_pixels(t["x"], t["y"], *defects[key])
        jj = np.flatnonzero(leaf)[j[ok]]
        snr = cal["psfFlux"][jj] / cal["psfFluxErr"][jj]
        phot = snr > PHOT_SNR
        if phot.sum() >= 5:
            eff_rel.append(float(np.median(2.5 * np.log10(cal["psfFlux"][jj][phot] / t["flux_nJy"][ok][phot]))))
            eff_sf.append(float(np.median(2.5 * np.log10(sf["psfFlux"][jj][phot] / t["flux_nJy"][ok][phot]))))
        bright = snr > BRIGHT_SNR
        for store, table in ((sep_rel, cal), (sep_sf, sf)):
            store.append(separation_mas(table["ra"][jj][bright], table["dec"][jj][bright],
                                        t["ra"][ok][bright], t["dec"][ok][bright]))
    sep_rel = np.concatenate(sep_rel) if sep_rel else np.array([np.nan])
    sep_sf = np.concatenate(sep_sf) if sep_sf else np.array([np.nan])
    m = {
        "relcal_zp_rms_mmag": rms_mmag(np.asarray(eff_rel)),
        "relcal_zp_rms_mmag_single_frame": rms_mmag(np.asarray(eff_sf)),
        "relcal_zp_rms_mmag_header": rms_mmag(zp_rel - zp_true),
        "relcal_zp_rms_mmag_header_single_frame": rms_mmag(zp_sf - zp_true),
        "relcal_zp_injected_rms_mmag": rms_mmag(zp_true),
        "relcal_zp_n_ccdvisits": int(len(zp_rel)),
        "relcal_astrometry_rms_mas": float(np.sqrt(np.nanmean(sep_rel**2))),
        "relcal_astrometry_rms_mas_single_frame": float(np.sqrt(np.nanmean(sep_sf**2))),
        "relcal_astrometry_n_measurements": int(np.isfinite(sep_rel).sum()),
    }
    checks = {
        "relcal_zp_rms_mmag": C.check(m["relcal_zp_rms_mmag"], "<=", ZP_RMS_MAX_MMAG,
                                      note=f"{len(eff_rel)} ccdvisits with >= 5 stars at S/N > {PHOT_SNR:g}"),
        "relcal_astrometry_rms_mas": C.check(m["relcal_astrometry_rms_mas"], "<=", ASTROMETRY_RMS_MAX_MAS,
                                             note=f"n={m['relcal_astrometry_n_measurements']}"),
    }
    return m, checks
