"""Instrument description: detectors, their place in the focal plane and electronics.

The camera is what an ``obs_*`` package gives Rubin's pipelines: what the
instrument *nominally* is.  The simulator renders pixels with the camera plus
the effects the pipeline must measure (true pointing, optical distortion,
seeing, transparency); the pipeline only ever sees this nominal description and
the raw headers.

Conventions used across the package
-----------------------------------
* Pixel coordinates are 0-based, pixel centres at integers, arrays indexed
  ``[y, x]`` (astropy ``origin=0``).  FITS headers use 1-based CRPIX as usual.
* Focal-plane coordinates are in *pixels* of the nominal scale, measured from
  the boresight; detector ``d`` covers focal-plane pixels
  ``fp = (x - (nx-1)/2 + d.fp_x0, y - (ny-1)/2 + d.fp_y0)`` before rotation.
* The rotation angle ``rot_deg`` is the position angle of the detector +y axis
  measured from North through East; 0 means +y = North, +x = West (sky RA
  decreases with x, as seen on the sky with East left).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Detector:
    """One CCD: size, overscan, electronics and place in the focal plane."""

    id: int
    name: str
    nx: int  # imaging columns
    ny: int  # imaging rows
    overscan: int  # serial overscan columns appended at the right of each row
    fp_x0: float  # focal-plane position of the detector centre, pixels
    fp_y0: float
    gain: float  # electrons per ADU
    read_noise: float  # electrons
    saturation_adu: float  # ADU at which the raw value clips
    bias_level_adu: float  # nominal overscan level


@dataclass(frozen=True)
class Camera:
    """A camera: its name, pixel scale and detectors."""

    name: str
    pixel_scale_arcsec: float
    detectors: tuple[Detector, ...] = field(default_factory=tuple)
    physical_filters: dict[str, str] = field(default_factory=dict)  # physical_filter -> band
    #: the optical design's radial distortion about the boresight, focal-plane pixels: a star whose ideal
    #: (undistorted) focal-plane position is r_i lands at r = r_i (1 + k r_i^2).  What the instrument team
    #: knows from the optical design (obs_lsst's camera geometry holds the same); the as-built telescope
    #: differs a little, which the single-frame fit measures.  0: unknown (the fit finds it alone)
    distortion_k_per_pix2: float = 0.0

    def detector(self, detector_id: int) -> Detector:
        for d in self.detectors:
            if d.id == detector_id:
                return d
        raise KeyError(f"camera {self.name!r} has no detector {detector_id}")

    @property
    def detector_ids(self) -> list[int]:
        return [d.id for d in self.detectors]

    def band_of(self, physical_filter: str) -> str:
        return self.physical_filters[physical_filter]

    # --- serialisation (the camera is a dataset in the repository) ---------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pixel_scale_arcsec": self.pixel_scale_arcsec,
            "distortion_k_per_pix2": self.distortion_k_per_pix2,
            "physical_filters": dict(self.physical_filters),
            "detectors": [asdict(d) for d in self.detectors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Camera":
        return cls(
            name=data["name"],
            pixel_scale_arcsec=float(data["pixel_scale_arcsec"]),
            physical_filters=dict(data.get("physical_filters", {})),
            distortion_k_per_pix2=float(data.get("distortion_k_per_pix2", 0.0)),
            detectors=tuple(Detector(**d) for d in data["detectors"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "Camera":
        return cls.from_dict(json.loads(text))


def detector_to_focal_plane(det: Detector, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detector pixel (x, y) -> focal-plane pixels from the boresight (unrotated)."""
    return (np.asarray(x) - (det.nx - 1) / 2.0 + det.fp_x0, np.asarray(y) - (det.ny - 1) / 2.0 + det.fp_y0)


def focal_plane_to_detector(det: Detector, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane pixels -> detector pixel (x, y); inverse of :func:`detector_to_focal_plane`."""
    return (np.asarray(u) + (det.nx - 1) / 2.0 - det.fp_x0, np.asarray(v) + (det.ny - 1) / 2.0 - det.fp_y0)


def nominal_cd_matrix(pixel_scale_arcsec: float, rot_deg: float) -> np.ndarray:
    """CD matrix (deg/pixel) for the convention in the module docstring.

    With rot=0, +x points West (RA decreasing) and +y North, so
    CD = scale * [[-1, 0], [0, 1]] rotated by the position angle.
    """
    s = pixel_scale_arcsec / 3600.0
    t = np.deg2rad(rot_deg)
    c, n = np.cos(t), np.sin(t)
    # Columns are the sky directions (East, North) of the +x and +y pixel axes:
    # +y points at position angle rot (North through East), +x 90 deg clockwise of it.
    return s * np.array([[-c, n], [n, c]])


def nominal_wcs_header(camera: Camera, det: Detector, ra_deg: float, dec_deg: float, rot_deg: float) -> dict[str, Any]:
    """The TAN WCS an instrument writes into a raw header from the commanded pointing.

    It knows neither the pointing error nor the optical distortion: the
    astrometric calibration has to find both.
    """
    # Boresight (focal-plane 0,0) in detector pixels, 0-based -> FITS 1-based.
    bx, by = focal_plane_to_detector(det, 0.0, 0.0)
    cd = nominal_cd_matrix(camera.pixel_scale_arcsec, rot_deg)
    return {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": float(ra_deg),
        "CRVAL2": float(dec_deg),
        "CRPIX1": float(bx) + 1.0,
        "CRPIX2": float(by) + 1.0,
        "CD1_1": float(cd[0, 0]),
        "CD1_2": float(cd[0, 1]),
        "CD2_1": float(cd[1, 0]),
        "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
    }


#: SIP order of the optical distortion added to a raw header's TAN WCS (radial terms r^2 and r^4 of the
#: exact inverse: 3rd and 5th order; the 7th-order term is below 1e-4 pixel at 1.5e-9 px^-2 and r = 1,200 px)
DISTORTION_SIP_ORDER = 5


def _poly_design(u: np.ndarray, v: np.ndarray, order: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    terms = [(p, n - p) for n in range(2, order + 1) for p in range(n, -1, -1)]
    return np.stack([u**p * v**q for p, q in terms], axis=1), terms


def with_optical_distortion(header: dict[str, Any], k: float, shape: tuple[int, int]) -> dict[str, Any]:
    """A raw header's TAN WCS (``header``'s cards; CRPIX = the boresight, as :func:`nominal_wcs_header`
    writes it) with the camera's radial optical distortion ``k`` (:attr:`Camera.distortion_k_per_pix2`)
    as TAN-SIP: the forward polynomial (A, B) maps a pixel to its ideal focal-plane position, the inverse
    (AP, BP) back, each fitted to the exact radial law over the detector (``shape`` = (ny, nx)) and a
    margin.  ``k == 0`` returns the cards unchanged.  The first guess of the single-frame astrometric
    fit: with the distortion known, a few stars fix the pointing and rotation that remain."""
    out = dict(header)
    if k == 0.0:
        return out
    ny, nx = shape
    cx, cy = float(header["CRPIX1"]) - 1.0, float(header["CRPIX2"]) - 1.0
    gx, gy = np.meshgrid(np.linspace(-0.1 * nx, 1.1 * nx, 41), np.linspace(-0.1 * ny, 1.1 * ny, 41))
    u, v = gx.ravel() - cx, gy.ravel() - cy
    r = np.hypot(u, v)
    ri = r.copy()  # ideal radius: Newton on ri + k ri^3 = r
    for _ in range(20):
        ri = ri - (ri + k * ri**3 - r) / (1.0 + 3.0 * k * ri**2)
    f = np.divide(ri, r, out=np.ones_like(r), where=r > 0)
    ui, vi = u * f, v * f
    s = max(float(np.abs(u).max()), float(np.abs(v).max()), 1.0)  # conditioning
    design, terms = _poly_design(u / s, v / s, DISTORTION_SIP_ORDER)
    a, *_ = np.linalg.lstsq(design, ui - u, rcond=None)
    b, *_ = np.linalg.lstsq(design, vi - v, rcond=None)
    idesign, _ = _poly_design(ui / s, vi / s, DISTORTION_SIP_ORDER)
    ap, *_ = np.linalg.lstsq(idesign, u - ui, rcond=None)
    bp, *_ = np.linalg.lstsq(idesign, v - vi, rcond=None)
    out["CTYPE1"], out["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    out["A_ORDER"] = out["B_ORDER"] = out["AP_ORDER"] = out["BP_ORDER"] = DISTORTION_SIP_ORDER
    for (p, q), ca, cb, cap, cbp in zip(terms, a, b, ap, bp):
        norm = s ** (p + q)
        out[f"A_{p}_{q}"], out[f"B_{p}_{q}"] = float(ca / norm), float(cb / norm)
        out[f"AP_{p}_{q}"], out[f"BP_{p}_{q}"] = float(cap / norm), float(cbp / norm)
    return out


def make_camera(
    name: str = "SimCam",
    n_detectors: int = 2,
    nx: int = 1024,
    ny: int = 1024,
    overscan: int = 32,
    gap_pixels: int = 40,
    pixel_scale_arcsec: float = 0.2,
    bands: tuple[str, ...] = ("g", "r", "i"),
    gains: tuple[float, ...] | None = None,
    read_noises: tuple[float, ...] | None = None,
    saturation_adu: float = 60000.0,
    bias_level_adu: float = 1000.0,
    distortion_k_per_pix2: float = 0.0,
) -> Camera:
    """A simple camera: detectors in a near-square grid centred on the boresight."""
    ncol = int(np.ceil(np.sqrt(n_detectors)))
    nrow = int(np.ceil(n_detectors / ncol))
    dets = []
    for i in range(n_detectors):
        r, c = divmod(i, ncol)
        fp_x0 = (c - (ncol - 1) / 2.0) * (nx + gap_pixels)
        fp_y0 = (r - (nrow - 1) / 2.0) * (ny + gap_pixels)
        gain = gains[i % len(gains)] if gains else 1.0 + 0.05 * ((i * 7) % 5)
        rn = read_noises[i % len(read_noises)] if read_noises else 5.0 + 0.5 * (i % 3)
        dets.append(
            Detector(
                id=i,
                name=f"R00_S{r}{c}",
                nx=nx,
                ny=ny,
                overscan=overscan,
                fp_x0=float(fp_x0),
                fp_y0=float(fp_y0),
                gain=float(gain),
                read_noise=float(rn),
                saturation_adu=float(saturation_adu),
                bias_level_adu=float(bias_level_adu),
            )
        )
    return Camera(
        name=name,
        pixel_scale_arcsec=pixel_scale_arcsec,
        detectors=tuple(dets),
        physical_filters={f"{b}_sim": b for b in bands},
        distortion_k_per_pix2=float(distortion_k_per_pix2),
    )
