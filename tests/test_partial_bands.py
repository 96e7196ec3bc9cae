"""A band with too few visits is left out of the relative calibration, not the whole release:
the other bands are calibrated, and the left-out band's warps and forced photometry are blocked
(InsufficientInputs) instead of silently mixing calibrations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lsst_prod.errors import InsufficientInputs
from lsst_prod.stages.common import relcal_zero_point
from lsst_prod.stages.relcal import _bands_below_minimum


def _ctx():
    return SimpleNamespace(left_out=[], data_id="instrument=SimCam")


def test_short_band_is_left_out_and_the_others_kept():
    bands = np.array(["i", "i", "i", "i", "z", "z"])
    visits = [1, 1, 2, 2, 3, 3]  # i: 2 visits, z: 1 visit (two detectors each)
    assert _bands_below_minimum(_ctx(), bands, visits, 2) == {"z": 1}
    assert _bands_below_minimum(_ctx(), bands, visits, 1) == {}


def test_no_band_left_blocks_the_quantum():
    with pytest.raises(InsufficientInputs, match="no band has enough visits"):
        _bands_below_minimum(_ctx(), np.array(["i", "z"]), [1, 2], 2)


def test_relcal_zero_point_never_mixes_calibrations():
    assert relcal_zero_point(None, {}, 1, 0, 31.0) == 31.0  # no relcal in this campaign: the calexp's
    assert relcal_zero_point(None, {(1, 0): 32.5}, 1, 0, 31.0) == 32.5
    with pytest.raises(InsufficientInputs, match="left out of the relative calibration"):
        relcal_zero_point(None, {(1, 0): 32.5}, 2, 0, 31.0)


def test_relcal_zero_point_of_a_set_aside_detector_visit_is_no_work():
    from lsst_prod.errors import NoWorkFound

    with pytest.raises(NoWorkFound, match="set aside by relcal"):
        relcal_zero_point(None, {(1, 0): float("nan"), (1, 1): 32.5}, 1, 0, 31.0)
    assert relcal_zero_point(None, {(1, 0): float("nan"), (1, 1): 32.5}, 1, 1, 31.0) == 32.5


def test_thin_ccdvisits_error_carries_every_id():
    from lsst_prod.algorithms.relcal_normals import ThinCcdVisits
    from lsst_prod.errors import AlgorithmError

    e = ThinCcdVisits(np.arange(30), "fewer than 20 stars")
    assert isinstance(e, AlgorithmError) and len(e.ccdvisit_ids) == 30 and len(e.metadata["ccdvisit_ids"]) == 20
    assert "30 ccdvisit(s) have fewer than 20 stars" in str(e)
