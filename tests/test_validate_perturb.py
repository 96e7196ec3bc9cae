"""Each validation metric fails when the outputs are perturbed.

One tiny-survey run of the whole chain per session (single_frame, relcal, warp, coadd, objects,
forced); its outputs are loaded once and perturbed in memory before being passed to the pure
scoring functions, plus one perturbation on disk through ``lsst-prod validate --strict``.  Object
metrics are also scored on a "perfect pipeline" catalogue made from truth (every object found, at its
true position and flux): it must pass, and fail once its close pairs are merged or detections dropped.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _helpers import write_campaign
from lsst_prod.cli import main
from lsst_prod.repo import Repository
from lsst_prod.validate import checks as C
from lsst_prod.validate.matching import chord, unit_vectors
from lsst_prod.validate.objects import load_objects, match_truth, score_forced, score_objects
from lsst_prod.validate.single_frame import load_single_frame, score_single_frame

pytestmark = pytest.mark.slow
RUN = "chain/1"


@pytest.fixture(scope="session")
def chain_run(tmp_path_factory, simulated):
    base = tmp_path_factory.mktemp("chain")
    shutil.copytree(simulated, base / "repo")
    campaign = write_campaign(base)
    campaign.write_text(campaign.read_text().replace(
        "  single_frame: {}\n",
        "  single_frame: {}\n  relcal: {mpi_ranks: 1, astrometry_order: 3}\n  warp: {}\n"
        "  coadd: {kinds: [deep, best_seeing]}\n  objects: {}\n  forced: {}\n"))
    assert main(["submit", str(campaign), "--run", RUN, "--no-progress"]) == 0
    return base / "repo"


@pytest.fixture(scope="session")
def loaded(chain_run):
    repo = Repository.open(chain_run)
    ccds, objs = load_single_frame(repo, RUN), load_objects(repo, RUN)
    repo.close()
    return ccds, objs


def _status(checks, name):
    return checks[name]["status"]


def _fails(before, after, name, direction):
    """``name`` fails after the perturbation and its value moved the expected way (+1 up, -1 down).
    The baseline may fail too on the tiny survey (its status is in the message): the point is that
    the perturbation alone makes the metric fail."""
    b, a = before[name], after[name]
    assert a["status"] == "fail", (name, b, a)
    assert direction * (a["value"] - b["value"]) > 0, (name, b, a)


# ------------------------------------------------------------------------------------ single frame
def _with_reserved(ccds):
    """A synthetic held-out flag (every 5th in-fit star) where the pipeline has none yet."""
    out = []
    for c in ccds:
        if "calib_astrometry_reserved" in c.src:
            out.append(c)
            continue
        used = np.asarray(c.src["calib_astrometry_used"], bool)
        res = np.zeros(len(used), bool)
        res[np.flatnonzero(used)[::5]] = True
        out.append(c.with_src(calib_astrometry_reserved=res))
    return out


def test_single_frame_baseline_then_shifted_positions(loaded):
    ccds = _with_reserved(loaded[0])
    m, ck = score_single_frame(ccds)
    names = ("astrometry_rms_mas", "astrometry_reserved_rms_mas", "astrometry_nonref_rms_mas")
    assert all(np.isfinite(ck[n]["value"]) for n in names), {n: ck[n] for n in names}
    shifted = [c.with_src(dec=c.src["dec"] + 50 / 3.6e6) for c in ccds]  # 50 mas north
    m2, ck2 = score_single_frame(shifted)
    for n in names:
        _fails(ck, ck2, n, +1)
    assert m2["astrometry_rms_mas"] > 45


def test_missing_reserved_column_fails_strict(loaded):
    ccds = [c.with_src() for c in loaded[0]]
    for c in ccds:
        c.src.pop("calib_astrometry_reserved", None)
    _, ck = score_single_frame(ccds)
    assert _status(ck, "astrometry_reserved_rms_mas") == "missing" and not C.all_pass(ck)


def test_scaled_fluxes_and_zero_points_fail(loaded):
    ccds = loaded[0]
    _, ck = score_single_frame(ccds)
    _, ck2 = score_single_frame([c.with_src(psfFlux=c.src["psfFlux"] * 1.03) for c in ccds])
    for lo, hi in C.PULL_BINS[:3]:
        _fails(ck, ck2, f"{C.pull_prefix(lo, hi)}_mean", +1)
    from dataclasses import replace

    _, ck2 = score_single_frame([replace(c, zp_fit=c.zp_fit + 0.03) for c in ccds])
    _fails(ck, ck2, "photometry_zp_error_mmag", +1)


def test_inflated_errors_fail_pull_width(loaded):
    ccds = loaded[0]
    _, ck = score_single_frame(ccds)
    _, ck2 = score_single_frame([c.with_src(psfFluxErr=c.src["psfFluxErr"] * 1.4) for c in ccds])
    _fails(ck, ck2, "flux_pull_snr10_30_std", -1)
    _fails(ck, ck2, "flux_pull_snr30_100_std", -1)


def test_dropped_sources_fail_completeness(loaded):
    ccds = loaded[0]
    _, ck = score_single_frame(ccds)
    dropped = []
    for c in ccds:
        keep = np.arange(len(c.src["x"])) % 12 != 0  # one Source in 12
        dropped.append(c.with_src(**{k: v[keep] for k, v in c.src.items()}))
    _, ck2 = score_single_frame(dropped)
    _fails(ck, ck2, "completeness_snr10_isolated_stars", -1)


# ------------------------------------------------------------------------------------ objects
def _perfect_catalogue(inp):
    """One primary Object per truth star/galaxy with expected S/N > 5 in some band, at its true
    position, with its true fluxes and their expected errors."""
    T = inp.truth
    snr_best = np.max(np.vstack([inp.snr[b] for b in inp.bands]), axis=0)
    idx = np.flatnonzero(snr_best > 5)
    n = len(idx)
    obj = {"objectId": np.arange(1, n + 1, dtype=np.int64), "coord_ra": T["ra_t"][idx].copy(),
           "coord_dec": T["dec_t"][idx].copy(), "detect_isPrimary": np.ones(n, bool),
           "parentObjectId": np.zeros(n, np.int64), "deblend_nChild": np.zeros(n, np.int64)}
    for b in inp.bands:
        f = T[f"{b}_flux"][idx].astype(float)
        obj[f"{b}_psfFlux"] = f.copy()
        with np.errstate(divide="ignore"):
            obj[f"{b}_psfFluxErr"] = np.where(inp.snr[b][idx] > 0, f / np.maximum(inp.snr[b][idx], 1e-9), np.inf)
    return obj, idx


def _merge_close_pairs(inp, obj, idx):
    """Merge the two Objects of every true pair closer than 2 FWHM into one (flux-weighted)."""
    obj = {k: v.copy() for k, v in obj.items()}
    row = {int(t): r for r, t in enumerate(idx)}
    u = unit_vectors(inp.truth["ra_t"], inp.truth["dec_t"])
    from scipy.spatial import cKDTree

    pairs = cKDTree(u).query_pairs(chord(2 * inp.fwhm_arcsec), output_type="ndarray")
    merged = 0
    for a, b in pairs:
        ra_, rb_ = row.get(int(a)), row.get(int(b))
        if ra_ is None or rb_ is None or not (obj["detect_isPrimary"][ra_] and obj["detect_isPrimary"][rb_]):
            continue
        fa, fb = obj[f"{inp.ref_band}_psfFlux"][ra_], obj[f"{inp.ref_band}_psfFlux"][rb_]
        w = fa / (fa + fb)
        obj["coord_ra"][ra_] = w * obj["coord_ra"][ra_] + (1 - w) * obj["coord_ra"][rb_]
        obj["coord_dec"][ra_] = w * obj["coord_dec"][ra_] + (1 - w) * obj["coord_dec"][rb_]
        for band in inp.bands:
            obj[f"{band}_psfFlux"][ra_] += obj[f"{band}_psfFlux"][rb_]
        obj["detect_isPrimary"][rb_] = False
        merged += 1
    return obj, merged


def test_perfect_catalogue_passes_then_merged_children_fail(loaded):
    inp = loaded[1]
    obj, idx = _perfect_catalogue(inp)
    m, ck = score_objects(inp.with_obj(obj))
    for name in C.REQUIRED["objects"]:
        # the all-pairs median may not discriminate on this sky; the truth-made catalogue has no patches
        ok = ("pass", "insufficient") if name in ("deblend_flux_error_median",
                                                  "coadd_flux_ratio_patch_worst_excess") else ("pass",)
        assert _status(ck, name) in ok, (name, ck[name])
    assert m["deblend_resolved_fraction"] == 1.0 and m["deblend_n_pairs"] >= 5
    merged, n = _merge_close_pairs(inp, obj, idx)
    assert n >= 5
    m, ck = score_objects(inp.with_obj(merged))
    assert _status(ck, "deblend_resolved_fraction") == "fail", ck["deblend_resolved_fraction"]
    assert _status(ck, "deblend_flux_error_median_resolvable") == "fail", ck["deblend_flux_error_median_resolvable"]
    # the all-pairs median fails too, unless under half the pairs are resolvable on this sky
    # (then it cannot discriminate, and says so)
    assert _status(ck, "deblend_flux_error_median") in ("fail", "insufficient"), ck["deblend_flux_error_median"]
    if m["deblend_resolvable_fraction"] >= 0.6:
        assert _status(ck, "deblend_flux_error_median") == "fail"


def test_merging_the_pipelines_split_pairs_lowers_its_resolved_fraction(loaded):
    inp = loaded[1]
    m, _ = score_objects(inp)
    if m["deblend_n_split"] == 0:
        pytest.skip("the pipeline split no close pair on this survey")
    j = match_truth(inp)
    obj = {k: v.copy() for k, v in inp.obj.items()}
    u = unit_vectors(inp.truth["ra_t"], inp.truth["dec_t"])
    from scipy.spatial import cKDTree

    for a, b in cKDTree(u).query_pairs(chord(2 * inp.fwhm_arcsec), output_type="ndarray"):
        if j[a] >= 0 and j[b] >= 0:
            obj["detect_isPrimary"][j[b]] = False  # the second child folded into the first
    m2, ck2 = score_objects(inp.with_obj(obj))
    assert m2["deblend_resolved_fraction"] == 0.0 and _status(ck2, "deblend_resolved_fraction") == "fail"


def test_dropped_objects_fail_completeness(loaded):
    inp = loaded[1]
    obj, _ = _perfect_catalogue(inp)
    obj["detect_isPrimary"][::10] = False
    m, ck = score_objects(inp.with_obj(obj))
    assert _status(ck, "object_completeness_snr10") == "fail", m["object_completeness_snr10"]


# ------------------------------------------------------------------------------------ forced
def test_forced_baseline_then_perturbed(loaded):
    inp = loaded[1]
    m, ck = score_forced(inp)
    f = dict(inp.forced)
    from dataclasses import replace

    # errors too large by 2: constant stars' chi2/dof far below its expected median
    _, ck2 = score_forced(replace(inp, forced={**f, "psfFluxErr": f["psfFluxErr"] * 2}))
    _fails(ck, ck2, "forced_constant_chi2_dof_median", -1)
    # errors too small by 1.5
    _, ck2 = score_forced(replace(inp, forced={**f, "psfFluxErr": f["psfFluxErr"] / 1.5}))
    _fails(ck, ck2, "forced_constant_chi2_dof_median", +1)
    _fails(ck, ck2, "forced_constant_false_positive_rate", +1)
    # the tails: a tenth of the objects' errors too small by 3 (as next to a bright star whose model errors
    # they take in) fails the false-positive rate, whatever the median does
    few = np.isin(f["objectId"], np.unique(f["objectId"])[::10])
    _, ck3 = score_forced(replace(inp, forced={**f, "psfFluxErr": np.where(few, f["psfFluxErr"] / 3, f["psfFluxErr"])}))
    _fails(ck, ck3, "forced_constant_false_positive_rate", +1)
    # light curves flattened (every object's flux replaced by its mean per band): variables are lost
    flat = f["psfFlux"].copy()
    key = np.char.add(f["objectId"].astype(str), f["band"].astype(str))
    _, inv = np.unique(key, return_inverse=True)
    flat = (np.bincount(inv, flat) / np.bincount(inv))[inv]
    _, ck2 = score_forced(replace(inp, forced={**f, "psfFlux": flat}))
    _fails(ck, ck2, "forced_variable_recovered_fraction", -1)
    # no forced photometry although the stage is enabled: every forced metric is missing
    _, ck = score_forced(replace(inp, forced=None))
    req = C.require(ck, {"forced"})
    assert all(req[n]["status"] == "missing" for n in C.REQUIRED["forced"]) and not C.all_pass(req)


# ------------------------------------------------------------------------------------ end to end
def test_cli_strict_fails_on_inflated_errors_on_disk(chain_run, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = Repository.open(chain_run)
    paths = [repo.path_of(r) for r in repo.query("source", [RUN])]
    capsys.readouterr()
    main(["validate", RUN, "--repo", str(chain_run), "--json"])
    before = json.loads(capsys.readouterr().out)
    assert np.isfinite(before["checks"]["flux_pull_snr30_100_std"]["value"])
    assert "left_out" in before and set(before["enabled_stages"]) >= {"single_frame", "objects", "forced"}
    saved = {p: p.read_bytes() for p in paths}
    try:
        for p in paths:
            t = pq.read_table(p)
            i = t.schema.get_field_index("psfFluxErr")
            t = t.set_column(i, t.schema.field(i), pa.array(t.column(i).to_numpy() * 1.4))
            pq.write_table(t, p)
        assert main(["validate", RUN, "--repo", str(chain_run), "--json", "--strict"]) == 1
        after = json.loads(capsys.readouterr().out)
        _fails(before["checks"], after["checks"], "flux_pull_snr30_100_std", -1)
        assert not after["all_pass"]
    finally:
        for p, b in saved.items():
            p.write_bytes(b)


# ------------------------------------------------------------------ what the sky cannot test
def test_zero_point_bound_follows_the_reference_catalogue(loaded):
    """The zero-point bound is 10 mmag in quadrature with the refcat's own error on each detector's
    stars (from the truth): a refcat 50 mmag off widens it; a 30 mmag calibration error with an exact
    refcat fails."""
    from dataclasses import replace

    ccds = loaded[0]
    assert all(c.ref_dmag is not None for c in ccds)
    exact = [replace(c, ref_dmag=np.where(np.isfinite(c.ref_dmag), 0.0, np.nan)) for c in ccds]
    m, ck = score_single_frame(exact)
    assert m["photometry_zp_refcat_floor_mmag"] == 0.0 and ck["photometry_zp_error_mmag"]["bound"] == "<= 10"
    _, ck2 = score_single_frame([replace(c, zp_fit=c.zp_fit + 0.03) for c in exact])
    assert _status(ck2, "photometry_zp_error_mmag") == "fail"
    off = [replace(c, ref_dmag=c.ref_dmag * 0 + 0.05) for c in ccds]
    m3, ck3 = score_single_frame(off)
    assert abs(m3["photometry_zp_refcat_floor_mmag"] - 50.0) < 1e-6
    assert abs(float(ck3["photometry_zp_error_mmag"]["bound"].split()[-1]) - np.hypot(10, 50)) < 0.01


def test_provisional_zero_points_are_counted_apart_and_cannot_hide_everything(loaded):
    """A zero point flagged provisional (the median of too few stars: relcal calibrates that detector) is
    scored apart: 0.2 mag off on one ccdvisit does not fail the single-frame bound, and is reported; a
    pipeline that flagged every ccdvisit provisional has no single-frame zero point to pass with."""
    from dataclasses import replace

    ccds = loaded[0]
    m, ck = score_single_frame(ccds)
    assert m["photometry_zp_n_provisional"] == 0 and _status(ck, "photometry_zp_error_mmag") == "pass"
    bad = [replace(ccds[0], zp_fit=ccds[0].zp_fit + 0.2)] + list(ccds[1:])
    _, ck_bad = score_single_frame(bad)
    assert _status(ck_bad, "photometry_zp_error_mmag") == "fail"
    flagged = [replace(bad[0], zp_provisional=True)] + bad[1:]
    m2, ck2 = score_single_frame(flagged)
    assert _status(ck2, "photometry_zp_error_mmag") == "pass" and m2["photometry_zp_n_provisional"] == 1
    assert abs(m2["photometry_zp_provisional_error_mmag"] - 1000 * (bad[0].zp_fit - bad[0].zp_true)) < 1e-6
    assert "1 provisional" in ck2["photometry_zp_error_mmag"]["note"]
    _, ck3 = score_single_frame([replace(c, zp_provisional=True) for c in ccds])
    assert _status(ck3, "photometry_zp_error_mmag") != "pass"


def test_sparse_sky_reserved_astrometry_is_insufficient_dense_sky_missing(loaded):
    """No reserved star scored: insufficient where no detector holds 25 reference stars (from the
    truth), a failure where the sky had enough to spare."""
    ccds = []
    for c in loaded[0]:
        src = c.with_src(calib_astrometry_reserved=np.zeros(len(c.src["x"]), bool))
        ccds.append(src)
    m, ck = score_single_frame(ccds)
    dense = max(int(np.sum(c.truth["is_ref"])) for c in ccds) >= 25
    sparse = []
    for c in ccds:
        is_ref = np.zeros(len(c.truth["x"]), bool)
        is_ref[np.flatnonzero(c.truth["is_ref"])[:5]] = True
        sparse.append(type(c)(**{**c.__dict__, "truth": {**c.truth, "is_ref": is_ref}}))
    _, ck_s = score_single_frame(sparse)
    assert _status(ck_s, "astrometry_reserved_rms_mas") == "insufficient", ck_s["astrometry_reserved_rms_mas"]
    assert dense  # the test survey's detectors hold enough reference stars to spare some
    req = C.require(ck, {"single_frame"})
    assert req["astrometry_reserved_rms_mas"]["status"] == "missing" and not C.all_pass(req)


def test_sky_without_close_pairs_makes_deblending_insufficient(loaded):
    inp = loaded[1]
    from dataclasses import replace
    from scipy.spatial import cKDTree

    T = inp.truth
    u = unit_vectors(T["ra_t"], T["dec_t"])
    kind = np.asarray(T["kind"]).copy()
    for a, b in cKDTree(u).query_pairs(chord(2 * inp.fwhm_arcsec), output_type="ndarray"):
        kind[b] = "galaxy"  # no two stars closer than 2 FWHM remain
    m, ck = score_objects(replace(inp, truth={**T, "kind": kind}))
    assert m["deblend_n_pairs"] == 0
    for name in ("deblend_flux_error_median", "deblend_flux_error_median_resolvable", "deblend_resolved_fraction"):
        assert _status(ck, name) == "insufficient", ck[name]
        assert C.require(ck, {"objects"})[name]["status"] == "insufficient"
    _, ck0 = score_objects(inp)
    assert _status(ck0, "deblend_resolved_fraction") in ("pass", "fail")


def test_empty_variability_bins_insufficient_only_when_the_truth_lacks_variables(loaded):
    inp = loaded[1]
    from dataclasses import replace

    T = inp.truth
    var = np.asarray(T["is_variable"], bool)
    few = var.copy()
    few[np.flatnonzero(var)[3:]] = False  # a sky with 3 variable stars
    m, ck = score_forced(replace(inp, truth={**T, "is_variable": few}))
    assert m["forced_variable_n_truth"] <= 3
    empty = [n for lo, hi in C.VAR_BINS if m.get((n := C.var_name(lo, hi)) + "_n") == 0]
    assert empty and all(_status(ck, n) == "insufficient" for n in empty)
    # a sky rich in variables whose light curves are all lost: every bin is missing
    f = inp.forced
    j = match_truth(inp)
    var_oids = set(inp.obj["objectId"][j[var & (j >= 0)]].tolist())
    keep = ~np.isin(f["objectId"], list(var_oids))
    m2, ck2 = score_forced(replace(inp, forced={k: v[keep] for k, v in f.items()}))
    assert m2["forced_variable_n_truth"] >= 20  # the test survey has enough variables (56)
    req = C.require(ck2, {"forced"})
    assert all(req[C.var_name(lo, hi)]["status"] == "missing" for lo, hi in C.VAR_BINS)


def test_one_patch_scaled_fails_the_per_patch_flux_ratio(loaded):
    """The pooled coadd flux ratio can hide opposite scale errors of two patches: with every patch-band
    brought to a median ratio of 1 the per-patch check passes; one patch-band 2 % bright fails it."""
    inp = loaded[1]
    m, _ = score_objects(inp)
    groups = m["coadd_flux_ratio_per_patch"]
    assert groups, "the test survey has a patch-band with >= 30 bright stars"
    obj = {k: v.copy() for k, v in inp.obj.items()}
    for g in groups:
        rows = (obj["tract"] == g["tract"]) & (obj["patch"] == g["patch"])
        obj[f"{g['band']}_psfFlux"][rows] /= g["median"]
    m1, ck1 = score_objects(inp.with_obj(obj))
    assert _status(ck1, "coadd_flux_ratio_patch_worst_excess") == "pass", ck1["coadd_flux_ratio_patch_worst_excess"]
    g = groups[0]
    rows = (obj["tract"] == g["tract"]) & (obj["patch"] == g["patch"])
    obj[f"{g['band']}_psfFlux"][rows] *= 1.02
    m2, ck2 = score_objects(inp.with_obj(obj))
    assert _status(ck2, "coadd_flux_ratio_patch_worst_excess") == "fail", ck2["coadd_flux_ratio_patch_worst_excess"]
    assert m2["coadd_flux_ratio_patch_worst_excess"] > m1["coadd_flux_ratio_patch_worst_excess"]
