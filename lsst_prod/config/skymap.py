"""Sky map parameters (the ``skymap:`` block of a campaign)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SkyMapConfig(_Strict):
    """A rings sky map: declination rings of tracts, each tract a projection with a patch grid."""

    name: str = Field("lsst_prod_rings", description="sky map name (a dimension value)")
    projection: Literal["TAN", "STG"] = "TAN"
    n_rings: int = Field(120, ge=3, description="number of declination rings from pole to pole")
    pixel_scale_arcsec: float = Field(0.2, gt=0)
    patch_inner_pixels: int = Field(2000, ge=64, description="patch inner (non-overlapping) size, pixels")
    patch_border_pixels: int = Field(100, ge=0, description="overlap added on every side of a patch, pixels")
    tract_overlap_deg: float = Field(1.0 / 60.0, ge=0, description="overlap between adjacent tracts, deg")
