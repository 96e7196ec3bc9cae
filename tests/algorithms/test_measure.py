"""Tests of lsst_prod.algorithms.measure against GalSim images with known truth."""

from __future__ import annotations

import functools

import galsim
import numpy as np
import pytest
from scipy.spatial import cKDTree

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.footprints import Footprints
from lsst_prod.algorithms.measure import DEFAULT_APERTURE_RADII, aperture_column, measure_sources

try:
    from ._psf_double import GalSimPsf, add_stamp, detect
except ImportError:  # tests/algorithms is not a package
    from _psf_double import GalSimPsf, add_stamp, detect

SKY = 100.0  # electrons per pixel (background variance; the image is background-subtracted)


def _positions(rng, n, shape, min_sep, border=30):
    """n random positions at least ``min_sep`` pixels apart."""
    pts = np.empty((0, 2))
    while len(pts) < n:
        cand = rng.uniform(border, np.array(shape[::-1]) - border, size=(4 * n, 2))
        for p in cand:
            if len(pts) == n:
                break
            if len(pts) == 0 or np.min(np.hypot(*(pts - p).T)) > min_sep:
                pts = np.vstack([pts, p])
    return pts[:, 0], pts[:, 1]


def _observe(model, rng):
    """Add Gaussian noise with variance sky + model (Poisson-like); return image, variance, mask."""
    var = SKY + np.clip(model, 0, None)
    return model + rng.normal(size=model.shape) * np.sqrt(var), var, np.zeros(model.shape, np.uint32)


@pytest.fixture(scope="module")
def star_field():
    rng = np.random.default_rng(42)
    shape = (1024, 1024)
    psf = GalSimPsf(fwhm=4.0, fwhm_gradient=(4e-4, -3e-4))
    x, y = _positions(rng, 400, shape, 26.0)
    flux = np.exp(rng.uniform(np.log(4e3), np.log(4e5), len(x)))
    model = np.zeros(shape)
    for xi, yi, fi in zip(x, y, flux):
        psf.draw_star(model, xi, yi, fi)
    image, var, mask = _observe(model, rng)
    fp = detect(image, var, mask, sigma=1.7)
    cat = measure_sources(image, var, mask, fp, psf)
    dist, idx = cKDTree(np.column_stack([x, y])).query(np.column_stack([cat["x"], cat["y"]]))
    sel = (cat["deblend_nChild"] == 0) & (cat["parent_index"] == -1) & (dist < 2.0)
    return cat, sel, idx, x, y, flux, psf


def test_columns_present(star_field):
    cat = star_field[0]
    n = len(cat["x"])
    required = """x y xErr yErr centroid_flag ixx iyy ixy ixxPSF iyyPSF ixyPSF psfFlux psfFluxErr psfFlux_flag
    psfFlux_area calibFlux calibFluxErr gaussianFlux gaussianFluxErr sky skyErr extendedness sizeExtendedness
    footprintArea_value parent_index deblend_nChild pixelFlags_saturated pixelFlags_saturatedCenter pixelFlags_cr
    pixelFlags_crCenter pixelFlags_edge pixelFlags_bad pixelFlags_interpolated pixelFlags_interpolatedCenter
    variance_value blendedness_abs""".split()
    for r in DEFAULT_APERTURE_RADII:
        required += [f"{aperture_column(r)}{s}" for s in ("Flux", "FluxErr", "Flux_flag")]
    for col in required:
        assert col in cat and cat[col].shape == (n,), col
    assert aperture_column(3) == "ap03" and aperture_column(70) == "ap70"
    np.testing.assert_array_equal(cat["calibFlux"], cat["ap12Flux"])


def test_psf_flux_unbiased_with_correct_errors(star_field):
    cat, sel, idx, _, _, flux, _ = star_field
    assert sel.sum() >= 380  # nearly every star detected and measured as an isolated source
    true = flux[idx[sel]]
    meas, err = cat["psfFlux"][sel], cat["psfFluxErr"][sel]
    assert not cat["psfFlux_flag"][sel].any()
    bright = meas / err > 50
    assert bright.sum() > 200
    assert abs(np.median(meas[bright] / true[bright] - 1)) < 0.003
    pull = (meas - true) / err
    assert 0.9 < np.std(pull) < 1.1
    assert abs(np.mean(pull)) < 0.15
    # psfFlux_area = 1 / sum(p^2) for a unit-sum PSF: ~4 pi sigma^2 for a Gaussian-like core
    assert np.all((cat["psfFlux_area"][sel] > 25) & (cat["psfFlux_area"][sel] < 80))


def test_centroids_within_predicted_errors(star_field):
    cat, sel, idx, x, y, _, _ = star_field
    assert not cat["centroid_flag"][sel].any()
    px = (cat["x"][sel] - x[idx[sel]]) / cat["xErr"][sel]
    py = (cat["y"][sel] - y[idx[sel]]) / cat["yErr"][sel]
    for pull in (px, py):
        assert 0.8 < np.std(pull) < 1.2
        assert abs(np.mean(pull)) < 0.15
    # errors scale like sigma / SNR: bright stars are centroided to better than 0.02 px
    bright = cat["psfFlux"][sel] / cat["psfFluxErr"][sel] > 300
    assert np.all(cat["xErr"][sel][bright] < 0.02)


def test_moments_sky_and_classification_of_stars(star_field):
    cat, sel, *_ = star_field
    snr = cat["psfFlux"] / cat["psfFluxErr"]
    bright = sel & (snr > 100)
    assert not cat["shape_flag"][bright].any()
    for m in ("ixx", "iyy"):  # adaptive moments of stars = the PSF's (noise ~2.5% at S/N 100)
        assert abs(np.median(cat[m][bright] / cat[f"{m}PSF"][bright]) - 1) < 0.005
        np.testing.assert_allclose(cat[m][bright], cat[f"{m}PSF"][bright], rtol=0.1)
    assert np.median(np.abs(cat["ixy"][bright])) < 0.05 and np.all(np.abs(cat["ixy"][bright]) < 0.2)
    # stars with S/N > 20 are point-like under both criteria
    stars = sel & (snr > 20)
    assert np.all(cat["extendedness"][stars] == 0)
    assert np.all(cat["sizeExtendedness"][stars] == 0)
    # local sky of a background-subtracted image: ~0 with the per-pixel scatter sqrt(SKY)
    assert abs(np.nanmedian(cat["sky"][sel])) < 0.3
    np.testing.assert_allclose(np.nanmedian(cat["skyErr"][sel]), np.sqrt(SKY), rtol=0.05)
    np.testing.assert_allclose(cat["variance_value"][sel], SKY, rtol=0.02)
    # the 12 px aperture holds the whole (truncated at 12 px) Moffat: calibFlux ~ psfFlux
    ratio = cat["calibFlux"][bright] / cat["psfFlux"][bright]
    assert abs(np.median(ratio) - 1) < 0.003


def test_uniform_image_aperture_fluxes_are_exact():
    shape, value, variance = (400, 400), 2.5, 4.0
    image = np.full(shape, value)
    var = np.full(shape, variance)
    mask = np.zeros(shape, np.uint32)
    peaks = np.array([[150.0, 200.0], [300.0, 120.0], [20.0, 380.0]])
    mask[200, 182] |= masks.BAD  # 32.0 px from the first peak
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k, (px, py) in enumerate(peaks):
        labels[np.hypot(xx - px, yy - py) < 6] = k + 1
    mask[labels > 0] |= masks.DETECTED
    fp = Footprints(
        labels=labels,
        bbox=np.array([[px - 5, py - 5, px + 6, py + 6] for px, py in peaks], np.int64),
        area=np.bincount(labels.ravel())[1:].astype(np.int64),
        peak_footprint=np.arange(3, dtype=np.int64),
        peak_x=peaks[:, 0].copy(),
        peak_y=peaks[:, 1].copy(),
        peak_significance=np.ones(3),
    )
    # (a uniform image has no stars: the neighbour subtraction would take off the "stars'" r^-11/3 wings)
    cat = measure_sources(image, var, mask, fp, GalSimPsf(fwhm=4.0), subtract_neighbours=False)
    np.testing.assert_allclose(cat["x"], peaks[:, 0], atol=1e-6)
    np.testing.assert_allclose(cat["y"], peaks[:, 1], atol=1e-6)
    for r in DEFAULT_APERTURE_RADII:
        name = aperture_column(r)
        inside = (peaks[:, 0] - r > -0.5) & (peaks[:, 0] + r < shape[1] - 0.5)
        inside &= (peaks[:, 1] - r > -0.5) & (peaks[:, 1] + r < shape[0] - 0.5)
        area = np.pi * r * r
        np.testing.assert_allclose(cat[f"{name}Flux"][inside], area * value, rtol=1e-9)
        np.testing.assert_allclose(cat[f"{name}FluxErr"][inside], np.sqrt(area * variance), rtol=1e-9)
        np.testing.assert_array_equal(cat[f"{name}Flux_flag"][~inside], True)
        # the BAD pixel 32 px from the first source is inside its 35, 50, 70 px apertures
        assert cat[f"{name}Flux_flag"][0] == (r >= 35)
    assert cat["pixelFlags_edge"].tolist() == [False, False, False]
    np.testing.assert_allclose(cat["sky"][:2], value, rtol=1e-9)
    assert np.all(cat["skyErr"][:2] < 1e-6)


@pytest.fixture(scope="module")
def blended_pairs():
    rng = np.random.default_rng(7)
    shape = (320, 320)
    psf = GalSimPsf(fwhm=4.0)
    sep_px = 2.0 * psf.fwhm_at(0, 0)
    model, truth = np.zeros(shape), []
    for k, (cx, cy) in enumerate([(80, 80), (240, 80), (80, 240), (240, 240)]):
        angle = k * np.pi / 4 + 0.3
        x1, y1 = cx + rng.uniform(-0.5, 0.5), cy + rng.uniform(-0.5, 0.5)
        x2, y2 = x1 + sep_px * np.cos(angle), y1 + sep_px * np.sin(angle)
        for xi, yi, fi in ((x1, y1, 1.5e5), (x2, y2, 1.5e5 * (0.3 + 0.2 * k))):
            psf.draw_star(model, xi, yi, fi)
            truth.append((xi, yi, fi, k))
    image, var, mask = _observe(model, rng)
    fp = detect(image, var, mask, sigma=1.7)
    return measure_sources(image, var, mask, fp, psf), np.array(truth)


def test_blended_pair_fluxes(blended_pairs):
    cat, truth = blended_pairs
    parents = np.flatnonzero(cat["deblend_nChild"] > 0)
    assert len(parents) == 4 and np.all(cat["deblend_nChild"][parents] == 2)
    children = np.flatnonzero(cat["parent_index"] >= 0)
    assert len(children) == 8
    assert np.all(np.isin(cat["parent_index"][children], parents))
    assert np.all(cat["parent_index"][parents] == -1)
    for xt, yt, ft, _ in truth:
        d = np.hypot(cat["x"][children] - xt, cat["y"][children] - yt)
        j = children[np.argmin(d)]
        assert d.min() < 0.1
        assert abs(cat["psfFlux"][j] / ft - 1) < 0.03
        assert abs(cat["calibFlux"][j] / ft - 1) < 0.03  # aperture on the neighbour-subtracted image
        assert 0.05 < cat["blendedness_abs"][j] < 0.95
        assert cat["extendedness"][j] == 0
    for p in parents:
        kids = np.flatnonzero(cat["parent_index"] == p)
        np.testing.assert_allclose(cat["psfFlux"][p], cat["psfFlux"][kids].sum())
        assert cat["blendedness_abs"][p] == 0
        assert np.isnan(cat["extendedness"][p])
    isolated = (cat["deblend_nChild"] == 0) & (cat["parent_index"] < 0)
    assert np.all(cat["blendedness_abs"][isolated] == 0)


def test_galaxies_are_extended_and_stars_are_not():
    rng = np.random.default_rng(11)
    shape = (600, 600)
    psf = GalSimPsf(fwhm=4.0)  # 0.8 arcsec at 0.2 arcsec/pixel
    hlr_pixels = 1.0 / 0.2
    model, truth = np.zeros(shape), []
    grid = [(gx, gy) for gx in range(40, 561, 52) for gy in range(40, 561, 52)]
    for k, (gx, gy) in enumerate(grid):
        x, y = gx + rng.uniform(-0.5, 0.5), gy + rng.uniform(-0.5, 0.5)
        is_gal = k % 2 == 0
        flux = np.exp(rng.uniform(np.log(5e3), np.log(2e5)))
        if is_gal:
            gal = galsim.Exponential(half_light_radius=hlr_pixels, flux=flux)
            gal = gal.shear(e1=rng.uniform(-0.3, 0.3), e2=rng.uniform(-0.3, 0.3))
            offset = (x - round(x), y - round(y))
            stamp = galsim.Convolve(gal, psf.profile(x, y)).drawImage(
                nx=71, ny=71, scale=1.0, offset=offset, method="no_pixel"
            )
            add_stamp(model, stamp.array, x, y)
        else:
            psf.draw_star(model, x, y, flux)
        truth.append((x, y, is_gal))
    truth = np.array(truth)
    image, var, mask = _observe(model, rng)
    cat = measure_sources(image, var, mask, detect(image, var, mask, sigma=1.7), psf)
    dist, idx = cKDTree(truth[:, :2]).query(np.column_stack([cat["x"], cat["y"]]))
    snr = cat["psfFlux"] / cat["psfFluxErr"]
    ok = (dist < 2.0) & (cat["deblend_nChild"] == 0) & (snr > 20)
    gal = truth[idx, 2] == 1
    assert (ok & gal).sum() > 30 and (ok & ~gal).sum() > 40
    assert np.all(cat["extendedness"][ok & gal] == 1)
    assert np.all(cat["extendedness"][ok & ~gal] == 0)
    assert np.all(cat["sizeExtendedness"][ok & gal] == 1)
    assert np.all(cat["sizeExtendedness"][ok & ~gal] == 0)
    # galaxies: larger moments than the PSF, Gaussian flux well above psfFlux
    assert np.all(cat["ixx"][ok & gal] + cat["iyy"][ok & gal] > 2 * (cat["ixxPSF"] + cat["iyyPSF"])[ok & gal])
    assert np.all(cat["gaussianFlux"][ok & gal] > 1.5 * cat["psfFlux"][ok & gal])


def test_pixel_flags_edges_and_empty_input():
    rng = np.random.default_rng(3)
    shape = (200, 200)
    psf = GalSimPsf(fwhm=4.0)
    model = np.zeros(shape)
    stars = [(60.2, 60.7), (140.4, 60.1), (100.0, 150.3), (3.2, 120.4)]
    for x, y in stars:
        psf.draw_star(model, x, y, 1e5)
    image, var, mask = _observe(model, rng)
    mask[60:62, 140:142] |= masks.SAT | masks.INTRP  # saturated core of star 1
    mask[150, 108] |= masks.CR | masks.INTRP  # cosmic ray 8 px from star 2's centre
    mask[:, 30] |= masks.BAD  # bad column 30 px from star 0
    fp = detect(image, var, mask, sigma=1.7)
    cat = measure_sources(image, var, mask, fp, psf)
    assert len(cat["x"]) == 4
    rows = [int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y))) for x, y in stars]
    flags = {k: cat[k][rows].tolist() for k in cat if k.startswith("pixelFlags_")}
    assert flags["pixelFlags_saturated"] == [False, True, False, False]
    assert flags["pixelFlags_saturatedCenter"] == [False, True, False, False]
    assert flags["pixelFlags_cr"] == [False, False, True, False]
    assert flags["pixelFlags_crCenter"] == [False, False, False, False]
    assert flags["pixelFlags_interpolatedCenter"] == [False, True, False, False]
    assert flags["pixelFlags_edge"] == [False, False, False, True]
    assert cat["psfFlux_flag_edge"][rows].tolist() == [False, False, False, True]
    assert cat["ap35Flux_flag"][rows[0]] and not cat["ap25Flux_flag"][rows[0]]  # bad column at 30 px
    assert cat["ap09Flux_flag"][rows[2]] and not cat["ap06Flux_flag"][rows[2]]  # CR at 8 px
    assert cat["ap06Flux_flag"][rows[3]] and not cat["ap03Flux_flag"][rows[3]]  # x = 3.2: truncated at r > 3.7
    # the unusable saturated core is excluded from the PSF fit, which still recovers the flux
    assert abs(cat["psfFlux"][rows[1]] / 1e5 - 1) < 0.03
    # empty input: every column present and empty
    empty = Footprints(
        labels=np.zeros(shape, np.int32),
        bbox=np.zeros((0, 4), np.int64),
        area=np.zeros(0, np.int64),
        peak_footprint=np.zeros(0, np.int64),
        peak_x=np.zeros(0),
        peak_y=np.zeros(0),
        peak_significance=np.zeros(0),
    )
    out = measure_sources(image, var, mask, empty, psf)
    assert set(out) == set(cat) and all(len(v) == 0 for v in out.values())


def test_background_rms_argument_gives_the_same_fluxes():
    """Default weights (median undetected variance per stamp) vs an explicit background_rms."""
    psf = GalSimPsf(fwhm=4.0)
    rng = np.random.default_rng(9)
    model = np.zeros((160, 160))
    for x, y in ((50.3, 50.6), (110.1, 100.2)):
        psf.draw_star(model, x, y, 5e4)
    image, var, mask = _observe(model, rng)
    fp = detect(image, var, mask, sigma=1.7)
    a = measure_sources(image, var, mask, fp, psf)
    b = measure_sources(image, var, mask, fp, psf, background_rms=np.sqrt(SKY))
    np.testing.assert_allclose(a["psfFlux"], b["psfFlux"], rtol=1e-3)
    np.testing.assert_allclose(b["variance_value"], SKY)


class _KolmogorovPsf(GalSimPsf):
    """A Kolmogorov PSF (the r^-11/3 wing of atmospheric seeing), sampled at pixel centres."""

    @functools.lru_cache(maxsize=16)
    def _profile(self, fwhm: float, halo: float) -> galsim.GSObject:
        return galsim.Kolmogorov(fwhm=fwhm)


def test_neighbour_wings_are_subtracted_from_faint_stars():
    """Faint stars (S/N ~ 20) 4-8 FWHM from bright ones (10^6 e-): the light of the bright star's wing
    beyond its 7-FWHM PSF stamp biases their psfFlux by > 1 sigma unless the neighbours' models (with
    the Kolmogorov wing) are subtracted first.  True PSF, exact sky; expected flux = the true flux in
    the model stamp (the model is unit-sum there)."""
    rng = np.random.default_rng(0)
    shape, fwhm, c = (800, 800), 4.0, 14
    psf = _KolmogorovPsf(fwhm=fwhm, size=2 * c + 1)
    model = np.zeros(shape)
    xs, ys, fs, bright = [], [], [], []
    for gx in range(4):
        for gy in range(4):
            bx, by = 100 + 200 * gx + rng.uniform(-0.5, 0.5), 100 + 200 * gy + rng.uniform(-0.5, 0.5)
            xs.append(bx), ys.append(by), fs.append(1e6), bright.append(True)
            a0 = rng.uniform(0, 2 * np.pi)
            for k in range(6):  # 6 faint stars, >= 4 FWHM apart, at 4-8 FWHM
                r, a = rng.uniform(4, 8) * fwhm, a0 + k * np.pi / 3 + rng.uniform(-0.2, 0.2)
                xs.append(bx + r * np.cos(a)), ys.append(by + r * np.sin(a)), fs.append(1500.0), bright.append(False)
    xs, ys, fs, bright = map(np.array, (xs, ys, fs, bright))
    expected = np.empty(len(xs))
    for i in range(len(xs)):
        size = 199 if bright[i] else 99
        offset = (xs[i] - round(xs[i]), ys[i] - round(ys[i]))
        st = psf.profile(xs[i], ys[i]).drawImage(nx=size, ny=size, scale=1.0, offset=offset, method="no_pixel").array
        add_stamp(model, fs[i] * st, xs[i], ys[i])
        expected[i] = fs[i] * st[size // 2 - c : size // 2 + c + 1, size // 2 - c : size // 2 + c + 1].sum()
    image, var, mask = _observe(model, rng)
    fp = detect(image, var, mask, sigma=fwhm / 2.3548)
    pulls = {}
    for subtract in (False, True):
        cat = measure_sources(image, var, mask, fp, psf, background_rms=np.sqrt(SKY), subtract_neighbours=subtract)
        dist, idx = cKDTree(np.column_stack([xs, ys])).query(np.column_stack([cat["x"], cat["y"]]))
        sel = (cat["deblend_nChild"] == 0) & (dist < 2.0) & ~bright[idx]
        assert sel.sum() >= 90
        pulls[subtract] = (cat["psfFlux"][sel] - expected[idx[sel]]) / cat["psfFluxErr"][sel]
        if subtract:  # apertures are measured on the neighbour-subtracted image too
            assert abs(np.median(cat["ap12Flux"][sel] / fs[idx[sel]]) - 1.0) < 0.03
            assert not cat["psfFlux_flag_unmodelledNeighbour"].any()
    before, after = pulls[False], pulls[True]
    assert before.mean() > 5 * before.std() / np.sqrt(len(before))  # +1.35 +- 0.14 measured
    assert abs(after.mean()) < 3 * after.std() / np.sqrt(len(after))  # +0.03 +- 0.10 measured
    assert 0.8 < after.std() < 1.2


def test_psf_centroid_of_a_degenerate_stamp_is_no_centroid_not_an_exception():
    """_psf_centroid on stamps whose usable pixels cannot constrain both coordinates (one row at the
    stamp's edge, as on a coadd patch's border) reports no centroid (NaN errors, not ok).  Before, a
    nearly singular normal matrix rounded to a negative variance raised 'math domain error' and failed
    a whole objects quantum (seed 13), or gave an 'ok' error of 7e6 pixels (seed 9).  A fully usable
    stamp gives the true centre within 4 sigma."""
    from lsst_prod.algorithms.measure import _psf_centroid

    class _Gauss:
        def image_at(self, x, y, size):
            c = size // 2
            yy, xx = np.mgrid[:size, :size]
            g = np.exp(-((xx - c - (x - np.rint(x))) ** 2 + (yy - c - (y - np.rint(y))) ** 2) / 8.0)
            return g / g.sum()

    psf, size = _Gauss(), 21
    v = np.ones((size, size))
    edge_row = np.zeros((size, size), bool)
    edge_row[20, :] = True
    for seed in (9, 13):
        d = np.random.default_rng(seed).normal(0, 1, (size, size)) + 300 * psf.image_at(10.0, 10.0, size)
        x, y, ex, ey, ok = _psf_centroid(psf, d, v, edge_row, v, 10.2, 9.4)
        assert not ok and np.isnan(ex) and np.isnan(ey), seed
        x, y, ex, ey, ok = _psf_centroid(psf, d, v, np.ones((size, size), bool), v, 10.2, 9.4)
        # the stamp is centred on pixel (rint(x), rint(y)) = (10, 9): the star is there
        assert ok and abs(x - 10.0) < 4 * ex and abs(y - 9.0) < 4 * ey and 0 < ex < 0.2


def test_blend_fit_is_the_least_squares_solution_and_scales_to_a_patch_wide_blend():
    """The simultaneous PSF fit of a blend equals the dense weighted least squares (amplitudes and
    covariance), and a blend of 800 stars spread over 1600 x 1600 pixels (a crowded coadd's skipped
    parent) is fitted without a K x window design (which would be 16 GB)."""
    from lsst_prod.algorithms.measure import _add_stamp, _fit_blend

    rng = np.random.default_rng(5)
    size = 15
    yy, xx = np.mgrid[-7:8, -7:8]
    stamp = np.exp(-0.5 * (xx**2 + yy**2) / 2.0**2)
    stamp /= stamp.sum()
    img = rng.normal(0, 1.0, (80, 90))
    ixs, iys = np.array([20, 26, 60, 3]), np.array([30, 33, 50, 75])
    true_amp = np.array([500.0, 300.0, 800.0, 200.0])
    for a, x, y in zip(true_amp, ixs, iys):
        _add_stamp(img, a * stamp, x - 7, y - 7, 1.0)
    var = np.full(img.shape, 1.0)
    good = np.ones(img.shape, bool)
    good[40:45, :] = False
    stamps = np.repeat(stamp[None], 4, axis=0)
    amp, cov, (x0, y0), model = _fit_blend(img, var, good, 1.0, stamps, ixs, iys)
    # the dense solution, written out
    wy = slice(max(iys.min() - 7, 0), min(iys.max() + 8, img.shape[0]))
    wx = slice(max(ixs.min() - 7, 0), min(ixs.max() + 8, img.shape[1]))
    assert (x0, y0) == (wx.start, wy.start)
    design = np.zeros((4,) + img[wy, wx].shape)
    for k in range(4):
        _add_stamp(design[k], stamps[k], int(ixs[k]) - 7 - wx.start, int(iys[k]) - 7 - wy.start, 1.0)
    X, wts = design.reshape(4, -1), good[wy, wx].ravel().astype(float)
    ninv = np.linalg.pinv((X * wts) @ X.T)
    np.testing.assert_allclose(amp, ninv @ (X @ (wts * img[wy, wx].ravel())), rtol=1e-10)
    np.testing.assert_allclose(cov, ninv @ ((X * wts * wts) @ X.T) @ ninv, rtol=1e-10)
    np.testing.assert_allclose(model(amp), np.tensordot(amp, design, axes=1), atol=1e-9)
    assert np.all(np.abs(amp - true_amp) < 5 * np.sqrt(np.diag(cov)))
    # a patch-wide blend
    n = 800
    big = rng.normal(0, 1.0, (1600, 1600))
    bx, by = rng.integers(10, 1590, n), rng.integers(10, 1590, n)
    for x, y in zip(bx, by):
        _add_stamp(big, 1000.0 * stamp, int(x) - 7, int(y) - 7, 1.0)
    amp, cov, _, model = _fit_blend(big, np.ones_like(big), np.ones(big.shape, bool), 1.0,
                                    np.repeat(stamp[None], n, axis=0), bx, by)
    assert amp.shape == (n,) and cov.shape == (n, n) and min(model(amp).shape) > 1500  # the stamps' union
    assert np.median(np.abs(amp / 1000.0 - 1)) < 0.02


def test_blend_fit_keeps_children_non_negative_when_two_peaks_nearly_coincide():
    """Two peaks 1 pixel apart (0.2 FWHM: nearly degenerate stamps) beside a star of 3,000 e that sits
    half a pixel beyond the second (a misplaced peak), a fainter star 1 FWHM away: the unconstrained fit
    extrapolates, trading flux between the two stamps (one far below zero, as on the dp-mini coadd:
    -54,788 and +57,235 e for stars of 1,432 and 1,651); the blend fit keeps every child >= 0, the pair's
    sum within 8 % of the star and the total within 6 % (the misplaced star's light spills onto the
    third stamp), with finite, positive errors."""
    from lsst_prod.algorithms.measure import _add_stamp, _fit_blend

    fwhm = 4.6
    s = fwhm / 2.3548
    half = 12
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]

    def stamp(dx=0.0):
        st = np.exp(-0.5 * ((xx - dx) ** 2 + yy**2) / s**2)
        return st / st.sum()

    ixs, iys = np.array([40, 41, 45]), np.array([40, 40, 40])
    stamps = np.stack([stamp(), stamp(), stamp()])
    X = np.zeros((3, 80 * 80))
    for k in range(3):
        plane = np.zeros((80, 80))
        _add_stamp(plane, stamps[k], int(ixs[k]) - half, int(iys[k]) - half, 1.0)
        X[k] = plane.ravel()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        img = rng.normal(0, 3.0, (80, 80))
        _add_stamp(img, 3000.0 * stamp(1.5), 40 - half, 40 - half, 1.0)
        _add_stamp(img, 800.0 * stamp(), 45 - half, 40 - half, 1.0)
        free = np.linalg.solve(X @ X.T, X @ img.ravel())
        assert free.min() < -500, free  # the unconstrained trade
        amp, cov, _, _ = _fit_blend(img, np.full(img.shape, 9.0), np.ones(img.shape, bool), 9.0, stamps, ixs, iys)
        assert (amp >= 0).all(), amp
        assert abs(amp[:2].sum() / 3000.0 - 1) < 0.08 and abs(amp.sum() / 3800.0 - 1) < 0.06, amp
        assert np.all(np.isfinite(np.diag(cov))) and np.all(np.diag(cov) > 0)
