"""Small simulation helpers for the pixel-kernel tests (exposed as fixtures)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest


def _draw_moffat_field(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm,
    g1=0.0,
    g2=0.0,
    beta: float = 3.5,
    stamp: int = 61,
) -> np.ndarray:
    """Noise-free image (electrons) of Moffat stars at 0-based (x, y).

    ``fwhm``, ``g1``, ``g2`` are scalars or callables of (x, y).
    """
    ny, nx = shape
    img = galsim.ImageF(nx, ny, scale=1.0)  # galsim pixel (i, j) 1-based = our (i-1, j-1)
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux)):
        fw = fwhm(xi, yi) if callable(fwhm) else fwhm
        s1 = g1(xi, yi) if callable(g1) else g1
        s2 = g2(xi, yi) if callable(g2) else g2
        prof = galsim.Moffat(beta=beta, fwhm=fw).shear(g1=s1, g2=s2).withFlux(float(fi))
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        st = galsim.ImageF(stamp, stamp, scale=1.0)
        st.setCenter(ix + 1, iy + 1)
        prof.drawImage(image=st, offset=(xi - ix, yi - iy))
        b = st.bounds & img.bounds
        if b.isDefined():
            img[b] += st[b]
    return img.array.astype(np.float64)


def _true_psf(fwhm: float, g1: float, g2: float, dx: float, dy: float, size: int, beta: float = 3.5) -> np.ndarray:
    """Unit-sum (size, size) pixelized Moffat centred at stamp pixel (c+dx, c+dy), c = size//2."""
    prof = galsim.Moffat(beta=beta, fwhm=fwhm).shear(g1=g1, g2=g2)
    arr = prof.drawImage(nx=size, ny=size, scale=1.0, offset=(dx, dy)).array.astype(np.float64)
    return arr / arr.sum()


def _simulate_raw(electrons: np.ndarray, det, bias: np.ndarray, flat: np.ndarray, rng, defects=None, row_offset=None):
    """Raw uint16 image following the simulator contract (see the task brief / docs)."""
    ny, nx = electrons.shape
    e = rng.poisson(np.maximum(electrons, 0)).astype(np.float64)
    if row_offset is None:
        row_offset = np.zeros(ny)
    rn_adu = det.read_noise / det.gain
    img = det.bias_level_adu + row_offset[:, None] + bias + e * flat / det.gain + rn_adu * rng.standard_normal((ny, nx))
    ov = det.bias_level_adu + row_offset[:, None] + rn_adu * rng.standard_normal((ny, det.overscan))
    raw = np.concatenate([img, ov], axis=1)
    if defects is not None:
        garbage = rng.uniform(0, 5000, size=int(defects.sum()))
        raw[:, :nx][defects] = garbage
    raw = np.clip(np.round(raw), 0, det.saturation_adu)
    return raw.astype(np.uint16)


@pytest.fixture(scope="session")
def draw_moffat_field():
    return _draw_moffat_field


@pytest.fixture(scope="session")
def true_psf():
    return _true_psf


@pytest.fixture(scope="session")
def simulate_raw():
    return _simulate_raw
