"""Test doubles for the measurement kernels: an analytic GalSim PSF and a tiny detector.

:class:`GalSimPsf` implements the PSF protocol that :mod:`lsst_prod.algorithms.measure`
consumes (``image_at``, ``sigma_at``, ``fwhm_at``, ``moments_at``).  The profile is
a Moffat (beta=3.5 by default) or a Gaussian whose FWHM may vary linearly over
the detector, optionally plus a Gaussian halo whose flux fraction varies with x
(used to give psfFlux a known, position-dependent aperture correction).

Convention: the GalSim profile *is* the effective PSF (optics + atmosphere +
pixel response), so it is sampled at pixel centres (``method='no_pixel'``)
rather than integrated over pixels.  Stars in the tests are drawn with the same
function, so the model is exact.  The Moffat is truncated at ``size // 2`` pixels
so that a default stamp holds all of its flux: psfFlux then equals the total flux.
"""

from __future__ import annotations

import functools

import galsim
import numpy as np
from scipy import ndimage

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.footprints import Footprints


class GalSimPsf:
    """Analytic, position-dependent PSF drawn with GalSim (units: pixels)."""

    def __init__(
        self,
        fwhm: float = 4.0,
        beta: float | None = 3.5,
        size: int = 25,
        fwhm_gradient: tuple[float, float] = (0.0, 0.0),
        origin: tuple[float, float] = (512.0, 512.0),
        halo_fraction: tuple[float, float] = (0.0, 0.0),
        halo_sigma: float = 6.0,
        trunc: float | None = None,
    ) -> None:
        """``fwhm`` in pixels at ``origin``; it changes by ``fwhm_gradient`` (per pixel in x, y).

        ``beta=None`` gives a Gaussian.  ``halo_fraction = (f0, df/dx)`` adds a
        Gaussian halo (sigma ``halo_sigma`` px) carrying ``f0 + df/dx * x`` of the flux.
        """
        if size % 2 == 0:
            raise ValueError("stamp size must be odd")
        self.fwhm0 = float(fwhm)
        self.beta = beta
        self.size = int(size)
        self.gradient = (float(fwhm_gradient[0]), float(fwhm_gradient[1]))
        self.origin = (float(origin[0]), float(origin[1]))
        self.halo_fraction = (float(halo_fraction[0]), float(halo_fraction[1]))
        self.halo_sigma = float(halo_sigma)
        self.trunc = float(trunc) if trunc is not None else float(size // 2)

    # --- the profile -------------------------------------------------------------
    def fwhm_at(self, x: float, y: float) -> float:
        """FWHM of the core (pixels)."""
        return self.fwhm0 + self.gradient[0] * (x - self.origin[0]) + self.gradient[1] * (y - self.origin[1])

    def halo_at(self, x: float) -> float:
        """Fraction of the flux in the Gaussian halo at column ``x``."""
        return self.halo_fraction[0] + self.halo_fraction[1] * x

    def profile(self, x: float, y: float) -> galsim.GSObject:
        """Unit-flux GalSim profile at (x, y)."""
        return self._profile(round(self.fwhm_at(x, y), 4), round(self.halo_at(x), 6))

    @functools.lru_cache(maxsize=256)
    def _profile(self, fwhm: float, halo: float) -> galsim.GSObject:
        if self.beta is None:
            core = galsim.Gaussian(fwhm=fwhm)
        else:
            core = galsim.Moffat(beta=self.beta, fwhm=fwhm, trunc=self.trunc)
        if halo <= 0.0:
            return core
        return galsim.Add([core.withFlux(1.0 - halo), galsim.Gaussian(sigma=self.halo_sigma, flux=halo)])

    # --- the protocol ------------------------------------------------------------
    def image_at(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """Unit-sum (size, size) stamp centred at pixel (c + dx, c + dy), c = size // 2."""
        size = self.size if size is None else int(size)
        dx, dy = x - round(x), y - round(y)
        img = self.profile(x, y).drawImage(nx=size, ny=size, scale=1.0, offset=(dx, dy), method="no_pixel")
        arr = img.array.astype(np.float64)
        return arr / arr.sum()

    def moments_at(self, x: float, y: float) -> tuple[float, float, float]:
        """Adaptive second moments (ixx, iyy, ixy) of the PSF in pixels^2."""
        return self._moments(round(self.fwhm_at(x, y), 3), round(self.halo_at(x), 4))

    @functools.lru_cache(maxsize=256)
    def _moments(self, fwhm: float, halo: float) -> tuple[float, float, float]:
        img = self._profile(fwhm, halo).drawImage(nx=self.size, ny=self.size, scale=1.0, method="no_pixel")
        res = galsim.hsm.FindAdaptiveMom(img, guess_sig=fwhm / 2.3548)
        sigma, e1, e2 = res.moments_sigma, res.observed_shape.e1, res.observed_shape.e2
        trace = 2.0 * sigma**2 / np.sqrt(1.0 - e1 * e1 - e2 * e2)
        return (0.5 * trace * (1 + e1), 0.5 * trace * (1 - e1), 0.5 * trace * e2)

    def sigma_at(self, x: float, y: float) -> float:
        """Gaussian-equivalent sigma (pixels): sqrt of the mean adaptive second moment."""
        ixx, iyy, _ = self.moments_at(x, y)
        return float(np.sqrt(0.5 * (ixx + iyy)))

    # --- helpers for the tests ---------------------------------------------------
    def draw_star(self, image: np.ndarray, x: float, y: float, flux: float, size: int | None = None) -> None:
        """Add a star of ``flux`` electrons centred at (x, y) into ``image`` (in place)."""
        size = self.size if size is None else int(size)
        add_stamp(image, flux * self.image_at(x, y, size), x, y)


def add_stamp(image: np.ndarray, stamp: np.ndarray, x: float, y: float) -> None:
    """Add ``stamp`` with its centre pixel on pixel (round(x), round(y)), clipped at the edges."""
    c = stamp.shape[0] // 2
    x0, y0 = int(round(x)) - c, int(round(y)) - c
    ny, nx = image.shape
    ys, xs = slice(max(y0, 0), min(y0 + stamp.shape[0], ny)), slice(max(x0, 0), min(x0 + stamp.shape[1], nx))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    image[ys, xs] += stamp[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]


def detect(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    sigma: float,
    nsigma: float = 5.0,
    grow: int = 3,
) -> Footprints:
    """Minimal detection (PSF-smoothed threshold, grown footprints, 3x3 maxima as peaks).

    Sets the DETECTED bit of ``mask`` in place; a stand-in for the real detection stage.
    """
    smooth = ndimage.gaussian_filter(image, sigma, mode="constant")
    noise = np.sqrt(np.median(variance) / (4.0 * np.pi * sigma**2))
    snr = smooth / noise
    above = snr > nsigma
    grown = ndimage.binary_dilation(above, iterations=grow)
    labels, n = ndimage.label(grown)
    mask |= np.where(grown, masks.DETECTED, np.uint32(0)).astype(np.uint32)
    peaks = above & (snr == ndimage.maximum_filter(snr, size=3))
    py, px = np.nonzero(peaks)
    slices = ndimage.find_objects(labels)
    bbox = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.int64).reshape(-1, 4)
    return Footprints(
        labels=labels.astype(np.int32),
        bbox=bbox,
        area=np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64),
        peak_footprint=(labels[py, px] - 1).astype(np.int64),
        peak_x=px.astype(np.float64),
        peak_y=py.astype(np.float64),
        peak_significance=snr[py, px].astype(np.float64),
    )
