"""A rings sky map: tracts in declination rings, each a projection with a patch grid.

The sphere is cut into ``n_rings`` declination bands of equal height; the two
extreme bands are polar caps holding one tract each, the others are split in
right ascension into tracts about as wide as they are tall.  A tract is a
gnomonic (TAN) or stereographic (STG) projection about its centre, large
enough to hold its inner region plus ``tract_overlap_deg`` on every side; its
pixel grid is cut into patches of ``patch_inner_pixels`` with
``patch_border_pixels`` of overlap on every side.

Every sky position belongs to exactly one tract's *inner* region
(:meth:`SkyMap.tract_for`) and, inside it, to one patch's inner region: that is
how objects in overlaps are made primary exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from astropy.wcs import WCS

from .config.skymap import SkyMapConfig


@dataclass(frozen=True)
class PatchInfo:
    tract: int
    patch: int  # sequential index = iy * nx + ix
    ix: int
    iy: int
    inner: tuple[int, int, int, int]  # x0, y0, x1, y1 in tract pixels (exclusive ends)
    outer: tuple[int, int, int, int]  # inner grown by the border, clipped to the tract

    @property
    def outer_shape(self) -> tuple[int, int]:
        return (self.outer[3] - self.outer[1], self.outer[2] - self.outer[0])


@dataclass(frozen=True)
class TractInfo:
    id: int
    ring: int
    ra_min: float  # inner region bounds (deg); for polar caps ra spans 0..360
    ra_max: float
    dec_min: float
    dec_max: float
    ra_center: float
    dec_center: float
    nx: int  # tract size in pixels
    ny: int
    n_patch_x: int
    n_patch_y: int
    projection: str
    pixel_scale_arcsec: float

    def wcs(self) -> WCS:
        return _tract_wcs(self.ra_center, self.dec_center, self.nx, self.ny, self.projection, self.pixel_scale_arcsec)

    def contains_inner(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        ra = np.asarray(ra) % 360.0
        dec = np.asarray(dec)
        in_dec = (dec >= self.dec_min) & (dec < self.dec_max)
        if self.ra_max - self.ra_min >= 360.0:
            return in_dec
        dra = (ra - self.ra_min) % 360.0
        return in_dec & (dra < (self.ra_max - self.ra_min))


@lru_cache(maxsize=4096)
def _tract_wcs(ra: float, dec: float, nx: int, ny: int, projection: str, scale: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = [f"RA---{projection}", f"DEC--{projection}"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx - 1) / 2.0 + 1.0, (ny - 1) / 2.0 + 1.0]
    s = scale / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.wcs.radesys = "ICRS"
    return w


class SkyMap:
    """Tract and patch geometry for a :class:`SkyMapConfig`."""

    def __init__(self, config: SkyMapConfig) -> None:
        self.config = config
        self.name = config.name
        h = 180.0 / config.n_rings
        self._ring_height = h
        self._ring_ntracts: list[int] = []
        for ring in range(config.n_rings):
            if ring in (0, config.n_rings - 1):
                self._ring_ntracts.append(1)
                continue
            d0, d1 = -90.0 + ring * h, -90.0 + (ring + 1) * h
            widest = math.cos(math.radians(min(abs(d0), abs(d1)) if d0 * d1 > 0 else 0.0))
            self._ring_ntracts.append(max(1, math.ceil(360.0 * widest / h)))
        self._ring_first = np.concatenate([[0], np.cumsum(self._ring_ntracts)]).astype(int)

    @property
    def n_tracts(self) -> int:
        return int(self._ring_first[-1])

    def _ring_of(self, dec: np.ndarray) -> np.ndarray:
        return np.clip(((np.asarray(dec) + 90.0) // self._ring_height).astype(int), 0, self.config.n_rings - 1)

    def tract_for(self, ra: np.ndarray | float, dec: np.ndarray | float) -> np.ndarray:
        """The tract whose inner region holds each position."""
        ra = np.asarray(ra, dtype=float) % 360.0
        ring = self._ring_of(dec)
        n = np.asarray(self._ring_ntracts)[ring]
        idx = np.where(n == 1, 0, np.floor(((ra + 180.0 / n) % 360.0) / (360.0 / n)).astype(int) % n)
        return self._ring_first[ring] + idx

    @lru_cache(maxsize=4096)
    def tract_info(self, tract: int) -> TractInfo:
        if not 0 <= tract < self.n_tracts:
            raise KeyError(f"tract {tract} not in sky map {self.name!r} (0..{self.n_tracts - 1})")
        ring = int(np.searchsorted(self._ring_first, tract, side="right") - 1)
        idx = tract - int(self._ring_first[ring])
        n = self._ring_ntracts[ring]
        h = self._ring_height
        dec_min, dec_max = -90.0 + ring * h, -90.0 + (ring + 1) * h
        if ring == 0:
            ra_min, ra_max, dec_c = 0.0, 360.0, -90.0
        elif ring == self.config.n_rings - 1:
            ra_min, ra_max, dec_c = 0.0, 360.0, 90.0
        else:
            width = 360.0 / n
            ra_min = (idx * width - width / 2.0) % 360.0
            ra_max = ra_min + width
            dec_c = 0.5 * (dec_min + dec_max)
        ra_c = (ra_min + (ra_max - ra_min) / 2.0) % 360.0 if n > 1 else 0.0
        if n == 1 and ring not in (0, self.config.n_rings - 1):
            ra_min, ra_max = 0.0, 360.0
        # Size: the inner region's extent in the projection, plus the overlap.
        extent_deg = self._inner_extent_deg(ra_c, dec_c, ra_min, ra_max, dec_min, dec_max)
        scale = self.config.pixel_scale_arcsec
        inner = self.config.patch_inner_pixels
        need = (extent_deg + 2.0 * self.config.tract_overlap_deg) * 3600.0 / scale
        npx = max(1, math.ceil(need / inner))
        return TractInfo(
            id=tract, ring=ring, ra_min=ra_min, ra_max=ra_max, dec_min=dec_min, dec_max=dec_max,
            ra_center=ra_c, dec_center=dec_c, nx=npx * inner, ny=npx * inner, n_patch_x=npx, n_patch_y=npx,
            projection=self.config.projection, pixel_scale_arcsec=scale,
        )

    def _inner_extent_deg(self, ra_c, dec_c, ra_min, ra_max, dec_min, dec_max) -> float:
        """Largest full width (deg) of the inner region's boundary in the tract projection."""
        span = ra_max - ra_min
        ras = np.concatenate([np.linspace(ra_min, ra_min + span, 33)] * 2)
        decs = np.concatenate([np.full(33, dec_min), np.full(33, dec_max)])
        w = _tract_wcs(ra_c, dec_c, 1, 1, self.config.projection, 3600.0)  # 1 deg pixels
        x, y = w.wcs_world2pix(ras % 360.0, decs, 0)
        ok = np.isfinite(x) & np.isfinite(y)
        return float(2.0 * max(np.abs(x[ok]).max(initial=0.0), np.abs(y[ok]).max(initial=0.0)))

    def patch_info(self, tract: int, patch: int) -> PatchInfo:
        t = self.tract_info(tract)
        if not 0 <= patch < t.n_patch_x * t.n_patch_y:
            raise KeyError(f"patch {patch} not in tract {tract} (0..{t.n_patch_x * t.n_patch_y - 1})")
        iy, ix = divmod(patch, t.n_patch_x)
        s, b = self.config.patch_inner_pixels, self.config.patch_border_pixels
        inner = (ix * s, iy * s, (ix + 1) * s, (iy + 1) * s)
        outer = (max(0, inner[0] - b), max(0, inner[1] - b), min(t.nx, inner[2] + b), min(t.ny, inner[3] + b))
        return PatchInfo(tract, patch, ix, iy, inner, outer)

    def patch_for(self, tract: int, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Patch whose inner region holds each position (-1 outside the tract grid)."""
        t = self.tract_info(tract)
        x, y = t.wcs().wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        s = self.config.patch_inner_pixels
        ix, iy = np.floor((x + 0.5) / s).astype(int), np.floor((y + 0.5) / s).astype(int)
        ok = (ix >= 0) & (ix < t.n_patch_x) & (iy >= 0) & (iy < t.n_patch_y)
        return np.where(ok, iy * t.n_patch_x + ix, -1)

    def overlapping(self, ra: np.ndarray, dec: np.ndarray) -> list[tuple[int, int]]:
        """(tract, patch) pairs whose outer region overlaps a convex sky polygon.

        ``ra``/``dec`` are the polygon's corners in order (e.g. a detector's four
        corners).  Candidate tracts are those holding a corner or the centre
        plus their ring neighbours; the test is a separating-axis test of the
        projected polygon against each patch's outer box.
        """
        ra = np.asarray(ra, float)
        dec = np.asarray(dec, float)
        cand = set(int(t) for t in self.tract_for(ra, dec))
        vec = _unit(ra, dec).mean(axis=0)
        rc, dc = _radec(vec)
        cand.add(int(self.tract_for(rc, dc)))
        # neighbours: shift the polygon by the overlap to catch tracts just across a border
        eps = self.config.tract_overlap_deg + self.config.patch_border_pixels * self.config.pixel_scale_arcsec / 3600
        for dra, ddec in ((eps, 0), (-eps, 0), (0, eps), (0, -eps)):
            cand.update(int(t) for t in self.tract_for(ra + dra / max(np.cos(np.radians(dc)), 1e-3), dec + ddec))
        out: list[tuple[int, int]] = []
        for tract in sorted(cand):
            t = self.tract_info(tract)
            x, y = t.wcs().wcs_world2pix(ra, dec, 0)
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                continue
            poly = np.column_stack([x, y])
            for patch in range(t.n_patch_x * t.n_patch_y):
                p = self.patch_info(tract, patch)
                box = (p.outer[0] - 0.5, p.outer[1] - 0.5, p.outer[2] - 0.5, p.outer[3] - 0.5)
                if _polygon_intersects_box(poly, box):
                    out.append((tract, patch))
        return out


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def _radec(v: np.ndarray) -> tuple[float, float]:
    v = v / np.linalg.norm(v)
    return float(np.degrees(np.arctan2(v[1], v[0])) % 360.0), float(np.degrees(np.arcsin(np.clip(v[2], -1, 1))))


def _polygon_intersects_box(poly: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Separating-axis test: convex polygon (n, 2) against an axis-aligned box."""
    x0, y0, x1, y1 = box
    if poly[:, 0].max() < x0 or poly[:, 0].min() > x1 or poly[:, 1].max() < y0 or poly[:, 1].min() > y1:
        return False
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    n = len(poly)
    for i in range(n):
        edge = poly[(i + 1) % n] - poly[i]
        axis = np.array([-edge[1], edge[0]])
        pp = poly @ axis
        bp = corners @ axis
        if pp.max() < bp.min() or bp.max() < pp.min():
            return False
    return True
