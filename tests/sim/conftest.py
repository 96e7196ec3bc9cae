"""Small, fast simulation configs shared by the simulator tests."""

from __future__ import annotations

import pytest

from lsst_prod.config.simulation import SimulationConfig


def small_config(**overrides) -> SimulationConfig:
    """Two 256x256 detectors, one night, one visit per band (2 visits, 4 CCDs)."""
    kw = dict(
        seed=2024,
        detector_nx=256,
        detector_ny=256,
        overscan_pix=16,
        detector_gap_pix=20,
        n_nights=1,
        visits_per_night_per_band=1,
        dither_radius_arcsec=10.0,
        n_bad_columns=2,
    )
    kw.update(overrides)
    return SimulationConfig(**kw)


@pytest.fixture(scope="session")
def make_config():
    """Factory: ``make_config(**overrides)`` -> a small SimulationConfig."""
    return small_config


@pytest.fixture(scope="session")
def small() -> SimulationConfig:
    return small_config()
