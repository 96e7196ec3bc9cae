"""Warps (visit x patch) and coadds (patch x band); LSE-163 5.2 step 3.

``warp``: every calexp of a visit that overlaps a patch is resampled onto the
patch's outer box of the tract grid (Lanczos-3 through a coarse-grid mapping,
kernels in algorithms/resample.py), scaled to nJy with the visit's calibration
(relative calibration when the campaign runs it), detectors side by side.

``coadd``: the warps of a band are stacked (inverse-variance weights per warp,
PSF-matched outlier rejection: algorithms/stack.py); the coadd's PSF model is
fitted on the coadd's own stars, like a single frame's.  Kinds (section 5.4.3):
``deep`` (all visits), ``best_seeing`` (best quartile of seeing), ``period``
(one per calendar year); each kind is its own dataset type.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace

import numpy as np
from astropy.wcs import WCS

from ..algorithms import masks
from ..algorithms.detect import detect_sources
from ..algorithms.apcorr import CALSTARS_COLUMNS
from ..algorithms.psf import PsfModel, candidates_fwhm, fit_psf, psf_stamp_size, select_psf_candidates
from ..algorithms.resample import PixelMapping, warp_exposure, warp_psf
from ..algorithms.stack import (CoaddPsfInput, WarpInput, coadd_psf, pack_psf_inputs, psf_input_box,
                                select_best_seeing, stack_warps, unpack_psf_inputs)
from ..camera import Camera, nominal_wcs_header
from ..config.stages import CoaddConfig, WarpConfig
from ..errors import AlgorithmError, NoWorkFound
from ..repo import DataId
from ..repo.formats import Exposure, read_columns, read_exposure, write_exposure
from .base import QuantumContext, QuantumSpec, Resources, Stage
from .single_frame import apcorr_stars
from .common import (box_wcs_header, calexp_apcorr, calibrated_wcs, relcal_astrometric_corrections, relcal_zero_point,
                     relcal_zero_points, wcs_from_header)

COADD_TYPES = {"deep": "coadd", "best_seeing": "coadd_bestSeeing"}
POINTING_MARGIN_PIX = 200  # nominal detector footprints are grown by this much when planning


def detector_patches(ctx, visit: dict, detector_id: int) -> list[tuple[int, int]]:
    """(tract, patch) pairs a detector of a visit may overlap (nominal pointing, grown by a margin)."""
    camera: Camera = ctx.camera
    det = camera.detector(detector_id)
    w = WCS(nominal_wcs_header(camera, det, visit["ra"], visit["dec"], visit["rotation"]))
    m = POINTING_MARGIN_PIX
    xs = np.array([-m, det.nx - 1 + m, det.nx - 1 + m, -m], float)
    ys = np.array([-m, -m, det.ny - 1 + m, det.ny - 1 + m], float)
    ra, dec = w.wcs_pix2world(xs, ys, 0)
    pairs = ctx.skymap.overlapping(ra, dec)
    tracts = ctx.campaign.config.tracts
    return [p for p in pairs if tracts == "auto" or p[0] in tracts]


#: node spacing (patch pixels) of the coadd -> calexp mappings a warp stores for the coadd PSF: the PSF
#: needs the local Jacobian and the input's edge, not the warp's 0.01-pixel positions
PSF_MAP_STEP = 64
#: ... over the detector's footprint grown by this much: the objects stage's PSF lattice nodes (objects.
#: psf_grid_pixels, <= this) just outside an input's data are evaluated where they are
PSF_MAP_MARGIN = 128
#: Source columns a warp reads to carry its visit's calibration stars to the coadd
CALSTAR_SOURCE_COLUMNS = ("x", "y", "psfFlux_instFlux", "psfFlux_instFluxErr", "psfFlux_apCorr", "extendedness",
                          "deblend_nChild", "parentSourceId", "blendedness_abs", "psfFlux_flag", "pixelFlags_saturated",
                          "pixelFlags_edge", "pixelFlags_crCenter", "pixelFlags_interpolatedCenter")
#: a warp's CALSTARS rows: the coadd adds each input's weight and index (CALSTARS_COLUMNS)
WARP_CALSTARS_COLUMNS = CALSTARS_COLUMNS[:4]


def _calibration_stars(src: dict[str, np.ndarray], njy_per_e: float, src_wcs, dst_wcs,
                       outer: tuple[int, int, int, int], footprint: np.ndarray, min_snr: float = 5.0) -> np.ndarray:
    """Rows ``WARP_CALSTARS_COLUMNS``: x, y (the patch's outer-box pixels), calibrated PSF flux and its
    error (nJy: the single-frame aperture correction and this warp's zero point, as forced photometry has
    them) of the calexp's isolated, unsaturated point sources that land on the warp, selected as
    single_frame's :func:`~lsst_prod.stages.single_frame.apcorr_stars` selects its aperture-correction
    stars, down to S/N ``min_snr`` (the objects stage picks its stars by their COADD S/N, > 50, so a
    star's epochs are not selected on their own, upward-scattered fluxes)."""
    view = {**src, "psfFlux": src["psfFlux_instFlux"], "psfFluxErr": src["psfFlux_instFluxErr"],
            "parent_index": np.where(src["parentSourceId"] == 0, -1, 0)}
    sel = apcorr_stars(view, min_snr=min_snr) & np.isfinite(src["psfFlux_apCorr"])
    if not sel.any():
        return np.zeros((0, len(WARP_CALSTARS_COLUMNS)))
    ra, dec = src_wcs.all_pix2world(src["x"][sel], src["y"][sel], 0)
    tx, ty = dst_wcs.all_world2pix(ra, dec, 0)
    x, y = tx - outer[0], ty - outer[1]
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    ny, nx = footprint.shape
    inside = (ix >= 0) & (iy >= 0) & (ix < nx) & (iy < ny)
    inside[inside] = footprint[iy[inside], ix[inside]]
    scale = src["psfFlux_apCorr"][sel] * njy_per_e
    return np.column_stack([x, y, src["psfFlux_instFlux"][sel] * scale, src["psfFlux_instFluxErr"][sel] * scale])[inside]


def _mean_apcorr(exp: Exposure) -> float:
    """The calexp's single-frame aperture correction averaged over a 5 x 5 grid of the detector (NaN
    without one): the coadd's correction follows from its inputs' (``CoaddPsf.input_aperture_correction``)."""
    apc = calexp_apcorr(exp)
    if apc is None:
        return float("nan")
    ny, nx = exp.image.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    return float(np.mean(apc(gx.ravel(), gy.ravel())))


class WarpStage(Stage):
    name = "warp"
    dimensions = ("instrument", "visit", "skymap", "tract", "patch")
    input_types = ("calexp", "source", "relcal_solution")
    output_types = ("warp",)
    gather = {"calexp": 1, "source": 0}  # the visit's detectors over the patch that succeeded
    resources = Resources(cores=1, memory_gib=2.0)
    description = "resample the calexps of a visit onto a patch (nJy)"

    def plan(self, ctx, config: WarpConfig) -> list[QuantumSpec]:
        instrument, skymap = ctx.instrument, ctx.skymap.name
        relcal = ("relcal_solution", DataId(instrument=instrument))
        use_relcal = relcal in ctx.produced
        specs = []
        for v in ctx.visits:
            by_patch: dict[tuple[int, int], list[int]] = defaultdict(list)
            for det in ctx.detectors:
                cal = ("calexp", DataId(instrument=instrument, visit=v["visit"], detector=det))
                if cal not in ctx.produced:
                    continue
                for tp in detector_patches(ctx, v, det):
                    by_patch[tp].append(det)
            for (tract, patch), dets in sorted(by_patch.items()):
                did = DataId(instrument=instrument, visit=v["visit"], skymap=skymap, tract=tract, patch=patch)
                inputs = []
                for d in dets:  # each calexp (produced, or its detector would not be here) and its Source table
                    ccd = DataId(instrument=instrument, visit=v["visit"], detector=d)
                    inputs += [("calexp", ccd)] + ([("source", ccd)] if ("source", ccd) in ctx.produced else [])
                if use_relcal:
                    inputs.append(relcal)
                specs.append(QuantumSpec(self.name, did, tuple(inputs), (("warp", did),)))
        return specs

    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: WarpConfig = ctx.config  # type: ignore[assignment]
        from ..skymap import SkyMap
        from ..config.skymap import SkyMapConfig

        skymap = SkyMap(SkyMapConfig.model_validate(ctx.extra["skymap"]))
        tract, patch = int(ctx.data_id["tract"]), int(ctx.data_id["patch"])
        t = skymap.tract_info(tract)
        p = skymap.patch_info(tract, patch)
        dst_wcs = t.wcs()
        zps = relcal_zero_points(ctx)
        # relcal's astrometric corrections: each calexp is resampled from the calibrated frame (the
        # single-frame WCS plus its ccdvisit's correction), so every visit lands where the others do
        corrections = relcal_astrometric_corrections(ctx) if cfg.relcal_astrometry else {}
        ny, nx = p.outer_shape
        image = np.zeros((ny, nx), np.float32)
        variance = np.zeros((ny, nx), np.float32)
        mask = np.full((ny, nx), masks.NO_DATA, np.uint32)
        meta: dict = {}
        fwhms, n_used, n_corrected = [], 0, 0
        psf_stamp, best_valid = None, -1
        sources = {int(r.data_id["detector"]): r for r in ctx.inputs_of("source")}
        calstars, psf_inputs = [], []
        for ref in ctx.inputs_of("calexp"):
            exp = read_exposure(ctx.repo.path_of(ref))
            det = int(ref.data_id["detector"])
            try:
                zp = relcal_zero_point(ctx, zps, int(ctx.data_id["visit"]), det, float(exp.metadata["MAGZERO"]))
            except NoWorkFound as e:  # set aside by relcal: the other detectors still make the warp
                ctx.exclude("calexp", ref.data_id, str(e))
                continue
            njy_per_e = 10 ** (-0.4 * (zp - 31.4))
            src_wcs = calibrated_wcs(wcs_from_header(exp.wcs_header), corrections, int(ctx.data_id["visit"]), det)
            n_corrected += not isinstance(src_wcs, WCS)
            try:
                w = warp_exposure(exp.image, exp.variance, exp.mask, src_wcs, dst_wcs,
                                  p.outer, kernel=cfg.kernel, grid_step=cfg.grid_step, flux_scale=njy_per_e)
            except NoWorkFound:
                continue
            if det in sources:
                calstars.append(_calibration_stars(read_columns(ctx.repo.path_of(sources[det]), list(CALSTAR_SOURCE_COLUMNS)),
                                                   njy_per_e, src_wcs, dst_wcs, p.outer, w.footprint))
            take = w.footprint & ((mask & masks.NO_DATA) != 0)
            image[take] = w.image[take]
            variance[take] = w.variance[take]
            mask[take] = w.mask[take]
            n_used += 1
            fwhms.append(float(exp.metadata["PSFFWHM"]) / float(exp.metadata.get("PIXSCALE", 0.2)))
            meta = {k: exp.metadata[k] for k in ("BAND", "FILTER", "MJD-MID", "EXPTIME", "AIRMASS") if k in exp.metadata}
            if exp.psf is not None:
                psf = PsfModel.from_fits(*exp.psf)
                # the detector's PSF and its mapping from the patch: the coadd stores them for its PSF
                box = psf_input_box(src_wcs, exp.image.shape, dst_wcs, p.outer, PSF_MAP_MARGIN)
                try:
                    mapping = PixelMapping.build(src_wcs, dst_wcs, box, grid_step=PSF_MAP_STEP, max_error=0.05) \
                        if box is not None else None
                except NoWorkFound:  # a sliver of the patch
                    mapping = None
                if mapping is not None:
                    psf_inputs.append(CoaddPsfInput(psf, None, exp.image.shape, 1.0, mapping, int(ctx.data_id["visit"]),
                                                    det, _mean_apcorr(exp)))
                # this visit's PSF as it appears at the patch centre (fallback coadd PSF, see CoaddStage)
                cx, cy = (p.outer[0] + p.outer[2]) / 2.0, (p.outer[1] + p.outer[3]) / 2.0
                stamp = warp_psf(psf, src_wcs, dst_wcs, cx, cy)
                if psf_stamp is None or w.n_valid > best_valid:
                    psf_stamp, best_valid = stamp, w.n_valid
        if n_used == 0:
            raise NoWorkFound(f"no calexp of visit {ctx.data_id['visit']} overlaps tract {tract} patch {patch}")
        meta.update({"VISIT": int(ctx.data_id["visit"]), "TRACT": tract, "PATCH": patch, "NDETECT": n_used,
                     "PSFFWHMP": float(np.mean(fwhms)), "BUNIT": "nJy", "RELCAL": bool(zps),
                     "RELCALWC": int(n_corrected)})
        extra = {"PSFSTAMP": (psf_stamp.astype(np.float64), {})} if psf_stamp is not None else {}
        cs = np.concatenate(calstars) if calstars else np.zeros((0, len(WARP_CALSTARS_COLUMNS)))
        if len(cs):  # the visit's calibrated bright stars on the patch grid: the coadd's flux scale
            extra["CALSTARS"] = (cs.astype(np.float64), {"COLUMNS": ",".join(WARP_CALSTARS_COLUMNS)})
        extra.update(pack_psf_inputs(psf_inputs))  # weights 1: the coadd sets each input's
        out = Exposure(image, mask, variance, meta, box_wcs_header(dst_wcs, p.outer), extra=extra)
        ctx.put("warp", lambda path: write_exposure(path, out))
        ctx.summary.update(n_detectors=n_used, n_relcal_wcs=int(n_corrected), n_calibration_stars=int(len(cs)),
                           valid_fraction=float(((mask & masks.NO_DATA) == 0).mean()))


class CoaddStage(Stage):
    name = "coadd"
    dimensions = ("skymap", "tract", "patch", "band")
    input_types = ("warp",)
    output_types = ("coadd", "coadd_bestSeeing")
    gather = {"warp": 1}
    resources = Resources(cores=1, memory_gib=4.0)
    description = "stack warps with PSF-matched outlier rejection; coadd PSF model"

    def plan(self, ctx, config: CoaddConfig) -> list[QuantumSpec]:
        band_of = {v["visit"]: v["band"] for v in ctx.visits}
        groups: dict[tuple, list] = defaultdict(list)
        for dtype, did in ctx.produced:
            if dtype == "warp":
                groups[(did["skymap"], did["tract"], did["patch"], band_of[did["visit"]])].append(did)
        specs = []
        for (skymap, tract, patch, band), warps in sorted(groups.items()):
            did = DataId(skymap=skymap, tract=tract, patch=patch, band=band)
            outputs = tuple((COADD_TYPES[k], did) for k in config.kinds)
            specs.append(QuantumSpec(self.name, did, tuple(("warp", w) for w in sorted(warps)), outputs))
        return specs

    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: CoaddConfig = ctx.config  # type: ignore[assignment]
        warps = [read_exposure(ctx.repo.path_of(r)) for r in ctx.inputs_of("warp")]
        coverage = max((float(((w.mask & masks.NO_DATA) == 0).mean()) for w in warps), default=0.0)
        if coverage < cfg.min_coverage:
            raise NoWorkFound(f"patch {ctx.data_id} is covered at most {coverage:.1%} by any visit "
                              f"(min_coverage {cfg.min_coverage:.0%})")
        fwhm = np.array([float(w.metadata["PSFFWHMP"]) for w in warps])
        selections = {"deep": np.arange(len(warps))}
        if "best_seeing" in cfg.kinds:
            selections["best_seeing"] = select_best_seeing(fwhm, cfg.best_seeing_quantile)
        wcs_header = warps[0].wcs_header
        for kind in cfg.kinds:
            chosen = [warps[i] for i in selections[kind]]
            if len(chosen) == 0:
                continue
            inputs = [WarpInput(w.image, w.variance, w.mask, float(w.metadata["PSFFWHMP"])) for w in chosen]
            co = stack_warps(inputs, clip_nsigma=cfg.clip_nsigma if len(inputs) >= 3 else None,
                             clip_scale_tolerance=cfg.clip_scale_tolerance)
            image = np.nan_to_num(co.image.astype(np.float32))
            variance = np.where(np.isfinite(co.variance), co.variance, 0).astype(np.float32)
            cmask = co.mask.astype(np.uint32)
            stamps = [w.extra["PSFSTAMP"][0] for w in chosen if "PSFSTAMP" in w.extra]
            fallback = (coadd_psf(stamps, co.weights[: len(stamps)]) if len(stamps) == len(chosen)
                        and np.any(co.weights > 0) else None)
            psf = _coadd_psf(image, variance, cmask, cfg, fallback)
            meta = {"TRACT": int(ctx.data_id["tract"]), "PATCH": int(ctx.data_id["patch"]),
                    "BAND": ctx.data_id["band"], "KIND": kind, "NINPUTS": len(chosen), "BUNIT": "nJy",
                    "VISITS": json.dumps(sorted(int(w.metadata["VISIT"]) for w in chosen)),
                    "MJDMIN": min(float(w.metadata.get("MJD-MID", 0)) for w in chosen),
                    "MJDMAX": max(float(w.metadata.get("MJD-MID", 0)) for w in chosen),
                    "PSFFWHMP": float(psf.fwhm_at(*(np.array(image.shape[::-1]) / 2))),
                    "CLIPFRAC": float(np.mean(co.clipped_fraction)) if np.size(co.clipped_fraction) else 0.0}
            calstars = _coadd_calstars(chosen, co.weights)
            extra = {"CALSTARS": (calstars, {"COLUMNS": ",".join(CALSTARS_COLUMNS)})} if len(calstars) else {}
            meta["NCALSTAR"] = int(len(calstars))
            psf_inputs = _coadd_psf_inputs(chosen, co.weights)
            extra.update(pack_psf_inputs(psf_inputs))
            meta["NPSFIN"] = len(psf_inputs)
            exp = Exposure(image, cmask, variance, meta, wcs_header, psf.to_fits(), extra)
            ctx.put(COADD_TYPES[kind], lambda path, exp=exp: write_exposure(path, exp))
            if kind == "deep":
                ctx.summary.update(n_inputs=len(chosen), psf_fwhm_pix=meta["PSFFWHMP"],
                                   clipped_fraction=meta["CLIPFRAC"], n_psf_stars=int(psf.n_stars))


def _coadd_calstars(warps, weights: np.ndarray) -> np.ndarray:
    """The inputs' calibration stars (each warp's CALSTARS) with the input's coadd weight and index:
    rows ``CALSTARS_COLUMNS``, for the objects stage's aperture correction
    (:func:`~lsst_prod.algorithms.apcorr.input_reference_fluxes`)."""
    rows = []
    for i, (w, wt) in enumerate(zip(warps, weights)):
        if "CALSTARS" in w.extra and wt > 0:
            cs = np.asarray(w.extra["CALSTARS"][0], np.float64).reshape(-1, len(WARP_CALSTARS_COLUMNS))
            rows.append(np.column_stack([cs, np.full(len(cs), float(wt)), np.full(len(cs), float(i))]))
    return np.concatenate(rows) if rows else np.zeros((0, len(CALSTARS_COLUMNS)))


def _coadd_psf_inputs(warps, weights: np.ndarray) -> list[CoaddPsfInput]:
    """The input detectors of the coadd with their PSF, mapping and the coadd weight of their visit
    (what ``algorithms.stack.CoaddPsf`` sums); none when a warp does not carry them (written before
    warps stored their inputs): a partial list would be a wrong PSF."""
    out = []
    for w, wt in zip(warps, weights):
        got = unpack_psf_inputs(w.extra)
        if not got:
            return []
        out += [replace(g, weight=float(wt)) for g in got] if wt > 0 else []
    return out


def _coadd_psf(image, variance, mask, cfg: CoaddConfig, fallback: np.ndarray | None = None) -> PsfModel:
    """The coadd's PSF, fitted (PSFEx-like) on its own bright isolated stars; with too few stars (a
    thinly covered patch), the weighted sum of the inputs' PSFs at the patch centre (constant)."""
    sigma0 = 1.0 / 0.2 / 2.3548
    work_mask = mask.copy()
    fp = detect_sources(image, variance, work_mask, sigma0, threshold=20.0)
    cand = select_psf_candidates(image, variance, work_mask, fp)
    fwhm = candidates_fwhm(cand)  # the coadd's seeing, from its PSF candidates (stamps follow it)
    if np.isfinite(fwhm) and psf_stamp_size(fwhm, per_fwhm=3.0) > 25:
        cand = select_psf_candidates(image, variance, work_mask, fp, stamp_size=psf_stamp_size(fwhm, per_fwhm=3.0))
    if cfg.psf_stamp_pixels != "auto":
        stamp = int(cfg.psf_stamp_pixels)
    elif np.isfinite(fwhm):
        stamp = psf_stamp_size(fwhm)
    else:
        stamp = fallback.shape[0] if fallback is not None else psf_stamp_size(0.0)
    try:
        return fit_psf(image, variance, work_mask, cand.x, cand.y, image.shape, stamp_size=stamp,
                       spatial_order=cfg.psf_spatial_order, min_stars=cfg.psf_min_stars, labels=fp.labels,
                       min_stars_per_term=cfg.psf_min_stars_per_term)
    except AlgorithmError as exc:
        if fallback is None:
            raise AlgorithmError(f"coadd PSF: {exc}", **getattr(exc, "metadata", {})) from None
        stamp = np.asarray(fallback, np.float64)
        return PsfModel(stamp[None, :, :] / stamp.sum(), 0, tuple(image.shape), 0, 0, float("nan"), float("nan"))
