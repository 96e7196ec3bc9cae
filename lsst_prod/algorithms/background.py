"""Sky background and noise maps (electrons) on a coarse mesh, interpolated to full size.

Two per-cell statistics (``statistic``):

* ``"mode"`` (default; ``sep.Background``, SExtractor's algorithm in C): for each
  ``mesh_size`` x ``mesh_size`` cell, sep clips the usable pixels iteratively at +-3 sigma
  around the median and estimates the mode as ``2.5 median - 1.5 mean`` (or the median when
  the cell is crowded).  Robust to unmasked sources, hence right for a FIRST pass on an
  image whose sources are not yet masked.  But it is a biased estimator of the mean sky:
  on a pure Poisson sky it sits 0.3-0.4 e- low (-0.012 sigma at 1100 e-, -0.029 sigma at
  100 e-) because Poisson noise is skewed, and the light of undetected sources and of the
  wings of detected ones (a skewed, positive distribution) is partly removed.
* ``"mean"``: the mean of the usable, undetected pixels of the cell, clipped at
  ``clip_sigma`` (4) standard deviations about the mean (iterated from the median/MAD;
  only outliers such as unmasked cosmic rays go: a Gaussian loses 6e-5 of its pixels).
  A PSF-fit flux is linear in the pixels, so its bias is ``N_eff (E[pixel] - b)``: the
  background that leaves the fluxes of sources outside other sources' footprints unbiased is
  the MEAN of the pixels outside the footprints (sky + undetected sources + the wings of
  detected ones beyond their footprints), not their mode.  Use it for the final
  background, with the footprints of the detection threshold masked (``DETECTED``);
  unmasked sources would bias it high.

The mesh grid is median-filtered over ``filter_size`` x ``filter_size`` cells (which removes
cells biased by a bright star or a large galaxy) and interpolated to every pixel with a bicubic
spline.  Cells with too few usable pixels are replaced from their neighbours.  Measured figures
(dp-mini and a crowded field): ``docs/algorithms-pixels.md``.

Pixels with any of ``bad_mask_planes`` (default: unusable or already detected)
and non-finite pixels are ignored.

:func:`background_without_sources` is the ``"mean"`` of an image from which the catalogued sources'
light is removed first, each with its full-wing PSF model (stamp + Kolmogorov x Airy ``r^-11/3`` wing to
12 FWHM): the sky plus the light of what is NOT catalogued.  A masked mean alone also takes in the
catalogued sources' wings beyond their footprints (on dp-mini 85-90 % of the light between the
single-frame footprints); a measurement that models those sources (their PSF fluxes, their neighbours'
subtraction) then counts that light twice, once in the background and once in the model.  The objects
stage uses it to put the coadd's zero back (docs/algorithms-coadd.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import sep
from scipy import ndimage
from scipy.interpolate import make_interp_spline

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
    statistic: str = "mode",
    clip_sigma: float = 4.0,
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
    statistic:
        ``"mode"`` (sep, SExtractor) or ``"mean"`` (clipped mean of the usable pixels; see the
        module docstring for when to use which).
    clip_sigma:
        Clipping threshold of ``"mean"``, standard deviations about the mean.
    """
    if statistic not in ("mode", "mean"):
        raise ValueError(f"statistic must be 'mode' or 'mean', not {statistic!r}")
    data = np.ascontiguousarray(image, dtype=np.float32)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= (np.asarray(mask) & np.uint32(bad_mask_planes)) != 0
    if bad.any():
        data = np.where(bad, np.float32(0.0), data)
    ny, nx = data.shape
    bw = int(min(mesh_size, nx))
    bh = int(min(mesh_size, ny))
    if statistic == "mean":
        back, rms, glob_level, glob_rms = _clipped_mean_background(data, bad, bw, bh, int(filter_size),
                                                                   float(clip_sigma))
    else:
        bkg = sep.Background(data, mask=bad, bw=bw, bh=bh, fw=int(filter_size), fh=int(filter_size))
        back = bkg.back(dtype=np.float32)
        rms = bkg.rms(dtype=np.float32)
        glob_level, glob_rms = float(bkg.globalback), float(bkg.globalrms)

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
        global_level=glob_level,
        global_rms=glob_rms,
    )


#: cells with fewer usable pixels than this fraction are replaced from their neighbours
MIN_CELL_FRACTION = 0.05


def _cells(a: np.ndarray, bw: int, bh: int, fill) -> np.ndarray:
    """(my, mx, bh*bw) view of ``a`` cut into bh x bw cells (padded with ``fill``)."""
    ny, nx = a.shape
    my, mx = -(-ny // bh), -(-nx // bw)
    p = np.pad(a, ((0, my * bh - ny), (0, mx * bw - nx)), constant_values=fill)
    return p.reshape(my, bh, mx, bw).transpose(0, 2, 1, 3).reshape(my, mx, bh * bw)


def _fill_invalid(grid: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid cells by the mean of their valid 8-neighbours, growing inwards."""
    if valid.all():
        return grid
    g, v = np.where(valid, grid, 0.0), valid.astype(np.float64)
    k = np.ones((3, 3))
    while not v.all():
        s = ndimage.convolve(g * v, k, mode="constant")
        c = ndimage.convolve(v, k, mode="constant")
        new = (v == 0) & (c > 0)
        g = np.where(new, s / np.maximum(c, 1), g)
        v = np.where(new, 1.0, v)
    return g


def _filter_grid(grid: np.ndarray, size: int) -> np.ndarray:
    """Median filter of the mesh grid (``size`` cells) that leaves a plane unchanged.

    A median filter with any edge padding shifts a gradient at the border cells (by up to one
    cell's step); filtering the residuals from a least-squares plane avoids that.
    """
    my, mx = grid.shape
    if size <= 1 or grid.size == 1:
        return grid
    yy, xx = np.mgrid[0:my, 0:mx].astype(np.float64)
    a = np.column_stack([np.ones(grid.size), yy.ravel(), xx.ravel()])
    coef = np.linalg.lstsq(a, grid.ravel(), rcond=None)[0]
    plane = (a @ coef).reshape(grid.shape)
    return plane + ndimage.median_filter(grid - plane, size=size, mode="nearest")


def _clipped_mean_background(data: np.ndarray, bad: np.ndarray, bw: int, bh: int, filter_size: int,
                             clip_sigma: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Full-size (level, rms) maps from per-cell clipped means; global median of the cells."""
    ny, nx = data.shape
    x = _cells(np.where(bad, np.float32(np.nan), data.astype(np.float32)), bw, bh, np.float32(np.nan))
    ok = np.isfinite(x)
    n_ok = ok.sum(-1)
    valid = n_ok >= max(MIN_CELL_FRACTION * bw * bh, 10)
    if not valid.any():  # a mostly masked image: any cell with data (none: sep's 0 +- 1)
        valid = n_ok > 0
        if not valid.any():
            return np.zeros((ny, nx), np.float32), np.ones((ny, nx), np.float32), 0.0, 1.0
    # start: median and the 16-84 % half-range of each cell (one sort; NaNs sort last)
    srt = np.sort(x, axis=-1)

    def quantile(q: float) -> np.ndarray:
        i = np.clip((q * (n_ok - 1)).astype(int), 0, None)
        return np.take_along_axis(srt, i[..., None], -1)[..., 0].astype(np.float64)

    centre, scale = quantile(0.5), 0.5 * (quantile(0.8413) - quantile(0.1587))
    keep = ok
    for _ in range(10):  # clip about the mean
        new = ok & (np.abs(x - centre[..., None]) <= clip_sigma * scale[..., None])
        nk = np.maximum(new.sum(-1), 1)
        xs = np.where(new, x - centre[..., None].astype(np.float32), np.float32(0.0))  # about the old centre
        d1 = xs.sum(-1, dtype=np.float64) / nk
        mean = centre + d1
        scale = np.sqrt(np.maximum(np.square(xs).sum(-1, dtype=np.float64) / nk - d1 * d1, 0.0))
        done = np.array_equal(new, keep)
        keep, centre = new, mean
        if done:
            break
    level = _filter_grid(_fill_invalid(centre, valid), filter_size)
    sd = _filter_grid(_fill_invalid(scale, valid), filter_size)
    my, mx = level.shape
    yc = np.arange(my) * bh + (np.minimum(np.arange(my) * bh + bh, ny) - np.arange(my) * bh - 1) / 2.0
    xc = np.arange(mx) * bw + (np.minimum(np.arange(mx) * bw + bw, nx) - np.arange(mx) * bw - 1) / 2.0

    def interp(grid: np.ndarray) -> np.ndarray:
        """Separable interpolating spline (cubic, not-a-knot; lower order for < 4 cells) through the
        cell centres, extrapolated to the image edges."""
        out = grid
        for axis, centres, n in ((1, xc, nx), (0, yc, ny)):
            if out.shape[axis] == 1:
                out = np.repeat(out, n, axis=axis)
            else:
                k = min(3, out.shape[axis] - 1)
                out = make_interp_spline(centres, out, k=k, axis=axis)(np.arange(n, dtype=np.float64))
        return np.ascontiguousarray(out, dtype=np.float32)

    return interp(level), interp(sd), float(np.median(level)), float(np.median(sd))


def background_without_sources(
    image: np.ndarray,
    mask: np.ndarray | None,
    psf,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    diffraction: tuple[float, float] = (0.0, 0.0),
    mesh_size: int = 256,
    filter_size: int = 3,
    bad_mask_planes: int = int(DEFAULT_BAD_PLANES),
    clip_sigma: float = 4.0,
) -> Background:
    """Clipped-mean background of ``image`` minus the full-wing models of the sources (x, y, flux).

    ``psf`` is a PsfModel (``image_at``); ``flux`` is each source's PSF-model flux (the stamp's sum; rows
    with a non-positive or non-finite flux are not subtracted); ``fwhm`` (pixels) and ``diffraction``
    (lambda/D in pixels, linear obscuration) set the wing beyond the stamp
    (:func:`~lsst_prod.algorithms.apcorr.full_wing_model_image`).  The residual's mean over the usable
    pixels without ``bad_mask_planes`` (by default the footprints, ``DETECTED``, where a bright source's
    model error would dominate) is then the sky plus the light of the sources not in the list: the
    level that leaves unbiased the PSF fluxes of sources measured with their neighbours' models
    subtracted.  Same units as ``image``.
    """
    from .apcorr import full_wing_model_image

    img = np.asarray(image, dtype=np.float64)
    model = full_wing_model_image(img.shape, psf, x, y, flux, float(fwhm), diffraction=diffraction)
    return estimate_background(img - model, mask, mesh_size=mesh_size, filter_size=filter_size,
                               bad_mask_planes=bad_mask_planes, statistic="mean", clip_sigma=clip_sigma)
