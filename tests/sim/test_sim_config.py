from __future__ import annotations

import pytest
from pydantic import ValidationError

from lsst_prod.config.simulation import SimulationConfig


def test_defaults_are_valid_and_documented():
    c = SimulationConfig()
    assert c.n_visits == 24
    dates = c.night_dates()
    assert (dates[-1] - dates[0]).days >= 730  # >= 2 years: proper motion and parallax matter
    schema = SimulationConfig.model_json_schema()
    missing = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert not missing, f"fields without a description: {missing}"


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(seeing_min_arcsec=1.0, seeing_max_arcsec=0.8), "seeing_min_arcsec"),
        (dict(seeing_max_arcsec=3.0, pixel_scale_arcsec=0.1), "exceeds 25.0 px"),
        (dict(bands=("g", "q")), "unknown band"),
        (dict(refcat_bright_limit=12.0, refcat_mag_limit=11.0), "refcat_bright_limit"),
        (dict(zero_point_mag={"g": 28.0}), "zero_point_mag lacks"),
        (dict(star_mag_min=24.0, star_mag_max=20.0), "star_mag_min"),
        (dict(distortion_k_per_pix2=1e-7), "distortion"),
        (dict(start_day_obs="2090-01-01"), "2^33"),
        (dict(nope=1), "Extra inputs"),
    ],
)
def test_validators_have_clear_messages(kw, fragment):
    with pytest.raises(ValidationError) as err:
        SimulationConfig(**kw)
    assert fragment in str(err.value)


def test_frozen_and_json_round_trip():
    c = SimulationConfig(seed=7, bands=["g", "r", "i"])
    with pytest.raises(ValidationError):
        c.seed = 3  # type: ignore[misc]
    again = SimulationConfig.model_validate_json(c.model_dump_json())
    assert again == c
    assert again.model_dump_json() == c.model_dump_json()


def test_zero_point_offset_can_be_large():
    assert SimulationConfig(zero_point_offset_rms_mmag=80).zero_point_offset_rms_mmag == 80
