"""Single-frame metrics against the simulator's truth, and ``validate_run`` (``lsst-prod validate``).

Each calexp's Source table (leaves: ``deblend_nChild == 0``) is matched one-to-one to the truth of
the objects drawn on that detector (``truth_sources``: true pixel positions at the visit's epoch)
within 2 px (``matching.unique_match``).  Expected S/N uses the true PSF size and sky:
S/N = F / sqrt(F + 4 pi sigma^2 (sky + rn^2)) (electrons; the optimal PSF-fit S/N of a Gaussian).
"Clean" stars are isolated (nearest drawn neighbour > 3 FWHM or < 1 % of the flux), unsaturated,
more than 20 px from the edges and 5 px from bad columns.

Loading (``load_single_frame``) and scoring (``score_single_frame``) are separate: the scorer takes
in-memory tables, so tests perturb them and check that each metric fails.  The definitions,
bounds and the reasoning behind each bound are in docs/validation.md; in short:

* ``astrometry_rms_mas`` (<= 20 mas): rms angular distance to the truth at the visit's epoch of
  clean stars with expected S/N > 100.  The centroid noise of such stars is <= ~5 mas (sigma_x ~
  sqrt(2) sigma_psf / (S/N) ~ 3.4 mas per axis at 0.8" seeing), so 20 mas is the WCS-model error a
  good single-frame fit must beat (foundation issue).
* ``astrometry_reserved_rms_mas`` (<= 20 mas): the same for reference stars held out of the
  astrometric fit (Source column ``calib_astrometry_reserved``); a fit scored only on the stars it
  was fitted to cannot show over-fitting.  Missing (a failure under ``--strict``) if the column is
  absent.  ``astrometry_reserved_over_used`` (reserved rms / in-fit rms) is reported for information.
* ``astrometry_nonref_rms_mas`` (<= 20 mas): the same for stars that are not in the reference
  catalogue (the WCS must hold for every source, not just for its anchors).
* ``photometry_zp_error_mmag`` (<= 10 mmag): rms over ccdvisits of fitted minus true zero point.
  Zero points flagged provisional (a detector with fewer stars than a fit needs: their median, which
  relcal then solves) are counted in ``photometry_zp_n_provisional`` and scored apart
  (``photometry_zp_provisional_error_mmag``, information): their calibration is relcal's, and
  ``relcal_zp_rms_mmag`` scores it.
* ``completeness_snr10_isolated_stars`` (>= 0.98): fraction of clean stars with expected S/N > 10
  that have a Source.  At a 5 sigma detection threshold a S/N-10 star is missed by noise with
  probability ~3e-7; the 2 % allows for cosmic rays and defects on the stars' cores.
* Flux pulls ``(psfFlux - F_expected) / psfFluxErr`` of clean matched stars, in bins of expected
  S/N 10-30, 30-100, 100-300 and > 300.  ``F_expected`` is the true flux brought to the
  ccdvisit's fitted zero point (F_true 10^(0.4 (ZP_true - ZP_fit))): a calibration error is
  the zero-point metric's business, pulls test the fluxes and their errors.  Per bin, after
  iterative 4-sigma clipping about the median:

  - ``_std`` in [0.9, sqrt(1.1^2 + (eps S/N_med)^2)]: 1 within 10 % in the photon-noise regime;
    at high S/N a good pipeline leaves an unmodelled per-star error eps = 3 mmag (0.28 %, the
    SRD's stretch goal for single-visit repeatability, PA1) that ``psfFluxErr`` does not carry.
    S/N_med is the bin's median expected S/N.
  - ``_mean``: |mean| <= 3 max(1, std) / sqrt(n) (3 sigma of the sample mean) + eps S/N_med
    (a flux bias up to eps is allowed).
  - ``_clipped_fraction`` <= the 99.9 % binomial quantile of n trials with a 1 % outlier rate,
    over n (a Gaussian leaves 6e-5 beyond 4 sigma; 1 % is the catastrophic-outlier rate allowed).

  A bin with fewer than 30 stars is ``insufficient`` (reported, neither passes nor fails), except
  the two faintest bins, which must have data (otherwise ``missing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from ..repo import Repository
from ..repo.formats import read_columns, read_image
from . import checks as C
from .matching import separation_mas, unique_match

MATCH_RADIUS_PIX = 2.0
EDGE_PIX = 20
BAD_COLUMN_MARGIN_PIX = 5
ISOLATION_FWHM = 3.0
ASTROMETRY_SNR = 100.0
ASTROMETRY_MAX_MAS = 20.0
ZP_MAX_MMAG = 10.0
#: a sky whose detectors all hold fewer reference stars than this has none to spare for held-out
#: scoring (a 3rd-order SIP fit wants 20 anchors, plus a 20 % reserve): astrometry_reserved_rms_mas is
#: then insufficient.  Counted from the truth (saturated and faint ones too), so never below what the
#: pipeline saw.
RESERVE_MIN_REFS = 25
COMPLETENESS_MIN = 0.98
PULL_MIN_STARS = 30
#: unmodelled per-star fractional flux error allowed at high S/N: 3 mmag (SRD PA1 stretch goal)
PULL_EPS = 10 ** (0.4 * 0.003) - 1
PULL_OUTLIER_RATE = 0.01
PULL_CLIP_SIGMA = 4.0

SOURCE_COLUMNS = ("x", "y", "ra", "dec", "psfFlux", "psfFluxErr", "deblend_nChild", "calib_astrometry_used",
                  "calib_astrometry_reserved")

#: kept for callers that import it: the fixed bounds (bins and derived bounds are in the checks)
BOUNDS = {
    "astrometry_rms_mas": ("<=", ASTROMETRY_MAX_MAS),
    "astrometry_reserved_rms_mas": ("<=", ASTROMETRY_MAX_MAS),
    "astrometry_nonref_rms_mas": ("<=", ASTROMETRY_MAX_MAS),
    "photometry_zp_error_mmag": ("<=", ZP_MAX_MMAG),
    "completeness_snr10_isolated_stars": (">=", COMPLETENESS_MIN),
}


@dataclass
class CcdInputs:
    """What scoring one ccdvisit needs, in memory (tests perturb ``src`` or ``zp_fit``)."""

    visit: int
    detector: int
    truth: dict[str, np.ndarray]  # truth_sources columns + ``is_ref`` (in the reference catalogue)
    src: dict[str, np.ndarray]  # Source columns (SOURCE_COLUMNS that exist)
    zp_fit: float
    zp_true: float
    sky_e: float
    read_noise: float
    fwhm_pix: float
    shape: tuple[int, int]  # (ny, nx)
    bad_columns: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    #: per truth row: reference-catalogue magnitude minus true mean magnitude in the ccdvisit's band
    #: (NaN for stars not in the refcat); None when unknown (then no reference-limited floor)
    ref_dmag: np.ndarray | None = None
    #: the single-frame zero point is a provisional median of too few stars (ccdVisit zeroPointProvisional)
    zp_provisional: bool = False

    def with_src(self, **cols: np.ndarray) -> "CcdInputs":
        return replace(self, src={**self.src, **cols})


def clipped_std(x: np.ndarray, nsigma: float = PULL_CLIP_SIGMA, iters: int = 10) -> tuple[float, float, float]:
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


def expected_snr(flux_e: np.ndarray, fwhm_pix: np.ndarray | float, sky_e: float, read_noise: float) -> np.ndarray:
    sigma = np.asarray(fwhm_pix, float) / 2.3548
    flux_e = np.asarray(flux_e, float)
    return flux_e / np.sqrt(np.clip(flux_e, 0, None) + 4 * math.pi * sigma**2 * (sky_e + read_noise**2))


# ---------------------------------------------------------------------------------------- loading
def load_single_frame(repo: Repository, run: str) -> list[CcdInputs]:
    truth_runs = ["truth"]
    ccd_truth_ref = repo.find("truth_ccdvisits", {}, truth_runs)
    if ccd_truth_ref is None:
        raise FileNotFoundError(f"no simulator truth in {repo.root}: validation needs a simulated repository")
    ct = read_columns(repo.path_of(ccd_truth_ref))
    tkey = {(int(v), int(d)): i for i, (v, d) in enumerate(zip(ct["visit"], ct["detector"]))}
    tobj = read_columns(repo.get_path("truth_objects", {}, truth_runs))
    ref_of = dict(zip(tobj["truth_id"].tolist(), (tobj["ref_id"] >= 0).tolist()))
    row_of = {int(t): i for i, t in enumerate(tobj["truth_id"])}
    refcat = _load_refcat(repo)
    dmag_by_band: dict[str | None, np.ndarray | None] = {}
    out = []
    for sref in repo.query("source", [run]):
        visit, det = int(sref.data_id["visit"]), int(sref.data_id["detector"])
        instrument = sref.data_id["instrument"]
        i = tkey[(visit, det)]
        src = read_columns(repo.path_of(sref))
        src = {k: src[k] for k in SOURCE_COLUMNS if k in src}
        ccd = read_columns(repo.path_of(repo.find("ccdVisit", sref.data_id, [run])))
        truth = read_columns(repo.get_path("truth_sources", {"instrument": instrument, "visit": visit,
                                                             "detector": det}, truth_runs))
        truth["is_ref"] = np.array([ref_of.get(int(t), False) for t in truth["truth_id"]], bool)
        defects = detector_defects(repo, instrument, det)
        if defects is not None:
            shape, bad = defects
        else:
            shape, bad = (int(ccd["ySize"][0]), int(ccd["xSize"][0])), np.zeros(0, int)
        band = str(ccd["band"][0]) if "band" in ccd else None
        if band not in dmag_by_band:
            dmag_by_band[band] = _ref_dmag(band, tobj, refcat)
        dmag = dmag_by_band[band]
        rows = np.array([row_of.get(int(t), -1) for t in truth["truth_id"]], np.int64)
        out.append(CcdInputs(visit, det, truth, src, float(ccd["zeroPoint"][0]), float(ct["zero_point"][i]),
                             float(ct["sky_e_per_pix"][i]),
                             float(ct["read_noise"][i]) if "read_noise" in ct else 5.0,
                             float(ct["psf_fwhm_pix"][i]), (int(shape[0]), int(shape[1])), bad,
                             ref_dmag=None if dmag is None else np.where(rows >= 0, dmag[rows], np.nan),
                             zp_provisional=bool(ccd["zeroPointProvisional"][0]) if "zeroPointProvisional" in ccd
                             else False))
    return out


def detector_defects(repo: Repository, instrument: str, detector: int
                     ) -> tuple[tuple[int, int], np.ndarray] | None:
    """((ny, nx), bad column indices) of a detector's defects calibration, or None without one."""
    dref = repo.find("defects", {"instrument": instrument, "detector": int(detector)}, [f"{instrument}/calib"])
    if dref is None:
        return None
    defects = read_image(repo.path_of(dref))[0].astype(bool)
    return (int(defects.shape[0]), int(defects.shape[1])), np.flatnonzero(defects.any(axis=0))


def clean_pixels(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], bad_columns: np.ndarray) -> np.ndarray:
    """Positions more than EDGE_PIX from the detector's edges and BAD_COLUMN_MARGIN_PIX from its bad
    columns (the calibration's defects, known before any processing): where a centroid or flux is not
    the WCS's or the calibration's to answer for."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ny, nx = shape
    ok = (x > EDGE_PIX) & (x < nx - 1 - EDGE_PIX) & (y > EDGE_PIX) & (y < ny - 1 - EDGE_PIX)
    if len(bad_columns):
        ok &= np.min(np.abs(x[:, None] - np.asarray(bad_columns)[None, :]), axis=1) >= BAD_COLUMN_MARGIN_PIX
    return ok


def _load_refcat(repo: Repository) -> dict[str, np.ndarray] | None:
    refs = repo.query("refcat")
    return read_columns(repo.path_of(refs[0])) if refs else None


def _ref_dmag(band: str | None, tobj: dict[str, np.ndarray], refcat: dict[str, np.ndarray] | None
              ) -> np.ndarray | None:
    """Refcat magnitude minus true mean magnitude in ``band`` per truth object (row of ``tobj``; NaN:
    not in the refcat), or None when the refcat or the truth lacks the band."""
    if refcat is None or band is None or f"{band}_flux" not in refcat or f"{band}_flux" not in tobj:
        return None
    ref_row = {int(r): k for k, r in enumerate(refcat["ref_id"])}
    k = np.array([ref_row.get(int(r), -1) for r in tobj["ref_id"]], np.int64)
    f_ref = np.where(k >= 0, np.asarray(refcat[f"{band}_flux"], float)[np.clip(k, 0, None)], np.nan)
    f_true = np.asarray(tobj[f"{band}_flux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((f_ref > 0) & (f_true > 0), -2.5 * np.log10(f_ref / f_true), np.nan)


# ---------------------------------------------------------------------------------------- scoring
def _match_ccd(c: CcdInputs) -> dict[str, np.ndarray]:
    """Per truth row: matched Source row (-1), expected S/N, clean, star flags."""
    t, s = c.truth, c.src
    leaf = np.flatnonzero(np.asarray(s["deblend_nChild"]) == 0)
    m = unique_match(np.column_stack([t["x"], t["y"]]), np.column_stack([s["x"][leaf], s["y"][leaf]]),
                     MATCH_RADIUS_PIX)
    j = np.where(m >= 0, leaf[np.clip(m, 0, None)], -1)
    fwhm = t["psf_fwhm_pix"] if "psf_fwhm_pix" in t else c.fwhm_pix
    snr = expected_snr(t["flux_e"], fwhm, c.sky_e, c.read_noise)
    isolated = (t["nn_dist_pix"] > ISOLATION_FWHM * c.fwhm_pix) | (t["nn_flux_ratio"] < 0.01)
    star = t["kind"] == "star"
    clean = star & isolated & clean_pixels(t["x"], t["y"], c.shape, c.bad_columns) \
        & ~np.asarray(t["is_saturated"], bool)
    return {"j": j, "snr": snr, "clean": clean}


def _reference_floor(c: CcdInputs, mt: dict[str, np.ndarray]) -> float:
    """The zero-point error (mag) a pipeline inherits from the reference catalogue on this ccdvisit:
    the mean of refcat-minus-true magnitudes over the refcat stars it could calibrate on (on the
    detector away from the edges, unsaturated, expected S/N > 10).  NaN without refcat information."""
    if c.ref_dmag is None:
        return float("nan")
    t = c.truth
    usable = (np.isfinite(c.ref_dmag) & ~np.asarray(t["is_saturated"], bool) & (mt["snr"] > 10)
              & clean_pixels(t["x"], t["y"], c.shape, np.zeros(0, int)))
    return float(np.mean(c.ref_dmag[usable])) if usable.any() else float("nan")


def _sep_mas(src: dict[str, np.ndarray], j: np.ndarray, truth: dict[str, np.ndarray], sel: np.ndarray) -> np.ndarray:
    return separation_mas(src["ra"][j[sel]], src["dec"][j[sel]], truth["ra"][sel], truth["dec"][sel])


def _rms(x: list[np.ndarray]) -> tuple[float, int]:
    a = np.concatenate(x) if x else np.zeros(0)
    a = a[np.isfinite(a)]
    return (float(np.sqrt(np.mean(a**2))) if len(a) else float("nan")), int(len(a))


def pull_bin_checks(pull: np.ndarray, snr: np.ndarray) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Metrics and checks of flux pulls per expected-S/N bin (bounds in the module docstring)."""
    metrics: dict[str, Any] = {}
    checks: dict[str, dict[str, Any]] = {}
    ok = np.isfinite(pull) & np.isfinite(snr)
    pull, snr = pull[ok], snr[ok]
    for k, (lo, hi) in enumerate(C.PULL_BINS):
        p = C.pull_prefix(lo, hi)
        sel = (snr >= lo) & (snr < hi)
        n = int(sel.sum())
        metrics[f"{p}_n"] = n
        required = k < C.PULL_BINS_REQUIRED
        if n < PULL_MIN_STARS and required:
            for q in ("mean", "std", "clipped_fraction"):
                metrics[f"{p}_{q}"] = float("nan")
                checks[f"{p}_{q}"] = C.missing(f"{n} stars in S/N {lo:g}-{hi:g} (< {PULL_MIN_STARS}): "
                                               "the faint bins must have data")
            continue
        insufficient = n < PULL_MIN_STARS
        std, mean, clipped = clipped_std(pull[sel]) if n >= 3 else (float("nan"),) * 3
        snr_med = float(np.median(snr[sel])) if n else float("nan")
        metrics.update({f"{p}_mean": mean, f"{p}_std": std, f"{p}_clipped_fraction": clipped,
                        f"{p}_snr_median": snr_med})
        note = f"n={n}, median S/N {snr_med:.0f}" if n else "no stars"
        if insufficient:
            note = f"{n} stars (< {PULL_MIN_STARS}): insufficient"
        n_kept = max(1, round(n * (1 - clipped))) if n else 1
        std_hi = math.sqrt(1.1**2 + (PULL_EPS * snr_med) ** 2) if n else 1.1
        mean_hi = 3 * max(1.0, std if math.isfinite(std) else 1.0) / math.sqrt(n_kept) + \
            (PULL_EPS * snr_med if n else 0.0)
        clip_hi = float(stats.binom.ppf(0.999, n, PULL_OUTLIER_RATE) / n) if n else PULL_OUTLIER_RATE
        checks[f"{p}_mean"] = C.check(mean, "in", (-mean_hi, mean_hi), insufficient=insufficient, note=note)
        checks[f"{p}_std"] = C.check(std, "in", (0.9, std_hi), insufficient=insufficient, note=note)
        checks[f"{p}_clipped_fraction"] = C.check(clipped, "<=", clip_hi, insufficient=insufficient, note=note)
    return metrics, checks


def score_single_frame(ccds: list[CcdInputs]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Single-frame metrics and their checks from in-memory tables."""
    if not ccds:
        return {}, {}
    sep_all, sep_res, sep_used, sep_nonref = [], [], [], []
    pulls, pull_snr, zp_diff, per_ccd, ref_floor, zp_prov = [], [], [], [], [], []
    n_complete = n_eligible = n_matched = max_refs_on_ccd = 0
    have_reserved = all("calib_astrometry_reserved" in c.src for c in ccds)
    for c in ccds:
        t, s = c.truth, c.src
        mt = _match_ccd(c)
        j, snr, clean = mt["j"], mt["snr"], mt["clean"]
        matched = j >= 0
        n_matched += int(matched.sum())
        if c.zp_provisional:
            zp_prov.append(c.zp_fit - c.zp_true)
        else:
            zp_diff.append(c.zp_fit - c.zp_true)
            ref_floor.append(_reference_floor(c, mt))
        ny, nx = c.shape
        on_ccd = (t["x"] >= 0) & (t["x"] <= nx - 1) & (t["y"] >= 0) & (t["y"] <= ny - 1)
        max_refs_on_ccd = max(max_refs_on_ccd, int(np.sum(np.asarray(t["is_ref"], bool) & on_ccd)))
        elig = clean & (snr > 10)
        n_eligible += int(elig.sum())
        n_complete += int((elig & matched).sum())
        bright = clean & matched & (snr > ASTROMETRY_SNR)
        sep_all.append(_sep_mas(s, j, t, bright))
        sep_nonref.append(_sep_mas(s, j, t, bright & ~t["is_ref"]))
        jj = np.clip(j, 0, None)
        if have_reserved:
            res = np.asarray(s["calib_astrometry_reserved"], bool)[jj]
            sep_res.append(_sep_mas(s, j, t, bright & res))
        if "calib_astrometry_used" in s:
            sep_used.append(_sep_mas(s, j, t, bright & np.asarray(s["calib_astrometry_used"], bool)[jj]))
        sel = elig & matched
        expected = t["flux_nJy"][sel] * 10 ** (0.4 * (c.zp_true - c.zp_fit))
        pulls.append((s["psfFlux"][j[sel]] - expected) / s["psfFluxErr"][j[sel]])
        pull_snr.append(snr[sel])
        per_ccd.append({"visit": c.visit, "detector": c.detector, "zp_error_mmag": 1000 * (c.zp_fit - c.zp_true),
                        "zp_provisional": c.zp_provisional,
                        "n_sources": int(len(s["x"])), "n_eligible_stars": int(elig.sum()),
                        "n_found": int((elig & matched).sum())})
    zp = np.asarray(zp_diff) if zp_diff else np.full(1, np.nan)
    # provisional zero points (too few stars to fit one: relcal solves them, relcal_zp_rms_mmag scores that)
    # are counted, and their error reported, outside the single-frame zero-point bound
    m_prov = {"photometry_zp_n_provisional": len(zp_prov)}
    if zp_prov:
        m_prov["photometry_zp_provisional_error_mmag"] = float(1000 * np.sqrt(np.mean(np.square(zp_prov))))
    m: dict[str, Any] = {"n_ccdvisits": len(ccds), "n_matched": n_matched, "per_ccdvisit": per_ccd, **m_prov}
    m["astrometry_rms_mas"], m["astrometry_n_stars"] = _rms(sep_all)
    m["astrometry_nonref_rms_mas"], m["astrometry_nonref_n_stars"] = _rms(sep_nonref)
    if have_reserved:
        m["astrometry_reserved_rms_mas"], m["astrometry_reserved_n_stars"] = _rms(sep_res)
    if sep_used:
        m["astrometry_used_rms_mas"], m["astrometry_used_n_stars"] = _rms(sep_used)
        if have_reserved and m["astrometry_used_rms_mas"] > 0:
            m["astrometry_reserved_over_used"] = m["astrometry_reserved_rms_mas"] / m["astrometry_used_rms_mas"]
    m["photometry_zp_error_mmag"] = float(1000 * np.sqrt(np.mean(zp**2)))
    m["photometry_zp_error_max_mmag"] = float(1000 * np.max(np.abs(zp)))
    m["photometry_zp_bias_mmag"] = float(1000 * np.mean(zp))
    floor = np.asarray(ref_floor, float)
    floor = floor[np.isfinite(floor)]
    m["photometry_zp_refcat_floor_mmag"] = float(1000 * np.sqrt(np.mean(floor**2))) if len(floor) else 0.0
    m["completeness_snr10_isolated_stars"] = n_complete / n_eligible if n_eligible else float("nan")
    m["completeness_n_stars"] = n_eligible
    pull = np.concatenate(pulls) if pulls else np.zeros(0)
    psnr = np.concatenate(pull_snr) if pull_snr else np.zeros(0)
    pm, pc = pull_bin_checks(pull, psnr)
    m.update(pm)
    # pooled, for information only (bounds are per bin)
    m["flux_pull_std"], m["flux_pull_mean"], m["flux_pull_clipped_fraction"] = clipped_std(pull)
    m["flux_pull_n_stars"] = int(np.isfinite(pull).sum())

    ck: dict[str, dict[str, Any]] = {}
    for name, (op, b) in BOUNDS.items():
        if name in m:
            n_key = {"astrometry_rms_mas": "astrometry_n_stars", "astrometry_reserved_rms_mas":
                     "astrometry_reserved_n_stars", "astrometry_nonref_rms_mas": "astrometry_nonref_n_stars",
                     "completeness_snr10_isolated_stars": "completeness_n_stars"}.get(name)
            note = f"n={m[n_key]}" if n_key else None
            if name == "photometry_zp_error_mmag":
                # the pipeline's own 10 mmag, in quadrature with what the reference catalogue's errors on the
                # stars of each detector make unavoidable (from the truth: 0 for a perfect refcat)
                b = math.hypot(b, m["photometry_zp_refcat_floor_mmag"])
                note = (f"{len(zp_diff)} ccdvisits; bound sqrt({ZP_MAX_MMAG:g}^2 + refcat floor "
                        f"{m['photometry_zp_refcat_floor_mmag']:.1f}^2)"
                        + (f"; {len(zp_prov)} provisional zero points (too few stars) left to relcal"
                           if zp_prov else ""))
            ck[name] = C.check(m[name], op, b, note=note)
    if have_reserved and m.get("astrometry_reserved_n_stars", 0) == 0 and max_refs_on_ccd < RESERVE_MIN_REFS:
        # no detector of the sky holds enough reference stars to spare some for scoring (counted from the
        # truth, so a pipeline that never reserves still fails where it could have): the non-reference
        # stars are then the out-of-sample test
        ck["astrometry_reserved_rms_mas"] = C.check(
            float("nan"), "<=", ASTROMETRY_MAX_MAS, insufficient=True,
            note=f"no reserved star scored; at most {max_refs_on_ccd} reference stars on any detector "
                 f"(< {RESERVE_MIN_REFS}): see astrometry_nonref_rms_mas")
    if not have_reserved:
        ck["astrometry_reserved_rms_mas"] = C.missing("Source tables have no calib_astrometry_reserved column: "
                                                      "no reference star was held out of the astrometric fit")
    ck.update(pc)
    return m, ck


# ---------------------------------------------------------------------------------------- the run
def validate_run(repo: Repository, run: str) -> dict[str, Any]:
    """Every metric of every stage the run has, with checks; see docs/validation.md."""
    from .objects import load_objects, score_forced, score_objects
    from .provenance import enabled_stages, left_out_quanta
    from .relcal import relcal_metrics

    ccds = load_single_frame(repo, run)
    stages = enabled_stages(repo, run)
    if not ccds and "single_frame" not in stages:
        raise FileNotFoundError(f"run {run!r} has no Source tables to validate")
    metrics: dict[str, Any] = {"run": run}
    checks: dict[str, dict[str, Any]] = {}
    m, c = score_single_frame(ccds)
    metrics.update(m)
    checks.update(c)
    rel = relcal_metrics(repo, run)
    if rel is not None:
        m, c = rel
        metrics.update(m)
        checks.update(c)
    inputs = load_objects(repo, run)
    if inputs is not None:
        m, c = score_objects(inputs)
        metrics.update(m)
        checks.update(c)
        m, c = score_forced(inputs)
        metrics.update(m)
        checks.update(c)
    checks = C.require(checks, stages | _stages_with_outputs(metrics))
    metrics["enabled_stages"] = sorted(stages)
    metrics["left_out"] = left_out_quanta(repo, run)
    metrics["checks"] = checks
    metrics["all_pass"] = C.all_pass(checks)
    return metrics


def _stages_with_outputs(metrics: dict[str, Any]) -> set[str]:
    """Stages whose outputs exist (for repositories without provenance)."""
    out = set()
    if metrics.get("n_ccdvisits"):
        out.add("single_frame")
    return out
