#!/usr/bin/env python
"""Warp + coadd: lsst_prod vs SWarp on the same simulated calexps.

Inputs (simulated here, no repository needed): ``--visits`` (8) visits of one
1024x1024 detector at 0.2"/px, each with a TAN-SIP WCS (rotation 0-180 deg,
dithers of +-150 px, a radial cubic distortion of 3 px at the corners),
background-subtracted images in electrons, variance planes (sky + read noise +
Poisson) and a photometric scale nJy/electron that differs per visit.  Stars
are truncated Moffats (beta 3.5, truncated at 4 FWHM, so an aperture of
4 FWHM_max + 2 px holds all their flux) on a jittered grid (110 px apart: no
blends), 2e4 - 2e6 nJy.  Seeing 0.6"-0.9" except one visit at 2x the median.
Visit 1 holds a transient (5e4 nJy), visit 2 a satellite trail.  The output
grid is a patch of the default rings sky map (2200x2200 outer box, TAN), the
field centred on it.

Both tools resample with Lanczos-3, scale fluxes by nJy/electron and by the
local pixel-area (Jacobian) ratio, and run single-threaded:

* ours: ``warp_exposure`` (per visit) + ``stack_warps`` (weighted mean, with
  and without the PSF-matched outlier rejection), timed in memory and again
  including the FITS reads of the calexps and the write of the coadd;
* SWarp 2.41: the same calexps as FITS (SIP converted to SCAMP's TPV, checked
  against the SIP to 1e-7 px), FLXSCALE = nJy/electron, FSCALASTRO_TYPE
  VARIABLE, the patch grid from a ``.head`` file, MAP_VARIANCE weights (our
  variance planes are exact: RESCALE_WEIGHTS N) with WEIGHT_THRESH 1e30 (with
  the default, empty, threshold SWarp 2.41.5 gave every input but the first
  zero weight) and GAIN 1 (the calexps are in electrons; with "0 = infinite" CLIPPED never
  clips, astromatic/swarp#29).  Three runs: COMBINE_TYPE WEIGHTED and CLIPPED
  (CLIP_SIGMA 4, CLIP_AMPFRAC 0.3) with constant per-visit background variance
  maps (the same weights as ours), and WEIGHTED with the variance planes
  themselves (per-pixel weights that include the stars' Poisson noise).  The
  whole command is timed.

Scores: flux of the isolated stars in apertures of 4 FWHM_max + 2 px (single
warps: stars with S/N > 300; coadds: the same stars for every coadd, S/N > 200
in our mean coadd, >= 3 visits over the whole aperture): median, robust scatter
and 95th percentile of |measured / true - 1|; residuals of the transient and of
the trail (where >= 3 visits overlap) in units of the coadd noise.  Usage::

    python bench/bench_warp_coadd.py [--visits 8] [--seed 1] [--keep] [--json]

Recorded figures: docs/algorithms-coadd.md.  Exit codes: 0 success, 2 SWarp
missing (``apt-get install -y --no-install-recommends swarp``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RA0, DEC0 = 150.0, 2.0
DET = 1024
SCALE = 0.2
CORNER_R = np.hypot((DET - 1) / 2, (DET - 1) / 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ WCS helpers
def sip_header(ra: float, dec: float, rot: float, distortion_pix: float) -> dict:
    from lsst_prod.camera import nominal_cd_matrix

    cd = nominal_cd_matrix(SCALE, rot)
    k = distortion_pix / CORNER_R**3
    return {"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "CUNIT1": "deg", "CUNIT2": "deg",
            "CRVAL1": ra, "CRVAL2": dec, "CRPIX1": (DET - 1) / 2 + 1, "CRPIX2": (DET - 1) / 2 + 1,
            "CD1_1": cd[0, 0], "CD1_2": cd[0, 1], "CD2_1": cd[1, 0], "CD2_2": cd[1, 1], "RADESYS": "ICRS",
            "EQUINOX": 2000.0, "A_ORDER": 3, "B_ORDER": 3, "A_3_0": k, "A_1_2": k, "B_2_1": k, "B_0_3": k}


def make_wcs(header: dict):
    from astropy.io import fits
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(fits.Header(header))


# TPV monomials x^i y^j of PV1_k (PV2_k: x and y swapped); k = 3, 11 are the radial terms (unused)
_TPV = {0: (0, 0), 1: (1, 0), 2: (0, 1), 4: (2, 0), 5: (1, 1), 6: (0, 2), 7: (3, 0), 8: (2, 1), 9: (1, 2), 10: (0, 3)}


def sip_to_tpv(header: dict) -> dict:
    """The SCAMP TPV header equal to a cubic TAN-SIP one (least squares on a grid; exact for cubic SIP)."""
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    u, v = np.meshgrid(np.linspace(-600, 600, 41), np.linspace(-600, 600, 41))
    u, v = u.ravel(), v.ravel()
    fu = u + sum(header.get(f"A_{p}_{q}", 0.0) * u**p * v**q for p in range(4) for q in range(4) if p + q > 1)
    fv = v + sum(header.get(f"B_{p}_{q}", 0.0) * u**p * v**q for p in range(4) for q in range(4) if p + q > 1)
    xi, eta = cd @ np.vstack([fu, fv])  # intermediate world coordinates (deg), with distortion
    x, y = cd @ np.vstack([u, v])  # TPV's linear part
    out = {k: val for k, val in header.items() if k[:2] not in ("A_", "B_") and not k.endswith("ORDER")}
    out["CTYPE1"], out["CTYPE2"] = "RA---TPV", "DEC--TPV"
    for axis, (target, a, b) in ((1, (xi, x, y)), (2, (eta, y, x))):
        design = np.column_stack([a**i * b**j for i, j in _TPV.values()])
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        for k, c in zip(_TPV, coef):
            out[f"PV{axis}_{k}"] = float(c)
    return out


# ------------------------------------------------------------------ simulation
def simulate(n_visits: int, seed: int):
    import galsim

    from lsst_prod.config.skymap import SkyMapConfig
    from lsst_prod.skymap import SkyMap

    rng = np.random.default_rng(seed)
    sky = SkyMap(SkyMapConfig())
    tract = int(sky.tract_for(RA0, DEC0))
    tinfo = sky.tract_info(tract)
    twcs = tinfo.wcs()
    patch = sky.patch_info(tract, int(sky.patch_for(tract, np.array([RA0]), np.array([DEC0]))[0]))
    box = patch.outer
    cx, cy = 0.5 * (patch.inner[0] + patch.inner[2]) - 0.5, 0.5 * (patch.inner[1] + patch.inner[3]) - 0.5
    # stars on a jittered grid in tract pixels around the field centre
    g = np.arange(-660.0, 661.0, 110.0)
    gx, gy = np.meshgrid(cx + g, cy + g)
    sx = gx.ravel() + rng.uniform(-15, 15, gx.size)
    sy = gy.ravel() + rng.uniform(-15, 15, gx.size)
    flux = 10 ** rng.uniform(np.log10(2e4), np.log10(2e6), sx.size)  # nJy
    ra, dec = twcs.wcs_pix2world(sx, sy, 0)
    fwhm = rng.uniform(3.0, 4.5, n_visits)
    fwhm[-1] = 2.0 * np.median(fwhm[:-1])  # one visit with 2x worse seeing
    visits = []
    for i in range(n_visits):
        d = rng.uniform(-150, 150, 2)
        vra, vdec = twcs.wcs_pix2world(cx + d[0], cy + d[1], 0)
        hdr = sip_header(float(vra), float(vdec), float(rng.uniform(0, 180)), 3.0)
        wcs = make_wcs(hdr)
        njy = 0.5 * rng.uniform(0.85, 1.15)
        px, py = wcs.all_world2pix(ra, dec, 0)
        img = galsim.ImageF(DET, DET, scale=1.0)
        prof = galsim.Moffat(beta=3.5, fwhm=fwhm[i], trunc=4.0 * fwhm[i])
        for x, y, f in zip(px, py, flux):
            if -70 < x < DET + 70 and -70 < y < DET + 70:
                ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
                st = galsim.ImageF(81, 81, scale=1.0)
                st.setCenter(ix + 1, iy + 1)
                prof.withFlux(float(f / njy)).drawImage(image=st, offset=(x - ix, y - iy))
                b = st.bounds & img.bounds
                if b.isDefined():
                    img[b] += st[b]
        model = img.array.astype(np.float64)
        extra = np.zeros_like(model)
        if i == 1:  # transient between grid stars
            tra, tdec = twcs.wcs_pix2world(cx + 55.0, cy + 55.0, 0)
            tx, ty = wcs.all_world2pix(tra, tdec, 0)
            st = galsim.Moffat(beta=3.5, fwhm=fwhm[i], trunc=4 * fwhm[i]).withFlux(5e4 / njy).drawImage(
                nx=81, ny=81, scale=1.0, offset=(tx - round(float(tx)), ty - round(float(ty)))).array
            extra[round(float(ty)) - 40: round(float(ty)) + 41, round(float(tx)) - 40: round(float(tx)) + 41] += st
            transient = (float(tra), float(tdec))
        if i == 2:  # satellite trail across the detector
            yy, xx = np.mgrid[0:DET, 0:DET]
            extra += 300.0 * np.exp(-0.5 * ((yy - 0.3 * xx - 200.0) / 1.5) ** 2)
            satellite = wcs
        var = 800.0 + 25.0 + np.maximum(model + extra, 0.0)
        image = (model + extra + rng.normal(size=model.shape) * np.sqrt(var)).astype(np.float32)
        visits.append({"image": image, "variance": var.astype(np.float32), "header": hdr, "wcs": wcs,
                       "fwhm": float(fwhm[i]), "njy_per_e": njy})
    return {"visits": visits, "tract_wcs": twcs, "box": box, "tract": tract, "patch": patch.patch,
            "stars": (ra, dec, flux), "transient": transient, "satellite_wcs": satellite}


def trail_band(sim, r: float) -> np.ndarray:
    """Flat patch-pixel indices of the satellite trail band (|dy| <= 3 px in visit 2) away from the stars."""
    from lsst_prod.algorithms.resample import exact_mapping, overlap_box

    twcs, box, sw = sim["tract_wcs"], sim["box"], sim["satellite_wcs"]
    sub = overlap_box(sw, (DET, DET), twcs, box)
    yy, xx = np.mgrid[sub[1]:sub[3], sub[0]:sub[2]]
    vx, vy = exact_mapping(sw, twcs, xx.ravel().astype(float), yy.ravel().astype(float))
    band = (np.abs(vy - 0.3 * vx - 200.0) <= 3.0) & (vx > 5) & (vx < DET - 5) & (vy > 5) & (vy < DET - 5)
    bx, by = xx.ravel()[band] - box[0], yy.ravel()[band] - box[1]
    sx, sy = twcs.wcs_world2pix(sim["stars"][0], sim["stars"][1], 0)
    far = np.hypot(bx[:, None] - (sx - box[0])[None], by[:, None] - (sy - box[1])[None]).min(axis=1) > r + 5
    return by[far] * (box[2] - box[0]) + bx[far]


# ------------------------------------------------------------------ scoring
def aperture_fluxes(img, x, y, r):
    out = np.full(len(x), np.nan)
    rr = int(np.ceil(r))
    o = np.arange(-rr, rr + 1)
    disc = (o[:, None] ** 2 + o[None, :] ** 2) <= r * r
    for k, (xi, yi) in enumerate(zip(x, y)):
        ix, iy = int(round(xi)), int(round(yi))
        if iy - rr < 0 or ix - rr < 0 or iy + rr >= img.shape[0] or ix + rr >= img.shape[1]:
            continue
        cut = img[iy - rr: iy + rr + 1, ix - rr: ix + rr + 1]
        if np.all(np.isfinite(cut[disc])):
            out[k] = float(cut[disc].sum())
    return out


def flux_stats(meas, true, use):
    ok = np.isfinite(meas) & use
    if ok.sum() < 3:
        return {"n": int(ok.sum()), "median": float("nan"), "scatter": float("nan"), "p95_abs": float("nan")}
    r = meas[ok] / true[ok] - 1.0
    return {"n": int(ok.sum()), "median": float(np.median(r)),
            "scatter": float(1.4826 * np.median(np.abs(r - np.median(r)))),
            "p95_abs": float(np.percentile(np.abs(r), 95))}


def star_xy(sim):
    x, y = sim["tract_wcs"].wcs_world2pix(sim["stars"][0], sim["stars"][1], 0)
    return x - sim["box"][0], y - sim["box"][1]


def score_coadd(img, var, sim, r):
    """Star-flux statistics on a coadd (patch pixels) and the transient / trail residuals in noise units."""
    twcs, box = sim["tract_wcs"], sim["box"]
    x, y = star_xy(sim)
    stats = flux_stats(aperture_fluxes(img, x, y, r), sim["stars"][2], sim["scored_stars"])
    tx, ty = twcs.wcs_world2pix(*sim["transient"], 0)
    t = aperture_fluxes(img, [tx - box[0]], [ty - box[1]], 2.0 * r / 3)[0]
    tn = np.sqrt(aperture_fluxes(var, [tx - box[0]], [ty - box[1]], 2.0 * r / 3)[0])
    # trail: summed over a 7-px band (in the visit's pixels) away from the stars, in units of its noise
    sel = sim["trail_band"]
    sel = sel[np.isfinite(img.ravel()[sel]) & np.isfinite(var.ravel()[sel])]
    trail = float(img.ravel()[sel].sum() / np.sqrt(var.ravel()[sel].sum())) if sel.size else float("nan")
    return {**stats, "transient_sigma": float(t / tn), "trail_sigma": trail}


# ------------------------------------------------------------------ runners
def run_ours(sim, reps: int):
    from lsst_prod.algorithms.resample import warp_exposure
    from lsst_prod.algorithms.stack import WarpInput, stack_warps

    twcs, box = sim["tract_wcs"], sim["box"]
    best_warp, best_mean, best_clip = np.inf, np.inf, np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        warps = [warp_exposure(v["image"], v["variance"], np.zeros(v["image"].shape, np.uint32), v["wcs"], twcs,
                               box, flux_scale=v["njy_per_e"]) for v in sim["visits"]]
        t1 = time.perf_counter()
        inputs = [WarpInput(w.image, w.variance, w.mask, v["fwhm"]) for w, v in zip(warps, sim["visits"])]
        mean = stack_warps(inputs, clip_nsigma=None)
        t2 = time.perf_counter()
        clip = stack_warps(inputs)
        t3 = time.perf_counter()
        best_warp, best_mean, best_clip = min(best_warp, t1 - t0), min(best_mean, t2 - t1), min(best_clip, t3 - t2)
    return warps, mean, clip, {"warp_s": best_warp, "stack_mean_s": best_mean, "stack_clip_s": best_clip}


def write_inputs(sim, work: Path) -> list[Path]:
    import fitsio

    paths = []
    for i, v in enumerate(sim["visits"]):
        hdr = sip_to_tpv(v["header"])
        hdr["FLXSCALE"] = v["njy_per_e"]
        p = work / f"calexp_{i}.fits"
        fitsio.write(str(p), v["image"], header=[{"name": k, "value": val} for k, val in hdr.items()],
                     clobber=True)
        fitsio.write(str(work / f"calexp_{i}.weight.fits"), v["variance"], clobber=True)
        # background-only variance, constant per visit: the same weights as ours (1 / median variance)
        fitsio.write(str(work / f"calexp_{i}.bkg.fits"),
                     np.full(v["variance"].shape, np.median(v["variance"]), np.float32), clobber=True)
        paths.append(p)
    return paths


def coadd_head(sim) -> str:
    twcs, (x0, y0, x1, y1) = sim["tract_wcs"], sim["box"]
    cards = {"NAXIS": 2, "NAXIS1": x1 - x0, "NAXIS2": y1 - y0, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
             "CUNIT1": "deg", "CUNIT2": "deg", "CRVAL1": float(twcs.wcs.crval[0]),
             "CRVAL2": float(twcs.wcs.crval[1]), "CRPIX1": float(twcs.wcs.crpix[0]) - x0,
             "CRPIX2": float(twcs.wcs.crpix[1]) - y0, "CD1_1": float(twcs.wcs.cd[0, 0]),
             "CD1_2": float(twcs.wcs.cd[0, 1]), "CD2_1": float(twcs.wcs.cd[1, 0]), "CD2_2": float(twcs.wcs.cd[1, 1]),
             "RADESYS": "ICRS", "EQUINOX": 2000.0}
    lines = []
    for k, v in cards.items():
        val = f"'{v}'" if isinstance(v, str) else repr(v)
        lines.append(f"{k:<8}= {val:>20}")
    return "\n".join(lines + ["END"]) + "\n"


def run_swarp(binary: str, paths: list[Path], work: Path, combine: str, sim, weight_suffix: str,
              keep_resampled: bool = False):
    import fitsio

    tag = f"{combine.lower()}{weight_suffix.split('.')[1]}"
    out = work / f"swarp_{tag}.fits"
    (work / f"swarp_{tag}.head").write_text(coadd_head(sim))
    rdir = work / f"resamp_{tag}"
    rdir.mkdir(exist_ok=True)
    cmd = [binary, *map(str, paths), "-IMAGEOUT_NAME", str(out),
           "-WEIGHTOUT_NAME", str(out.with_suffix(".weight.fits")), "-WEIGHT_TYPE", "MAP_VARIANCE",
           "-RESCALE_WEIGHTS", "N", "-WEIGHT_THRESH", "1e30", "-WEIGHT_SUFFIX", weight_suffix, "-COMBINE_TYPE", combine,
           "-RESAMPLING_TYPE", "LANCZOS3", "-OVERSAMPLING", "1", "-FSCALASTRO_TYPE", "VARIABLE",
           "-FSCALE_KEYWORD", "FLXSCALE", "-SUBTRACT_BACK", "N", "-NTHREADS", "1", "-RESAMPLE_DIR", str(rdir),
           "-VMEM_DIR", str(work), "-MEM_MAX", "2048", "-COMBINE_BUFSIZE", "1024", "-WRITE_XML", "N",
           "-VERBOSE_TYPE", "QUIET", "-CELESTIAL_TYPE", "NATIVE", "-PROJECTION_TYPE", "TAN",
           "-DELETE_TMPFILES", "N" if keep_resampled else "Y", "-BLANK_BADPIXELS", "Y", "-GAIN_DEFAULT", "1.0"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"SWarp failed ({res.returncode}): {res.stderr[-2000:]}")
    img = fitsio.read(str(out)).astype(np.float64)
    wt = fitsio.read(str(out.with_suffix(".weight.fits"))).astype(np.float64)
    with np.errstate(divide="ignore"):
        var = np.where(wt > 0, 1.0 / wt, np.nan)
    img = np.where(wt > 0, img, np.nan)
    return img, var, dt, rdir


def score_single_warps(sim, warps, rdir: Path | None, r: float):
    """Per-visit flux conservation: ours (Warp arrays) and SWarp's resampled intermediate images."""
    import fitsio

    ra, dec, flux = sim["stars"]
    twcs, box = sim["tract_wcs"], sim["box"]
    ours, theirs = [], []
    for i, (w, v) in enumerate(zip(warps, sim["visits"])):
        px, py = v["wcs"].all_world2pix(ra, dec, 0)
        inside = (px > r + 6) & (px < DET - r - 6) & (py > r + 6) & (py < DET - r - 6)
        snr = flux / v["njy_per_e"] / np.sqrt(np.pi * r * r * 825.0 + flux / v["njy_per_e"])
        keep = inside & (snr > 300)
        x, y = twcs.wcs_world2pix(ra[keep], dec[keep], 0)
        ours.append(aperture_fluxes(w.image, x - box[0], y - box[1], r) / flux[keep] - 1)
        if rdir is not None:
            f = rdir / f"calexp_{i}.resamp.fits"
            if f.exists():
                data, hdr = fitsio.read(str(f), header=True)
                rw = make_wcs({k: hdr[k] for k in hdr.keys() if k[:5] in ("CTYPE", "CRVAL", "CRPIX", "CD1_1",
                                                                         "CD1_2", "CD2_1", "CD2_2", "CUNIT")})
                rx, ry = rw.wcs_world2pix(ra[keep], dec[keep], 0)
                scale = float(hdr.get("FLXSCALE", 1.0))
                theirs.append(aperture_fluxes(data.astype(np.float64) * scale, rx, ry, r) / flux[keep] - 1)
    def summary(parts):
        r_ = np.concatenate(parts) if parts else np.zeros(0)
        r_ = r_[np.isfinite(r_)]
        if r_.size == 0:
            return {"n": 0, "median": float("nan"), "scatter": float("nan")}
        return {"n": int(r_.size), "median": float(np.median(r_)),
                "scatter": float(1.4826 * np.median(np.abs(r_ - np.median(r_))))}
    return summary(ours), summary(theirs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--visits", type=int, default=8, help="number of visits (default 8; the last has 2x seeing)")
    ap.add_argument("--repeats", type=int, default=2, help="timing repetitions of our kernels (best kept)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--swarp", default=None, help="SWarp binary (default: SWarp or swarp on PATH)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    binary = args.swarp or shutil.which("SWarp") or shutil.which("swarp")
    if binary is None:
        log("error: SWarp is not installed: apt-get install -y --no-install-recommends swarp")
        return 2
    if args.visits < 4:
        ap.error("--visits must be >= 4")
    import fitsio

    log(f"simulating {args.visits} visits ...")
    sim = simulate(args.visits, args.seed)
    # TPV check: the header SWarp gets is the SIP WCS to < 1e-4 px
    v0 = sim["visits"][0]
    tpv = make_wcs(sip_to_tpv(v0["header"]))
    gx, gy = np.meshgrid(np.linspace(0, DET - 1, 9), np.linspace(0, DET - 1, 9))
    bx, by = v0["wcs"].all_world2pix(*tpv.all_pix2world(gx.ravel(), gy.ravel(), 0), 0)
    tpv_err = float(np.max(np.hypot(bx - gx.ravel(), by - gy.ravel())))
    r_ap = 4.0 * max(v["fwhm"] for v in sim["visits"]) + 2.0
    sim["trail_band"] = trail_band(sim, r_ap)
    work = Path(tempfile.mkdtemp(prefix="bench_warp_coadd_"))
    try:
        log("ours ...")
        warps, mean, clip, times = run_ours(sim, args.repeats)
        # score the trail only where >= 3 visits overlap (no clipping is possible with fewer); score the
        # stars with S/N > 200 in our mean coadd whose aperture has data from every visit covering them
        sim["trail_band"] = sim["trail_band"][mean.n_images.ravel()[sim["trail_band"]] >= 3]
        x, y = star_xy(sim)
        noise = np.sqrt(aperture_fluxes(mean.variance.astype(np.float64), x, y, r_ap))
        nmin = aperture_fluxes(np.where(mean.n_images >= 3, 1.0, np.nan), x, y, r_ap)
        sim["scored_stars"] = np.isfinite(nmin) & (sim["stars"][2] / noise > 200)
        paths = write_inputs(sim, work)
        t0 = time.perf_counter()  # ours including the FITS I/O (same files as SWarp's)
        from lsst_prod.algorithms.resample import warp_exposure
        from lsst_prod.algorithms.stack import WarpInput, stack_warps
        ins = []
        for p, v in zip(paths, sim["visits"]):
            im = fitsio.read(str(p)).astype(np.float32)
            va = fitsio.read(str(p).replace(".fits", ".weight.fits")).astype(np.float32)
            w = warp_exposure(im, va, np.zeros(im.shape, np.uint32), v["wcs"], sim["tract_wcs"], sim["box"],
                              flux_scale=v["njy_per_e"])
            ins.append(WarpInput(w.image, w.variance, w.mask, v["fwhm"]))
        c = stack_warps(ins)
        fitsio.write(str(work / "ours.fits"), c.image, clobber=True)
        fitsio.write(str(work / "ours.fits"), c.variance)
        fitsio.write(str(work / "ours.fits"), c.mask)
        t_io = time.perf_counter() - t0
        log("SWarp WEIGHTED, background weights ...")
        sw_img, sw_var, t_sw, rdir = run_swarp(binary, paths, work, "WEIGHTED", sim, ".bkg.fits",
                                               keep_resampled=True)
        log("SWarp CLIPPED, background weights ...")
        sc_img, sc_var, t_sc, _ = run_swarp(binary, paths, work, "CLIPPED", sim, ".bkg.fits")
        log("SWarp WEIGHTED, variance-plane weights ...")
        sv_img, sv_var, t_sv, _ = run_swarp(binary, paths, work, "WEIGHTED", sim, ".weight.fits")
        single_ours, single_swarp = score_single_warps(sim, warps, rdir, r_ap)
        rows = {
            "ours mean": {"time_s": times["warp_s"] + times["stack_mean_s"],
                          **score_coadd(mean.image.astype(np.float64), mean.variance.astype(np.float64), sim, r_ap)},
            "ours PSF-matched clip": {"time_s": times["warp_s"] + times["stack_clip_s"], "time_io_s": t_io,
                                      **score_coadd(clip.image.astype(np.float64),
                                                    clip.variance.astype(np.float64), sim, r_ap)},
            "SWarp WEIGHTED": {"time_s": t_sw, **score_coadd(sw_img, sw_var, sim, r_ap)},
            "SWarp CLIPPED": {"time_s": t_sc, **score_coadd(sc_img, sc_var, sim, r_ap)},
            "SWarp WEIGHTED var-map": {"time_s": t_sv, **score_coadd(sv_img, sv_var, sim, r_ap)},
        }
        same = bool(np.allclose(np.nan_to_num(sw_img), np.nan_to_num(sc_img)))
        figures = {"visits": args.visits, "detector": f"{DET}x{DET}", "patch_box": list(sim["box"]),
                   "aperture_radius_pix": r_ap, "tpv_max_error_pix": tpv_err, "times": times,
                   "single_warp_flux": {"ours": single_ours, "SWarp": single_swarp}, "coadds": rows,
                   "clipped_fraction": clip.clipped_fraction.round(4).tolist(), "swarp_clipped_equals_weighted": same}
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            print(f"{args.visits} visits of {DET}x{DET} (TAN-SIP, 3 px distortion) -> patch box {sim['box']} "
                  f"(2200x2200); aperture r = {r_ap:.1f} px; SIP->TPV error {tpv_err:.1e} px")
            print(f"our kernels: warp {times['warp_s'] / args.visits:.3f} s/detector, stack "
                  f"{times['stack_mean_s']:.2f} s (mean) / {times['stack_clip_s']:.2f} s (PSF-matched clip)")
            print(f"single-visit warps, star flux - 1: ours {single_ours['median']:+.5f} "
                  f"(scatter {single_ours['scatter']:.5f}, n={single_ours['n']}); SWarp "
                  f"{single_swarp['median']:+.5f} (scatter {single_swarp['scatter']:.5f}, n={single_swarp['n']})")
            print(f"{'coadd':<24}{'time s':>8}{'speed vs SWarp':>16}{'flux-1 med':>12}{'scatter':>9}{'p95|err|':>9}"
                  f"{'n':>5}{'transient':>11}{'trail':>8}")
            for name, row in rows.items():
                ref = rows["SWarp CLIPPED" if "clip" in name.lower() else "SWarp WEIGHTED"]["time_s"]
                name = name if len(name) < 24 else name[:23]
                print(f"{name:<24}{row['time_s']:>8.2f}{ref / row['time_s']:>15.1f}x{row['median']:>+12.4f}"
                      f"{row['scatter']:>9.4f}{row['p95_abs']:>9.4f}{row['n']:>5}{row['transient_sigma']:>10.1f}s"
                      f"{row['trail_sigma']:>7.1f}s")
            print(f"ours incl. FITS read/write (PSF-matched clip): {t_io:.2f} s")
            print(f"clipped fraction per visit (ours): {figures['clipped_fraction']}")
            print(f"SWarp CLIPPED identical to WEIGHTED: {same}")
    finally:
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
