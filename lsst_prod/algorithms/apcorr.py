"""Aperture correction: the ratio of a large-aperture flux to psfFlux over the detector.

psfFlux uses a finite, unit-sum PSF model stamp, so it misses the flux in the
PSF wings; the correction ``ratio(x, y) = apFlux(ref radius) / psfFlux`` measured
on bright isolated stars puts psfFlux (and any other flux the stage chooses) on
the scale of the reference aperture (default 25 px), the one the photometric
calibration uses.  The ratio is fitted as a low-order 2-D Chebyshev polynomial in
detector coordinates with inverse-variance weights, an intrinsic-scatter term and
iterative sigma clipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import AlgorithmError
from .photocal import intrinsic_scatter


def _terms(order: int) -> list[tuple[int, int]]:
    """(i, j) exponents of T_i(u) T_j(v) with i + j <= order."""
    return [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]


def _design(x: np.ndarray, y: np.ndarray, order: int, shape: tuple[int, int]) -> np.ndarray:
    """Chebyshev design matrix (n, n_terms) with x, y scaled to [-1, 1] over the detector."""
    ny, nx = shape
    u = 2.0 * np.asarray(x, float) / max(nx - 1, 1) - 1.0
    v = 2.0 * np.asarray(y, float) / max(ny - 1, 1) - 1.0
    tu, tv = chebyshev.chebvander(u, order), chebyshev.chebvander(v, order)
    return np.stack([tu[..., i] * tv[..., j] for i, j in _terms(order)], axis=-1)


@dataclass(frozen=True)
class ApertureCorrection:
    """Fitted aperture correction; call it with pixel positions to get the ratio.

    Attributes
    ----------
    order:
        Total degree of the Chebyshev polynomial in (x, y).
    coefficients, covariance:
        Polynomial coefficients (ratio units) and their covariance.
    detector_shape:
        (ny, nx) of the detector, which defines the [-1, 1] scaling.
    n_used:
        Stars kept after clipping.
    rms:
        Scatter of the kept stars' ratios about the fit (fractional).
    error:
        1-sigma uncertainty of the fitted ratio, rms over the detector (fractional).
    intrinsic_scatter:
        Per-star scatter beyond the flux errors that the fit allowed for.
    ref_radius:
        Radius (pixels) of the reference aperture, for bookkeeping.
    """

    order: int
    coefficients: np.ndarray = field(repr=False)
    covariance: np.ndarray = field(repr=False)
    detector_shape: tuple[int, int]
    n_used: int
    rms: float
    error: float
    intrinsic_scatter: float
    ref_radius: float = 25.0

    def __call__(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Ratio reference-aperture flux / psfFlux at pixel (x, y)."""
        return _design(np.atleast_1d(x), np.atleast_1d(y), self.order, self.detector_shape) @ self.coefficients

    def error_at(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """1-sigma statistical uncertainty of the ratio at pixel (x, y)."""
        a = _design(np.atleast_1d(x), np.atleast_1d(y), self.order, self.detector_shape)
        return np.sqrt(np.einsum("ni,ij,nj->n", a, self.covariance, a))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation (for the stage's metadata/FITS header)."""
        return {
            "order": self.order,
            "coefficients": [float(c) for c in self.coefficients],
            "covariance": [[float(c) for c in row] for row in self.covariance],
            "detector_shape": [int(s) for s in self.detector_shape],
            "n_used": self.n_used,
            "rms": self.rms,
            "error": self.error,
            "intrinsic_scatter": self.intrinsic_scatter,
            "ref_radius": self.ref_radius,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApertureCorrection":
        return cls(
            order=int(data["order"]),
            coefficients=np.asarray(data["coefficients"], float),
            covariance=np.asarray(data["covariance"], float),
            detector_shape=(int(data["detector_shape"][0]), int(data["detector_shape"][1])),
            n_used=int(data["n_used"]),
            rms=float(data["rms"]),
            error=float(data["error"]),
            intrinsic_scatter=float(data["intrinsic_scatter"]),
            ref_radius=float(data.get("ref_radius", 25.0)),
        )


def fit_aperture_correction(
    x: np.ndarray,
    y: np.ndarray,
    psf_flux: np.ndarray,
    psf_flux_err: np.ndarray,
    ref_ap_flux: np.ndarray,
    ref_ap_flux_err: np.ndarray,
    good: np.ndarray,
    detector_shape: tuple[int, int],
    order: int = 1,
    nsigma: float = 3.0,
    max_iter: int = 10,
    ref_radius: float = 25.0,
) -> ApertureCorrection:
    """Fit ``ref_ap_flux / psf_flux`` (fluxes in electrons, positions in pixels) over the detector.

    ``good`` selects bright, isolated, unflagged stars.  The order is lowered
    until there are at least 3 stars per polynomial term; fewer than 3 usable
    stars raise :class:`~lsst_prod.errors.AlgorithmError`.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    p, pe = np.asarray(psf_flux, float), np.asarray(psf_flux_err, float)
    a, ae = np.asarray(ref_ap_flux, float), np.asarray(ref_ap_flux_err, float)
    ok = np.asarray(good, bool) & np.isfinite(p + pe + a + ae + x + y) & (p > 0) & (a > 0) & (pe > 0) & (ae > 0)
    idx = np.flatnonzero(ok)
    if len(idx) < 3:
        raise AlgorithmError("too few stars for the aperture correction", n_stars=int(len(idx)))
    while order > 0 and len(idx) < 3 * len(_terms(order)):
        order -= 1
    ratio = a[idx] / p[idx]
    sig = ratio * np.hypot(ae[idx] / a[idx], pe[idx] / p[idx])  # ignores the (positive) covariance
    design = _design(x[idx], y[idx], order, detector_shape)
    med = np.median(ratio)
    mad = 1.4826 * np.median(np.abs(ratio - med))
    keep = np.abs(ratio - med) <= max(nsigma, 5.0) * np.sqrt(sig * sig + mad * mad)  # gross outliers
    s_int = 0.0
    for _ in range(max_iter):
        if keep.sum() < len(_terms(order)) + 1:
            raise AlgorithmError("aperture-correction clipping left too few stars", n_stars=int(keep.sum()))
        for _pass in range(2):  # weights depend on the intrinsic scatter, which depends on the fit
            w = 1.0 / (sig * sig + s_int * s_int)
            aw = design[keep] * w[keep, None]
            cov = np.linalg.pinv(aw.T @ design[keep])
            coef = cov @ (aw.T @ ratio[keep])
            resid = ratio - design @ coef
            s_int = intrinsic_scatter(resid[keep], sig[keep], n_params=len(coef))
        new_keep = np.abs(resid) <= nsigma * np.sqrt(sig * sig + s_int * s_int)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    ny, nx = detector_shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 9))
    grid = _design(gx.ravel(), gy.ravel(), order, detector_shape)
    mean_ratio = float(np.mean(grid @ coef))
    err = float(np.sqrt(np.mean(np.einsum("ni,ij,nj->n", grid, cov, grid)))) / mean_ratio
    return ApertureCorrection(
        order=order,
        coefficients=coef,
        covariance=cov,
        detector_shape=(int(ny), int(nx)),
        n_used=int(keep.sum()),
        rms=float(np.sqrt(np.mean(resid[keep] ** 2))) / mean_ratio,
        error=err,
        intrinsic_scatter=float(s_int),
        ref_radius=float(ref_radius),
    )
