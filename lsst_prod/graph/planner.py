"""Planner: campaign + registry -> quantum graph.  Pure apart from registry reads.

Each enabled stage enumerates its quanta (:meth:`Stage.plan`) from the
selected visits, the camera's detectors and the sky map; the planner then
links them: an input another quantum writes becomes an edge, an input that
already exists in the repository (raw, calibrations, reference catalogue) is
resolved to its ref now, and anything else is a :class:`PlanningError` naming
the quantum and the dataset.
"""

from __future__ import annotations

import datetime as dt
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..camera import Camera
from ..config.campaign import Campaign
from ..errors import PlanningError
from ..repo import DataId, DatasetRef, Repository
from ..skymap import SkyMap
from ..stages import STAGES
from ..stages.base import QuantumSpec
from .graph import Quantum, QuantumGraph


def input_runs(instrument: str) -> list[str]:
    """The input collections searched, in order, for pre-existing datasets."""
    return [f"{instrument}/raw", f"{instrument}/calib", "refcats"]


def _day_obs_int(d: dt.date) -> int:
    return d.year * 10000 + d.month * 100 + d.day


@dataclass
class PlanningContext:
    repo: Repository
    campaign: Campaign
    run: str
    produced: dict[tuple[str, DataId], str] = field(default_factory=dict)

    @property
    def instrument(self) -> str:
        return self.campaign.config.instrument

    @cached_property
    def camera(self) -> Camera:
        ref = self.repo.find("camera", {"instrument": self.instrument}, input_runs(self.instrument))
        if ref is None:
            raise PlanningError(
                f"no camera for instrument {self.instrument!r} in {self.repo.root}; "
                f"run `lsst-prod simulate {self.campaign.path} --repo {self.repo.root}` first"
            )
        return Camera.from_json(self.repo.path_of(ref).read_text())

    @cached_property
    def skymap(self) -> SkyMap:
        return SkyMap(self.campaign.config.skymap)

    @cached_property
    def visits(self) -> list[dict[str, Any]]:
        """Visit records selected by the campaign (bands, dates, include/exclude)."""
        cfg = self.campaign.config
        sel = cfg.visits
        known = sorted(set(self.camera.physical_filters.values()))
        for i, band in enumerate(cfg.bands):
            if band not in known:
                close = difflib.get_close_matches(band, known, n=1) or [b for b in known if b.lower() == band.lower()]
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PlanningError(f"{self.campaign.doc.where(('bands', i))}: key 'bands.{i}': instrument "
                                    f"{self.instrument!r} has no band {band!r} (its bands: {known}){hint}")
        out = []
        for v in self.repo.visits(self.instrument):
            if v["band"] not in cfg.bands:
                continue
            if sel.start and v["day_obs"] < _day_obs_int(sel.start):
                continue
            if sel.cutoff and v["day_obs"] > _day_obs_int(sel.cutoff):
                continue
            if sel.include is not None and v["visit"] not in sel.include:
                continue
            if v["visit"] in sel.exclude:
                continue
            out.append(v)
        if not out:
            raise PlanningError(
                f"{self.campaign.path}: no visit of instrument {self.instrument!r} matches the selection "
                f"(bands {cfg.bands}, start {sel.start}, cutoff {sel.cutoff}); "
                f"the repository has {len(self.repo.visits(self.instrument))} visits"
            )
        return out

    @cached_property
    def detectors(self) -> list[int]:
        wanted = self.campaign.config.visits.detectors
        ids = self.camera.detector_ids
        return [d for d in ids if wanted is None or d in wanted]

    def existing(self, dataset_type: str, data_id: Mapping[str, Any]) -> DatasetRef | None:
        return self.repo.find(dataset_type, data_id, input_runs(self.instrument))


def plan(repo: Repository, campaign: Campaign, run: str) -> QuantumGraph:
    """Expand ``campaign`` into a quantum graph for output run ``run``."""
    ctx = PlanningContext(repo, campaign, run)
    enabled = campaign.config.stages.enabled()
    order = [name for name in STAGES if name in enabled]
    specs: list[QuantumSpec] = []
    for name in order:
        stage = STAGES[name]()
        stage_specs = stage.plan(ctx, enabled[name])
        for spec in stage_specs:
            for key in spec.outputs:
                if key in ctx.produced:
                    raise PlanningError(f"{key[0]} {key[1]} would be written by both {ctx.produced[key]} "
                                        f"and {spec.quantum_id}")
                ctx.produced[key] = spec.quantum_id
        specs.extend(stage_specs)
    if not specs:
        raise PlanningError(f"{campaign.path}: the campaign plans no quanta")

    quanta = []
    prereq_cache: dict[tuple[str, DataId], DatasetRef | None] = {}
    for spec in specs:
        deps: set[str] = set()
        prereqs: list[DatasetRef] = []
        for key in spec.inputs:
            producer = ctx.produced.get(key)
            if producer is not None:
                deps.add(producer)
                continue
            if key not in prereq_cache:
                prereq_cache[key] = ctx.existing(*key)
            ref = prereq_cache[key]
            if ref is None:
                raise PlanningError(f"quantum {spec.quantum_id} needs {key[0]} {key[1]}, which no stage "
                                    f"produces and the repository does not hold (runs {input_runs(ctx.instrument)})")
            prereqs.append(ref)
        quanta.append(Quantum(spec, tuple(prereqs), tuple(sorted(deps))))
    return QuantumGraph(quanta, order)
