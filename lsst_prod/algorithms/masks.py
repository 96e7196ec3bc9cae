"""Mask planes shared by every image in the package (bit values of the uint32 mask).

The names follow Rubin's afw mask planes so that users find what they expect;
the bit assignment is written into every FITS mask HDU header as ``MP_<NAME>``
keywords, so files stay self-describing.
"""

from __future__ import annotations

import numpy as np

BAD = np.uint32(1 << 0)  # defect (bad column/pixel) from the defects calibration
SAT = np.uint32(1 << 1)  # saturated in the raw
INTRP = np.uint32(1 << 2)  # value was interpolated (defect, saturation or cosmic ray)
CR = np.uint32(1 << 3)  # cosmic ray
EDGE = np.uint32(1 << 4)  # too close to the detector edge for full measurement
DETECTED = np.uint32(1 << 5)  # inside a detection footprint (positive)
DETECTED_NEGATIVE = np.uint32(1 << 6)
SUSPECT = np.uint32(1 << 7)  # near saturation / nonlinear regime
NO_DATA = np.uint32(1 << 8)  # no data (warps: outside the input)
CLIPPED = np.uint32(1 << 9)  # rejected as an outlier in a coadd
STREAK = np.uint32(1 << 10)  # satellite / asteroid trail

PLANES: dict[str, np.uint32] = {
    "BAD": BAD,
    "SAT": SAT,
    "INTRP": INTRP,
    "CR": CR,
    "EDGE": EDGE,
    "DETECTED": DETECTED,
    "DETECTED_NEGATIVE": DETECTED_NEGATIVE,
    "SUSPECT": SUSPECT,
    "NO_DATA": NO_DATA,
    "CLIPPED": CLIPPED,
    "STREAK": STREAK,
}

#: Pixels that must not enter a fit (PSF, photometry): union of the unusable planes.
UNUSABLE = BAD | SAT | CR | NO_DATA


def header_cards() -> dict[str, int]:
    """``MP_<NAME>`` keywords giving each plane's bit number, for FITS mask HDUs."""
    return {f"MP_{name}": int(np.log2(int(bit))) for name, bit in PLANES.items()}
