"""One-to-one matching of detections to truth.

Candidate pairs are all (truth, detection) pairs closer than the match radius; the bipartite graph
they form is split into connected components and each component is solved with
``scipy.optimize.linear_sum_assignment``: the largest possible number of matches, and among those
the smallest sum of squared distances.  No truth object is matched by two detections and no
detection is counted twice; an unmatched truth object counts as missed, an unmatched detection as
spurious.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def unique_match(truth_xy: np.ndarray, det_xy: np.ndarray, radius: float) -> np.ndarray:
    """Index of the detection matched to each truth row (-1: missed).

    ``truth_xy`` (n, k) and ``det_xy`` (m, k) are positions in the same Cartesian frame (pixels, or
    unit vectors with ``radius`` a chord); rows with non-finite coordinates never match.
    """
    truth_xy, det_xy = np.asarray(truth_xy, float), np.asarray(det_xy, float)
    out = np.full(len(truth_xy), -1, np.int64)
    if not len(truth_xy) or not len(det_xy):
        return out
    truth_xy, det_xy = truth_xy.reshape(len(truth_xy), -1), det_xy.reshape(len(det_xy), -1)
    tok = np.flatnonzero(np.isfinite(truth_xy).all(axis=1))
    dok = np.flatnonzero(np.isfinite(det_xy).all(axis=1))
    if not len(tok) or not len(dok):
        return out
    T, D = truth_xy[tok], det_xy[dok]
    lists = cKDTree(T).query_ball_tree(cKDTree(D), radius)
    ti = np.fromiter((i for i, js in enumerate(lists) for _ in js), np.int64)
    dj = np.fromiter((j for js in lists for j in js), np.int64)
    dist = np.sqrt(np.sum((T[ti] - D[dj]) ** 2, axis=1)) if len(ti) else np.zeros(0)
    if not len(ti):
        return out
    nt, nd = len(tok), len(dok)
    graph = coo_matrix((np.ones(len(ti)), (ti, nt + dj)), shape=(nt + nd, nt + nd))
    _, label = connected_components(graph, directed=False)
    comp = label[ti]
    n_edges = np.bincount(comp)
    single = n_edges[comp] == 1  # a lone candidate pair: nothing to decide
    out[tok[ti[single]]] = dok[dj[single]]
    ti, dj, dist, comp = ti[~single], dj[~single], dist[~single], comp[~single]
    if not len(ti):
        return out
    order = np.argsort(comp, kind="stable")
    ti, dj, dist, comp = ti[order], dj[order], dist[order], comp[order]
    bounds = np.flatnonzero(np.diff(comp)) + 1
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(comp)]):
        a, b, d = ti[s:e], dj[s:e], dist[s:e]
        ua, ia = np.unique(a, return_inverse=True)
        ub, ib = np.unique(b, return_inverse=True)
        if len(ua) == 1 or len(ub) == 1:  # one truth or one detection: the closest candidate
            k = int(np.argmin(d))
            out[tok[a[k]]] = dok[b[k]]
            continue
        # unmatched candidates cost more than any complete set of real matches: maximum cardinality first
        big = float(len(d) * radius**2 + 1.0)
        cost = np.full((len(ua), len(ub)), 2 * big)
        cost[ia, ib] = d**2
        r, c = linear_sum_assignment(cost)
        real = cost[r, c] < big
        out[tok[ua[r[real]]]] = dok[ub[c[real]]]
    return out


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    r, d = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def chord(arcsec: float) -> float:
    """The unit-vector chord of an angle in arcsec."""
    return 2 * math.sin(math.radians(arcsec / 3600) / 2)


def chord_to_arcsec(c: np.ndarray) -> np.ndarray:
    return np.degrees(2 * np.arcsin(np.clip(np.asarray(c, float) / 2, 0, 1))) * 3600


def separation_mas(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Angular distance (mas) between positions in degrees, valid across RA = 0/360 and at any
    declination (the chord of the unit vectors; exact to < 1e-6 mas at these separations)."""
    a = unit_vectors(np.atleast_1d(ra1), np.atleast_1d(dec1))
    b = unit_vectors(np.atleast_1d(ra2), np.atleast_1d(dec2))
    return chord_to_arcsec(np.linalg.norm(a - b, axis=1)) * 1e3
