"""The campaign: what a data-release production is asked to do.

A campaign YAML names the release, the sky map and tracts, bands, visit
selection and cut-off date, stages with their parameters, the site and the
retry policy.  Paths in it are relative to the campaign file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError
from ..names import SafeName
from .simulation import SimulationConfig
from .site import SiteConfig, load_site
from .skymap import SkyMapConfig
from .stages import StagesConfig
from .yamlio import LocatedYaml, load_yaml, validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: Visit and detector IDs: non-negative and small enough to pack into 64-bit object IDs.
VisitId = Annotated[int, Field(ge=0, lt=2**40)]
DetectorId = Annotated[int, Field(ge=0, lt=10_000)]


class VisitSelection(_Strict):
    """Which visits enter the release: a date range (the cut-off) and explicit lists."""

    start: dt.date | None = Field(None, description="first observing night (day_obs) included")
    cutoff: dt.date | None = Field(None, description="last observing night included (release cut-off)")
    include: list[VisitId] | None = Field(None, description="only these visit IDs")
    exclude: list[VisitId] = Field(default_factory=list, description="visit IDs to leave out")
    detectors: list[DetectorId] | None = Field(None, description="only these detectors")

    @model_validator(mode="after")
    def _order(self) -> "VisitSelection":
        if self.start and self.cutoff and self.start > self.cutoff:
            raise ValueError(f"start {self.start} is after cutoff {self.cutoff}")
        return self


class RetryPolicy(_Strict):
    """How many attempts each error class gets (see lsst_prod.execution.policy)."""

    max_attempts: int = Field(3, ge=1, le=20, description="attempts per quantum for retryable errors")
    retry_transient: bool = True
    retry_out_of_memory: bool = True


class InjectedFailureSpec(_Strict):
    """Make a chosen quantum fail on purpose (drills and tests)."""

    stage: str = Field(..., max_length=64)
    data_id: dict[SafeName, Annotated[int, Field(ge=0, lt=2**62)] | SafeName]
    error: Literal["transient", "algorithm", "out_of_memory", "crash"] = "algorithm"
    attempts: list[Annotated[int, Field(ge=1, le=100)]] = Field(default_factory=lambda: [1],
                                                               description="fail on these attempt numbers")


class CampaignConfig(_Strict):
    release: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="data release name")
    release_id: int = Field(..., ge=0, le=63, description="release number packed into every 64-bit ID")
    description: str = Field("", max_length=10_000)
    instrument: SafeName = "SimCam"
    repo: str | None = Field(None, max_length=4096, description="default data repository (relative to this file)")
    site: str = Field("../sites/local.yaml", min_length=1, max_length=4096,
                      description="site file (relative to this file)")
    skymap: SkyMapConfig = Field(default_factory=SkyMapConfig)
    tracts: list[Annotated[int, Field(ge=0, lt=10_000_000)]] | Literal["auto"] = Field(
        "auto", description="tracts to process, or all that the visits touch")
    bands: list[SafeName] = Field(..., min_length=1, max_length=20)
    visits: VisitSelection = Field(default_factory=VisitSelection)
    stages: StagesConfig
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    inject_failures: list[InjectedFailureSpec] = Field(default_factory=list)
    simulation: SimulationConfig | None = None

    @field_validator("bands")
    @classmethod
    def _distinct_bands(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"bands {v} contain duplicates")
        return v


class Campaign:
    """A validated campaign plus where it came from (for relative paths and messages)."""

    def __init__(self, config: CampaignConfig, path: Path, doc: LocatedYaml, site: SiteConfig, site_path: Path):
        self.config = config
        self.path = path
        self.doc = doc
        self.site = site
        self.site_path = site_path

    @property
    def name(self) -> str:
        return self.config.release

    def resolve(self, relative: str) -> Path:
        return (self.path.parent / relative).resolve()

    def repo_path(self, override: str | Path | None = None) -> Path:
        if override is not None:
            return Path(override).resolve()
        if self.config.repo is None:
            raise ConfigError(f"{self.doc.where(('repo',))}: no 'repo' in the campaign; pass --repo DIR")
        return self.resolve(self.config.repo)

    def to_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")


def load_campaign(path: str | Path, site_override: str | Path | None = None) -> Campaign:
    """Load and validate a campaign and its site; ConfigError names file:line and key."""
    try:
        path = Path(path).resolve() if Path(path).exists() else Path(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)[:200]!r}: not a usable path ({exc})") from None
    doc = load_yaml(path)
    config = validate(doc, CampaignConfig)
    assert isinstance(config, CampaignConfig)
    if site_override is not None:
        site_path = Path(site_override).resolve()
    else:
        try:
            site_path = (path.parent / config.site).resolve()
            found = site_path.is_file()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{doc.where(('site',))}: key 'site': {config.site[:100]!r} is not a usable path "
                              f"({exc})") from None
        if not found:
            raise ConfigError(f"{doc.where(('site',))}: key 'site': file {config.site!r} not found "
                              f"(looked for {site_path}); paths are relative to the campaign file")
    sim = config.simulation
    if sim is not None:
        for i, band in enumerate(config.bands):
            if band not in sim.bands:
                import difflib

                close = difflib.get_close_matches(band, list(sim.bands), n=1) or \
                    [b for b in sim.bands if b.lower() == band.lower()]
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{doc.where(('bands', i))}: key 'bands.{i}': band {band!r} is not observed by "
                                  f"the simulated survey (simulation.bands: {list(sim.bands)}){hint}")
    site = load_site(site_path)
    for i, spec in enumerate(config.inject_failures):
        if spec.stage not in config.stages.enabled():
            raise ConfigError(f"{doc.where(('inject_failures', i, 'stage'))}: key 'inject_failures.{i}.stage': "
                              f"stage {spec.stage!r} is not enabled in 'stages' "
                              f"(enabled: {', '.join(config.stages.enabled()) or 'none'})")
    if not config.stages.enabled():
        raise ConfigError(f"{doc.where(('stages',))}: key 'stages': no stage is enabled")
    return Campaign(config, path, doc, site, site_path)
