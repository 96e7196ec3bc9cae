"""Merge per-band detections into one footprint set with multi-band peaks (one patch).

Footprints: the union of the bands' footprint pixels, relabelled 8-connected,
so overlapping footprints of different bands become one footprint (and a
footprint of band A bridging two footprints of band B joins them).

Peaks: the bands are taken in ``priority`` order (default: the order of the
dict).  The first band's peaks seed the merged list; every peak of a later band
is matched to the nearest merged peak within ``match_radius_pix``: if one is
found, the merged peak records that it was detected in this band (and takes the
band's position when the band's significance is higher); otherwise it becomes a
new peak.  So a source detected in one band only is kept, and a source detected
in several bands gives one peak.  This is Rubin's ``MergeDetectionsTask``
without the "culled" zone between the same-peak and new-peak radii (one radius
here).  Matching is vectorised per band (KD-tree); when two peaks of one band
fall on the same merged peak (a broader band's blended peak between two sharp
peaks), the nearest matches and the other becomes a new peak: each passed its
band's peak test, so it is a distinct source, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .footprints import Footprints, split_footprints

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class MergedDetections:
    """Multi-band detections of one patch.

    Attributes
    ----------
    footprints:
        :class:`Footprints` of the union; ``peak_significance`` is the maximum
        over the bands, peaks sorted by footprint then decreasing significance.
    bands:
        Band names, the column order of the per-band arrays.
    peak_detected:
        bool (m, n_bands): the peak was detected in that band.
    peak_band_significance:
        float64 (m, n_bands): the band's significance at the peak (NaN if not detected).
    footprint_bands:
        bool (n, n_bands): the merged footprint contains footprint pixels of that band.
    match_radius_pix:
        The matching radius used (pixels).
    """

    footprints: Footprints
    bands: tuple[str, ...]
    peak_detected: np.ndarray
    peak_band_significance: np.ndarray
    footprint_bands: np.ndarray
    match_radius_pix: float

    @property
    def n_footprints(self) -> int:
        return self.footprints.n_footprints

    @property
    def n_peaks(self) -> int:
        return self.footprints.n_peaks


def merge_detections(
    per_band: Mapping[str, Footprints],
    shape: tuple[int, int],
    match_radius_pix: float = 3.0,
    priority: Sequence[str] | None = None,
) -> MergedDetections:
    """Union of the bands' footprints, peaks matched across bands within ``match_radius_pix``.

    ``per_band`` maps band -> :class:`Footprints` of images of ``shape`` (ny, nx),
    all on the same pixel grid (one patch).  ``priority`` orders the bands whose
    peaks seed the list (default: the mapping's order); every band of
    ``per_band`` must appear in it.
    """
    bands = tuple(per_band)
    order = tuple(priority) if priority is not None else bands
    if sorted(order) != sorted(bands):
        raise ValueError(f"priority {order} must list exactly the bands {bands}")
    shape = (int(shape[0]), int(shape[1]))
    nb = len(bands)
    union = np.zeros(shape, dtype=bool)
    for b, fp in per_band.items():
        if fp.labels.shape != shape:
            raise ValueError(f"band {b}: labels shape {fp.labels.shape} != {shape}")
        union |= fp.labels > 0
    labels, nfp = ndimage.label(union, structure=_EIGHT)
    labels = labels.astype(np.int32)
    slices = ndimage.find_objects(labels, max_label=nfp)
    bbox = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.int64).reshape(nfp, 4)
    area = np.bincount(labels.ravel(), minlength=nfp + 1)[1:].astype(np.int64)
    fp_bands = np.zeros((nfp, nb), dtype=bool)
    for j, b in enumerate(bands):
        hit = np.bincount(labels[per_band[b].labels > 0], minlength=nfp + 1)[1:]
        fp_bands[:, j] = hit > 0

    px, py = np.zeros(0), np.zeros(0)
    sig = np.zeros((0, nb))
    best = np.zeros(0)  # significance of the band that gave the position
    for b in order:
        j = bands.index(b)
        fp = per_band[b]
        bx, by, bs = fp.peak_x.astype(np.float64), fp.peak_y.astype(np.float64), fp.peak_significance.astype(np.float64)
        if len(bx) == 0:
            continue
        if len(px):
            tree = cKDTree(np.column_stack([px, py]))
            dist, idx = tree.query(np.column_stack([bx, by]), distance_upper_bound=match_radius_pix)
            matched = np.isfinite(dist)
        else:
            idx, matched = np.zeros(len(bx), np.int64), np.zeros(len(bx), bool)
        mi, mk = idx[matched], np.flatnonzero(matched)
        if len(mi):
            # Several peaks of this band on one merged peak: the nearest matches it; the others
            # passed this band's own peak test (distinct peaks of one band), so they become new peaks.
            o = np.lexsort((dist[mk], mi))
            first = np.r_[True, mi[o][1:] != mi[o][:-1]]
            matched[mk[o][~first]] = False
            mi, mk = mi[o][first], mk[o][first]
            sig[mi, j] = bs[mk]
            move = bs[mk] > best[mi]
            px[mi[move]], py[mi[move]], best[mi[move]] = bx[mk[move]], by[mk[move]], bs[mk[move]]
        new = np.flatnonzero(~matched)
        add = np.full((len(new), nb), np.nan)
        add[:, j] = bs[new]
        px, py, best = np.r_[px, bx[new]], np.r_[py, by[new]], np.r_[best, bs[new]]
        sig = np.vstack([sig, add])

    ix = np.clip(np.rint(px).astype(np.int64), 0, shape[1] - 1)
    iy = np.clip(np.rint(py).astype(np.int64), 0, shape[0] - 1)
    pfp = labels[iy, ix].astype(np.int64) - 1
    keep = pfp >= 0  # a band's peak always lies in its own footprint, hence in the union
    px, py, sig, pfp = px[keep], py[keep], sig[keep], pfp[keep]
    total = np.nanmax(sig, axis=1) if len(sig) else np.zeros(0)
    o = np.lexsort((-total, pfp))
    merged = Footprints(
        labels=labels, bbox=bbox, area=area, peak_footprint=pfp[o], peak_x=px[o], peak_y=py[o],
        peak_significance=total[o],
    )
    return MergedDetections(
        footprints=merged, bands=bands, peak_detected=np.isfinite(sig[o]), peak_band_significance=sig[o],
        footprint_bands=fp_bands, match_radius_pix=float(match_radius_pix),
    )


def split_merged(merged: MergedDetections, psf_sigma_pix: float, max_peaks: int) -> MergedDetections:
    """``merged`` with every footprint of more than ``max_peaks`` peaks split
    (:func:`~lsst_prod.algorithms.footprints.split_footprints`): the union of a crowded coadd's bands
    percolates into patch-wide footprints (1,042 peaks over 2054 x 2003 pixels at 600,000 stars/deg^2
    and 2" seeing), which the deblender must skip and measurement fits as one blend.  Peaks keep their
    order and per-band arrays; a new footprint inherits its parent's ``footprint_bands`` row."""
    fp = split_footprints(merged.footprints, psf_sigma_pix, int(max_peaks))
    if fp is merged.footprints:
        return merged
    n_old, n_new = merged.footprints.n_footprints, fp.n_footprints
    origin = np.arange(n_new)
    moved = fp.peak_footprint >= n_old
    origin[fp.peak_footprint[moved]] = merged.footprints.peak_footprint[moved]
    return replace(merged, footprints=fp, footprint_bands=np.asarray(merged.footprint_bands)[origin])
