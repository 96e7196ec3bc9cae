"""Tests of lsst_prod.algorithms.apcorr."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sep

from lsst_prod.algorithms.apcorr import ApertureCorrection, fit_aperture_correction
from lsst_prod.algorithms.measure import measure_sources
from lsst_prod.errors import AlgorithmError

try:
    from ._psf_double import GalSimPsf, detect
except ImportError:  # tests/algorithms is not a package
    from _psf_double import GalSimPsf, detect

SHAPE = (1024, 1024)


def test_recovers_position_dependent_wing_correction_to_0p1_percent():
    """Stars drawn with a PSF whose halo fraction grows with x; measured with the core-only model."""
    core = GalSimPsf(fwhm=4.0)
    truth = GalSimPsf(fwhm=4.0, halo_fraction=(0.02, 0.04 / (SHAPE[1] - 1)), halo_sigma=5.0)

    def true_ratio(x, y):
        """25-px aperture flux / noise-free psfFlux of a unit star (independent of measure_sources)."""
        star = truth.image_at(x, y, 81)  # the halo beyond 40 px is negligible (8 sigma)
        model = core.image_at(x, y, 25)
        amp = (model * star[28:53, 28:53]).sum() / (model * model).sum()
        ap = sep.sum_circle(star, np.array([40 + x - round(x)]), np.array([40 + y - round(y)]), 25.0, subpix=0)[0]
        return ap[0] / amp

    rng = np.random.default_rng(2)
    model = np.zeros(SHAPE)
    for gx in np.arange(40, 1000, 64):
        for gy in np.arange(40, 1000, 64):
            x, y = gx + rng.uniform(-8, 8), gy + rng.uniform(-8, 8)
            truth.draw_star(model, x, y, np.exp(rng.uniform(np.log(1e5), np.log(1e6))), size=61)
    var = 100.0 + model
    image = model + rng.normal(size=SHAPE) * np.sqrt(var)
    mask = np.zeros(SHAPE, np.uint32)
    cat = measure_sources(image, var, mask, detect(image, var, mask, sigma=1.7), core)
    good = (cat["deblend_nChild"] == 0) & (cat["parent_index"] < 0) & ~cat["psfFlux_flag"] & ~cat["ap25Flux_flag"]
    good &= cat["psfFlux"] / cat["psfFluxErr"] > 100
    assert good.sum() > 200
    apc = fit_aperture_correction(
        cat["x"], cat["y"], cat["psfFlux"], cat["psfFluxErr"], cat["ap25Flux"], cat["ap25FluxErr"], good, SHAPE
    )
    grid = np.linspace(0, SHAPE[1] - 1, 5)
    expected = np.array([true_ratio(gx, gy) for gy in grid for gx in grid])
    assert np.ptp(expected) > 0.025  # a real, position-dependent correction (1.4% -> 4.5%)
    fitted = np.array([apc(gx, gy)[0] for gy in grid for gx in grid])
    np.testing.assert_allclose(fitted, expected, rtol=1e-3)
    assert apc.error < 5e-4 and apc.n_used >= 200 and apc.order == 1


def test_synthetic_quadratic_field_with_outliers_and_serialisation():
    rng = np.random.default_rng(3)
    n = 400
    x, y = rng.uniform(0, 2047, n), rng.uniform(0, 4095, n)
    u, v = x / 2047 * 2 - 1, y / 4095 * 2 - 1
    ratio = 1.05 + 0.01 * u - 0.008 * v + 0.004 * u * v + 0.006 * (2 * v * v - 1)
    psf = np.exp(rng.uniform(np.log(2e4), np.log(2e6), n))
    psf_err, ap_err = 0.002 * psf, 0.003 * psf * ratio
    ap = psf * ratio * (1 + rng.normal(0, 0.003, n)) * (1 + rng.normal(0, 0.002, n))
    bad = rng.choice(n, 30, replace=False)
    ap[bad] *= rng.uniform(1.05, 1.3, 30)  # unrecognised neighbours in the aperture
    apc = fit_aperture_correction(x, y, psf, psf_err, ap, ap_err, np.ones(n, bool), (4096, 2048), order=2)
    gx, gy = rng.uniform(0, 2047, 100), rng.uniform(0, 4095, 100)
    gu, gv = gx / 2047 * 2 - 1, gy / 4095 * 2 - 1
    truth = 1.05 + 0.01 * gu - 0.008 * gv + 0.004 * gu * gv + 0.006 * (2 * gv * gv - 1)
    np.testing.assert_allclose(apc(gx, gy), truth, rtol=2.5e-3)
    assert np.all(np.abs(apc(gx, gy) - truth) < 4 * apc.error_at(gx, gy))  # errors are realistic
    assert apc.n_used <= n - 25
    assert np.all(apc.error_at(gx, gy) < 1.5e-3)
    again = ApertureCorrection.from_dict(json.loads(json.dumps(apc.to_dict())))
    np.testing.assert_array_equal(again(gx, gy), apc(gx, gy))
    assert again.order == 2 and again.detector_shape == (4096, 2048)


def test_order_is_lowered_for_few_stars_and_too_few_raise():
    x, y = np.linspace(10, 1000, 10), np.array([900.0, 20, 500, 300, 700, 100, 950, 400, 60, 600])
    f = np.full(10, 1e5)
    apc = fit_aperture_correction(x, y, f, 0.01 * f, 1.02 * f, 0.01 * f, np.ones(10, bool), SHAPE, order=2)
    assert apc.order == 1
    np.testing.assert_allclose(apc(500.0, 500.0), 1.02)
    with pytest.raises(AlgorithmError) as exc:
        fit_aperture_correction(x, y, f, 0.01 * f, f, 0.01 * f, np.arange(10) < 2, SHAPE)
    assert exc.value.metadata["n_stars"] == 2


def test_kolmogorov_wing_fraction_matches_galsim_truth():
    """Light beyond 4 and 8 FWHM of Kolmogorov x obscured Airy (LSST: 8.36 m, 61 %, r band at 0.2"/px)
    against GalSim's profile drawn independently in a large stamp (truth to < 1e-4); bound 0.2 % at 4 FWHM
    (the FWHM passed is the pixelised adaptive-moment one, as the stage passes the PSF model's)."""
    import galsim

    from lsst_prod.algorithms.apcorr import kolmogorov_wing_fraction

    lod = 620e-9 / 8.36 * 206264.8 / 0.2
    for fwhm_atm in (3.0, 6.0):
        prof = galsim.Convolve(galsim.Kolmogorov(fwhm=fwhm_atm), galsim.Airy(lam_over_diam=lod, obscuration=0.61))
        im = prof.drawImage(nx=81, ny=81, scale=1.0)
        fwhm_pix = 2.3548 * im.FindAdaptiveMom().moments_sigma
        n = 1601
        big = prof.drawImage(nx=n, ny=n, scale=1.0).array
        r = np.hypot(*(np.mgrid[:n, :n] - n // 2))
        for k in (4.0, 8.0):
            radius = k * fwhm_pix
            within = sep.sum_circle(np.ascontiguousarray(big, dtype=np.float64), [n // 2], [n // 2], radius,
                                    subpix=0)[0][0]
            truth = (1.0 - within) / within
            got = kolmogorov_wing_fraction(fwhm_pix, radius, lod, 0.61)
            assert got == pytest.approx(truth, abs=0.002 if k == 4 else 0.001), (fwhm_atm, k, got, truth)
            assert 0.002 < got < 0.02
        del r
    # without diffraction, the pure Kolmogorov: less light beyond (Airy wings fall as r^-3)
    assert kolmogorov_wing_fraction(3.5, 28.0) < kolmogorov_wing_fraction(3.5, 28.0, lod, 0.61)


def test_edge_apertures_are_completed_with_the_psf_model():
    """A star 20 px from the edge (aperture 25 px crosses it): the completed aperture equals the full one
    of the same star placed in the middle, within 0.2 % (noise-free)."""
    from lsst_prod.algorithms.neighbours import aperture_flux_without_neighbours

    psf = GalSimPsf(fwhm=4.0)
    img = np.zeros((200, 200))
    for x, y in ((20.3, 100.2), (100.4, 99.7)):
        st = psf.image_at(x, y, 51) * 1e5
        ix, iy = int(round(x)), int(round(y))
        x0, y0 = ix - 25, iy - 25
        sx0, sy0 = max(0, -x0), max(0, -y0)
        img[max(y0, 0):y0 + 51, max(x0, 0):x0 + 51] += st[sy0:, sx0:]
    var = np.ones_like(img)
    xs, ys, fl = np.array([20.3, 100.4]), np.array([100.2, 99.7]), np.array([1e5, 1e5])
    f, _, flag, area = aperture_flux_without_neighbours(img, var, psf, xs, ys, fl, np.array([0, 1]), 25.0,
                                                        fwhm=4.0)
    assert not flag.any()
    assert area[0] < np.pi * 625 and area[1] == pytest.approx(np.pi * 625)
    assert f[0] == pytest.approx(f[1], rel=0.002)
    # without the FWHM the truncated aperture is flagged, as before
    _, _, flag0, _ = aperture_flux_without_neighbours(img, var, psf, xs, ys, fl, np.array([0, 1]), 25.0)
    assert flag0[0] and not flag0[1]


def test_wald_option_lowers_an_insignificant_gradient_and_total_factor_round_trips():
    rng = np.random.default_rng(5)
    n = 60
    x, y = rng.uniform(0, 1023, n), rng.uniform(0, 1023, n)
    p = np.full(n, 1e5)
    a = p * (1.01 + rng.normal(0, 0.01, n))  # constant ratio, 1 % noise
    e = np.full(n, 1e3)
    flat = fit_aperture_correction(x, y, p, e, a, e, np.ones(n, bool), SHAPE, significance=0.01)
    assert flat.order == 0
    assert fit_aperture_correction(x, y, p, e, a, e, np.ones(n, bool), SHAPE).order == 1  # default: as asked
    g = p * (1.01 + 0.02 * (x / 1023 - 0.5) + rng.normal(0, 0.002, n))
    assert fit_aperture_correction(x, y, p, e, g, e, np.ones(n, bool), SHAPE, significance=0.01).order == 1
    tot = flat.with_total_factor(1.004)
    assert tot(500.0, 500.0)[0] == pytest.approx(1.004 * flat(500.0, 500.0)[0])
    again = ApertureCorrection.from_dict(json.loads(json.dumps(tot.to_dict())))
    assert again.total_factor == 1.004 and again(10.0, 20.0)[0] == pytest.approx(tot(10.0, 20.0)[0])


# ---------------------------------------------------------------------------------------------------------
# Crowded field with an additive background offset: full-wing neighbour subtraction + annulus mean.

class _StampPsf:
    """A constant PSF model: the unit-sum ``stamp`` (what a pixel PSF model holds), FWHM ``fwhm``."""

    def __init__(self, stamp: np.ndarray, fwhm: float):
        self.stamp, self.fwhm = stamp, fwhm

    def image_at(self, x, y):
        return self.stamp

    def fwhm_at(self, x, y):
        return self.fwhm


def _crowded_kolmogorov_field(offset: float, seed: int = 5):
    """Noise-free 800^2 field of Kolmogorov (FWHM 4 px) stars at integer positions, drawn out to 100 px
    (25 FWHM, beyond any model), ~1 star per 270 px^2 above 1/10 of the faintest correction star plus
    fainter undetected ones, and a flat ``offset`` per pixel (a background error)."""
    import galsim
    from scipy.signal import fftconvolve

    prof = galsim.Kolmogorov(fwhm=4.0)
    kern = prof.drawImage(nx=201, ny=201, scale=1.0).array.astype(float)
    kern /= prof.flux  # unit total flux, the part beyond 100 px dropped
    fwhm = 2.3548200450309493 * galsim.Image(kern[60:141, 60:141]).FindAdaptiveMom().moments_sigma
    stamp = kern[100 - 12 : 113, 100 - 12 : 113].copy()
    c_stamp = stamp.sum()
    rng = np.random.default_rng(seed)
    shape = (800, 800)
    n = 2400
    x = rng.integers(0, shape[1], n).astype(float)
    y = rng.integers(0, shape[0], n).astype(float)
    flux = 10 ** rng.uniform(2.0, 5.5, n)  # electrons; log-uniform: many faint neighbours
    image = np.zeros(shape)
    np.add.at(image, (y.astype(int), x.astype(int)), flux)
    image = fftconvolve(image, kern, mode="same") + offset
    detected = flux > 300.0  # the catalogue: fainter ones are undetected light
    return image, _StampPsf(stamp / c_stamp, fwhm), x, y, flux, detected, c_stamp, kern


def test_clean_aperture_fluxes_recover_truth_with_offset_and_crowding():
    """Aperture fluxes of the correction stars within 0.3 % of the truth (light of the noise-free profile
    within the radius) in a crowded field with a flat background error of -2 per pixel (-1.6 % of a
    10^5 star's 4-FWHM aperture), where stamp-limited neighbour models and a local sky from the pixels
    between footprints are biased by more than that."""
    from lsst_prod.algorithms.apcorr import clean_aperture_fluxes, weighted_ratio
    from lsst_prod.algorithms.neighbours import aperture_flux_without_neighbours

    image, psf, x, y, flux, detected, c_stamp, kern = _crowded_kolmogorov_field(offset=-2.0)
    radius, annulus = 16.0, (64.0, 89.6)  # 4 FWHM; annulus as sky_annulus_for(8 FWHM)
    c_r = sep.sum_circle(np.ascontiguousarray(kern), [100.0], [100.0], radius, subpix=0)[0][0]
    cat = np.flatnonzero(detected)
    psf_flux = flux[cat] * c_stamp  # the noise-free PSF-model flux (the light within the stamp)
    var = np.ones(image.shape)
    which = np.flatnonzero((flux[cat] > 2e4) & (x[cat] > 48) & (x[cat] < 751) & (y[cat] > 48) & (y[cat] < 751))
    assert len(which) >= 30
    m = clean_aperture_fluxes(image, var, np.ones(image.shape, bool), psf, x[cat], y[cat], psf_flux, which,
                              radius, psf.fwhm, annulus)
    true_ap = flux[cat][which] * c_r
    ok = ~m["flag"]
    dev = m["flux"][ok] / true_ap[ok] - 1.0
    assert np.median(np.abs(dev)) < 0.003, dev
    ratio = m["flux"][ok] / psf_flux[which][ok]
    val, err, _, _ = weighted_ratio(ratio, ratio * m["flux_err"][ok] / m["flux"][ok], psf_flux[which][ok])
    assert abs(val / (c_r / c_stamp) - 1.0) < 0.003
    assert np.median(m["level"][ok]) == pytest.approx(-2.0, abs=0.3)
    # the stamp-limited neighbour models with the median of the annulus pixels outside the footprints
    # (the stage's previous local sky) miss both effects by more than the tolerance
    ap, _, _, area = aperture_flux_without_neighbours(image, var, psf, x[cat], y[cat], psf_flux, which, radius)
    foot = np.zeros(image.shape)
    np.add.at(foot, (y[cat].astype(int), x[cat].astype(int)), flux[cat])
    from scipy.signal import fftconvolve

    foot = fftconvolve(foot, kern, mode="same") > 2.0  # the sources' footprints (above ~1 sigma of a sky)
    yy, xx = np.mgrid[-90:91, -90:91]
    old = []
    for k in which:
        ix, iy = int(x[cat][k]), int(y[cat][k])
        sub = (slice(max(iy - 90, 0), iy + 91), slice(max(ix - 90, 0), ix + 91))
        r = np.hypot(xx, yy)[90 - (iy - sub[0].start):, 90 - (ix - sub[1].start):][: image[sub].shape[0], : image[sub].shape[1]]
        old.append(np.median(image[sub][(r >= annulus[0]) & (r < annulus[1]) & ~foot[sub]]))
    old_dev = (ap - np.array(old) * area) / true_ap - 1.0
    assert abs(np.median(old_dev[ok])) > 0.003, np.median(old_dev[ok])


def test_weighted_ratio_is_set_by_the_precise_stars_not_the_many_noisy_ones():
    """Ratios 1.0 + pixel noise (sigma ~ 1/sqrt(flux)) + additive contamination (sigma ~ 1/flux), with the
    faint stars carrying a -1 % flux-dependent bias (as a background deficit gives them): the weighted
    estimate stays within 3 of its errors of 1.0 (and within 0.2 %); the unweighted median, set by the
    80 % faint stars, is ~0.7 % low."""
    from lsst_prod.algorithms.apcorr import weighted_ratio

    rng = np.random.default_rng(11)
    n = 400
    flux = np.where(rng.random(n) < 0.8, 10 ** rng.uniform(3.5, 4.0, n), 10 ** rng.uniform(4.5, 5.5, n))
    sigma = 3.0 / np.sqrt(flux)  # 3 % at 10^4
    contam = 150.0 / flux * rng.normal(size=n)  # 150 e of unmodelled light, either sign
    ratio = 1.0 + sigma * rng.normal(size=n) + contam - 0.01 * (flux < 2e4)
    val, err, _, n_used = weighted_ratio(ratio, sigma, flux)
    assert abs(val - 1.0) < max(3 * err, 0.002) and err < 0.002 and n_used > 0.9 * n
    assert np.median(ratio) < 0.995


def test_weighted_ratio_with_a_per_star_psf_model_error_states_an_honest_error():
    """Ratios 1.0 + pixel noise (~1/sqrt(flux)) + a 3 % multiplicative error per star (a PSF model that
    misses each star's profile by a few per cent, as a smooth model of a coadd's PSF does), 100 stars over
    two decades of flux: across 150 realisations the estimate's pulls (value - 1) / error have a standard
    deviation within 0.75-1.3 and a mean within 0.25 (an additive-only excess scatter gives the few
    brightest stars all the weight: pulls' std 3.4)."""
    from lsst_prod.algorithms.apcorr import weighted_ratio

    rng = np.random.default_rng(5)
    pulls = []
    for _ in range(150):
        flux = 10 ** rng.uniform(3.5, 5.5, 100)
        sigma = 3.0 / np.sqrt(flux)
        ratio = 1.0 + sigma * rng.normal(size=100) + 0.03 * rng.normal(size=100)
        val, err, _, _ = weighted_ratio(ratio, sigma, flux)
        pulls.append((val - 1.0) / err)
    pulls = np.array(pulls)
    assert 0.75 < np.std(pulls) < 1.3, np.std(pulls)
    assert abs(np.mean(pulls)) < 0.25


def test_input_reference_fluxes_weighted_mean_of_the_inputs_that_measured_each_star():
    """Three inputs with coadd weights 1, 2, 3: a star measured in all three gets the weighted mean of its
    fluxes (and its propagated error); per input only the nearest measurement within the radius counts;
    a star in one input only (< min_inputs) and a star with none get NaN."""
    from lsst_prod.algorithms.apcorr import CALSTARS_COLUMNS, input_reference_fluxes

    assert CALSTARS_COLUMNS == ("x", "y", "flux", "flux_err", "weight", "input")
    rows = [
        (10.0, 10.0, 100.0, 2.0, 1.0, 0), (10.3, 9.9, 110.0, 2.0, 2.0, 1), (9.8, 10.1, 130.0, 4.0, 3.0, 2),
        (10.9, 10.0, 999.0, 1.0, 3.0, 2),  # same input, farther: a neighbour, not this star
        (50.0, 50.0, 70.0, 1.0, 1.0, 0),  # one input only
    ]
    flux, err, n = input_reference_fluxes(np.array([10.0, 50.0, 80.0]), np.array([10.0, 50.0, 80.0]),
                                          np.array(rows))
    assert flux[0] == pytest.approx((100 + 2 * 110 + 3 * 130) / 6.0)
    assert err[0] == pytest.approx(np.sqrt(2.0**2 + 4.0**2 + 12.0**2) / 6.0)
    assert list(n) == [3, 1, 0]
    assert np.isnan(flux[1]) and np.isnan(flux[2])


def test_coadd_apcorr_from_inputs_recovers_the_inputs_scale_despite_psf_model_errors():
    """Coadd PSF fluxes = 0.985 x the inputs' calibrated fluxes with a 2 % per-star PSF-model error and
    pixel noise; 5 inputs measure each star with its own noise: the correction is 1/0.985 within 3 of its
    stated errors (and 0.4 %).  With fewer than 5 stars it declines (the stage falls back)."""
    from lsst_prod.stages.common import fit_apcorr_from_inputs

    rng = np.random.default_rng(8)
    n = 120
    x, y = rng.uniform(0, 1000, n), rng.uniform(0, 1000, n)
    true = 10 ** rng.uniform(4.0, 6.0, n)
    noise = 3.0 * np.sqrt(true)
    cols = {"x": x, "y": y, "deblend_nChild": np.zeros(n, int),
            "psfFlux": 0.985 * true * (1 + 0.02 * rng.normal(size=n)) + noise * rng.normal(size=n),
            "psfFluxErr": noise}
    rows = []
    for i, wt in enumerate((1.0, 0.8, 1.2, 0.5, 1.5)):
        e = noise * np.sqrt(5.0)
        rows.append(np.column_stack([x + rng.normal(0, 0.05, n), y + rng.normal(0, 0.05, n),
                                     true + e * rng.normal(size=n), e, np.full(n, wt), np.full(n, float(i))]))
    cal = np.concatenate(rows)
    apc = fit_apcorr_from_inputs(cols, np.ones(n, bool), cal, (1000, 1000))
    val = float(apc(500.0, 500.0)[0])
    assert abs(val - 1 / 0.985) < max(3 * apc.error * val, 1e-9) and abs(val * 0.985 - 1) < 0.004
    assert apc.total_factor == 1.0
    few = np.zeros(n, bool)
    few[:4] = True
    assert fit_apcorr_from_inputs(cols, few, cal, (1000, 1000)) is None
