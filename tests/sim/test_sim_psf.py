"""The simulator's PSF: Kolmogorov x Airy by default, any seeing, Moffat as an option, field dependence."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from lsst_prod.config.simulation import SimulationConfig
from lsst_prod.sim import build_survey, psf_at, render_ccd
from lsst_prod.sim.psf import PointSourceDrawer, PsfFactory, measure_fwhm


def test_kolmogorov_is_the_default_and_two_arcsec_is_accepted():
    c = SimulationConfig(seeing_min_arcsec=0.4, seeing_max_arcsec=2.0)
    assert c.psf_model == "kolmogorov"
    assert SimulationConfig(seeing_min_arcsec=2.0, seeing_max_arcsec=2.0).seeing_max_arcsec == 2.0


@pytest.mark.parametrize("fwhm", [2.0, 5.0, 10.0])
def test_measure_fwhm_is_exact_on_analytic_profiles(fwhm):
    for prof in (galsim.Kolmogorov(fwhm=fwhm), galsim.Moffat(beta=3.5, fwhm=fwhm), galsim.Gaussian(fwhm=fwhm)):
        assert measure_fwhm(prof, fwhm) == pytest.approx(fwhm, rel=1e-6)


@pytest.mark.parametrize("seeing", [0.4, 0.5, 1.0, 2.0])
def test_drawn_kolmogorov_fwhm_matches_the_configured_seeing(seeing):
    f = PsfFactory(SimulationConfig(), "r")
    target = seeing / 0.2
    # the profile drawn (Kolmogorov x obscured Airy) has the target FWHM within 1e-4 (direct measurement)
    assert f.measure(target) == pytest.approx(target, rel=1e-4)
    assert float(f.drawn_fwhm(target)) == pytest.approx(f.measure(target), rel=1e-4)
    assert float(f.atmosphere_fwhm(target)) < target  # the optics take their share


@pytest.mark.parametrize("fwhm, g1, g2, dx, dy", [(2.5, 0.0, 0.0, 0.0, 0.0), (4.0, 0.04, -0.02, 0.3, -0.45),
                                                  (10.0, -0.03, 0.03, -0.2, 0.1)])
def test_point_source_drawer_equals_galsim(fwhm, g1, g2, dx, dy):
    f = PsfFactory(SimulationConfig(), "r", galsim.GSParams(folding_threshold=1e-3))
    size = 2 * f.point_source_radius(fwhm, np.hypot(g1, g2)) + 1
    mine = PointSourceDrawer(f).draw(fwhm, g1, g2, dx, dy, size)
    ref = f.profile(fwhm, g1, g2).drawImage(galsim.ImageD(size, size, scale=1.0), offset=(dx, dy), method="auto").array
    assert np.abs(mine - ref).max() < 5e-5 * ref.max()
    assert mine.sum() == pytest.approx(1.0, abs=1e-9)  # the whole flux: light beyond the stamp wraps into it
    assert ref.sum() > 0.996


def _render(seeing, **kw):
    c = SimulationConfig(seed=5, detector_nx=256, detector_ny=256, overscan_pix=16, n_nights=1,
                         visits_per_night_per_band=1, seeing_min_arcsec=seeing, seeing_max_arcsec=seeing,
                         psf_fwhm_growth_frac=0.3, **kw)
    s = build_survey(c)
    return c, s, render_ccd(c, s.visits[0].visit, 0, keep_images=True)


@pytest.mark.parametrize("model", ["kolmogorov", "moffat"])
def test_truth_fwhm_and_field_dependence(model):
    c, s, r = _render(2.0, psf_model=model)
    vt = s.visits[0]
    det = s.camera.detector(0)
    fw, g1, g2 = psf_at(vt, det.fp_x0, det.fp_y0)
    assert r.ccdvisit["psf_fwhm_pix"] == pytest.approx(float(fw), rel=1e-4)
    assert r.ccdvisit["seeing_fwhm_arcsec"] == pytest.approx(float(fw) * 0.2, rel=1e-4)
    # field dependence: FWHM grows with focal-plane radius, shear varies across the detector
    t = r.sources
    assert t["psf_fwhm_pix"].max() / t["psf_fwhm_pix"].min() > 1.01
    assert np.ptp(t["psf_g1"]) > 1e-3 or np.ptp(t["psf_g2"]) > 1e-3


def test_moffat_option_draws_a_moffat():
    f = PsfFactory(SimulationConfig(psf_model="moffat", psf_moffat_beta=3.5), "r")
    p = f.round_profile(6.0)
    assert isinstance(p, galsim.Moffat) and p.beta == 3.5 and p.fwhm == pytest.approx(6.0)

