"""Single-frame metrics against the simulator's truth (``lsst-prod validate``).

Each calexp's Source table is matched to the truth of the objects drawn on
that detector (``truth_sources``: true pixel positions at the visit's epoch)
by nearest neighbour in pixels.  Definitions (and bounds, from the
foundation issue):

* ``astrometry_rms_mas`` (<= 20): rms of the angular distance between
  measured (ra, dec) and the true position at the visit's epoch, for
  isolated, unsaturated stars with expected S/N > 100.
* ``photometry_zp_error_mmag`` (<= 10): rms over detectors of the fitted
  zero point minus the true one.
* ``completeness_snr10_isolated_stars`` (>= 0.98): fraction of isolated,
  unsaturated stars with expected S/N > 10, at least 20 px from the edges and
  5 px from bad columns, that have a Source within 2 px.
* ``flux_pull_std`` (0.9-1.1): standard deviation of (psfFlux - true flux) /
  psfFluxErr for matched isolated stars with S/N > 10, after iterative 4-sigma
  clipping (the clipped fraction is reported too).

Expected S/N uses the true PSF size and sky: S/N = F / sqrt(F + 4 pi sigma^2 (sky + rn^2)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..repo import Repository
from ..repo.formats import read_columns, read_image

BOUNDS = {
    "astrometry_rms_mas": ("<=", 20.0),
    "photometry_zp_error_mmag": ("<=", 10.0),
    "completeness_snr10_isolated_stars": (">=", 0.98),
    "flux_pull_std": ("in", (0.9, 1.1)),
    "relcal_zp_rms_mmag": ("<=", 5.0),
    "relcal_astrometry_rms_mas": ("<=", 10.0),
    "coadd_flux_ratio_stars": ("in", (0.995, 1.005)),
    "deblend_flux_error_median": ("<=", 0.05),
    "forced_variable_recovered_fraction": (">=", 0.9),
    "forced_constant_chi2_dof_median": ("in", (0.8, 1.3)),
}

MATCH_RADIUS_PIX = 2.0
EDGE_PIX = 20
BAD_COLUMN_MARGIN_PIX = 5
ISOLATION_FWHM = 3.0


def clipped_std(x: np.ndarray, nsigma: float = 4.0, iters: int = 10) -> tuple[float, float, float]:
    """(std, mean, fraction clipped) after iterative clipping around the median."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    keep = np.ones(len(x), bool)
    for _ in range(iters):
        if keep.sum() < 3:
            break
        med = np.median(x[keep])
        sd = np.std(x[keep])
        new = np.abs(x - med) < nsigma * sd
        if (new == keep).all():
            break
        keep = new
    if keep.sum() < 2:
        return float("nan"), float("nan"), 1.0
    return float(np.std(x[keep])), float(np.mean(x[keep])), float(1.0 - keep.mean())


def _check(name: str, value: float) -> dict[str, Any]:
    op, b = BOUNDS[name]
    if op == "<=":
        ok, txt = value <= b, f"<= {b}"
    elif op == ">=":
        ok, txt = value >= b, f">= {b}"
    else:
        ok, txt = b[0] <= value <= b[1], f"{b[0]}-{b[1]}"
    return {"value": value, "bound": txt, "pass": bool(ok and math.isfinite(value))}


def validate_run(repo: Repository, run: str) -> dict[str, Any]:
    truth_runs = ["truth"]
    ccd_truth_ref = repo.find("truth_ccdvisits", {}, truth_runs)
    if ccd_truth_ref is None:
        raise FileNotFoundError(f"no simulator truth in {repo.root}: validation needs a simulated repository")
    ccd_truth = read_columns(repo.path_of(ccd_truth_ref))
    truth_key = {(int(v), int(d)): i for i, (v, d) in enumerate(zip(ccd_truth["visit"], ccd_truth["detector"]))}

    sep_mas: list[np.ndarray] = []
    pulls: list[np.ndarray] = []
    zp_diff: list[float] = []
    n_complete = n_eligible = n_matched = 0
    per_ccd = []
    for sref in repo.query("source", [run]):
        visit, det = int(sref.data_id["visit"]), int(sref.data_id["detector"])
        instrument = sref.data_id["instrument"]
        t_i = truth_key[(visit, det)]
        src = read_columns(repo.path_of(sref))
        ccd_ref = repo.find("ccdVisit", sref.data_id, [run])
        ccd = read_columns(repo.path_of(ccd_ref))
        tref = repo.find("truth_sources", {"instrument": instrument, "visit": visit, "detector": det}, truth_runs)
        truth = read_columns(repo.path_of(tref))
        defects_ref = repo.find("defects", {"instrument": instrument, "detector": det}, [f"{instrument}/calib"])
        defects = read_image(repo.path_of(defects_ref))[0].astype(bool) if defects_ref else None

        zp_diff.append(float(ccd["zeroPoint"][0]) - float(ccd_truth["zero_point"][t_i]))
        fwhm = float(ccd_truth["psf_fwhm_pix"][t_i])
        sky = float(ccd_truth["sky_e_per_pix"][t_i])
        rn2 = float(ccd_truth["read_noise"][t_i]) ** 2 if "read_noise" in ccd_truth else 25.0
        sigma = truth["psf_fwhm_pix"] / 2.3548 if "psf_fwhm_pix" in truth else fwhm / 2.3548
        flux_e = truth["flux_e"].astype(float)
        snr = flux_e / np.sqrt(np.clip(flux_e, 0, None) + 4 * math.pi * sigma**2 * (sky + rn2))

        leaf = src["deblend_nChild"] == 0
        sx, sy = src["x"][leaf], src["y"][leaf]
        tree = cKDTree(np.column_stack([sx, sy]))
        d, j = tree.query(np.column_stack([truth["x"], truth["y"]]), distance_upper_bound=MATCH_RADIUS_PIX)
        matched = np.isfinite(d)
        n_matched += int(matched.sum())

        ny, nx = (defects.shape if defects is not None else (int(ccd["ySize"][0]), int(ccd["xSize"][0])))
        inside = (truth["x"] > EDGE_PIX) & (truth["x"] < nx - 1 - EDGE_PIX) & (truth["y"] > EDGE_PIX) & \
            (truth["y"] < ny - 1 - EDGE_PIX)
        near_bad = np.zeros(len(flux_e), bool)
        if defects is not None:
            bad_cols = np.flatnonzero(defects.any(axis=0))
            if len(bad_cols):
                near_bad = np.min(np.abs(truth["x"][:, None] - bad_cols[None, :]), axis=1) < BAD_COLUMN_MARGIN_PIX
        isolated = (truth["nn_dist_pix"] > ISOLATION_FWHM * fwhm) | (truth["nn_flux_ratio"] < 0.01)
        star = truth["kind"] == "star"
        clean = star & isolated & inside & ~near_bad & ~truth["is_saturated"].astype(bool)
        elig = clean & (snr > 10)
        n_eligible += int(elig.sum())
        n_complete += int((elig & matched).sum())

        jj = np.where(matched, j, 0)
        src_ra, src_dec = src["ra"][leaf][jj], src["dec"][leaf][jj]
        bright = clean & matched & (snr > 100)
        if bright.any():
            dra = (src_ra[bright] - truth["ra"][bright]) * np.cos(np.radians(truth["dec"][bright]))
            ddec = src_dec[bright] - truth["dec"][bright]
            sep_mas.append(np.hypot(dra, ddec) * 3.6e6)
        sel = elig & matched
        if sel.any():
            pf = src["psfFlux"][leaf][jj][sel]
            pfe = src["psfFluxErr"][leaf][jj][sel]
            pulls.append((pf - truth["flux_nJy"][sel]) / pfe)
        per_ccd.append({"visit": visit, "detector": det, "zp_error_mmag": 1000 * zp_diff[-1],
                        "n_sources": int(len(src["x"])), "n_eligible_stars": int(elig.sum()),
                        "n_found": int((elig & matched).sum())})

    if not per_ccd:
        raise FileNotFoundError(f"run {run!r} has no Source tables to validate")
    seps = np.concatenate(sep_mas) if sep_mas else np.array([np.nan])
    pull = np.concatenate(pulls) if pulls else np.array([np.nan])
    pull_std, pull_mean, clipped = clipped_std(pull)
    zp = np.asarray(zp_diff)
    metrics: dict[str, Any] = {
        "run": run,
        "n_ccdvisits": len(per_ccd),
        "n_matched": n_matched,
        "astrometry_rms_mas": float(np.sqrt(np.nanmean(seps**2))),
        "astrometry_n_stars": int(np.isfinite(seps).sum()),
        "photometry_zp_error_mmag": float(1000 * np.sqrt(np.mean(zp**2))),
        "photometry_zp_error_max_mmag": float(1000 * np.max(np.abs(zp))),
        "photometry_zp_bias_mmag": float(1000 * np.mean(zp)),
        "completeness_snr10_isolated_stars": n_complete / n_eligible if n_eligible else float("nan"),
        "completeness_n_stars": n_eligible,
        "flux_pull_std": pull_std,
        "flux_pull_mean": pull_mean,
        "flux_pull_clipped_fraction": clipped,
        "flux_pull_n_stars": int(np.isfinite(pull).sum()),
        "per_ccdvisit": per_ccd,
    }
    from .relcal import relcal_metrics

    rel = relcal_metrics(repo, run)
    if rel is not None:
        metrics.update(rel)
    from .objects import object_metrics

    objm = object_metrics(repo, run)
    if objm is not None:
        metrics.update(objm)
    metrics["checks"] = {name: _check(name, metrics[name]) for name in BOUNDS if name in metrics}
    metrics["all_pass"] = all(c["pass"] for c in metrics["checks"].values())
    return metrics
