"""Objects on coadds (LSE-163 5.2 steps 4-5) and forced photometry on visits (step 7).

``objects`` (per patch): detection on each band's deep coadd, peaks merged
across bands into one footprint list, blended footprints deblended into
children with a model shared across bands (algorithms/deblend.py), every
object measured in every band (centroid, moments, apertures, Kron, PSF flux
aperture-corrected to total, extendedness), release-unique objectIds, and
``detect_isPrimary`` for children/isolated objects in the patch's and the
tract's inner regions (no duplicates across overlaps).  Object table columns
follow DP1 (``<band>_psfFlux`` ...; nJy, degrees).

``forced`` (per visit x detector): PSF fluxes at every primary object's position
on the calexp (positions propagated with the object's motion when known),
fitted simultaneously for overlapping objects -> ForcedSource rows.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from ..algorithms.background import background_without_sources
from ..algorithms.deblend import deblend_footprints
from ..algorithms.masks import DETECTED, UNUSABLE
from ..algorithms.detect import detect_sources
from ..algorithms.footprints import Footprints
from ..algorithms.forced import forced_psf_photometry, match_objects_to_stars, propagate_object_positions
from ..algorithms.kron import kron_photometry
from ..algorithms.measure import measure_sources
from ..algorithms.merge import merge_detections, split_merged
from ..algorithms.apcorr import apcorr_measure_radius
from ..algorithms.psf import PsfModel, apcorr_radius
from ..algorithms.stack import CoaddPsf, unpack_psf_inputs
from ..config.stages import ForcedConfig, ObjectsConfig
from ..errors import NoWorkFound
from ..ids import ObjectIdFactory
from ..repo import DataId
from ..repo.formats import read_columns, read_exposure, table_from_columns, write_parquet
from .base import QuantumContext, QuantumSpec, Resources, Stage
from .coadd import detector_patches
from .single_frame import MAX_FOOTPRINT_PEAKS
from .common import (calexp_apcorr, calibrated_wcs, diffraction_pixels, fit_apcorr_clean, fit_apcorr_from_inputs, relcal_astrometric_corrections,
                     relcal_zero_point, relcal_zero_points, sky_annulus_for, wcs_from_header)

PEAK_SMOOTHING = 0.5  # peak-finding image: Gaussian of 0.5 sigma_PSF (docs/algorithms-objects.md)
MEASURED = ("psfFlux", "psfFluxErr", "ap12Flux", "ap12FluxErr", "ap25Flux", "ap25FluxErr", "gaussianFlux",
            "gaussianFluxErr", "extendedness", "ixx", "iyy", "ixy", "psfFlux_flag", "pixelFlags_saturatedCenter")


class ObjectsStage(Stage):
    name = "objects"
    dimensions = ("skymap", "tract", "patch")
    input_types = ("coadd",)
    output_types = ("object",)
    gather = {"coadd": 1}  # the bands whose coadd exists
    resources = Resources(cores=1, memory_gib=4.0)
    description = "coadd detection, cross-band merge, deblending, per-band measurement -> Object"

    def plan(self, ctx, config: ObjectsConfig) -> list[QuantumSpec]:
        patches: dict[tuple, list] = {}
        for dtype, did in ctx.produced:
            if dtype == "coadd":
                patches.setdefault((did["skymap"], did["tract"], did["patch"]), []).append(did)
        return [QuantumSpec(self.name, DataId(skymap=s, tract=t, patch=p), tuple(("coadd", d) for d in sorted(ds)),
                            (("object", DataId(skymap=s, tract=t, patch=p)),))
                for (s, t, p), ds in sorted(patches.items())]

    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: ObjectsConfig = ctx.config  # type: ignore[assignment]
        from ..config.skymap import SkyMapConfig
        from ..skymap import SkyMap

        coadds = {r.data_id["band"]: read_exposure(ctx.repo.path_of(r)) for r in ctx.inputs_of("coadd")}
        bands = sorted(coadds)
        if not bands:
            raise NoWorkFound(f"no coadd for {ctx.data_id} (patch barely covered)")
        skymap_config = SkyMapConfig.model_validate(ctx.extra["skymap"])
        skymap = SkyMap(skymap_config)
        pinfo = skymap.patch_info(int(ctx.data_id["tract"]), int(ctx.data_id["patch"]))
        psfs = {b: _coadd_psf_model(coadds[b], cfg, pinfo.outer) for b in bands}
        ctx.summary.update({f"{b}_psf_method": "inputs" if isinstance(psfs[b], CoaddPsf) else "stars" for b in bands})
        shape = coadds[bands[0]].image.shape
        pixel_scale = float(skymap_config.pixel_scale_arcsec)
        per_band: dict[str, Footprints] = {}
        for b in bands:
            e = coadds[b]
            m = e.mask.copy()
            cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
            # peaks on the lightly smoothed coadd, kept by their significance over the saddles
            per_band[b] = detect_sources(e.image, e.variance, m, psfs[b].sigma_at(cx, cy),
                                         threshold=cfg.detection_threshold_sigma, peak_smoothing=PEAK_SMOOTHING)
        merged = merge_detections(per_band, shape)
        if merged.footprints.n_peaks == 0:
            raise NoWorkFound(f"no detection on the coadds of {ctx.data_id}")
        # a crowded coadd's footprints percolate (one covered a whole patch with 1,042 peaks): split them
        # as single_frame does, so the deblender and the simultaneous fits see groups of <= 25 peaks
        n_before = merged.n_footprints
        merged = split_merged(merged, max(float(psfs[b].sigma_at(cx, cy)) for b in bands), MAX_FOOTPRINT_PEAKS)
        ctx.summary["n_footprints_split"] = int(merged.n_footprints - n_before)
        deb = deblend_footprints({b: coadds[b].image for b in bands}, {b: coadds[b].variance for b in bands},
                                 {b: coadds[b].mask for b in bands}, psfs, merged)
        merged = deb.merged  # peaks the deblender found in its residuals are appended: measure every child
        cat = deb.catalog
        n = len(cat["x"])
        # measurement in every band at the merged footprints/peaks (blends fitted simultaneously)
        cols: dict[str, np.ndarray] = {}
        ref_band = max(bands, key=lambda b: float(np.nanmedian(coadds[b].image[coadds[b].image > 0]))
                       if (coadds[b].image > 0).any() else 0)
        meas = {}
        detected = (merged.footprints.labels > 0).astype(np.uint32) * DETECTED
        for b in bands:
            e = coadds[b]
            # DETECTED marks every merged footprint, so local backgrounds exclude the sources' light
            fwhm = float(psfs[b].fwhm_at((shape[1] - 1) / 2, (shape[0] - 1) / 2))
            auto = cfg.apcorr_reference_radius_pixels == "auto"
            radius = apcorr_radius(fwhm) if auto else float(cfg.apcorr_reference_radius_pixels)
            image = e.image
            mb = measure_sources(image, e.variance, e.mask | detected, merged.footprints, psfs[b],
                                 sky_annulus=sky_annulus_for(radius))
            if cfg.background_without_sources:
                # The calexps' backgrounds took in the wings of their detected stars (the masked mean of the
                # pixels between footprints), so the coadd sits below zero by that light's mean: estimate the
                # coadd's level with every measured source's full-wing model removed, subtract it, measure again
                # (not the flagged: a source in or beside a patch's uncovered part has a PSF flux from the few
                # usable pixels at its stamp's edge, up to 1e18 nJy)
                leaf = (mb["deblend_nChild"] == 0) & np.isfinite(mb["psfFlux"]) & (mb["psfFlux"] > 0) & \
                    ~np.asarray(mb["psfFlux_flag"], bool)
                bg = background_without_sources(e.image, e.mask | detected, psfs[b], mb["x"][leaf], mb["y"][leaf],
                                                 mb["psfFlux"][leaf], fwhm,
                                                 diffraction=diffraction_pixels(cfg, b, pixel_scale),
                                                 mesh_size=cfg.background_mesh_pixels)
                image = (e.image - bg.image).astype(np.float32)
                mb = measure_sources(image, e.variance, e.mask | detected, merged.footprints, psfs[b],
                                     sky_annulus=sky_annulus_for(radius))
                ctx.summary[f"{b}_background_level"] = float(np.median(bg.image))
            # as in single_frame: stars measured within max(12, 4 FWHM) (a large aperture in a crowded
            # coadd carries neighbours' and confusion light), the PSF's wing beyond added from theory
            # the inputs' calibration carried over (their stars' weighted mean calibrated flux / coadd PSF flux);
            # the coadd's own apertures and a theoretical wing beyond them when too few inputs' stars match
            apc, method = None, "apertures"
            if cfg.apcorr_from_inputs and auto and "CALSTARS" in e.extra:
                apc, method = fit_apcorr_from_inputs(mb, _stars(mb), e.extra["CALSTARS"][0], shape), "inputs"
            if apc is None and cfg.apcorr_from_inputs and auto and isinstance(psfs[b], CoaddPsf):
                # too few of the inputs' stars: the correction the inputs' own corrections imply at each object
                model = _InputApcorr(psfs[b], mb)
                apc, method = (model, "inputs_model") if model.n_used else (None, "apertures")
            if apc is None:
                method = "apertures"
                apc = fit_apcorr_clean(image, e.variance, psfs[b], mb, _stars(mb), radius, robust_constant=True,
                                       fwhm=fwhm, total_flux=auto, measure_radius=apcorr_measure_radius(fwhm),
                                       diffraction=diffraction_pixels(cfg, b, pixel_scale) if auto else (0.0, 0.0),
                                       usable=(e.mask & UNUSABLE) == 0 if cfg.apcorr_full_wing_background else None)
            ac = apc(mb["x"], mb["y"])
            # in provenance: the per-patch flux scale hangs on these (docs/algorithms-coadd.md)
            ctx.summary.update({f"{b}_apcorr": float(np.median(ac)), f"{b}_apcorr_n_stars": int(apc.n_used),
                                f"{b}_apcorr_method": method, f"{b}_apcorr_error": float(apc.error),
                                f"{b}_apcorr_total_factor": float(apc.total_factor),
                                f"{b}_apcorr_rms": float(apc.rms), f"{b}_psf_fwhm_pix": fwhm})
            mb["psfFlux"] = mb["psfFlux"] * ac
            mb["psfFluxErr"] = mb["psfFluxErr"] * ac
            kr, kf, kfe, kflags = kron_photometry(image, e.variance, e.mask, mb["x"], mb["y"], mb["ixx"], mb["iyy"],
                                                  mb["ixy"])
            mb["kronRad"], mb["kronFlux"], mb["kronFluxErr"] = kr, kf, kfe
            mb["kronFlux_flag"] = kflags["kronFlux_flag"]
            meas[b] = mb
        # align measurement rows (peaks + parents) with deblender rows through (footprint, peak)
        rows_m = {b: {(int(f), int(p)): i for i, (f, p) in enumerate(zip(meas[b]["footprint_index"],
                                                                           meas[b]["peak_index"]))} for b in bands}
        ids = ObjectIdFactory(ctx.release_id, int(ctx.data_id["tract"]), int(ctx.data_id["patch"])).make(n)
        parent = np.asarray(cat["parent_index"])
        cols["objectId"] = ids
        cols["parentObjectId"] = np.where(parent >= 0, ids[np.clip(parent, 0, None)], 0).astype(np.int64)
        cols["deblend_nChild"] = np.asarray(cat["deblend_nChild"])
        for flag in ("deblend_skipped", "deblend_tooManyPeaks", "deblend_parentTooBig", "deblend_masked",
                     "deblend_failed", "deblend_residualPeak"):
            if flag in cat:
                cols[flag] = np.asarray(cat[flag], bool)
        # centroid: the deblender's for children, else the reference band's measurement
        mref = np.array([rows_m[ref_band].get((int(f), int(p)), -1) for f, p in zip(cat["footprint_index"],
                                                                                     cat["peak_index"])])
        cols["x"], cols["y"] = np.asarray(cat["x"], float).copy(), np.asarray(cat["y"], float).copy()
        fill = ~np.isfinite(cols["x"]) & (mref >= 0)
        cols["x"][fill] = meas[ref_band]["x"][mref[fill]]
        cols["y"][fill] = meas[ref_band]["y"][mref[fill]]
        wcs = wcs_from_header(coadds[bands[0]].wcs_header)
        ra, dec = wcs.all_pix2world(cols["x"], cols["y"], 0)
        cols["coord_ra"], cols["coord_dec"] = ra, dec
        cols["tract"] = np.full(n, int(ctx.data_id["tract"]), np.int32)
        cols["patch"] = np.full(n, int(ctx.data_id["patch"]), np.int32)
        for b in bands:
            mrow = np.array([rows_m[b].get((int(f), int(p)), -1) for f, p in zip(cat["footprint_index"],
                                                                                  cat["peak_index"])])
            ok = mrow >= 0
            for name in MEASURED + ("kronFlux", "kronFluxErr", "kronRad", "kronFlux_flag"):
                src = meas[b][name]
                fill = np.zeros(n, bool) if src.dtype == bool else np.full(n, np.nan)
                fill[ok] = src[mrow[ok]]
                cols[f"{b}_{name}"] = fill
            cols[f"{b}_deblendFlux"] = np.asarray(cat.get(f"{b}_flux", np.full(n, np.nan)), float)
        cols["refBand"] = np.full(n, ref_band)
        cols["refExtendedness"] = cols[f"{ref_band}_extendedness"]
        # primary: leaves (children or isolated) in the patch inner region and the tract inner region
        t = skymap.tract_info(int(ctx.data_id["tract"]))
        xt, yt = cols["x"] + pinfo.outer[0], cols["y"] + pinfo.outer[1]
        inner_patch = (xt >= pinfo.inner[0] - 0.5) & (xt < pinfo.inner[2] - 0.5) & (yt >= pinfo.inner[1] - 0.5) & \
            (yt < pinfo.inner[3] - 0.5)
        cols["detect_isPatchInner"] = inner_patch
        cols["detect_isTractInner"] = t.contains_inner(ra, dec)
        # a leaf is primary: a deblended child, an isolated object, or a parent the deblender skipped
        # (it has no children, so it stands for its sources)
        cols["detect_isPrimary"] = inner_patch & cols["detect_isTractInner"] & (cols["deblend_nChild"] == 0)
        units = {"coord_ra": "deg", "coord_dec": "deg", "x": "pixel", "y": "pixel",
                 **{f"{b}_{q}": "nJy" for b in bands for q in ("psfFlux", "psfFluxErr", "ap12Flux", "ap12FluxErr",
                                                                  "ap25Flux", "ap25FluxErr", "gaussianFlux",
                                                                  "gaussianFluxErr", "kronFlux", "kronFluxErr",
                                                                  "deblendFlux")}}
        meta = {"release_id": ctx.release_id, "bands": bands, "deblender": {
            "method": deb.config.get("method") if isinstance(deb.config, dict) else str(deb.config),
            "config": deb.config if isinstance(deb.config, dict) else {}}}
        table = table_from_columns(cols, units, meta)
        ctx.put("object", lambda path: write_parquet(path, table))
        ctx.summary.update(n_objects=int(n), n_primary=int(cols["detect_isPrimary"].sum()),
                           n_blends=int((cols["deblend_nChild"] > 0).sum()))


def _coadd_psf_model(coadd, cfg: ObjectsConfig, outer: tuple[int, int, int, int]):
    """The PSF the objects stage measures a coadd with: the sum of the input detectors' PSFs the coadd
    stores (``algorithms.stack.CoaddPsf``; its star-fitted model where no input has data), or that
    star-fitted model when ``psf_from_inputs`` is off or the coadd stores no inputs."""
    star_fit = PsfModel.from_fits(*coadd.psf)
    inputs = unpack_psf_inputs(coadd.extra) if cfg.psf_from_inputs else []
    if not inputs:
        return star_fit
    # stamps as large as the star fit's (they follow the coadd's seeing, as single_frame's follow a calexp's),
    # not the worst input's: the deblender and the fits cost as the stamp's area
    return CoaddPsf(inputs, None, outer, stamp_size=star_fit.stamp_size, grid_spacing=cfg.psf_grid_pixels,
                    fallback=star_fit)


class _InputApcorr:
    """The aperture correction a coadd's inputs imply (``CoaddPsf.input_aperture_correction``) with the
    attributes the objects stage reports: ``n_used`` the measured rows where every covering input has its
    correction (0: none usable; it needs no star), ``rms`` and ``error`` the correction's relative spread
    over them (the model's own error is not known: on dp-mini it agrees with the correction from the
    inputs' stars to 0.1 %, docs/algorithms-coadd.md)."""

    total_factor = 1.0

    def __init__(self, psf: CoaddPsf, cols: dict[str, np.ndarray]) -> None:
        self.psf, self._xy = psf, (cols["x"], cols["y"])
        self._rows = psf.input_aperture_correction(cols["x"], cols["y"])
        at = self._rows[np.isfinite(self._rows)]
        self.n_used = int(at.size)
        self.value = float(np.median(at)) if at.size else float("nan")
        self.rms = float(np.std(at) / self.value) if at.size else float("nan")
        self.error = self.rms

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """At (x, y); the rows it was made from are not evaluated again."""
        same = np.array_equal(x, self._xy[0], equal_nan=True) and np.array_equal(y, self._xy[1], equal_nan=True)
        v = self._rows if same else self.psf.input_aperture_correction(x, y)
        return np.where(np.isfinite(v), v, self.value)


def _stars(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Bright, isolated, point-like rows for the coadd aperture correction."""
    snr = cols["psfFlux"] / cols["psfFluxErr"]
    return (snr > 50) & (cols["extendedness"] == 0) & ~cols["pixelFlags_saturatedCenter"] & \
        (cols["deblend_nChild"] == 0) & (cols["parent_index"] < 0)


class ForcedStage(Stage):
    name = "forced"
    dimensions = ("instrument", "visit", "detector")
    input_types = ("calexp", "object", "relcal_solution", "relcal_stars")
    output_types = ("forcedSource",)
    gather = {"object": 1}  # the patches over the detector whose objects exist
    resources = Resources(cores=1, memory_gib=2.0)
    description = ("PSF photometry at every object's position on every calexp (stars of relcal's astrometric "
                   "solution: at their position at the calexp's epoch) -> ForcedSource")

    def plan(self, ctx, config: ForcedConfig) -> list[QuantumSpec]:
        instrument = ctx.instrument
        objects = {(d["tract"], d["patch"]): d for t, d in ctx.produced if t == "object"}
        relcal = [(t, DataId(instrument=instrument)) for t in ("relcal_solution", "relcal_stars")]
        specs = []
        for v in ctx.visits:
            for det in ctx.detectors:
                did = DataId(instrument=instrument, visit=v["visit"], detector=det)
                if ("calexp", did) not in ctx.produced:
                    continue
                obj = [objects[tp] for tp in detector_patches(ctx, v, det) if tp in objects]
                if not obj:
                    continue
                inputs = [("calexp", did)] + [("object", o) for o in obj]
                inputs += [r for r in relcal if r in ctx.produced]
                specs.append(QuantumSpec(self.name, did, tuple(inputs), (("forcedSource", did),)))
        return specs

    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: ForcedConfig = ctx.config  # type: ignore[assignment]
        exp = read_exposure(ctx.repo.path_of(ctx.input_ref("calexp")))
        visit, detector = int(ctx.data_id["visit"]), int(ctx.data_id["detector"])
        zp = relcal_zero_point(ctx, relcal_zero_points(ctx), visit, detector, float(exp.metadata["MAGZERO"]))
        calib = 10 ** (-0.4 * (zp - 31.4))
        mjd = float(exp.metadata["MJD-MID"])
        wcs: WCS = wcs_from_header(exp.wcs_header)
        stars = _relcal_stars(ctx)
        if stars is None and ctx.log is not None:
            ctx.log.warning("[%s] no relcal_stars input: every object is measured at its coadd position "
                            "(moving stars are not followed)", ctx.data_id)
        from ..config.skymap import SkyMapConfig

        pix_arcsec = float(SkyMapConfig(**ctx.extra["skymap"]).pixel_scale_arcsec) if "skymap" in ctx.extra \
            else float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
        ids, ras, decs, star_of, epochs = [], [], [], [], {}
        for ref in ctx.inputs_of("object"):
            t = read_columns(ctx.repo.path_of(ref), _forced_object_columns(ctx.repo.path_of(ref)))
            prim = np.asarray(t["detect_isPrimary"], bool)
            ids.append(t["objectId"][prim])
            ras.append(t["coord_ra"][prim])
            decs.append(t["coord_dec"][prim])
            star = np.full(int(prim.sum()), -1, np.int64)
            if stars is not None and len(stars["ra"]):
                point = np.flatnonzero(prim & (np.asarray(t.get("refExtendedness", np.ones(len(prim))), float) < 0.5))
                err = _object_position_error_mas(t, pix_arcsec)[point]
                m = match_objects_to_stars(t["coord_ra"][point], t["coord_dec"][point], err, stars["ra"], stars["dec"],
                                           np.column_stack([stars["raErr"], stars["decErr"]]), stars["pmRa"],
                                           stars["pmDec"], np.column_stack([stars["pmRaErr"], stars["pmDecErr"]]),
                                           float(stars["epochMjd"][0]))
                pos = np.full(len(prim), -1, np.int64)
                pos[point] = m["star"]
                star = pos[prim]
                epochs[f"{ref.data_id['tract']}/{ref.data_id['patch']}"] = {
                    "epoch_offset_d": round(float(m["dt_yr"]) * 365.25, 2),
                    "epoch_offset_err_d": round(float(m["dt_err_yr"]) * 365.25, 2), "n_movers": int(m["n_movers"]),
                    "n_point_like": int(len(point)), "n_matched": int((m["star"] >= 0).sum())}
            star_of.append(star)
        ids, ras, decs, star_of = (np.concatenate(v) for v in (ids, ras, decs, star_of))
        moved = star_of >= 0
        if moved.any():  # the matched stars where they are at this exposure's epoch (relcal's frame)
            k = star_of[moved]
            ras, decs = ras.copy(), decs.copy()
            ras[moved], decs[moved] = propagate_object_positions(
                stars["ra"][k], stars["dec"][k], stars["pmRa"][k], stars["pmDec"][k], stars["parallax"][k],
                ref_mjd=float(stars["epochMjd"][0]), target_mjd=mjd)
        # Objects (made from warps resampled from relcal's calibrated frame) and the stars' tracks are in
        # that frame: relcal's correction of this ccdvisit is removed to find where their light is
        corrections = relcal_astrometric_corrections(ctx)
        corr = corrections.get((visit, detector))
        x, y = calibrated_wcs(wcs, corrections, visit, detector).all_world2pix(ras, decs, 0)
        ny, nx = exp.image.shape
        on = (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
        if not on.any():
            raise NoWorkFound(f"no object falls on visit {visit} detector {detector}")
        psf = PsfModel.from_fits(*exp.psf)
        apc = calexp_apcorr(exp)
        wings = None
        if cfg.neighbour_wings:
            fwhm = float(psf.fwhm_at((nx - 1) / 2.0, (ny - 1) / 2.0))
            calexp_scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
            wings = (fwhm, *diffraction_pixels(cfg, str(exp.metadata["BAND"]), calexp_scale))
        res = forced_psf_photometry(exp.image, exp.variance, exp.mask, psf, x[on], y[on], wings=wings,
                                    profile_error=psf.profile_error if cfg.psf_profile_error else 0.0,
                                    unmodelled_threshold=cfg.unmodelled_threshold_sigma)
        ac = apc(x[on], y[on]) if apc is not None else 1.0
        # the calibration's own uncertainty in this visit, which the fluxes of a light curve carry independently
        # from visit to visit: the aperture correction's at each position (relcal's zero-point errors are
        # marginal ones, dominated on a sparse sky by the reference catalogue's anchoring, common to every
        # visit: they would overstate it; docs/algorithms-objects.md)
        cal_frac = apc.error_at(x[on], y[on]) / ac if (cfg.calibration_errors and apc is not None) \
            else np.zeros(int(on.sum()))
        flux_out, stat_err = res["psfFlux"] * ac * calib, res["psfFluxErr"] * ac * calib
        cal_err = np.abs(flux_out) * cal_frac
        star_id = np.full(len(moved), -1, np.int64)
        if moved.any():
            star_id[moved] = stars["starId"][star_of[moved]]
        cols = {
            "objectId": ids[on], "visit": np.full(on.sum(), visit, np.int64),
            "detector": np.full(on.sum(), detector, np.int32), "band": np.full(on.sum(), exp.metadata["BAND"]),
            "coord_ra": ras[on], "coord_dec": decs[on], "x": x[on], "y": y[on],
            "psfFlux": flux_out, "psfFluxErr": np.hypot(stat_err, cal_err), "psfFluxErrCalib": cal_err,
            "psfFlux_flag": np.asarray(res["psfFlux_flag"], bool),
            "psfFlux_flag_unmodelled": np.asarray(res["psfFlux_flag_unmodelled"], bool),
            "coord_propagated": moved[on], "relcalStarId": star_id[on].astype(np.int64),
            "expMidptMJD": np.full(on.sum(), mjd),
        }
        positions = "relcal_stars" if stars is not None else "object (no relcal_stars input)"
        table = table_from_columns(cols, {"psfFlux": "nJy", "psfFluxErr": "nJy", "psfFluxErrCalib": "nJy",
                                          "coord_ra": "deg", "coord_dec": "deg", "expMidptMJD": "d"},
                                   {"release_id": ctx.release_id, "zero_point": zp, "positions": positions})
        ctx.put("forcedSource", lambda path: write_parquet(path, table))
        ctx.summary.update(n_forced=int(on.sum()), n_moved=int(moved[on].sum()), positions=positions,
                           relcal_correction_applied=corr is not None)
        if epochs:
            ctx.summary["object_epochs"] = epochs


def _forced_object_columns(path) -> list[str]:
    """The Object columns forced photometry reads (position, primary flag, and what matching to relcal's
    stars needs: point-likeness and the reference band's flux and size), not the whole table."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    wanted = {"objectId", "coord_ra", "coord_dec", "detect_isPrimary", "refExtendedness", "refBand"}
    suffixes = ("_psfFlux", "_psfFluxErr", "_ixx", "_iyy")
    return [n for n in names if n in wanted or n.endswith(suffixes)]


def _relcal_stars(ctx: QuantumContext) -> dict[str, np.ndarray] | None:
    """The relcal_stars table (None when the quantum has no such input: relcal not run, or a run
    planned before relcal wrote it)."""
    refs = ctx.inputs_of("relcal_stars")
    return read_columns(ctx.repo.path_of(refs[0])) if refs else None


def _object_position_error_mas(t: dict[str, np.ndarray], pix_arcsec: float) -> np.ndarray:
    """Per-axis error (mas) of the Objects' coadd positions: sqrt(2) sigma / (S/N), the centroid error
    of a background-limited PSF fit (sigma the Gaussian width, from the reference band's moments;
    sources brighter than the sky do better, by up to sqrt(2)).  NaN where the S/N is not positive."""
    n = len(t["objectId"])
    snr, size = np.full(n, np.nan), np.full(n, np.nan)
    ref_band = np.asarray(t.get("refBand", np.full(n, "")), str)
    for b in np.unique(ref_band):
        if f"{b}_psfFlux" not in t:
            continue
        r = ref_band == b
        snr[r] = t[f"{b}_psfFlux"][r] / t[f"{b}_psfFluxErr"][r]
        if f"{b}_ixx" in t:
            size[r] = np.sqrt(0.5 * (t[f"{b}_ixx"][r] + t[f"{b}_iyy"][r]))
    ok = np.isfinite(size) & (size > 0)
    size = np.where(ok, size, np.median(size[ok]) if ok.any() else 2.0)  # no moments: the table's typical size
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(snr > 0, np.sqrt(2.0) * size * pix_arcsec * 1000.0 / snr, np.nan)
