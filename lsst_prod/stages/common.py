"""Pieces several stage wrappers share (no numerics of their own: they call kernels)."""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS

from ..algorithms.apcorr import (ApertureCorrection, clean_aperture_fluxes, fit_aperture_correction, kolmogorov_wing_fraction,
                                 weighted_ratio)
from ..algorithms.neighbours import aperture_flux_without_neighbours

SKY_ANNULUS_PIX = (50.0, 70.0)  # measure_sources' default local-background annulus


def fit_apcorr_from_inputs(cols: dict[str, np.ndarray], stars: np.ndarray, calstars: np.ndarray,
                           shape: tuple[int, int], min_stars: int = 5) -> ApertureCorrection | None:
    """A coadd's aperture correction from its inputs' calibration: the ML-weighted, clipped mean
    (:func:`~lsst_prod.algorithms.apcorr.weighted_ratio`) over the rows ``stars`` of
    (inputs' weighted mean calibrated flux / coadd PSF flux)
    (:func:`~lsst_prod.algorithms.apcorr.input_reference_fluxes`); None with fewer than ``min_stars``
    stars measured in the inputs (the caller falls back to the coadd's own apertures)."""
    from ..algorithms.apcorr import input_reference_fluxes

    leaf = cols["deblend_nChild"] == 0
    idx = np.flatnonzero(stars & leaf & np.isfinite(cols["psfFlux"]) & (cols["psfFlux"] > 0)
                         & np.isfinite(cols["psfFluxErr"]) & (cols["psfFluxErr"] > 0))
    ref, ref_err, _ = input_reference_fluxes(cols["x"][idx], cols["y"][idx], calstars)
    ok = np.isfinite(ref) & (ref > 0)
    if ok.sum() < min_stars:
        return None
    psf_flux, psf_err = cols["psfFlux"][idx][ok], cols["psfFluxErr"][idx][ok]
    ratio = ref[ok] / psf_flux
    sig = ratio * np.hypot(ref_err[ok] / ref[ok], psf_err / psf_flux)
    val, err, rms, n_used = weighted_ratio(ratio, sig, psf_flux)
    return ApertureCorrection(0, np.array([val]), np.array([[err**2]]), tuple(int(v) for v in shape), n_used, rms,
                              err / val, 0.0, 0.0, 1.0)


def calexp_apcorr(exp) -> ApertureCorrection | None:
    """The single-frame aperture correction a calexp carries (its APCORR HDU), None without one."""
    import json

    return ApertureCorrection.from_dict(json.loads(exp.extra["APCORR"][1]["APCDICT"])) if "APCORR" in exp.extra \
        else None


def sky_annulus_for(ref_radius: float) -> tuple[float, float]:
    """Local-background annulus for an aperture-correction radius: the default (50, 70) pixels, moved out to
    (2, 2.8) x the radius when that is larger, so that the PSF wings within it stay negligible."""
    return max(SKY_ANNULUS_PIX[0], 2.0 * ref_radius), max(SKY_ANNULUS_PIX[1], 2.8 * ref_radius)


def fit_apcorr_clean(image: np.ndarray, variance: np.ndarray, psf, cols: dict[str, np.ndarray],
                     stars: np.ndarray, radius: float, robust_constant: bool = False,
                     sky_annulus: tuple[float, float] | None = None, fwhm: float | None = None,
                     total_flux: bool = False, measure_radius: float | None = None,
                     diffraction: tuple[float, float] = (0.0, 0.0),
                     usable: np.ndarray | None = None) -> ApertureCorrection:
    """Aperture correction (reference aperture / PSF flux) from the rows ``stars`` (bright isolated
    stars), their reference apertures measured with every other source's PSF model subtracted and
    the local annulus background removed (crowded fields; see algorithms/neighbours.py).  ``cols["sky"]``
    must come from ``sky_annulus`` (default: :func:`sky_annulus_for` the radius).

    ``fwhm`` (pixels): apertures that cross the image edge are completed with the star's own PSF model
    (stars closer than 3 FWHM to the edge are left out); without it they are left out.
    ``total_flux``: the correction goes on to the total flux, with the light of a Kolmogorov PSF of the
    model's FWHM (at the detector centre) beyond the radius
    (:func:`~lsst_prod.algorithms.apcorr.kolmogorov_wing_fraction`, convolved with the telescope's Airy
    pattern: ``diffraction`` = (lambda/D in pixels, linear obscuration)) in ``total_factor``.  ``measure_radius`` (with ``total_flux``): the stars' apertures are measured at this
    smaller radius, where their S/N is higher and a local-background error weighs less, and the
    Kolmogorov wing carries the light beyond it (``total_factor``).  With 1-2 usable stars the correction is their weighted mean (order 0) with its
    error; with none it is an AlgorithmError.

    ``usable`` (boolean image, with ``fwhm``): the stars' apertures come from
    :func:`~lsst_prod.algorithms.apcorr.clean_aperture_fluxes` instead: every source subtracted with its
    full-wing model, the local background the clipped mean of all usable ``sky_annulus`` pixels of that
    residual (``cols["sky"]`` is not used), and with ``robust_constant`` the correction is the
    inverse-variance weighted, clipped mean of the ratios
    (:func:`~lsst_prod.algorithms.apcorr.weighted_ratio`)."""
    sky_annulus = sky_annulus if sky_annulus is not None else sky_annulus_for(radius)
    if total_flux and measure_radius is not None:
        radius = min(float(radius), float(measure_radius))
    leaf = cols["deblend_nChild"] == 0
    idx = np.flatnonzero(stars & leaf & np.isfinite(cols["psfFlux"]) & (cols["psfFlux"] > 0))
    factor = 1.0
    if total_flux:
        cy, cx = (image.shape[0] - 1) / 2.0, (image.shape[1] - 1) / 2.0
        f = float(fwhm) if fwhm is not None else float(psf.fwhm_at(cx, cy))
        factor = 1.0 + kolmogorov_wing_fraction(round(f, 3), round(float(radius), 3), *diffraction)
    if usable is not None and fwhm is not None:
        m = clean_aperture_fluxes(image, variance, usable, psf, cols["x"], cols["y"],
                                  np.where(leaf, cols["psfFlux"], 0.0), idx, radius, float(fwhm), sky_annulus,
                                  diffraction=diffraction)
        ok = ~m["flag"] & (m["flux"] > 0)
        psf_flux, psf_err = cols["psfFlux"][idx][ok], cols["psfFluxErr"][idx][ok]
        ref_flux, ref_err = m["flux"][ok], m["flux_err"][ok]
        if robust_constant:
            ratio = ref_flux / psf_flux
            sig = ratio * np.hypot(ref_err / ref_flux, psf_err / psf_flux)
            good = np.isfinite(sig) & (sig > 0)
            if good.sum() < 3:
                return ApertureCorrection(0, np.array([1.0]), np.zeros((1, 1)), image.shape, int(good.sum()),
                                          float("nan"), float("nan"), 0.0, radius, factor)
            val, err, rms, n_used = weighted_ratio(ratio[good], sig[good], psf_flux[good])
            return ApertureCorrection(0, np.array([val]), np.array([[err**2]]), image.shape, n_used, rms, err / val,
                                      0.0, radius, factor)
        fit = fit_aperture_correction(cols["x"][idx][ok], cols["y"][idx][ok], psf_flux, psf_err, ref_flux, ref_err,
                                      np.ones(int(ok.sum()), bool), image.shape, ref_radius=radius)
        return fit.with_total_factor(factor)
    ref_flux, ref_err, ref_flag, area = aperture_flux_without_neighbours(
        image, variance, psf, cols["x"], cols["y"], np.where(leaf, cols["psfFlux"], 0.0), idx, radius, fwhm=fwhm,
        diffraction=diffraction)
    ref_flux = ref_flux - cols["sky"][idx] * area
    r_in, r_out = sky_annulus
    n_annulus = math.pi * (r_out**2 - r_in**2)
    ref_err = np.hypot(ref_err, cols["skyErr"][idx] * area / math.sqrt(n_annulus))
    ok = ~ref_flag & np.isfinite(ref_flux) & ~cols["sky_flag"][idx]
    if robust_constant:
        # A constant: the median ratio (contamination of large apertures is one-sided, so a weighted
        # mean or polynomial is pulled up by it; on coadds the PSF model varies little anyway).
        ratio = ref_flux[ok] / cols["psfFlux"][idx][ok]
        if len(ratio) < 3:
            return ApertureCorrection(0, np.array([1.0]), np.zeros((1, 1)), image.shape, int(len(ratio)),
                                      float("nan"), float("nan"), 0.0, radius, factor)
        med = float(np.median(ratio))
        mad = 1.4826 * float(np.median(np.abs(ratio - med)))
        err = 1.2533 * mad / math.sqrt(len(ratio))
        return ApertureCorrection(0, np.array([med]), np.array([[err**2]]), image.shape, int(len(ratio)), mad, err,
                                  0.0, radius, factor)
    psf_flux, psf_err = cols["psfFlux"][idx][ok], cols["psfFluxErr"][idx][ok]
    good = (ref_flux[ok] > 0) & (ref_err[ok] > 0) & (psf_err > 0)
    if 0 < good.sum() < 3:
        ratio = ref_flux[ok][good] / psf_flux[good]
        sig = ratio * np.hypot(ref_err[ok][good] / ref_flux[ok][good], psf_err[good] / psf_flux[good])
        w = 1.0 / sig**2
        mean = float(np.sum(w * ratio) / np.sum(w))
        var = max(1.0 / float(np.sum(w)), float(np.var(ratio)))  # the spread of 2 stars, when it is larger
        err = math.sqrt(var)
        return ApertureCorrection(0, np.array([mean]), np.array([[var]]), image.shape, int(good.sum()),
                                  float(np.std(ratio)) / mean, err / mean, 0.0, radius, factor)
    fit = fit_aperture_correction(cols["x"][idx][ok], cols["y"][idx][ok], psf_flux, psf_err, ref_flux[ok],
                                  ref_err[ok], np.ones(int(ok.sum()), bool), image.shape, ref_radius=radius)
    return fit.with_total_factor(factor)


BAND_WAVELENGTH_NM = {"u": 368.0, "g": 480.0, "r": 620.0, "i": 754.0, "z": 869.0, "y": 971.0}


def diffraction_pixels(cfg, band: str, pixel_scale_arcsec: float) -> tuple[float, float]:
    """(lambda/D in pixels, linear obscuration) of the telescope in ``band`` (0, 0 when unknown);
    ``cfg`` has ``telescope_diameter_m`` and ``telescope_obscuration`` (single_frame, objects)."""
    lam = BAND_WAVELENGTH_NM.get(band)
    if lam is None or cfg.telescope_diameter_m <= 0:
        return 0.0, 0.0
    lod_arcsec = lam * 1e-9 / cfg.telescope_diameter_m * 180.0 / math.pi * 3600.0
    return lod_arcsec / pixel_scale_arcsec, float(cfg.telescope_obscuration)


def relcal_zero_point(ctx, zps: dict[tuple[int, int], float], visit: int, detector: int, fallback: float) -> float:
    """The relcal zero point of (visit, detector); ``fallback`` (the calexp's) when the quantum reads
    no relcal_solution; InsufficientInputs when it does but relcal left that band out (too few
    visits); NoWorkFound when relcal set that detector-visit aside (too few stars; its row has a NaN
    zero point): a release never mixes calibrations silently."""
    if not zps:
        return fallback
    if (visit, detector) not in zps:
        from ..errors import InsufficientInputs

        raise InsufficientInputs(f"relcal_solution has no zero point for visit {visit} detector {detector} "
                                 f"(its band was left out of the relative calibration: too few visits)",
                                 visit=visit, detector=detector)
    zp = zps[(visit, detector)]
    if not math.isfinite(zp):
        from ..errors import NoWorkFound

        raise NoWorkFound(f"visit {visit} detector {detector} was set aside by relcal (too few usable stars "
                          f"to calibrate it): not part of the release")
    return zp


def relcal_zero_points(ctx) -> dict[tuple[int, int], float]:
    """(visit, detector) -> relative-calibration zero point, when the quantum reads a relcal_solution
    (empty otherwise: the caller keeps the calexp's single-frame zero point)."""
    from ..repo.formats import read_columns

    refs = ctx.inputs_of("relcal_solution")
    if not refs:
        return {}
    sol = read_columns(ctx.repo.path_of(refs[0]), ["visit", "detector", "zeroPoint"])
    return {(int(v), int(d)): float(z) for v, d, z in zip(sol["visit"], sol["detector"], sol["zeroPoint"])}


def relcal_astrometric_corrections(ctx) -> dict[tuple[int, int], "AstrometricCorrection"]:
    """(visit, detector) -> relcal's astrometric correction of that ccdvisit, when the quantum reads a
    relcal_solution (empty otherwise; ccdvisits set aside, or a solution without astrometry, have
    none: their single-frame WCS is used)."""
    import json

    from ..algorithms.relcal_astrometry import correction_from_dict
    from ..repo.formats import read_columns

    refs = ctx.inputs_of("relcal_solution")
    if not refs:
        return {}
    sol = read_columns(ctx.repo.path_of(refs[0]))
    if "astromCorrection" not in sol:
        return {}
    return {(int(v), int(d)): correction_from_dict(json.loads(c))
            for v, d, c in zip(sol["visit"], sol["detector"], sol["astromCorrection"]) if c}


def calibrated_wcs(wcs: WCS, corrections: dict, visit: int, detector: int):
    """The calexp's WCS in relcal's calibrated frame (a CorrectedWcs) when relcal corrected this
    ccdvisit, else the WCS itself."""
    from ..algorithms.relcal_astrometry import CorrectedWcs

    corr = corrections.get((int(visit), int(detector)))
    return CorrectedWcs(wcs, corr) if corr is not None else wcs


def wcs_from_header(header: dict) -> WCS:
    """An astropy WCS from the FITS cards of an image HDU (TAN or TAN-SIP)."""
    keys = {k: v for k, v in header.items()
            if k[:2] in ("CT", "CR", "CD", "CU", "RA", "EQ", "WC", "A_", "B_", "AP", "BP", "LO", "LA", "PC")}
    return WCS(keys)


def box_wcs_header(wcs: WCS, box: tuple[int, int, int, int]) -> dict:
    """FITS cards of ``wcs`` for an image that starts at pixel (box[0], box[1])."""
    w = wcs.deepcopy()
    w.wcs.crpix = [w.wcs.crpix[0] - box[0], w.wcs.crpix[1] - box[1]]
    return dict(w.to_header(relax=True))
