"""Relative calibration: the MPI-decomposable normal equations shared by photometry and astrometry.

Both relative-calibration problems have the same block structure: every measurement
(one Source row of a ccdvisit ``k`` that belongs to a star ``s``) gives ``m`` equations
(1 for photometry, 2 for astrometry)

    y_i = A_c,i theta_k + A_s,i phi_s + noise,     weights w_i,

linear in ``p`` parameters of its ccdvisit (``theta_k``) and ``q`` parameters of its star
(``phi_s``).  The normal matrix is a sum over measurements, hence over ccdvisits:

    | N_cc  N_cs | |theta|   |b_c|        N_cc  block diagonal, (K, p, p)
    | N_sc  N_ss | | phi | = |b_s|        N_ss  block diagonal, (S, q, q)
                                         N_cs  one (p, q) block per (ccdvisit, star) pair

:class:`PartialNormals` holds these sums for ANY subset of ccdvisits (what one MPI rank
owns); ``+`` is the MPI reduction and :meth:`PartialNormals.to_arrays` /
:meth:`PartialNormals.from_arrays` turn it into one float64 buffer of a globally agreed
shape (fixed by :class:`NormalsLayout`: the global list of (ccdvisit, star) pairs, known
to every rank after matching).  :func:`schur_solve` eliminates the stars (their blocks are
independent given the ccdvisit parameters), solves the reduced ccdvisit system

    (N_cc - N_cs N_ss^-1 N_sc) theta = b_c - N_cs N_ss^-1 b_s

with a dense Cholesky or a sparse LU factorisation, and back-substitutes
``phi = N_ss^-1 (b_s - N_sc theta)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse import csgraph
from scipy.sparse.linalg import splu

from ..errors import AlgorithmError

AB_NJY_ZERO_POINT = 31.4  # AB magnitude of 1 nJy (as photocal)
MAS_PER_RAD = 180.0 / np.pi * 3.6e6
JULIAN_YEAR_DAYS = 365.25


# --------------------------------------------------------------------------- ccdvisits


@dataclass(frozen=True, eq=False)
class CcdVisits:
    """The global ccdvisit table (one row per visit x detector; row number = ccdvisit index).

    ``mjd`` is the mid-exposure TAI MJD, ``center_ra/center_dec`` (deg) the single-frame
    WCS position of the detector centre (tangent point of the astrometric correction),
    ``nx, ny`` the detector size (pixels), ``nJy_per_electron`` the single-frame
    calibration (``psfFlux = electrons * nJy_per_electron``).
    """

    ccdvisit_id: np.ndarray
    mjd: np.ndarray
    center_ra: np.ndarray
    center_dec: np.ndarray
    nx: np.ndarray
    ny: np.ndarray
    nJy_per_electron: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ccdvisit_id)
        for name in ("mjd", "center_ra", "center_dec", "nx", "ny", "nJy_per_electron"):
            value = np.broadcast_to(np.asarray(getattr(self, name), float if name not in ("nx", "ny") else np.int64),
                                    (n,)).copy()
            object.__setattr__(self, name, value)
        ids = np.asarray(self.ccdvisit_id, np.int64)
        if len(np.unique(ids)) != n:
            raise ValueError("ccdvisit ids must be unique")
        object.__setattr__(self, "ccdvisit_id", ids)

    def __len__(self) -> int:
        return len(self.ccdvisit_id)

    @property
    def zero_point(self) -> np.ndarray:
        """Single-frame zero points (AB mag of 1 electron, the photocal convention)."""
        return AB_NJY_ZERO_POINT - 2.5 * np.log10(self.nJy_per_electron)

    def index_of(self, ccdvisit_id) -> np.ndarray:
        """Ccdvisit index (row) of each id; raises KeyError for unknown ids."""
        order = np.argsort(self.ccdvisit_id)
        ids = np.asarray(ccdvisit_id, np.int64)
        pos = np.clip(np.searchsorted(self.ccdvisit_id[order], ids), 0, len(order) - 1)
        found = self.ccdvisit_id[order][pos] == ids
        if not np.all(found):
            raise KeyError(f"unknown ccdvisit ids: {ids[~found][:5].tolist()}")
        return order[pos]

    def pixel_normalisation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x0, y0, scale) per ccdvisit: polynomial variables are ``u = (x - x0) / scale`` in [-1, 1]."""
        x0, y0 = (self.nx - 1) / 2.0, (self.ny - 1) / 2.0
        return x0, y0, np.maximum(np.maximum(x0, y0), 1.0)


def poly_terms(order: int) -> list[tuple[int, int]]:
    """Exponents (p, q) of u^p v^q, total degree 0..order (the order of astrometry.py)."""
    return [(p, d - p) for d in range(order + 1) for p in range(d, -1, -1)]


def poly_basis(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """(n, n_terms) design of the polynomial of total order ``order`` in (u, v)."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    return np.stack([u**p * v**q for p, q in poly_terms(order)], axis=-1)


def normalised_pixels(ccdvisits: CcdVisits, k: np.ndarray, x, y) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, scale = ccdvisits.pixel_normalisation()
    return (np.asarray(x, float) - x0[k]) / scale[k], (np.asarray(y, float) - y0[k]) / scale[k]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, eq=False)
class PairIndex:
    """Global, sorted list of the distinct (ccdvisit, star) pairs that have a measurement.

    Every rank must hold the same one (it follows from the global matching), because the
    cross blocks of the normal matrix are stored in this order.
    """

    n_ccdvisits: int
    n_stars: int
    ccdvisit: np.ndarray
    star: np.ndarray

    @classmethod
    def from_measurements(cls, n_ccdvisits: int, n_stars: int, ccdvisit_index, star_index) -> "PairIndex":
        """Pairs of all measurements (rows with ``star_index < 0`` are ignored)."""
        k, s = np.asarray(ccdvisit_index, np.int64), np.asarray(star_index, np.int64)
        ok = s >= 0
        if np.any(k[ok] < 0) or np.any(k[ok] >= n_ccdvisits) or np.any(s[ok] >= n_stars):
            raise ValueError("ccdvisit or star index out of range")
        key = np.unique(k[ok] * n_stars + s[ok])
        return cls(int(n_ccdvisits), int(n_stars), key // max(n_stars, 1), key % max(n_stars, 1))

    def __len__(self) -> int:
        return len(self.ccdvisit)

    def lookup(self, ccdvisit_index, star_index) -> np.ndarray:
        """Pair number of each (ccdvisit, star); ValueError if a pair is not in the index."""
        key = self.ccdvisit * self.n_stars + self.star
        want = np.asarray(ccdvisit_index, np.int64) * self.n_stars + np.asarray(star_index, np.int64)
        pos = np.clip(np.searchsorted(key, want), 0, max(len(key) - 1, 0))
        if len(want) and (len(key) == 0 or np.any(key[pos] != want)):
            raise ValueError("a (ccdvisit, star) pair of the part is missing from the global PairIndex")
        return pos


@dataclass(frozen=True, eq=False)
class NormalsLayout:
    """Shapes of the normal equations: K ccdvisits x p parameters, S stars x q, P pairs."""

    pairs: PairIndex
    n_ccd_params: int
    n_star_params: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        K, S, P = self.pairs.n_ccdvisits, self.pairs.n_stars, len(self.pairs)
        p, q = self.n_ccd_params, self.n_star_params
        # order of the flat buffer: "shared" (star-indexed, reduced over ranks) first,
        # then "owned" (ccdvisit-indexed: non-zero on the rank that owns the ccdvisit only)
        return {
            "scalars": (2,),  # sum of w*y^2, number of equations
            "star_count": (S,),
            "star_matrix": (S, q, q),
            "star_vector": (S, q),
            "ccd_count": (K,),
            "ccd_matrix": (K, p, p),
            "ccd_vector": (K, p),
            "cross": (P, p, q),
        }

    def sections(self) -> dict[str, slice]:
        """Slice of each array in the flat buffer of :meth:`PartialNormals.to_arrays`."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def buffer_size(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def compatible(self, other: "NormalsLayout") -> bool:
        a, b = self.pairs, other.pairs
        return (self is other or (self.n_ccd_params == other.n_ccd_params and self.n_star_params == other.n_star_params
                                  and a.n_ccdvisits == b.n_ccdvisits and a.n_stars == b.n_stars
                                  and (a is b or (np.array_equal(a.ccdvisit, b.ccdvisit)
                                                  and np.array_equal(a.star, b.star)))))


# --------------------------------------------------------------------------- partial normals


@dataclass(frozen=True, eq=False)
class PartialNormals:
    """Normal-equation sums over a subset of measurements (see the module docstring).

    ``ccd_count``/``star_count``: number of used measurements per ccdvisit/star;
    ``sum_wyy``: sum of w y^2 (for chi2 = sum_wyy - 2 x.b + x.N.x); ``n_equations``.
    """

    layout: NormalsLayout = field(repr=False)
    ccd_matrix: np.ndarray = field(repr=False)
    ccd_vector: np.ndarray = field(repr=False)
    star_matrix: np.ndarray = field(repr=False)
    star_vector: np.ndarray = field(repr=False)
    cross: np.ndarray = field(repr=False)
    ccd_count: np.ndarray = field(repr=False)
    star_count: np.ndarray = field(repr=False)
    sum_wyy: float = 0.0
    n_equations: float = 0.0

    @classmethod
    def zeros(cls, layout: NormalsLayout) -> "PartialNormals":
        return cls.from_arrays(np.zeros(layout.buffer_size), layout)

    def __add__(self, other: "PartialNormals") -> "PartialNormals":
        if not isinstance(other, PartialNormals):
            return NotImplemented
        if not self.layout.compatible(other.layout):
            raise ValueError("cannot add PartialNormals of different layouts")
        return PartialNormals.from_arrays(self.to_arrays() + other.to_arrays(), self.layout)

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to_arrays(self) -> np.ndarray:
        """One contiguous float64 buffer (order and slices: ``layout.sections()``).

        Sum these buffers across ranks (``comm.Allreduce(MPI.IN_PLACE, buf)``) and
        rebuild with :meth:`from_arrays`.
        """
        parts = {
            "scalars": np.array([self.sum_wyy, self.n_equations]),
            "star_count": self.star_count, "star_matrix": self.star_matrix, "star_vector": self.star_vector,
            "ccd_count": self.ccd_count, "ccd_matrix": self.ccd_matrix, "ccd_vector": self.ccd_vector,
            "cross": self.cross,
        }  # fmt: skip
        buf = np.empty(self.layout.buffer_size, np.float64)
        for name, sl in self.layout.sections().items():
            buf[sl] = np.asarray(parts[name], np.float64).ravel()
        return buf

    @classmethod
    def from_arrays(cls, buffer: np.ndarray, layout: NormalsLayout) -> "PartialNormals":
        """Inverse of :meth:`to_arrays` (views into ``buffer``, which must have ``layout.buffer_size``)."""
        buf = np.asarray(buffer, np.float64)
        if buf.shape != (layout.buffer_size,):
            raise ValueError(f"buffer of shape {buf.shape}, layout wants ({layout.buffer_size},)")
        shapes, sl = layout.shapes, layout.sections()
        arr = {name: buf[sl[name]].reshape(shape) for name, shape in shapes.items()}
        return cls(layout, arr["ccd_matrix"], arr["ccd_vector"], arr["star_matrix"], arr["star_vector"],
                   arr["cross"], arr["ccd_count"], arr["star_count"], float(arr["scalars"][0]),
                   float(arr["scalars"][1]))

    @property
    def n_measurements(self) -> int:
        return int(round(float(np.sum(self.ccd_count))))


def accumulate_normals(
    layout: NormalsLayout,
    ccdvisit_index: np.ndarray,
    star_index: np.ndarray,
    pair_index: np.ndarray,
    ccd_design: np.ndarray,
    star_design: np.ndarray,
    weight: np.ndarray,
    y: np.ndarray,
    used: np.ndarray,
) -> PartialNormals:
    """Sums of one part's measurements; rows must be sorted by ``pair_index`` (hence by ccdvisit).

    ``ccd_design`` (n, m, p), ``star_design`` (n, m, q), ``weight`` and ``y`` (n, m): the
    ``m`` equations of each measurement; ``used`` (n,) False for clipped rows.
    """
    K, S = layout.pairs.n_ccdvisits, layout.pairs.n_stars
    p, q = layout.n_ccd_params, layout.n_star_params
    sel = np.flatnonzero(np.asarray(used, bool))
    k, s, pr = ccdvisit_index[sel], star_index[sel], pair_index[sel]
    Ac, As, w, yy = ccd_design[sel], star_design[sel], weight[sel], y[sel]
    out = {
        "ccd_matrix": np.zeros((K, p, p)), "ccd_vector": np.zeros((K, p)), "star_matrix": np.zeros((S, q, q)),
        "star_vector": np.zeros((S, q)), "cross": np.zeros((len(layout.pairs), p, q)),
    }  # fmt: skip
    ccd_count = np.bincount(k, minlength=K).astype(float)
    star_count = np.bincount(s, minlength=S).astype(float)
    if len(sel):
        if np.any(np.diff(pr) < 0):
            raise ValueError("part rows must be sorted by pair index")
        wy = w * yy
        Acw, Asw = Ac * w[:, :, None], As * w[:, :, None]
        # star blocks: q*q weighted bincounts
        star_outer = np.matmul(Asw.transpose(0, 2, 1), As)
        star_vec = np.sum(As * wy[:, :, None], axis=1)
        for i in range(q):
            out["star_vector"][:, i] = np.bincount(s, star_vec[:, i], minlength=S)
            for j in range(i, q):
                out["star_matrix"][:, i, j] = np.bincount(s, star_outer[:, i, j], minlength=S)
                out["star_matrix"][:, j, i] = out["star_matrix"][:, i, j]
        # cross blocks: one per pair (rows sorted by pair; usually one row per pair)
        cross = np.matmul(Acw.transpose(0, 2, 1), As)
        starts = np.flatnonzero(np.r_[True, np.diff(pr) != 0])
        out["cross"][pr[starts]] = cross if len(starts) == len(pr) else np.add.reduceat(cross, starts, axis=0)
        # ccdvisit blocks: one BLAS product per ccdvisit (bounded memory for large p)
        ccd_vec = np.sum(Ac * wy[:, :, None], axis=1)
        kstarts = np.flatnonzero(np.r_[True, np.diff(k) != 0])
        out["ccd_vector"][k[kstarts]] = np.add.reduceat(ccd_vec, kstarts, axis=0)
        bounds = np.r_[kstarts, len(k)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out["ccd_matrix"][k[a]] = Ac[a:b].reshape(-1, p).T @ Acw[a:b].reshape(-1, p)
        sum_wyy = float(np.sum(wy * yy))
    else:
        sum_wyy = 0.0
    return PartialNormals(layout, out["ccd_matrix"], out["ccd_vector"], out["star_matrix"], out["star_vector"],
                          out["cross"], ccd_count, star_count, sum_wyy, float(len(sel) * y.shape[1]))


# --------------------------------------------------------------------------- residual statistics


@dataclass(frozen=True)
class ResidualStats:
    """Statistics of one residual/clipping pass over a part; ``+`` is the MPI reduction.

    ``n_rows``: rows of the part; ``n_used``/``sum_sq``/``chi2``: rows used by the solution
    just evaluated, the sum of their squared residuals (mag^2 or mas^2, both coordinates)
    and of their squared normalised residuals (the exact chi2; the one from the normal
    equations loses ~1e-9 to cancellation); ``n_clipped``: rows flagged by the new
    clipping; ``n_changed``: rows whose flag changed (0 everywhere = converged).
    """

    n_rows: int = 0
    n_used: int = 0
    n_clipped: int = 0
    n_changed: int = 0
    sum_sq: float = 0.0
    chi2: float = 0.0

    def __add__(self, other: "ResidualStats") -> "ResidualStats":
        return ResidualStats.from_array(self.to_array() + other.to_array())

    def to_array(self) -> np.ndarray:
        """Six float64 values (sum them across ranks)."""
        return np.array([self.n_rows, self.n_used, self.n_clipped, self.n_changed, self.sum_sq, self.chi2], np.float64)

    @classmethod
    def from_array(cls, a) -> "ResidualStats":
        a = np.asarray(a, np.float64)
        return cls(*(int(round(v)) for v in a[:4]), float(a[4]), float(a[5]))

    @property
    def rms(self) -> float:
        """Rms residual of the used rows (mag, or mas for both coordinates together)."""
        return float(np.sqrt(self.sum_sq / self.n_used)) if self.n_used else float("nan")


# --------------------------------------------------------------------------- Schur-complement solve


@dataclass(frozen=True, eq=False)
class SchurResult:
    ccd_params: np.ndarray  # (K, p)
    star_params: np.ndarray  # (S, q), 0 for stars without information
    star_cov: np.ndarray  # (S, q, q) conditional on the ccdvisit parameters
    ccd_cov: np.ndarray | None  # (K, p, p) marginal, if asked for
    chi2_data: float
    star_has_info: np.ndarray  # (S,) bool
    ccd_tied: np.ndarray  # (K,) bool: connected to a star with a prior
    method: str


def schur_solve(
    normals: PartialNormals,
    ccd_prior_info: np.ndarray,
    star_prior_matrix: np.ndarray,
    star_prior_vector: np.ndarray,
    star_anchor: np.ndarray,
    method: str = "auto",
    dense_max: int = 3000,
    ccd_cov: bool = False,
) -> SchurResult:
    """Solve the normal equations plus priors by eliminating the stars.

    ``ccd_prior_info`` (K, p): diagonal Gaussian priors (information, about 0) on the
    ccdvisit parameters; ``star_prior_matrix`` (S, q, q) / ``star_prior_vector`` (S, q):
    information and information-weighted mean of the star priors; ``star_anchor`` (S,)
    marks the priors that fix the gauge (reference stars), for ``ccd_tied``.
    ``method``: "dense" (Cholesky), "sparse" (SuperLU) or "auto" (dense up to
    ``dense_max`` unknowns).  ``ccd_cov``: also return the (p, p) diagonal blocks of the
    inverse reduced matrix (the marginal covariance of each ccdvisit's parameters).
    """
    L = normals.layout
    K, S = L.pairs.n_ccdvisits, L.pairs.n_stars
    p, q = L.n_ccd_params, L.n_star_params
    pk, ps = L.pairs.ccdvisit, L.pairs.star

    Nss = normals.star_matrix + star_prior_matrix
    bs = normals.star_vector + star_prior_vector
    # a star without used measurements does not couple to any ccdvisit: left out (NaN outputs)
    has_info = normals.star_count > 0
    Nss[~has_info] = np.eye(q)
    try:
        Ninv = np.linalg.inv(Nss)
    except np.linalg.LinAlgError:
        Ninv = np.linalg.pinv(Nss, hermitian=True)  # a degenerate star: minimum-norm parameters
    Ninv = 0.5 * (Ninv + np.swapaxes(Ninv, 1, 2))
    Ninv[~has_info] = 0.0

    # W = N_cs N_ss^-1, one (p, q) block per pair
    W = np.matmul(normals.cross, Ninv[ps])
    indptr = np.r_[0, np.cumsum(np.bincount(pk, minlength=K))]
    Wm = sp.bsr_array((W, ps, indptr), shape=(K * p, S * q)).tocsr()
    del W
    rhs = normals.ccd_vector.ravel() - Wm @ bs.ravel()
    NcsT = sp.bsr_array((normals.cross, ps, indptr), shape=(K * p, S * q)).T.tocsr()
    M = Wm @ NcsT  # (K p, K p): sum over the stars s shared by k and k' of W_ks N_sk'
    del Wm, NcsT
    M = M.tocsr()
    M.data *= -1.0
    diag_blocks = normals.ccd_matrix.copy()
    idx = np.arange(p)
    diag_blocks[:, idx, idx] += ccd_prior_info
    M = M + sp.bsr_array((diag_blocks, np.arange(K), np.arange(K + 1)), shape=(K * p, K * p)).tocsr()
    # M is symmetric to rounding; the dense path reads its lower triangle, SuperLU runs in symmetric mode

    n = K * p
    use_dense = method == "dense" or (method == "auto" and n <= dense_max)
    cov_blocks = None
    if use_dense:
        Md = M.toarray()
        try:
            cf = scipy.linalg.cho_factor(Md, lower=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise AlgorithmError("reduced ccdvisit system is not positive definite", n_unknowns=n) from exc
        theta = scipy.linalg.cho_solve(cf, rhs, check_finite=False)
        if ccd_cov:
            inv, info = scipy.linalg.lapack.dpotri(cf[0], lower=True)  # inverse from the Cholesky factor
            if info != 0:
                raise AlgorithmError("cannot invert the reduced ccdvisit system", n_unknowns=n, lapack_info=int(info))
            r = np.arange(K)[:, None, None] * p
            low = np.tril(np.ones((p, p), bool))  # dpotri fills the lower triangle only
            cov_blocks = np.where(low, inv[r + idx[None, :, None], r + idx[None, None, :]], 0.0)
            cov_blocks = cov_blocks + np.tril(cov_blocks, -1).transpose(0, 2, 1)
        used_method = "dense-cholesky"
    else:
        try:
            lu = splu(M.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                      options={"SymmetricMode": True})
        except RuntimeError as exc:
            raise AlgorithmError("reduced ccdvisit system is singular", n_unknowns=n) from exc
        theta = lu.solve(rhs)
        if not np.all(np.isfinite(theta)):
            raise AlgorithmError("reduced ccdvisit system is singular", n_unknowns=n)
        if ccd_cov:
            cov_blocks = np.empty((K, p, p))
            chunk = max(p, (2048 // p) * p)
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                E = np.zeros((n, c1 - c0))
                E[np.arange(c0, c1), np.arange(c1 - c0)] = 1.0
                X = lu.solve(E)
                for kk in range(c0 // p, c1 // p):
                    cov_blocks[kk] = X[kk * p:(kk + 1) * p, kk * p - c0:(kk + 1) * p - c0]
        used_method = "sparse-lu"
    theta_c = theta.reshape(K, p)

    # back-substitution: phi = N_ss^-1 (b_s - N_sc theta)
    nsc_theta = np.einsum("pij,pi->pj", normals.cross, theta_c[pk])
    t = np.zeros((S, q))
    for j in range(q):
        t[:, j] = np.bincount(ps, nsc_theta[:, j], minlength=S)
    phi = np.einsum("sij,sj->si", Ninv, bs - t)

    # chi2 of the data terms: sum w y^2 - 2 x.b + x.N.x (priors excluded)
    xb = float(np.sum(theta_c * normals.ccd_vector) + np.sum(phi * normals.star_vector))
    xNx = float(np.einsum("ki,kij,kj->", theta_c, normals.ccd_matrix, theta_c)
                + 2.0 * np.einsum("pi,pij,pj->", theta_c[pk], normals.cross, phi[ps])
                + np.einsum("si,sij,sj->", phi, normals.star_matrix, phi))
    chi2 = max(normals.sum_wyy - 2.0 * xb + xNx, 0.0)

    # which ccdvisits are connected (through shared stars) to a gauge-fixing prior
    live = np.any(normals.cross != 0, axis=(1, 2))
    graph = sp.coo_array((np.ones(int(live.sum())), (pk[live], K + ps[live])), shape=(K + S, K + S))
    _, labels = csgraph.connected_components(graph, directed=False)
    anchored = np.zeros(labels.max() + 1 if len(labels) else 0, bool)
    anchored[labels[K:][np.asarray(star_anchor, bool) & has_info]] = True
    return SchurResult(theta_c, phi, Ninv, cov_blocks, chi2, has_info, anchored[labels[:K]], used_method)


class ThinCcdVisits(AlgorithmError):
    """Some ccdvisits hold too few usable stars to be calibrated: ``ccdvisit_ids`` (all of them) and
    ``reason``.  The stage sets them aside and solves again without them."""

    def __init__(self, ccdvisit_ids, reason: str) -> None:
        ids = [int(i) for i in np.asarray(ccdvisit_ids).ravel()]
        super().__init__(f"{len(ids)} ccdvisit(s) have {reason}", n_ccdvisits_bad=len(ids), ccdvisit_ids=ids[:20])
        self.ccdvisit_ids = ids
        self.reason = reason


def check_ccdvisit_counts(normals: PartialNormals, ccdvisit_id: np.ndarray, min_stars: int, what: str) -> None:
    """ThinCcdVisits (an AlgorithmError) if some ccdvisit has fewer than ``min_stars`` used measurements."""
    count = np.rint(normals.ccd_count).astype(np.int64)
    bad = np.flatnonzero(count < min_stars)
    if len(bad):
        err = ThinCcdVisits(np.asarray(ccdvisit_id)[bad],
                            f"fewer than {min_stars} usable stars for the {what} relative calibration")
        err.metadata.update(n_stars=int(count[bad].min()), min_stars=int(min_stars))
        raise err
