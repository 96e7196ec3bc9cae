"""Deterministic survey simulator with truth tables (see docs/simulator.md).

Light imports (astrometry, cadence, truth helpers) are eager; the GalSim-based
rendering and the repository writer are imported on first use, so that
validation code can use :func:`true_sky_to_pixel` without loading GalSim.
"""

from __future__ import annotations

from typing import Any

from ..config.simulation import SimulationConfig
from .astrometry import (
    earth_barycentric_au,
    focal_plane_to_sky,
    positions_at_epoch,
    sky_to_focal_plane,
    true_pixel_to_sky,
    true_sky_to_pixel,
)
from .cadence import VisitTruth, psf_at, sky_e_per_pix, zero_point
from .spec import AB_NJY_ZERO_POINT, electrons_from_njy, make_sim_camera, mag_to_njy, njy_to_mag

_LAZY = {
    "render_ccd": ".render",
    "CcdRender": ".render",
    "simulate_to_repo": ".writer",
    "build_survey": ".survey",
    "Survey": ".survey",
    "make_refcat": ".refcat",
    "visit_truth_from_row": ".truth",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AB_NJY_ZERO_POINT",
    "CcdRender",
    "SimulationConfig",
    "Survey",
    "VisitTruth",
    "build_survey",
    "earth_barycentric_au",
    "electrons_from_njy",
    "focal_plane_to_sky",
    "mag_to_njy",
    "make_refcat",
    "make_sim_camera",
    "njy_to_mag",
    "positions_at_epoch",
    "psf_at",
    "render_ccd",
    "simulate_to_repo",
    "sky_e_per_pix",
    "sky_to_focal_plane",
    "true_pixel_to_sky",
    "true_sky_to_pixel",
    "visit_truth_from_row",
    "zero_point",
]
