"""Instrument signature removal: raw ADU (with serial overscan) -> calibrated electrons.

Raw contract (see ``docs/algorithms-pixels.md``): for each row ``y``

    overscan = B + r(y) + n
    imaging  = B + r(y) + bias(y, x) + e(y, x) * flat(y, x) / gain + n

with ``e`` Poisson electrons, ``n`` read noise (``read_noise/gain`` ADU rms) and the
result clipped at ``saturation_adu``.  ISR inverts it:

1. SAT where ``raw >= saturation_adu`` (and optionally SUSPECT just below it);
2. per-row overscan level: a clipped mean of the row's overscan pixels (robust
   to hot overscan pixels, and not quantised like a median of integer ADU),
   then smoothed along ``y`` with a quadratic Savitzky-Golay filter, which
   follows smooth drifts without bias and cuts the per-row noise by ~4;
3. trim, subtract the 2-D bias, multiply by the gain, divide by the flat;
4. BAD on defects (and on non-finite or non-positive-flat pixels), EDGE on a
   border of ``edge_pixels``;
5. fill BAD and SAT pixels by Gaussian normalized convolution
   (:func:`lsst_prod.algorithms.interpolate.interpolate_masked`) and set INTRP.

Variance (electrons^2).  After the flat division the pixel is
``e + g n / flat``.  Under the simulator contract the Poisson draw happens
*before* the flat modulation, so ``Var = <e> + (read_noise / flat)^2``, with
``<e>`` estimated by ``max(image, 0)``.  For a physical detector (Poisson on
the flat-modulated count ``e * flat``) it would be
``Var = <e> / flat + (read_noise / flat)^2``: select it with
``poisson_before_flat=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import savgol_filter

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.interpolate import interpolate_masked
from lsst_prod.camera import Detector


@dataclass(frozen=True, eq=False)
class IsrResult:
    """Calibrated exposure planes.

    image: float32 (ny, nx), electrons, flat-fielded.
    variance: float32 (ny, nx), electrons^2.
    mask: uint32 (ny, nx), :mod:`lsst_prod.algorithms.masks` planes.
    overscan_level: float64 (ny,), the smoothed per-row overscan level, ADU.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    overscan_level: np.ndarray

    @property
    def n_saturated(self) -> int:
        return int(np.count_nonzero(self.mask & masks.SAT))

    @property
    def n_bad(self) -> int:
        return int(np.count_nonzero(self.mask & masks.BAD))


def overscan_levels(overscan: np.ndarray, clip: float = 3.0, smooth_rows: int = 21) -> np.ndarray:
    """Per-row overscan level (ADU) from the overscan columns, shape (ny,).

    Clipped mean per row (median +- ``clip`` x 1.4826 MAD), then a quadratic
    Savitzky-Golay smoothing over ``smooth_rows`` rows (odd; <= 2 disables).
    """
    ov = np.asarray(overscan, dtype=np.float64)
    med = np.median(ov, axis=1, keepdims=True)
    mad = np.median(np.abs(ov - med), axis=1, keepdims=True) * 1.4826
    mad = np.maximum(mad, 0.5)  # integer ADU with tiny noise: do not clip everything
    keep = np.abs(ov - med) <= clip * mad
    level = np.where(keep, ov, 0.0).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
    ny = level.shape[0]
    win = min(int(smooth_rows), ny if ny % 2 else ny - 1)
    if win % 2 == 0:
        win -= 1
    if win > 3:
        level = savgol_filter(level, win, 2, mode="interp")
    return level


def run_isr(
    raw: np.ndarray,
    detector: Detector,
    bias: np.ndarray,
    flat: np.ndarray,
    defects: np.ndarray,
    edge_pixels: int = 2,
    overscan_smooth_rows: int = 21,
    suspect_fraction: float | None = None,
    interp_sigma: float = 1.0,
    poisson_before_flat: bool = True,
) -> IsrResult:
    """Run ISR on one raw detector image.

    Parameters
    ----------
    raw:
        (ny, nx + overscan) ADU, uint16 or float.
    detector:
        Gives nx, ny, overscan, gain (e-/ADU), read_noise (e-), saturation_adu.
    bias:
        (ny, nx) bias structure in ADU (after overscan subtraction).
    flat:
        (ny, nx) normalized flat (mean 1).
    defects:
        (ny, nx) bool, True on bad pixels.
    edge_pixels:
        Width of the EDGE border, pixels.
    overscan_smooth_rows:
        Savitzky-Golay window along y for the overscan level (odd, rows).
    suspect_fraction:
        If given, set SUSPECT where ``raw >= suspect_fraction * saturation_adu``
        (and not SAT).
    interp_sigma:
        Finest Gaussian scale (pixels) of the fill over BAD/SAT pixels.
    poisson_before_flat:
        Variance model, see the module docstring.
    """
    nx, ny, nov = detector.nx, detector.ny, detector.overscan
    raw = np.asarray(raw)
    if raw.shape != (ny, nx + nov):
        raise ValueError(f"raw shape {raw.shape} != (ny, nx + overscan) = {(ny, nx + nov)}")
    for name, arr in (("bias", bias), ("flat", flat), ("defects", defects)):
        if np.shape(arr) != (ny, nx):
            raise ValueError(f"{name} shape {np.shape(arr)} != {(ny, nx)}")

    data = raw[:, :nx].astype(np.float32)
    mask = np.zeros((ny, nx), dtype=np.uint32)
    sat_level = float(detector.saturation_adu)
    sat = data >= sat_level
    mask[sat] |= masks.SAT
    if suspect_fraction is not None:
        mask[(data >= suspect_fraction * sat_level) & ~sat] |= masks.SUSPECT

    if nov > 0:
        level = overscan_levels(raw[:, nx:], smooth_rows=overscan_smooth_rows)
    else:
        level = np.full(ny, float(detector.bias_level_adu))

    flat = np.asarray(flat, dtype=np.float32)
    bad = np.asarray(defects, dtype=bool) | ~np.isfinite(data) | ~np.isfinite(flat) | (flat <= 0)
    safe_flat = np.where(bad, np.float32(1.0), flat)
    gain = np.float32(detector.gain)
    image = (data - level[:, None].astype(np.float32) - np.asarray(bias, dtype=np.float32)) * gain
    image /= safe_flat
    mask[bad] |= masks.BAD

    fill = bad | sat
    if fill.any():
        image = interpolate_masked(image, fill, sigma=interp_sigma)
        mask[fill] |= masks.INTRP

    if edge_pixels > 0:
        e = min(int(edge_pixels), ny, nx)
        for sl in (np.s_[:e, :], np.s_[-e:, :], np.s_[:, :e], np.s_[:, -e:]):
            mask[sl] |= masks.EDGE

    rn2 = np.float32(detector.read_noise) ** 2 / safe_flat**2
    electrons = np.maximum(image, 0.0)
    if not poisson_before_flat:
        electrons = electrons / safe_flat
    variance = (electrons + rn2).astype(np.float32)
    return IsrResult(image=image.astype(np.float32, copy=False), variance=variance, mask=mask, overscan_level=level)
