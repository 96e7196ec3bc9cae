"""Tests of lsst_prod.algorithms.kron against analytic Kron fractions (GalSim profiles)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import gammainc

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.kron import FLAG_NAMES, kron_photometry, moments_to_ellipse

SKY = 100.0


def _hsm(img: np.ndarray):
    """Adaptive moments (ixx, iyy, ixy) of a stamp (pixels^2)."""
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(img))
    s, e1, e2 = res.moments_sigma, res.observed_shape.e1, res.observed_shape.e2
    tr = 2 * s * s / np.sqrt(1 - e1 * e1 - e2 * e2)
    return 0.5 * tr * (1 + e1), 0.5 * tr * (1 - e1), 0.5 * tr * e2


def _draw(prof, n=161, method="auto"):
    return prof.drawImage(nx=n, ny=n, scale=1.0, method=method).array.astype(np.float64)


def _expected_exponential(h, ixx, iyy, ixy, k=2.5, n_sigma=6.0):
    """Analytic (r1 [px, circularised], flux fraction) for an exponential of scale h (circularised)."""
    a, b, _, _ = moments_to_ellipse(ixx, iyy, ixy)
    big_r = n_sigma * np.sqrt(a[0] * b[0])  # the 6-sigma ellipse, circularised
    r1 = h * 2.0 * gammainc(3, big_r / h) / gammainc(2, big_r / h)  # int r^2 e^-r/h / int r e^-r/h on [0, R]
    u = k * r1 / h
    return r1, 1.0 - (1.0 + u) * np.exp(-u)


def test_exponential_galaxy_kron_fraction():
    h, q = 4.0, 0.7
    flux = 1e6
    # sheared so that the area (hence the circularised scale) is preserved: a = h / sqrt(q), b = h sqrt(q)
    prof = galsim.Exponential(scale_radius=h).shear(q=q, beta=30 * galsim.degrees).withFlux(flux)
    img = _draw(prof)
    m = _hsm(img)
    rk, f, e, flags = kron_photometry(img, np.full(img.shape, SKY), None, 80.0, 80.0, *m)
    r1, frac = _expected_exponential(h, *m)
    print(f"exponential: R_K {rk[0]:.3f} (analytic {r1:.3f}), fraction {f[0] / flux:.4f} (analytic {frac:.4f})")
    assert f[0] / flux > 0.90
    assert f[0] / flux == pytest.approx(frac, abs=0.005)
    assert rk[0] == pytest.approx(r1, rel=0.01)
    assert 1 - 6 * np.exp(-5) == pytest.approx(0.9596, abs=1e-4)  # the untruncated Kron fraction for n = 1
    assert e[0] == pytest.approx(np.sqrt(SKY * np.pi * (2.5 * rk[0]) ** 2), rel=1e-6)
    assert not any(flags[name][0] for name in FLAG_NAMES)


def test_point_source_kron_fractions():
    # Gaussian PSF: r1 = sigma sqrt(pi/2), fraction = 1 - exp(-(2.5 r1)^2 / (2 sigma^2)) = 0.9926
    sigma = 1.8
    img = _draw(galsim.Gaussian(sigma=sigma).withFlux(1e5), 61, "no_pixel")
    m = _hsm(img)
    rk, f, _, _ = kron_photometry(img, np.ones(img.shape), None, 30.0, 30.0, *m)
    r1 = sigma * np.sqrt(np.pi / 2)
    assert rk[0] == pytest.approx(r1, rel=0.01)
    assert f[0] / img.sum() == pytest.approx(1 - np.exp(-((2.5 * r1 / sigma) ** 2) / 2), abs=0.003)
    # Moffat beta = 3.5, FWHM 4 px, truncated at 12 px: fraction from the radial profile
    moff = galsim.Moffat(beta=3.5, fwhm=4.0, trunc=12.0)
    img = _draw(moff.withFlux(1e5), 61, "no_pixel")
    m = _hsm(img)
    rk, f, _, _ = kron_photometry(img, np.ones(img.shape), None, 30.0, 30.0, *m)
    prof = lambda r: moff.xValue(galsim.PositionD(r, 0.0)) * 2 * np.pi * r  # noqa: E731
    big_r = 6.0 * np.sqrt(m[0])
    r1 = quad(lambda r: r * prof(r), 0, big_r)[0] / quad(prof, 0, big_r)[0]
    frac = quad(prof, 0, 2.5 * r1)[0] / quad(prof, 0, 12.0)[0]
    print(f"Moffat: R_K {rk[0]:.3f} (expected {r1:.3f}), fraction {f[0] / img.sum():.4f} (expected {frac:.4f})")
    assert rk[0] == pytest.approx(r1, rel=0.01)
    assert f[0] / img.sum() == pytest.approx(frac, abs=0.005)


def test_noisy_field_vectorised_errors():
    rng = np.random.default_rng(4)
    n_real, shape = 60, (200, 200)
    xs, ys = np.meshgrid(np.arange(30.0, 180, 40), np.arange(30.0, 180, 40))
    xs, ys = xs.ravel() + 0.3, ys.ravel() - 0.2
    prof = galsim.Exponential(half_light_radius=3.0).shear(e1=0.2, e2=-0.1).withFlux(2e4)
    model = np.zeros(shape)
    for x, y in zip(xs, ys):
        st = prof.drawImage(nx=61, ny=61, scale=1.0, offset=(x - round(x), y - round(y))).array
        model[int(round(y)) - 30: int(round(y)) + 31, int(round(x)) - 30: int(round(x)) + 31] += st
    m = _hsm(prof.drawImage(nx=61, ny=61, scale=1.0).array)
    var = SKY + model
    fluxes, errs = [], []
    for _ in range(n_real):
        noisy = model + rng.normal(size=shape) * np.sqrt(var)
        _, f, e, flags = kron_photometry(noisy, var, np.zeros(shape, np.uint32), xs, ys, *m)
        assert not flags["kronFlux_flag"].any()
        fluxes.append(f)
        errs.append(e)
    fluxes, errs = np.array(fluxes), np.array(errs)
    _, f0, _, _ = kron_photometry(model, var, None, xs, ys, *m)
    print("Kron flux scatter / reported error:", np.median(fluxes.std(0) / errs.mean(0)).round(3))
    # the reported error ignores the noise of the radius: it is slightly optimistic
    assert 0.9 < np.median(fluxes.std(0) / errs.mean(0)) < 1.25
    assert abs(np.median(fluxes.mean(0) / f0 - 1)) < 0.01


def test_flags_and_edge_cases():
    img = _draw(galsim.Gaussian(sigma=1.5).withFlux(1e4), 41, "no_pixel")
    var = np.ones(img.shape)
    m = _hsm(img)
    msk = np.zeros(img.shape, np.uint32)
    msk[20, 21] = masks.CR
    x = np.array([20.0, 20.0, 2.0, 20.0, 20.0, np.nan])
    ixx = np.array([m[0], m[0], m[0], np.nan, m[0], m[0]])
    iyy = np.array([m[1], m[1], m[1], m[1], -1.0, m[1]])
    ixy = np.full(6, m[2])
    rk, f, e, fl = kron_photometry(img, var, msk, x, np.full(6, 20.0), ixx, iyy, ixy, min_radius=3.0)
    assert fl["kronFlux_flag_small_radius"][0] and rk[0] == 3.0  # R_K ~ 1.9 px raised to 3
    assert fl["kronFlux_flag_masked"][0] and not fl["kronFlux_flag"][0]
    # a masked pixel next to the peak: the area correction assumes a flat profile (5% low here)
    assert 0.9 * 1e4 < f[0] < 1e4
    assert fl["kronFlux_flag_edge"][2] and fl["kronFlux_flag"][2]
    for i in (3, 4, 5):
        assert fl["kronFlux_flag_bad_shape"][i] and fl["kronFlux_flag"][i] and np.isnan(f[i]) and np.isnan(rk[i])
    # nothing but negative pixels: no radius
    rk, f, _, fl = kron_photometry(-img, var, None, 20.0, 20.0, *m)
    assert fl["kronFlux_flag_bad_radius"][0] and fl["kronFlux_flag"][0] and np.isnan(f[0])
    a, b, theta, ok = moments_to_ellipse(4.0, 1.0, 0.0)
    assert (a[0], b[0], theta[0], ok[0]) == (2.0, 1.0, 0.0, True)
    a, b, theta, ok = moments_to_ellipse(1.0, 4.0, 0.0)
    assert (a[0], b[0], abs(theta[0]), ok[0]) == (2.0, 1.0, np.pi / 2, True)
