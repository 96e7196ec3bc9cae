#!/usr/bin/env python
"""Relative calibration: lsst_prod's relcal vs SCAMP, on the same Source catalogues.

Both tools calibrate the single-frame Source tables of one processing run (for
lsst_prod, the run's own relcal outputs) and are scored against the simulator's
truth:

* SCAMP's input: every ccdvisit's calibration stars, i.e. the rows relcal itself
  uses (``select_good_sources`` with the run's relcal parameters: point-like,
  unsaturated, not blended, S/N > 10, isolated), as FITS_LDAC, one file per
  exposure with one extension per detector (``--layout ccd``: one file per
  ccdvisit).  LDAC_IMHEAD holds the starting WCS, the calexp's TAN-SIP converted
  exactly to TPV (``--start-wcs tan``: the SIP terms dropped), and PHOT_C, the
  single-frame zero point of the chip; LDAC_OBJECTS the 1-based pixel centroids,
  their errors, and the instrumental (electron) aperture-corrected PSF flux as
  FLUX_AUTO.  The reference catalogue is the refcat moved by its proper motions to
  the mean epoch of the visits: SCAMP 2.10 takes one reference epoch.  SCAMP runs
  with MATCH N, SOLVE_ASTROM Y, SOLVE_PHOTOM Y (``scamp_config``); its .head
  files give each chip's WCS and FLXSCALE/MAGZEROP.
* Photometry: for each ccdvisit, the median over bright (PSF S/N > 100),
  isolated, unsaturated truth-matched stars of 2.5 log10(calibrated psfFlux /
  true flux); the per-band mean is removed (SCAMP's level is arbitrary) and the
  rms over ccdvisits is quoted in mmag.  Also the zero points vs the true ones.
* Astrometry: rms and median distance (mas) between each tool's position of
  those stars and their TRUE position at the epoch (S/N > 300 and > 100);
  SCAMP's positions come from its fitted WCS applied to the same centroids.
* Time: SCAMP's whole command (read, cross-match, astrometric and photometric
  solutions, write the headers; NTHREADS 1), best of ``--repeats``.  Ours: the
  relcal stage's ``run_quantum`` run again in this process with one rank (Parquet
  reads from the repository, writes to a scratch directory), with the kernels
  timed separately, and the relcal quantum's wall time in the run's provenance.
* Diagnostic (``--no-diagnostic`` skips it): SCAMP once more without the sources
  of stars that the truth says are variable.

Usage (from the project root, with the project's virtualenv)::

    python bench/bench_relcal_vs_scamp.py [--repo DIR] [--run NAME] [--json]

Without ``--repo`` (or when DIR holds no run with relcal outputs) the data are
made first with ``lsst-prod simulate campaigns/dp-mini.yaml`` + ``lsst-prod
submit ... --site sites/threads.yaml`` (a few minutes on 2 cores).  Exit codes: 0
success, 2 SCAMP missing or bad input.  Documentation: bench/README.md.
"""

from __future__ import annotations

import os

# Both tools on one core: SCAMP runs with NTHREADS 1, our stage with one rank and
# single-threaded BLAS (unless the caller set these).
_ORIG_ENV = dict(os.environ)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
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

MATCH_RADIUS_PIX = 1.0  # source <-> truth association radius
ISOLATION_FWHM = 3.0  # isolated: nearest truth neighbour > 3 FWHM away (or < 1% of the flux)
EDGE_PIX = 10  # truth stars closer than this to an edge are not scored
SNR_PHOT = 100.0
SNR_ASTROM = (300.0, 100.0)
MAS_PER_DEG = 3.6e6
AB_NJY = 31.4  # m_AB = 31.4 - 2.5 log10(f / nJy)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _columns(table) -> dict[str, np.ndarray]:
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


# ----------------------------------------------------------------------- the data
def lsst_prod_command() -> list[str]:
    exe = Path(sys.executable).parent / "lsst-prod"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lsst-prod")
    return [found] if found else [sys.executable, "-m", "lsst_prod.cli"]


def relcal_run(repo, explicit: str | None = None) -> str | None:
    """The newest processing run with a relcal_solution (or ``explicit`` if it has one)."""
    names = [explicit] if explicit else [r["name"] for r in reversed(repo.registry.list_runs("processing"))]
    for name in names:
        if repo.query("relcal_solution", [name]):
            return name
    return None


def ensure_repo(root: Path) -> None:
    """Simulate dp-mini and run it into ``root`` unless it already holds a run with relcal outputs."""
    from lsst_prod.repo import Repository

    simulated = False
    if (root / "registry.sqlite3").exists():
        repo = Repository.open(root)
        try:
            if relcal_run(repo):
                return
            simulated = repo.find("truth_ccdvisits", {}, ["truth"]) is not None
        finally:
            repo.close()
    cmd = lsst_prod_command()
    steps = [] if simulated else [cmd + ["simulate", str(CAMPAIGN), "--repo", str(root)]]
    steps.append(cmd + ["submit", str(CAMPAIGN), "--repo", str(root), "--site", str(SITE), "--no-progress"])
    for step in steps:
        log(f"$ {shlex.join(step)}")
        t0 = time.perf_counter()
        res = subprocess.run(step, cwd=ROOT, env=_ORIG_ENV, stdout=sys.stderr, stderr=sys.stderr)
        log(f"  ({time.perf_counter() - t0:.0f} s, exit {res.returncode})")
        if res.returncode not in (0, 1):
            raise SystemExit(f"error: `{shlex.join(step)}` failed with exit code {res.returncode}")


@dataclasses.dataclass
class Ccd:
    """One ccdvisit: its Source rows, calibrated rows, calexp headers, truth and zero points."""

    k: int
    visit: int
    detector: int
    band: str
    ccdvisit_id: int
    mjd: float
    src: dict
    cal: dict  # source_calibrated, rows aligned with src
    image_header: object
    primary_header: object
    truth: dict
    truth_row: dict
    zp_sf: float  # single-frame zero point (AB mag of one electron)
    zp_relcal: float
    zp_true: float


def relcal_attempt(repo, run: str) -> dict | None:
    """The relcal quantum's last successful attempt in the run's provenance (params, wall_s, summary)."""
    import sqlalchemy as sa

    from lsst_prod.provenance.db import attempts

    with repo.engine.connect() as c:
        row = c.execute(sa.select(attempts).where((attempts.c.run == run) & (attempts.c.stage == "relcal")
                                                  & (attempts.c.outcome == "succeeded"))
                        .order_by(attempts.c.id.desc())).first()
    if row is None:
        return None
    return {"wall_s": row.wall_s, "cpu_s": row.cpu_s, "peak_rss_mib": row.peak_rss_mib,
            "params": json.loads(row.params or "{}"), "summary": json.loads(row.summary or "{}"),
            "executor": row.executor, "attempt": row.attempt}


def load_data(repo, run: str) -> tuple[list[Ccd], dict, dict]:
    from astropy.io import fits

    from lsst_prod.repo.formats import read_parquet

    sol = _columns(read_parquet(repo.path_of(repo.query("relcal_solution", [run])[0])))
    zp_rel = {(int(v), int(d)): float(z) for v, d, z in zip(sol["visit"], sol["detector"], sol["zeroPoint"])}
    tref = repo.find("truth_ccdvisits", {}, ["truth"])
    if tref is None:
        raise SystemExit("error: the repository has no simulator truth (truth_ccdvisits)")
    tc = _columns(read_parquet(repo.path_of(tref)))
    trow = {(int(v), int(d)): {n: tc[n][i] for n in tc} for i, (v, d) in enumerate(zip(tc["visit"], tc["detector"]))}
    refcat = _columns(read_parquet(repo.path_of(repo.find("refcat", {}, ["refcats"]))))
    ccds = []
    srcs = sorted(repo.query("source", [run]), key=lambda r: (int(r.data_id["visit"]), int(r.data_id["detector"])))
    for k, ref in enumerate(srcs):
        did = ref.data_id
        key = (int(did["visit"]), int(did["detector"]))
        src = _columns(read_parquet(repo.path_of(ref)))
        cal = _columns(read_parquet(repo.get_path("source_calibrated", did, [run])))
        if not np.array_equal(src["sourceId"], cal["sourceId"]):
            order = {s: i for i, s in enumerate(cal["sourceId"])}
            idx = np.array([order[s] for s in src["sourceId"]])
            cal = {n: v[idx] for n, v in cal.items()}
        cv = _columns(read_parquet(repo.get_path("ccdVisit", did, [run])))
        calexp = repo.get_path("calexp", did, [run])
        with fits.open(calexp) as hdus:
            primary, image = hdus[0].header.copy(), hdus["IMAGE"].header.copy()
        truth = _columns(read_parquet(repo.get_path("truth_sources", did, ["truth"])))
        ccds.append(Ccd(k, key[0], key[1], str(cv["band"][0]), int(cv["ccdVisitId"][0]), float(cv["expMidptMJD"][0]),
                        src, cal, image, primary, truth, trow[key], float(cv["zeroPoint"][0]), zp_rel[key],
                        float(trow[key]["zero_point"])))
    return ccds, refcat, sol


# ---------------------------------------------------------------- SCAMP's inputs
def calibration_rows(ccds: list[Ccd], params: dict) -> list[np.ndarray]:
    """Per ccdvisit, the rows relcal's own selection keeps (select_good_sources, the run's parameters)."""
    from lsst_prod.algorithms.relcal import select_good_sources

    cols = ("ra", "dec", "psfFlux", "psfFluxErr", "extendedness", "pixelFlags_saturatedCenter", "deblend_nChild",
            "parentSourceId")
    S = {c: np.concatenate([ccd.src[c] for ccd in ccds]) for c in cols}
    k = np.concatenate([np.full(len(ccd.src["x"]), ccd.k) for ccd in ccds])
    good = select_good_sources(k, S["ra"], S["dec"], S["psfFlux"], S["psfFluxErr"], S["extendedness"],
                               S["pixelFlags_saturatedCenter"].astype(bool), S["deblend_nChild"],
                               S["parentSourceId"], snr_min=float(params.get("snr_min", 10.0)),
                               isolation_arcsec=float(params.get("isolation_arcsec", 2.0)))
    starts = np.cumsum([0] + [len(ccd.src["x"]) for ccd in ccds])
    return [np.flatnonzero(good[starts[i]:starts[i + 1]]) for i in range(len(ccds))]


def _tpv_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """TPV monomials 0..10 (degree 3) without the radial term 3: 1, x, y, [r], x2, xy, y2, x3, x2y, xy2, y3."""
    return np.stack([np.ones_like(x), x, y, np.zeros_like(x), x * x, x * y, y * y, x ** 3, x * x * y, x * y * y,
                     y ** 3], axis=-1)


def start_wcs_cards(image_header, mode: str) -> list[tuple[str, object]]:
    """The starting WCS: the calexp's TAN-SIP as an exact degree-3 TPV (``tpv``) or its TAN part (``tan``).

    SIP: (x, y) = CD (u + A(u, v), v + B(u, v)) with (u, v) = pixel - CRPIX.  TPV:
    (xi, eta) = P(x', y') with (x', y') = CD (u, v).  Since (u, v) = CD^-1 (x', y'), the SIP
    map is a cubic polynomial of (x', y'): fitted by least squares on a grid (exact).
    """
    h = image_header
    cd = np.array([[h["CD1_1"], h["CD1_2"]], [h["CD2_1"], h["CD2_2"]]], float)
    cards: list[tuple[str, object]] = [
        ("CTYPE1", "RA---TPV" if mode == "tpv" else "RA---TAN"),
        ("CTYPE2", "DEC--TPV" if mode == "tpv" else "DEC--TAN"),
        ("CUNIT1", "deg"), ("CUNIT2", "deg"), ("RADESYS", "ICRS"), ("EQUINOX", 2000.0),
        ("CRVAL1", float(h["CRVAL1"])), ("CRVAL2", float(h["CRVAL2"])),
        ("CRPIX1", float(h["CRPIX1"])), ("CRPIX2", float(h["CRPIX2"])),
        ("CD1_1", cd[0, 0]), ("CD1_2", cd[0, 1]), ("CD2_1", cd[1, 0]), ("CD2_2", cd[1, 1]),
    ]
    if mode != "tpv":
        return cards
    nx, ny = int(h["NAXIS1"]), int(h["NAXIS2"])
    gx, gy = np.meshgrid(np.linspace(-20, nx + 20, 25), np.linspace(-20, ny + 20, 25))
    u, v = gx.ravel() + 1.0 - h["CRPIX1"], gy.ravel() + 1.0 - h["CRPIX2"]
    du, dv = np.zeros_like(u), np.zeros_like(v)
    for name, order_key, out in (("A", "A_ORDER", du), ("B", "B_ORDER", dv)):
        order = int(h.get(order_key, 0))
        for i in range(order + 1):
            for j in range(order + 1 - i):
                c = h.get(f"{name}_{i}_{j}")
                if c is not None:
                    out += float(c) * u ** i * v ** j
    xp = cd[0, 0] * u + cd[0, 1] * v
    yp = cd[1, 0] * u + cd[1, 1] * v
    xi = cd[0, 0] * (u + du) + cd[0, 1] * (v + dv)
    eta = cd[1, 0] * (u + du) + cd[1, 1] * (v + dv)
    cols = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    A = _tpv_terms(xp, yp)[:, cols]
    c1 = np.linalg.lstsq(A, xi, rcond=None)[0]
    B = _tpv_terms(yp, xp)[:, cols]  # PV2 swaps the roles of x and y
    c2 = np.linalg.lstsq(B, eta, rcond=None)[0]
    for j, c in zip(cols, c1):
        cards.append((f"PV1_{j}", float(c)))
    for j, c in zip(cols, c2):
        cards.append((f"PV2_{j}", float(c)))
    return cards


def image_header(ccd: Ccd, wcs_mode: str, phot_c: float | None):
    """The LDAC_IMHEAD header: image size, starting WCS and the keywords SCAMP reads."""
    from astropy.io import fits

    p, h = ccd.primary_header, ccd.image_header
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = -32
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = int(h["NAXIS1"])
    hdr["NAXIS2"] = int(h["NAXIS2"])
    for key, val in start_wcs_cards(h, wcs_mode):
        hdr[key] = val
    hdr["INSTRUME"] = str(p.get("INSTRUME", "SimCam"))
    hdr["DETECTOR"] = int(ccd.detector)
    hdr["VISIT"] = int(ccd.visit)
    hdr["FILTER"] = str(p.get("FILTER", ccd.band))
    hdr["EXPTIME"] = float(p["EXPTIME"])
    hdr["MJD-OBS"] = float(p["MJD-OBS"])
    hdr["DATE-OBS"] = str(p["DATE-OBS"])
    hdr["AIRMASS"] = float(p.get("AIRMASS", 1.0))
    if phot_c is not None:
        hdr["PHOT_C"] = (float(phot_c), "mag of 1 e-/s (single-frame)")
    return hdr


def ldac_objects(ccd: Ccd, rows: np.ndarray, nje: float) -> dict[str, np.ndarray]:
    """LDAC_OBJECTS columns: 1-based centroids and errors, instrumental aperture-corrected PSF flux (e-)."""
    s = ccd.src
    xerr = np.nan_to_num(s["xErr"][rows], nan=0.05)
    yerr = np.nan_to_num(s["yErr"][rows], nan=0.05)
    flux = s["psfFlux"][rows] / nje
    ferr = s["psfFluxErr"][rows] / nje
    return {
        "NUMBER": np.arange(1, len(rows) + 1, dtype=np.int32),
        "XWIN_IMAGE": s["x"][rows] + 1.0,
        "YWIN_IMAGE": s["y"][rows] + 1.0,
        "ERRAWIN_IMAGE": np.maximum(xerr, yerr).astype(np.float32),
        "ERRBWIN_IMAGE": np.minimum(xerr, yerr).astype(np.float32),
        "ERRTHETAWIN_IMAGE": np.where(xerr >= yerr, 0.0, 90.0).astype(np.float32),
        "FLUX_AUTO": flux.astype(np.float64),
        "FLUXERR_AUTO": ferr.astype(np.float64),
        "MAG_AUTO": (-2.5 * np.log10(flux)).astype(np.float32),
        "MAGERR_AUTO": (2.5 / np.log(10) * ferr / flux).astype(np.float32),
        "FLAGS": np.zeros(len(rows), np.int16),
    }


def write_ldac(path: Path, blocks: list[tuple[object, dict[str, np.ndarray]]]) -> None:
    """FITS_LDAC: an empty primary, then per extension LDAC_IMHEAD (the header text) + LDAC_OBJECTS."""
    from astropy.io import fits

    formats = {np.dtype(np.float64): "1D", np.dtype(np.float32): "1E", np.dtype(np.int32): "1J",
               np.dtype(np.int16): "1I"}
    hdus = [fits.PrimaryHDU()]
    for hdr, cols in blocks:
        text = hdr.tostring(endcard=True, padding=False)
        # one row holding the cards back to back, space-padded (a TDIM array of 80-char strings
        # would be NUL-padded by astropy, which SCAMP's header parser does not accept)
        head = fits.BinTableHDU.from_columns(
            [fits.Column(name="Field Header Card", format=f"{len(text)}A",
                         array=np.array([text.encode("ascii")], dtype=f"S{len(text)}"))])
        head.header["TDIM1"] = f"(80, {len(text) // 80})"
        head.header["EXTNAME"] = "LDAC_IMHEAD"
        obj = fits.BinTableHDU.from_columns(
            [fits.Column(name=n, format=formats[np.asarray(v).dtype], array=np.asarray(v)) for n, v in cols.items()])
        obj.header["EXTNAME"] = "LDAC_OBJECTS"
        hdus += [head, obj]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits.HDUList(hdus).writeto(path, overwrite=True)
    # astropy strips the trailing blanks of the END card and pads with NULs, which makes
    # SCAMP 2.10 crash (segmentation fault): put the blanks back
    data = bytearray(path.read_bytes())
    for hdr, _ in blocks:
        text = hdr.tostring(endcard=True, padding=False).encode("ascii")
        pos = data.find(text.rstrip())
        if pos < 0:
            raise RuntimeError(f"LDAC_IMHEAD text not found in {path}")
        data[pos:pos + len(text)] = text
    path.write_bytes(bytes(data))


def write_refcat(path: Path, refcat: dict, epoch_mjd: float, band: str) -> dict:
    """The reference catalogue at ``epoch_mjd`` (proper motions applied; no parallax: no single Earth position).

    Position errors grow with the propagation: sqrt(pos_err^2 + (pm_err dt)^2).
    """
    from astropy.io import fits

    from lsst_prod.algorithms.astrometry import propagate_positions

    n = len(refcat["ra"])
    ra, dec = propagate_positions(refcat["ra"], refcat["dec"], refcat["pmra"], refcat["pmdec"], np.zeros(n),
                                  refcat["epoch_mjd"], epoch_mjd)
    dt = (epoch_mjd - np.asarray(refcat["epoch_mjd"], float)) / 365.25
    era = np.hypot(refcat["ra_err"], refcat["pmra_err"] * dt) / MAS_PER_DEG
    edec = np.hypot(refcat["dec_err"], refcat["pmdec_err"] * dt) / MAS_PER_DEG
    flux = np.asarray(refcat[f"{band}_flux"], float)
    ferr = np.asarray(refcat[f"{band}_fluxErr"], float)
    ok = flux > 0
    cols = {
        "X_WORLD": ra[ok], "Y_WORLD": dec[ok],
        "ERRA_WORLD": np.maximum(era, edec)[ok], "ERRB_WORLD": np.minimum(era, edec)[ok],
        "ERRTHETA_WORLD": np.zeros(int(ok.sum())),
        "MAG": (AB_NJY - 2.5 * np.log10(flux[ok])).astype(np.float32),
        "MAGERR": (2.5 / np.log(10) * ferr[ok] / flux[ok]).astype(np.float32),
        "OBSDATE": np.full(int(ok.sum()), 2000.0 + (epoch_mjd - 51544.5) / 365.25),
        "FLAGS": np.zeros(int(ok.sum()), np.int16),
    }
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = 8
    hdr["NAXIS"] = 0
    write_ldac(path, [(hdr, cols)])
    return {"n": int(ok.sum()), "epoch_mjd": float(epoch_mjd), "band": band,
            "median_pos_err_mas": float(np.median(np.hypot(era, edec)[ok] / np.sqrt(2) * MAS_PER_DEG))}


# ------------------------------------------------------------------ SCAMP itself
def find_scamp(explicit: str | None) -> str | None:
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() and os.access(explicit, os.X_OK)
                                          else None)
    return shutil.which("scamp")


def scamp_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


def scamp_config(layout: str, refcat: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """SCAMP's configuration (what differs from the defaults, or matters; ``--scamp-set`` overrides)."""
    cfg = {
        # reference: the local FITS_LDAC file, no network
        "ASTREF_CATALOG": "FILE", "ASTREFCAT_NAME": str(refcat),
        "ASTREFCENT_KEYS": "X_WORLD,Y_WORLD", "ASTREFERR_KEYS": "ERRA_WORLD,ERRB_WORLD,ERRTHETA_WORLD",
        "ASTREFMAG_KEY": "MAG", "ASTREFMAGERR_KEY": "MAGERR", "ASTREFOBSDATE_KEY": "OBSDATE",
        # the starting WCS (single-frame TAN-SIP as TPV) is good to a few mas: no pattern matching
        "MATCH": "N", "CROSSID_RADIUS": "1.0",
        "MOSAIC_TYPE": "UNCHANGED",
        # astrometry: one distortion polynomial per detector shared by all exposures (same
        # optics in both bands) + per-exposure linear terms
        "SOLVE_ASTROM": "Y", "PROJECTION_TYPE": "TPV",
        "ASTRINSTRU_KEY": "INSTRUME" if layout == "exposure" else "INSTRUME,DETECTOR",
        "STABILITY_TYPE": "INSTRUMENT", "DISTORT_DEGREES": "3",
        "CENTROID_KEYS": "XWIN_IMAGE,YWIN_IMAGE",
        "CENTROIDERR_KEYS": "ERRAWIN_IMAGE,ERRBWIN_IMAGE,ERRTHETAWIN_IMAGE",
        # photometry: one instrument per band; flux = instrumental aperture-corrected PSF flux
        "SOLVE_PHOTOM": "Y", "PHOTINSTRU_KEY": "FILTER", "MAGZERO_KEY": "PHOT_C", "EXPOTIME_KEY": "EXPTIME",
        "PHOTFLUX_KEY": "FLUX_AUTO", "PHOTFLUXERR_KEY": "FLUXERR_AUTO",
        # no PHOTFLAG field: every field is tied to its PHOT_C with MAGZERO_REFERR; keep that loose
        "MAGZERO_OUT": "0.0", "MAGZERO_REFERR": "10.0",
        "SN_THRESHOLDS": "10.0,100.0",
        "CHECKPLOT_TYPE": "NONE", "CHECKPLOT_DEV": "NULL", "WRITE_XML": "N",
        "VERBOSE_TYPE": "NORMAL", "NTHREADS": "1", "HEADER_SUFFIX": ".head",
    }
    cfg.update(overrides or {})
    return cfg


def run_scamp(binary: str, work: Path, catalogs: list[Path], cfg: dict[str, str]) -> tuple[float, float, str]:
    """Run SCAMP in ``work``; returns (wall s, CPU s of the child, its output)."""
    conf = work / "scamp.conf"
    conf.write_text("".join(f"{k:<22} {v}\n" for k, v in cfg.items()))
    for cat in catalogs:
        cat.with_suffix(".head").unlink(missing_ok=True)
    cmd = [binary, *[c.name for c in catalogs], "-c", conf.name]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out = res.stdout + res.stderr
    (work / "scamp.log").write_text(out)
    if res.returncode != 0 or "*Error*" in out:
        raise SystemExit(f"error: SCAMP failed (exit {res.returncode}); log in {work / 'scamp.log'}:\n{out[-3000:]}")
    return wall, cpu, out


def read_heads(path: Path) -> list:
    """The header blocks of a SCAMP .head file (one per extension)."""
    from astropy.io import fits

    blocks, cur = [], []
    for line in path.read_text().splitlines():
        cur.append(line)
        if line.startswith("END") and line.strip() == "END":
            blocks.append(fits.Header.fromstring("\n".join(cur), sep="\n"))
            cur = []
    return blocks


def head_wcs(head, image_header):
    """An astropy WCS from a SCAMP header (TAN + PV keywords are TPV)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = int(image_header["NAXIS1"])
    h["NAXIS2"] = int(image_header["NAXIS2"])
    for card in head.cards:
        if card.keyword in ("", "COMMENT", "HISTORY", "END"):
            continue
        h[card.keyword] = card.value
    if any(k.startswith("PV1_") for k in h):
        h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(h)


# ---------------------------------------------------------------- our relcal, timed
class _ScratchRepo:
    """Reads from the repository, writes the stage's outputs to a scratch directory."""

    def __init__(self, repo, scratch: Path):
        from lsst_prod.repo import Repository

        self._src = repo
        self._scratch = Repository(scratch)

    def path_of(self, ref):
        return self._src.path_of(ref)

    def stage_file(self, dataset_type, data_id, run, writer):
        return self._scratch.stage_file(dataset_type, data_id, run, writer)


KERNELS = ("select_good_sources", "match_sources", "make_photometric_part", "reference_magnitudes", "fit_photometry",
           "make_astrometric_stars", "make_astrometric_part", "fit_astrometry", "apply_astrometric_correction")
IO_FUNCS = ("read_parquet", "write_parquet", "table_from_columns")


def time_our_relcal(repo, run: str, params: dict, scratch: Path, repeats: int) -> dict:
    """The relcal stage's run_quantum in this process, one rank (SerialComm); kernels timed via wrappers."""
    from lsst_prod.config.stages import RelcalConfig
    from lsst_prod.repo import DataId
    from lsst_prod.stages import relcal as mod
    from lsst_prod.stages.base import QuantumContext

    instrument = str(repo.query("source", [run])[0].data_id["instrument"])
    inputs = {}
    for t in ("source", "ccdVisit"):
        for ref in repo.query(t, [run]):
            inputs[(t, ref.data_id)] = ref
    inputs[("refcat", DataId())] = repo.find("refcat", {}, ["refcats"])
    config = RelcalConfig.model_validate(params) if params else RelcalConfig()
    fields = {f.name for f in dataclasses.fields(QuantumContext)}
    spent: dict[str, float] = {}
    originals = {name: getattr(mod, name) for name in KERNELS + IO_FUNCS if hasattr(mod, name)}

    def wrap(name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return timed

    best = None
    try:
        for name, fn in originals.items():
            setattr(mod, name, wrap(name, fn))
        for _ in range(repeats):
            spent.clear()
            kw = dict(repo=_ScratchRepo(repo, scratch), run="bench-relcal", stage="relcal",
                      data_id=DataId(instrument=instrument), config=config, inputs=inputs, release_id=1, comm=None)
            ctx = QuantumContext(**{k: v for k, v in kw.items() if k in fields})
            t0, c0 = time.perf_counter(), time.process_time()
            mod.RelcalStage().run_quantum(ctx)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best_cpu = cpu if best is None else min(best["best_cpu_s"], cpu)
            if best is None or wall < best["wall_s"]:
                kern = {k: v for k, v in spent.items() if k in KERNELS}
                best = {"wall_s": wall, "cpu_s": cpu, "kernels_s": sum(kern.values()),
                        "io_s": sum(v for k, v in spent.items() if k in IO_FUNCS), "per_kernel_s": kern,
                        "summary": dict(ctx.summary)}
            best["best_cpu_s"] = best_cpu
    finally:
        for name, fn in originals.items():
            setattr(mod, name, fn)
    # the in-process solution vs the run's (2 ranks): the same to rounding
    from lsst_prod.repo.formats import read_parquet

    mine = _columns(read_parquet(next(scratch.rglob("relcal_solution*.parquet"))))
    theirs = _columns(read_parquet(repo.path_of(repo.query("relcal_solution", [run])[0])))
    best["max_zp_diff_vs_run_mag"] = float(np.max(np.abs(mine["zeroPoint"] - theirs["zeroPoint"])))
    return best


# --------------------------------------------------------------------- scoring
def bright_stars(ccd: Ccd) -> dict[str, np.ndarray]:
    """Source rows matched (< 1 px) to isolated, unsaturated truth stars away from the edges."""
    from scipy.spatial import cKDTree

    t, s = ccd.truth, ccd.src
    nx, ny = int(ccd.image_header["NAXIS1"]), int(ccd.image_header["NAXIS2"])
    fwhm = np.asarray(t["psf_fwhm_pix"], float)
    ok = (t["kind"] == "star") & ~np.asarray(t["is_saturated"], bool)
    ok &= (np.asarray(t["nn_dist_pix"]) > ISOLATION_FWHM * fwhm) | (np.asarray(t["nn_flux_ratio"]) < 0.01)
    ok &= (t["x"] > EDGE_PIX) & (t["x"] < nx - 1 - EDGE_PIX) & (t["y"] > EDGE_PIX) & (t["y"] < ny - 1 - EDGE_PIX)
    ti = np.flatnonzero(ok)
    leaf = (np.asarray(s["deblend_nChild"]) == 0) & np.isfinite(s["psfFlux"]) & (s["psfFluxErr"] > 0)
    si = np.flatnonzero(leaf)
    if not len(ti) or not len(si):
        return {"src": np.zeros(0, int), "truth": np.zeros(0, int), "snr": np.zeros(0)}
    d, j = cKDTree(np.column_stack([s["x"][si], s["y"][si]])).query(np.column_stack([t["x"][ti], t["y"][ti]]))
    m = d < MATCH_RADIUS_PIX
    src_rows, truth_rows = si[j[m]], ti[m]
    _, first = np.unique(src_rows, return_index=True)  # one truth star per source row
    src_rows, truth_rows = src_rows[first], truth_rows[first]
    snr = s["psfFlux"][src_rows] / s["psfFluxErr"][src_rows]
    return {"src": src_rows, "truth": truth_rows, "snr": snr}


def angular_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    r1, d1, r2, d2 = (np.deg2rad(np.asarray(a, float)) for a in (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(s))) * MAS_PER_DEG


def _rms(v) -> float:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.mean(v ** 2))) if len(v) else float("nan")


def demeaned_rms_mmag(dzp: np.ndarray, bands: np.ndarray) -> dict:
    """rms (mmag) over ccdvisits after removing each band's mean; also the means."""
    out, res = {}, np.full(len(dzp), np.nan)
    for b in sorted(set(bands)):
        m = (bands == b) & np.isfinite(dzp)
        out[f"mean_{b}_mmag"] = float(1000 * np.mean(dzp[m]))
        res[m] = dzp[m] - np.mean(dzp[m])
    out["rms_mmag"] = 1000 * _rms(res)
    out["n_ccdvisits"] = int(np.isfinite(res).sum())
    return out


def score(ccds: list[Ccd], tools: dict[str, dict]) -> dict:
    """Photometric and astrometric scores of each tool.

    ``tools[name]`` maps ccdvisit index k -> {"flux": calibrated psfFlux (nJy) per Source row,
    "ra", "dec": calibrated positions per Source row (deg), "zp": zero point (mag of 1 e-)}.
    """
    stars = [bright_stars(c) for c in ccds]
    bands = np.array([c.band for c in ccds])
    zp_true = np.array([c.zp_true for c in ccds])
    out = {"n_bright_stars_phot": int(sum((st["snr"] > SNR_PHOT).sum() for st in stars)),
           "n_bright_stars_astrom": {f"snr>{int(s)}": int(sum((st["snr"] > s).sum() for st in stars))
                                     for s in SNR_ASTROM}}
    for name, per in tools.items():
        dzp = np.full(len(ccds), np.nan)
        nstar = np.zeros(len(ccds), int)
        dist = {s: [] for s in SNR_ASTROM}
        for c, st in zip(ccds, stars):
            p = per[c.k]
            m = st["snr"] > SNR_PHOT
            rows, trows = st["src"][m], st["truth"][m]
            if len(rows):
                dzp[c.k] = np.median(2.5 * np.log10(p["flux"][rows] / c.truth["flux_nJy"][trows]))
                nstar[c.k] = len(rows)
            for s in SNR_ASTROM:
                m = st["snr"] > s
                rows, trows = st["src"][m], st["truth"][m]
                dist[s].append(angular_mas(p["ra"][rows], p["dec"][rows], c.truth["ra"][trows], c.truth["dec"][trows]))
        zp = np.array([per[c.k]["zp"] for c in ccds])
        entry = {"phot_stars": demeaned_rms_mmag(dzp, bands) | {"median_stars_per_ccdvisit": float(np.median(nstar))},
                 "zero_point": demeaned_rms_mmag(zp - zp_true, bands),
                 "per_ccdvisit_dzp_mmag": [float(1000 * v) for v in dzp]}
        for s in SNR_ASTROM:
            d = np.concatenate(dist[s]) if dist[s] else np.zeros(0)
            entry[f"astrom_snr>{int(s)}"] = {"rms_mas": _rms(d), "median_mas": float(np.median(d)) if len(d) else
                                             float("nan"), "n": int(len(d))}
        out[name] = entry
    return out


# ------------------------------------------------------------------------ machine
def machine_info(scamp: str) -> dict:
    import astropy
    import scipy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu, "python": platform.python_version(), "numpy": np.__version__,
        "scipy": scipy.__version__, "astropy": astropy.__version__, "scamp": scamp_version(scamp),
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "loadavg_start": list(os.getloadavg()), "lsst_prod_code": _code_version(),
    }


def _code_version() -> str:
    """Commit of the tree, and whether the relcal files differ from it (read-only git)."""
    files = ["lsst_prod/stages/relcal.py", "lsst_prod/algorithms/relcal.py", "lsst_prod/algorithms/relcal_match.py",
             "lsst_prod/algorithms/relcal_normals.py", "lsst_prod/algorithms/relcal_photometry.py",
             "lsst_prod/algorithms/relcal_astrometry.py"]
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


# ------------------------------------------------------------- one SCAMP solution
def true_variable_rows(ccd: Ccd, rows: np.ndarray, variable_ids: set) -> np.ndarray:
    """The subset of ``rows`` whose truth counterpart (< 1 px) is a variable star (diagnostic only)."""
    from scipy.spatial import cKDTree

    t = ccd.truth
    if not len(rows) or not len(t["x"]):
        return np.zeros(0, int)
    d, j = cKDTree(np.column_stack([t["x"], t["y"]])).query(np.column_stack([ccd.src["x"][rows], ccd.src["y"][rows]]))
    var = np.array([int(tid) in variable_ids for tid in np.asarray(t["truth_id"])[j]], bool) & (d < MATCH_RADIUS_PIX)
    return rows[var]


def scamp_solution(binary: str, work: Path, ccds: list[Ccd], rows: list[np.ndarray], layout: str, args,
                   overrides: dict[str, str], repeats: int) -> tuple[dict, dict]:
    """Write the catalogues (one file per exposure or per ccdvisit), run SCAMP ``repeats`` times, read .head.

    Returns (per-ccdvisit calibrated fluxes/positions/zero point, run record).
    """
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    groups: dict[str, list[Ccd]] = {}
    for c in ccds:
        groups.setdefault(f"v{c.visit}" if layout == "exposure" else f"v{c.visit}_d{c.detector}", []).append(c)
    catalogs = []
    for name, members in groups.items():
        members.sort(key=lambda c: c.detector)
        blocks = []
        for c in members:
            # PHOT_C: SCAMP's zero point is per exposure (shared by its extensions); the chips'
            # own throughputs (QE) come from the single-frame zero points, per second
            phot_c = c.zp_sf - 2.5 * np.log10(float(c.primary_header["EXPTIME"])) \
                if args.phot_c == "single-frame" else None
            blocks.append((image_header(c, args.start_wcs, phot_c),
                           ldac_objects(c, rows[c.k], 10 ** (-0.4 * (c.zp_sf - AB_NJY)))))
        path = work / f"{name}.ldac"
        write_ldac(path, blocks)
        catalogs.append((path, members))
    t_write = time.perf_counter() - t0
    cfg = scamp_config(layout, work.parent / "refcat.ldac", overrides)
    paths = [p for p, _ in catalogs]
    walls, cpus = [], []
    out = ""
    for _ in range(repeats):
        wall, cpu, out = run_scamp(binary, work, paths, cfg)
        walls.append(wall)
        cpus.append(cpu)
    per: dict[int, dict] = {}
    for path, members in catalogs:
        heads = read_heads(path.with_suffix(".head"))
        if len(heads) != len(members):
            raise SystemExit(f"error: {path.with_suffix('.head')} has {len(heads)} headers for {len(members)} "
                             "extensions")
        for c, head in zip(members, heads):
            w = head_wcs(head, c.image_header)
            ra, dec = w.all_pix2world(c.src["x"] + 1.0, c.src["y"] + 1.0, 1)
            fs, mz = float(head.get("FLXSCALE", 1.0)), float(head.get("MAGZEROP", 0.0))
            # calibrated mag = -2.5 log10(flux_e * FLXSCALE) + MAGZEROP
            flux_e = c.src["psfFlux"] / 10 ** (-0.4 * (c.zp_sf - AB_NJY))
            per[c.k] = {"flux": flux_e * fs * 10 ** (-0.4 * (mz - AB_NJY)), "ra": ra, "dec": dec,
                        "zp": mz - 2.5 * np.log10(fs)}
    stats: dict[str, list[str]] = {}
    section = ""
    for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).splitlines():
        if line.startswith("----- "):
            section = line[6:].strip(" :")
        elif line.strip().startswith("Group ") and "stats" in section:
            stats.setdefault(section, []).append(line.strip())
    record = {"layout": layout, "n_catalogs": len(paths), "n_sources": int(sum(len(rows[c.k]) for c in ccds)),
              "wall_s": walls, "best_wall_s": min(walls), "cpu_s": cpus, "best_cpu_s": min(cpus),
              "catalog_write_s": t_write, "config": cfg,
              "log_group_stats": stats}
    return per, record


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Details: bench/README.md")
    ap.add_argument("--repo", type=Path, help="data repository (made there if it holds no run with relcal outputs; "
                    "default: a temporary directory, removed afterwards unless --keep)")
    ap.add_argument("--run", help="processing run (default: the newest one with a relcal_solution)")
    ap.add_argument("--layout", choices=("exposure", "ccd", "both"), default="exposure",
                    help="SCAMP catalogues: one file per exposure with one extension per detector (default), one "
                    "file per ccdvisit, or both (two SCAMP runs)")
    ap.add_argument("--start-wcs", choices=("tpv", "tan"), default="tpv",
                    help="starting WCS: the single-frame TAN-SIP as an exact TPV (default) or its TAN part only")
    ap.add_argument("--phot-c", choices=("single-frame", "none"), default="single-frame",
                    help="PHOT_C header keyword: the single-frame zero point of each chip (default) or none")
    ap.add_argument("--no-diagnostic", action="store_true",
                    help="skip the extra SCAMP run without the (truth-flagged) variable stars")
    ap.add_argument("--repeats", type=int, default=3, help="timing repetitions, best kept (default 3)")
    ap.add_argument("--scamp", help="SCAMP binary (default: `scamp` on PATH)")
    ap.add_argument("--scamp-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SCAMP configuration entry, e.g. STABILITY_TYPE=EXPOSURE (repeatable)")
    ap.add_argument("--no-ours", action="store_true", help="do not re-run our relcal stage in this process")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (catalogues, config, .head, log)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    overrides = {}
    for item in args.scamp_set:
        k, sep_, v = item.partition("=")
        if not sep_ or not k.strip():
            ap.error(f"--scamp-set expects KEY=VALUE, got {item!r}")
        overrides[k.strip().upper()] = v.strip()

    scamp = find_scamp(args.scamp)
    if scamp is None:
        log("error: SCAMP is not installed (no `scamp` on PATH).\nInstall it, e.g. on Debian/Ubuntu:\n"
            "    apt-get update && apt-get install -y --no-install-recommends scamp\nor pass --scamp /path/to/binary.")
        return 2

    from lsst_prod.repo import Repository
    from lsst_prod.repo.formats import read_parquet

    started = _dt.datetime.now(_dt.timezone.utc)
    made_tmp_repo = args.repo is None
    root = (args.repo or Path(tempfile.mkdtemp(prefix="bench_relcal_repo_"))).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_relcal_scamp_"))
    try:
        ensure_repo(root)
        repo = Repository.open(root)
        run = relcal_run(repo, args.run)
        if run is None:
            asked = f" (asked: {args.run})" if args.run else ""
            log(f"error: no processing run with relcal outputs in {root}{asked}")
            return 2
        attempt = relcal_attempt(repo, run) or {}
        params = attempt.get("params") or {}
        info = machine_info(scamp)
        log(f"repo {root}, run {run}; {info['scamp']}; work directory {work}")
        t0 = time.perf_counter()
        ccds, refcat, _ = load_data(repo, run)
        log(f"  read {len(ccds)} ccdvisits in {time.perf_counter() - t0:.1f} s")

        # ------------------------------------------- SCAMP: inputs, runs, solutions
        rows = calibration_rows(ccds, params)
        n_rows = int(sum(len(r) for r in rows))
        mean_mjd = float(np.mean([c.mjd for c in ccds]))
        ref_band = "r" if "r_flux" in refcat else sorted(k[:-5] for k in refcat if k.endswith("_flux"))[0]
        refinfo = write_refcat(work / "refcat.ldac", refcat, mean_mjd, ref_band)
        log(f"  {n_rows} calibration sources in {len(ccds)} ccdvisits; {refinfo['n']} reference stars at the mean "
            f"epoch MJD {mean_mjd:.1f}")
        tools: dict[str, dict] = {
            "single-frame": {c.k: {"flux": c.src["psfFlux"], "ra": c.src["ra"], "dec": c.src["dec"], "zp": c.zp_sf}
                             for c in ccds},
            "lsst_prod relcal": {c.k: {"flux": c.cal["psfFlux"], "ra": c.cal["ra"], "dec": c.cal["dec"],
                                       "zp": c.zp_relcal} for c in ccds},
        }
        scamp_runs: dict[str, dict] = {}
        layouts = ["exposure", "ccd"] if args.layout == "both" else [args.layout]
        for layout in layouts:
            name = "SCAMP" if layout == "exposure" else "SCAMP per-ccd"
            tools[name], scamp_runs[name] = scamp_solution(scamp, work / layout, ccds, rows, layout, args, overrides,
                                                           args.repeats)
            log(f"  {name}: {scamp_runs[name]['n_catalogs']} catalogues (written in "
                f"{scamp_runs[name]['catalog_write_s']:.2f} s), best of {args.repeats}: "
                f"{scamp_runs[name]['best_wall_s']:.3f} s")
        if not args.no_diagnostic:
            tobj = repo.find("truth_objects", {}, ["truth"])
            t = _columns(read_parquet(repo.path_of(tobj), ["truth_id", "is_variable"])) if tobj else None
            if t is not None:
                var_ids = {int(i) for i in t["truth_id"][np.asarray(t["is_variable"], bool)]}
                drop = [true_variable_rows(c, rows[c.k], var_ids) for c in ccds]
                rows_nv = [np.setdiff1d(rows[c.k], drop[c.k]) for c in ccds]
                name = "SCAMP no-variables"
                tools[name], scamp_runs[name] = scamp_solution(scamp, work / "novar", ccds, rows_nv, layouts[0], args,
                                                               overrides, 1)
                scamp_runs[name]["n_variable_sources_removed"] = int(sum(len(d) for d in drop))
                log(f"  {name}: {scamp_runs[name]['n_variable_sources_removed']} sources of variable stars removed "
                    "(diagnostic; solution only, not timed)")

        # --------------------------------------------------------- our relcal timing
        ours = {"run_quantum": {k: attempt.get(k) for k in ("wall_s", "cpu_s", "peak_rss_mib", "executor")},
                "run_summary": attempt.get("summary"), "params": params}
        if not args.no_ours:
            ours["in_process"] = time_our_relcal(repo, run, params, work / "ours", args.repeats)
            log(f"  lsst_prod relcal in this process (1 rank), best of {args.repeats}: "
                f"{ours['in_process']['wall_s']:.3f} s (kernels {ours['in_process']['kernels_s']:.3f} s)")

        scores = score(ccds, tools)
        result = {
            "benchmark": "relcal_vs_scamp", "date": started.isoformat(timespec="seconds"), "repo": str(root),
            "run": run, "n_ccdvisits": len(ccds), "n_visits": len({c.visit for c in ccds}),
            "bands": sorted({c.band for c in ccds}), "n_calibration_sources": n_rows, "refcat": refinfo,
            "start_wcs": args.start_wcs, "phot_c": args.phot_c, "scamp": scamp_runs, "ours": ours,
            "scores": scores, "machine": info,
        }
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        if args.json:
            print(json.dumps(result, indent=2, default=float))
        else:
            print(format_table(result))
        if args.keep:
            log(f"kept the work directory {work}" + (f" and the repository {root}" if made_tmp_repo else ""))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if made_tmp_repo:
                shutil.rmtree(root, ignore_errors=True)


def _ratio(a, b) -> float:
    try:
        return float(a) / float(b) if a is not None and b else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def format_table(r: dict) -> str:
    s = r["scores"]
    names = [n for n in s if isinstance(s[n], dict) and "phot_stars" in s[n]]
    w, lw = 19, 42
    ref_col = "lsst_prod relcal"
    main_scamp = next((n for n in ("SCAMP", "SCAMP per-ccd") if n in names), None)
    lines = [f"Relative calibration of {r['n_ccdvisits']} ccdvisits ({r['n_visits']} visits, bands "
             f"{','.join(r['bands'])}), run {r['run']}: {r['n_calibration_sources']} calibration sources, "
             f"{r['refcat']['n']} reference stars", ""]
    lines.append(f"{'':<{lw}}" + "".join(f"{n:>{w}}" for n in names) +
                 (f"{'SCAMP/ours':>{w - 4}}" if main_scamp else ""))

    def row(label, values, fmt="{:.2f}", ratio=True):
        cells = "".join(f"{(fmt.format(v) if v is not None and np.isfinite(v) else '-'):>{w}}" for v in values)
        rat = ""
        if ratio and main_scamp:
            rat = f"{_ratio(values[names.index(main_scamp)], values[names.index(ref_col)]):>{w - 4}.2f}"
        lines.append(f"{label:<{lw}}" + cells + rat)

    lines.append("photometry (per-band mean removed)")
    row("  zp error from bright stars, rms mmag", [s[n]["phot_stars"]["rms_mmag"] for n in names])
    row("  zero point - true zero point, rms mmag", [s[n]["zero_point"]["rms_mmag"] for n in names])
    for b in r["bands"]:
        row(f"  mean offset from stars, {b}, mmag", [s[n]["phot_stars"][f"mean_{b}_mmag"] for n in names], "{:.1f}",
            ratio=False)
    lines.append("astrometry (distance to the true position)")
    for snr in SNR_ASTROM:
        key = f"astrom_snr>{int(snr)}"
        row(f"  S/N>{int(snr)} ({s[names[0]][key]['n']} detections): rms mas", [s[n][key]["rms_mas"] for n in names])
        row("    median mas", [s[n][key]["median_mas"] for n in names])
    ours = r["ours"]
    t_run = ours["run_quantum"].get("wall_s")
    t_in = ours.get("in_process", {}).get("wall_s")
    t_k = ours.get("in_process", {}).get("kernels_s")
    lines.append("wall time, s")
    times = [None, t_in] + [r["scamp"][n]["best_wall_s"] if n in r["scamp"] and n != "SCAMP no-variables" else None
                            for n in names[2:]]
    row("  solve (ours: stage in-process, 1 rank)", times, "{:.3f}")
    cpus = [None, ours.get("in_process", {}).get("best_cpu_s")] + [
        r["scamp"][n]["best_cpu_s"] if n in r["scamp"] and n != "SCAMP no-variables" else None for n in names[2:]]
    row("  CPU s of the same (best)", cpus, "{:.3f}")
    if t_k:
        row("  ours: kernels only (no Parquet I/O)", [None, t_k] + [times[i] for i in range(2, len(names))], "{:.3f}")
    lines.append("")
    if ours.get("in_process"):
        lines.append(f"ours in this process reproduces the run's zero points to "
                     f"{ours['in_process']['max_zp_diff_vs_run_mag']:.1e} mag; fit_astrometry takes "
                     f"{ours['in_process']['per_kernel_s'].get('fit_astrometry', float('nan')):.3f} s")
    if t_run:
        lines.append(f"ours in the pipeline run: relcal quantum {t_run:.2f} s wall (2 MPI ranks launched with mpiexec, "
                     "Python start-up and Parquet I/O included)")
    for n, v in r["scamp"].items():
        if n == "SCAMP no-variables":
            lines.append(f"{n}: diagnostic, SCAMP without the {v['n_variable_sources_removed']} sources of truly "
                         "variable stars (the truth flags them; not available to a real user)")
            continue
        threads = v["config"].get("NTHREADS", "1")
        lines.append(f"{n}: {v['best_wall_s']:.3f} s for {v['n_catalogs']} catalogues ({v['layout']} layout, "
                     f"NTHREADS {threads}, best of {len(v['wall_s'])}; writing the FITS_LDAC files, not timed: "
                     f"{v['catalog_write_s']:.2f} s)")
    lines.append(f"starting WCS {r['start_wcs']}, PHOT_C {r['phot_c']}; reference catalogue at MJD "
                 f"{r['refcat']['epoch_mjd']:.1f} (median position error {r['refcat']['median_pos_err_mas']:.1f} mas)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
