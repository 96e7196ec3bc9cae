"""Warp a calibrated exposure (and its PSF) onto a sky-map patch grid.

Mapping.  Destination pixel -> sky -> source pixel is evaluated exactly (astropy,
SIP included, inverse iterated to 1e-8 px) only on a coarse grid of nodes, every
``grid_step`` pixels plus the last row/column, covering the part of the
destination box the input overlaps.  A bicubic interpolating spline
(``RectBivariateSpline``, s=0, not-a-knot ends: exact for cubic polynomials)
then gives the source position of every pixel.  The error is measured on every
build at the cell centres (where a spline error peaks; x1.5 safety) and the
step is halved until it is below ``max_mapping_error`` (0.01 px).  For a
TAN-SIP detector with a 3-pixel cubic distortion at its corners the largest
error over all pixels is 6e-7 px at step 32 (1e-5 at 64, 1.5e-4 at 128, 0.013
at 512); the exact WCS chain is evaluated on ~0.1% of the pixels.

Interpolation.  Separable Lanczos-``a`` kernel (a=3: 6x6 taps), weights
normalised to unit sum per axis, so a constant image stays constant and the
flux per pixel is conserved on same-scale grids; with ``conserve_flux`` the
value is multiplied by the Jacobian determinant |d(src)/d(dst)| (source pixels
per destination pixel), so the total flux of a source is conserved where the
pixel areas differ (distortion, different scales).  Destination pixels whose
taps leave the source image get no value (NaN, NO_DATA): a 2.5-pixel border of
every input is lost, as with afw's warper.

Variance: ``sum(w^2 var) J^2``: the exact per-pixel variance.  Neighbouring
warped pixels are correlated, so sums over many pixels have more variance than
the sum of the plane: the ratio tends to ``Warp.noise_correlation``
(= 1/mean(sum w^2), 1.25 for Lanczos-3 on a rotated grid): multiply
aperture/PSF-flux variances from a warp (not per-pixel ones) by it.

Masks: every plane of a source pixel is carried to destination pixels where
its 2-D weight is at least ``mask_weight_min`` (0.05); pixels whose kernel
support touches an UNUSABLE source pixel are also flagged SUSPECT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline

from lsst_prod.algorithms import masks
from lsst_prod.errors import NoWorkFound

_STRIP_PIXELS = 131072  # destination pixels per processing strip (cache-sized)
_SAFETY = 1.5  # the cell-centre check finds 70-90% of the true maximum error


def lanczos_order(kernel: str) -> int:
    """The order a of a ``"lanczos<a>"`` kernel name (2..5); ValueError otherwise."""
    if not (kernel.startswith("lanczos") and kernel[7:].isdigit() and 2 <= int(kernel[7:]) <= 5):
        raise ValueError(f"kernel must be 'lanczos2'..'lanczos5', got {kernel!r}")
    return int(kernel[7:])


def lanczos_weights(frac: np.ndarray, a: int = 3) -> np.ndarray:
    """(2a, n) float32 unit-sum Lanczos-a weights of taps ``floor(s) - a + 1 ... floor(s) + a``.

    ``frac = s - floor(s)`` in [0, 1).  Row k is the weight of tap ``floor(s) - a + 1 + k``
    (offset t = f + a - 1 - k).  Three transcendental functions per point:
    sin(pi (f + n)) = (-1)^n sin(pi f), and the angle-addition formula for sin(pi (f + n) / a).
    Float32 (weights good to ~3e-7, far below the kernel's own interpolation error).
    """
    f = np.asarray(frac, dtype=np.float32).ravel()
    pf = np.float32(np.pi) * f
    g = np.sin(pf) * np.float32(a / np.pi**2)
    s3, c3 = np.sin(pf / np.float32(a)), np.cos(pf / np.float32(a))
    w = np.empty((2 * a, f.size), dtype=np.float32)
    t2 = np.empty_like(f)
    for k in range(2 * a):
        n = a - 1 - k
        c, s = np.float32((-1.0) ** n * np.cos(np.pi * n / a)), np.float32((-1.0) ** n * np.sin(np.pi * n / a))
        np.add(f, np.float32(n), out=t2)
        np.multiply(t2, t2, out=t2)
        tiny = (t2 < 1e-12) if n in (0, -1) else None  # t vanishes: f -> 0 (n = 0) or f -> 1 (n = -1)
        if tiny is not None:
            t2[tiny] = 1.0
        w[k] = g * (s3 * c + c3 * s) / t2
        if tiny is not None:
            w[k][tiny] = 1.0
    w /= w.sum(axis=0)
    return w


# --------------------------------------------------------------------------- mapping
def exact_mapping(src_wcs: Any, dst_wcs: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Destination pixel (x, y) -> sky -> source pixel, with the full WCS (SIP included)."""
    ra, dec = dst_wcs.all_pix2world(np.asarray(x, np.float64), np.asarray(y, np.float64), 0)
    if getattr(src_wcs, "sip", None) is None:
        return src_wcs.wcs_world2pix(ra, dec, 0)
    return src_wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)


def _nodes(lo: int, hi: int, step: int) -> np.ndarray:
    """Grid nodes lo, lo+step, ... plus hi-1 (at least 4 nodes when the range allows)."""
    nodes = np.unique(np.concatenate([np.arange(lo, hi, step), [hi - 1]])).astype(np.float64)
    if len(nodes) < 4 and hi - lo >= 4:
        nodes = np.unique(np.round(np.linspace(lo, hi - 1, 4)))
    return nodes


@dataclass(frozen=True, eq=False)
class PixelMapping:
    """Interpolated destination -> source pixel mapping over a destination box.

    ``box`` (x0, y0, x1, y1), exclusive ends, destination pixels; ``grid_step``
    actually used; ``max_error_pix``: largest |interpolated - exact| found at the
    cell centres.  Call :meth:`build` to make one.
    """

    box: tuple[int, int, int, int]
    grid_step: int
    max_error_pix: float
    _sx: Any
    _sy: Any
    _det: Any
    #: (xs, ys, sx, sy): the destination node columns and rows and the exact source x, y there ((ny, nx)),
    #: what :meth:`from_nodes` rebuilds the mapping from (a coadd stores its inputs' mappings so)
    nodes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, src_wcs: Any, dst_wcs: Any, box: tuple[int, int, int, int], grid_step: int = 32,
              max_error: float = 0.01) -> "PixelMapping":
        x0, y0, x1, y1 = (int(v) for v in box)
        step = max(int(grid_step), 2)
        while True:
            xs, ys = _nodes(x0, x1, step), _nodes(y0, y1, step)
            if len(xs) < 3 or len(ys) < 3:  # the Jacobian needs a spline of degree >= 2 on each axis
                raise NoWorkFound(f"destination box {box} overlaps the input by less than 3 pixels")
            gx, gy = np.meshgrid(xs, ys)
            sx, sy = exact_mapping(src_wcs, dst_wcs, gx, gy)
            if not (np.all(np.isfinite(sx)) and np.all(np.isfinite(sy))):
                raise NoWorkFound(f"mapping undefined (behind the projection) in destination box {box}")
            # first spline axis = rows (y): its degree is limited by the number of row nodes
            deg = {"kx": min(3, len(ys) - 1), "ky": min(3, len(xs) - 1), "s": 0}
            spx, spy = RectBivariateSpline(ys, xs, sx, **deg), RectBivariateSpline(ys, xs, sy, **deg)
            # check at the centres of (a subsample of) the cells
            cx, cy = 0.5 * (xs[:-1] + xs[1:]), 0.5 * (ys[:-1] + ys[1:])
            cx = cx[:: max(1, len(cx) // 64)] if len(cx) else xs
            cy = cy[:: max(1, len(cy) // 64)] if len(cy) else ys
            mx, my = np.meshgrid(cx, cy)
            ex, ey = exact_mapping(src_wcs, dst_wcs, mx, my)
            err = float(np.max(np.hypot(spx.ev(my, mx) - ex, spy.ev(my, mx) - ey)))
            if _SAFETY * err <= max_error or step <= 4:
                break
            step //= 2
        return cls._from_splines((x0, y0, x1, y1), step, err, spx, spy, (xs, ys, sx, sy))

    @classmethod
    def from_nodes(cls, box: tuple[int, int, int, int], xs: np.ndarray, ys: np.ndarray, sx: np.ndarray,
                   sy: np.ndarray) -> "PixelMapping":
        """The mapping through stored nodes (``nodes`` of a built one): ``max_error_pix`` is NaN (not
        checked again), ``grid_step`` the nodes' first spacing."""
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        sx, sy = np.asarray(sx, np.float64).reshape(len(ys), len(xs)), np.asarray(sy, np.float64).reshape(len(ys), len(xs))
        if len(xs) < 3 or len(ys) < 3:
            raise ValueError(f"need >= 3 nodes on each axis, got {len(xs)} x {len(ys)}")
        deg = {"kx": min(3, len(ys) - 1), "ky": min(3, len(xs) - 1), "s": 0}
        spx, spy = RectBivariateSpline(ys, xs, sx, **deg), RectBivariateSpline(ys, xs, sy, **deg)
        return cls._from_splines(tuple(int(v) for v in box), int(round(xs[1] - xs[0])), float("nan"), spx, spy,
                                 (xs, ys, sx, sy))

    @classmethod
    def _from_splines(cls, box, step, err, spx, spy, nodes) -> "PixelMapping":
        xs, ys = nodes[0], nodes[1]
        deg = {"kx": min(3, len(ys) - 1), "ky": min(3, len(xs) - 1), "s": 0}
        # spline dx= is d/d(first argument) = d/dy, dy= is d/dx
        det = np.abs(spx(ys, xs, dy=1) * spy(ys, xs, dx=1) - spx(ys, xs, dx=1) * spy(ys, xs, dy=1))
        spd = RectBivariateSpline(ys, xs, det, **deg)
        return cls(box, step, err, spx, spy, spd, nodes)

    def src_grid(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source x, y and |det J| on the grid of 1-d destination ``x`` (cols) and ``y`` (rows): (ny, nx)."""
        return self._sx(y, x), self._sy(y, x), self._det(y, x)

    def src_points(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source x, y at scattered destination points."""
        return self._sx.ev(y, x), self._sy.ev(y, x)

    def jacobian(self, x: float, y: float) -> np.ndarray:
        """2x2 d(src x, src y)/d(dst x, dst y) at one destination point."""
        return np.array([[self._sx.ev(y, x, dy=1), self._sx.ev(y, x, dx=1)],
                         [self._sy.ev(y, x, dy=1), self._sy.ev(y, x, dx=1)]], dtype=np.float64).reshape(2, 2)


def overlap_box(src_wcs: Any, src_shape: tuple[int, int], dst_wcs: Any, dst_box: tuple[int, int, int, int],
                margin: int = 4) -> tuple[int, int, int, int] | None:
    """Part of ``dst_box`` covered by the source image (bounding box of its mapped edge, + margin)."""
    ny, nx = src_shape
    ex = np.concatenate([np.linspace(-0.5, nx - 0.5, 33)] * 2 + [np.full(33, -0.5), np.full(33, nx - 0.5)])
    ey = np.concatenate([np.full(33, -0.5), np.full(33, ny - 0.5)] + [np.linspace(-0.5, ny - 0.5, 33)] * 2)
    ra, dec = src_wcs.all_pix2world(ex, ey, 0)
    dx, dy = dst_wcs.all_world2pix(ra, dec, 0, quiet=True) if getattr(dst_wcs, "sip", None) else \
        dst_wcs.wcs_world2pix(ra, dec, 0)
    ok = np.isfinite(dx) & np.isfinite(dy)
    if not ok.all():
        return None
    x0, y0, x1, y1 = dst_box
    bx0, bx1 = max(x0, int(np.floor(dx.min())) - margin), min(x1, int(np.ceil(dx.max())) + margin + 1)
    by0, by1 = max(y0, int(np.floor(dy.min())) - margin), min(y1, int(np.ceil(dy.max())) + margin + 1)
    return (bx0, by0, bx1, by1) if bx1 > bx0 and by1 > by0 else None


# --------------------------------------------------------------------------- image warp
@dataclass(frozen=True, eq=False)
class Warp:
    """An exposure resampled onto ``dst_box`` (x0, y0, x1, y1; exclusive ends) of the destination grid.

    image (float32, input units x ``flux_scale``; NaN where the kernel leaves the
    input), variance (float32, same units squared; NaN there), mask (uint32;
    NO_DATA there), footprint (bool: no NO_DATA bit, i.e. usable data).  ``grid_step`` and
    ``mapping_error_pix``: the coarse mapping used and its measured error;
    ``jacobian_mean``: mean |det d(src)/d(dst)| over the footprint;
    ``noise_correlation``: (variance of large-area sums) / (sum of the variance
    plane) for white input noise; ``n_valid``: footprint pixels.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    footprint: np.ndarray
    dst_box: tuple[int, int, int, int]
    kernel: str
    grid_step: int
    mapping_error_pix: float
    jacobian_mean: float
    noise_correlation: float
    n_valid: int


def _dilate_to_taps(flag: np.ndarray, ntap: int) -> np.ndarray:
    """D[y, x] = any(flag[y:y+ntap, x:x+ntap]): the kernel support whose first tap is (x, y)."""
    d = ndimage.maximum_filter1d(flag.astype(np.uint8), ntap, axis=0, origin=-(ntap // 2), mode="constant")
    return ndimage.maximum_filter1d(d, ntap, axis=1, origin=-(ntap // 2), mode="constant").astype(bool)


def warp_exposure(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, src_wcs: Any, dst_wcs: Any,
    dst_box: tuple[int, int, int, int], kernel: str = "lanczos3", grid_step: int = 32,
    max_mapping_error: float = 0.01, flux_scale: float = 1.0, conserve_flux: bool = True,
    mask_weight_min: float = 0.05, crop: bool = False,
) -> Warp:
    """Resample (image, variance, mask) from ``src_wcs`` onto ``dst_box`` of ``dst_wcs``.

    Pixel coordinates are 0-based; ``dst_box`` is in ``dst_wcs`` pixels
    (e.g. a patch's ``outer`` box in tract pixels).  ``flux_scale`` multiplies
    the image (and the variance by its square), e.g. nJy per electron.  With
    ``crop`` the arrays cover only the part of the box the input overlaps (the
    returned ``dst_box`` says which).  Raises :class:`NoWorkFound` when the
    input does not overlap the box.
    """
    a = lanczos_order(kernel)
    ntap = 2 * a
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    msk = np.asarray(mask, dtype=np.uint32)
    if not (img.shape == var.shape == msk.shape and img.ndim == 2):
        raise ValueError(f"image, variance and mask shapes differ: {img.shape}, {var.shape}, {msk.shape}")
    ny, nx = img.shape
    box = tuple(int(v) for v in dst_box)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"empty destination box {box}")
    sub = overlap_box(src_wcs, img.shape, dst_wcs, box)
    if sub is None:
        raise NoWorkFound(f"input does not overlap destination box {box}")
    mapping = PixelMapping.build(src_wcs, dst_wcs, sub, grid_step, max_mapping_error)
    out_box = sub if crop else box
    oshape = (out_box[3] - out_box[1], out_box[2] - out_box[0])
    o_img = np.full(oshape, np.nan, dtype=np.float32)
    o_var = np.full(oshape, np.nan, dtype=np.float32)
    o_msk = np.full(oshape, masks.NO_DATA, dtype=np.uint32)
    imf, vaf, mkf = img.ravel(), var.ravel(), msk.ravel()
    any_mask = _dilate_to_taps(msk != 0, ntap).ravel()
    near_bad = _dilate_to_taps((msk & masks.UNUSABLE) != 0, ntap).ravel()
    xs = np.arange(sub[0], sub[2], dtype=np.float64)
    rows = max(1, _STRIP_PIXELS // len(xs))
    sum_s2, sum_det, n_valid = 0.0, 0.0, 0
    for r0 in range(sub[1], sub[3], rows):
        ys = np.arange(r0, min(r0 + rows, sub[3]), dtype=np.float64)
        sx, sy, det = mapping.src_grid(xs, ys)
        fx, fy = np.floor(sx), np.floor(sy)
        i0x, i0y = fx.astype(np.int64) - (a - 1), fy.astype(np.int64) - (a - 1)
        valid = (i0x >= 0) & (i0x + ntap <= nx) & (i0y >= 0) & (i0y + ntap <= ny)
        vi = np.flatnonzero(valid)
        if len(vi) == 0:
            continue
        wx = lanczos_weights((sx - fx).ravel()[vi], a)  # (ntap, n)
        wy = lanczos_weights((sy - fy).ravel()[vi], a)
        base = i0y.ravel()[vi] * nx + i0x.ravel()[vi]
        wx2 = wx * wx
        acc_i, acc_v = np.zeros(len(vi)), np.zeros(len(vi))
        ri, rv, tmp = (np.empty(len(vi), dtype=np.float32) for _ in range(3))
        for j in range(ntap):
            ri[:], rv[:] = 0.0, 0.0
            for k in range(ntap):
                idx = base + (j * nx + k)
                np.multiply(wx[k], imf.take(idx), out=tmp)
                ri += tmp
                np.multiply(wx2[k], vaf.take(idx), out=tmp)
                rv += tmp
            acc_i += wy[j] * ri.astype(np.float64)
            acc_v += (wy[j] * wy[j]) * rv.astype(np.float64)
        # masks: planes from taps with |w| >= mask_weight_min; SUSPECT when the support touches unusable pixels
        m_out = np.zeros(len(vi), dtype=np.uint32)
        sel = np.flatnonzero(any_mask[base])
        if len(sel):
            bs, awx, awy = base[sel], np.abs(wx[:, sel]), np.abs(wy[:, sel])
            acc_m = np.zeros(len(sel), dtype=np.uint32)
            for j in range(ntap):
                for k in range(ntap):
                    keep = awy[j] * awx[k] >= mask_weight_min
                    acc_m |= np.where(keep, mkf.take(bs + (j * nx + k)), np.uint32(0))
            m_out[sel] = acc_m | np.where(near_bad[bs], masks.SUSPECT, np.uint32(0))
        d = det.ravel()[vi] if conserve_flux else np.ones(len(vi))
        scale = flux_scale * d
        rr, cc = np.divmod(vi, len(xs))
        rr = rr + (r0 - out_box[1])
        cc = cc + (sub[0] - out_box[0])
        o_img[rr, cc] = acc_i * scale
        o_var[rr, cc] = acc_v * scale * scale
        o_msk[rr, cc] = m_out
        s2 = wx2.sum(axis=0, dtype=np.float64) * (wy * wy).sum(axis=0, dtype=np.float64)
        sum_s2 += float(s2.sum())
        sum_det += float(det.ravel()[vi].sum())
        n_valid += len(vi)
    if n_valid == 0:
        raise NoWorkFound(f"input does not overlap destination box {box}")
    return Warp(
        image=o_img, variance=o_var, mask=o_msk, footprint=(o_msk & masks.NO_DATA) == 0, dst_box=out_box,
        kernel=kernel, grid_step=mapping.grid_step, mapping_error_pix=mapping.max_error_pix,
        jacobian_mean=sum_det / n_valid, noise_correlation=n_valid / sum_s2, n_valid=n_valid,
    )


def mosaic_warps(warps: "list[Warp]", dst_box: tuple[int, int, int, int]) -> Warp:
    """Paste the (cropped or not) warps of one visit's detectors into one warp of ``dst_box``.

    Detectors of a visit do not overlap; where footprints would, the first warp wins.
    ``grid_step``/``mapping_error_pix`` are the worst, the other scalars footprint-weighted means.
    """
    x0, y0, x1, y1 = (int(v) for v in dst_box)
    img = np.full((y1 - y0, x1 - x0), np.nan, np.float32)
    var, msk = img.copy(), np.full(img.shape, masks.NO_DATA, np.uint32)
    for w in warps:
        bx0, by0, bx1, by1 = w.dst_box
        cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        src = (slice(cy0 - by0, cy1 - by0), slice(cx0 - bx0, cx1 - bx0))
        dst = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        new = w.footprint[src] & ((msk[dst] & masks.NO_DATA) != 0)
        img[dst] = np.where(new, w.image[src], img[dst])
        var[dst] = np.where(new, w.variance[src], var[dst])
        msk[dst] = np.where(new, w.mask[src], msk[dst])
    n = np.array([max(w.n_valid, 1) for w in warps], float)
    return Warp(img, var, msk, (msk & masks.NO_DATA) == 0, (x0, y0, x1, y1), warps[0].kernel,
                max(w.grid_step for w in warps), max(w.mapping_error_pix for w in warps),
                float(np.average([w.jacobian_mean for w in warps], weights=n)),
                float(np.average([w.noise_correlation for w in warps], weights=n)),
                int(((msk & masks.NO_DATA) == 0).sum()))


# --------------------------------------------------------------------------- PSF warp
def sample_lanczos(stamp: np.ndarray, x: np.ndarray, y: np.ndarray, a: int = 3) -> np.ndarray:
    """Lanczos-a interpolation of a small image at points (x, y) (zero outside the image)."""
    st = np.pad(np.asarray(stamp, dtype=np.float64), a + 1)
    x, y = np.asarray(x, np.float64).ravel() + a + 1, np.asarray(y, np.float64).ravel() + a + 1
    fx, fy = np.floor(x), np.floor(y)
    ix, iy = fx.astype(np.int64) - (a - 1), fy.astype(np.int64) - (a - 1)
    ok = (ix >= 0) & (iy >= 0) & (ix + 2 * a <= st.shape[1]) & (iy + 2 * a <= st.shape[0])
    wx, wy = lanczos_weights(x - fx, a), lanczos_weights(y - fy, a)
    ix, iy = np.where(ok, ix, 0), np.where(ok, iy, 0)
    out = np.zeros(x.shape)
    for j in range(2 * a):
        for k in range(2 * a):
            out += wy[j] * wx[k] * st[iy + j, ix + k]
    return np.where(ok, out, 0.0)


def warp_psf(psf_model: Any, src_wcs: Any, dst_wcs: Any, dst_x: float, dst_y: float, size: int | None = None,
             kernel: str = "lanczos3", mapping: PixelMapping | None = None) -> np.ndarray:
    """The input PSF as it appears in the warp at destination pixel (dst_x, dst_y).

    Returns a unit-sum (size, size) stamp in destination pixel axes, centred at
    stamp pixel (c + dx, c + dy), c = size // 2, dx = dst_x - round(dst_x) (the
    :class:`~lsst_prod.algorithms.psf.PsfModel` convention).  The source PSF,
    ``psf_model.image_at`` at the source position (same sub-pixel phase as a star
    there), is resampled through the local affine Jacobian of the mapping with
    the same Lanczos kernel as the image, so it matches what the warp does to a
    star.  ``mapping`` (a :class:`PixelMapping` over a box holding the point)
    replaces the exact WCS evaluation; otherwise the Jacobian comes from exact
    central differences (+-1 px).
    """
    a = lanczos_order(kernel)
    size = int(size if size is not None else getattr(psf_model, "stamp_size", 25))
    if size % 2 == 0:
        raise ValueError(f"PSF stamp size must be odd, got {size}")
    if mapping is not None:
        sx, sy = (float(v[0]) for v in mapping.src_points(np.array([dst_x]), np.array([dst_y])))
        jac = mapping.jacobian(dst_x, dst_y)
    else:
        px = np.array([dst_x, dst_x + 1.0, dst_x - 1.0, dst_x, dst_x], dtype=np.float64)
        py = np.array([dst_y, dst_y, dst_y, dst_y + 1.0, dst_y - 1.0], dtype=np.float64)
        ex, ey = exact_mapping(src_wcs, dst_wcs, px, py)
        sx, sy = float(ex[0]), float(ey[0])
        jac = 0.5 * np.array([[ex[1] - ex[2], ex[3] - ex[4]], [ey[1] - ey[2], ey[3] - ey[4]]])
    smax = float(np.linalg.svd(jac, compute_uv=False)[0])
    big = int(np.ceil(np.sqrt(2.0) * size * smax)) + 2 * a + 2
    big += 1 - big % 2
    src = np.asarray(psf_model.image_at(sx, sy, big), dtype=np.float64)
    cs = big // 2
    c = size // 2
    u = np.arange(size) - c - (float(dst_x) - round(float(dst_x)))
    v = np.arange(size) - c - (float(dst_y) - round(float(dst_y)))
    uu, vv = np.meshgrid(u, v)
    xs = cs + (sx - round(sx)) + jac[0, 0] * uu + jac[0, 1] * vv
    ys = cs + (sy - round(sy)) + jac[1, 0] * uu + jac[1, 1] * vv
    out = sample_lanczos(src, xs, ys, a).reshape(size, size)
    tot = out.sum()
    if not np.isfinite(tot) or tot <= 0:
        raise ValueError(f"PSF at ({dst_x}, {dst_y}) has no flux after resampling")
    return out / tot
