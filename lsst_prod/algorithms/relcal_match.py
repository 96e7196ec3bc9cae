"""Relative calibration: selection of calibration stars and their association across ccdvisits.

1. :func:`select_good_sources`: point-like (``extendedness`` 0), unsaturated centre,
   not a deblend parent or child, S/N above a cut, and isolated: no other row of the same
   ccdvisit within ``isolation_arcsec`` (a neighbour biases both flux and centroid, and
   makes the association ambiguous).
2. :func:`match_sources`: the selected sources of all ccdvisits become "stars":

   * reference stars first: the reference catalogue is propagated (proper motion +
     parallax, :func:`~lsst_prod.algorithms.astrometry.propagate_positions`) to the
     epoch of each visit and every source takes the nearest reference star within
     ``radius_arcsec``; a reference star keeps at most one source per ccdvisit (the
     nearest);
   * the other sources are linked by friends-of-friends (KD-tree on unit vectors, pairs
     closer than ``radius_arcsec`` in different ccdvisits, connected components); a
     group keeps one source per ccdvisit (the nearest to its mean position).  Chaining
     follows proper motions of up to ~radius per interval between visits;
   * stars with fewer than ``min_measurements`` sources are dropped.

Index spaces are global: the caller passes the rows of ALL ccdvisits (only a few
columns are needed, so an MPI stage gathers them on one rank, or runs this per sky
region with an overlap) and gets back a star index per row, which defines the
:class:`~lsst_prod.algorithms.relcal_normals.PairIndex` every rank shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .astrometry import propagate_positions
from .relcal_normals import CcdVisits

ARCSEC_RAD = np.pi / 180.0 / 3600.0


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """(n, 3) unit vectors of (ra, dec) in degrees."""
    ra, dec = np.deg2rad(np.asarray(ra_deg, float)), np.deg2rad(np.asarray(dec_deg, float))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def _chord(arcsec: float) -> float:
    return 2.0 * np.sin(0.5 * arcsec * ARCSEC_RAD)


def select_good_sources(
    ccdvisit_index: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    psf_flux: np.ndarray,
    psf_flux_err: np.ndarray,
    extendedness: np.ndarray,
    saturated_center: np.ndarray,
    deblend_n_child: np.ndarray,
    parent_source_id: np.ndarray,
    *,
    snr_min: float = 10.0,
    isolation_arcsec: float = 2.0,
) -> np.ndarray:
    """Boolean mask of the Source rows usable for relative calibration.

    Arguments are Source columns (``extendedness``, ``pixelFlags_saturatedCenter``,
    ``deblend_nChild``, ``parentSourceId``) of complete ccdvisits (isolation is tested
    against every row of the same ccdvisit, so pass all rows, not a pre-selection).
    """
    k = np.asarray(ccdvisit_index, np.int64)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    flux, err = np.asarray(psf_flux, float), np.asarray(psf_flux_err, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        good = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(flux) & np.isfinite(err) & (err > 0)
        good &= flux > snr_min * err
    good &= np.asarray(extendedness, float) == 0.0  # NaN (parents, failures) -> not good
    good &= ~np.asarray(saturated_center, bool)
    good &= np.asarray(deblend_n_child) == 0
    good &= np.asarray(parent_source_id) == 0
    pos = np.isfinite(ra) & np.isfinite(dec)
    idx = np.flatnonzero(pos)
    if isolation_arcsec > 0 and len(idx) > 1:
        # 4th coordinate separates ccdvisits (unit vectors are < 2 apart)
        pts = np.column_stack([unit_vectors(ra[idx], dec[idx]), 4.0 * k[idx]])
        pairs = cKDTree(pts).query_pairs(_chord(isolation_arcsec), output_type="ndarray")
        crowded = np.zeros(len(ra), bool)
        crowded[idx[pairs.ravel()]] = True
        good &= ~crowded
    return good


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Stars observed several times.

    ``star_index`` (per input row, -1 if not used), ``star_ref_index`` (per star, row of
    the reference catalogue or -1), ``star_ra/star_dec`` (deg, mean observed position),
    ``star_n_measurements``; reference stars come first (sorted by reference row).
    """

    star_index: np.ndarray = field(repr=False)
    star_ref_index: np.ndarray = field(repr=False)
    star_ra: np.ndarray = field(repr=False)
    star_dec: np.ndarray = field(repr=False)
    star_n_measurements: np.ndarray = field(repr=False)
    n_stars: int
    n_reference_stars: int
    n_matched_sources: int
    radius_arcsec: float


def _keep_nearest(group: np.ndarray, k: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Mask keeping, for each (group, ccdvisit), the row with the smallest ``dist``."""
    if len(group) == 0:
        return np.zeros(0, bool)
    order = np.lexsort((dist, k, group))
    g, kk = group[order], k[order]
    first = np.r_[True, (np.diff(g) != 0) | (np.diff(kk) != 0)]
    keep = np.zeros(len(group), bool)
    keep[order[first]] = True
    return keep


def match_sources(
    ccdvisit_index: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    ccdvisits: CcdVisits,
    ref_ra: np.ndarray | None = None,
    ref_dec: np.ndarray | None = None,
    ref_pmra: np.ndarray | None = None,
    ref_pmdec: np.ndarray | None = None,
    ref_parallax: np.ndarray | None = None,
    ref_epoch_mjd: np.ndarray | float | None = None,
    *,
    good: np.ndarray | None = None,
    radius_arcsec: float = 0.4,
    min_measurements: int = 2,
    search_margin_arcsec: float = 30.0,
) -> MatchResult:
    """Associate the sources of all ccdvisits into stars and to the reference catalogue.

    ``ccdvisit_index``: row of each source in ``ccdvisits`` (which gives its epoch);
    ``ra, dec``: single-frame positions (deg).  The reference catalogue (``ref_*``,
    positions in deg at ``ref_epoch_mjd``, pmra (with cos dec) / pmdec in mas/yr,
    parallax in mas) is optional.  ``good``: the rows to use (:func:`select_good_sources`).
    """
    k = np.asarray(ccdvisit_index, np.int64)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    n = len(k)
    use = np.isfinite(ra) & np.isfinite(dec) if good is None else np.asarray(good, bool) & np.isfinite(ra + dec)
    vec = unit_vectors(ra, dec)
    r_chord = _chord(radius_arcsec)
    ref_of = np.full(n, -1, np.int64)
    ref_dist = np.full(n, np.inf)

    # --- 1. reference stars, propagated to each epoch ------------------------------------
    if ref_ra is not None and len(ref_ra):
        ref_ra, ref_dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
        nref = len(ref_ra)
        pmra = np.zeros(nref) if ref_pmra is None else np.asarray(ref_pmra, float)
        pmdec = np.zeros(nref) if ref_pmdec is None else np.asarray(ref_pmdec, float)
        plx = np.zeros(nref) if ref_parallax is None else np.asarray(ref_parallax, float)
        epoch = np.broadcast_to(np.asarray(ccdvisits.mjd.mean() if ref_epoch_mjd is None else ref_epoch_mjd, float),
                                (nref,))
        ref_tree = cKDTree(unit_vectors(ref_ra, ref_dec))
        rows = np.flatnonzero(use)
        mjd_rows = ccdvisits.mjd[k[rows]]
        order = np.argsort(mjd_rows, kind="stable")
        epochs, starts = np.unique(mjd_rows[order], return_index=True)
        for t, r in zip(epochs, np.split(rows[order], starts[1:])):
            centre = vec[r].mean(axis=0)
            centre /= np.linalg.norm(centre)
            reach = np.max(np.linalg.norm(vec[r] - centre, axis=1)) + _chord(search_margin_arcsec + radius_arcsec)
            cand = np.asarray(ref_tree.query_ball_point(centre, reach), np.int64)
            if len(cand) == 0:
                continue
            pra, pdec = propagate_positions(ref_ra[cand], ref_dec[cand], pmra[cand], pmdec[cand], plx[cand],
                                            epoch[cand], float(t))
            d, j = cKDTree(unit_vectors(pra, pdec)).query(vec[r], distance_upper_bound=r_chord)
            hit = np.isfinite(d)
            ref_of[r[hit]] = cand[j[hit]]
            ref_dist[r[hit]] = d[hit]
        matched = ref_of >= 0
        keep = np.zeros(n, bool)
        mrows = np.flatnonzero(matched)
        keep[mrows] = _keep_nearest(ref_of[mrows], k[mrows], ref_dist[mrows])
        ref_of[matched & ~keep] = -1
        # a duplicate that lost its reference star does not go on to friends-of-friends
        use = use & ~(matched & ~keep)

    # --- 2. friends-of-friends among the other sources -----------------------------------
    free = np.flatnonzero(use & (ref_of < 0))
    group = np.full(n, -1, np.int64)
    if len(free):
        pairs = cKDTree(vec[free]).query_pairs(r_chord, output_type="ndarray")
        pairs = pairs[k[free[pairs[:, 0]]] != k[free[pairs[:, 1]]]] if len(pairs) else pairs
        graph = coo_array((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(free), len(free)))
        _, labels = connected_components(graph, directed=False)
        size = np.bincount(labels)
        multi = size[labels] >= 2
        f, lab = free[multi], labels[multi]
        if len(f):
            centre = np.zeros((labels.max() + 1, 3))
            for c in range(3):
                centre[:, c] = np.bincount(lab, vec[f, c], minlength=len(centre))
            centre /= np.maximum(np.linalg.norm(centre, axis=1), 1e-300)[:, None]
            dist = np.linalg.norm(vec[f] - centre[lab], axis=1)
            keep = _keep_nearest(lab, k[f], dist)
            group[f[keep]] = lab[keep]

    # --- 3. star numbering: reference stars (by ref row), then groups (by first row) ------
    ref_rows = np.flatnonzero(ref_of >= 0)
    ref_ids, ref_n = np.unique(ref_of[ref_rows], return_counts=True)
    ref_ids = ref_ids[ref_n >= min_measurements]
    g_rows = np.flatnonzero(group >= 0)
    g_ids, g_first, g_n = np.unique(group[g_rows], return_index=True, return_counts=True)
    ok = g_n >= min_measurements
    g_ids = g_ids[ok][np.argsort(g_rows[g_first[ok]])]
    star_index = np.full(n, -1, np.int64)
    if len(ref_ids):
        pos = np.clip(np.searchsorted(ref_ids, ref_of[ref_rows]), 0, len(ref_ids) - 1)
        hit = ref_ids[pos] == ref_of[ref_rows]
        star_index[ref_rows[hit]] = pos[hit]
    remap = np.full((group.max() + 1) if len(g_rows) else 0, -1, np.int64)
    remap[g_ids] = len(ref_ids) + np.arange(len(g_ids))
    if len(g_rows):
        star_index[g_rows] = remap[group[g_rows]]
    n_stars = len(ref_ids) + len(g_ids)
    star_ref_index = np.r_[ref_ids, np.full(len(g_ids), -1, np.int64)].astype(np.int64)

    rows = np.flatnonzero(star_index >= 0)
    mean = np.zeros((n_stars, 3))
    for c in range(3):
        mean[:, c] = np.bincount(star_index[rows], vec[rows, c], minlength=n_stars)
    nmeas = np.bincount(star_index[rows], minlength=n_stars)
    mean /= np.maximum(np.linalg.norm(mean, axis=1), 1e-300)[:, None]
    star_ra = np.rad2deg(np.arctan2(mean[:, 1], mean[:, 0])) % 360.0
    star_dec = np.rad2deg(np.arcsin(np.clip(mean[:, 2], -1, 1)))
    return MatchResult(star_index, star_ref_index, star_ra, star_dec, nmeas, int(n_stars), int(len(ref_ids)),
                       int(len(rows)), float(radius_arcsec))
