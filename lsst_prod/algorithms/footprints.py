"""Detection footprints and their peaks: the hand-off from detection to measurement.

A footprint is a connected set of pixels above the detection threshold (grown
by about the PSF size); a peak is a local maximum of the PSF-smoothed image
inside it.  A footprint with several peaks is a blend: measurement deblends it
into one child per peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Footprints:
    """All footprints of one image.

    Attributes
    ----------
    labels:
        int32 array of the image's shape; 0 outside footprints, ``k+1`` inside
        footprint ``k`` (footprints are numbered 0..n-1).
    bbox:
        int64 array (n, 4) of ``x0, y0, x1, y1`` (inclusive-exclusive,
        0-based) for each footprint.
    area:
        int64 array (n,), number of pixels in each footprint.
    peak_footprint:
        int64 array (m,), the footprint index of each peak.
    peak_x, peak_y:
        float64 arrays (m,), the peak positions in pixels (integer-valued at
        the local maximum of the smoothed image).
    peak_significance:
        float64 array (m,), smoothed-image S/N at the peak.
    """

    labels: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    peak_footprint: np.ndarray
    peak_x: np.ndarray
    peak_y: np.ndarray
    peak_significance: np.ndarray

    @property
    def n_footprints(self) -> int:
        return int(self.bbox.shape[0])

    @property
    def n_peaks(self) -> int:
        return int(self.peak_x.shape[0])

    def peaks_of(self, footprint: int) -> np.ndarray:
        """Indices of the peaks in ``footprint``, brightest (most significant) first."""
        idx = np.flatnonzero(self.peak_footprint == footprint)
        return idx[np.argsort(-self.peak_significance[idx], kind="stable")]
