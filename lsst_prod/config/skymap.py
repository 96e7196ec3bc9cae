"""Sky map parameters (the ``skymap:`` block of a campaign)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..names import SafeName

#: Patches per tract side the planner will accept: 1,000 x 2,000 px patches at 0.2" is a tract
#: of 111 deg; anything larger is a units mistake, which would otherwise hang the planner.
MAX_PATCHES_PER_SIDE = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SkyMapConfig(_Strict):
    """A rings sky map: declination rings of tracts, each tract a projection with a patch grid."""

    name: SafeName = Field("lsst_prod_rings", description="sky map name (a dimension value and a path component)")
    projection: Literal["TAN", "STG"] = "TAN"
    n_rings: int = Field(120, ge=3, le=20_000, description="number of declination rings from pole to pole")
    pixel_scale_arcsec: float = Field(0.2, ge=0.01, le=10.0)
    patch_inner_pixels: int = Field(2000, ge=64, le=100_000, description="patch inner (non-overlapping) size, pixels")
    patch_border_pixels: int = Field(100, ge=0, le=10_000, description="overlap added on every side of a patch, pixels")
    tract_overlap_deg: float = Field(1.0 / 60.0, ge=0, le=5.0, description="overlap between adjacent tracts, deg")

    @model_validator(mode="after")
    def _size(self) -> "SkyMapConfig":
        ring_deg = 180.0 / self.n_rings
        side = (ring_deg + 2 * self.tract_overlap_deg) * 3600.0 / self.pixel_scale_arcsec / self.patch_inner_pixels
        if side > MAX_PATCHES_PER_SIDE:
            raise ValueError(f"tracts would be ~{side:.0f} patches on a side (at most {MAX_PATCHES_PER_SIDE}): "
                             f"check n_rings, pixel_scale_arcsec and patch_inner_pixels")
        if self.patch_border_pixels * 2 >= self.patch_inner_pixels * 4:
            raise ValueError("patch_border_pixels must be well below patch_inner_pixels")
        return self
