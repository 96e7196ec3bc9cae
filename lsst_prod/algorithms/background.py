"""Sky background and noise maps (electrons) on a coarse mesh, interpolated to full size.

Implementation: ``sep.Background`` (SExtractor's algorithm in C).  For each
``mesh_size`` x ``mesh_size`` cell, sep takes the usable pixels, clips them
iteratively at +-3 sigma around the median and estimates the mode as
``2.5 median - 1.5 mean`` (or the median when the cell is crowded); the mesh
grid is median-filtered over ``filter_size`` x ``filter_size`` cells (which
removes cells biased by a bright star or a large galaxy) and interpolated to
every pixel with a bicubic spline.  Cells with too few usable pixels are
replaced from their neighbours.

Why sep: measured on a 1024x1024 image with a smooth gradient, Poisson noise
and 400 Moffat stars (see ``docs/algorithms-pixels.md``) it recovers the
background to 0.03 sigma rms (bias +0.03 sigma from the unmasked star wings)
in 7 ms; an equivalent numpy per-mesh clipped estimator is ~13x slower
(median-based clipping on 1 Mpix) for the same numbers.

Pixels with any of ``bad_mask_planes`` (default: unusable or already detected)
and non-finite pixels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from lsst_prod.algorithms import masks

DEFAULT_BAD_PLANES = masks.UNUSABLE | masks.DETECTED


@dataclass(frozen=True, eq=False)
class Background:
    """Background model of one image.

    image: float32 (ny, nx) background level, electrons.
    rms: float32 (ny, nx) background noise (1 sigma), electrons.
    mesh_x, mesh_y: float64 (mx,), (my,) mesh-cell centres, pixels.
    mesh_level, mesh_rms: float64 (my, mx), the (filtered) mesh grid sampled
        at the cell centres, electrons.
    mesh_valid_fraction: float64 (my, mx), fraction of usable pixels per cell.
    global_level, global_rms: sep's global estimates, electrons.
    """

    image: np.ndarray
    rms: np.ndarray
    mesh_size: int
    filter_size: int
    mesh_x: np.ndarray
    mesh_y: np.ndarray
    mesh_level: np.ndarray
    mesh_rms: np.ndarray
    mesh_valid_fraction: np.ndarray
    global_level: float
    global_rms: float


def _cell_edges(n: int, size: int) -> np.ndarray:
    return np.arange(0, n, size, dtype=np.int64)


def _sample(arr: np.ndarray, yc: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``arr`` at the outer product of (yc, xc)."""
    ny, nx = arr.shape
    y0 = np.clip(np.floor(yc).astype(int), 0, ny - 2) if ny > 1 else np.zeros(len(yc), int)
    x0 = np.clip(np.floor(xc).astype(int), 0, nx - 2) if nx > 1 else np.zeros(len(xc), int)
    fy = (yc - y0)[:, None] if ny > 1 else np.zeros((len(yc), 1))
    fx = (xc - x0)[None, :] if nx > 1 else np.zeros((1, len(xc)))
    y1 = np.minimum(y0 + 1, ny - 1)
    x1 = np.minimum(x0 + 1, nx - 1)
    a = arr.astype(np.float64)
    return (
        a[np.ix_(y0, x0)] * (1 - fy) * (1 - fx)
        + a[np.ix_(y0, x1)] * (1 - fy) * fx
        + a[np.ix_(y1, x0)] * fy * (1 - fx)
        + a[np.ix_(y1, x1)] * fy * fx
    )


def estimate_background(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    mesh_size: int = 128,
    filter_size: int = 3,
    bad_mask_planes: int = int(DEFAULT_BAD_PLANES),
) -> Background:
    """Estimate the background of ``image`` (electrons) ignoring masked pixels.

    Parameters
    ----------
    image:
        2-D image, electrons.
    mask:
        uint32 mask planes (or None); pixels with any bit of
        ``bad_mask_planes`` set are excluded.
    mesh_size:
        Cell size, pixels (the last row/column of cells may be smaller).
    filter_size:
        Median filter over the mesh grid, cells (odd).
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= (np.asarray(mask) & np.uint32(bad_mask_planes)) != 0
    if bad.any():
        data = np.where(bad, np.float32(0.0), data)
    ny, nx = data.shape
    bw = int(min(mesh_size, nx))
    bh = int(min(mesh_size, ny))
    bkg = sep.Background(data, mask=bad, bw=bw, bh=bh, fw=int(filter_size), fh=int(filter_size))
    back = bkg.back(dtype=np.float32)
    rms = bkg.rms(dtype=np.float32)

    ex, ey = _cell_edges(nx, bw), _cell_edges(ny, bh)
    xc = (ex + np.minimum(ex + bw, nx) - 1) / 2.0
    yc = (ey + np.minimum(ey + bh, ny) - 1) / 2.0
    good = (~bad).astype(np.int64)
    counts = np.add.reduceat(np.add.reduceat(good, ey, axis=0), ex, axis=1)
    sizes = np.outer(np.diff(np.append(ey, ny)), np.diff(np.append(ex, nx)))
    return Background(
        image=back,
        rms=rms,
        mesh_size=int(mesh_size),
        filter_size=int(filter_size),
        mesh_x=xc,
        mesh_y=yc,
        mesh_level=_sample(back, yc, xc),
        mesh_rms=_sample(rms, yc, xc),
        mesh_valid_fraction=counts / sizes,
        global_level=float(bkg.globalback),
        global_rms=float(bkg.globalrms),
    )
