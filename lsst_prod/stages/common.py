"""Pieces several stage wrappers share (no numerics of their own: they call kernels)."""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS

from ..algorithms.apcorr import ApertureCorrection, fit_aperture_correction
from ..algorithms.neighbours import aperture_flux_without_neighbours

SKY_ANNULUS_PIX = (50.0, 70.0)  # measure_sources' default local-background annulus


def fit_apcorr_clean(image: np.ndarray, variance: np.ndarray, psf, cols: dict[str, np.ndarray],
                     stars: np.ndarray, radius: float, robust_constant: bool = False) -> ApertureCorrection:
    """Aperture correction (reference aperture / PSF flux) from the rows ``stars`` (bright isolated
    stars), their reference apertures measured with every other source's PSF model subtracted and
    the local annulus background removed (crowded fields; see algorithms/neighbours.py)."""
    leaf = cols["deblend_nChild"] == 0
    idx = np.flatnonzero(stars & leaf & (cols["parent_index"] < 0) & np.isfinite(cols["psfFlux"])
                         & (cols["psfFlux"] > 0))
    ref_flux, ref_err, ref_flag = aperture_flux_without_neighbours(
        image, variance, psf, cols["x"], cols["y"], np.where(leaf, cols["psfFlux"], 0.0), idx, radius)
    area = math.pi * radius**2
    ref_flux = ref_flux - cols["sky"][idx] * area
    n_annulus = math.pi * (SKY_ANNULUS_PIX[1] ** 2 - SKY_ANNULUS_PIX[0] ** 2)
    ref_err = np.hypot(ref_err, cols["skyErr"][idx] * area / math.sqrt(n_annulus))
    ok = ~ref_flag & np.isfinite(ref_flux) & ~cols["sky_flag"][idx]
    if robust_constant:
        # A constant: the median ratio (contamination of large apertures is one-sided, so a weighted
        # mean or polynomial is pulled up by it; on coadds the PSF model varies little anyway).
        ratio = ref_flux[ok] / cols["psfFlux"][idx][ok]
        if len(ratio) < 3:
            return ApertureCorrection(0, np.array([1.0]), np.zeros((1, 1)), image.shape, int(len(ratio)),
                                      float("nan"), float("nan"), 0.0, radius)
        med = float(np.median(ratio))
        mad = 1.4826 * float(np.median(np.abs(ratio - med)))
        err = 1.2533 * mad / math.sqrt(len(ratio))
        return ApertureCorrection(0, np.array([med]), np.array([[err**2]]), image.shape, int(len(ratio)), mad, err,
                                  0.0, radius)
    return fit_aperture_correction(cols["x"][idx][ok], cols["y"][idx][ok], cols["psfFlux"][idx][ok],
                                   cols["psfFluxErr"][idx][ok], ref_flux[ok], ref_err[ok],
                                   np.ones(int(ok.sum()), bool), image.shape, ref_radius=radius)


def relcal_zero_points(ctx) -> dict[tuple[int, int], float]:
    """(visit, detector) -> relative-calibration zero point, when the quantum reads a relcal_solution
    (empty otherwise: the caller keeps the calexp's single-frame zero point)."""
    from ..repo.formats import read_columns

    refs = ctx.inputs_of("relcal_solution")
    if not refs:
        return {}
    sol = read_columns(ctx.repo.path_of(refs[0]), ["visit", "detector", "zeroPoint"])
    return {(int(v), int(d)): float(z) for v, d, z in zip(sol["visit"], sol["detector"], sol["zeroPoint"])}


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
