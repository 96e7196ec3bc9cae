"""Aperture correction: the ratio of a large-aperture flux to psfFlux over the detector.

psfFlux uses a finite, unit-sum PSF model stamp, so it misses the flux in the
PSF wings; the correction ``ratio(x, y) = apFlux(ref radius) / psfFlux`` measured
on bright isolated stars puts psfFlux (and any other flux the stage chooses) on
the scale of the reference aperture (default 25 px), the one the photometric
calibration uses.  The ratio is fitted as a low-order 2-D Chebyshev polynomial in
detector coordinates with inverse-variance weights, an intrinsic-scatter term and
iterative sigma clipping (optionally, the highest-degree terms are kept only when
they are significant, a Wald test).

The light beyond the stars' apertures (a Kolmogorov x Airy PSF has ~1 % of its
flux beyond 4 FWHM, ~0.35 % beyond 8) is in no aperture; :func:`kolmogorov_wing_fraction`
gives it from turbulence theory and the telescope's diffraction at the measured FWHM,
and ``ApertureCorrection.total_factor`` carries it, so that the corrected fluxes are
total fluxes, the quantity a reference catalogue gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import functools
import math

import numpy as np
from numpy.polynomial import chebyshev
from scipy.stats import chi2 as _chi2

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
    total_factor:
        Total flux / flux within ``ref_radius`` (1 + the PSF wing fraction beyond it), multiplied
        into the ratio; 1.0 = the correction stops at the reference aperture.
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
    total_factor: float = 1.0

    def __call__(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Ratio (total flux, or reference-aperture flux when ``total_factor`` is 1) / psfFlux at (x, y)."""
        a = _design(np.atleast_1d(x), np.atleast_1d(y), self.order, self.detector_shape)
        return self.total_factor * (a @ self.coefficients)

    def error_at(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """1-sigma statistical uncertainty of the ratio at pixel (x, y)."""
        a = _design(np.atleast_1d(x), np.atleast_1d(y), self.order, self.detector_shape)
        return self.total_factor * np.sqrt(np.einsum("ni,ij,nj->n", a, self.covariance, a))

    def with_total_factor(self, factor: float) -> "ApertureCorrection":
        """The same fit with ``total_factor`` set (see :func:`kolmogorov_wing_fraction`)."""
        from dataclasses import replace

        return replace(self, total_factor=float(factor))

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
            "total_factor": self.total_factor,
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
            total_factor=float(data.get("total_factor", 1.0)),
        )


def _fit_fixed_order(ratio, sig, x, y, order, detector_shape, nsigma, max_iter):
    """Weighted, intrinsic-scatter, clipped fit of one order: (coef, cov, keep, resid, s_int)."""
    design = _design(x, y, order, detector_shape)
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
    return coef, cov, keep, resid, s_int


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
    significance: float | None = None,
) -> ApertureCorrection:
    """Fit ``ref_ap_flux / psf_flux`` (fluxes in electrons, positions in pixels) over the detector.

    ``good`` selects bright, isolated, unflagged stars.  The order is lowered
    until there are at least 3 stars per polynomial term, and then, with
    ``significance`` given, while the terms of the highest degree are not
    significant: a Wald test of those coefficients against zero with their
    covariance, chi^2 tail probability above ``significance``.  (Not by default:
    on the tiny test survey the Wald test at 0.01 dropped order 1 on most detectors
    and the high-S/N flux pulls widened from 1.4 to 2.3, i.e. the gradients the
    individual stars cannot show are real in aggregate.)  Fewer than 3 usable stars raise :class:`~lsst_prod.errors.AlgorithmError`.
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
    while True:
        coef, cov, keep, resid, s_int = _fit_fixed_order(ratio, sig, x[idx], y[idx], order, detector_shape,
                                                         nsigma, max_iter)
        if order == 0 or significance is None:
            break
        top = [k for k, (i, j) in enumerate(_terms(order)) if i + j == order]
        c, cv = coef[top], cov[np.ix_(top, top)]
        wald = float(c @ np.linalg.pinv(cv) @ c)
        if _chi2.sf(wald, len(top)) < significance:
            break
        order -= 1
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


#: Radius (in FWHM) at which single-frame processing measures the stars' apertures when the correction goes
#: on to the total flux: 4x less sky area than 8 FWHM (2x less aperture noise, 4x less contamination from
#: neighbours and local-background error), and the r^-11/3 wing beyond it is good to ~2 parts per thousand.
APCORR_MEASURE_RADIUS_FWHM = 4.0
MIN_APCORR_MEASURE_RADIUS_PIXELS = 12.0


def apcorr_measure_radius(fwhm_pix: float) -> float:
    """Radius (pixels) of the stars' apertures for a total-flux aperture correction: max(12, 4 FWHM)."""
    return float(max(MIN_APCORR_MEASURE_RADIUS_PIXELS, APCORR_MEASURE_RADIUS_FWHM * float(fwhm_pix)))


#: Power-law index of the PSF's outer wings, I(r) ~ r^-index: Kolmogorov turbulence (Fried 1966; the
#: structure function D(r) ~ r^5/3 makes the long-exposure PSF fall as r^-11/3 beyond a few FWHM).
KOLMOGOROV_WING_INDEX = 11.0 / 3.0


@functools.lru_cache(maxsize=256)
def kolmogorov_wing_fraction(fwhm_pix: float, radius: float, lam_over_diam_pix: float = 0.0,
                             obscuration: float = 0.0) -> float:
    """(light beyond ``radius``) / (light within) of a Kolmogorov PSF (with the pixel response) whose
    Gaussian-equivalent adaptive-moment FWHM is ``fwhm_pix`` (the PSF model's ``fwhm_at``).

    Theory, not a fit: the long-exposure PSF of Kolmogorov turbulence is self-similar in its FWHM, so the
    light beyond k FWHM is a universal function of k (1.1-1.2 % at 4 FWHM, 0.35-0.4 % at 8, falling as
    k^-5/3).  A pixel PSF model's wings beyond ~3 FWHM are not good enough for this (measured on the test
    surveys: 0.4x to 7x the truth, from per-star background pedestals and masked neighbours), nor are
    8-FWHM apertures of single stars (sky noise).  GalSim draws the profile (atmospheric FWHM solved so
    that HSM's adaptive moments of the pixelised profile give ``fwhm_pix``, 3 iterations) and the exact
    circular aperture (sep, ``subpix=0``) gives the light within ``radius``; the profile has unit flux.
    ``lam_over_diam_pix`` > 0: the profile is convolved with the telescope's (obscured) Airy pattern,
    whose r^-3 wings matter: for an 8.4 m, 61 %-obscured telescope they add ~0.15 % beyond 4 FWHM and
    ~0.12 % beyond 8 FWHM to the Kolmogorov's 0.82 % and 0.24 %.
    """
    import galsim
    import sep

    fwhm_pix, radius = float(fwhm_pix), float(radius)
    f = fwhm_pix
    n_mom = 2 * int(math.ceil(6 * fwhm_pix)) + 1
    big = galsim.GSParams(maximum_fft_size=16384)

    def profile(f_atm: float):
        atm = galsim.Kolmogorov(fwhm=f_atm, gsparams=big)
        if lam_over_diam_pix > 0:
            return galsim.Convolve(atm, galsim.Airy(lam_over_diam=float(lam_over_diam_pix),
                                                    obscuration=float(obscuration), gsparams=big), gsparams=big)
        return atm

    for _ in range(3):
        im = profile(f).drawImage(nx=n_mom, ny=n_mom, scale=1.0)
        sigma = im.FindAdaptiveMom().moments_sigma
        f *= fwhm_pix / (2.3548200450309493 * sigma)
    n = 2 * int(math.ceil(radius)) + 5
    arr = profile(f).drawImage(nx=n, ny=n, scale=1.0).array.astype(np.float64)
    c = (n - 1) / 2.0
    within, _, _ = sep.sum_circle(np.ascontiguousarray(arr), [c], [c], radius, subpix=0)
    w = float(within[0])
    return float((1.0 - w) / w)


def extended_psf_image(psf_image: np.ndarray, fwhm: float, half: int,
                       index: float = KOLMOGOROV_WING_INDEX, diffraction: tuple[float, float] = (0.0, 0.0)
                       ) -> np.ndarray:
    """The centred model stamp embedded in a (2 half + 1)^2 stamp whose pixels outside it follow the
    Kolmogorov wing ``A r^-index`` (units of the model stamp's sum; for the light of a star's aperture that
    falls off the image)."""
    img = np.asarray(psf_image, float)
    n, h0 = img.shape[0], img.shape[0] // 2
    half = max(int(half), h0)
    # amplitude such that the wing beyond the stamp's inscribed radius h0 + 1/2 holds what a Kolmogorov
    # PSF of this FWHM has there (kolmogorov_wing_fraction; the model stamp itself has unit sum)
    r0 = h0 + 0.5
    t0 = kolmogorov_wing_fraction(round(float(fwhm), 3), round(r0, 3), *diffraction)
    amp = t0 * (index - 2.0) / (2.0 * math.pi * r0 ** (2.0 - index))
    yy, xx = np.mgrid[: 2 * half + 1, : 2 * half + 1] - half
    r = np.maximum(np.hypot(xx, yy), 1.0)
    out = amp * r ** (-index) if np.isfinite(amp) and amp > 0 else np.zeros_like(r)
    out[half - h0 : half - h0 + n, half - h0 : half - h0 + n] = img
    return out
