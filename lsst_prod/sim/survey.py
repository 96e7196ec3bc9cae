"""The whole simulated survey: camera, visits, sky, QE factors (built once per config, cached)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..camera import Camera
from ..config.simulation import SimulationConfig
from .cadence import VisitTruth, make_visits, qe_factors
from .refcat import assign_ref_ids
from .sky import SkyCatalog, make_sky
from .spec import make_sim_camera


@dataclass(frozen=True, eq=False)
class Survey:
    config: SimulationConfig
    camera: Camera
    visits: tuple[VisitTruth, ...]
    sky: SkyCatalog
    qe: dict[tuple[int, str], float]  # (detector, band) -> QE factor

    def visit(self, visit: int) -> VisitTruth:
        for v in self.visits:
            if v.visit == visit:
                return v
        raise KeyError(f"no visit {visit} in this simulation (visits {self.visits[0].visit}..{self.visits[-1].visit})")

    @property
    def visit_ids(self) -> list[int]:
        return [v.visit for v in self.visits]


@functools.lru_cache(maxsize=4)
def _build(config_json: str) -> Survey:
    config = SimulationConfig.model_validate_json(config_json)
    camera = make_sim_camera(config)
    visits = make_visits(config, camera)
    sky = make_sky(config, camera, visits)
    assign_ref_ids(config, sky)
    return Survey(config, camera, tuple(visits), sky, qe_factors(config, camera))


def build_survey(config: SimulationConfig) -> Survey:
    """The survey for ``config`` (deterministic; cached per process on the config's JSON).

    Treat the result as read-only: it is shared by every caller with the same config.
    """
    return _build(config.model_dump_json())
