"""Multi-band deblending of merged footprints (scarlet-lite-like), with flux conservation.

Each child k of a blended footprint is ``SED_k (one amplitude per band) x S_k``, with
S_k a non-negative morphology shared by the bands.  S_k lives in the observed frame
of the band with the narrowest PSF (the *reference* band) and in its own box about
its peak; band b sees it shifted by the child's sub-pixel offset d_k and convolved
with a non-negative PSF-difference kernel K_b (``K_b * P_ref ~ P_b``, NNLS fit on the
PSF stamps; K_ref = delta).  We minimise, with w_b = 1 / background variance,

    L = 1/2 sum_b w_b || K_b * sum_k a_kb shift(S_k, d_k) - D_b ||^2

by accelerated proximal gradient steps (FISTA with restarts, per-child steps
1/Lipschitz) on the SEDs and morphologies and gradient steps on the shifts.  After
each step the morphologies are made positive, 180-degree symmetric about the peak
pixel and monotonic (no pixel above the value interpolated one Chebyshev ring
closer to the peak along the ray to it).  Stop when no child's model changes by
more than ``e_rel`` (relative) in an iteration, or after ``max_iter``.

Companions without a peak of their own (closer than the peak image resolves) are
found in the fit's residual (PSF-matched filter with the full variance, point-source
and symmetry tests, refit and a chi2 test; ``_residual_search``), single-peak
footprints included; their peaks are appended to ``DeblendResult.merged``.

Flux conservation: child k receives ``D_b x M_kb / sum_j M_jb`` in every pixel of
the parent region (masked pixels: the model; where all models vanish, a wing
template shares the pixel), so the children sum exactly to the parent.  Algorithm
choices and measured figures: docs/algorithms-objects.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sfft
from scipy import ndimage
from scipy.optimize import nnls

from . import masks
from .measure import _centroid, _gather
from .footprints import Footprints
from .merge import MergedDetections

METHOD = "scarlet-lite-like SED x morphology; proximal gradient (positivity, symmetry, monotonicity); flux conservation"
DEFAULTS: dict[str, Any] = dict(
    max_iter=200, e_rel=1e-3, min_iter=10, max_peaks=25, max_footprint_area=100_000, max_model_size=20_000_000,
    max_masked_fraction=0.25, grow_pix=0, psf_cell=256,
    residual_iterations=3, residual_threshold_sigma=5.0, residual_min_sep_fwhm=1.0,
)


@dataclass(frozen=True, eq=False)
class HeavyFootprint:
    """Pixel values of one catalogue row: ``images`` (B, h, w) at origin (x0, y0), 0 outside ``region``."""

    x0: int
    y0: int
    region: np.ndarray
    images: np.ndarray

    def flux(self) -> np.ndarray:
        """(B,) sum of the pixels per band."""
        return self.images.sum(axis=(1, 2))

    def paint(self, shape: tuple[int, int], band_index: int) -> np.ndarray:
        """Full image of ``shape`` holding band ``band_index``'s pixels (0 elsewhere)."""
        out = np.zeros(shape)
        h, w = self.region.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.images[band_index]
        return out


@dataclass(frozen=True, eq=False)
class BlendModel:
    """The deblend of one footprint: K children, B bands, box (H, W) at image origin (x0, y0).

    ``region`` (H, W) the parent's pixels; ``peaks`` (K,) merged peak indices;
    ``sed`` (K, B); ``morph`` (K, H, W) in the reference band's frame, unit peak;
    ``shifts`` (K, 2) sub-pixel centre offsets of the models from the peaks;
    ``model`` and ``conserved`` (K, B, H, W) images; ``x, y`` (K,) centroids (image
    pixels, Gaussian-weighted on the conserved images; the peak if ``centroid_flag``);
    ``n_iterations``, ``converged``, ``chi2`` (per fitted pixel, background weights);
    ``metadata``: method, reference band, background variances, kernel sizes, flags.
    """

    footprint: int
    x0: int
    y0: int
    region: np.ndarray
    peaks: np.ndarray
    sed: np.ndarray
    morph: np.ndarray
    shifts: np.ndarray
    model: np.ndarray
    conserved: np.ndarray
    x: np.ndarray
    y: np.ndarray
    centroid_flag: np.ndarray
    n_iterations: int
    converged: bool
    chi2: float
    metadata: dict

    @property
    def flux(self) -> np.ndarray:
        """(K, B) flux-conserved fluxes (sums of the conserved images)."""
        return self.conserved.sum(axis=(2, 3))

    @property
    def model_flux(self) -> np.ndarray:
        """(K, B) fluxes of the models."""
        return self.model.sum(axis=(2, 3))

    @property
    def parent_flux(self) -> np.ndarray:
        """(B,) the parent's flux: the sum of the children's (exactly, up to rounding)."""
        return self.conserved.sum(axis=(0, 2, 3))


@dataclass(frozen=True, eq=False)
class DeblendResult:
    """Deblended catalogue of one patch: ``catalog`` (dict of 1-d columns, one row per
    isolated footprint, parent and child, see docs/algorithms-objects.md), ``heavy``
    (one :class:`HeavyFootprint` per row), ``blends`` (footprint index ->
    :class:`BlendModel`), ``config`` (method and every parameter / threshold used)."""

    bands: tuple[str, ...]
    catalog: dict[str, np.ndarray]
    heavy: tuple[HeavyFootprint, ...]
    blends: dict[int, BlendModel]
    config: dict[str, Any]
    merged: MergedDetections | None = None


# ----------------------------------------------------------------------------- kernels
def difference_kernel(psf_ref: np.ndarray, psf_band: np.ndarray, half: int) -> np.ndarray:
    """Non-negative (2 half + 1)^2 kernel K minimising ||K * psf_ref - psf_band|| on the stamp (NNLS).

    Not renormalised: its sum (1 to within ~0.2% for stamps that hold the PSF) is
    absorbed by the SEDs; forcing it to 1 triples the residual in the core."""
    n, s = 2 * half + 1, psf_ref.shape[0]
    x = sliding_window_view(np.pad(psf_ref, half), (n, n))[:, :, ::-1, ::-1].reshape(s * s, n * n)
    k, _ = nnls(x, psf_band.ravel(), maxiter=50 * n * n)
    return k.reshape(n, n) if k.sum() > 0 else np.pad([[1.0]], half)


class _Blend:
    """Forward model of one blend and its exact adjoint (the gradients).

    Child k's morphology S_k lives in its own box (rows y0:y0+h, columns x0:x0+w of the
    parent box).  It is shifted by its sub-pixel offset d_k (FFT phase ramp, in the box
    padded by ``q`` pixels), scaled by its SED and summed into a zero-padded parent
    frame; band b's model is that sum convolved with the difference kernel K_b (FFT).
    So S_k can be symmetric and monotonic about its integer peak while the model is
    centred on the sub-pixel centroid, and the per-child cost scales with the child's
    box, not the parent's."""

    q = 3

    def __init__(self, kernels: list[np.ndarray], shape: tuple[int, int], boxes: np.ndarray, shifts: np.ndarray):
        q, fast = self.q, sfft.next_fast_len
        self.cf = [(fast(int(h) + 2 * q), fast(int(w) + 2 * q)) for h, w in boxes[:, 2:]]  # child frames
        extra = max(max(f[0] - h, f[1] - w) for f, (h, w) in zip(self.cf, boxes[:, 2:])) - q
        self.o = max(k.shape[0] // 2 for k in kernels) + max(self.q, extra) + 1
        self.shape, self.boxes = shape, boxes
        self.fshape = (sfft.next_fast_len(shape[0] + 2 * self.o), sfft.next_fast_len(shape[1] + 2 * self.o))
        kp = np.zeros((len(kernels),) + self.fshape)
        for b, k in enumerate(kernels):
            kp[b, : k.shape[0], : k.shape[1]] = k
            kp[b] = np.roll(kp[b], (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1))
        self.khat = sfft.rfft2(kp)
        self.sizes = boxes[:, 2] * boxes[:, 3]
        self.offsets = np.r_[0, np.cumsum(self.sizes)]
        self.sl = [(slice(self.o + y0 - q, self.o + y0 - q + f[0]), slice(self.o + x0 - q, self.o + x0 - q + f[1]))
                   for (y0, x0, _, _), f in zip(boxes, self.cf)]  # child frames in the parent frame
        self.freq = [(sfft.rfftfreq(f[1])[None, :], sfft.fftfreq(f[0])[:, None]) for f in self.cf]
        self.wr = [np.where((fx[0] == 0) | (fx[0] == 0.5), 1.0, 2.0) for fx, _ in self.freq]  # Parseval, half spectrum
        self.set_shifts(shifts)

    def set_shifts(self, shifts: np.ndarray) -> None:
        self.shifts = np.asarray(shifts, np.float64).copy()
        self.phase = [np.exp(-2j * np.pi * (fx * d[0] + fy * d[1])) for (fx, fy), d in zip(self.freq, self.shifts)]

    def embed(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros(a.shape[:-2] + self.fshape)
        out[..., self.o : self.o + self.shape[0], self.o : self.o + self.shape[1]] = a
        return out

    def box(self, a: np.ndarray) -> np.ndarray:
        return a[..., self.o : self.o + self.shape[0], self.o : self.o + self.shape[1]]

    def morph(self, sv: np.ndarray, k: int) -> np.ndarray:
        return sv[self.offsets[k] : self.offsets[k + 1]].reshape(self.boxes[k, 2], self.boxes[k, 3])

    def _shifted(self, sv: np.ndarray, k: int):
        pad = np.zeros(self.cf[k])
        pad[self.q : self.q + self.boxes[k, 2], self.q : self.q + self.boxes[k, 3]] = self.morph(sv, k)
        sh = sfft.rfft2(pad) * self.phase[k]
        return sh, sfft.irfft2(sh, s=self.cf[k])

    def models(self, sed: np.ndarray, sv: np.ndarray) -> np.ndarray:
        """(K, B, H, W) per-child, per-band models on the parent box."""
        out = np.zeros((len(sed), len(sed[0])) + self.shape)
        for k in range(len(sed)):
            t = np.zeros(self.fshape)
            t[self.sl[k]] = self._shifted(sv, k)[1]
            out[k] = self.box(sfft.irfft2(sfft.rfft2(t) * self.khat * sed[k][:, None, None], s=self.fshape))
        return out

    def gradients(self, sed: np.ndarray, sv: np.ndarray, d: np.ndarray, wt: np.ndarray):
        """Loss; d loss / d sed (K, B); d loss / d morphologies (flat); d loss / d shifts
        and the shifts' curvature scale (K, 2)."""
        kk, nb = sed.shape
        tb, shifted = np.zeros((nb,) + self.fshape), []
        for k in range(kk):
            sh, t = self._shifted(sv, k)
            tb[(slice(None),) + self.sl[k]] += sed[k][:, None, None] * t
            shifted.append((sh, t))
        m = sfft.irfft2(sfft.rfft2(tb) * self.khat, s=self.fshape)
        r = wt * (m - d)
        loss = 0.5 * float((r * (m - d)).sum())
        g = sfft.irfft2(np.conj(self.khat) * sfft.rfft2(r), s=self.fshape)
        g_sed, g_sv, g_d, curv = np.zeros((kk, nb)), np.zeros_like(sv), np.zeros((kk, 2)), np.zeros((kk, 2))
        for k, (sh, t) in enumerate(shifted):
            c = g[(slice(None),) + self.sl[k]]
            g_sed[k] = (c * t).sum(axis=(1, 2))
            uh = sfft.rfft2(np.tensordot(sed[k], c, 1))
            g_sv[self.offsets[k] : self.offsets[k + 1]] = sfft.irfft2(np.conj(self.phase[k]) * uh, s=self.cf[k])[
                self.q : self.q + self.boxes[k, 2], self.q : self.q + self.boxes[k, 3]].ravel()
            n, (fx, fy) = self.cf[k][0] * self.cf[k][1], self.freq[k]
            cross, power = (np.conj(sh) * uh).imag * self.wr[k], (sh.real**2 + sh.imag**2) * self.wr[k]
            g_d[k] = -2 * np.pi * np.array([(cross * fx).sum(), (cross * fy).sum()]) / n
            curv[k] = 4 * np.pi**2 * np.array([(power * fx**2).sum(), (power * fy**2).sum()]) / n
        return loss, g_sed, g_sv, g_d, curv


# ----------------------------------------------------------------------------- constraints
def _plans(shapes: np.ndarray, px: np.ndarray, py: np.ndarray):
    """Flat-index plans on the concatenated morphologies (child k: ``shapes[k]`` = (h, w),
    peak at (px[k], py[k]) in its box): monotonicity rings (pixel, two parents one
    Chebyshev ring inwards, interpolation weight) and symmetry mirrors (pixels whose
    mirror is off the box are zeroed)."""
    idx, p1, p2, tt, ring, sym_i, sym_j, zero = [], [], [], [], [], [], [], []
    base = 0
    for (h, w), cx, cy in zip(shapes, px, py):
        yy, xx = np.mgrid[0:h, 0:w]
        dx, dy = xx - cx, yy - cy
        ax, ay, sx, sy = np.abs(dx), np.abs(dy), np.sign(dx), np.sign(dy)
        xdom = ax >= ay
        y1, x1 = np.where(xdom, yy, yy - sy), np.where(xdom, xx - sx, xx)
        r = np.maximum(ax, ay).ravel()
        sel = r > 0
        idx.append(base + (yy * w + xx).ravel()[sel])
        p1.append(base + (y1 * w + x1).ravel()[sel])
        p2.append(base + ((yy - sy) * w + (xx - sx)).ravel()[sel])
        tt.append(np.where(xdom, ay / np.maximum(ax, 1), ax / np.maximum(ay, 1)).ravel()[sel])
        ring.append(r[sel])
        mx, my = 2 * cx - xx, 2 * cy - yy
        ok = ((mx >= 0) & (mx < w) & (my >= 0) & (my < h)).ravel()
        sym_i.append(base + np.flatnonzero(ok))
        sym_j.append(base + (my * w + mx).ravel()[ok])
        zero.append(base + np.flatnonzero(~ok))
        base += h * w
    ring_a = np.concatenate(ring)
    o = np.argsort(ring_a, kind="stable")
    bounds = np.searchsorted(ring_a[o], np.arange(1, ring_a.max() + 2)) if len(o) else np.zeros(1, int)
    mono = (np.concatenate(idx)[o], np.concatenate(p1)[o], np.concatenate(p2)[o], np.concatenate(tt)[o], bounds)
    return mono, (np.concatenate(sym_i), np.concatenate(sym_j), np.concatenate(zero))


def _prox(s: np.ndarray, mono, sym, use_min: bool = False) -> np.ndarray:
    """Positivity, symmetry (average with the mirror pixel, or the minimum), monotonicity."""
    flat = np.maximum(s, 0.0).ravel()
    si, sj, sz = sym
    out = np.zeros_like(flat)
    out[si] = np.minimum(flat[si], flat[sj]) if use_min else 0.5 * (flat[si] + flat[sj])
    out[sz] = 0.0
    idx, p1, p2, t, bounds = mono
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = slice(a, b)
        ref = (1.0 - t[i]) * out[p1[i]] + t[i] * out[p2[i]]
        out[idx[i]] = np.minimum(out[idx[i]], ref)
    return out.reshape(s.shape)


# ----------------------------------------------------------------------------- one blend
def _solve_seds(model: _Blend, sv: np.ndarray, d: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Per-band non-negative least-squares SEDs (K, B) for fixed morphologies (NNLS on the
    Cholesky factor of the K x K normal matrix: the same problem, K x K instead of pixels)."""
    k, nb = len(model.boxes), d.shape[0]
    m = model.models(np.ones((k, nb)), sv).reshape(k, nb, -1)
    sed = np.zeros((k, nb))
    for b in range(nb):
        x = m[:, b]
        normal, rhs = (x * wt[b].ravel()) @ x.T, x @ (wt[b] * d[b]).ravel()
        try:
            r = np.linalg.cholesky(normal + 1e-12 * np.trace(normal) * np.eye(k)).T
        except np.linalg.LinAlgError:
            continue
        sed[:, b] = nnls(r, np.linalg.solve(r.T, rhs))[0]
    return sed


def _fit(model: _Blend, d, wt, sv, sed, mono, sym, peak_flat, max_iter, e_rel, min_iter):
    """Accelerated proximal gradient (FISTA, restarted when the loss rises; steps halved
    after two rises without a new best) on SEDs and morphologies (flat vector ``sv``),
    plain gradient steps on the sub-pixel shifts.  Returns sed, sv, n_iterations,
    converged, loss."""
    wmax = wt.reshape(wt.shape[0], -1).max(axis=1)
    off = model.offsets[:-1]
    seg = lambda a: np.add.reduceat(a, off)  # noqa: E731  per-child sums
    factor, loss_prev, best, n_up, t, it = 1.0, np.inf, np.inf, 0, 1.0, 0
    ys, ysed = sv, sed
    for it in range(1, max_iter + 1):
        loss, g_sed, g_s, g_d, curv = model.gradients(ysed, ys, d, wt)
        if loss > loss_prev * (1 + 1e-9):
            t, n_up = 1.0, n_up + 1
            if n_up >= 2:
                factor, n_up = max(factor * 0.5, 1.0 / 1024), 0
        if loss < best:
            best, n_up = loss, 0
        loss_prev = loss
        ls = (ysed * ysed * wmax[None, :]).sum(axis=1)  # Lipschitz constants of the morphologies
        new_sed = ysed - factor * g_sed / np.maximum(wmax[None, :] * seg(ys * ys)[:, None], 1e-300)
        new_s = _prox(ys - np.repeat(factor / np.maximum(ls, 1e-300), model.sizes) * g_s, mono, sym)
        peak = new_s[peak_flat]
        new_s = new_s / np.repeat(np.where(peak > 0, peak, 1.0), model.sizes)
        new_sed = np.where(peak[:, None] > 0, np.maximum(new_sed, 0.0) * peak[:, None], 0.0)
        step_d = np.clip(-factor * g_d / np.maximum(curv * ls[:, None], 1e-300), -0.1, 0.1)
        model.set_shifts(np.clip(model.shifts + np.where(curv * ls[:, None] > 0, step_d, 0.0), -1.0, 1.0))
        # relative change of every child's model a_k x S_k (and of its shift, in pixels)
        a2, a2n, s2, s2n = (sed * sed).sum(1), (new_sed * new_sed).sum(1), seg(sv * sv), seg(new_s * new_s)
        cross = (sed * new_sed).sum(1) * seg(sv * new_s)
        change = np.sqrt(np.maximum(a2 * s2 + a2n * s2n - 2 * cross, 0.0) / np.maximum(a2n * s2n, 1e-300))
        change = np.maximum(change, np.abs(step_d).max(axis=1))
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_new
        ys, ysed = new_s + beta * (new_s - sv), np.maximum(new_sed + beta * (new_sed - sed), 0.0)
        sv, sed, t = new_s, new_sed, t_new
        if it >= min_iter and np.all((change < e_rel) | (a2n == 0)):
            return sed, sv, it, True, loss_prev
    return sed, sv, it, False, loss_prev


def deblend_blend(data, usable, region, bgvar, kernels, peaks_xy, ref_sigma, config=None, origin=(0, 0),
                  footprint=-1, peaks=None, metadata=None) -> BlendModel:
    """Deblend one footprint box: ``data`` (B, H, W), ``usable`` (B, H, W) bool, ``region``
    (H, W) bool (the parent's pixels), ``bgvar`` (B,) background variances (the fit's
    weights), ``kernels`` per band (difference kernels, reference band [[1.0]]),
    ``peaks_xy`` (K, 2) integer peak pixels in box coordinates, ``ref_sigma`` the
    reference PSF's sigma (px); ``origin`` (x0, y0) of the box in the image."""
    cfg = {**DEFAULTS, **(config or {})}
    nb, h, w = data.shape
    px, py = peaks_xy[:, 0].astype(int), peaks_xy[:, 1].astype(int)
    k = len(px)
    wt = np.where(usable & region[None], 1.0 / np.asarray(bgvar, np.float64)[:, None, None], 0.0)
    wsum = wt.sum(0)
    det, dvar = (wt * data).sum(0) / np.maximum(wsum, 1e-300), 1.0 / np.maximum(wsum, 1e-300)
    hc = int(np.clip(np.ceil(4.0 * ref_sigma) + 2, 5, 30))
    gst, vst = _gather(wsum > 0, px, py, hc)[0], _gather(dvar, px, py, hc)[0]
    sig, z = np.full(k, float(ref_sigma)), np.zeros(k)
    cx, cy, _, _, bad = _centroid(_gather(det, px, py, hc)[0], gst, vst, sig, z, z)
    # initial morphologies: min-symmetric, monotonic positive detection image about each peak, above 0.5 sigma
    mono, sym = _plans(np.tile([h, w], (k, 1)), px, py)
    s0 = _prox(np.broadcast_to(np.maximum(det, 0.0), (k, h, w)), mono, sym, use_min=True)
    s0 = np.where(s0 > 0.5 * (np.sqrt(np.median(dvar[wsum > 0])) if wsum.any() else 0.0), s0, 0.0)
    # child boxes: the initial support about the peak plus 3 sigma (at least 5 sigma), clipped to the parent box
    yy, xx = np.mgrid[0:h, 0:w]
    cheb = np.maximum(np.abs(xx[None] - px[:, None, None]), np.abs(yy[None] - py[:, None, None]))
    rad = np.where(s0 > 0, cheb, 0).max(axis=(1, 2)) + np.ceil(3 * ref_sigma)
    rad = np.maximum(rad, np.ceil(5 * ref_sigma)).astype(int)
    bx0, by0 = np.maximum(px - rad, 0), np.maximum(py - rad, 0)
    boxes = np.column_stack([by0, bx0, np.minimum(py + rad + 1, h) - by0, np.minimum(px + rad + 1, w) - bx0])
    sv = np.concatenate([s0[j, by0[j] : by0[j] + boxes[j, 2], bx0[j] : bx0[j] + boxes[j, 3]].ravel() for j in range(k)])
    model = _Blend(kernels, (h, w), boxes, np.clip(np.where(bad[:, None], 0.0, np.column_stack([cx, cy])), -1.0, 1.0))
    mono, sym = _plans(boxes[:, 2:], px - bx0, py - by0)
    peak_flat = model.offsets[:-1] + (py - by0) * boxes[:, 3] + (px - bx0)
    peak = sv[peak_flat]
    sv = np.where(np.repeat(peak > 0, model.sizes), sv / np.repeat(np.where(peak > 0, peak, 1.0), model.sizes), 0.0)
    sv[peak_flat] = 1.0
    dp, wp = model.embed(data * usable), model.embed(wt)
    sed = _solve_seds(model, sv, data * usable, wt)
    sed, sv, n_it, converged, loss = _fit(model, dp, wp, sv, sed, mono, sym, peak_flat,
                                          cfg["max_iter"], cfg["e_rel"], cfg["min_iter"])
    mod = np.maximum(model.models(sed, sv), 0.0) * region
    total = mod.sum(0)
    # Where the models vanish (< 1e-3 sky sigma) a pixel is shared by the wing templates
    # F_kb / (1 + r_k^2 / sigma^2)^2, so the whole region is always apportioned (a
    # noise-dependent support would bias the children high).
    r2 = ((xx[None] - px[:, None, None] - model.shifts[:, 0, None, None]) ** 2
          + (yy[None] - py[:, None, None] - model.shifts[:, 1, None, None]) ** 2) / ref_sigma**2
    tmpl = mod.sum(axis=(2, 3))[:, :, None, None] / (1.0 + r2[:, None]) ** 2 + 1e-300
    low = total < 1e-3 * np.sqrt(np.asarray(bgvar, np.float64))[:, None, None]
    ratio = np.where(low[None], tmpl / tmpl.sum(0)[None], mod / np.where(low, 1.0, total)[None])
    conserved = ratio * (np.where(usable, data, total) * region)[None]
    csum = (conserved * wt[None]).sum(1) / np.maximum(wsum, 1e-300)[None]
    st = np.stack([_gather(csum[j], px[j : j + 1], py[j : j + 1], hc)[0][0] for j in range(k)])
    ccx, ccy, _, _, cbad = _centroid(st, gst, vst, sig, z, z)
    morph = np.zeros((k, h, w))
    for j in range(k):
        morph[j, by0[j] : by0[j] + boxes[j, 2], bx0[j] : bx0[j] + boxes[j, 3]] = model.morph(sv, j)
    return BlendModel(
        footprint=int(footprint), x0=int(origin[0]), y0=int(origin[1]), region=region,
        peaks=np.arange(k) if peaks is None else np.asarray(peaks), sed=sed, morph=morph, shifts=model.shifts,
        model=mod, conserved=conserved, x=origin[0] + px + np.where(cbad, 0.0, ccx),
        y=origin[1] + py + np.where(cbad, 0.0, ccy), centroid_flag=cbad, n_iterations=int(n_it),
        converged=bool(converged), chi2=float(2 * loss / max(int((wt > 0).sum()), 1)), metadata=dict(metadata or {}),
    )


# ----------------------------------------------------------------------------- residual peaks
def point_source_dchi2(resid: np.ndarray, ivar: np.ndarray, stamps: list[np.ndarray]):
    """Point-source matched filter of a residual.

    ``resid`` (B, H, W) data - model, ``ivar`` (B, H, W) inverse variances (0 on pixels
    not fitted), ``stamps`` the bands' unit-sum PSF images (odd size, centred).  For
    a point source of amplitude a_b at pixel x, the least-squares amplitude is
    c_b / n_b with c_b = sum p_b(. - x) ivar_b resid_b and n_b = sum p_b^2 ivar_b (the
    PSF-matched filter of the residual and its normalisation); it lowers chi2 by
    c_b^2 / n_b.  Returns (gain (H, W) = sum_b max(c_b, 0)^2 / n_b, the chi2 decrease
    of a point source with a free non-negative SED; c (B, H, W); n (B, H, W))."""
    from scipy.signal import fftconvolve

    nb, h, w = resid.shape
    c, n = np.zeros((nb, h, w)), np.zeros((nb, h, w))
    for b in range(nb):
        p = np.asarray(stamps[b], np.float64)[::-1, ::-1]
        c[b] = fftconvolve(resid[b] * ivar[b], p, mode="same")
        n[b] = np.maximum(fftconvolve(ivar[b], p * p, mode="same"), 0.0)
    ok = n > 1e-12 * max(float(n.max()), 1e-300)
    sig = np.where(ok, c / np.sqrt(np.where(ok, n, 1.0)), 0.0)
    return (np.maximum(sig, 0.0) ** 2).sum(0), c, np.where(ok, n, 0.0)


def _residual_search(data, var, usable, region, bgvar, kernels, stamps, peaks_xy, ref_sigma, cfg, origin, footprint,
                     peaks, metadata, res, next_peak):
    """DAOPHOT-style iterations: find point-like excess in the residual of the fit, add it, refit.

    The residual's point-source chi2 gain (``point_source_dchi2``, full variance: Poisson
    noise included) is searched at its local maxima in the parent region, at least
    ``residual_min_sep_fwhm`` reference-band FWHM from every peak (closer, a companion is
    below the resolution limit, and a star's model mismatch sits there).  A candidate, in
    decreasing gain, must pass three point-source tests, each at the false-positive
    probability p of a one-sided ``residual_threshold_sigma`` Gaussian tail (the detection
    threshold):

    1. gain > chi2_B.isf(p) (B bands: the gain of a free non-negative SED);
    2. no band below -3 sigma (a real source fails this with probability 1.3e-3 per band):
       a source with a non-negative SED cannot make the residual significantly negative;
       there the residual is the model's error (a band's PSF-kernel mismatch);
    3. the *antisymmetric* gain, with A_b = (c_b(x) - c_b(x')) / sqrt(n_b(x) + n_b(x')) and
       x' the mirror of x about the centre of the child whose model dominates at x, also
       exceeds chi2_B.isf(p): the children's models are 180-degree symmetric, so their
       mismatch (PSF or kernel errors, a slightly asymmetric galaxy) is even about their
       centres and cancels, while a companion, which the symmetric model absorbs half of
       (leaving -1/2 at x'), does not.

    The thresholds of 1 and 3 are multiplied by the residual's chi2 per pixel in an
    annulus of 1-3 FWHM about the candidate when it exceeds 1 (structure the model leaves
    there is the noise an excess is judged against).  The blend is then refitted with one
    more child at x; the child is kept when the refit lowers chi2 by more than
    chi2_{B+2}.isf(p) (B amplitudes and a 2-d position added) times the same factor, and
    has a non-zero SED.  At most ``residual_iterations`` children are added, never
    beyond ``max_peaks``.

    ``res`` is the fit of ``peaks_xy`` (None: fitted here).  Returns (model, added) with
    ``added`` a list of (x, y, chi2 gain, per-band significance (B,)) in box pixels; the
    model is None when one peak was given and nothing was added (an isolated source)."""
    from scipy.stats import chi2, norm

    nb = data.shape[0]
    fit = usable & region[None]
    ivar = np.where(fit & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    nsig = float(cfg["residual_threshold_sigma"])
    p_tail = float(norm.sf(nsig))
    thr_pt, thr_fit, neg = float(chi2.isf(p_tail, nb)), float(chi2.isf(p_tail, nb + 2)), -3.0
    fwhm = 2.0 * np.sqrt(2.0 * np.log(2.0)) * ref_sigma
    min_sep = cfg["residual_min_sep_fwhm"] * fwhm
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w]
    pxy, added, single = np.asarray(peaks_xy, int).copy(), [], len(peaks_xy) == 1
    pk = np.asarray(peaks, np.int64) if peaks is not None else np.arange(len(pxy))
    if res is None:
        res = deblend_blend(data, usable, region, bgvar, kernels, pxy, ref_sigma, cfg, origin, footprint, pk, metadata)
    for _ in range(int(cfg["residual_iterations"])):
        if len(pxy) >= cfg["max_peaks"]:
            break
        resid = np.where(fit, data - res.model.sum(0), 0.0)
        chi2_pix = resid * resid * ivar
        gain, c, n = point_source_dchi2(resid, ivar, stamps)
        d2 = ((xx[None] - pxy[:, 0, None, None]) ** 2 + (yy[None] - pxy[:, 1, None, None]) ** 2).min(0)
        allowed = region & fit.any(0) & (d2 >= min_sep**2) & (gain > thr_pt)
        allowed &= gain >= ndimage.maximum_filter(gain, size=3, mode="constant")
        centres = np.column_stack([res.x - origin[0], res.y - origin[1]])
        cand = None
        for j in np.flatnonzero(allowed.ravel())[np.argsort(-gain[allowed], kind="stable")]:
            cy, cx = divmod(int(j), w)
            r2 = (xx - cx) ** 2 + (yy - cy) ** 2
            ring = fit & ((r2 >= fwhm**2) & (r2 <= 9 * fwhm**2))[None]
            scale = max(1.0, float(chi2_pix[ring].sum() / max(int(ring.sum()), 1)))
            if gain[cy, cx] < scale * thr_pt:
                break  # candidates come in decreasing gain
            sig = np.where(n[:, cy, cx] > 0, c[:, cy, cx] / np.sqrt(np.maximum(n[:, cy, cx], 1e-300)), 0.0)
            if sig.min() < neg:
                continue
            dom = int(np.argmax(res.model[:, :, cy, cx].sum(1)))
            mx, my = (int(np.clip(np.rint(2 * centres[dom, 0] - cx), 0, w - 1)),
                      int(np.clip(np.rint(2 * centres[dom, 1] - cy), 0, h - 1)))
            nn = n[:, cy, cx] + n[:, my, mx]
            anti = np.where(nn > 0, (c[:, cy, cx] - c[:, my, mx]) / np.sqrt(np.maximum(nn, 1e-300)), 0.0)
            if (np.maximum(anti, 0.0) ** 2).sum() < scale * thr_pt:
                continue
            cand = (cx, cy, scale, sig)
            break
        if cand is None:
            break
        cx, cy, scale, sig = cand
        new_xy = np.vstack([pxy, [[cx, cy]]])
        new = deblend_blend(data, usable, region, bgvar, kernels, new_xy, ref_sigma, cfg, origin, footprint,
                            np.r_[pk, next_peak + len(added)], metadata)
        resid_new = np.where(fit, data - new.model.sum(0), 0.0)
        drop = float(chi2_pix.sum()) - float((resid_new * resid_new * ivar).sum())
        if drop < scale * thr_fit or not np.any(new.sed[-1] > 0):
            break
        res, pxy, pk = new, new_xy, np.r_[pk, next_peak + len(added)]
        added.append((cx, cy, float(gain[cy, cx]), sig))
    return (None if single and not added else res), added


# ----------------------------------------------------------------------------- a patch
def _grown_labels(labels: np.ndarray, grow: int) -> np.ndarray:
    """Footprint labels extended to the background pixels within ``grow`` px (nearest footprint wins)."""
    if grow <= 0 or not labels.any():
        return labels
    dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(dist <= grow, labels[iy, ix], 0).astype(labels.dtype)


def _kernels(psfs, xc: float, yc: float):
    """Reference band (narrowest PSF), its sigma, every band's difference kernel and unit-sum PSF stamp at (xc, yc)."""
    xc, yc = float(round(xc)), float(round(yc))
    sig = np.array([p.sigma_at(xc, yc) for p in psfs])
    ref = int(np.argmin(sig))
    st = [p.image_at(xc, yc) for p in psfs]
    size = max(a.shape[0] for a in st)  # the bands' PSF models may use different stamp sizes
    st = [a if a.shape[0] == size else p.image_at(xc, yc, size) for a, p in zip(st, psfs)]
    half = np.clip(np.ceil(3 * np.sqrt(np.maximum(sig**2 - sig[ref] ** 2, 0))) + 1, 1, st[ref].shape[0] // 2)
    return ref, float(sig[ref]), [np.ones((1, 1)) if b == ref else difference_kernel(st[ref], st[b], int(half[b]))
                                  for b in range(len(psfs))], [a / a.sum() for a in st]


_INT_COLS = ("parent_index", "deblend_nChild", "footprint_index", "peak_index", "deblend_nPeaks", "deblend_nIter")
_BOOL_COLS = ("deblend_skipped", "deblend_tooManyPeaks", "deblend_parentTooBig", "deblend_masked",
              "deblend_failed", "deblend_zeroFlux", "deblend_converged", "centroid_flag", "deblend_residualPeak")


def _check_finite(res: BlendModel) -> None:
    if not all(np.all(np.isfinite(a)) for a in (res.sed, res.conserved, res.x, res.y)):
        raise FloatingPointError("non-finite deblend")


def _with_peaks(merged: MergedDetections, new_peaks, threshold: float) -> MergedDetections:
    """``merged`` with the residual peaks (footprint, x, y, chi2 gain, per-band significance)
    appended (the merged peaks keep their indices).  Significance: sqrt(chi2 gain); a band
    counts as detected where its own significance exceeds ``threshold``."""
    if not new_peaks:
        return merged
    fp = merged.footprints
    f, x, y, gain = (np.array([p[k] for p in new_peaks], dtype) for k, dtype in
                     ((0, np.int64), (1, np.float64), (2, np.float64), (3, np.float64)))
    bsig = np.array([p[4] for p in new_peaks], np.float64).reshape(len(new_peaks), len(merged.bands))
    out = Footprints(labels=fp.labels, bbox=fp.bbox, area=fp.area, peak_footprint=np.r_[fp.peak_footprint, f],
                     peak_x=np.r_[fp.peak_x, x], peak_y=np.r_[fp.peak_y, y],
                     peak_significance=np.r_[fp.peak_significance, np.sqrt(gain)])
    return MergedDetections(footprints=out, bands=merged.bands,
                            peak_detected=np.vstack([merged.peak_detected, bsig >= threshold]),
                            peak_band_significance=np.vstack([merged.peak_band_significance, bsig]),
                            footprint_bands=merged.footprint_bands, match_radius_pix=merged.match_radius_pix)


class _Bands:
    """Multi-band access to the patch's coadds, box by box (no full-size float64 copies)."""

    def __init__(self, bands, images, variances, mks):
        self.img, self.var, self.msk = ([m[b] for b in bands] for m in (images, variances, mks))

    def box(self, y0: int, y1: int, x0: int, x1: int):
        """(data, variance, usable) stacks (B, h, w) of a box; unusable pixels hold 0."""
        d = np.stack([np.asarray(a[y0:y1, x0:x1], np.float64) for a in self.img])
        v = np.stack([np.asarray(a[y0:y1, x0:x1], np.float64) for a in self.var])
        g = np.stack([(np.asarray(a[y0:y1, x0:x1]) & masks.UNUSABLE) == 0 for a in self.msk])
        g &= np.isfinite(d) & np.isfinite(v) & (v > 0)
        return np.where(g, d, 0.0), np.where(g, v, 0.0), g


def deblend_footprints(
    images_by_band: Mapping[str, np.ndarray],
    variances_by_band: Mapping[str, np.ndarray],
    masks_by_band: Mapping[str, np.ndarray],
    psfs_by_band: Mapping[str, Any],
    merged: MergedDetections,
    config: Mapping[str, Any] | None = None,
) -> DeblendResult:
    """Deblend every footprint of ``merged`` on the coadds of one patch (dicts keyed by band).

    Images are background-subtracted (any flux unit, e.g. nJy), variances in that
    unit squared, masks the :mod:`masks` planes, PSFs follow the PSF protocol.
    ``config`` overrides :data:`DEFAULTS`: ``max_iter, e_rel, min_iter`` (optimiser),
    ``max_peaks`` (keep the brightest, flag ``deblend_tooManyPeaks``),
    ``max_footprint_area`` (pixels) and ``max_model_size`` (K x B x box pixels: memory)
    beyond which the parent is skipped (``deblend_parentTooBig``), ``max_masked_fraction``
    (of the footprint unusable in every band: skipped, ``deblend_masked``), ``grow_pix``
    (parent region = footprint + this margin, nearest footprint wins), ``psf_cell`` (the
    PSFs and difference kernels are evaluated at the centre of psf_cell-pixel cells),
    ``residual_iterations``, ``residual_threshold_sigma``, ``residual_min_sep_fwhm`` (the
    search for companions without a peak of their own in the fit's residuals,
    :func:`_residual_search`; 0 iterations switches it off).  Peaks found in the residuals
    are appended to ``DeblendResult.merged`` (measure on it) and their children flagged
    ``deblend_residualPeak``.
    """
    cfg = {**DEFAULTS, **(config or {}), "method": METHOD, "bands": merged.bands}
    bands, fp, nb, grow = merged.bands, merged.footprints, len(merged.bands), int(cfg["grow_pix"])
    ny, nx = fp.labels.shape
    pix = _Bands(bands, images_by_band, variances_by_band, masks_by_band)
    psfs = [psfs_by_band[b] for b in bands]
    grown = _grown_labels(fp.labels, grow)
    bg_glob = np.ones(nb)
    for b in range(nb):  # median variance of the usable pixels outside every (grown) footprint
        v = np.asarray(pix.var[b])
        good = np.isfinite(v) & (v > 0) & ((np.asarray(pix.msk[b]) & masks.UNUSABLE) == 0)
        if good.any():
            bg_glob[b] = np.median(v[good & (grown == 0)] if (good & (grown == 0)).any() else v[good])
    rows, heavy, blends, kernel_cache = [], [], {}, {}
    n_peaks, new_peaks = fp.n_peaks, []  # peaks found in the residuals are appended after the merged ones
    order = np.lexsort((-fp.peak_significance, fp.peak_footprint))  # peaks by footprint, brightest first
    starts = np.searchsorted(fp.peak_footprint[order], np.arange(fp.n_footprints + 1))
    for f in np.flatnonzero(np.diff(starts) > 0):
        pk = order[starts[f] : starts[f + 1]]
        kept = pk[: cfg["max_peaks"]]
        x0, y0, x1, y1 = (int(v) for v in fp.bbox[f])
        x0, y0, x1, y1 = max(x0 - grow, 0), max(y0 - grow, 0), min(x1 + grow, nx), min(y1 + grow, ny)
        region, inside = grown[y0:y1, x0:x1] == f + 1, fp.labels[y0:y1, x0:x1] == f + 1
        d, v, g = pix.box(y0, y1, x0, x1)
        base = dict(footprint_index=f, deblend_nPeaks=len(pk), deblend_nIter=0, deblend_converged=False,
                    deblend_residualPeak=False,
                    deblend_chi2=np.nan, deblend_zeroFlux=False, deblend_failed=False, centroid_flag=False,
                    deblend_skipped=False, deblend_tooManyPeaks=len(pk) > cfg["max_peaks"],
                    deblend_parentTooBig=bool(fp.area[f] > cfg["max_footprint_area"]
                                              or len(kept) * nb * region.size > cfg["max_model_size"]),
                    deblend_masked=bool((~g.any(0) & inside).sum() > cfg["max_masked_fraction"] * inside.sum()))
        res, added = None, []
        search = cfg["residual_iterations"] > 0 and len(pk) < cfg["max_peaks"]
        if (len(pk) > 1 or search) and not (base["deblend_parentTooBig"] or base["deblend_masked"]):
            cell = (int((x0 + x1) // (2 * cfg["psf_cell"])), int((y0 + y1) // (2 * cfg["psf_cell"])))
            if cell not in kernel_cache:  # PSF-difference kernels per psf_cell x psf_cell cell
                kernel_cache[cell] = _kernels(psfs, min((cell[0] + 0.5) * cfg["psf_cell"], nx - 1),
                                              min((cell[1] + 0.5) * cfg["psf_cell"], ny - 1))
            ref, ref_sigma, kern, stamps = kernel_cache[cell]
            bsky = g & (grown[y0:y1, x0:x1] == 0)[None]  # usable pixels outside every footprint
            bg = np.array([np.median(v[b][bsky[b]]) if bsky[b].sum() >= 100 else bg_glob[b] for b in range(nb)])
            pxy = np.column_stack([np.rint(fp.peak_x[kept]) - x0, np.rint(fp.peak_y[kept]) - y0]).astype(int)
            meta = dict(method=METHOD, reference_band=bands[ref], background_variance=bg.tolist(),
                        kernel_sizes=[int(k.shape[0]) for k in kern], deblend_tooManyPeaks=base["deblend_tooManyPeaks"])
            try:
                with np.errstate(all="ignore"):
                    if len(pk) > 1:
                        res = deblend_blend(d, g, region, bg, kern, pxy, ref_sigma, cfg, (x0, y0), f, kept, meta)
                        _check_finite(res)
                    if search:
                        try:
                            srch, added = _residual_search(d, v, g, region, bg, kern, stamps, pxy, ref_sigma, cfg,
                                                           (x0, y0), f, kept, meta, res, n_peaks + len(new_peaks))
                            if srch is not None:
                                _check_finite(srch)
                        except (FloatingPointError, np.linalg.LinAlgError, ValueError, RuntimeError):
                            srch, added = res, []  # the search failed: keep the fit of the detected peaks
                        res = srch
            except (FloatingPointError, np.linalg.LinAlgError, ValueError, RuntimeError):
                res, base["deblend_failed"], added = None, True, []
            for ax, ay, gain, bsig in added:
                new_peaks.append((f, ax + x0, ay + y0, gain, bsig))
            if added:
                kept = np.r_[kept, n_peaks + len(new_peaks) - len(added) + np.arange(len(added))]
                base["deblend_nPeaks"] = len(pk) + len(added)
        if res is None:  # isolated, or skipped parent: the footprint's own pixels
            img = d * region
            rows.append(dict(base, parent_index=-1, deblend_nChild=0, peak_index=int(pk[0]) if len(pk) == 1 else -1,
                             flux=img.sum(axis=(1, 2)), model_flux=np.full(nb, np.nan), x=np.nan, y=np.nan,
                             peak=pk[0], deblend_skipped=len(pk) > 1))
            heavy.append(HeavyFootprint(x0, y0, region, img))
            continue
        blends[f] = res
        base.update(deblend_nIter=res.n_iterations, deblend_converged=res.converged, deblend_chi2=res.chi2)
        flux, mflux, prow = res.flux, res.model_flux, len(rows)
        rows.append(dict(base, parent_index=-1, deblend_nChild=len(kept), peak_index=-1, flux=flux.sum(0),
                         model_flux=mflux.sum(0), x=np.nan, y=np.nan, peak=kept[0]))
        heavy.append(HeavyFootprint(x0, y0, region, res.conserved.sum(0)))
        for j, p in enumerate(kept):
            rows.append(dict(base, parent_index=prow, deblend_nChild=0, peak_index=int(p), flux=flux[j],
                             deblend_residualPeak=bool(p >= n_peaks),
                             deblend_zeroFlux=not bool(np.any(res.sed[j] > 0)), model_flux=mflux[j],
                             x=res.x[j], y=res.y[j], peak=p, centroid_flag=bool(res.centroid_flag[j])))
            heavy.append(HeavyFootprint(x0, y0, region, res.conserved[j]))
    out = _with_peaks(merged, new_peaks, float(cfg["residual_threshold_sigma"]))
    return DeblendResult(bands, _catalog(rows, out, pix, bg_glob, psfs), tuple(heavy), blends, cfg, out)


def _catalog(rows, merged, pix: _Bands, bgvar, psfs) -> dict[str, np.ndarray]:
    """Columns from the row dicts; centroids of isolated and parent rows on the S/N-weighted
    band sum (Gaussian-weighted, starting at the brightest peak)."""
    n, bands, fp = len(rows), merged.bands, merged.footprints
    cat = {key: np.array([r[key] for r in rows], dtype=np.int64).reshape(n) for key in _INT_COLS}
    cat.update({key: np.array([r[key] for r in rows], dtype=bool).reshape(n) for key in _BOOL_COLS})
    peak = np.array([r["peak"] for r in rows], dtype=np.int64).reshape(n)
    cat.update({key: np.array([r[key] for r in rows], np.float64).reshape(n) for key in ("x", "y", "deblend_chi2")})
    cat.update(peak_x=fp.peak_x[peak], peak_y=fp.peak_y[peak])
    flux = np.array([r["flux"] for r in rows], dtype=np.float64).reshape(n, len(bands))
    mflux = np.array([r["model_flux"] for r in rows], dtype=np.float64).reshape(n, len(bands))
    for j, b in enumerate(bands):
        cat[f"{b}_flux"], cat[f"{b}_modelFlux"] = flux[:, j], mflux[:, j]
        cat[f"merge_peak_{b}"] = merged.peak_detected[peak, j] & (cat["peak_index"] >= 0)
    single = np.flatnonzero(cat["parent_index"] < 0)
    if len(single):
        ny, nx = fp.labels.shape
        ix, iy = np.rint(cat["peak_x"][single]).astype(int), np.rint(cat["peak_y"][single]).astype(int)
        sigma = min(float(p.sigma_at(nx / 2.0, ny / 2.0)) for p in psfs)
        hc = int(np.clip(np.ceil(4.0 * sigma) + 2, 5, 30))
        num = wsum = 0.0
        for b in range(len(bands)):
            d, v, m = (_gather(np.asarray(a[b]), ix, iy, hc)[0] for a in (pix.img, pix.var, pix.msk))
            w = np.where(((m & masks.UNUSABLE) == 0) & np.isfinite(d) & (v > 0), 1.0 / bgvar[b], 0.0)
            num, wsum = num + w * np.where(w > 0, d, 0.0), wsum + w
        z = np.zeros(len(single))
        cx, cy, _, _, bad = _centroid(num / np.maximum(wsum, 1e-300), wsum > 0, 1.0 / np.maximum(wsum, 1e-300),
                                      np.full(len(single), sigma), z, z)
        cat["x"][single], cat["y"][single] = ix + np.where(bad, 0.0, cx), iy + np.where(bad, 0.0, cy)
        cat["centroid_flag"][single] = bad
    return cat
