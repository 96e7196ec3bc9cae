"""Orientation conventions of drawn shapes: galaxies (sky frame) and the PSF (detector frame)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lsst_prod.sim.astrometry import true_pixel_to_sky
from lsst_prod.sim.render import DrawList, draw_objects
from lsst_prod.sim.spec import KIND_ASTEROID, KIND_GALAXY, KIND_STAR
from lsst_prod.sim.survey import build_survey


def _moments(img):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    f = img.sum()
    cx, cy = (img * xx).sum() / f, (img * yy).sum() / f
    qxx = (img * (xx - cx) ** 2).sum() / f
    qyy = (img * (yy - cy) ** 2).sum() / f
    qxy = (img * (xx - cx) * (yy - cy)).sum() / f
    return f, cx, cy, (qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)


def _draw_one(config, survey, kind, rotation, **overrides):
    sky = survey.sky
    k = int(np.flatnonzero(sky.kind == kind)[0])
    fields = {}
    for name, value in overrides.items():
        arr = getattr(sky, name).copy()
        arr[k] = value
        fields[name] = arr
    sky2 = dataclasses.replace(sky, **fields)
    vt = dataclasses.replace(survey.visits[0], true_rotation=rotation, psf_g1_0=0.0, psf_g1_u=0.0, psf_g1_v=0.0,
                             psf_g2_0=0.0, psf_g2_u=0.0, psf_g2_v=0.0)
    det = survey.camera.detector(0)
    x, y = 128.3, 127.6
    ra, dec = true_pixel_to_sky(vt, det, x, y)
    objs = DrawList(np.array([k]), np.array([x]), np.array([y]), np.atleast_1d(ra), np.atleast_1d(dec),
                    np.array([1.0]), np.array([1e5]))
    model, peak, _ = draw_objects(config, sky2, vt, det, objs)
    return model, (x, y)


@pytest.mark.parametrize("rotation, sign1, sign2", [(0.0, 1, 1), (90.0, -1, -1)])
def test_galaxy_shear_is_in_the_sky_frame(small, rotation, sign1, sign2):
    survey = build_survey(small)
    base = dict(bulge_frac=0.0, disk_hlr_arcsec=1.0, bulge_hlr_arcsec=0.3)
    m1, (x, y) = _draw_one(small, survey, KIND_GALAXY, rotation, g1=0.3, g2=0.0, **base)
    f, cx, cy, e1, e2 = _moments(m1)
    assert f == pytest.approx(1e5, rel=2e-3)
    assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02
    assert sign1 * e1 > 0.2 and abs(e2) < 0.02
    m2, _ = _draw_one(small, survey, KIND_GALAXY, rotation, g1=0.0, g2=0.3, **base)
    _, _, _, e1, e2 = _moments(m2)
    assert sign2 * e2 > 0.2 and abs(e1) < 0.02


def test_psf_shear_is_in_detector_axes(small):
    survey = build_survey(small)
    sky = survey.sky
    k = int(np.flatnonzero(sky.kind == KIND_STAR)[0])
    det = survey.camera.detector(0)
    for rot in (0.0, 90.0):
        vt = dataclasses.replace(survey.visits[0], true_rotation=rot, psf_g1_0=0.05, psf_g1_u=0.0, psf_g1_v=0.0,
                                 psf_g2_0=0.0, psf_g2_u=0.0, psf_g2_v=0.0)
        ra, dec = true_pixel_to_sky(vt, det, 128.0, 128.0)
        objs = DrawList(np.array([k]), np.array([128.0]), np.array([128.0]), np.atleast_1d(ra), np.atleast_1d(dec),
                        np.array([1.0]), np.array([1e5]))
        model, _, psf = draw_objects(small, sky, vt, det, objs)
        f, _, _, e1, e2 = _moments(model)
        assert psf["psf_g1"][0] == pytest.approx(0.05)
        assert f == pytest.approx(1e5, rel=1.5e-3)
        assert e1 > 0.05 and abs(e2) < 0.005


def test_asteroid_trail_direction(small):
    survey = build_survey(small)
    # moving North at 2 deg/day: 2.5" in 30 s = 12.5 px; rot = 0 puts North along +y
    model, _ = _draw_one(small, survey, KIND_ASTEROID, 0.0, rate_ra_deg_per_day=0.0, rate_dec_deg_per_day=2.0)
    f, _, _, e1, e2 = _moments(model)
    assert f == pytest.approx(1e5, rel=2e-3)
    assert e1 < -0.2 and abs(e2) < 0.02  # L^2/12 = 13 px^2 added to the y variance
