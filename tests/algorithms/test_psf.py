from __future__ import annotations

import io

import galsim
import numpy as np
import pytest
from astropy.io import fits

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.detect import detect_sources
from lsst_prod.algorithms.psf import (PsfModel, adaptive_moments, fit_psf, profile_error, select_psf_candidates,
                                      smooth_wings)
from lsst_prod.errors import AlgorithmError

N, SKY, RN = 1024, 1000.0, 5.0


def fwhm_fn(x, y):
    return 3.5 + (x + y) / (2.0 * (N - 1))  # 3.5 -> 4.5 pixels along the diagonal


def g1_fn(x, y):
    return 0.05 * x / (N - 1)


def g2_fn(x, y):
    return 0.02 * (y - 511.5) / 511.5


def _hsm(img):
    return galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img), scale=1.0))


@pytest.fixture(scope="module")
def field(draw_moffat_field):
    rng = np.random.default_rng(1)
    gx, gy = np.meshgrid(np.arange(25, 1000, 50), np.arange(25, 1000, 50))  # 400 stars
    x = gx.ravel() + rng.uniform(-6, 6, gx.size)
    y = gy.ravel() + rng.uniform(-6, 6, gx.size)
    flux = 10 ** rng.uniform(5.0, np.log10(5e5), x.size)
    stars = draw_moffat_field((N, N), x, y, flux, fwhm=fwhm_fn, g1=g1_fn, g2=g2_fn)
    # Contaminants that must not be selected: galaxies, a tight pair, a saturated star, a defect.
    gal_x, gal_y = np.array([63.0, 590.0, 900.0]), np.array([63.0, 590.0, 250.0])
    galaxies = draw_moffat_field((N, N), gal_x, gal_y, np.full(3, 3e5), fwhm=9.0, beta=2.5)
    pair = draw_moffat_field((N, N), [280.0, 284.5], [700.0, 702.0], [3e5, 2e5], fwhm=4.0)
    img = rng.poisson(SKY + stars + galaxies + pair) - SKY + rng.normal(0, RN, (N, N))
    img = img.astype(np.float32)
    var = (SKY + RN**2 + stars + galaxies + pair).astype(np.float32)
    mask = np.zeros((N, N), np.uint32)
    sat_star = (int(round(x[40])), int(round(y[40])))
    mask[sat_star[1] - 1 : sat_star[1] + 2, sat_star[0] - 1 : sat_star[0] + 2] |= masks.SAT | masks.INTRP
    bad_col = int(round(x[100])) + 5
    mask[:, bad_col] |= masks.BAD | masks.INTRP
    fp = detect_sources(img, var, mask, psf_sigma_pix=4.0 / 2.3548)
    cand = select_psf_candidates(img, var, mask, fp)
    model = fit_psf(img, var, mask, cand.x, cand.y, (N, N), stamp_size=25, spatial_order=2)
    return dict(x=x, y=y, img=img, var=var, mask=mask, fp=fp, cand=cand, model=model,
                gal=(gal_x, gal_y), sat=sat_star, bad_col=bad_col)


def test_candidate_selection(field):
    c, x, y = field["cand"], field["x"], field["y"]
    assert c.n >= 300
    d = np.hypot(c.x[:, None] - x[None, :], c.y[:, None] - y[None, :])
    assert np.all(d.min(axis=1) < 0.2)  # only real stars, accurate centroids
    gx, gy = field["gal"]
    assert np.hypot(c.x[:, None] - gx, c.y[:, None] - gy).min() > 20  # no galaxy
    assert np.hypot(c.x - 282, c.y - 701).min() > 20  # no blend
    assert np.hypot(c.x - field["sat"][0], c.y - field["sat"][1]).min() > 5  # no saturated star
    assert np.abs(c.x - field["bad_col"]).min() > 12  # no defect in the stamp
    assert np.all(c.snr >= 50)
    assert np.all(np.diff(c.snr) <= 0)


@pytest.mark.parametrize(
    "pos", [(100.3, 100.8), (900.6, 150.2), (512.1, 511.6), (150.9, 900.4), (950.45, 950.55), (40.0, 990.0)]
)
def test_model_reproduces_true_psf(field, true_psf, pos):
    model = field["model"]
    px, py = pos
    dx, dy = px - np.rint(px), py - np.rint(py)
    truth = true_psf(fwhm_fn(px, py), g1_fn(px, py), g2_fn(px, py), dx, dy, 25)
    img = model.image_at(px, py)
    assert img.shape == (25, 25)
    assert img.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(img - truth).max() < 0.01 * truth.max()  # measured <= 0.5 %
    h = _hsm(true_psf(fwhm_fn(px, py), g1_fn(px, py), g2_fn(px, py), 0.0, 0.0, 41))
    fwhm_true = 2.3548 * h.moments_sigma  # same (adaptive-moment) estimator on the truth
    assert model.fwhm_at(px, py) == pytest.approx(fwhm_true, rel=0.01)  # measured <= 0.1 %
    ixx, iyy, ixy = model.moments_at(px, py)
    e1 = (ixx - iyy) / (ixx + iyy)
    assert e1 == pytest.approx(h.observed_shape.e1, abs=0.005)


def test_fit_statistics(field):
    m = field["model"]
    assert m.n_stars >= 300 and m.n_stars <= field["cand"].n
    assert 0.7 < m.chi2 < 1.3
    assert m.residual_rms < 0.02
    assert m.coeffs.shape == (6, 25, 25)


def test_image_at_centre_and_sizes(field):
    model = field["model"]
    for size in (25, 15, 31, 16):
        img = model.image_at(300.7, 400.2, size=size)
        assert img.shape == (size, size) and img.sum() == pytest.approx(1.0)
        mom = adaptive_moments(img[None])
        c = size // 2
        assert mom["x"][0] == pytest.approx(c - 0.3, abs=0.01)
        assert mom["y"][0] == pytest.approx(c + 0.2, abs=0.01)
    assert model.sigma_at(300, 400) == pytest.approx(model.fwhm_at(300, 400) / 2.3548, rel=1e-4)


def test_adaptive_moments_match_galsim(true_psf):
    img = true_psf(4.0, 0.04, -0.02, 0.3, -0.1, 41)
    m = adaptive_moments(img[None])
    h = _hsm(img)
    assert m["ok"][0]
    sigma = (m["ixx"][0] * m["iyy"][0] - m["ixy"][0] ** 2) ** 0.25
    assert sigma == pytest.approx(h.moments_sigma, rel=1e-5)
    assert m["x"][0] + 1 == pytest.approx(h.moments_centroid.x, abs=1e-4)  # galsim is 1-based
    assert m["y"][0] + 1 == pytest.approx(h.moments_centroid.y, abs=1e-4)


def test_fits_round_trip(field):
    model = field["model"]
    arr, hdr = model.to_fits()
    back = PsfModel.from_fits(arr, hdr)
    np.testing.assert_array_equal(back.coeffs, model.coeffs)
    assert (back.spatial_order, back.detector_shape, back.n_stars, back.n_rejected) == (
        model.spatial_order, model.detector_shape, model.n_stars, model.n_rejected)
    assert (back.residual_rms, back.chi2, back.profile_error) == (model.residual_rms, model.chi2, model.profile_error)
    assert PsfModel.from_fits(arr, {k: v for k, v in hdr.items() if k != "PROFERR"}).profile_error == 0.0  # older files
    np.testing.assert_array_equal(back.image_at(123.4, 567.8), model.image_at(123.4, 567.8))
    # Through an actual FITS HDU (big-endian data, astropy Header).
    buf = io.BytesIO()
    fits.ImageHDU(data=arr, header=fits.Header(list(hdr.items())), name="PSF").writeto(buf)
    buf.seek(0)
    with fits.open(buf) as hdul:
        disk = PsfModel.from_fits(hdul["PSF"].data, hdul["PSF"].header)
    np.testing.assert_array_equal(disk.coeffs, model.coeffs)
    np.testing.assert_array_equal(disk.image_at(123.4, 567.8), model.image_at(123.4, 567.8))
    assert disk.fwhm_at(10, 20) == model.fwhm_at(10, 20)
    with pytest.raises(ValueError):
        PsfModel.from_fits(arr, {**hdr, "PSFTYPE": "GAUSS"})


def test_too_few_stars_raises(field):
    c = field["cand"]
    with pytest.raises(AlgorithmError) as err:
        fit_psf(field["img"], field["var"], field["mask"], c.x[:3], c.y[:3], (N, N))
    assert err.value.metadata["n_candidates"] == 3
    with pytest.raises(ValueError):
        fit_psf(field["img"], field["var"], field["mask"], c.x, c.y, (N, N), stamp_size=24)
    with pytest.raises(ValueError):
        fit_psf(field["img"], field["var"], field["mask"], c.x, c.y, (N, N), oversampling=2)


def test_outlier_star_rejected(field, draw_moffat_field):
    # Add an unselected galaxy position to the star list: the chi^2 clip rejects it.
    c = field["cand"]
    gx, gy = field["gal"]
    x = np.concatenate([c.x[:60], gx[1:2]])
    y = np.concatenate([c.y[:60], gy[1:2]])
    m = fit_psf(field["img"], field["var"], field["mask"], x, y, (N, N))
    assert m.n_rejected >= 1 and m.n_stars <= 60


def test_no_candidates_on_empty_field():
    rng = np.random.default_rng(2)
    img = rng.normal(0, 30, (256, 256)).astype(np.float32)
    var = np.full(img.shape, 900.0, np.float32)
    mask = np.zeros(img.shape, np.uint32)
    fp = detect_sources(img, var, mask, 1.7)
    cand = select_psf_candidates(img, var, mask, fp)
    assert cand.n == 0
    with pytest.raises(AlgorithmError):
        fit_psf(img, var, mask, cand.x, cand.y, img.shape)


def test_chain_from_raw(draw_moffat_field, simulate_raw, true_psf):
    """ISR -> background -> cosmic rays -> detection -> PSF on a raw that follows the contract."""
    from lsst_prod.algorithms.background import estimate_background
    from lsst_prod.algorithms.cosmicray import find_cosmic_rays, repair_cosmic_rays
    from lsst_prod.algorithms.isr import run_isr
    from lsst_prod.camera import Detector

    rng = np.random.default_rng(77)
    det = Detector(id=0, name="T", nx=N, ny=N, overscan=32, fp_x0=0.0, fp_y0=0.0, gain=1.2,
                   read_noise=RN, saturation_adu=60000.0, bias_level_adu=1000.0)
    yy, xx = np.mgrid[0:N, 0:N]
    bias = 2.0 * np.sin(xx / 50.0)
    flat = 1.0 + 0.05 * (xx - 512) / N + 0.01 * rng.standard_normal((N, N))
    flat /= flat.mean()
    gx, gy = np.meshgrid(np.arange(25, 1000, 50), np.arange(25, 1000, 50))
    x = gx.ravel() + rng.uniform(-6, 6, gx.size)
    y = gy.ravel() + rng.uniform(-6, 6, gx.size)
    flux = 10 ** rng.uniform(5.0, np.log10(5e5), x.size)
    flux[::97] = 5e6  # a few saturated stars
    stars = draw_moffat_field((N, N), x, y, flux, fwhm=fwhm_fn, g1=g1_fn, g2=g2_fn)
    crs = np.zeros((N, N))
    for _ in range(150):
        cx, cy = rng.integers(5, N - 10, 2)
        crs[cy, cx : cx + rng.integers(1, 6)] += 10 ** rng.uniform(2.7, 4.3)
    defects = np.zeros((N, N), bool)
    defects[:, 333] = True
    raw = simulate_raw(SKY + 30.0 * yy / N + stars + crs, det, bias, flat, rng, defects=defects,
                       row_offset=3.0 * np.sin(np.arange(N) / 100.0))

    isr = run_isr(raw, det, bias, flat, defects)
    assert isr.n_saturated > 0
    bg = estimate_background(isr.image, isr.mask)
    image = isr.image - bg.image
    cr = find_cosmic_rays(image, isr.variance, isr.mask, psf_fwhm_pix=4.0)
    assert cr[crs > 0].mean() > 0.9
    rep = repair_cosmic_rays(image, isr.mask, cr, variance=isr.variance)
    fp = detect_sources(rep.image, rep.variance, rep.mask, 4.0 / 2.3548)
    cand = select_psf_candidates(rep.image, rep.variance, rep.mask, fp)
    model = fit_psf(rep.image, rep.variance, rep.mask, cand.x, cand.y, (N, N))
    assert model.n_stars > 250
    for px, py in ((200.2, 300.7), (800.5, 800.1), (512.0, 100.3)):
        dx, dy = px - np.rint(px), py - np.rint(py)
        truth = true_psf(fwhm_fn(px, py), g1_fn(px, py), g2_fn(px, py), dx, dy, 25)
        assert np.abs(model.image_at(px, py) - truth).max() < 0.01 * truth.max()


def test_image_at_half_pixel_follows_round(field):
    model = field["model"]
    # round(10.5) == 10 (half to even): the centre is then at c + 0.5.
    mom = adaptive_moments(model.image_at(10.5, 11.5)[None])
    assert mom["x"][0] == pytest.approx(12 + 0.5, abs=0.01)  # round(10.5) = 10 -> dx = +0.5
    assert mom["y"][0] == pytest.approx(12 - 0.5, abs=0.01)  # round(11.5) = 12 -> dy = -0.5


def test_few_stars_fall_back_to_a_fitted_moffat(draw_moffat_field, true_psf):
    """Below min_stars a constant Moffat (FWHM, beta, g1, g2) is fitted to the stars and flagged; one star
    suffices; none is an AlgorithmError.  Truth: beta 3.5, FWHM 4.2 px, g = (0.04, -0.03), noise as a
    30 s exposure on a 1000 e- sky.  Tolerances: FWHM and beta to 2 % and 5 % from 5 stars, the image to
    1 % of the peak (measured 0.07-0.4 %); the empirical model raises below min_stars without fallback."""
    from lsst_prod.algorithms.psf import moffat_image

    n, fw, g1, g2 = 512, 4.2, 0.04, -0.03
    rng = np.random.default_rng(3)
    x, y = np.array([100.0, 400.0, 250.0, 380.0, 120.0]), np.array([120.0, 90.0, 260.0, 400.0, 420.0])
    stars = draw_moffat_field((n, n), x, y, np.array([2e5, 1e5, 3e5, 5e4, 1.5e5]), fwhm=fw, g1=g1, g2=g2, beta=3.5)
    img = (rng.poisson(SKY + stars) - SKY + rng.normal(0, RN, (n, n))).astype(np.float32)
    var = (SKY + RN**2 + stars).astype(np.float32)
    mask = np.zeros((n, n), np.uint32)
    truth = true_psf(fw, g1, g2, 0.0, 0.0, 29)
    assert np.abs(moffat_image(29, fw, 3.5, g1, g2) - truth).max() < 0.005 * truth.max()  # renderer vs GalSim
    with pytest.raises(AlgorithmError):
        fit_psf(img, var, mask, x, y, (n, n), stamp_size=29)  # 5 < max(2 x 6 terms, 10) stars
    for k in (1, 5):
        m = fit_psf(img, var, mask, x[:k], y[:k], (n, n), stamp_size=29, spatial_order=2, fallback=True)
        assert m.is_fallback and m.fallback == "moffat" and m.spatial_order == 0 and m.n_stars == k
        assert np.abs(m.image_at(256.0, 256.0) - truth).max() < 0.01 * truth.max()
    fwhm, beta, fg1, fg2 = m.fallback_params
    assert fwhm == pytest.approx(fw, rel=0.02) and beta == pytest.approx(3.5, rel=0.05)
    assert fg1 == pytest.approx(g1, abs=0.005) and fg2 == pytest.approx(g2, abs=0.005)
    # the flag survives the FITS round trip; an empirical model is not flagged
    arr, hdr = m.to_fits()
    assert hdr["FALLBACK"] and hdr["PARMODEL"] == "MOFFAT"
    back = PsfModel.from_fits(arr, hdr)
    assert back.is_fallback and back.fallback_params == pytest.approx(m.fallback_params)
    assert not PsfModel.from_fits(*fit_psf(img, var, mask, x, y, (n, n), stamp_size=29, min_stars=3)
                                  .to_fits()).is_fallback
    # no usable star at all: an error even with the fallback
    with pytest.raises(AlgorithmError, match="no star"):
        fit_psf(img, var, mask, np.array([3.0]), np.array([3.0]), (n, n), stamp_size=29, fallback=True)


def test_spatial_order_falls_to_constant_with_few_stars(field):
    """Spatial order 2 asked, 20 stars at 8 per term: order 1 needs 24, so the model is constant."""
    c = field["cand"]
    m = fit_psf(field["img"], field["var"], field["mask"], c.x[:20], c.y[:20], (N, N), spatial_order=2,
                min_stars_per_term=8.0, fallback=True)
    assert m.spatial_order == 0 and not m.is_fallback and m.n_stars >= 10


@pytest.mark.parametrize("e", [0.0, 0.01, 0.04])
def test_profile_error_recovers_an_injected_model_error(e):
    """resid = photon noise + e x model x N(0, 1): the estimator returns e (1,000 stars of 10^3-10^5.5
    counts on Gaussian stamps over a sky of 100; the 1-sigma error of the estimate is ~0.001)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[-7:8, -7:8]
    p = np.exp(-(xx**2 + yy**2) / (2 * 1.7**2))
    p /= p.sum()
    model = 10 ** rng.uniform(3, 5.5, 1000)[:, None, None] * p[None]
    var = 100.0 + model
    resid = rng.normal(size=model.shape) * np.sqrt(var) + e * model * rng.normal(size=model.shape)
    var[:, 0, :] = np.inf  # pixels without data are ignored
    assert profile_error(resid, var, model) == pytest.approx(e, abs=0.003)


def test_profile_error_of_fitted_models(field, draw_moffat_field):
    """A model that follows the stars (Moffats whose FWHM varies smoothly) errs by < 1 % of a pixel's value;
    stars whose FWHM jitters from star to star by 5 % rms, which no smooth model follows, give the error
    the jitter makes (a 5 % FWHM change moves a pixel's value by up to ~10 % of the peak)."""
    assert field["model"].profile_error < 0.01
    rng = np.random.default_rng(2)
    gx, gy = np.meshgrid(np.arange(40, 600, 40), np.arange(40, 600, 40))
    x, y = gx.ravel() + rng.uniform(-3, 3, gx.size), gy.ravel() + rng.uniform(-3, 3, gx.size)
    jitter = dict(zip(zip(np.round(x, 6), np.round(y, 6)), 4.0 * (1 + 0.05 * rng.normal(size=x.size))))
    stars = draw_moffat_field((640, 640), x, y, np.full(x.size, 3e5),
                              fwhm=lambda xi, yi: jitter[(round(float(xi), 6), round(float(yi), 6))])
    img = (rng.poisson(SKY + stars) - SKY).astype(np.float32)
    var = (SKY + stars).astype(np.float32)
    model = fit_psf(img, var, np.zeros(img.shape, np.uint32), x, y, (640, 640), stamp_size=25, spatial_order=1)
    print(f"profile error: smooth field {field['model'].profile_error:.4f}, 5 % FWHM jitter {model.profile_error:.4f}")
    assert 0.02 < model.profile_error < 0.2, model.profile_error


def test_smooth_wings_replace_noisy_outskirts_by_the_fitted_kolmogorov_wing():
    """A Kolmogorov PSF (FWHM 4 px, 41-px stamp) as a two-term model.  Noise-free, the fitted r^-11/3 wing
    beyond 2 FWHM holds 1.065 x the truth's light there (a Kolmogorov profile reaches its asymptotic power
    law only slowly: r^(11/3) x profile falls by 15 % from 2 to 4.7 FWHM) and the core is untouched.  With
    noise of 1e-4 of the flux per pixel (dp-mini's PSF models at 2-3.5 FWHM), the wing pixels' rms error
    falls by more than 20x.  A stamp too small for wings is left as it was."""
    rng = np.random.default_rng(4)
    size, half = 41, 20
    truth = galsim.Kolmogorov(fwhm=4.0).drawImage(nx=size, ny=size, scale=1.0).array.astype(np.float64).ravel()
    truth /= truth.sum()
    clean = np.column_stack([truth, 0.1 * truth])
    out = smooth_wings(clean, size, 2.0)
    yy, xx = np.mgrid[:size, :size] - half
    r = np.hypot(xx, yy).ravel()
    mom = adaptive_moments(truth.reshape(size, size)[None])
    outer = r > 2.0 * 2.3548 * (mom["ixx"][0] * mom["iyy"][0]) ** 0.25
    np.testing.assert_array_equal(out[~outer], clean[~outer])
    assert 1.0 < out[outer, 0].sum() / truth[outer].sum() < 1.1
    assert out[outer, 1].sum() / out[outer, 0].sum() == pytest.approx(0.1, rel=1e-9)
    noisy = clean + rng.normal(0, 1e-4, clean.shape)
    smooth = smooth_wings(noisy, size, 2.0)
    err_before = np.sqrt(np.mean((noisy[outer, 0] - truth[outer]) ** 2))
    err_after = np.sqrt(np.mean((smooth[outer, 0] - truth[outer]) ** 2))
    print(f"wing pixels' rms error: {err_before:.2e} -> {err_after:.2e}")
    assert err_after < err_before / 20
    small = clean[: 11 * 11]
    np.testing.assert_array_equal(smooth_wings(small, 11, 2.0), small)


def test_stellar_locus_of_a_sparse_detector():
    """The 9 sources of S/N > 50 of a sparse-north detector (visit 2501200004, detector 0; adaptive-moment
    T = ixx + iyy and e1, e2 as measured there): 7 stars (T 8.8-10.4) and 2 galaxies (T 25, 33).  The locus
    keeps the 7 stars and drops the galaxies; the plane least-squares fitted to all nine used to end on
    one star, and the detector failed for want of a PSF star."""
    from lsst_prod.algorithms.psf import _robust_plane_inliers

    pts = np.array([(979, 409, 9.10, 0.015, 0.018), (250, 412, 9.55, -0.027, 0.052), (877, 426, 8.77, -0.003, 0.009),
                    (842, 429, 9.03, 0.063, 0.053), (12, 438, 10.43, -0.038, 0.059), (270, 499, 32.91, 0.126, -0.056),
                    (919, 624, 24.96, -0.059, 0.116), (383, 739, 9.29, -0.010, 0.030), (531, 820, 9.11, -0.003, 0.028)])
    xs, ys = pts[:, 0] / 1024, pts[:, 1] / 1024
    keep = _robust_plane_inliers(np.log(pts[:, 2]), xs, ys, 3.0, 0.02)
    keep &= _robust_plane_inliers(pts[:, 3], xs, ys, 3.0, 0.01)
    keep &= _robust_plane_inliers(pts[:, 4], xs, ys, 3.0, 0.01)
    assert keep.tolist() == [True] * 5 + [False, False] + [True] * 2
