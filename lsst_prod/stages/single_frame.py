"""Single-frame processing of one visit x detector: raw -> calexp + Source + CcdVisit.

Thin: read the raw and its calibrations, call the kernels in order, write the
outputs.  The sequence (as Rubin's calibrateImage does):

1. ISR (overscan, bias, gain, flat, defects, saturation)
2. background; detection at high S/N with a seeing guess; first PSF model
3. cosmic rays with the measured PSF size; repair
4. background again with sources masked; detection at the campaign threshold
   with the PSF model's size; final PSF model
5. measurement (centroids, moments, apertures, PSF flux, ...); aperture correction
6. astrometry against the reference catalogue propagated to the visit's epoch (TAN-SIP)
7. photometric zero point against the reference catalogue
8. write calexp (image, mask, variance, WCS, PSF, calibration), Source, CcdVisit
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from astropy.time import Time
from astropy.wcs import WCS

from ..algorithms import masks
from ..algorithms.apcorr import apcorr_measure_radius
from ..algorithms.astrometry import fit_wcs, match_to_reference, propagate_positions, reserve_mask
from ..algorithms.background import estimate_background
from ..algorithms.cosmicray import find_cosmic_rays, repair_cosmic_rays
from ..algorithms.detect import detect_sources
from ..algorithms.isr import run_isr
from ..algorithms.measure import measure_sources
from ..algorithms.neighbours import subtract_other_sources
from ..algorithms.photocal import fit_zero_point, provisional_zero_point
from ..algorithms.psf import apcorr_radius, candidates_fwhm, fit_psf, psf_stamp_size, select_psf_candidates
from ..camera import Camera, with_optical_distortion
from ..config.stages import SingleFrameConfig
from ..errors import AlgorithmError
from ..ids import SourceIdFactory, ccd_visit_id
from ..repo.formats import Exposure, read_columns, read_image, table_from_columns, write_exposure, write_parquet
from .base import QuantumContext, QuantumSpec, Resources, Stage
from .common import fit_apcorr_clean, sky_annulus_for, wcs_from_header
from .common import diffraction_pixels as _diffraction
from .source_schema import SOURCE_UNITS, build_source_columns

NJY_AB_ZERO = 31.4  # AB mag of 1 nJy
#: deblended children with less of their neighbours' light than this (fraction in their aperture) are
#: calibration stars for astrometry and photometry, as apcorr_stars() takes them for the aperture correction
ASTROMETRY_MAX_BLENDEDNESS = 0.05
#: footprints with more peaks are split into groups of peaks a simultaneous PSF fit needs (linked within
#: 1.5 FWHM, detect.split_footprints); the others are coupled by the neighbour subtraction.  In a crowded
#: field at bad seeing (600,000 stars/deg^2, 2") the 5-sigma footprints percolate: one covered 63 % of the
#: detector with 445 peaks, every child inherited its edge flag, and its simultaneous fit needed 445 x the
#: whole image in memory.  On dp-mini no footprint has more than 11 peaks.
MAX_FOOTPRINT_PEAKS = 25
#: when the median PSF candidate's model stamp is more than this fraction other footprints, the PSF is refitted on
#: the image with every other source subtracted (their pixels are otherwise masked, and the spatial polynomial's
#: outer pixels lose their constraints): 0.48 at 600,000 stars/deg^2 and 2" seeing, 0.0 on dp-mini
PSF_MAX_NEIGHBOUR_FRACTION = 0.1
#: crowded fields: peaks on the image smoothed by this x sigma_psf (detect_sources' prominence peaks)
CROWDED_PEAK_SMOOTHING = 0.5
#: when the astrometric match fails within the configured pointing search radius, it is widened x3 up to
#: this (80" -> 4' -> 10'): telescopes can be off by arcminutes (a bad pointing model, a wrong offset)
ASTROMETRY_MAX_SEARCH_RADIUS_ARCSEC = 600.0


def _read_raw(path) -> tuple[np.ndarray, dict[str, Any]]:
    return read_image(path)


class SingleFrameStage(Stage):
    name = "single_frame"
    dimensions = ("instrument", "visit", "detector")
    input_types = ("raw", "bias", "flat", "defects", "camera", "refcat")
    output_types = ("calexp", "calexpBackground", "source", "ccdVisit")
    resources = Resources(cores=1, memory_gib=2.0, walltime_s=1800)
    description = "ISR, background, PSF, detection, measurement, astrometric and photometric calibration"

    # ------------------------------------------------------------------ planning
    def plan(self, ctx, config: SingleFrameConfig) -> list[QuantumSpec]:
        from ..repo import DataId

        instrument = ctx.instrument
        specs = []
        for v in ctx.visits:
            for det in ctx.detectors:
                did = DataId(instrument=instrument, visit=v["visit"], detector=det)
                if ctx.existing("raw", did) is None:
                    continue  # a detector that was not read out: nothing to plan
                inputs = (
                    ("raw", did),
                    ("bias", DataId(instrument=instrument, detector=det)),
                    ("flat", DataId(instrument=instrument, detector=det, physical_filter=v["physical_filter"])),
                    ("defects", DataId(instrument=instrument, detector=det)),
                    ("camera", DataId(instrument=instrument)),
                    ("refcat", DataId()),
                )
                outputs = tuple((t, did) for t in self.output_types)
                specs.append(QuantumSpec(self.name, did, inputs, outputs))
        return specs

    # ------------------------------------------------------------------- running
    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: SingleFrameConfig = ctx.config  # type: ignore[assignment]
        did = ctx.data_id
        log = ctx.log
        camera = Camera.from_json(ctx.input_path("camera").read_text())
        det = camera.detector(did["detector"])
        raw, hdr = _read_raw(ctx.input_path("raw"))
        bias, _ = read_image(ctx.input_path("bias"))
        flat, _ = read_image(ctx.input_path("flat"))
        defects, _ = read_image(ctx.input_path("defects"))
        band = camera.band_of(hdr["FILTER"])
        pixel_scale = camera.pixel_scale_arcsec

        # 1. ISR
        isr = run_isr(raw, det, bias, flat, defects.astype(bool), edge_pixels=cfg.edge_pixels)
        image, variance, mask = isr.image.astype(np.float32), isr.variance, isr.mask.copy()

        # 2. first background, bright detections, first PSF
        bg = estimate_background(image, mask, mesh_size=cfg.background_mesh_pixels,
                                 filter_size=cfg.background_filter_size)
        image = image - bg.image
        sigma_guess = cfg.initial_seeing_arcsec / pixel_scale / 2.3548
        fp = detect_sources(image, variance, mask, sigma_guess, threshold=max(10.0, cfg.detection_threshold_sigma))
        cand, fwhm_cand = _psf_candidates(image, variance, mask, fp)
        psf = fit_psf(image, variance, mask, cand.x, cand.y, image.shape,
                      stamp_size=_stamp_pixels(cfg.psf_stamp_pixels, fwhm_cand),
                      spatial_order=cfg.psf_spatial_order, min_stars=cfg.psf_min_stars, labels=fp.labels,
                      min_stars_per_term=cfg.psf_min_stars_per_term, fallback=True,
                      wing_radius_fwhm=cfg.psf_wing_radius_fwhm)
        cy, cx = (image.shape[0] - 1) / 2.0, (image.shape[1] - 1) / 2.0
        fwhm_pix = float(psf.fwhm_at(cx, cy))

        # 3. cosmic rays with the measured PSF size
        cr = find_cosmic_rays(image, variance, mask, fwhm_pix, n_sigma=cfg.cosmic_ray_threshold_sigma)
        repaired = repair_cosmic_rays(image, mask, cr)
        image, mask = repaired.image, repaired.mask
        n_cr = int(repaired.n_pixels)

        # 4. background with sources masked, full detection, final PSF.  The final background is the
        # clipped MEAN of the pixels outside the footprints at the detection threshold (the level that
        # leaves PSF fluxes unbiased; a mode sits ~0.4 e- low on Poisson sky): mask those footprints.
        fp_bg = detect_sources(image, variance, mask, psf.sigma_at(cx, cy), threshold=cfg.detection_threshold_sigma,
                               set_mask=False)
        bg2 = estimate_background(image + bg.image,
                                  mask | ((fp.labels > 0) | (fp_bg.labels > 0)).astype(np.uint32) * masks.DETECTED,
                                  mesh_size=cfg.background_mesh_pixels, filter_size=cfg.background_filter_size,
                                  statistic=cfg.background_statistic)
        image = (image + bg.image - bg2.image).astype(np.float32)
        background = bg2
        mask &= ~np.uint32(masks.DETECTED)
        det_sigma = float(psf.sigma_at(cx, cy))
        fp = detect_sources(image, variance, mask, det_sigma, threshold=cfg.detection_threshold_sigma,
                            max_footprint_peaks=MAX_FOOTPRINT_PEAKS)
        mask |= (fp.labels > 0).astype(np.uint32) * masks.DETECTED
        # In poor seeing the 5-sigma footprints of a crowded field merge (fewer single-peak stars): keep the
        # first pass's candidates (10-sigma footprints) when they are more numerous.
        cand = max(_psf_candidates(image, variance, mask, fp, fwhm_pix)[0], cand, key=lambda c: c.n)
        psf = fit_psf(image, variance, mask, cand.x, cand.y, image.shape,
                      stamp_size=_stamp_pixels(cfg.psf_stamp_pixels, fwhm_pix),
                      spatial_order=cfg.psf_spatial_order, min_stars=cfg.psf_min_stars, labels=fp.labels,
                      min_stars_per_term=cfg.psf_min_stars_per_term, fallback=True,
                      wing_radius_fwhm=cfg.psf_wing_radius_fwhm)
        fwhm_pix = float(psf.fwhm_at(cx, cy))
        crowding = _psf_stamp_crowding(fp.labels, cand, _stamp_pixels(cfg.psf_stamp_pixels, fwhm_pix))
        if crowding > PSF_MAX_NEIGHBOUR_FRACTION:
            # Crowded: the candidates' stamps are largely other footprints, whose pixels the fit masks, and
            # the polynomial's outer pixels are unconstrained (PSF-flux errors of x3 in the corners at 600,000
            # stars/deg^2 and 2").  Subtract every other source instead (amplitudes fitted with a constant
            # model, which half-masked stamps do constrain) and refit, masking only the other candidates.
            fp, psf = crowded_psf(image, variance, mask, fp, cand, det_sigma, background.rms, cfg, fwhm_pix)
            fwhm_pix = float(psf.fwhm_at(cx, cy))
            log.info("[%s] crowded PSF stamps (%.0f %% other footprints): refitted with the neighbours subtracted",
                     did, 100 * crowding)
        log.info("[%s] PSF FWHM %.2f px from %d stars%s; %d footprints, %d CR pixels",
                 did, fwhm_pix, psf.n_stars, f" (parametric {psf.fallback} fallback)" if psf.is_fallback else "",
                 fp.n_footprints, n_cr)

        # 5. measurement + aperture correction
        ref_radius = (apcorr_radius(fwhm_pix) if cfg.apcorr_reference_radius_pixels == "auto"
                      else float(cfg.apcorr_reference_radius_pixels))
        # every source is measured on the image minus the other detected sources' PSF models (with the
        # Kolmogorov x Airy wing beyond the stamp), scaled by their first-pass PSF fluxes
        cols = measure_sources(image, variance, mask, fp, psf, background_rms=background.rms,
                               sky_annulus=sky_annulus_for(ref_radius), subtract_neighbours=True,
                               diffraction=_diffraction(cfg, band, pixel_scale))
        n = len(cols["x"])
        if n == 0:
            raise AlgorithmError("no sources detected", n_footprints=fp.n_footprints)
        # Candidates are the stars given to the PSF fit (which clips n_rejected of them as outliers).
        psf_cand = _nearest_flags(cols["x"], cols["y"], cand.x, cand.y, 1.5)
        psf_used = psf_cand
        # Aperture-correction stars: the PSF candidates and every other bright (S/N >= 50) unsaturated,
        # unblended point source (in poor seeing the candidates' isolation cut leaves only a handful);
        # apertures crossing the edge are completed with the PSF model.  The correction goes on to the TOTAL
        # flux (the refcat's magnitudes are total): apertures of 4 FWHM, then the PSF model's r^-11/3 wing
        # beyond (an 8-FWHM aperture is 2x noisier and its local background 4x more exposed).
        # Crowded (the PSF stamps above): the annulus' undetected pixels are a sample selected against the
        # light of unresolved stars, which the apertures do hold (apcorr 1.23 instead of 0.99 at 600,000
        # stars/deg^2 and 2"): take the local background from ALL usable annulus pixels of the image with every
        # source's full-wing model subtracted, and the clipped weighted mean of the ratios (contamination of
        # large apertures is one-sided): 1.014.
        crowded_kw = (dict(usable=(mask & masks.UNUSABLE) == 0, robust_constant=True)
                      if crowding > PSF_MAX_NEIGHBOUR_FRACTION else {})
        apcorr = fit_apcorr_clean(image, variance, psf, cols, psf_cand | apcorr_stars(cols), ref_radius,
                                  fwhm=fwhm_pix, total_flux=True,
                                  measure_radius=apcorr_measure_radius(fwhm_pix),
                                  diffraction=_diffraction(cfg, band, pixel_scale), **crowded_kw)
        ac = apcorr(cols["x"], cols["y"])

        # 6. astrometry
        # the commanded pointing's TAN WCS with the camera's optical distortion: what remains for the fit is the
        # pointing and rotation errors (and the as-built telescope's small departure from its design)
        wcs0 = wcs_from_header(with_optical_distortion(hdr, camera.distortion_k_per_pix2, image.shape))
        mjd_mid = float(hdr["MJD-OBS"]) + float(hdr["EXPTIME"]) / 2.0 / 86400.0
        refcat = read_columns(ctx.input_path("refcat"))
        # margin: the pointing error plus how far a rotator error about the boresight (CRPIX) moves the corners
        corner_r = np.hypot(np.array([0, image.shape[1] - 1]) - (wcs0.wcs.crpix[0] - 1),
                            np.array([[0], [image.shape[0] - 1]]) - (wcs0.wcs.crpix[1] - 1)).max()  # fmt: skip
        max_search = max(cfg.astrometry_search_radius_arcsec, ASTROMETRY_MAX_SEARCH_RADIUS_ARCSEC)
        margin_pix = (max_search / pixel_scale
                      + math.radians(cfg.astrometry_max_rotation_deg) * corner_r + 50)  # fmt: skip
        ref = _refcat_near(refcat, wcs0, image.shape, margin_pix=margin_pix)
        if len(ref["ra"]) < cfg.astrometry_min_matches:
            raise AlgorithmError(f"only {len(ref['ra'])} reference stars over the detector", n_ref=len(ref["ra"]))
        ref_ra, ref_dec = propagate_positions(ref["ra"], ref["dec"], ref["pmra"], ref["pmdec"], ref["parallax"],
                                              float(ref["epoch_mjd"][0]), mjd_mid)
        # leaves: isolated sources and deblended children whose neighbours put < 5 % of the light in their
        # aperture (in a sparse field the 5-sigma footprints of bright stars reach their faint neighbours:
        # excluding every child lost a third of the 4-6 reference stars of a detector)
        usable = ((cols["parent_index"] < 0) | (cols["blendedness_abs"] < ASTROMETRY_MAX_BLENDEDNESS)) \
            & (cols["deblend_nChild"] == 0) & ~cols["pixelFlags_saturatedCenter"] \
            & ~cols["pixelFlags_edge"] & np.isfinite(cols["psfFlux"]) & (cols["psfFlux"] > 10 * cols["psfFluxErr"])
        sel = np.flatnonzero(usable)
        ref_mag = NJY_AB_ZERO - 2.5 * np.log10(np.clip(ref[f"{band}_flux"], 1e-3, None))
        # held-out reference stars (by refcat id: the same star in every visit), unless too few would remain
        reserved = reserve_mask(ref["ref_id"], cfg.astrometry_reserve_fraction)
        rx0, ry0 = wcs0.all_world2pix(ref_ra, ref_dec, 0)
        on_det = (rx0 >= 0) & (rx0 <= image.shape[1] - 1) & (ry0 >= 0) & (ry0 <= image.shape[0] - 1)
        n_fit_min = max(20, 4 * cfg.astrometry_min_matches)
        reserve_note = ""
        if reserved.any() and int((on_det & ~reserved).sum()) < n_fit_min:
            reserve_note = (f"no reference stars reserved: {int(on_det.sum())} over the detector, "
                            f"fewer than {n_fit_min} would remain for the fit")  # fmt: skip
            reserved[:] = False
        fit_idx = np.flatnonzero(~reserved)
        astrom = fit_wcs(cols["x"][sel], cols["y"][sel], cols["psfFlux"][sel], wcs0, ref_ra[fit_idx], ref_dec[fit_idx],
                         ref_mag[fit_idx], search_radius_arcsec=cfg.astrometry_search_radius_arcsec,
                         max_rotation_deg=cfg.astrometry_max_rotation_deg, sip_order=cfg.astrometry_sip_order,
                         detector_shape=image.shape, min_matches=cfg.astrometry_min_matches,
                         max_search_radius_arcsec=max_search)  # fmt: skip
        wcs = astrom.wcs
        ra, dec = wcs.all_pix2world(cols["x"], cols["y"], 0)
        src_matched = sel[astrom.matched_src_index]
        # usable sources matched to the reserved stars as the fit matches its own (radius clip(5 rms, 0.5", 2"))
        astrometry_reserved = np.zeros(n, bool)
        res_idx = np.flatnonzero(reserved)
        cand = np.setdiff1d(sel, src_matched)
        if len(res_idx) and len(cand):
            radius = float(np.clip(5.0 * astrom.rms_arcsec, 0.5, 2.0))
            si, _ = match_to_reference(ra[cand], dec[cand], ref_ra[res_idx], ref_dec[res_idx], radius)
            astrometry_reserved[cand[si]] = True

        # 7. photometric calibration on aperture-corrected PSF fluxes of unsaturated stars matched to ALL the
        # reference stars (those reserved from the astrometric fit too: they are not reserved from photometry;
        # the astrometric fit's own clipping is no reason to drop a star either) and not flagged variable by the
        # refcat (its flag is incomplete: fit_zero_point's clipping catches the missed ones)
        pc_radius = float(np.clip(5.0 * astrom.rms_arcsec, 0.5, 2.0))
        pc_si, pc_ri = match_to_reference(ra[sel], dec[sel], ref_ra, ref_dec, pc_radius)
        src_pc, ref_pc = sel[pc_si], np.asarray(pc_ri)
        inst = cols["psfFlux"][src_pc] * ac[src_pc]
        inst_err = cols["psfFluxErr"][src_pc] * ac[src_pc]
        var_flag = np.asarray(ref.get("phot_variable_flag", np.zeros(len(ref["ra"]), bool)), bool)
        pc_ok = (~var_flag[ref_pc]) & np.isfinite(inst) & (inst > 0)
        phot_args = (inst[pc_ok], inst_err[pc_ok], ref[f"{band}_flux"][ref_pc][pc_ok], ref[f"{band}_fluxErr"][ref_pc][pc_ok])
        colour_kw = {}
        if cfg.photocal_colour_term and "bp_rp" in ref:
            colour_kw = dict(colour=np.asarray(ref["bp_rp"], float)[ref_pc][pc_ok],
                             colour_pivot=cfg.photocal_colour_pivot, colour_term_prior=cfg.photocal_colour_term_prior)
        try:
            phot = fit_zero_point(*phot_args, min_stars=cfg.photocal_min_stars, **colour_kw,
                                  colour_term_prior_sigma=cfg.photocal_colour_term_prior_sigma,
                                  colour_min_stars=cfg.photocal_colour_term_min_stars)
        except AlgorithmError as exc:
            # a sparse sky: too few stars to fit (or to clip) a zero point.  The detector is still calibrated
            # astrometrically and measured; its zero point is the stars' median, flagged provisional, and relcal
            # solves it from its stars matched across visits (AlgorithmError only without any usable star)
            phot = provisional_zero_point(*phot_args, **colour_kw)
            log.warning("[%s] %s (%d matched): provisional zero point %.3f from the median of %d stars", did, exc,
                        int(pc_ok.sum()), phot.zero_point, phot.n_used)
        calib = float(phot.nJy_per_electron)
        photometry_used = np.zeros(n, bool)
        photometry_used[src_pc[pc_ok][np.asarray(phot.used, bool)]] = True
        astrometry_used = np.zeros(n, bool)
        astrometry_used[src_matched] = True

        # 8. outputs
        visit, detector = int(did["visit"]), int(did["detector"])
        source_ids = SourceIdFactory(ctx.release_id, visit, detector).make(n)
        columns = build_source_columns(
            cols, source_ids=source_ids, ra=ra, dec=dec, wcs=wcs, calib=calib, apcorr=ac, apcorr_err=apcorr.error_at(cols["x"], cols["y"]),
            visit=visit, detector=detector, band=band, physical_filter=hdr["FILTER"], psf_used=psf_used,
            psf_candidate=psf_cand, astrometry_used=astrometry_used, photometry_used=photometry_used,
            astrometry_reserved=astrometry_reserved,
        )
        # No run name or timestamp in the files: a re-run (or another run) of the same quantum writes
        # byte-identical outputs, which restart and fault tests compare by checksum.
        meta = {"release_id": ctx.release_id, "visit": visit, "detector": detector,
                "nJy_per_electron": calib, "zero_point": phot.zero_point}
        table = table_from_columns(columns, SOURCE_UNITS, meta)
        ctx.put("source", lambda p: write_parquet(p, table))

        wcs_header = dict(astrom.header)
        sky_noise = float(np.median(background.rms))
        psf_sigma = float(psf.sigma_at(cx, cy))
        mag_lim = phot.zero_point - 2.5 * math.log10(5.0 * sky_noise * math.sqrt(4 * math.pi) * psf_sigma)
        metadata = {
            "INSTRUME": hdr.get("INSTRUME"), "VISIT": visit, "DETECTOR": detector, "BAND": band,
            "FILTER": hdr["FILTER"], "EXPTIME": float(hdr["EXPTIME"]), "MJD-OBS": float(hdr["MJD-OBS"]),
            "MJD-MID": mjd_mid, "DATE-OBS": hdr.get("DATE-OBS"), "AIRMASS": hdr.get("AIRMASS"),
            "PHOTCAL": calib, "MAGZERO": phot.zero_point, "MAGZERR": phot.zero_point_err, "MAGZPROV": bool(phot.provisional), "MAGCTERM": float(phot.colour_term), "BUNIT": "electron",
            "PSFFWHM": fwhm_pix * pixel_scale, "PIXSCALE": pixel_scale, "PSFSIGMA": psf_sigma, "NPSFSTAR": int(psf.n_stars),
            "PSFFALLB": bool(psf.is_fallback),
            "ASTRRMS": astrom.rms_arcsec, "ASTRNMAT": int(astrom.n_matched), "SKYBG": float(background.global_level),
            "SKYNOISE": sky_noise, "NCRPIX": n_cr, "RELEASE": ctx.release_id,
        }
        apcorr_hdr = {"APCDICT": json.dumps(apcorr.to_dict())}
        exposure = Exposure(image, mask, variance, metadata, wcs_header, psf.to_fits(),
                            {"APCORR": (np.zeros(1, np.float32), apcorr_hdr)})
        ctx.put("calexp", lambda p: write_exposure(p, exposure))
        bg_exp = Exposure(background.image.astype(np.float32), np.zeros_like(mask), background.rms.astype(np.float32),
                          {"VISIT": visit, "DETECTOR": detector}, wcs_header)
        ctx.put("calexpBackground", lambda p: write_exposure(p, bg_exp))

        corners_x = np.array([0, 0, image.shape[1] - 1, image.shape[1] - 1], float)
        corners_y = np.array([0, image.shape[0] - 1, image.shape[0] - 1, 0], float)
        c_ra, c_dec = wcs.all_pix2world(corners_x, corners_y, 0)
        center_ra, center_dec = wcs.all_pix2world([cx], [cy], 0)
        t_start = Time(float(hdr["MJD-OBS"]), format="mjd", scale="tai")
        ccd = {
            "ccdVisitId": [ccd_visit_id(visit, detector)], "visitId": [visit], "detector": [detector],
            "band": [band], "physical_filter": [hdr["FILTER"]],
            "ra": [float(center_ra[0])], "dec": [float(center_dec[0])],
            "pixelScale": [float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)],
            "zenithDistance": [float(90.0 - hdr["ALTITUDE"]) if "ALTITUDE" in hdr else float("nan")],
            "expTime": [float(hdr["EXPTIME"])], "darkTime": [float(hdr.get("DARKTIME", hdr["EXPTIME"]))],
            "zeroPoint": [float(phot.zero_point)], "psfSigma": [psf_sigma], "seeing": [fwhm_pix * pixel_scale],
            "skyBg": [float(background.global_level)], "skyNoise": [sky_noise],
            "astromOffsetMean": [float(astrom.offset_mean_arcsec)], "astromOffsetStd": [float(astrom.offset_std_arcsec)],
            "nPsfStar": [int(psf.n_stars)], "psfIsFallback": [bool(psf.is_fallback)], "skyRotation": [float(hdr.get("ROTPA", 0.0))],
            "expMidptMJD": [mjd_mid], "obsStartMJD": [float(hdr["MJD-OBS"])],
            "obsStart": [t_start.isot], "expMidpt": [Time(mjd_mid, format="mjd", scale="tai").isot],
            "xSize": [int(image.shape[1])], "ySize": [int(image.shape[0])],
            "llcra": [float(c_ra[0])], "llcdec": [float(c_dec[0])], "ulcra": [float(c_ra[1])], "ulcdec": [float(c_dec[1])],
            "urcra": [float(c_ra[2])], "urcdec": [float(c_dec[2])], "lrcra": [float(c_ra[3])], "lrcdec": [float(c_dec[3])],
            "magLim": [float(mag_lim)], "nSources": [n], "photoCalibRmsMmag": [float(phot.rms_mmag)],
            "nPhotoCalibStars": [int(phot.n_used)], "zeroPointProvisional": [bool(phot.provisional)],
            "nCosmicRayPixels": [n_cr],
        }
        ccd_units = {"ra": "deg", "dec": "deg", "pixelScale": "arcsec/pixel", "zenithDistance": "deg", "expTime": "s",
                     "darkTime": "s", "zeroPoint": "mag", "psfSigma": "pixel", "seeing": "arcsec", "skyBg": "electron",
                     "skyNoise": "electron", "astromOffsetMean": "arcsec", "astromOffsetStd": "arcsec",
                     "expMidptMJD": "d", "obsStartMJD": "d", "xSize": "pixel", "ySize": "pixel", "magLim": "mag"}
        ccd_table = table_from_columns({k: np.asarray(v) for k, v in ccd.items()}, ccd_units, meta)
        ctx.put("ccdVisit", lambda p: write_parquet(p, ccd_table))

        ctx.summary.update(
            n_sources=n, n_psf_stars=int(psf.n_stars), psf_fallback=psf.fallback, psf_fwhm_arcsec=fwhm_pix * pixel_scale,
            zero_point=float(phot.zero_point), zero_point_provisional=bool(phot.provisional), n_astrom_matches=int(astrom.n_matched),
            n_astrom_reserved=int(astrometry_reserved.sum()), astrom_reserve_note=reserve_note,
            astrom_match_method=astrom.match_method, astrom_log10_false_alarm=float(astrom.log10_false_alarm),
            astrom_rms_mas=float(astrom.rms_arcsec) * 1000.0, photocal_rms_mmag=float(phot.rms_mmag),
            photocal_colour_term=float(phot.colour_term), photocal_colour_term_fitted=bool(phot.colour_term_fitted),
            n_cr_pixels=n_cr, mag_lim=float(mag_lim),
        )


def apcorr_stars(cols: dict[str, np.ndarray], min_snr: float = 50.0, max_blendedness: float = 0.05) -> np.ndarray:
    """Rows usable as aperture-correction stars: isolated or barely blended leaves, unsaturated,
    point-like (extendedness 0), with a clean centre and PSF flux S/N >= ``min_snr``, footprint off the
    border.  Neighbours are subtracted and edge-crossing apertures completed by fit_apcorr_clean."""
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = cols["psfFlux"] / cols["psfFluxErr"]
    # blend children whose neighbours hold < 5 % of the light in their 12-px aperture count: in poor seeing
    # most bright stars share a footprint (at 2" on the test field, 7 of the 99 S/N >= 50 rows are alone)
    unblended = (cols["parent_index"] < 0) | (cols["blendedness_abs"] < max_blendedness)
    return (unblended & (cols["deblend_nChild"] == 0) & ~cols["pixelFlags_saturated"]
            & ~cols["pixelFlags_edge"] & ~cols["pixelFlags_crCenter"] & ~cols["pixelFlags_interpolatedCenter"]
            & ~cols["psfFlux_flag"] & (cols["extendedness"] == 0) & (snr >= min_snr))


#: LSST bands' effective wavelengths (nm), for the telescope's diffraction in the PSF wings.



def _stamp_pixels(setting: int | str, fwhm_pix: float) -> int:
    """The PSF model stamp size: the configured integer, or 'auto' from the measured FWHM (pixels)."""
    if setting != "auto":
        return int(setting)
    if not np.isfinite(fwhm_pix):
        raise AlgorithmError("no PSF candidates to measure the seeing on", n_candidates=0)
    return psf_stamp_size(fwhm_pix)


def _psf_candidates(image, variance, mask, fp, fwhm_pix: float | None = None):
    """PSF candidates selected in stamps of max(25, 3 FWHM) (isolation and adaptive moments), and their
    median FWHM.  Without a FWHM, a first selection in 25-pixel stamps measures it."""
    if fwhm_pix is None:
        cand = select_psf_candidates(image, variance, mask, fp)
        fwhm_pix = candidates_fwhm(cand)
        if not np.isfinite(fwhm_pix) or psf_stamp_size(fwhm_pix, per_fwhm=3.0) == 25:
            return cand, fwhm_pix
    cand = select_psf_candidates(image, variance, mask, fp, stamp_size=psf_stamp_size(fwhm_pix, per_fwhm=3.0))
    return cand, candidates_fwhm(cand)


def crowded_psf(image, variance, mask, fp, cand, detection_sigma: float, background_rms, cfg: SingleFrameConfig,
                fwhm_pix: float):
    """The crowded-field detection peaks and PSF model (the stage's step 4 when the PSF candidates' stamps are
    more than PSF_MAX_NEIGHBOUR_FRACTION other footprints): (footprints, PsfModel).  ``fp, cand``: the
    stage's final footprints and PSF candidates, ``detection_sigma`` the matched filter's sigma they were
    detected with, ``fwhm_pix`` the FWHM of the PSF model fitted to the candidates.

    The final footprints' peaks are searched again on the lightly smoothed image by prominence (the matched
    filter's peaks miss companions within 1.2-1.7 FWHM, which crowding makes common; same footprints, so the
    same DETECTED pixels).  Then the candidates' stamps are cleaned of every other source instead of masking
    them (the masked pixels leave the spatial polynomial's outer pixels unconstrained): a constant model,
    which half-masked stamps do constrain, gives every source's position and amplitude in one sparse fit
    (:func:`~lsst_prod.algorithms.neighbours.subtract_other_sources`), and the configured model is refitted on
    the image minus the non-candidates, masking only the other candidates' footprints."""
    fp = detect_sources(image, variance, mask, detection_sigma, threshold=cfg.detection_threshold_sigma,
                        max_footprint_peaks=MAX_FOOTPRINT_PEAKS, peak_smoothing=CROWDED_PEAK_SMOOTHING, set_mask=False)
    fit_kw = dict(stamp_size=_stamp_pixels(cfg.psf_stamp_pixels, fwhm_pix), min_stars=cfg.psf_min_stars,
                  min_stars_per_term=cfg.psf_min_stars_per_term, fallback=True,
                  wing_radius_fwhm=cfg.psf_wing_radius_fwhm)
    psf0 = fit_psf(image, variance, mask, cand.x, cand.y, image.shape, spatial_order=0, labels=fp.labels, **fit_kw)
    own = np.unique(fp.labels[np.rint(cand.y).astype(int), np.rint(cand.x).astype(int)])
    weight = np.where((mask & masks.UNUSABLE) == 0, 1.0 / np.maximum(background_rms, 1e-12) ** 2, 0.0)
    is_cand = _nearest_flags(fp.peak_x, fp.peak_y, cand.x, cand.y, 1.5)
    cleaned = subtract_other_sources(image, variance, weight, psf0, fp.peak_x, fp.peak_y, is_cand)
    psf = fit_psf(cleaned, variance, mask, cand.x, cand.y, image.shape, spatial_order=cfg.psf_spatial_order,
                  labels=np.where(np.isin(fp.labels, own[own > 0]), fp.labels, 0), **fit_kw)
    return fp, psf


def _psf_stamp_crowding(labels: np.ndarray, cand, stamp: int) -> float:
    """Median over the PSF candidates of the fraction of their model stamp covered by OTHER footprints."""
    if cand.n == 0:
        return 0.0
    from ..algorithms.measure import _gather

    ix, iy = np.rint(cand.x).astype(int), np.rint(cand.y).astype(int)
    lab = _gather(labels, ix, iy, stamp // 2)[0]
    own = labels[np.clip(iy, 0, labels.shape[0] - 1), np.clip(ix, 0, labels.shape[1] - 1)]
    return float(np.median(((lab != 0) & (lab != own[:, None, None])).mean(axis=(1, 2))))


def _nearest_flags(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """True for rows of (x, y) with a point of (px, py) within ``radius`` pixels."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(x), bool)
    if len(px) == 0 or len(x) == 0:
        return out
    d, _ = cKDTree(np.column_stack([px, py])).query(np.column_stack([x, y]), distance_upper_bound=radius)
    return np.isfinite(d)


def _refcat_near(ref: dict[str, np.ndarray], wcs0: WCS, shape: tuple[int, int], margin_pix: float) -> dict[str, np.ndarray]:
    """Reference stars that fall on the detector (plus a margin) under the nominal WCS."""
    x, y = wcs0.all_world2pix(ref["ra"], ref["dec"], 0)
    ok = (x > -margin_pix) & (x < shape[1] + margin_pix) & (y > -margin_pix) & (y < shape[0] + margin_pix)
    return {k: v[ok] for k, v in ref.items()}
