"""Shared fixtures: a tiny simulated survey (simulated once per session, copied per test)."""

from __future__ import annotations

import shutil

import pytest

from _helpers import write_campaign
from lsst_prod.cli import main


@pytest.fixture(scope="session")
def simulated(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    campaign = write_campaign(base)
    assert main(["simulate", str(campaign), "--repo", str(base / "repo")]) == 0
    return base / "repo"


@pytest.fixture
def workdir(tmp_path, simulated):
    shutil.copytree(simulated, tmp_path / "repo")
    return tmp_path


