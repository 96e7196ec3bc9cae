"""Detector signatures: bias structure, flat field, defects, and the raw-image contract.

Raw contract (the ISR inverts it), for a detector with imaging size (ny, nx)
and ``overscan`` serial-overscan columns; raw has shape (ny, nx + overscan),
uint16 ADU, columns [0, nx) imaging and [nx, nx + overscan) overscan::

    overscan(y, x) = B + row_offset(y) + read_noise/gain * N(0, 1)
    imaging(y, x)  = B + row_offset(y) + bias(y, x) + e(y, x) * flat(y, x) / gain
                     + read_noise/gain * N(0, 1)
    raw            = clip(rint(value), 0, saturation_adu)

* ``B`` = detector.bias_level_adu;
* ``row_offset(y)`` = a0 + a1 sin(2 pi y / P + phi) + a2 (y / (ny - 1) - 1/2), smooth, drawn per
  exposure (|a0| <= A, a1 in [A/4, A/2], |a2| <= A/2, P in [ny/2, 3 ny], A = row_offset_amp_adu);
* ``bias`` = the fixed 2-D structure written as the "bias" calibration (ADU,
  overscan-subtracted: what remains after subtracting the row's overscan level);
* ``flat`` = the fixed flat written as the "flat" calibration (mean 1);
* ``e`` = Poisson(sky + objects) + cosmic rays, electrons;
* defect pixels (the "defects" calibration, 1 = bad) are then overwritten with
  garbage: hot columns ``B + row_offset + U(1000, saturation/2)`` per pixel,
  dead columns ``B + row_offset + read noise`` (no signal).

No bleed trails, non-linearity, brighter-fatter, crosstalk, dark current or
fringing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..camera import Camera, Detector, detector_to_focal_plane, nominal_wcs_header
from ..config.simulation import SimulationConfig
from .cadence import VisitTruth
from .spec import focal_plane_extent, rng_for


# ------------------------------------------------------------ calibrations
def bias_structure(config: SimulationConfig, det: Detector) -> np.ndarray:
    """Fixed 2-D bias pattern (ADU, float32, (ny, nx)) of a detector: a few ADU.

    A * [0.5 (2 x/(nx-1) - 1) + 0.7 exp(-x / 8) + 0.3 cos(2 pi y / ny) + 0.1 N(0, 1)].
    """
    a = config.bias_structure_amp_adu
    rng = rng_for(config.seed, "bias", det.id)
    x = np.arange(det.nx, dtype=np.float64)
    y = np.arange(det.ny, dtype=np.float64)
    pattern = (0.5 * (2.0 * x / max(det.nx - 1, 1) - 1.0) + 0.7 * np.exp(-x / 8.0))[None, :] \
        + (0.3 * np.cos(2.0 * np.pi * y / det.ny))[:, None]
    pattern = pattern + 0.1 * rng.standard_normal((det.ny, det.nx))
    return (a * pattern).astype(np.float32)


def flat_field(config: SimulationConfig, camera: Camera, det: Detector, physical_filter: str) -> np.ndarray:
    """Flat (float32, (ny, nx), mean exactly 1 in float64): vignetting x pixel response.

    vignetting = 1 - flat_vignetting_frac (r / r_ref)^2 over the focal plane;
    pixel response = 1 + rms (0.8 N_det + 0.6 N_det,filter) (partly shared between filters).
    """
    _, _, r_ref = focal_plane_extent(camera)
    xx, yy = np.meshgrid(np.arange(det.nx, dtype=np.float64), np.arange(det.ny, dtype=np.float64))
    u, v = detector_to_focal_plane(det, xx, yy)
    vig = 1.0 - config.flat_vignetting_frac * (u * u + v * v) / r_ref**2
    n_det = rng_for(config.seed, "flat", det.id).standard_normal((det.ny, det.nx))
    n_filt = rng_for(config.seed, "flat", det.id, physical_filter).standard_normal((det.ny, det.nx))
    flat = vig * (1.0 + config.flat_pixel_rms_frac * (0.8 * n_det + 0.6 * n_filt))
    flat /= flat.mean()
    return flat.astype(np.float32)


@dataclass(frozen=True)
class BadColumn:
    x: int
    y0: int  # first bad row
    y1: int  # last bad row + 1
    kind: str  # "hot" | "dead"


def bad_columns(config: SimulationConfig, det: Detector) -> list[BadColumn]:
    rng = rng_for(config.seed, "defects", det.id)
    xs = rng.choice(np.arange(4, det.nx - 4), size=config.n_bad_columns, replace=False) if config.n_bad_columns else []
    out = []
    for x in sorted(int(v) for v in xs):
        partial = rng.uniform() < 0.5
        y0 = int(rng.integers(0, det.ny // 2)) if partial else 0
        kind = "hot" if rng.uniform() < 0.6 else "dead"
        out.append(BadColumn(x, y0, det.ny, kind))
    return out


def defects_mask(config: SimulationConfig, det: Detector) -> np.ndarray:
    """uint8 (ny, nx): 1 = bad pixel."""
    m = np.zeros((det.ny, det.nx), dtype=np.uint8)
    for c in bad_columns(config, det):
        m[c.y0:c.y1, c.x] = 1
    return m


# ---------------------------------------------------------------- the raw
def row_offsets(rng: np.random.Generator, ny: int, amp: float) -> np.ndarray:
    a0 = rng.uniform(-amp, amp)
    a1 = rng.uniform(amp / 4.0, amp / 2.0)
    period = rng.uniform(ny / 2.0, 3.0 * ny)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    a2 = rng.uniform(-amp / 2.0, amp / 2.0)
    y = np.arange(ny, dtype=np.float64)
    return a0 + a1 * np.sin(2.0 * np.pi * y / period + phi) + a2 * (y / max(ny - 1, 1) - 0.5)


def electrons_to_raw(config: SimulationConfig, det: Detector, electrons: np.ndarray, flat: np.ndarray,
                     bias: np.ndarray, columns: list[BadColumn], row_offset: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Apply the raw contract (module doc) to an electron image; returns uint16 (ny, nx + overscan)."""
    ny, nx, nov = det.ny, det.nx, det.overscan
    sig = det.read_noise / det.gain
    level = det.bias_level_adu + row_offset[:, None]
    raw = level + sig * rng.standard_normal((ny, nx + nov))
    raw[:, :nx] += bias + electrons * flat / det.gain
    for c in columns:
        rows = slice(c.y0, c.y1)
        n = c.y1 - c.y0
        if c.kind == "hot":
            raw[rows, c.x] = det.bias_level_adu + row_offset[rows] + rng.uniform(1000.0, det.saturation_adu / 2.0, n)
        else:
            raw[rows, c.x] = det.bias_level_adu + row_offset[rows] + sig * rng.standard_normal(n)
    np.rint(raw, out=raw)
    np.clip(raw, 0.0, det.saturation_adu, out=raw)
    return raw.astype(np.uint16)


def cosmic_rays(config: SimulationConfig, det: Detector, exptime: float,
                rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Cosmic-ray deposits: (image float64 (ny, nx) electrons, number of events).

    Events ~ Poisson(rate x npix/1e6 x exptime); half are single pixels, half
    straight tracks 2-15 pixels long at a random angle; every hit pixel gets a
    log-uniform deposit in [cosmic_ray_e_min, cosmic_ray_e_max].
    """
    img = np.zeros((det.ny, det.nx))
    n = int(rng.poisson(config.cosmic_ray_rate_per_mpix_per_s * det.nx * det.ny / 1e6 * exptime))
    lo, hi = np.log(config.cosmic_ray_e_min), np.log(config.cosmic_ray_e_max)
    for _ in range(n):
        x0 = rng.uniform(-0.5, det.nx - 0.5)
        y0 = rng.uniform(-0.5, det.ny - 0.5)
        if rng.uniform() < 0.5:
            px = np.array([int(np.rint(x0))])
            py = np.array([int(np.rint(y0))])
        else:
            length = rng.uniform(2.0, 15.0)
            ang = rng.uniform(0.0, np.pi)
            t = np.linspace(0.0, length, int(np.ceil(length / 0.3)) + 1)
            pts = np.unique(np.stack([np.rint(x0 + t * np.cos(ang)), np.rint(y0 + t * np.sin(ang))], axis=1).astype(int),
                            axis=0)
            px, py = pts[:, 0], pts[:, 1]
        dep = np.exp(rng.uniform(lo, hi, px.size))
        ok = (px >= 0) & (px < det.nx) & (py >= 0) & (py < det.ny)
        np.add.at(img, (py[ok], px[ok]), dep[ok])
    return img, n


# ---------------------------------------------------------------- headers
HeaderCards = list[tuple[str, Any, str]]


def _utc_iso(mjd_tai: float) -> str:
    from astropy.time import Time

    return Time(mjd_tai, format="mjd", scale="tai").utc.isot


def raw_header(config: SimulationConfig, camera: Camera, det: Detector, vt: VisitTruth) -> HeaderCards:
    """The keywords an instrument writes (commanded pointing and nominal WCS only)."""
    nx, ny, nov = det.nx, det.ny, det.overscan
    cards: HeaderCards = [
        ("TELESCOP", "SimTel", "telescope"),
        ("INSTRUME", camera.name, "instrument"),
        ("OBSID", f"{camera.name}_O_{vt.day_obs}_{vt.seq:06d}", "observation ID"),
        ("EXPID", int(vt.visit), "exposure ID (= visit)"),
        ("IMGTYPE", "OBJECT", "image type"),
        ("DETECTOR", int(det.id), "detector ID"),
        ("DETNAME", det.name, "detector name"),
        ("DATE-OBS", _utc_iso(vt.mjd_start), "[UTC] shutter open"),
        ("MJD-OBS", float(vt.mjd_start), "[d] TAI MJD of shutter open"),
        ("MJD-MID", float(vt.mjd_mid), "[d] TAI MJD of mid-exposure"),
        ("EXPTIME", float(vt.exptime), "[s] exposure time"),
        ("DARKTIME", float(vt.exptime), "[s] dark time"),
        ("FILTER", vt.physical_filter, "physical filter"),
        ("BAND", vt.band, "band"),
        ("RA", float(vt.cmd_ra), "[deg] commanded boresight RA (ICRS)"),
        ("DEC", float(vt.cmd_dec), "[deg] commanded boresight Dec (ICRS)"),
        ("ROTPA", float(vt.cmd_rotation), "[deg] commanded rotation: PA of +y, N through E"),
        ("AIRMASS", float(vt.airmass), "airmass at mid-exposure"),
        ("ALTITUDE", float(vt.altitude), "[deg] altitude at mid-exposure"),
        ("AZIMUTH", float(vt.azimuth), "[deg] azimuth at mid-exposure, N through E"),
        ("DAYOBS", int(vt.day_obs), "observing night YYYYMMDD"),
        ("SEQNUM", int(vt.seq), "sequence number within DAYOBS"),
        ("DATASEC", f"[1:{nx},1:{ny}]", "imaging section"),
        ("BIASSEC", f"[{nx + 1}:{nx + nov},1:{ny}]", "serial overscan section"),
        ("GAIN", float(det.gain), "[e-/adu] gain"),
        ("RDNOISE", float(det.read_noise), "[e-] read noise"),
        ("SATURATE", float(det.saturation_adu), "[adu] saturation level"),
        ("BUNIT", "adu", "pixel unit"),
    ]
    wcs = nominal_wcs_header(camera, det, vt.cmd_ra, vt.cmd_dec, vt.cmd_rotation)
    for k, v in wcs.items():
        cards.append((k, v, "nominal WCS (commanded pointing)"))
    cards.append(("SIMVER", "1", "lsst_prod.sim version"))
    return cards


def calib_header(config: SimulationConfig, camera: Camera, det: Detector, kind: str,
                 physical_filter: str | None = None) -> HeaderCards:
    cards: HeaderCards = [
        ("INSTRUME", camera.name, "instrument"),
        ("DETECTOR", int(det.id), "detector ID"),
        ("DETNAME", det.name, "detector name"),
        ("CALIBTYP", kind, "calibration type"),
        ("CALIBDT", "2000-01-01", "validity start"),
    ]
    if physical_filter is not None:
        cards.append(("FILTER", physical_filter, "physical filter"))
    if kind == "bias":
        cards.append(("BUNIT", "adu", "overscan-subtracted bias structure"))
    elif kind == "flat":
        cards.append(("BUNIT", "", "normalized to mean 1"))
    else:
        cards.append(("BUNIT", "", "1 = bad pixel"))
    cards.append(("SIMSEED", int(config.seed), "simulation seed"))
    return cards
