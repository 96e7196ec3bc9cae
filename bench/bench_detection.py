#!/usr/bin/env python
"""Single-frame detection + measurement: lsst_prod vs source-extractor, on the same calexps.

For N calexps of a processed (simulated) repository, both tools run on the SAME
background-subtracted image with the SAME variance plane as their noise map:

* ours: ``detect_sources`` (PSF-matched-filter significance > 5) then
  ``measure_sources`` (centroids, PSF fit, apertures, adaptive moments, ...),
  timed on the in-memory arrays, and again including the calexp read;
* source-extractor (SExtractor 2.x): image + variance (WEIGHT_TYPE MAP_VAR)
  written to temporary FITS files, a Gaussian filter identical to our matched
  filter, and a DETECT_THRESH that makes its threshold the same 5-sigma cut of
  the filtered image (see ``sextractor_threshold``); the whole command is timed.

Each timing is the best of ``--repeats`` (3), the two tools alternating.  Both
catalogues are then scored against the simulator's truth (``truth_sources``):
completeness, detections matching no truth object, flux accuracy, centroids.

Usage (from the project root, with the project's virtualenv)::

    python bench/bench_detection.py [--repo DIR] [--keep] [-n 4] [--json]

Without ``--repo`` (or when DIR holds no processed run) the data are made
first with ``lsst-prod simulate campaigns/dp-mini.yaml`` + ``lsst-prod submit
... --site sites/threads.yaml`` (about 2 minutes on 2 cores).  Exit codes: 0
success, 2 source-extractor missing or bad input.  Documentation:
bench/README.md; recorded figures: docs/performance.md.
"""

from __future__ import annotations

import os

# Both tools single-threaded: source-extractor runs with NTHREADS 1, so keep the
# BLAS/OpenMP pools of numpy/scipy/galsim to one thread too (unless the caller set them).
_ORIG_ENV = dict(os.environ)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = ROOT / "campaigns" / "dp-mini.yaml"
SITE = ROOT / "sites" / "threads.yaml"

MATCH_RADIUS_PIX = 2.0  # detection <-> truth association radius
EDGE_PIX = 20  # truth objects closer than this to an edge are not scored
ISOLATION_FWHM = 3.0  # isolated: nearest neighbour > 3 FWHM away (or < 1% of the flux)
CALIB_RADIUS_PIX = 12.0  # our calibFlux radius = SExtractor PHOT_APERTURES 24 (a diameter)
MAX_CONV_ELEMENTS = 1024  # SExtractor's MAXMASK (filter.h): largest convolution mask
SEX_NAMES = ("source-extractor", "sextractor", "sex")
SEX_PARAMS = ("X_IMAGE", "Y_IMAGE", "FLUX_APER", "FLUXERR_APER", "FLUX_AUTO", "FLUXERR_AUTO", "FLAGS")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ source-extractor
def find_sextractor(explicit: str | None) -> str | None:
    """Path of the source-extractor binary (``--sextractor``, else the usual names on PATH)."""
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() and os.access(explicit, os.X_OK)
                                          else None)
    for name in SEX_NAMES:
        path = shutil.which(name)
        if path and _sextractor_version(path):
            return path
    return None


def _sextractor_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if "extractor" in text.lower() else None


def gaussian_kernel_2d(sigma: float) -> np.ndarray:
    """Our matched filter (unit-sum ``g g^T`` of detect.gaussian_kernel_1d), cut to SExtractor's limit."""
    from lsst_prod.algorithms.detect import gaussian_kernel_1d

    truncate = 4.0
    while True:
        g = gaussian_kernel_1d(sigma, truncate=truncate)
        if g.size**2 <= MAX_CONV_ELEMENTS or truncate <= 2.0:
            return np.outer(g, g)
        truncate -= 0.25


def sextractor_threshold(kernel: np.ndarray, nu: float) -> float:
    """DETECT_THRESH equivalent to our ``nu``-sigma cut of the matched-filtered image.

    SExtractor normalises the kernel ``K`` to unit sum, filters the image (``S = K * I``)
    and the variance map alike (``W = K * V``: a local *mean* variance), and keeps pixels
    with ``S > DETECT_THRESH * sqrt(W)`` (scan.c).  The noise of ``S`` is
    ``sqrt(K^2 * V) = sqrt(sum K^2) sqrt(V)`` for a locally uniform variance, so our
    ``S / sigma_S > nu`` is ``DETECT_THRESH = nu * sqrt(sum K^2) / sum K``
    (= nu / (2 sqrt(pi) sigma) for a well-sampled Gaussian: ~0.8 for nu = 5, sigma = 1.7 px).
    """
    k = np.abs(np.asarray(kernel, float))
    return float(nu * math.sqrt((k**2).sum()) / k.sum())


def write_conv(path: Path, kernel: np.ndarray, sigma: float) -> None:
    with open(path, "w") as f:
        f.write(f"CONV NORM\n# Gaussian, sigma = {sigma:.5f} px (FWHM {sigma * 2.3548:.4f} px), "
                f"{kernel.shape[1]}x{kernel.shape[0]}: lsst_prod's matched filter\n")
        for row in kernel:
            f.write(" ".join(f"{v:.8e}" for v in row) + "\n")


def sextractor_config(detect_thresh: float, conv: Path, params: Path, weight: Path, catalog: Path,
                      satur_level: float, overrides: dict[str, str] | None = None) -> str:
    """The configuration file (only what differs from, or matters beyond, the defaults)."""
    cfg = [
        ("CATALOG_NAME", catalog), ("CATALOG_TYPE", "ASCII_HEAD"), ("PARAMETERS_NAME", params),
        ("DETECT_TYPE", "CCD"), ("DETECT_MINAREA", 1), ("THRESH_TYPE", "RELATIVE"),
        ("DETECT_THRESH", f"{detect_thresh:.6f}"), ("ANALYSIS_THRESH", 1.5),
        ("FILTER", "Y"), ("FILTER_NAME", conv),
        ("DEBLEND_NTHRESH", 32), ("DEBLEND_MINCONT", 0.005), ("CLEAN", "Y"), ("CLEAN_PARAM", 1.0),
        ("MASK_TYPE", "CORRECT"),
        ("WEIGHT_TYPE", "MAP_VAR"), ("WEIGHT_IMAGE", weight), ("RESCALE_WEIGHTS", "N"),
        ("WEIGHT_THRESH", "1e20"), ("WEIGHT_GAIN", "N"), ("INTERP_TYPE", "ALL"),
        ("PHOT_APERTURES", f"{2 * CALIB_RADIUS_PIX:g}"), ("PHOT_AUTOPARAMS", "2.5, 3.5"),
        ("SATUR_LEVEL", f"{satur_level:.6g}"), ("GAIN", 0.0), ("MAG_ZEROPOINT", 0.0), ("PIXEL_SCALE", 1.0),
        ("BACK_TYPE", "MANUAL"), ("BACK_VALUE", 0.0), ("BACKPHOTO_TYPE", "GLOBAL"),
        ("CHECKIMAGE_TYPE", "NONE"), ("VERBOSE_TYPE", "QUIET"), ("WRITE_XML", "N"), ("NTHREADS", 1),
    ]
    merged = dict(cfg) | dict(overrides or {})
    return "".join(f"{k:<16} {v}\n" for k, v in merged.items())


def read_ascii_head(path: Path) -> dict[str, np.ndarray]:
    """Columns of an ASCII_HEAD catalogue (vector parameters of length 1 keep their name)."""
    names: list[tuple[int, str]] = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            parts = line[1:].split()
            names.append((int(parts[0]) - 1, parts[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty catalogue
        data = np.loadtxt(path, comments="#", ndmin=2)
    ncol = data.shape[1] if data.size else (names[-1][0] + 1 if names else 0)
    out = {}
    for j, (col, name) in enumerate(names):
        stop = names[j + 1][0] if j + 1 < len(names) else ncol
        block = data[:, col:stop] if data.size else np.zeros((0, stop - col))
        out[name] = block[:, 0] if block.shape[1] == 1 else block
    return out


# ----------------------------------------------------------------------- the data
def lsst_prod_command() -> list[str]:
    exe = Path(sys.executable).parent / "lsst-prod"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lsst-prod")
    return [found] if found else [sys.executable, "-m", "lsst_prod.cli"]


def _processing_run_with_calexps(repo) -> str | None:
    for run in reversed(repo.registry.list_runs("processing")):
        if repo.query("calexp", [run["name"]]):
            return run["name"]
    return None


def ensure_repo(root: Path) -> None:
    """Simulate dp-mini and run it into ``root`` unless it already holds a processed run."""
    from lsst_prod.repo import Repository

    if (root / "registry.sqlite3").exists():
        repo = Repository.open(root)
        try:
            if _processing_run_with_calexps(repo):
                return
            simulated = repo.find("truth_ccdvisits", {}, ["truth"]) is not None
        finally:
            repo.close()
    else:
        simulated = False
    cmd = lsst_prod_command()
    steps = [] if simulated else [cmd + ["simulate", str(CAMPAIGN), "--repo", str(root)]]
    steps.append(cmd + ["submit", str(CAMPAIGN), "--repo", str(root), "--site", str(SITE), "--no-progress"])
    for step in steps:
        log(f"$ {shlex.join(step)}")
        t0 = time.perf_counter()
        res = subprocess.run(step, cwd=ROOT, env=_ORIG_ENV, stdout=sys.stderr, stderr=sys.stderr)
        log(f"  ({time.perf_counter() - t0:.0f} s, exit {res.returncode})")
        if res.returncode == 1 and step[len(cmd)] == "submit":
            log("  some quanta failed; continuing with the calexps that were made")
        elif res.returncode != 0:
            raise SystemExit(f"error: `{shlex.join(step)}` failed with exit code {res.returncode}")


def pick(refs: list, n: int, band_of: dict) -> list:
    """``n`` calexps: bands in turn, each band's (visit, detector)-sorted list sampled evenly (all seeing)."""
    key = lambda r: (int(r.data_id["visit"]), int(r.data_id["detector"]))  # noqa: E731
    refs = sorted(refs, key=key)
    if n >= len(refs):
        return refs
    by_band: dict[str, list] = {}
    for r in refs:
        by_band.setdefault(str(band_of.get(key(r), "?")), []).append(r)
    bands = sorted(by_band)
    counts = {b: n // len(bands) + (i < n % len(bands)) for i, b in enumerate(bands)}
    chosen = []
    for b in bands:
        lst, k = by_band[b], min(counts[b], len(by_band[b]))
        if k:
            chosen += [lst[i] for i in np.unique(np.round(np.linspace(0, len(lst) - 1, k)).astype(int))]
    return sorted(chosen, key=key)


def _columns(table) -> dict[str, np.ndarray]:
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


# ---------------------------------------------------------------------- the tools
def run_ours(path: Path, nu: float):
    """Read + detect + measure one calexp; returns (catalogue, t_compute, t_total, cpu_compute, t_detect)."""
    from lsst_prod.algorithms import masks
    from lsst_prod.algorithms.detect import detect_sources
    from lsst_prod.algorithms.measure import measure_sources
    from lsst_prod.algorithms.psf import PsfModel
    from lsst_prod.repo.formats import read_exposure

    t0 = time.perf_counter()
    exp = read_exposure(path)
    psf = PsfModel.from_fits(*exp.psf)
    # Start from the calexp's mask without the pipeline's DETECTED planes (detect_sources sets them).
    mask = exp.mask & ~np.uint32(masks.DETECTED | masks.DETECTED_NEGATIVE)
    ny, nx = exp.image.shape
    sigma = float(psf.sigma_at((nx - 1) / 2.0, (ny - 1) / 2.0))
    t1, c1 = time.perf_counter(), time.process_time()
    fp = detect_sources(exp.image, exp.variance, mask, sigma, threshold=nu)
    t_det = time.perf_counter() - t1
    cols = measure_sources(exp.image, exp.variance, mask, fp, psf,
                           background_rms=float(np.sqrt(np.median(exp.variance))))
    t2, c2 = time.perf_counter(), time.process_time()
    return cols, t2 - t1, t2 - t0, c2 - c1, t_det


def run_sextractor(binary: str, config: Path, image: Path) -> tuple[float, float]:
    """Run the whole command; (wall seconds, CPU seconds of the child)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([binary, str(image), "-c", str(config)], capture_output=True, text=True, cwd=config.parent)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"source-extractor failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


# -------------------------------------------------------------------- the scoring
def _match(tx, ty, dx, dy):
    """(truth -> nearest detection within the radius or -1, detection -> has a truth object within it)."""
    from scipy.spatial import cKDTree

    if len(dx) == 0:
        return np.full(len(tx), -1), np.zeros(0, bool)
    d, j = cKDTree(np.column_stack([dx, dy])).query(np.column_stack([tx, ty]),
                                                     distance_upper_bound=MATCH_RADIUS_PIX)
    t2d = np.where(np.isfinite(d), j, -1)
    if len(tx) == 0:
        return t2d, np.zeros(len(dx), bool)
    d2, _ = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([dx, dy]),
                                                      distance_upper_bound=MATCH_RADIUS_PIX)
    return t2d, np.isfinite(d2)


def score(truth: dict, ccd: dict, shape: tuple[int, int], cats: dict[str, dict]) -> dict:
    """Per-image counts and per-star values for each catalogue in ``cats`` (x, y 0-based)."""
    ny, nx = shape
    flux = truth["flux_e"].astype(float)
    sigma = truth["psf_fwhm_pix"].astype(float) / 2.3548
    snr = flux / np.sqrt(np.clip(flux, 0, None) + 4 * math.pi * sigma**2 * (ccd["sky"] + ccd["read_noise"] ** 2))
    inside = (truth["x"] > EDGE_PIX) & (truth["x"] < nx - 1 - EDGE_PIX) & \
        (truth["y"] > EDGE_PIX) & (truth["y"] < ny - 1 - EDGE_PIX)
    isolated = (truth["nn_dist_pix"] > ISOLATION_FWHM * truth["psf_fwhm_pix"]) | (truth["nn_flux_ratio"] < 0.01)
    star = truth["kind"] == "star"
    clean_star = star & isolated & inside & ~truth["is_saturated"].astype(bool)
    pops = {
        "iso_stars_snr10": clean_star & (snr > 10),
        "iso_stars_snr5_10": clean_star & (snr > 5) & (snr <= 10),
        "objects_snr10": np.isin(truth["kind"], ["star", "galaxy"]) & inside & (snr > 10),
    }
    bright = clean_star & (snr > 100)
    out: dict = {"n_truth": {k: int(v.sum()) for k, v in pops.items()}, "tools": {}}
    matches = {}
    for name, cat in cats.items():
        t2d, d_ok = _match(truth["x"], truth["y"], cat["x"], cat["y"])
        matches[name] = t2d
        interior = (cat["x"] > EDGE_PIX) & (cat["x"] < nx - 1 - EDGE_PIX) & \
            (cat["y"] > EDGE_PIX) & (cat["y"] < ny - 1 - EDGE_PIX)
        out["tools"][name] = {
            "n_detections": int(len(cat["x"])),
            "n_unmatched": int((~d_ok).sum()),
            # truth_sources lists objects centred ON the detector, but objects up to 40 px off it are
            # drawn: their visible parts make "unmatched" detections at the edges.  Away from them:
            "n_detections_interior": int(interior.sum()),
            "n_unmatched_interior": int((~d_ok & interior).sum()),
            "n_found": {k: int((v & (t2d >= 0)).sum()) for k, v in pops.items()},
        }
    # Flux and centroid accuracy on the bright isolated stars found by every tool (the same stars).
    common = bright.copy()
    for t2d in matches.values():
        common &= t2d >= 0
    idx = np.flatnonzero(common)
    out["bright_stars"] = {"n": int(len(idx)), "true_flux": flux[idx].tolist()}
    for name, cat in cats.items():
        j = matches[name][idx]
        out["tools"][name]["bright"] = {
            "offset_pix": np.hypot(cat["x"][j] - truth["x"][idx], cat["y"][j] - truth["y"][idx]).tolist(),
            **{f"{k}/true": (cat[k][j] / flux[idx]).tolist() for k in cat if k.endswith("Flux")},
        }
    return out


def robust(values) -> dict:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "median": float("nan"), "robust_scatter": float("nan")}
    med = float(np.median(v))
    return {"n": int(len(v)), "median": med, "robust_scatter": float(1.4826 * np.median(np.abs(v - med)))}


# ------------------------------------------------------------------------ machine
def machine_info(sex_binary: str) -> dict:
    import scipy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import galsim
        galsim_version = galsim.__version__
    except Exception:  # pragma: no cover - galsim is a dependency
        galsim_version = "?"
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "galsim": galsim_version,
        "source_extractor": _sextractor_version(sex_binary),
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "loadavg_start": list(os.getloadavg()),
        "lsst_prod_code": _code_version(),
    }


def _code_version() -> str:
    """Commit of the tree, and whether the algorithm files timed here differ from it (read-only git)."""
    files = [f"lsst_prod/algorithms/{f}.py" for f in ("detect", "measure", "psf", "footprints")]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" (modified: " + ", ".join(line[3:] for line in dirty.splitlines()) + ")" if dirty else "")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Details: bench/README.md")
    ap.add_argument("--repo", type=Path, help="data repository (made there if it holds no processed run; "
                    "default: a temporary directory, removed afterwards unless --keep)")
    ap.add_argument("--run", help="processing run (default: the newest one with calexps)")
    ap.add_argument("-n", "--n-calexps", type=int, default=4, help="calexps to process (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repetitions, best kept (default 3)")
    ap.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma (default 5)")
    ap.add_argument("--sextractor", help="source-extractor binary (default: found on PATH)")
    ap.add_argument("--sex-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a source-extractor configuration entry, e.g. CLEAN=N (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (SExtractor inputs, config, "
                    "catalogues) and a repository made in a temporary directory")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    if args.n_calexps < 1 or args.repeats < 1:
        ap.error("--n-calexps and --repeats must be >= 1")
    overrides = {}
    for item in args.sex_set:
        k, sep_, v = item.partition("=")
        if not sep_ or not k.strip():
            ap.error(f"--sex-set expects KEY=VALUE, got {item!r}")
        overrides[k.strip().upper()] = v.strip()

    sex = find_sextractor(args.sextractor)
    if sex is None:
        what = f"{args.sextractor!r} is not an executable" if args.sextractor else \
            "no `source-extractor`/`sextractor` on PATH"
        log(f"error: source-extractor is not installed ({what}).\n"
            "Install it, e.g. on Debian/Ubuntu:\n"
            "    apt-get update && apt-get install -y --no-install-recommends source-extractor\n"
            "or pass --sextractor /path/to/binary.")
        return 2

    import fitsio

    from lsst_prod.algorithms import masks
    from lsst_prod.algorithms.apcorr import ApertureCorrection
    from lsst_prod.algorithms.detect import excluded_pixels
    from lsst_prod.algorithms.psf import PsfModel
    from lsst_prod.repo import Repository
    from lsst_prod.repo.formats import read_exposure, read_parquet

    started = _dt.datetime.now(_dt.timezone.utc)
    made_tmp_repo = args.repo is None
    root = (args.repo or Path(tempfile.mkdtemp(prefix="bench_detection_repo_"))).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_detection_work_"))
    try:
        ensure_repo(root)
        repo = Repository.open(root)
        run = args.run or _processing_run_with_calexps(repo)
        refs = repo.query("calexp", [run]) if run else []
        if not refs:
            log(f"error: no calexps in run {run!r} of {root}")
            return 2
        ccd_ref = repo.find("truth_ccdvisits", {}, ["truth"])
        if ccd_ref is None:
            log(f"error: {root} has no simulator truth (truth_ccdvisits)")
            return 2
        ccd_truth = _columns(read_parquet(repo.path_of(ccd_ref)))
        ccd_row = {(int(v), int(d)): i for i, (v, d) in enumerate(zip(ccd_truth["visit"], ccd_truth["detector"]))}
        chosen = pick(list(refs), args.n_calexps, {k: ccd_truth["band"][i] for k, i in ccd_row.items()})
        info = machine_info(sex)
        log(f"repo {root}, run {run}: {len(chosen)} of {len(refs)} calexps; {info['source_extractor']}")

        per_image = []
        for k, ref in enumerate(chosen):
            did = ref.data_id
            visit, det = int(did["visit"]), int(did["detector"])
            path = Path(repo.path_of(ref))
            exp = read_exposure(path)
            psf = PsfModel.from_fits(*exp.psf)
            ny, nx = exp.image.shape
            sigma = float(psf.sigma_at((nx - 1) / 2.0, (ny - 1) / 2.0))

            # SExtractor inputs: the same image; the variance with our detection-excluded pixels
            # (BAD, CR, NO_DATA, raw SAT) above WEIGHT_THRESH, i.e. zero weight (then interpolated).
            stem = work / f"calexp_{visit}_{det}"
            img_path, var_path = stem.with_suffix(".image.fits"), stem.with_suffix(".var.fits")
            conv, params = stem.with_suffix(".conv"), work / "bench.param"
            cat_path, cfg_path = stem.with_suffix(".cat"), stem.with_suffix(".sex")
            var = np.array(exp.variance, dtype=np.float32, copy=True)
            var[excluded_pixels(exp.mask)] = 1e30
            fitsio.write(str(img_path), np.ascontiguousarray(exp.image, dtype=np.float32), clobber=True)
            fitsio.write(str(var_path), var, clobber=True)
            kernel = gaussian_kernel_2d(sigma)
            write_conv(conv, kernel, sigma)
            params.write_text("\n".join(SEX_PARAMS) + "\n")
            dthresh = sextractor_threshold(kernel, args.threshold)
            # (SATUR_LEVEL only sets FLAGS bit 4, which is not scored.)
            sat = ((exp.mask & masks.SAT) != 0) & ((exp.mask & masks.INTRP) == 0)
            satur = float(np.min(exp.image[sat])) if sat.any() else 1e9
            cfg_path.write_text(sextractor_config(dthresh, conv, params, var_path, cat_path, satur, overrides))

            t_ours, t_ours_read, t_det, t_sex, cpu_ours, cpu_sex = [], [], [], [], [], []
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                cols, tc, tt, cc, td = run_ours(path, args.threshold)
                t_ours.append(tc), t_ours_read.append(tt), cpu_ours.append(cc), t_det.append(td)
                ws, cs = run_sextractor(sex, cfg_path, img_path)
                t_sex.append(ws), cpu_sex.append(cs)
            scat = read_ascii_head(cat_path)

            leaf = cols["deblend_nChild"] == 0  # isolated sources and deblended children, no parents
            apc_hdr = exp.extra.get("APCORR", (None, {}))[1]
            apcorr = ApertureCorrection.from_dict(json.loads(apc_hdr["APCDICT"])) if "APCDICT" in apc_hdr else None
            ox, oy = cols["x"][leaf], cols["y"][leaf]
            ours = {"x": ox, "y": oy, "ap12Flux": cols["calibFlux"][leaf], "psfFlux": cols["psfFlux"][leaf]}
            if apcorr is not None:
                ours["apcorrPsfFlux"] = cols["psfFlux"][leaf] * apcorr(ox, oy)
            sexcat = {"x": scat["X_IMAGE"] - 1.0, "y": scat["Y_IMAGE"] - 1.0,
                      "ap12Flux": scat["FLUX_APER"], "autoFlux": scat["FLUX_AUTO"]}
            ccd_i = ccd_row[(visit, det)]
            ccd = {"sky": float(ccd_truth["sky_e_per_pix"][ccd_i]), "read_noise": float(ccd_truth["read_noise"][ccd_i])}
            tref = repo.find("truth_sources", did, ["truth"])
            if tref is None:
                log(f"error: no truth_sources for {did} in {root}")
                return 2
            truth = _columns(read_parquet(repo.path_of(tref)))
            sc = score(truth, ccd, exp.image.shape, {"ours": ours, "sextractor": sexcat})
            sc.update(
                visit=visit, detector=det, band=exp.metadata.get("BAND"), psf_fwhm_pix=sigma * 2.3548,
                sextractor_detect_thresh=dthresh, conv_size=int(kernel.shape[0]),
                n_ours_rows=int(len(cols["x"])), n_ours_parents=int((~leaf).sum()),
                sextractor_flagged=int((scat["FLAGS"] > 0).sum()) if len(scat.get("FLAGS", [])) else 0,
                time={"ours_compute": min(t_ours), "ours_with_read": min(t_ours_read), "sextractor": min(t_sex),
                      "ours_detect": min(t_det), "ours_measure": min(c - d for c, d in zip(t_ours, t_det)),
                      "ours_compute_cpu": min(cpu_ours), "sextractor_cpu": min(cpu_sex),
                      "ours_compute_all": t_ours, "ours_with_read_all": t_ours_read, "sextractor_all": t_sex},
            )
            per_image.append(sc)
            tm = sc["time"]
            log(f"[{k + 1}/{len(chosen)}] visit {visit} det {det} ({sc['band']}, FWHM {sc['psf_fwhm_pix']:.2f} px): "
                f"ours {tm['ours_compute']:.3f} s ({tm['ours_with_read']:.3f} s with read), "
                f"source-extractor {tm['sextractor']:.3f} s; detections {sc['tools']['ours']['n_detections']} vs "
                f"{sc['tools']['sextractor']['n_detections']}; DETECT_THRESH {dthresh:.4f}")
        repo.close()
        info["loadavg_end"] = list(os.getloadavg())
        result = summarise(per_image, args, run, root, info, started, overrides)
    finally:
        if args.keep:
            log(f"kept: work directory {work}" + (f", repository {root}" if made_tmp_repo else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
            if made_tmp_repo:
                shutil.rmtree(root, ignore_errors=True)

    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _calexp_summary(p: dict, tools) -> dict:
    keys = ("visit", "detector", "band", "psf_fwhm_pix", "sextractor_detect_thresh", "conv_size", "n_ours_rows",
            "n_ours_parents", "sextractor_flagged", "time", "n_truth")
    out = {k: p[k] for k in keys}
    out["tools"] = {t: {k: v for k, v in p["tools"][t].items() if k != "bright"} for t in tools}
    return out


def summarise(per_image: list[dict], args, run: str, root: Path, info: dict, started, overrides: dict) -> dict:
    tools = ("ours", "sextractor")
    tot = {k: float(sum(p["time"][k] for p in per_image))
           for k in ("ours_compute", "ours_with_read", "sextractor", "ours_compute_cpu", "sextractor_cpu",
                     "ours_detect", "ours_measure")}
    n_img = len(per_image)
    res: dict = {
        "benchmark": "single-frame detection + measurement vs source-extractor",
        "command": "python bench/bench_detection.py " + shlex.join(sys.argv[1:]),
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "repo": str(root), "run": run, "n_calexps": n_img, "repeats": args.repeats,
        "threshold_sigma": args.threshold, "sextractor_overrides": dict(overrides), "machine": info,
        "calexps": [_calexp_summary(p, tools) for p in per_image],
        "time_s": {"total": tot, "per_calexp": {k: v / n_img for k, v in tot.items()}},
        "speed_ratio": {"sextractor_over_ours_compute": tot["sextractor"] / tot["ours_compute"],
                        "sextractor_over_ours_with_read": tot["sextractor"] / tot["ours_with_read"]},
        "quality": {},
    }
    q = res["quality"]
    pops = per_image[0]["n_truth"].keys()
    for t in tools:
        qt: dict = {
            "n_detections": sum(p["tools"][t]["n_detections"] for p in per_image),
            "n_unmatched": sum(p["tools"][t]["n_unmatched"] for p in per_image),
            "n_detections_interior": sum(p["tools"][t]["n_detections_interior"] for p in per_image),
            "n_unmatched_interior": sum(p["tools"][t]["n_unmatched_interior"] for p in per_image),
        }
        for pop in pops:
            n = sum(p["n_truth"][pop] for p in per_image)
            f = sum(p["tools"][t]["n_found"][pop] for p in per_image)
            qt[f"completeness_{pop}"] = {"found": f, "n": n, "fraction": f / n if n else float("nan")}
        bright = [p["tools"][t]["bright"] for p in per_image]
        for key in sorted({k for b in bright for k in b}):
            vals = np.concatenate([np.asarray(b.get(key, []), float) for b in bright]) if bright else np.zeros(0)
            qt[key] = robust(vals)
        q[t] = qt
    res["bright_star_selection"] = ("isolated, unsaturated stars > 20 px from the edges with expected S/N > 100, "
                                    "matched by both tools (the same stars for both)")
    return res


def _fmt_pct(c: dict) -> str:
    return f"{100 * c['fraction']:.1f}% ({c['found']}/{c['n']})" if c["n"] else "n/a"


def format_table(r: dict) -> str:
    m, t, q = r["machine"], r["time_s"]["per_calexp"], r["quality"]
    o, s = q["ours"], q["sextractor"]
    rows: list[tuple[str, str, str, str]] = []

    def add(label, a, b, c=""):
        rows.append((label, a, b, c))

    sp = r["speed_ratio"]
    add("time / calexp, detect+measure [s]", f"{t['ours_compute']:.3f}", f"{t['sextractor']:.3f}",
        f"sex/ours = {sp['sextractor_over_ours_compute']:.2f}")
    add("  of which detect_sources / measure_sources", f"{t['ours_detect']:.3f} / {t['ours_measure']:.3f}", "-",
        "(best of each)")
    add("time / calexp, incl. FITS read [s]", f"{t['ours_with_read']:.3f}", f"{t['sextractor']:.3f}",
        f"sex/ours = {sp['sextractor_over_ours_with_read']:.2f}")
    add("CPU time / calexp [s]", f"{t['ours_compute_cpu']:.3f}", f"{t['sextractor_cpu']:.3f}",
        f"sex/ours = {t['sextractor_cpu'] / t['ours_compute_cpu']:.2f}")
    add("detections (leaf rows / objects)", str(o["n_detections"]), str(s["n_detections"]),
        f"ours/sex = {o['n_detections'] / max(s['n_detections'], 1):.2f}")
    add(f"  with no truth object within {MATCH_RADIUS_PIX:g} px", str(o["n_unmatched"]), str(s["n_unmatched"]),
        f"{100 * o['n_unmatched'] / max(o['n_detections'], 1):.1f}% vs "
        f"{100 * s['n_unmatched'] / max(s['n_detections'], 1):.1f}%")
    add(f"  same, detections > {EDGE_PIX} px from the edges",
        f"{o['n_unmatched_interior']}/{o['n_detections_interior']}",
        f"{s['n_unmatched_interior']}/{s['n_detections_interior']}",
        f"{100 * o['n_unmatched_interior'] / max(o['n_detections_interior'], 1):.1f}% vs "
        f"{100 * s['n_unmatched_interior'] / max(s['n_detections_interior'], 1):.1f}%")
    for key, label in (("completeness_iso_stars_snr10", "completeness, isolated stars S/N > 10"),
                       ("completeness_iso_stars_snr5_10", "completeness, isolated stars 5 < S/N <= 10"),
                       ("completeness_objects_snr10", "completeness, stars+galaxies S/N > 10")):
        a, b = o[key], s[key]
        add(label, _fmt_pct(a), _fmt_pct(b),
            f"{100 * (a['fraction'] - b['fraction']):+.1f} pp" if a["n"] else "")

    def fx(d):
        return f"{d['median']:.4f} +- {d['robust_scatter']:.4f}" if d["n"] else "n/a"

    nb = o.get("ap12Flux/true", {}).get("n", 0)
    add(f"12-px aperture / true (bright stars, n={nb})", fx(o["ap12Flux/true"]), fx(s["ap12Flux/true"]),
        f"median diff {o['ap12Flux/true']['median'] - s['ap12Flux/true']['median']:+.4f}" if nb else "")
    add("psfFlux / true  |  FLUX_AUTO / true", fx(o["psfFlux/true"]), fx(s["autoFlux/true"]))
    if "apcorrPsfFlux/true" in o:
        add("psfFlux x calexp APCORR / true", fx(o["apcorrPsfFlux/true"]), "-")
    add("centroid offset from truth, median [px]", f"{o['offset_pix']['median']:.3f}",
        f"{s['offset_pix']['median']:.3f}")

    w0 = max(len(x[0]) for x in rows)
    w1 = max(len("lsst_prod"), *(len(x[1]) for x in rows))
    w2 = max(len("source-extractor"), *(len(x[2]) for x in rows))
    head = (f"Single-frame detection + measurement: lsst_prod vs {m['source_extractor']}\n"
            f"{r['n_calexps']} calexps of {r['run']} ({r['repo']}), {r['threshold_sigma']:g}-sigma PSF-filtered "
            f"threshold, best of {r['repeats']}"
            + ("; source-extractor overrides: " + " ".join(f"{k}={v}" for k, v in r["sextractor_overrides"].items())
               if r["sextractor_overrides"] else "") + "\n"
            f"{m['nproc']} cores, {m['cpu_model']}; numpy {m['numpy']}, scipy {m['scipy']}, python {m['python']}; "
            f"load avg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; lsst_prod {m['lsst_prod_code']}\n")
    lines = [f"{'':<{w0}}  {'lsst_prod':>{w1}}  {'source-extractor':>{w2}}  ratio / difference",
             "-" * (w0 + w1 + w2 + 26)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}  {d}" for a, b, c, d in rows]
    foot = ("speed ratio = source-extractor time / our time (> 1: we are faster); flux figures: median +- "
            "1.4826 MAD;\nbright stars = " + r["bright_star_selection"] + ".")
    return head + "\n".join(lines) + "\n" + foot


if __name__ == "__main__":
    sys.exit(main())
