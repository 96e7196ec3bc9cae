"""Coadd, Object and ForcedSource metrics against truth (added to ``validate`` when a run has objects).

Truth objects are matched to primary Objects within 0.5 arcsec, at their positions propagated to
the mean epoch of the coadd inputs.

* ``coadd_flux_ratio_stars`` (0.995-1.005): median of <band>_psfFlux / true mean flux for isolated,
  non-variable stars with coadd PSF-flux S/N > 50, over bands.
* ``object_completeness_snr10`` (>= source-extractor's on the same coadd, see docs/performance.md):
  fraction of true stars and galaxies in the patches' inner regions with expected coadd S/N > 10
  (S/N from the coadd's median noise and an effective area 4 pi (sigma_psf^2 + sigma_gal^2)) that
  have a primary Object.
* ``deblend_flux_error_median`` (<= 0.05): median |psfFlux / true flux - 1| of deblended children
  (stars) whose nearest neighbour in truth is within 2 PSF FWHM (blended pairs), in the reference band.
* ``forced_variable_recovered_fraction`` (>= 0.9): fraction of variable stars whose forced light
  curve (one band) rejects a constant at chi2/dof > 5, among those detectable by construction
  (semi-amplitude >= 5 x the median per-visit magnitude error).
* ``forced_constant_chi2_dof_median`` (0.8-1.3): median chi2/dof of forced light curves of isolated
  constant stars with per-visit S/N > 20.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..algorithms.astrometry import propagate_positions
from ..repo import Repository
from ..algorithms.masks import NO_DATA
from ..repo.formats import read_columns, read_exposure
from ..stages.common import wcs_from_header

MATCH_ARCSEC = 0.5



def _unit(ra, dec):
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def object_metrics(repo: Repository, run: str) -> dict[str, Any] | None:
    obj_refs = repo.query("object", [run])
    if not obj_refs:
        return None
    truth = read_columns(repo.get_path("truth_objects", {}, ["truth"]))
    objs = [read_columns(repo.path_of(r)) for r in obj_refs]
    obj = {k: np.concatenate([o[k] for o in objs]) for k in objs[0] if all(k in o for o in objs)}
    prim = obj["detect_isPrimary"].astype(bool)
    bands = sorted({k.split("_")[0] for k in obj if k.endswith("_psfFlux")})
    coadd_refs = repo.query("coadd", [run])
    coadds = {(int(r.data_id["tract"]), int(r.data_id["patch"]), r.data_id["band"]): r for r in coadd_refs}
    mjds, noise, fwhm, covered = [], {}, {}, {}
    for key, ref in coadds.items():
        e = read_exposure(repo.path_of(ref))
        covered[key] = (wcs_from_header(e.wcs_header), (e.mask & NO_DATA) == 0)
        mjds.append(0.5 * (float(e.metadata["MJDMIN"]) + float(e.metadata["MJDMAX"])))
        good = e.variance > 0
        noise[key] = float(np.sqrt(np.median(e.variance[good]))) if good.any() else np.nan
        fwhm[key] = float(e.metadata["PSFFWHMP"])
    mjd = float(np.mean(mjds))
    ref_epoch = float(truth["epoch_mjd"][0]) if "epoch_mjd" in truth else 57388.0
    static = np.isin(truth["kind"], ["star", "galaxy"])
    tra, tdec = propagate_positions(truth["ra"][static], truth["dec"][static], np.nan_to_num(truth["pmra"][static]),
                                    np.nan_to_num(truth["pmdec"][static]), np.nan_to_num(truth["parallax"][static]),
                                    ref_epoch, mjd)
    T = {k: v[static] for k, v in truth.items()}
    nn_d, _ = cKDTree(_unit(tra, tdec)).query(_unit(tra, tdec), k=2)
    nn_arcsec = np.degrees(2 * np.arcsin(nn_d[:, 1] / 2)) * 3600
    tree = cKDTree(_unit(obj["coord_ra"][prim], obj["coord_dec"][prim]))
    chord = 2 * math.sin(math.radians(MATCH_ARCSEC / 3600) / 2)
    d, j = tree.query(_unit(tra, tdec), distance_upper_bound=chord)
    matched = np.isfinite(d)
    pidx = np.flatnonzero(prim)
    jj = pidx[np.where(matched, j, 0)]

    # which truth objects lie in the inner region of a processed patch (where primaries live)
    t_all = np.array([int(k[0]) for k in coadds])
    inner = np.zeros(len(tra), bool)
    patch_of = {}
    from ..skymap import SkyMap

    skymap = SkyMap(_run_skymap(repo, run))
    if len(t_all):
        for tract in np.unique(t_all):
            pp = skymap.patch_for(int(tract), tra, tdec)
            tinner = skymap.tract_info(int(tract)).contains_inner(tra, tdec)
            done = {k[1] for k in coadds if k[0] == tract}
            sel = tinner & np.isin(pp, list(done))
            inner |= sel
            patch_of.update({i: (int(tract), int(pp[i])) for i in np.flatnonzero(sel)})

    out: dict[str, Any] = {}
    # 1. coadd flux ratio of stars
    ratios = []
    star_iso = (T["kind"] == "star") & ~T["is_variable"].astype(bool)
    for b in bands:
        f = obj[f"{b}_psfFlux"][jj]
        fe = obj[f"{b}_psfFluxErr"][jj]
        sel = matched & star_iso & inner & (f / fe > 50) & (T[f"{b}_flux"] > 0)
        ratios.append(f[sel] / T[f"{b}_flux"][sel])
    r = np.concatenate(ratios) if ratios else np.array([np.nan])
    out["coadd_flux_ratio_stars"] = float(np.median(r))
    out["coadd_flux_ratio_n_stars"] = int(len(r))

    # 2. completeness at expected coadd S/N > 10 (any band)
    snr_best = np.zeros(len(tra))
    for i in np.flatnonzero(inner):
        key_t = patch_of[i]
        for b in bands:
            key = (key_t[0], key_t[1], b)
            if key not in noise:
                continue
            w, cov = covered[key]
            px, py = w.all_world2pix([tra[i]], [tdec[i]], 0)
            ix, iy = int(round(float(px[0]))), int(round(float(py[0])))
            if not (0 <= iy < cov.shape[0] and 0 <= ix < cov.shape[1] and cov[iy, ix]):
                continue  # no coadd data there (a partly covered patch)
            sig_psf = fwhm[key] / 2.3548
            sig_gal = (float(T["disk_hlr_arcsec"][i]) / 0.2 / 1.1774) if T["kind"][i] == "galaxy" else 0.0
            area = 4 * math.pi * (sig_psf**2 + sig_gal**2)
            snr_best[i] = max(snr_best[i], float(T[f"{b}_flux"][i]) / (noise[key] * math.sqrt(area)))
    elig = inner & (snr_best > 10)
    out["object_completeness_snr10"] = float(matched[elig].mean()) if elig.any() else float("nan")
    out["object_completeness_n"] = int(elig.sum())

    # 3. deblended children of blended pairs: both stars of a true pair closer than 2 FWHM matched to
    #    two different children of the same parent
    ref_band = bands[0] if "r" not in bands else "r"
    fw = np.median(list(fwhm.values())) if fwhm else 4.0
    nn_d2, nn_j = cKDTree(_unit(tra, tdec)).query(_unit(tra, tdec), k=2)
    partner = nn_j[:, 1]
    parent_of = np.where(matched, obj["parentObjectId"][jj], 0)
    oid = np.where(matched, obj["objectId"][jj], -1)
    pair = matched & matched[partner] & (T["kind"] == "star") & (nn_arcsec < 2 * fw * 0.2) & \
        (parent_of != 0) & (parent_of == parent_of[partner]) & (oid != oid[partner])
    err = np.abs(obj[f"{ref_band}_psfFlux"][jj][pair] / T[f"{ref_band}_flux"][pair] - 1)
    out["deblend_flux_error_median"] = float(np.median(err)) if len(err) else float("nan")
    out["deblend_n_children"] = int(len(err))

    # 4-5. forced light curves
    lc: dict[tuple[int, str], list] = defaultdict(list)
    for ref in repo.query("forcedSource", [run]):
        f = read_columns(repo.path_of(ref), ["objectId", "band", "psfFlux", "psfFluxErr", "psfFlux_flag"])
        for oid, band, fl, fe, flag in zip(f["objectId"], f["band"], f["psfFlux"], f["psfFluxErr"], f["psfFlux_flag"]):
            if not flag and np.isfinite(fl) and fe > 0:
                lc[(int(oid), str(band))].append((fl, fe))
    chi2 = {}
    for key, pts in lc.items():
        if len(pts) < 3:
            continue
        fl, fe = np.array(pts).T
        w = 1 / fe**2
        mean = np.sum(w * fl) / np.sum(w)
        chi2[key] = (float(np.sum(((fl - mean) / fe) ** 2) / (len(fl) - 1)), float(np.median(fl / fe)))
    oid_of = obj["objectId"][jj]
    var_rec, var_n, const = 0, 0, []
    for i in np.flatnonzero(matched & (T["kind"] == "star")):
        best = None
        for b in bands:
            c = chi2.get((int(oid_of[i]), b))
            if c is not None and (best is None or c[1] > best[1]):
                best = c
        if best is None:
            continue
        if T["is_variable"][i]:
            mag_err = 1.0857 / best[1]
            if float(T["var_amp_mag"][i]) >= 5 * mag_err:
                var_n += 1
                var_rec += best[0] > 5
        elif best[1] > 20 and nn_arcsec[i] > 3 * fw * 0.2:
            const.append(best[0])
    out["forced_variable_recovered_fraction"] = var_rec / var_n if var_n else float("nan")
    out["forced_variable_n"] = var_n
    out["forced_constant_chi2_dof_median"] = float(np.median(const)) if const else float("nan")
    out["forced_constant_n"] = len(const)
    return out


def _run_skymap(repo: Repository, run: str):
    """The sky map configuration the run was planned with (its saved campaign)."""
    from ..config.skymap import SkyMapConfig
    from ..config.yamlio import load_yaml

    doc = load_yaml(repo.root / run / "_plan" / "campaign.yaml")
    return SkyMapConfig.model_validate(doc.data.get("skymap", {}))
