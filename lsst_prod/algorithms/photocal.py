"""Photometric zero point of one exposure from matched reference stars.

The zero point ``zp`` is the AB magnitude of a source giving 1 electron in the
exposure: ``mag_AB = -2.5 log10(electrons) + zp``.  With AB = 31.4 - 2.5 log10(nJy),
the calibration factor is ``nJy_per_electron = 10**(-0.4 * (zp - 31.4))``.

Estimator: inverse-variance weighted mean of ``m_ref - m_inst`` with an intrinsic
scatter term (found so that chi^2 per degree of freedom is 1), iteratively
sigma-clipped about a median start so that variable stars, blends and bad
matches do not pull the mean.

Colour term (optional, ``colour`` given): ``m_ref - m_inst = zp + k (c - c0)`` with ``c`` a
reference colour (e.g. Gaia BP-RP) and ``c0`` a fixed pivot; ``k`` has a Gaussian prior
N(k_prior, sigma_k^2) and is held at ``k_prior`` when fewer than ``colour_min_stars``
stars are used.  ``zero_point`` is then the zero point at the pivot colour: calibrated
magnitudes are in the instrument's natural system, equal to the reference system at c0.
"""

from __future__ import annotations

import math
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
    colour_term: float = 0.0
    colour_term_err: float = float("nan")
    colour_pivot: float = float("nan")
    colour_term_fitted: bool = False
    #: True for :func:`provisional_zero_point`'s median of too few stars for a fit
    provisional: bool = False

    def to_dict(self) -> dict[str, float | int]:
        """Scalars for provenance/metadata (the ``used`` mask is not included)."""
        return {
            "zero_point": self.zero_point,
            "zero_point_err": self.zero_point_err,
            "nJy_per_electron": self.nJy_per_electron,
            "n_used": self.n_used,
            "rms_mmag": self.rms_mmag,
            "intrinsic_scatter_mmag": self.intrinsic_scatter_mmag,
            "colour_term": self.colour_term,
            "colour_term_err": self.colour_term_err,
            "colour_pivot": self.colour_pivot,
            "colour_term_fitted": self.colour_term_fitted,
        }


def zero_point_to_njy_per_electron(zero_point: float) -> float:
    """Calibration factor (nJy per electron) of a zero point (AB mag of 1 electron)."""
    return float(10.0 ** (-0.4 * (zero_point - AB_NJY_ZERO_POINT)))


def _weighted_fit(d: np.ndarray, x: np.ndarray | None, w: np.ndarray, k_prior: float,
                  k_info: float) -> tuple[float, float, float, float]:
    """(zp, k, var_zp, var_k) of d = zp + k x with weights w and the prior k ~ N(k_prior, 1/k_info)
    (x None: zp only, k = k_prior held)."""
    if x is None:
        sw = float(np.sum(w))
        return float(np.sum(w * d) / sw), k_prior, 1.0 / sw, 0.0
    n = np.array([[np.sum(w), np.sum(w * x)], [np.sum(w * x), np.sum(w * x * x) + k_info]])
    b = np.array([np.sum(w * d), np.sum(w * x * d) + k_info * k_prior])
    cov = np.linalg.inv(n)
    sol = cov @ b
    return float(sol[0]), float(sol[1]), float(cov[0, 0]), float(cov[1, 1])


def _usable_stars(inst_flux, inst_flux_err, ref_flux_njy, ref_flux_err_njy, colour):
    """The inputs as float arrays (colour None stays None) and the stars usable for a zero point: finite,
    positive fluxes and errors (a reference error may be 0), a finite colour when colours are given."""
    fi, ei = np.asarray(inst_flux, float), np.asarray(inst_flux_err, float)
    fr, er = np.asarray(ref_flux_njy, float), np.asarray(ref_flux_err_njy, float)
    ok = np.isfinite(fi) & np.isfinite(ei) & np.isfinite(fr) & np.isfinite(er) & (fi > 0) & (fr > 0)
    ok &= (ei > 0) & (er >= 0)
    col = None if colour is None else np.asarray(colour, float)
    if col is not None:
        ok &= np.isfinite(col)
    return fi, ei, fr, er, col, ok


def fit_zero_point(
    inst_flux: np.ndarray,
    inst_flux_err: np.ndarray,
    ref_flux_njy: np.ndarray,
    ref_flux_err_njy: np.ndarray,
    good: np.ndarray | None = None,
    nsigma: float = 3.0,
    max_iter: int = 10,
    min_stars: int = 5,
    *,
    colour: np.ndarray | None = None,
    colour_pivot: float = 1.0,
    colour_term_prior: float = 0.0,
    colour_term_prior_sigma: float = 0.05,
    colour_min_stars: int = 20,
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
    colour, colour_pivot, colour_term_prior, colour_term_prior_sigma, colour_min_stars:
        Optional reference colour per star (stars with a non-finite colour are left out):
        fit ``m_ref - m_inst = zp + k (colour - colour_pivot)`` with the prior
        ``k ~ N(colour_term_prior, colour_term_prior_sigma^2)`` (sigma 0 or fewer than
        ``colour_min_stars`` used stars: ``k`` held at ``colour_term_prior``).
        ``zero_point`` is the zero point at the pivot colour.
    """
    fi, ei, fr, er, col, ok = _usable_stars(inst_flux, inst_flux_err, ref_flux_njy, ref_flux_err_njy, colour)
    if good is not None:
        ok &= np.asarray(good, bool)
    with_colour = col is not None
    if ok.sum() < min_stars:
        raise AlgorithmError("too few stars for the photometric zero point", n_stars=int(ok.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (AB_NJY_ZERO_POINT - 2.5 * np.log10(fr)) + 2.5 * np.log10(fi)  # m_ref - m_inst
        sigma = _MAG_PER_FRAC * np.hypot(ei / fi, er / fr)
    sigma = np.maximum(sigma, 1e-4)  # 0.1 mmag floor: no star gets an infinite weight
    idx = np.flatnonzero(ok)
    d, s = delta[idx], sigma[idx]
    x = (col[idx] - colour_pivot) if with_colour else None
    k_info = 1.0 / colour_term_prior_sigma**2 if (with_colour and colour_term_prior_sigma > 0) else 0.0
    k0 = float(colour_term_prior) if with_colour else 0.0
    d_held = d - k0 * x if with_colour else d  # the colour term held at its prior value
    med = float(np.median(d_held))
    mad = 1.4826 * float(np.median(np.abs(d_held - med)))
    keep = np.abs(d_held - med) <= nsigma * np.sqrt(s * s + mad * mad)  # robust start
    zp, k, s_int, var_zp, var_k = med, k0, 0.0, 0.0, 0.0
    fitted = False

    def model(zp_: float, k_: float) -> np.ndarray:
        return zp_ + k_ * x if with_colour else np.full(len(d), zp_)

    for _ in range(max_iter):
        if keep.sum() < min_stars:
            break
        fitted = with_colour and k_info > 0 and keep.sum() >= max(colour_min_stars, 3)
        xs = x[keep] if fitted else None
        dk = d[keep] if fitted else d_held[keep]
        n_par = 2 if fitted else 1
        s_int = intrinsic_scatter(dk - np.median(dk), s[keep], n_par)
        for _pass in range(2):
            w = 1.0 / (s[keep] ** 2 + s_int * s_int)
            zp, k, var_zp, var_k = _weighted_fit(dk, xs, w, k0, k_info)
            s_int = intrinsic_scatter(d[keep] - model(zp, k)[keep], s[keep], n_par)
        w = 1.0 / (s[keep] ** 2 + s_int * s_int)
        zp, k, var_zp, var_k = _weighted_fit(dk, xs, w, k0, k_info)
        new_keep = np.abs(d - model(zp, k)) <= nsigma * np.sqrt(s * s + s_int * s_int)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    if keep.sum() < min_stars:
        raise AlgorithmError("too few stars survive clipping for the zero point", n_stars=int(keep.sum()))
    used = np.zeros(len(fi), bool)
    used[idx[keep]] = True
    resid = d[keep] - model(zp, k)[keep]
    return PhotometricCalibration(
        zero_point=zp,
        zero_point_err=float(np.sqrt(var_zp)),
        nJy_per_electron=zero_point_to_njy_per_electron(zp),
        n_used=int(keep.sum()),
        rms_mmag=float(1e3 * np.sqrt(np.mean(resid**2))),
        intrinsic_scatter_mmag=float(1e3 * s_int),
        used=used,
        colour_term=float(k) if with_colour else 0.0,
        colour_term_err=float(np.sqrt(var_k)) if fitted else float("nan"),
        colour_pivot=float(colour_pivot) if with_colour else float("nan"),
        colour_term_fitted=bool(fitted),
    )


def provisional_zero_point(
    inst_flux: np.ndarray,
    inst_flux_err: np.ndarray,
    ref_flux_njy: np.ndarray,
    ref_flux_err_njy: np.ndarray,
    *,
    colour: np.ndarray | None = None,
    colour_pivot: float = 1.0,
    colour_term_prior: float = 0.0,
) -> PhotometricCalibration:
    """The zero point of a detector with fewer stars than :func:`fit_zero_point` needs (a sparse sky):
    the median of ``m_ref - m_inst`` (the colour term held at ``colour_term_prior``) over the usable
    stars, flagged ``provisional``.  No clipping is possible with so few: one bad star of four moves it
    by up to 0.2 mag on a sparse test sky, so it is a start for the global relative calibration (which
    solves every ccdvisit's zero point from its stars matched across visits), not a calibration.  Its
    error is the median's (1.25 x the scatter / sqrt(n), at least the stars' own errors).  AlgorithmError
    when no star is usable."""
    fi, ei, fr, er, col, ok = _usable_stars(inst_flux, inst_flux_err, ref_flux_njy, ref_flux_err_njy, colour)
    if not ok.any():
        raise AlgorithmError("no star for a photometric zero point", n_stars=0)
    d = (AB_NJY_ZERO_POINT - 2.5 * np.log10(fr[ok])) + 2.5 * np.log10(fi[ok])
    if col is not None:
        d = d - float(colour_term_prior) * (col[ok] - colour_pivot)
    sig = _MAG_PER_FRAC * np.hypot(ei[ok] / fi[ok], er[ok] / fr[ok])
    zp = float(np.median(d))
    n = int(ok.sum())
    spread = float(np.std(d, ddof=1)) if n > 1 else 0.0
    err = max(1.2533 * spread / math.sqrt(n), float(np.sqrt(1.0 / np.sum(1.0 / sig**2))))
    return PhotometricCalibration(
        zero_point=zp,
        zero_point_err=err,
        nJy_per_electron=zero_point_to_njy_per_electron(zp),
        n_used=n,
        rms_mmag=float(1e3 * np.sqrt(np.mean((d - zp) ** 2))),
        intrinsic_scatter_mmag=float("nan"),
        used=ok.copy(),
        colour_term=float(colour_term_prior) if col is not None else 0.0,
        colour_pivot=float(colour_pivot) if col is not None else float("nan"),
        provisional=True,
    )
