"""The TRUE sky <-> pixel mapping and epoch propagation."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from lsst_prod.camera import nominal_wcs_header
from lsst_prod.config.simulation import SimulationConfig
from lsst_prod.sim.astrometry import (
    MAS,
    distort,
    earth_barycentric_au,
    gnomonic,
    inverse_gnomonic,
    local_jacobian,
    positions_at_epoch,
    true_pixel_to_sky,
    true_sky_to_pixel,
    undistort,
)
from lsst_prod.sim.cadence import make_visits
from lsst_prod.sim.spec import make_sim_camera


@pytest.fixture(scope="module")
def default_setup():
    config = SimulationConfig(n_nights=1)
    camera = make_sim_camera(config)
    return config, camera, make_visits(config, camera)


def test_round_trip_1e6_pixel(default_setup):
    _, camera, visits = default_setup
    rng = np.random.default_rng(1)
    for vt in visits:
        for det in camera.detectors:
            x = rng.uniform(-50, det.nx + 50, 2000)
            y = rng.uniform(-50, det.ny + 50, 2000)
            ra, dec = true_pixel_to_sky(vt, det, x, y)
            x2, y2 = true_sky_to_pixel(vt, det, ra, dec)
            assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6


def test_accepts_a_truth_row_mapping(default_setup):
    _, camera, visits = default_setup
    vt, det = visits[0], camera.detectors[1]
    row = dataclasses.asdict(vt)
    x, y = true_sky_to_pixel(row, det, vt.true_ra, vt.true_dec)
    x0, y0 = true_sky_to_pixel(vt, det, vt.true_ra, vt.true_dec)
    assert x == x0 and y == y0


def test_without_errors_matches_the_nominal_header_wcs(default_setup):
    from astropy.io import fits
    from astropy.wcs import WCS

    _, camera, visits = default_setup
    vt = dataclasses.replace(visits[0], true_ra=visits[0].cmd_ra, true_dec=visits[0].cmd_dec,
                             true_rotation=visits[0].cmd_rotation, distortion_k=0.0)
    rng = np.random.default_rng(2)
    for det in camera.detectors:
        hdr = fits.Header()
        for k, v in nominal_wcs_header(camera, det, vt.cmd_ra, vt.cmd_dec, vt.cmd_rotation).items():
            hdr[k] = v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(hdr)
        x = rng.uniform(0, det.nx - 1, 500)
        y = rng.uniform(0, det.ny - 1, 500)
        ra, dec = wcs.pixel_to_world_values(x, y)
        x2, y2 = true_sky_to_pixel(vt, det, ra, dec)
        assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6


def test_orientation_convention(default_setup):
    """rot = 0: +x is West (RA decreases), +y North; rot = 90: +y points East."""
    _, camera, visits = default_setup
    det = camera.detectors[0]
    vt = dataclasses.replace(visits[0], true_rotation=0.0, distortion_k=0.0)
    x0, y0 = true_sky_to_pixel(vt, det, vt.true_ra, vt.true_dec)
    x1, y1 = true_sky_to_pixel(vt, det, vt.true_ra + 1e-3, vt.true_dec)  # East
    assert x1 < x0 and abs(y1 - y0) < 1e-3
    x2, y2 = true_sky_to_pixel(vt, det, vt.true_ra, vt.true_dec + 1e-3)  # North
    assert y2 > y0 and abs(x2 - x0) < 1e-6
    vt90 = dataclasses.replace(vt, true_rotation=90.0)
    x0, y0 = true_sky_to_pixel(vt90, det, vt.true_ra, vt.true_dec)
    x1, y1 = true_sky_to_pixel(vt90, det, vt.true_ra + 1e-3, vt.true_dec)
    assert y1 > y0


def test_distortion_size_and_inverse(default_setup):
    config, camera, _ = default_setup
    r = config.focal_plane_radius_pix()
    u, v = distort(np.array([r]), np.array([0.0]), config.distortion_k_per_pix2)
    assert 2.0 < u[0] - r < 3.0  # "2-3 pixels at the focal-plane corner"
    uu, vv = np.random.default_rng(3).uniform(-1500, 1500, (2, 1000))
    ui, vi = undistort(*distort(uu, vv, 1.5e-9), 1.5e-9)
    assert np.max(np.hypot(ui - uu, vi - vv)) < 1e-9


def test_local_jacobian_scale_and_parity(default_setup):
    _, camera, visits = default_setup
    vt, det = visits[0], camera.detectors[0]
    ra, dec = true_pixel_to_sky(vt, det, det.nx / 2, det.ny / 2)
    J = local_jacobian(vt, det, ra, dec)[0]
    sv = np.linalg.svd(J, compute_uv=False)
    assert np.allclose(sv, 1 / 0.2, rtol=0.01)
    assert np.linalg.det(J) > 0  # (West, North) -> (x, y) keeps handedness: +x West, +y North


def test_gnomonic_inverse():
    rng = np.random.default_rng(4)
    ra = 150 + rng.uniform(-1, 1, 100)
    dec = 2 + rng.uniform(-1, 1, 100)
    xi, eta = gnomonic(150.3, 2.1, ra, dec)
    ra2, dec2 = inverse_gnomonic(150.3, 2.1, xi, eta)
    assert np.max(np.abs(ra2 - ra)) < 1e-11 and np.max(np.abs(dec2 - dec)) < 1e-11


def test_parallax_matches_exact_vector_computation():
    """The linear parallax formula equals the exact topocentric-shift geometry to < 1 uas."""
    rng = np.random.default_rng(5)
    ra = rng.uniform(0, 360, 50)
    dec = rng.uniform(-80, 80, 50)
    plx = rng.uniform(0.1, 20, 50)  # mas
    mjd = 60700.3
    earth = earth_barycentric_au(mjd)[0]
    assert 0.98 < np.linalg.norm(earth) < 1.02
    ra_t, dec_t = positions_at_epoch(ra, dec, 0 * ra, 0 * ra, plx, mjd, earth, 57388.0)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    dist_au = 1.0 / (plx * MAS)
    p = np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=1) * dist_au[:, None] - earth
    ra_e = np.rad2deg(np.arctan2(p[:, 1], p[:, 0])) % 360
    dec_e = np.rad2deg(np.arcsin(p[:, 2] / np.linalg.norm(p, axis=1)))
    d_ra = (ra_t - ra_e) * np.cos(d) * 3.6e6
    d_dec = (dec_t - dec_e) * 3.6e6
    assert np.max(np.hypot(d_ra, d_dec)) < 1e-3  # mas


def test_proper_motion_over_ten_years():
    ra, dec = np.array([150.0]), np.array([60.0])
    ra_t, dec_t = positions_at_epoch(ra, dec, np.array([100.0]), np.array([-50.0]), np.array([0.0]),
                                     57388.0 + 3652.5, np.zeros(3), 57388.0)
    assert abs((ra_t[0] - 150.0) * np.cos(np.deg2rad(60.0)) * 3.6e6 - 1000.0) < 0.05
    assert abs((dec_t[0] - 60.0) * 3.6e6 + 500.0) < 0.05
