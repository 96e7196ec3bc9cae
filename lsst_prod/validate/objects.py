"""Coadd, Object and ForcedSource metrics against truth (when a run has objects).

Truth stars and galaxies, at their positions propagated to the mean epoch of the coadd inputs, are
matched one-to-one (``matching.unique_match``) to primary Objects within 0.5 arcsec.  "Inner" truth
objects lie in the inner region of a processed patch (where primaries live); expected coadd S/N per
band is F / (noise sqrt(4 pi (sigma_psf^2 + sigma_gal^2))) with the coadd's median per-pixel noise
at a covered pixel (0 on pixels without data).  Loading (``load_objects``) and scoring
(``score_objects``, ``score_forced``) are separate; scorers take in-memory tables.

Definitions and bounds (reasoning in docs/validation.md):

* ``coadd_flux_ratio_stars`` (0.995-1.005): median of <band>_psfFlux / true mean flux of inner,
  isolated-by-selection, non-variable stars with coadd PSF-flux S/N > 50, over bands.
* ``object_completeness_snr10`` (>= 1 - f_blend - 0.03): fraction of inner truth stars and galaxies
  with expected coadd S/N > 10 in some band that have a primary Object.  At a 5 sigma threshold a
  S/N-10 source is lost to noise with probability < 1e-6; what a good pipeline cannot recover is the
  fainter member of a pair closer than the resolution limit: f_blend is the fraction of eligible
  objects with a brighter truth object within 1 coadd FWHM (from truth, for this run's density
  and seeing).  The 3 % allowance covers the approximate S/N of galaxies (the effective area of an
  exponential disk is not 4 pi sigma^2) and masked pixels.
* Deblending, over EVERY pair of truth stars closer than 2 coadd PSF FWHM with both members inner
  and at expected S/N > 10 in the reference band (each detectable alone): a pair is *split* when
  both stars are matched (one-to-one, hence to two different primary Objects).

  - ``deblend_resolved_fraction`` >= 0.9 f_res - 3 sqrt(p (1 - p) / n_pairs) (p = 0.9 f_res):
    f_res is the fraction of the pairs whose noise-free profile along the line joining them has two
    maxima (two Gaussians of the coadd FWHM with the pairs' true reference-band fluxes): the pairs
    a peak-finding deblender can split at all.  A good deblender splits >= 90 % of those.
  - ``deblend_flux_error_median``: median over the pairs' members of |psfFlux / true flux - 1| in
    the reference band, an unsplit pair counting 1.0 for both members.  Bound: the same median for
    a reference pipeline that splits as many resolvable pairs as the resolved-fraction bound asks
    (the easiest ones) and measures each child to sqrt(0.05^2 + (0.674 / S/N)^2) (5 % deblending
    error and the median |error| of Gaussian noise).  When that reference splits under half the
    pairs its median is 1.0 and the check is ``insufficient`` (it could not fail): the sky, not
    the pipeline, decides it; then
  - ``deblend_flux_error_median_resolvable``, the same median over the members of the resolvable
    pairs only (unsplit = 1.0), with the same kind of reference (90 % of them split, less 3 sigma
    of binomial noise), is the one that discriminates.

Forced photometry: per matched star, light curves per band of ForcedSource PSF fluxes (unflagged);
chi2 about the weighted mean, summed over bands with >= 2 points, dof = sum (n_b - 1).  The
constant hypothesis is rejected at a false-positive rate alpha = 1e-3 (chi2 > chi2.isf(alpha, dof)).

* ``forced_variable_recovered_fraction_<lo>_<hi>sigma``: recovered fraction of truth variables with
  A / sigma_mag in [lo, hi) (A: semi-amplitude, sigma_mag = 1.0857 / median per-visit S/N), bins
  2-3, 3-5, 5-10, >= 10.  Bound per bin: >= P - 3 sqrt(sum p_i (1 - p_i)) / n, with p_i the power
  of the chi2 test for star i (noncentral chi2 with dof_i and noncentrality lambda_i = the chi2 of
  its TRUE light curve at the actual epochs with the reported errors) and P their mean: the
  recovery a correct pipeline achieves, minus 3 binomial standard errors.  A bin with < 5 stars is
  insufficient.  ``forced_variable_recovered_fraction`` is the same over all variables with
  A / sigma_mag >= 2 (must have data).
* ``forced_constant_chi2_dof_median``: median chi2/dof of isolated (no truth neighbour within 3
  FWHM) constant stars with median per-visit S/N 10-50 (where a 5 mmag per-visit calibration error
  adds <= 0.05).  Bound: m +- 3 SE, m the median of the mixture of chi2(dof_i)/dof_i over the
  actual stars, SE = 1 / (2 f(m) sqrt(n)) the standard error of a sample median (f the mixture
  density).
* ``forced_constant_false_positive_rate``: fraction of those stars the chi2 test rejects at alpha
  (0.001).  Bound: alpha + 3 sqrt(alpha (1 - alpha) / n), what correct errors give (binomial).  It
  sees the tails the median does not: a few stars whose errors are far too small (next to bright stars).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from scipy import optimize, stats
from scipy.spatial import cKDTree

from ..algorithms.astrometry import propagate_positions
from ..algorithms.masks import NO_DATA
from ..repo import Repository
from ..repo.formats import read_columns, read_exposure
from ..stages.common import wcs_from_header
from . import checks as C
from .matching import chord, unique_match, unit_vectors

MATCH_ARCSEC = 0.5
COADD_RATIO_BOUNDS = (0.995, 1.005)
#: a patch-band's own coadd flux ratio is checked with at least this many stars
PATCH_RATIO_MIN_STARS = 30
COMPLETENESS_ALLOWANCE = 0.03
DEBLEND_PAIR_FWHM = 2.0
DEBLEND_CHILD_ERROR = 0.05
DEBLEND_SPLIT_OF_RESOLVABLE = 0.9
VAR_ALPHA = 1e-3
VAR_MIN_STARS = 5
CONST_SNR = (10.0, 50.0)
ISOLATION_FWHM = 3.0
K_SIGMA = 3.0

FORCED_COLUMNS = ("objectId", "band", "psfFlux", "psfFluxErr", "psfFlux_flag", "expMidptMJD")


@dataclass
class ObjectInputs:
    """In-memory inputs of the object/forced metrics (tests perturb ``obj`` or ``forced``)."""

    truth: dict[str, np.ndarray]  # static truth objects (stars, galaxies) + ra_t, dec_t at the coadd epoch
    obj: dict[str, np.ndarray]  # all Object rows of the run
    bands: list[str]
    ref_band: str
    fwhm_arcsec: float  # median coadd PSF FWHM
    inner: np.ndarray  # truth object in a processed patch's inner region
    snr: dict[str, np.ndarray]  # expected coadd S/N per band (0 where not covered)
    forced: dict[str, np.ndarray] | None = None
    forced_enabled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def with_obj(self, obj: dict[str, np.ndarray]) -> "ObjectInputs":
        return replace(self, obj=obj)


# ---------------------------------------------------------------------------------------- loading
def load_objects(repo: Repository, run: str) -> ObjectInputs | None:
    obj_refs = repo.query("object", [run])
    if not obj_refs:
        return None
    truth = read_columns(repo.get_path("truth_objects", {}, ["truth"]))
    objs = [read_columns(repo.path_of(r)) for r in obj_refs]
    obj = _concat(objs)
    bands = sorted({k.split("_")[0] for k in obj if k.endswith("_psfFlux")})
    coadds = {(int(r.data_id["tract"]), int(r.data_id["patch"]), r.data_id["band"]): r
              for r in repo.query("coadd", [run])}
    mjds, noise, fwhm, covered, scale = [], {}, {}, {}, []
    for key, ref in coadds.items():
        e = read_exposure(repo.path_of(ref))
        w = wcs_from_header(e.wcs_header)
        covered[key] = (w, (e.mask & NO_DATA) == 0)
        mjds.append(0.5 * (float(e.metadata["MJDMIN"]) + float(e.metadata["MJDMAX"])))
        good = e.variance > 0
        noise[key] = float(np.sqrt(np.median(e.variance[good]))) if good.any() else np.nan
        fwhm[key] = float(e.metadata["PSFFWHMP"])
        scale.append(math.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600)
    pix_arcsec = float(np.median(scale)) if scale else 0.2
    mjd = float(np.mean(mjds)) if mjds else float(truth["epoch_mjd"][0])
    static = np.isin(truth["kind"], ["star", "galaxy"])
    T = {k: v[static] for k, v in truth.items()}
    ref_epoch = float(T["epoch_mjd"][0]) if "epoch_mjd" in T and len(T["epoch_mjd"]) else 57388.0
    T["ra_t"], T["dec_t"] = propagate_positions(T["ra"], T["dec"], np.nan_to_num(T["pmra"]),
                                                np.nan_to_num(T["pmdec"]), np.nan_to_num(T["parallax"]),
                                                ref_epoch, mjd)
    T["ref_epoch_mjd"] = np.full(len(T["ra"]), ref_epoch)
    tra, tdec = T["ra_t"], T["dec_t"]
    from ..skymap import SkyMap

    skymap = SkyMap(_run_skymap(repo, run))
    inner = np.zeros(len(tra), bool)
    patch_of: dict[int, tuple[int, int]] = {}
    for tract in sorted({k[0] for k in coadds}):
        pp = skymap.patch_for(int(tract), tra, tdec)
        sel = skymap.tract_info(int(tract)).contains_inner(tra, tdec) & np.isin(pp, [k[1] for k in coadds
                                                                                     if k[0] == tract])
        inner |= sel
        patch_of.update({int(i): (int(tract), int(pp[i])) for i in np.flatnonzero(sel)})
    snr = {b: np.zeros(len(tra)) for b in bands}
    for i, (tract, patch) in patch_of.items():
        for b in bands:
            key = (tract, patch, b)
            if key not in noise:
                continue
            w, cov = covered[key]
            px, py = w.all_world2pix([tra[i]], [tdec[i]], 0)
            ix, iy = int(round(float(px[0]))), int(round(float(py[0])))
            if not (0 <= iy < cov.shape[0] and 0 <= ix < cov.shape[1] and cov[iy, ix]):
                continue  # no coadd data there (a partly covered patch)
            sig_psf = fwhm[key] / 2.3548
            sig_gal = float(T["disk_hlr_arcsec"][i]) / pix_arcsec / 1.1774 if T["kind"][i] == "galaxy" else 0.0
            area = 4 * math.pi * (sig_psf**2 + sig_gal**2)
            snr[b][i] = float(T[f"{b}_flux"][i]) / (noise[key] * math.sqrt(area))
    ref_band = "r" if "r" in bands else bands[0]
    forced = None
    frefs = repo.query("forcedSource", [run])
    if frefs:
        parts = []
        for r in frefs:
            path = repo.path_of(r)
            has_unmodelled = "psfFlux_flag_unmodelled" in pq.read_schema(path).names
            part = read_columns(path, list(FORCED_COLUMNS) + (["psfFlux_flag_unmodelled"] if has_unmodelled else []))
            # a star's light curve leaves out what unmodelled light (a transient, an asteroid) biased
            part["psfFlux_flag"] = np.asarray(part["psfFlux_flag"], bool) | np.asarray(
                part.pop("psfFlux_flag_unmodelled", np.zeros(len(part["objectId"]), bool)), bool)
            parts.append(part)
        forced = {k: np.concatenate([p[k] for p in parts]) for k in FORCED_COLUMNS}
    from .provenance import enabled_stages

    fw = float(np.median(list(fwhm.values()))) * pix_arcsec if fwhm else float("nan")
    return ObjectInputs(T, obj, bands, ref_band, fw, inner, snr, forced,
                        forced_enabled=bool(frefs) or "forced" in enabled_stages(repo, run))


def _concat(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several Object tables; a column some patches lack (a band without a coadd there) is
    NaN / False / 0 in their rows."""
    names = list(dict.fromkeys(k for t in tables for k in t))
    out = {}
    for k in names:
        proto = next(t[k] for t in tables if k in t)
        parts = []
        for t in tables:
            n = len(next(iter(t.values())))
            if k in t:
                parts.append(t[k])
            elif proto.dtype.kind == "f":
                parts.append(np.full(n, np.nan))
            elif proto.dtype.kind == "b":
                parts.append(np.zeros(n, bool))
            elif proto.dtype.kind in "iu":
                parts.append(np.zeros(n, proto.dtype))
            else:
                parts.append(np.full(n, "", dtype=object))
        out[k] = np.concatenate(parts)
    return out


def _run_skymap(repo: Repository, run: str):
    """The sky map configuration the run was planned with (its saved campaign)."""
    from ..config.skymap import SkyMapConfig
    from ..config.yamlio import load_yaml

    doc = load_yaml(repo.root / run / "_plan" / "campaign.yaml")
    return SkyMapConfig.model_validate(doc.data.get("skymap", {}))


# ---------------------------------------------------------------------------------------- scoring
def match_truth(inp: ObjectInputs) -> np.ndarray:
    """Per truth object: index of its (unique) primary Object row, -1 if none."""
    prim = np.flatnonzero(np.asarray(inp.obj["detect_isPrimary"], bool))
    m = unique_match(unit_vectors(inp.truth["ra_t"], inp.truth["dec_t"]),
                     unit_vectors(inp.obj["coord_ra"][prim], inp.obj["coord_dec"][prim]), chord(MATCH_ARCSEC))
    return np.where(m >= 0, prim[np.clip(m, 0, None)], -1)


def two_peaks(sep: np.ndarray, f1: np.ndarray, f2: np.ndarray, fwhm: float) -> np.ndarray:
    """Whether two Gaussians of ``fwhm`` with fluxes f1, f2 at separation ``sep`` (same units) show
    two maxima along the line joining them (noise-free)."""
    s = np.asarray(sep, float)[:, None] / (fwhm / 2.3548)
    x = np.linspace(-0.5, 1.5, 801)[None, :] * s
    prof = np.asarray(f1, float)[:, None] * np.exp(-0.5 * x**2) + np.asarray(f2, float)[:, None] * \
        np.exp(-0.5 * (x - s) ** 2)
    d = np.diff(prof, axis=1)
    n_max = np.sum((d[:, :-1] > 0) & (d[:, 1:] <= 0), axis=1)
    return n_max >= 2


def _sep_arcsec(T: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    u = unit_vectors(T["ra_t"], T["dec_t"])
    return np.degrees(2 * np.arcsin(np.linalg.norm(u[a] - u[b], axis=1) / 2)) * 3600


def score_objects(inp: ObjectInputs) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    T, obj, bands, rb = inp.truth, inp.obj, inp.bands, inp.ref_band
    j = match_truth(inp)
    matched = j >= 0
    jj = np.clip(j, 0, None)
    m: dict[str, Any] = {}
    ck: dict[str, dict[str, Any]] = {}
    star = T["kind"] == "star"
    n_prim = int(np.asarray(obj["detect_isPrimary"], bool).sum())
    m["object_n_primary"] = n_prim
    m["object_n_matched"] = int(matched.sum())

    # 1. coadd flux ratio of stars
    ratios = []
    nonvar = star & ~np.asarray(T["is_variable"], bool)
    per_patch = []  # (tract, patch, band, median ratio, n, allowed deviation)
    has_patch = "patch" in obj and "tract" in obj
    for b in bands:
        f, fe = obj[f"{b}_psfFlux"][jj], obj[f"{b}_psfFluxErr"][jj]
        with np.errstate(invalid="ignore", divide="ignore"):
            sel = matched & nonvar & inp.inner & (f / fe > 50) & (T[f"{b}_flux"] > 0)
            rat, sig = f[sel] / T[f"{b}_flux"][sel], (fe / f)[sel]
        ratios.append(rat)
        if has_patch:
            key = np.asarray(obj["tract"], np.int64)[jj][sel] * 100000 + np.asarray(obj["patch"], np.int64)[jj][sel]
            for k in np.unique(key):
                g = key == k
                n = int(g.sum())
                if n < PATCH_RATIO_MIN_STARS:
                    continue
                # the sample median's standard error from the REPORTED errors (a worse pipeline gets no
                # looser bound): 1.2533 sigma / sqrt(n)
                se = 1.2533 * float(np.sqrt(np.mean(sig[g] ** 2))) / math.sqrt(n)
                per_patch.append((int(k // 100000), int(k % 100000), b, float(np.median(rat[g])), n,
                                  COADD_RATIO_BOUNDS[1] - 1 + K_SIGMA * se))
    r = np.concatenate(ratios) if ratios else np.zeros(0)
    m["coadd_flux_ratio_stars"] = float(np.median(r)) if len(r) else float("nan")
    m["coadd_flux_ratio_n_stars"] = int(len(r))
    ck["coadd_flux_ratio_stars"] = C.check(m["coadd_flux_ratio_stars"], "in", COADD_RATIO_BOUNDS, note=f"n={len(r)}")
    # the pooled median can hide opposite scale errors of different patches: each patch and band with
    # enough stars must hold the same 0.5 %, plus 3 standard errors of its own median
    m["coadd_flux_ratio_per_patch"] = [{"tract": t, "patch": p, "band": b, "median": v, "n": n, "allowed": a}
                                       for t, p, b, v, n, a in per_patch]
    if per_patch:
        excess = [abs(v - 1) - a for _, _, _, v, _, a in per_patch]
        w = int(np.argmax(excess))
        t, p, b, v, n, a = per_patch[w]
        m["coadd_flux_ratio_patch_worst_excess"] = float(excess[w])
        ck["coadd_flux_ratio_patch_worst_excess"] = C.check(
            excess[w], "<=", 0.0, note=f"{len(per_patch)} patch-bands with >= {PATCH_RATIO_MIN_STARS} stars; worst: "
                                       f"tract {t} patch {p} {b}, median {v:.4f} (n={n}, allowed +-{a:.4f})")
    else:
        ck["coadd_flux_ratio_patch_worst_excess"] = C.check(
            float("nan"), "<=", 0.0, insufficient=True,
            note=f"no patch-band with >= {PATCH_RATIO_MIN_STARS} stars at S/N > 50")

    # 2. completeness at expected coadd S/N > 10 (any band), bound from the truth's close pairs
    snr_best = np.max(np.vstack([inp.snr[b] for b in bands]), axis=0)
    elig = inp.inner & (snr_best > 10)
    u = unit_vectors(T["ra_t"], T["dec_t"])
    fw = inp.fwhm_arcsec
    tree = cKDTree(u)
    pairs1 = tree.query_pairs(chord(fw), output_type="ndarray")
    fref = np.nan_to_num(T[f"{rb}_flux"])
    hidden = np.zeros(len(fref), bool)  # has a brighter truth object within 1 FWHM
    if len(pairs1):
        a, b = pairs1[:, 0], pairs1[:, 1]
        hidden[a[fref[a] < fref[b]]] = True
        hidden[b[fref[b] <= fref[a]]] = True
    n_el = int(elig.sum())
    f_blend = float(hidden[elig].mean()) if n_el else float("nan")
    m["object_completeness_snr10"] = float(matched[elig].mean()) if n_el else float("nan")
    m["object_completeness_n"] = n_el
    m["object_completeness_blend_fraction"] = f_blend
    ck["object_completeness_snr10"] = C.check(m["object_completeness_snr10"], ">=",
                                              1 - f_blend - COMPLETENESS_ALLOWANCE,
                                              note=f"n={n_el}; {100 * f_blend:.1f} % have a brighter neighbour "
                                                   "within 1 FWHM")

    # 3. deblending of every close pair of stars detectable alone
    ok = star & inp.inner & (inp.snr[rb] > 10)
    pairs = tree.query_pairs(chord(DEBLEND_PAIR_FWHM * fw), output_type="ndarray")
    if len(pairs):
        pairs = pairs[ok[pairs[:, 0]] & ok[pairs[:, 1]]]
    n_pairs = int(len(pairs))
    m["deblend_n_pairs"] = n_pairs
    if n_pairs:
        a, b = pairs[:, 0], pairs[:, 1]
        split = matched[a] & matched[b]
        sep = _sep_arcsec(T, a, b)
        resolvable = two_peaks(sep, fref[a], fref[b], fw)
        with np.errstate(invalid="ignore", divide="ignore"):
            err_a = np.where(split, np.abs(obj[f"{rb}_psfFlux"][jj[a]] / fref[a] - 1), 1.0)
            err_b = np.where(split, np.abs(obj[f"{rb}_psfFlux"][jj[b]] / fref[b] - 1), 1.0)
        err = np.nan_to_num(np.concatenate([err_a, err_b]), nan=1.0)
        tol_a = np.sqrt(DEBLEND_CHILD_ERROR**2 + (0.674 / inp.snr[rb][a]) ** 2)
        tol_b = np.sqrt(DEBLEND_CHILD_ERROR**2 + (0.674 / inp.snr[rb][b]) ** 2)
        f_res = float(resolvable.mean())
        p = DEBLEND_SPLIT_OF_RESOLVABLE * f_res
        frac_bound = p - K_SIGMA * math.sqrt(p * (1 - p) / n_pairs)
        m.update(deblend_flux_error_median=float(np.median(err)), deblend_resolved_fraction=float(split.mean()),
                 deblend_resolvable_fraction=f_res, deblend_n_split=int(split.sum()),
                 deblend_flux_error_median_split=float(np.median(np.concatenate([err_a[split], err_b[split]])))
                 if split.any() else float("nan"))
        note = f"{n_pairs} pairs < {DEBLEND_PAIR_FWHM:g} FWHM, {100 * f_res:.0f} % resolvable"
        # the reference pipeline splits as many pairs as the resolved-fraction bound demands
        # (the hardest resolvable pairs, largest tolerance, are the ones it misses)
        bound_all, disc_all = _reference_median(tol_a, tol_b, resolvable, max(frac_bound, 0.0) * n_pairs)
        ck["deblend_flux_error_median"] = C.check(
            m["deblend_flux_error_median"], "<=", bound_all, insufficient=not disc_all,
            note=note + ("" if disc_all else "; under half the pairs resolvable: the median cannot tell "
                         "(see deblend_flux_error_median_resolvable)"))
        ck["deblend_resolved_fraction"] = C.check(m["deblend_resolved_fraction"], ">=", frac_bound, note=note)
        # the same median over the resolvable pairs only: it discriminates at any seeing and density
        n_res = int(resolvable.sum())
        if n_res:
            err_r = np.concatenate([err_a[resolvable], err_b[resolvable]])
            q = DEBLEND_SPLIT_OF_RESOLVABLE
            need = (q - K_SIGMA * math.sqrt(q * (1 - q) / n_res)) * n_res
            bound_r, disc_r = _reference_median(tol_a[resolvable], tol_b[resolvable],
                                                np.ones(n_res, bool), max(need, 0.0))
            m["deblend_flux_error_median_resolvable"] = float(np.median(np.nan_to_num(err_r, nan=1.0)))
            ck["deblend_flux_error_median_resolvable"] = C.check(
                m["deblend_flux_error_median_resolvable"], "<=", bound_r, insufficient=not disc_r or n_res < 5,
                note=f"{n_res} resolvable pairs, {int((split & resolvable).sum())} split")
        else:
            m["deblend_flux_error_median_resolvable"] = float("nan")
            ck["deblend_flux_error_median_resolvable"] = C.check(float("nan"), "<=", 1.0, insufficient=True,
                                                                 note="no resolvable pair")
    else:
        # the truth holds no such pair (a sparse sky): nothing to score, whatever the pipeline did
        # (the pairs come from the truth alone, so an output cannot empty this set)
        note = (f"no pair of truth stars closer than {DEBLEND_PAIR_FWHM:g} FWHM with both inner and at "
                f"expected S/N > 10: the sky offers nothing to score")
        for name, op, bound in (("deblend_flux_error_median", "<=", 1.0),
                                ("deblend_flux_error_median_resolvable", "<=", 1.0),
                                ("deblend_resolved_fraction", ">=", 0.0)):
            m[name] = float("nan")
            ck[name] = C.check(float("nan"), op, bound, insufficient=True, note=note)
    return m, ck


def _reference_median(tol_a: np.ndarray, tol_b: np.ndarray, resolvable: np.ndarray,
                      n_split: float) -> tuple[float, bool]:
    """Median |flux error| over the pairs' members for a reference pipeline that splits
    ``ceil(n_split)`` of the resolvable pairs (the easiest: smallest tolerance) and measures each
    child to its tolerance; every other pair counts 1.0.  Returns (bound, discriminating): the
    median is not discriminating when the reference itself has 1.0 there (under half split)."""
    n = len(tol_a)
    k = min(int(math.ceil(n_split - 1e-9)), int(resolvable.sum()))
    worst = np.maximum(tol_a, tol_b)
    order = np.flatnonzero(resolvable)[np.argsort(worst[resolvable], kind="stable")]
    splits = np.zeros(n, bool)
    splits[order[:k]] = True
    ref = np.concatenate([np.where(splits, tol_a, 1.0), np.where(splits, tol_b, 1.0)])
    med = float(np.median(ref))
    return med, med < 1.0


def light_curves(forced: dict[str, np.ndarray]) -> dict[int, dict[str, tuple[np.ndarray, ...]]]:
    """objectId -> band -> (flux, err, mjd) of usable forced measurements."""
    ok = ~np.asarray(forced["psfFlux_flag"], bool) & np.isfinite(forced["psfFlux"]) & (forced["psfFluxErr"] > 0)
    oid, band = forced["objectId"][ok], forced["band"][ok]
    fl, fe, t = forced["psfFlux"][ok], forced["psfFluxErr"][ok], forced["expMidptMJD"][ok]
    order = np.lexsort((band, oid))
    out: dict[int, dict[str, tuple[np.ndarray, ...]]] = defaultdict(dict)
    keys = np.column_stack([oid[order], np.unique(band, return_inverse=True)[1][order]]) if len(order) else None
    if keys is None:
        return {}
    cuts = np.flatnonzero((np.diff(keys, axis=0) != 0).any(axis=1)) + 1
    for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(order)]):
        idx = order[s:e]
        out[int(oid[idx[0]])][str(band[idx[0]])] = (fl[idx], fe[idx], t[idx])
    return out


def _chi2(flux: np.ndarray, err: np.ndarray) -> float:
    w = 1 / err**2
    mean = np.sum(w * flux) / np.sum(w)
    return float(np.sum(((flux - mean) / err) ** 2))


def chi2_median_bound(dofs: np.ndarray, k: float = K_SIGMA) -> tuple[float, float, float]:
    """(expected median, low, high) of the sample median of chi2(d_i)/d_i over the given dofs."""
    d = np.asarray(dofs, float)

    def cdf(x: float) -> float:
        return float(np.mean(stats.chi2.cdf(x * d, d)))

    med = optimize.brentq(lambda x: cdf(x) - 0.5, 1e-6, 100.0)
    dens = float(np.mean(d * stats.chi2.pdf(med * d, d)))
    se = 1.0 / (2 * dens * math.sqrt(len(d)))
    return med, med - k * se, med + k * se


def score_forced(inp: ObjectInputs) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    m: dict[str, Any] = {}
    ck: dict[str, dict[str, Any]] = {}
    if not inp.forced_enabled:
        return m, ck
    if inp.forced is None or not len(inp.forced["objectId"]):
        return m, ck  # required metrics become missing
    T = inp.truth
    j = match_truth(inp)
    lcs = light_curves(inp.forced)
    star = (T["kind"] == "star") & (j >= 0)
    variable = np.asarray(T["is_variable"], bool)
    u = unit_vectors(T["ra_t"], T["dec_t"])
    nn, _ = cKDTree(u).query(u, k=2)
    iso = nn[:, 1] > chord(ISOLATION_FWHM * inp.fwhm_arcsec)
    var_ratio, var_rec, var_pow = [], [], []
    const_chi, const_dof = [], []
    for i in np.flatnonzero(star):
        lc = lcs.get(int(inp.obj["objectId"][j[i]]))
        if not lc:
            continue
        chi2 = 0.0
        dof = 0
        lam = 0.0
        snrs = []
        for b, (fl, fe, t) in lc.items():
            if len(fl) < 2 or f"{b}_flux" not in T:
                continue
            ftrue = float(T[f"{b}_flux"][i])
            chi2 += _chi2(fl, fe)
            dof += len(fl) - 1
            snrs.append(ftrue / fe)
            if variable[i]:
                ph = 2 * np.pi * (t - T["ref_epoch_mjd"][i]) / T["var_period_d"][i] + T["var_phase"][i]
                lam += _chi2(ftrue * 10 ** (-0.4 * T["var_amp_mag"][i] * np.sin(ph)), fe)
        if dof == 0:
            continue
        snr_med = float(np.median(np.concatenate(snrs)))
        crit = stats.chi2.isf(VAR_ALPHA, dof)
        if variable[i]:
            var_ratio.append(float(T["var_amp_mag"][i]) / (1.0857 / snr_med) if snr_med > 0 else 0.0)
            var_rec.append(chi2 > crit)
            var_pow.append(float(stats.ncx2.sf(crit, dof, lam)) if lam > 0 else VAR_ALPHA)
        elif iso[i] and CONST_SNR[0] <= snr_med <= CONST_SNR[1]:
            const_chi.append(chi2 / dof)
            const_dof.append(dof)
    vr, rec, pw = np.asarray(var_ratio), np.asarray(var_rec, bool), np.asarray(var_pow)
    snr_best = np.max(np.vstack([inp.snr[b] for b in inp.bands]), axis=0)
    n_var_truth = int(np.sum((T["kind"] == "star") & variable & inp.inner & (snr_best > 10)))
    m["forced_variable_n_truth"] = n_var_truth

    def rec_check(sel: np.ndarray, name: str, min_n: int) -> None:
        n = int(sel.sum())
        m[name + "_n"] = n
        if n == 0:
            if min_n == 0:
                return
            m[name] = float("nan")
            # empty because the sky holds too few variable stars to fill the bins (the count is from the
            # truth alone): insufficient; with enough of them an empty bin is the pipeline's (missing)
            ck[name] = C.check(float("nan"), ">=", 0.0, insufficient=n_var_truth < VAR_MIN_STARS * len(C.VAR_BINS),
                               note=f"no variable star in this bin; the truth holds {n_var_truth} variable stars "
                                    "inner and at expected coadd S/N > 10")
            return
        p = pw[sel]
        expected = float(p.mean())
        bound = expected - K_SIGMA * math.sqrt(float(np.sum(p * (1 - p)))) / n
        m[name] = float(rec[sel].mean())
        m[name + "_expected"] = expected
        ck[name] = C.check(m[name], ">=", bound, insufficient=n < min_n,
                           note=f"{int(rec[sel].sum())}/{n} recovered; chi2-test power {expected:.2f} at "
                                f"false-positive rate {VAR_ALPHA:g}")

    for lo, hi in C.VAR_BINS:
        rec_check((vr >= lo) & (vr < hi), C.var_name(lo, hi), VAR_MIN_STARS)
    rec_check(vr >= C.VAR_BINS[0][0], "forced_variable_recovered_fraction", 1)
    m["forced_variable_n"] = int(len(vr))
    chi = np.asarray(const_chi)
    m["forced_constant_n"] = int(len(chi))
    if len(chi):
        med, lo, hi = chi2_median_bound(np.asarray(const_dof))
        m["forced_constant_chi2_dof_median"] = float(np.median(chi))
        m["forced_constant_chi2_dof_expected"] = med
        dofs = np.asarray(const_dof, float)
        m["forced_constant_false_positive_rate"] = float(np.mean(chi * dofs > stats.chi2.isf(VAR_ALPHA, dofs)))
        ck["forced_constant_chi2_dof_median"] = C.check(
            m["forced_constant_chi2_dof_median"], "in", (lo, hi),
            note=f"n={len(chi)}, dof median {np.median(dofs):g}; expected median {med:.3f}")
        # with correct errors the chi2 test rejects alpha of the constant stars: binomial bound
        fp_bound = VAR_ALPHA + 3.0 * math.sqrt(VAR_ALPHA * (1.0 - VAR_ALPHA) / len(chi))
        n_fp = int(round(m["forced_constant_false_positive_rate"] * len(chi)))
        ck["forced_constant_false_positive_rate"] = C.check(
            m["forced_constant_false_positive_rate"], "<=", fp_bound,
            note=f"{n_fp}/{len(chi)} constant stars rejected at alpha {VAR_ALPHA:g} (+3 binomial errors)")
    return m, ck


def object_metrics(repo: Repository, run: str) -> dict[str, Any] | None:
    """Object and forced metrics of a run as one dict (checks under ``"checks"``), or None without objects."""
    inp = load_objects(repo, run)
    if inp is None:
        return None
    m, ck = score_objects(inp)
    fm, fck = score_forced(inp)
    return {**m, **fm, "checks": {**ck, **fck}}
