#!/usr/bin/env python
"""Object completeness on deep coadds: lsst_prod's Object tables vs source-extractor on the same coadds.

For every deep coadd (patch x band) of a processed run, source-extractor runs on the
coadd's ``IMAGE`` with its ``VARIANCE`` as the noise map, configured like
``bench_detection.py`` (whose helpers are imported): the same Gaussian matched filter as
our ``detect_sources`` (the coadd PSF's sigma at the patch centre) and the equivalent
``DETECT_THRESH = nu sqrt(sum K^2)`` for the run's ``objects`` threshold ``nu``.

Both are scored against the simulator's truth with the project's own metric
(``lsst_prod.validate.objects.object_metrics``, ``object_completeness_snr10``): the same
eligible truth set (true stars and galaxies, propagated to the mean coadd epoch, in the inner
regions of the processed patches, on covered coadd pixels, with expected coadd S/N > 10 in
some band) and the same rule (a match within 0.5 arcsec).  Ours: a primary Object.
source-extractor: a detection of any band's catalogue that is "primary" in the same sense
(inside its patch's and tract's inner regions).  The script recomputes our figure and checks
it against ``object_metrics``.

Times: ours is the run's ``objects`` quantum (``lsst-prod report RUN --json``,
``attempts[-1].wall_s``: detection in every band, merge, deblending, measurement, I/O);
source-extractor is its whole command on each coadd (best of ``--repeats``).

Usage (from the project root, with the project's virtualenv)::

    python bench/bench_coadd_detection.py --repo DIR [--run NAME] [--json]

Exit codes: 0 success, 2 source-extractor missing or no run with coadds + Object tables.
Documentation: bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_detection as bd  # noqa: E402  (sets OMP_NUM_THREADS=1 etc. unless already set)

ROOT = bd.ROOT
MERGE_RADIUS_PIX = 3.0  # lsst_prod.algorithms.merge.merge_detections' default (used by the objects stage)
SNR_BINS = ((10.0, 20.0), (20.0, 50.0), (50.0, math.inf))
PIXEL_SCALE_ARCSEC = 0.2  # as object_metrics (sigma_gal = disk_hlr / 0.2 / 1.1774)
log = bd.log


# ------------------------------------------------------------------------------ the data
def newest_run_with_objects(repo) -> str | None:
    for run in reversed(repo.registry.list_runs("processing")):
        if repo.query("object", [run["name"]]) and repo.query("coadd", [run["name"]]):
            return run["name"]
    return None


def objects_threshold(repo, run: str) -> float:
    """The run's ``stages.objects.detection_threshold_sigma`` (its saved campaign)."""
    from lsst_prod.config.stages import ObjectsConfig
    from lsst_prod.config.yamlio import load_yaml

    doc = load_yaml(repo.root / run / "_plan" / "campaign.yaml")
    cfg = (doc.data.get("stages") or {}).get("objects") or {}
    return float(ObjectsConfig.model_validate(cfg).detection_threshold_sigma)


def objects_quantum_times(root: Path, run: str) -> dict[tuple[int, int], dict]:
    """(tract, patch) -> the ``objects`` quantum's last attempt (``lsst-prod report RUN --json``)."""
    cmd = bd.lsst_prod_command() + ["report", run, "--repo", str(root), "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=bd._ORIG_ENV, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: `{shlex.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    rep = json.loads(res.stdout)
    out = {}
    for q in rep["quanta"]:
        if q["stage"] != "objects" or q["status"] != "succeeded" or not q["attempts"]:
            continue
        a = q["attempts"][-1]
        out[(int(q["data_id"]["tract"]), int(q["data_id"]["patch"]))] = {
            "wall_s": float(a["wall_s"]), "cpu_s": float(a["cpu_s"]), "executor": a.get("executor"),
            "outcome": a["outcome"], "n_attempts": len(q["attempts"]),
            "all_attempts_wall_s": [float(x["wall_s"]) for x in q["attempts"]],
            "summary": a.get("summary", {})}
    return out


# ------------------------------------------------------------- the eligible truth set
def truth_and_eligibility(repo, run: str, coadds: dict) -> dict:
    """``object_metrics``' truth selection, step by step (lsst_prod/validate/objects.py).

    Returns the static truth (stars, galaxies) at the mean coadd epoch, the ``inner`` and
    ``elig`` (expected coadd S/N > 10 in some band, on covered pixels) selections, the best
    expected S/N, and each coadd's WCS / coverage.
    """
    from lsst_prod.algorithms.astrometry import propagate_positions
    from lsst_prod.algorithms.masks import NO_DATA
    from lsst_prod.repo.formats import read_exposure
    from lsst_prod.skymap import SkyMap
    from lsst_prod.stages.common import wcs_from_header
    from lsst_prod.repo.formats import read_columns as _cols
    from lsst_prod.validate.objects import _run_skymap

    truth = _cols(repo.get_path("truth_objects", {}, ["truth"]))
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

    t_all = np.array([int(k[0]) for k in coadds])
    inner = np.zeros(len(tra), bool)
    patch_of = {}
    skymap = SkyMap(_run_skymap(repo, run))
    if len(t_all):
        for tract in np.unique(t_all):
            pp = skymap.patch_for(int(tract), tra, tdec)
            tinner = skymap.tract_info(int(tract)).contains_inner(tra, tdec)
            done = {k[1] for k in coadds if k[0] == tract}
            sel = tinner & np.isin(pp, list(done))
            inner |= sel
            patch_of.update({i: (int(tract), int(pp[i])) for i in np.flatnonzero(sel)})

    bands = sorted({k[2] for k in coadds})
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
                continue
            sig_psf = fwhm[key] / 2.3548
            sig_gal = (float(T["disk_hlr_arcsec"][i]) / PIXEL_SCALE_ARCSEC / 1.1774) if T["kind"][i] == "galaxy" \
                else 0.0
            area = 4 * math.pi * (sig_psf**2 + sig_gal**2)
            snr_best[i] = max(snr_best[i], float(T[f"{b}_flux"][i]) / (noise[key] * math.sqrt(area)))
    return {"ra": tra, "dec": tdec, "T": T, "inner": inner, "elig": inner & (snr_best > 10), "snr_best": snr_best,
            "mjd": mjd, "skymap": skymap, "wcs": {k: v[0] for k, v in covered.items()},
            "covered": {k: v[1] for k, v in covered.items()}, "noise": noise, "fwhm": fwhm}


# ------------------------------------------------------------------------- matching
def _unit(ra, dec):
    r, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def _chord(arcsec: float) -> float:
    return 2 * math.sin(math.radians(arcsec / 3600) / 2)


def has_neighbour(ra1, dec1, ra2, dec2, arcsec: float) -> np.ndarray:
    """For each position of set 1: is there a position of set 2 within ``arcsec``?"""
    from scipy.spatial import cKDTree

    if len(ra1) == 0:
        return np.zeros(0, bool)
    if len(ra2) == 0:
        return np.zeros(len(ra1), bool)
    d, _ = cKDTree(_unit(ra2, dec2)).query(_unit(ra1, dec1), distance_upper_bound=_chord(arcsec))
    return np.isfinite(d)


def primary_flags(skymap, tract: int, patch: int, x: np.ndarray, y: np.ndarray, ra, dec) -> np.ndarray:
    """The objects stage's ``detect_isPrimary`` test for a leaf at (x, y) of the patch (0-based)."""
    t = skymap.tract_info(tract)
    p = skymap.patch_info(tract, patch)
    xt, yt = x + p.outer[0], y + p.outer[1]
    inner_patch = (xt >= p.inner[0] - 0.5) & (xt < p.inner[2] - 0.5) & (yt >= p.inner[1] - 0.5) & \
        (yt < p.inner[3] - 0.5)
    return inner_patch & np.asarray(t.contains_inner(ra, dec), bool)


def merge_bands(per_band: dict[str, dict], order: list[str]) -> dict[str, np.ndarray]:
    """One patch's catalogues merged across bands like ``merge_detections``' peaks (pixel radius 3).

    The first band's detections seed the list; a later band's detection within 3 px of a merged
    one joins it (keeping the merged position), otherwise it is added.
    """
    from scipy.spatial import cKDTree

    xs, ys = np.zeros(0), np.zeros(0)
    for b in order:
        c = per_band.get(b)
        if c is None or not len(c["x"]):
            continue
        if len(xs):
            d, _ = cKDTree(np.column_stack([xs, ys])).query(np.column_stack([c["x"], c["y"]]),
                                                             distance_upper_bound=MERGE_RADIUS_PIX)
            new = ~np.isfinite(d)
        else:
            new = np.ones(len(c["x"]), bool)
        xs, ys = np.concatenate([xs, c["x"][new]]), np.concatenate([ys, c["y"][new]])
    return {"x": xs, "y": ys}


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Details: bench/README.md")
    ap.add_argument("--repo", type=Path, required=True, help="data repository with a run that made coadds "
                    "and Object tables (warp, coadd and objects stages enabled)")
    ap.add_argument("--run", help="processing run (default: the newest one with coadds and Object tables)")
    ap.add_argument("--repeats", type=int, default=3, help="source-extractor timing repetitions, best kept "
                    "(default 3)")
    ap.add_argument("--sextractor", help="source-extractor binary (default: found on PATH)")
    ap.add_argument("--sex-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a source-extractor configuration entry, e.g. DEBLEND_MINCONT=0.001 (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (images, .conv, .sex, catalogues)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    overrides = {}
    for item in args.sex_set:
        k, sep_, v = item.partition("=")
        if not sep_ or not k.strip():
            ap.error(f"--sex-set expects KEY=VALUE, got {item!r}")
        overrides[k.strip().upper()] = v.strip()

    sex = bd.find_sextractor(args.sextractor)
    if sex is None:
        log("error: source-extractor is not installed. Install it, e.g. on Debian/Ubuntu:\n"
            "    apt-get update && apt-get install -y --no-install-recommends source-extractor\n"
            "or pass --sextractor /path/to/binary.")
        return 2

    import fitsio

    from lsst_prod.algorithms.detect import detect_sources, excluded_pixels
    from lsst_prod.algorithms.psf import PsfModel
    from lsst_prod.repo import Repository
    from lsst_prod.repo.formats import read_exposure
    from lsst_prod.stages.common import wcs_from_header
    from lsst_prod.repo.formats import read_columns as _cols
    from lsst_prod.validate.objects import MATCH_ARCSEC, object_metrics

    started = _dt.datetime.now(_dt.timezone.utc)
    root = args.repo.resolve()
    if not (root / "registry.sqlite3").exists():
        log(f"error: {root} is not a data repository")
        return 2
    repo = Repository.open(root)
    run = args.run or newest_run_with_objects(repo)
    coadd_refs = repo.query("coadd", [run]) if run else []
    obj_refs = repo.query("object", [run]) if run else []
    if not coadd_refs or not obj_refs:
        log(f"error: run {run!r} of {root} has no deep coadds and/or Object tables (enable the warp, coadd and "
            "objects stages)")
        return 2
    if repo.find("truth_objects", {}, ["truth"]) is None:
        log(f"error: {root} has no simulator truth (truth_objects)")
        return 2
    coadds = {(int(r.data_id["tract"]), int(r.data_id["patch"]), str(r.data_id["band"])): r for r in coadd_refs}
    bands = sorted({k[2] for k in coadds})
    patches = sorted({k[:2] for k in coadds})
    nu = objects_threshold(repo, run)
    info = bd.machine_info(sex)
    log(f"repo {root}, run {run}: {len(coadds)} coadds ({len(patches)} patches x bands {','.join(bands)}); "
        f"threshold {nu:g} sigma; {info['source_extractor']}")

    # --- truth, eligibility (object_metrics' selection) and our primary Objects
    t0 = time.perf_counter()
    tr = truth_and_eligibility(repo, run, coadds)
    objs = [_cols(repo.path_of(r)) for r in obj_refs]
    obj = {k: np.concatenate([o[k] for o in objs]) for k in objs[0] if all(k in o for o in objs)}
    prim = obj["detect_isPrimary"].astype(bool)
    ours = {"ra": obj["coord_ra"][prim], "dec": obj["coord_dec"][prim], "x": obj["x"][prim], "y": obj["y"][prim],
            "tract": obj["tract"][prim], "patch": obj["patch"][prim]}
    log(f"truth: {int(tr['elig'].sum())} eligible of {int(tr['inner'].sum())} stars+galaxies in the inner regions "
        f"({time.perf_counter() - t0:.1f} s)")

    # --- source-extractor on every coadd
    work = Path(tempfile.mkdtemp(prefix="bench_coadd_detection_"))
    params = work / "bench.param"
    params.write_text("\n".join(bd.SEX_PARAMS) + "\n")
    sexcats: dict[tuple, dict] = {}
    peaks: dict[tuple, dict] = {}  # our detect_sources peaks per coadd (a diagnostic)
    per_coadd: list[dict] = []
    try:
        for k, (key, ref) in enumerate(sorted(coadds.items())):
            tract, patch, band = key
            exp = read_exposure(repo.path_of(ref))
            psf = PsfModel.from_fits(*exp.psf)
            ny, nx = exp.image.shape
            sigma = float(psf.sigma_at((nx - 1) / 2.0, (ny - 1) / 2.0))  # as the objects stage
            stem = work / f"coadd_{tract}_{patch}_{band}"
            img_path, var_path = stem.with_suffix(".image.fits"), stem.with_suffix(".var.fits")
            conv, cat_path, cfg_path = stem.with_suffix(".conv"), stem.with_suffix(".cat"), stem.with_suffix(".sex")
            # Our detection gives NO_DATA/BAD/CR/raw-SAT pixels zero weight: the same for SExtractor
            # (variance 1e30 > WEIGHT_THRESH).  The coadd's variance is 0 where there is no data.
            img = np.array(exp.image, dtype=np.float32, copy=True)
            var = np.array(exp.variance, dtype=np.float32, copy=True)
            bad = excluded_pixels(exp.mask) | ~np.isfinite(img) | ~np.isfinite(var) | (var <= 0)
            img[bad] = 0.0
            var[bad] = 1e30
            fitsio.write(str(img_path), img, clobber=True)
            fitsio.write(str(var_path), var, clobber=True)
            kernel = bd.gaussian_kernel_2d(sigma)
            bd.write_conv(conv, kernel, sigma)
            dthresh = bd.sextractor_threshold(kernel, nu)
            # SATUR_LEVEL only sets FLAGS bit 4 (not scored); the coadd has no raw saturation level.
            cfg_path.write_text(bd.sextractor_config(dthresh, conv, params, var_path, cat_path, 1e18, overrides))
            walls, cpus, t_det = [], [], []
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                w, c = bd.run_sextractor(sex, cfg_path, img_path)
                walls.append(w), cpus.append(c)
                t1 = time.perf_counter()
                fp = detect_sources(exp.image, exp.variance, exp.mask.copy(), sigma, threshold=nu)
                t_det.append(time.perf_counter() - t1)
            px, py = fp.peak_x.astype(float), fp.peak_y.astype(float)
            pra, pdec = wcs_from_header(exp.wcs_header).all_pix2world(px, py, 0)
            peaks[key] = {"x": px, "y": py, "ra": np.asarray(pra), "dec": np.asarray(pdec),
                          "primary": primary_flags(tr["skymap"], tract, patch, px, py, pra, pdec)}
            scat = bd.read_ascii_head(cat_path)
            x, y = scat["X_IMAGE"] - 1.0, scat["Y_IMAGE"] - 1.0
            ra, dec = wcs_from_header(exp.wcs_header).all_pix2world(x, y, 0)
            p = primary_flags(tr["skymap"], tract, patch, x, y, ra, dec)
            sexcats[key] = {"x": x, "y": y, "ra": np.asarray(ra), "dec": np.asarray(dec), "primary": p}
            per_coadd.append({"tract": tract, "patch": patch, "band": band, "psf_sigma_pix": sigma,
                              "psf_fwhm_pix_header": float(exp.metadata["PSFFWHMP"]),
                              "conv_size": int(kernel.shape[0]), "detect_thresh": dthresh,
                              "covered_fraction": float(1 - bad.mean()),
                              "n_detections": int(len(x)), "n_primary": int(p.sum()),
                              "n_ours_detect_peaks": int(len(px)),
                              "time_s": {"wall": min(walls), "cpu": min(cpus), "wall_all": walls, "cpu_all": cpus,
                                         "ours_detect_sources": min(t_det), "ours_detect_sources_all": t_det}})
            log(f"[{k + 1}/{len(coadds)}] patch {tract}/{patch} {band}: FWHM {sigma * 2.3548:.2f} px, DETECT_THRESH "
                f"{dthresh:.4f}, {len(x)} detections ({int(p.sum())} primary), {min(walls):.3f} s")
    finally:
        if args.keep:
            log(f"kept: work directory {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # --- our quanta
    qtimes = objects_quantum_times(root, run)

    # --- the project's metric, to check that the eligible set and our figure are the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its flux-ratio S/N on rows without a flux
        om = object_metrics(repo, run)
    repo.close()

    result = score(tr, ours, obj, sexcats, peaks, bands, patches, MATCH_ARCSEC)
    ok_check = (om is not None and om["object_completeness_n"] == result["n_eligible"]
                and abs(om["object_completeness_snr10"] - result["tools"]["ours"]["all"]["fraction"]) < 1e-12)
    info["loadavg_end"] = list(os.getloadavg())
    out = {
        "benchmark": "coadd object completeness vs source-extractor",
        "command": "python bench/bench_coadd_detection.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"), "repo": str(root), "run": run,
        "threshold_sigma": nu, "match_arcsec": MATCH_ARCSEC, "bands": bands,
        "patches": [list(p) for p in patches], "mean_coadd_mjd": tr["mjd"], "repeats": args.repeats,
        "sextractor_overrides": overrides, "machine": info, "coadds": per_coadd,
        "object_metrics_check": {"ok": bool(ok_check),
                                 "object_completeness_snr10": None if om is None else om["object_completeness_snr10"],
                                 "object_completeness_n": None if om is None else om["object_completeness_n"]},
        "time_s": timing(per_coadd, qtimes, patches), **result,
    }
    if not ok_check:
        log("WARNING: the recomputed eligible set / our completeness differ from object_metrics: "
            f"{out['object_metrics_check']} vs n={result['n_eligible']}, "
            f"{result['tools']['ours']['all']['fraction']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(out))
    return 0


# --------------------------------------------------------------------------- scoring
def _frac(sel: np.ndarray, found: np.ndarray) -> dict:
    n, f = int(sel.sum()), int((sel & found).sum())
    return {"found": f, "n": n, "fraction": f / n if n else float("nan")}


def on_no_data(tr: dict, tract, patch, x, y, bands) -> np.ndarray:
    """Detections centred on a pixel that no band's coadd of the patch covers (NO_DATA everywhere)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = np.ones(len(x), bool)
    for b in bands:
        cov = tr["covered"].get((int(tract), int(patch), b))
        if cov is None:
            continue
        ix = np.clip(np.round(x).astype(int), 0, cov.shape[1] - 1)
        iy = np.clip(np.round(y).astype(int), 0, cov.shape[0] - 1)
        out &= ~cov[iy, ix]
    return out


def score(tr: dict, ours: dict, obj: dict, sexcats: dict, peaks: dict, bands: list[str], patches: list,
          arcsec: float) -> dict:
    T, elig, snr = tr["T"], tr["elig"], tr["snr_best"]
    kind = T["kind"]
    tra, tdec = tr["ra"], tr["dec"]
    pops = {"all": elig, "stars": elig & (kind == "star"), "galaxies": elig & (kind == "galaxy")}
    for lo, hi in SNR_BINS:
        pops[f"snr_{lo:g}_{hi:g}"] = elig & (snr > lo) & (snr <= hi)

    def completeness(ra, dec):
        found = has_neighbour(tra, tdec, ra, dec, arcsec)
        return {name: _frac(sel, found) for name, sel in pops.items()}, found

    def detections(ra, dec, nodata):
        unmatched = ~has_neighbour(ra, dec, tra, tdec, arcsec)
        return {"n_detections": int(len(ra)), "n_unmatched": int(unmatched.sum()),
                "n_on_no_data": int(nodata.sum()), "n_unmatched_on_no_data": int((unmatched & nodata).sum())}

    def union(cats, keys):
        ks = [k for k in keys if k in cats]
        return (np.concatenate([cats[k]["ra"][cats[k]["primary"]] for k in ks]),
                np.concatenate([cats[k]["dec"][cats[k]["primary"]] for k in ks]))

    res: dict = {"n_eligible": int(elig.sum()), "n_inner": int(tr["inner"].sum()),
                 "n_eligible_stars": int(pops["stars"].sum()), "n_eligible_galaxies": int(pops["galaxies"].sum()),
                 "tools": {}}

    # ours: primary Objects (one multi-band list per patch)
    blk, found_o = completeness(ours["ra"], ours["dec"])
    nod = np.concatenate([on_no_data(tr, t, p, ours["x"][sel], ours["y"][sel], bands)
                          for t, p in patches for sel in [(ours["tract"] == t) & (ours["patch"] == p)]])
    order = np.concatenate([np.flatnonzero((ours["tract"] == t) & (ours["patch"] == p)) for t, p in patches])
    blk.update(detections(ours["ra"][order], ours["dec"][order], nod))
    # eligible objects that have an Object row within the radius, but no primary one: why
    any_row = has_neighbour(tra, tdec, obj["coord_ra"], obj["coord_dec"], arcsec)
    nonprim = elig & ~found_o & any_row
    from scipy.spatial import cKDTree
    reasons: dict[str, int] = {}
    if nonprim.any():
        _, jrow = cKDTree(_unit(obj["coord_ra"], obj["coord_dec"])).query(_unit(tra[nonprim], tdec[nonprim]))
        for j in jrow:
            why = [f for f in ("deblend_skipped", "deblend_masked", "deblend_tooManyPeaks", "deblend_parentTooBig",
                               "deblend_failed") if f in obj and bool(obj[f][j])]
            if int(obj["deblend_nChild"][j]) > 0:
                why.append("parent")
            if not all(bool(obj[f][j]) for f in ("detect_isPatchInner", "detect_isTractInner") if f in obj):
                why.append("outside inner region")
            label = "+".join(why) or "other"
            reasons[label] = reasons.get(label, 0) + 1
    blk["eligible_with_nonprimary_object_only"] = {"n": int(nonprim.sum()), "by_reason": reasons,
                                                   "truth_ids": [int(v) for v in T["truth_id"][nonprim]],
                                                   "snr": [round(float(v), 1) for v in snr[nonprim]]}
    # diagnostic: our per-band detect_sources peaks alone (before merging and deblending)
    pra, pdec = union(peaks, sorted(peaks))
    pk, _ = completeness(pra, pdec)
    blk["detect_sources_peaks"] = {"completeness": pk, "n_primary_peaks_all_bands": int(len(pra))}
    res["tools"]["ours"] = blk

    # source-extractor: completeness from the union of every band's primary detections
    sra, sdec = union(sexcats, sorted(sexcats))
    blk, found_s = completeness(sra, sdec)
    # detections: the bands merged per patch (3 px, like our merge), then the primary test
    m_ra, m_dec, m_nod = [], [], []
    for tract, patch in patches:
        per_band = {b: sexcats[(tract, patch, b)] for b in bands if (tract, patch, b) in sexcats}
        if not per_band:
            continue
        m = merge_bands(per_band, bands)
        w = tr["wcs"][(tract, patch, next(iter(per_band)))]
        ra, dec = w.all_pix2world(m["x"], m["y"], 0)
        p = primary_flags(tr["skymap"], tract, patch, m["x"], m["y"], ra, dec)
        m_ra.append(np.asarray(ra)[p]), m_dec.append(np.asarray(dec)[p])
        m_nod.append(on_no_data(tr, tract, patch, m["x"][p], m["y"][p], bands))
    blk.update(detections(np.concatenate(m_ra), np.concatenate(m_dec), np.concatenate(m_nod)))
    for b in bands:
        ks = sorted(k for k in sexcats if k[2] == b)
        bra, bdec = union(sexcats, ks)
        bnod = np.concatenate([on_no_data(tr, k[0], k[1], sexcats[k]["x"][sexcats[k]["primary"]],
                                          sexcats[k]["y"][sexcats[k]["primary"]], [b]) for k in ks])
        fb = has_neighbour(tra, tdec, bra, bdec, arcsec)
        blk[f"band_{b}"] = {"completeness": _frac(elig, fb), **detections(bra, bdec, bnod)}
    res["tools"]["sextractor"] = blk

    # where they disagree
    def who(sel):
        return {"n": int(sel.sum()), "stars": int((sel & (kind == "star")).sum()),
                "galaxies": int((sel & (kind == "galaxy")).sum()),
                "median_snr": float(np.median(snr[sel])) if sel.any() else None,
                "truth_ids": [int(v) for v in T["truth_id"][sel]]}

    res["disagreement"] = {"found_by_sextractor_only": who(elig & found_s & ~found_o),
                           "found_by_ours_only": who(elig & found_o & ~found_s),
                           "missed_by_both": who(elig & ~found_o & ~found_s)}
    return res


def timing(per_coadd: list[dict], qtimes: dict, patches: list) -> dict:
    per_patch = []
    for tract, patch in patches:
        cs = [c for c in per_coadd if (c["tract"], c["patch"]) == (tract, patch)]
        q = qtimes.get((tract, patch))
        per_patch.append({"tract": tract, "patch": patch,
                          "ours_objects_quantum_wall_s": None if q is None else q["wall_s"],
                          "ours_objects_quantum_cpu_s": None if q is None else q["cpu_s"],
                          "ours_quantum": q,
                          "sextractor_wall_s": float(sum(c["time_s"]["wall"] for c in cs)),
                          "sextractor_cpu_s": float(sum(c["time_s"]["cpu"] for c in cs)),
                          "ours_detect_sources_s": float(sum(c["time_s"]["ours_detect_sources"] for c in cs)),
                          "n_coadds": len(cs)})
    have = [p for p in per_patch if p["ours_objects_quantum_wall_s"] is not None]
    return {"per_patch": per_patch,
            "ours_total_wall_s": float(sum(p["ours_objects_quantum_wall_s"] for p in have)),
            "ours_total_cpu_s": float(sum(p["ours_objects_quantum_cpu_s"] for p in have)),
            "sextractor_total_wall_s": float(sum(p["sextractor_wall_s"] for p in per_patch)),
            "sextractor_total_cpu_s": float(sum(p["sextractor_cpu_s"] for p in per_patch)),
            "ours_detect_sources_total_s": float(sum(p["ours_detect_sources_s"] for p in per_patch)),
            "sextractor_wall_s_per_coadd": float(np.mean([c["time_s"]["wall"] for c in per_coadd])),
            "n_patches_with_quantum_time": len(have)}


# ---------------------------------------------------------------------------- output
def _pct(c: dict) -> str:
    return f"{100 * c['fraction']:.1f}% ({c['found']}/{c['n']})" if c["n"] else "n/a"


def format_table(r: dict) -> str:
    o, s = r["tools"]["ours"], r["tools"]["sextractor"]
    t, m = r["time_s"], r["machine"]
    rows: list[tuple[str, str, str, str]] = []

    def add(label, a, b, c=""):
        rows.append((label, a, b, c))

    def pp(a, b):
        return f"{100 * (a['fraction'] - b['fraction']):+.1f} pp" if a["n"] else ""

    def pct_of(n, d):
        return f"{100 * n / max(d, 1):.1f}%"

    add("completeness, stars+galaxies S/N > 10", _pct(o["all"]), _pct(s["all"]), pp(o["all"], s["all"]))
    add("  stars", _pct(o["stars"]), _pct(s["stars"]), pp(o["stars"], s["stars"]))
    add("  galaxies", _pct(o["galaxies"]), _pct(s["galaxies"]), pp(o["galaxies"], s["galaxies"]))
    for lo, hi in SNR_BINS:
        key = f"snr_{lo:g}_{hi:g}"
        label = f"  {lo:g} < S/N <= {hi:g}" if math.isfinite(hi) else f"  S/N > {lo:g}"
        add(label, _pct(o[key]), _pct(s[key]), pp(o[key], s[key]))
    for b in r["bands"]:
        add(f"  {b}-band catalogue alone", "-", _pct(s[f"band_{b}"]["completeness"]))
    pk = o["detect_sources_peaks"]["completeness"]["all"]
    add("  ours: detect_sources peaks alone (all bands)", _pct(pk), "-", "before merge + deblend")
    npo = o["eligible_with_nonprimary_object_only"]
    add("  missed: an Object within radius, not primary", str(npo["n"]), "-",
        ", ".join(f"{k} {v}" for k, v in npo["by_reason"].items()))
    d = r["disagreement"]
    add("  eligible found by this tool only", str(d["found_by_ours_only"]["n"]),
        str(d["found_by_sextractor_only"]["n"]), f"missed by both: {d['missed_by_both']['n']}")
    add("detections (primary, bands merged)", str(o["n_detections"]), str(s["n_detections"]),
        f"ours/sex = {o['n_detections'] / max(s['n_detections'], 1):.2f}")
    add(f"  with no true star/galaxy within {r['match_arcsec']:g}\"", str(o["n_unmatched"]), str(s["n_unmatched"]),
        f"{pct_of(o['n_unmatched'], o['n_detections'])} vs {pct_of(s['n_unmatched'], s['n_detections'])}")
    add("  centred on an uncovered (NO_DATA) pixel", str(o["n_on_no_data"]), str(s["n_on_no_data"]),
        f"of which unmatched: {o['n_unmatched_on_no_data']} vs {s['n_unmatched_on_no_data']}")
    ou, su = o["n_unmatched"] - o["n_unmatched_on_no_data"], s["n_unmatched"] - s["n_unmatched_on_no_data"]
    on, sn = o["n_detections"] - o["n_on_no_data"], s["n_detections"] - s["n_on_no_data"]
    add("  unmatched / detections on covered pixels", f"{ou}/{on}", f"{su}/{sn}",
        f"{pct_of(ou, on)} vs {pct_of(su, sn)}")
    for b in r["bands"]:
        sb = s[f"band_{b}"]
        add(f"  {b}-band: detections / unmatched / on NO_DATA", "-",
            f"{sb['n_detections']} / {sb['n_unmatched']} / {sb['n_on_no_data']}")
    for p in t["per_patch"]:
        ow = p["ours_objects_quantum_wall_s"]
        add(f"time, patch {p['tract']}/{p['patch']} [s]", "n/a" if ow is None else f"{ow:.2f}",
            f"{p['sextractor_wall_s']:.2f}",
            "" if ow is None else f"sex/ours = {p['sextractor_wall_s'] / ow:.3f}")
    add("time, total [s] (CPU)", f"{t['ours_total_wall_s']:.2f} ({t['ours_total_cpu_s']:.2f})",
        f"{t['sextractor_total_wall_s']:.2f} ({t['sextractor_total_cpu_s']:.2f})",
        f"sex/ours = {t['sextractor_total_wall_s'] / max(t['ours_total_wall_s'], 1e-9):.3f}")
    add("  ours: detect_sources alone, all coadds [s]", f"{t['ours_detect_sources_total_s']:.2f}", "-",
        f"sex/detect = {t['sextractor_total_wall_s'] / max(t['ours_detect_sources_total_s'], 1e-9):.2f}")

    w0 = max(len(x[0]) for x in rows)
    w1 = max(len("lsst_prod"), *(len(x[1]) for x in rows))
    w2 = max(len("source-extractor"), *(len(x[2]) for x in rows))
    thr = ", ".join(f"{c['band']} {c['detect_thresh']:.3f}" for c in r["coadds"] if c["patch"] == r["patches"][0][1])
    chk = r["object_metrics_check"]
    ov = r["sextractor_overrides"]
    head = (f"Coadd object completeness: lsst_prod vs {m['source_extractor']}\n"
            f"{len(r['coadds'])} deep coadds ({len(r['patches'])} patches x {','.join(r['bands'])}) of {r['run']} "
            f"({r['repo']}); {r['threshold_sigma']:g}-sigma PSF-filtered threshold (DETECT_THRESH {thr}); "
            f"match {r['match_arcsec']:g}\""
            + ("; source-extractor overrides: " + " ".join(f"{k}={v}" for k, v in ov.items()) if ov else "") + "\n"
            f"eligible truth: {r['n_eligible']} ({r['n_eligible_stars']} stars, {r['n_eligible_galaxies']} galaxies) "
            f"of {r['n_inner']} in the inner regions; object_metrics: "
            + (f"{chk['object_completeness_snr10']:.4f} of {chk['object_completeness_n']} "
               f"({'same as ours below' if chk['ok'] else 'DIFFERENT from ours below'})"
               if chk["object_completeness_n"] is not None else "n/a") + "\n"
            f"{m['nproc']} cores, {m['cpu_model']}; load avg {m['loadavg_start'][0]:.2f} -> "
            f"{m['loadavg_end'][0]:.2f}; lsst_prod {m['lsst_prod_code']}\n")
    lines = [f"{'':<{w0}}  {'lsst_prod':>{w1}}  {'source-extractor':>{w2}}  ratio / difference",
             "-" * (w0 + w1 + w2 + 26)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}  {dd}" for a, b, c, dd in rows]
    foot = ("ours: primary Objects (multi-band detection, merge, deblend); time = the run's `objects` quantum "
            "(attempts[-1].wall_s:\nevery band, deblending, measurement, I/O). source-extractor: every band's "
            "primary-region detections; time = the whole\ncommand per coadd, summed over the bands, best of "
            f"{r['repeats']}. sex/ours > 1: we are faster. pp = percentage points (ours - source-extractor).")
    return head + "\n".join(lines) + "\n" + foot


if __name__ == "__main__":
    sys.exit(main())
