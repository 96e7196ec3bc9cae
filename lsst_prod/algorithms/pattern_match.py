"""Blind-ish matching of a source list to a reference catalogue in one tangent plane.

Everything here works on two point sets in the same gnomonic plane (arcsec):
sources projected through the raw-header WCS and reference stars.  The unknown
mapping between them is, to within the optical distortion, a *similarity*
(shift, rotation, scale close to 1), written in complex form

    z_ref = alpha * z_src + beta,      alpha = s exp(i theta).

Three pieces, used by :func:`lsst_prod.algorithms.astrometry.fit_wcs`:

* :func:`triangle_candidates` -- pattern matching.  Triangles of the brightest
  sources are matched to triangles of the brightest reference stars by their
  side lengths (the plate scale is known to ``max_scale_error``, so absolute
  lengths are used rather than ratios, which is far more selective).  Each
  matched pair of triangles gives a similarity; those outside the allowed
  rotation/scale/shift are dropped, and the survivors vote: a transform
  supported by many independent triangles is a candidate.  The idea is that
  of Groth (1986) and Valdes et al. (1995); the hypothesise-then-verify loop
  follows astrometry.net (Lang et al. 2010) and Tabur's optimistic pattern
  matching (2007) that Rubin's pessimistic matcher builds on.  Written here
  from the papers, in vectorised numpy.
* :func:`verify_transform` -- the decision.  Under a candidate, count
  mutual-nearest matches within ``tolerance`` between the brightest sources and
  the reference stars that land on the detector, refine the similarity on them,
  and compare the count with the number of chance coincidences expected from
  the source density (Poisson).  The false-alarm probability is that tail
  probability times the number of independent hypotheses in the search space
  (shift area x rotation range x scale range, each in units of the tolerance).
* :func:`fit_similarity`, :func:`mutual_nearest` -- the small tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import pdtrc


@dataclass(frozen=True)
class Similarity:
    """``z_ref = alpha * z_src + beta`` (complex, arcsec)."""

    alpha: complex = 1.0 + 0.0j
    beta: complex = 0.0 + 0.0j

    @classmethod
    def about(cls, rotation_rad: float, shift: complex, pivot: complex, scale: float = 1.0) -> Similarity:
        """Rotate (and scale) about ``pivot``, then shift."""
        alpha = scale * np.exp(1j * rotation_rad)
        return cls(complex(alpha), complex(pivot - alpha * pivot + shift))

    def apply(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        z = self.alpha * (np.asarray(x, float) + 1j * np.asarray(y, float)) + self.beta
        return z.real, z.imag

    def inverse(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        z = (np.asarray(x, float) + 1j * np.asarray(y, float) - self.beta) / self.alpha
        return z.real, z.imag

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(np.angle(self.alpha)))

    @property
    def scale(self) -> float:
        return float(abs(self.alpha))

    def shift_at(self, pivot: complex) -> complex:
        """Displacement of the point ``pivot`` (arcsec, complex)."""
        return complex(self.alpha * pivot + self.beta - pivot)


def fit_similarity(zs: np.ndarray, zr: np.ndarray) -> Similarity:
    """Least-squares similarity mapping complex points ``zs`` onto ``zr``."""
    ms, mr = zs.mean(), zr.mean()
    ds = zs - ms
    alpha = np.sum((zr - mr) * np.conj(ds)) / max(float(np.sum(np.abs(ds) ** 2)), 1e-300)
    return Similarity(complex(alpha), complex(mr - alpha * ms))


def mutual_nearest(x, y, tree: cKDTree, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (index into x/y, index into the tree) of nearest neighbours within ``radius``.

    Each point of (x, y) takes its nearest tree point; when several take the same
    tree point, the closest wins.  Returned sorted by the first index.
    """
    if len(x) == 0 or tree.n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist, ref = tree.query(np.column_stack([x, y]), distance_upper_bound=radius)
    src = np.flatnonzero(np.isfinite(dist))
    ref, dist = ref[src], dist[src]
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(ref[order], return_index=True)
    keep = np.sort(order[first])
    return src[keep].astype(np.int64), ref[keep].astype(np.int64)


@dataclass(frozen=True)
class Footprint:
    """The detector as a parallelogram in the source plane: origin + a e1 + b e2, 0 <= a, b <= 1."""

    origin: complex
    e1: complex
    e2: complex

    @property
    def area(self) -> float:
        return float(abs((np.conj(self.e1) * self.e2).imag))

    @property
    def centre(self) -> complex:
        return self.origin + 0.5 * (self.e1 + self.e2)

    @property
    def half_diagonal(self) -> float:
        return float(max(abs(self.e1 + self.e2), abs(self.e1 - self.e2)) / 2.0)

    def contains(self, x, y) -> np.ndarray:
        d = np.asarray(x, float) + 1j * np.asarray(y, float) - self.origin
        det = (np.conj(self.e1) * self.e2).imag
        a = (np.conj(d) * self.e2).imag / det
        b = (np.conj(self.e1) * d).imag / det
        return (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)


@dataclass(frozen=True)
class SearchSpace:
    """The hypotheses searched: shifts within ``max_shift`` (arcsec), rotations within
    ``max_rotation_rad``, scales within 1 +- ``max_scale_error``; ``radius`` is the
    detector's half-diagonal (arcsec)."""

    max_shift: float
    max_rotation_rad: float
    max_scale_error: float
    radius: float

    def n_hypotheses(self, tolerance: float) -> float:
        """Independent hypotheses at a match tolerance: shift disk x rotation range x scale range,
        a rotation (or scale change) that moves the detector's corners by ``tolerance`` being
        a distinct hypothesis."""
        shifts = max(1.0, (self.max_shift / tolerance) ** 2)
        rotations = max(1.0, 2.0 * self.max_rotation_rad * self.radius / tolerance)
        scales = max(1.0, 2.0 * self.max_scale_error * self.radius / tolerance)
        return shifts * rotations * scales


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify_transform`.

    ``n_matched`` pairs within ``tolerance`` where ``n_expected`` were expected by
    chance (``n_refs`` reference stars on the detector, ``n_sources`` sources
    tested); ``log10_false_alarm`` = log10(tests x n_hypotheses(tolerance) x
    P(Poisson(n_expected) >= n_matched)).  ``src_index`` / ``ref_index`` index the
    inputs; ``transform`` is the similarity refitted on those pairs.
    """

    transform: Similarity
    n_matched: int
    n_expected: float
    n_refs: int
    n_sources: int
    log10_false_alarm: float
    accepted: bool
    tolerance: float
    src_index: np.ndarray = field(repr=False)
    ref_index: np.ndarray = field(repr=False)
    rms_arcsec: float = float("nan")


def _count(transform, sx, sy, rx, ry, footprint, tree, tolerance, n_trials, n_sources, n_refine) -> Verification:
    """Matches within ``tolerance`` under ``transform``, refined on them up to ``n_refine`` times."""
    best: Verification | None = None
    for _ in range(max(1, n_refine)):
        on = footprint.contains(*transform.inverse(rx, ry))
        n_on = int(on.sum())
        ns = int(min(len(sx), max(30, 4 * n_on) if n_sources is None else n_sources))
        px, py = transform.apply(sx[:ns], sy[:ns])
        si, ri = mutual_nearest(px, py, tree, tolerance)
        keep = on[ri]
        si, ri = si[keep], ri[keep]
        k = len(si)
        density = ns / max(footprint.area, 1e-9)
        lam = n_on * -np.expm1(-density * np.pi * tolerance**2)
        tail = float(pdtrc(k - 1, lam)) if k > 0 else 1.0
        log10_fa = float(np.log10(max(n_trials, 1.0)) + np.log10(max(tail, 1e-300)))
        rms = float(np.sqrt(np.mean((px[si] - rx[ri]) ** 2 + (py[si] - ry[ri]) ** 2))) if k else float("nan")
        refined = fit_similarity(sx[si] + 1j * sy[si], rx[ri] + 1j * ry[ri]) if k >= 3 else transform
        result = Verification(
            transform=refined, n_matched=k, n_expected=float(lam), n_refs=n_on, n_sources=ns,
            log10_false_alarm=log10_fa, accepted=False, tolerance=tolerance, src_index=si, ref_index=ri, rms_arcsec=rms,
        )  # fmt: skip
        if best is not None and result.n_matched <= best.n_matched:
            break
        best = result
        if k < 3:
            break
        transform = refined
    assert best is not None
    return best


def verify_transform(
    transform: Similarity,
    sx: np.ndarray,
    sy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    footprint: Footprint,
    *,
    tolerance: float,
    search: SearchSpace,
    fine_tolerance: float | None = None,
    max_false_alarm: float = 1e-6,
    min_matches: int = 5,
    n_sources: int | None = None,
    ref_tree: cKDTree | None = None,
    n_refine: int = 3,
    n_levels: int = 3,
) -> Verification:
    """Count matches under ``transform`` (refined on them) and test them against chance.

    ``sx, sy`` are sources sorted brightest first; the first ``n_sources``
    (default: max(30, 4 x the reference stars on the detector)) are tested, so
    that faint detections in a crowded field do not drown the signal.

    The test is made at ``tolerance`` (which must hold the distortion left by a
    similarity) and, once the similarity is refined on those matches, again at
    ``fine_tolerance`` (default tolerance / 3), where chance matches are 9 times
    rarer, then (``n_levels`` = 3) at a third of that, refined again: each level
    is a separate test, so the best false-alarm probability is multiplied by the
    number of levels tested (Bonferroni).  With five or six true matches only the
    fine test can reach 1e-6; with four (a sparse field: 4-6 reference stars over
    a detector) only the finest, where the count of k matches has a chance
    probability ~ (density pi tol^2)^k against ~tol^-4 more hypotheses: a match
    whose residuals are far below the tolerance is far more significant.
    """
    tree = ref_tree if ref_tree is not None else cKDTree(np.column_stack([rx, ry]))
    coarse = _count(transform, sx, sy, rx, ry, footprint, tree, tolerance, search.n_hypotheses(tolerance),
                    n_sources, n_refine)  # fmt: skip
    best, level, n_tests = coarse, coarse, 1
    fine_tol = tolerance / 3.0 if fine_tolerance is None else fine_tolerance
    for _ in range(max(0, n_levels - 1)):
        if not (0 < fine_tol < level.tolerance and level.n_matched >= 3):
            break
        level = _count(level.transform, sx, sy, rx, ry, footprint, tree, fine_tol, search.n_hypotheses(fine_tol),
                       n_sources, 2)  # fmt: skip
        n_tests += 1
        if level.log10_false_alarm < best.log10_false_alarm:
            best = level
        fine_tol = fine_tol / 3.0
    log10_fa = best.log10_false_alarm + (np.log10(n_tests) if best.log10_false_alarm > -300 else 0.0)
    accepted = bool(best.n_matched >= min_matches and log10_fa < np.log10(max_false_alarm))
    return replace(best, log10_false_alarm=float(log10_fa), accepted=accepted)


def _triangles(x: np.ndarray, y: np.ndarray, tolerance: float, max_scale_error: float, min_side: float):
    """Triangles of points (x, y): vertex indices ordered A, B, C opposite the longest,
    middle and shortest sides, and the sorted side lengths.  Near-degenerate labelings
    (two sides equal within the tolerance) and small triangles are dropped."""
    n = len(x)
    if n < 3:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3))
    idx = np.fromiter((i for c in combinations(range(n), 3) for i in c), np.int64).reshape(-1, 3)
    p = x[idx] + 1j * y[idx]
    opp = np.abs(p[:, [1, 2, 0]] - p[:, [2, 0, 1]])  # side opposite each vertex
    order = np.argsort(-opp, axis=1)
    sides = np.take_along_axis(opp, order, 1)
    verts = np.take_along_axis(idx, order, 1)
    gap = tolerance + max_scale_error * sides[:, 0]
    ok = (sides[:, 0] >= min_side) & (sides[:, 0] - sides[:, 1] > gap) & (sides[:, 1] - sides[:, 2] > gap)
    ok &= sides[:, 2] > 2 * tolerance
    return verts[ok], sides[ok]


def triangle_candidates(
    sx: np.ndarray,
    sy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    *,
    tolerance: float,
    max_rotation_rad: float,
    max_scale_error: float,
    max_shift: float,
    pivot: complex = 0j,
    radius: float = 100.0,
    min_side: float | None = None,
    max_candidates: int = 8,
) -> list[tuple[Similarity, int]]:
    """Similarities supported by matched triangles, most supported first: [(transform, n_triangles)].

    ``sx, sy`` and ``rx, ry`` are the (already brightness-ordered and truncated)
    points to build triangles from.  The rotation is measured about ``pivot``
    and must be within ``max_rotation_rad``; the shift of ``pivot`` within
    ``max_shift``; the scale within 1 +- ``max_scale_error``.  ``radius`` (the
    detector half-diagonal) converts rotations to arcsec when clustering votes.
    """
    min_side = 5.0 * tolerance if min_side is None else min_side
    tv_s, ts = _triangles(sx, sy, tolerance, max_scale_error, min_side)
    tv_r, tr = _triangles(rx, ry, tolerance, max_scale_error, min_side)
    if len(ts) == 0 or len(tr) == 0:
        return []
    reach = np.sqrt(3.0) * (tolerance + max_scale_error * float(max(ts[:, 0].max(), tr[:, 0].max())))
    pairs = cKDTree(ts).sparse_distance_matrix(cKDTree(tr), reach, output_type="ndarray")
    if len(pairs) == 0:
        return []
    i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    ok = np.all(np.abs(ts[i] - tr[j]) <= tolerance + max_scale_error * tr[j], axis=1)
    i, j = i[ok], j[ok]
    if len(i) == 0:
        return []
    zs = sx[tv_s[i]] + 1j * sy[tv_s[i]]  # (m, 3), vertices in corresponding order
    zr = rx[tv_r[j]] + 1j * ry[tv_r[j]]
    ms, mr = zs.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
    ds = zs - ms
    alpha = np.sum((zr - mr) * np.conj(ds), axis=1) / np.sum(np.abs(ds) ** 2, axis=1)
    beta = mr[:, 0] - alpha * ms[:, 0]
    resid = np.max(np.abs(alpha[:, None] * zs + beta[:, None] - zr), axis=1)
    shift = alpha * pivot + beta - pivot
    ok = (np.abs(np.angle(alpha)) <= max_rotation_rad) & (np.abs(np.abs(alpha) - 1.0) <= max_scale_error)
    ok &= (np.abs(shift) <= max_shift) & (resid <= tolerance)  # a mirrored triangle cannot fit
    alpha, shift = alpha[ok], shift[ok]
    if len(alpha) == 0:
        return []
    # vote: transforms that agree to the tolerance (rotation and scale as displacements at the corners)
    feat = np.column_stack([np.angle(alpha) * radius, (np.abs(alpha) - 1.0) * radius, shift.real, shift.imag])
    ftree = cKDTree(feat)
    support = ftree.query_ball_point(feat, tolerance, return_length=True)
    out: list[tuple[Similarity, int]] = []
    taken = np.zeros(len(feat), bool)
    for c in np.argsort(-support, kind="stable"):
        if taken[c]:
            continue
        members = ftree.query_ball_point(feat[c], tolerance)
        taken[members] = True
        a = complex(np.mean(alpha[members]))
        s = complex(np.mean(shift[members]))
        out.append((Similarity(a, complex(pivot + s - a * pivot)), int(support[c])))
        if len(out) >= max_candidates:
            break
    return out
