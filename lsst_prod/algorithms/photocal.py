"""Photometric zero point of one exposure from matched reference stars.

The zero point ``zp`` is the AB magnitude of a source giving 1 electron in the
exposure: ``mag_AB = -2.5 log10(electrons) + zp``.  With AB = 31.4 - 2.5 log10(nJy),
the calibration factor is ``nJy_per_electron = 10**(-0.4 * (zp - 31.4))``.

Estimator: inverse-variance weighted mean of ``m_ref - m_inst`` with an intrinsic
scatter term (found so that chi^2 per degree of freedom is 1), iteratively
sigma-clipped about a median start so that variable stars, blends and bad
matches do not pull the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import AlgorithmError

AB_NJY_ZERO_POINT = 31.4  # AB magnitude of 1 nJy
_MAG_PER_FRAC = 2.5 / np.log(10.0)  # d(mag) / d(ln flux) = 1.0857


def intrinsic_scatter(residuals: np.ndarray, errors: np.ndarray, n_params: int = 1) -> float:
    """Extra scatter s such that sum(r^2 / (err^2 + s^2)) = N - n_params (0 if already <= that).

    ``residuals`` and ``errors`` in the same units; solved by bisection (monotonic).
    """
    r2, e2 = np.asarray(residuals, float) ** 2, np.asarray(errors, float) ** 2
    dof = max(len(r2) - n_params, 1)
    if len(r2) == 0 or np.sum(r2 / e2) <= dof:
        return 0.0
    lo, hi = 0.0, 10.0 * float(np.sqrt(np.max(r2))) + 1e-12  # sum < N / 100 <= dof at hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.sum(r2 / (e2 + mid * mid)) > dof:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PhotometricCalibration:
    """Result of :func:`fit_zero_point`.

    Attributes: ``zero_point`` (AB mag of 1 electron), ``zero_point_err`` (mag),
    ``nJy_per_electron``, ``n_used`` (stars kept after clipping), ``rms_mmag``
    (unweighted rms of the kept magnitude differences about the zero point, mmag),
    ``intrinsic_scatter_mmag`` and ``used`` (boolean mask over the input stars).
    """

    zero_point: float
    zero_point_err: float
    nJy_per_electron: float
    n_used: int
    rms_mmag: float
    intrinsic_scatter_mmag: float
    used: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, float | int]:
        """Scalars for provenance/metadata (the ``used`` mask is not included)."""
        return {
            "zero_point": self.zero_point,
            "zero_point_err": self.zero_point_err,
            "nJy_per_electron": self.nJy_per_electron,
            "n_used": self.n_used,
            "rms_mmag": self.rms_mmag,
            "intrinsic_scatter_mmag": self.intrinsic_scatter_mmag,
        }


def zero_point_to_njy_per_electron(zero_point: float) -> float:
    """Calibration factor (nJy per electron) of a zero point (AB mag of 1 electron)."""
    return float(10.0 ** (-0.4 * (zero_point - AB_NJY_ZERO_POINT)))


def fit_zero_point(
    inst_flux: np.ndarray,
    inst_flux_err: np.ndarray,
    ref_flux_njy: np.ndarray,
    ref_flux_err_njy: np.ndarray,
    good: np.ndarray | None = None,
    nsigma: float = 3.0,
    max_iter: int = 10,
    min_stars: int = 5,
) -> PhotometricCalibration:
    """Fit the zero point from instrumental fluxes (electrons) and reference fluxes (nJy).

    Parameters
    ----------
    inst_flux, inst_flux_err:
        Measured fluxes of the matched stars and their errors (electrons), e.g.
        aperture-corrected psfFlux.
    ref_flux_njy, ref_flux_err_njy:
        Reference-catalogue fluxes and errors (nJy) in the same band.
    good:
        Optional boolean pre-selection (unflagged, unsaturated, isolated stars).
    nsigma, max_iter:
        Clipping threshold (in units of the total per-star error) and iterations.
    min_stars:
        Raise :class:`~lsst_prod.errors.AlgorithmError` if fewer stars survive.
    """
    fi, ei = np.asarray(inst_flux, float), np.asarray(inst_flux_err, float)
    fr, er = np.asarray(ref_flux_njy, float), np.asarray(ref_flux_err_njy, float)
    ok = np.isfinite(fi) & np.isfinite(ei) & np.isfinite(fr) & np.isfinite(er) & (fi > 0) & (fr > 0)
    ok &= (ei > 0) & (er >= 0)
    if good is not None:
        ok &= np.asarray(good, bool)
    if ok.sum() < min_stars:
        raise AlgorithmError("too few stars for the photometric zero point", n_stars=int(ok.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (AB_NJY_ZERO_POINT - 2.5 * np.log10(fr)) + 2.5 * np.log10(fi)  # m_ref - m_inst
        sigma = _MAG_PER_FRAC * np.hypot(ei / fi, er / fr)
    sigma = np.maximum(sigma, 1e-4)  # 0.1 mmag floor: no star gets an infinite weight
    idx = np.flatnonzero(ok)
    d, s = delta[idx], sigma[idx]
    med = float(np.median(d))
    mad = 1.4826 * float(np.median(np.abs(d - med)))
    keep = np.abs(d - med) <= nsigma * np.sqrt(s * s + mad * mad)  # robust start
    zp, s_int = med, 0.0
    for _ in range(max_iter):
        if keep.sum() < min_stars:
            break
        s_int = intrinsic_scatter(d[keep] - np.median(d[keep]), s[keep])
        w = 1.0 / (s * s + s_int * s_int)
        zp = float(np.sum(w[keep] * d[keep]) / np.sum(w[keep]))
        s_int = intrinsic_scatter(d[keep] - zp, s[keep])
        w = 1.0 / (s * s + s_int * s_int)
        zp = float(np.sum(w[keep] * d[keep]) / np.sum(w[keep]))
        new_keep = np.abs(d - zp) <= nsigma * np.sqrt(s * s + s_int * s_int)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    if keep.sum() < min_stars:
        raise AlgorithmError("too few stars survive clipping for the zero point", n_stars=int(keep.sum()))
    zp_err = float(1.0 / np.sqrt(np.sum(w[keep])))
    used = np.zeros(len(fi), bool)
    used[idx[keep]] = True
    return PhotometricCalibration(
        zero_point=zp,
        zero_point_err=zp_err,
        nJy_per_electron=zero_point_to_njy_per_electron(zp),
        n_used=int(keep.sum()),
        rms_mmag=float(1e3 * np.sqrt(np.mean((d[keep] - zp) ** 2))),
        intrinsic_scatter_mmag=float(1e3 * s_int),
        used=used,
    )
