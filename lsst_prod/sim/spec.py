"""Shared constants and helpers of the simulator: photometric units, seeding, the camera.

Seeding
-------
Every random quantity comes from :func:`rng_for` ``(seed, *keys)``: a
``numpy.random.SeedSequence`` whose entropy is the config seed and whose spawn
key is made of the stream name and the identifiers the stream belongs to
(e.g. ``("render", visit, detector)``).  Streams are therefore independent of
one another and of the order in which things are computed, so any raw can be
regenerated on its own.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..camera import Camera, make_camera
from ..config.simulation import SimulationConfig

#: AB magnitude of 1 nJy: m_AB = AB_NJY_ZERO_POINT - 2.5 log10(flux / nJy).
AB_NJY_ZERO_POINT = 31.4

#: Default Moffat index (``psf_model: moffat``; the config field psf_moffat_beta).
MOFFAT_BETA = 3.5

KIND_STAR, KIND_GALAXY, KIND_TRANSIENT, KIND_ASTEROID = 0, 1, 2, 3
KIND_NAMES = ("star", "galaxy", "transient", "asteroid")

#: Version of the simulator's conventions, written into every output's metadata.
SIM_VERSION = "1"


def mag_to_njy(mag: np.ndarray | float) -> np.ndarray:
    """AB magnitude -> flux density in nJy."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - AB_NJY_ZERO_POINT))


def njy_to_mag(flux: np.ndarray | float) -> np.ndarray:
    """Flux density in nJy -> AB magnitude (NaN for flux <= 0)."""
    f = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, AB_NJY_ZERO_POINT - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def electrons_from_njy(flux_njy: np.ndarray | float, zero_point: float) -> np.ndarray:
    """Expected electrons of a source of ``flux_njy`` in an exposure of zero point ``zero_point``.

    ``zero_point`` is the AB magnitude that gives one electron in the exposure:
    ``e = flux_nJy * 10**(0.4 * (zero_point - 31.4))``.
    """
    return np.asarray(flux_njy, dtype=np.float64) * 10.0 ** (0.4 * (zero_point - AB_NJY_ZERO_POINT))


def _key_int(k: object) -> int:
    if isinstance(k, (bool, np.bool_)):
        return int(k)
    if isinstance(k, (int, np.integer)):
        if k < 0:
            raise ValueError(f"seed keys must be >= 0, got {k}")
        return int(k)
    return zlib.crc32(str(k).encode())


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """An independent, reproducible random generator for the stream named by ``keys``."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(_key_int(k) for k in keys))
    return np.random.Generator(np.random.PCG64(ss))


def physical_filter_of(band: str) -> str:
    return f"{band}_sim"


def make_sim_camera(config: SimulationConfig) -> Camera:
    """The nominal camera described by ``config`` (what the pipeline is given)."""
    return make_camera(
        name=config.instrument,
        n_detectors=config.n_detectors,
        nx=config.detector_nx,
        ny=config.detector_ny,
        overscan=config.overscan_pix,
        gap_pixels=config.detector_gap_pix,
        pixel_scale_arcsec=config.pixel_scale_arcsec,
        bands=tuple(config.bands),
        gains=tuple(config.gains_e_per_adu) if config.gains_e_per_adu else None,
        read_noises=tuple(config.read_noise_e) if config.read_noise_e else None,
        saturation_adu=config.saturation_adu,
        bias_level_adu=config.bias_level_adu,
        distortion_k_per_pix2=config.distortion_k_per_pix2 * (1.0 + config.camera_distortion_model_error),
    )


def focal_plane_extent(camera: Camera) -> tuple[float, float, float]:
    """(half width, half height, corner radius) of the detector layout in focal-plane pixels.

    The corner radius is the distance from the boresight to the farthest
    detector corner (pixel-edge corners), used to normalise the PSF and flat
    variations over the focal plane.
    """
    hw = max(abs(d.fp_x0) + d.nx / 2.0 for d in camera.detectors)
    hh = max(abs(d.fp_y0) + d.ny / 2.0 for d in camera.detectors)
    r = max(np.hypot(abs(d.fp_x0) + d.nx / 2.0, abs(d.fp_y0) + d.ny / 2.0) for d in camera.detectors)
    return float(hw), float(hh), float(r)
