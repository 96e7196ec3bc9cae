"""Relative photometric calibration: one zero-point offset per ccdvisit, one magnitude per star.

Model, for the measurement of star ``s`` in ccdvisit ``k`` at normalised detector
position ``(u, v)``::

    m_sf(s, k) + sum_t c_{k,t} u^a_t v^b_t = m_s            weight 1 / (sigma^2 + floor^2)
    m_s = m_ref(s)                                          weight 1 / sigma_ref^2   (reference stars)

with ``m_sf = 31.4 - 2.5 log10(psfFlux[nJy]) = m_inst + ZP_sf`` the single-frame calibrated
magnitude (``m_inst = -2.5 log10(electrons)``).  The constant term ``c_k0`` is the offset
``delta_k`` of the zero point: the corrected zero point (photocal convention, AB mag of one
electron) is ``ZP_k = ZP_sf,k + delta_k``.  ``order = 0`` (default) fits only ``delta_k``;
a higher order adds a per-ccdvisit polynomial (detector/illumination term).  A weak prior
``delta ~ N(0, zp_prior_mag^2)`` keeps ccdvisits that are not connected to a reference star
solvable (their absolute level is then the single-frame one, see ``ccdvisit_tied_to_reference``).

Colour term (optional, ``star_ref_colour`` given): the reference prior becomes
``m_s + k (c_s - c0) = m_ref(s)``, one ``k`` per fit (per band), ``c_s`` the reference colour
(e.g. Gaia BP-RP) and ``c0`` the pivot, with a prior ``k ~ N(0, colour_term_prior_sigma^2)``.
``k`` is global, so it is not put into the block system: for a fixed ``k`` the solution is
linear in ``k`` (``x(k) = x(0) + k dx``), ``dx`` comes from a second solve with the reference
magnitudes shifted by ``-(c - c0)``, ``k`` then has a closed form, and the final solve is made at
that ``k`` (three solves instead of one; the marginal zero-point errors add ``dtheta^2 var(k)``).
Star magnitudes and zero points are then in the instrument's natural system, equal to the
reference system at the pivot colour.

Serial use: :func:`make_photometric_part` on all measurements, then :func:`fit_photometry`.
MPI use (docs/algorithms-relcal.md): each rank builds the part of its ccdvisits, then loops
``accumulate_photometric_normal_equations`` -> Allreduce of ``to_arrays()`` ->
:func:`solve_photometric` -> :func:`clip_photometric_part` -> Allreduce of the
:class:`~lsst_prod.algorithms.relcal_normals.ResidualStats`, exactly as :func:`fit_photometry`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .relcal_normals import (
    AB_NJY_ZERO_POINT,
    CcdVisits,
    NormalsLayout,
    PairIndex,
    PartialNormals,
    ResidualStats,
    accumulate_normals,
    check_ccdvisit_counts,
    normalised_pixels,
    poly_basis,
    poly_terms,
    schur_solve,
)

MAG_PER_FRAC = 2.5 / np.log(10.0)


@dataclass(frozen=True, eq=False)
class PhotometricPart:
    """Photometric measurements of a subset of ccdvisits (what one MPI rank owns).

    Rows are sorted by (ccdvisit, star); ``row`` is each row's index in the arrays given
    to :func:`make_photometric_part` (``n_input`` long); ``used`` is False for clipped rows.
    ``mag`` is the single-frame calibrated magnitude, ``mag_err`` includes the floor,
    ``basis`` the polynomial terms at the source position.
    """

    layout: NormalsLayout = field(repr=False)
    order: int
    ccdvisit_index: np.ndarray = field(repr=False)
    star_index: np.ndarray = field(repr=False)
    pair_index: np.ndarray = field(repr=False)
    mag: np.ndarray = field(repr=False)
    mag_err: np.ndarray = field(repr=False)
    basis: np.ndarray = field(repr=False)
    used: np.ndarray = field(repr=False)
    row: np.ndarray = field(repr=False)
    n_input: int = 0

    @property
    def n_measurements(self) -> int:
        return len(self.row)


def make_photometric_part(
    ccdvisits: CcdVisits,
    pairs: PairIndex,
    ccdvisit_index: np.ndarray,
    star_index: np.ndarray,
    psf_flux: np.ndarray,
    psf_flux_err: np.ndarray,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    order: int = 0,
    error_floor_mag: float = 0.002,
) -> PhotometricPart:
    """Measurements (Source rows) of some ccdvisits -> :class:`PhotometricPart`.

    ``psf_flux``/``psf_flux_err`` in nJy with the single-frame calibration of each
    ccdvisit; ``star_index`` from :func:`~lsst_prod.algorithms.relcal_match.match_sources`
    (rows with -1 or a non-positive flux are left out); ``x, y`` (pixels) only for
    ``order > 0``.  ``pairs`` is the global pair list (identical on every rank).
    """
    k = np.asarray(ccdvisit_index, np.int64)
    s = np.asarray(star_index, np.int64)
    f, fe = np.asarray(psf_flux, float), np.asarray(psf_flux_err, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (s >= 0) & np.isfinite(f) & np.isfinite(fe) & (f > 0) & (fe > 0)
    if order > 0:
        if x is None or y is None:
            raise ValueError("order > 0 needs the pixel positions x, y")
        ok &= np.isfinite(np.asarray(x, float)) & np.isfinite(np.asarray(y, float))
    rows = np.flatnonzero(ok)
    rows = rows[np.lexsort((s[rows], k[rows]))]
    kk, ss = k[rows], s[rows]
    mag = AB_NJY_ZERO_POINT - 2.5 * np.log10(f[rows])
    err = np.hypot(MAG_PER_FRAC * fe[rows] / f[rows], error_floor_mag)
    if order > 0:
        u, v = normalised_pixels(ccdvisits, kk, np.asarray(x, float)[rows], np.asarray(y, float)[rows])
        basis = poly_basis(u, v, order)
    else:
        basis = np.ones((len(rows), 1))
    layout = NormalsLayout(pairs, len(poly_terms(order)), 1)
    return PhotometricPart(layout, int(order), kk, ss, pairs.lookup(kk, ss), mag, err, basis,
                           np.ones(len(rows), bool), rows, int(len(k)))


def accumulate_photometric_normal_equations(part: PhotometricPart) -> PartialNormals:
    """Normal-equation sums of the part's used measurements (any subset of ccdvisits)."""
    n = part.n_measurements
    return accumulate_normals(
        part.layout, part.ccdvisit_index, part.star_index, part.pair_index,
        ccd_design=-part.basis[:, None, :], star_design=np.ones((n, 1, 1)),
        weight=(1.0 / part.mag_err**2)[:, None], y=part.mag[:, None], used=part.used,
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class PhotometricSolution:
    """Result of :func:`solve_photometric` / :func:`fit_photometry`.

    Per ccdvisit (index order of :class:`CcdVisits`): ``zero_point`` (corrected, AB mag of
    one electron at the detector centre), ``zero_point_offset`` (= zero_point minus the
    single-frame one), ``zero_point_err`` (marginal, mag; NaN if not computed),
    ``zp_coeffs`` (K, n_terms) polynomial in normalised detector coordinates (column 0 =
    offset), ``ccdvisit_n_stars`` (used measurements), ``ccdvisit_tied_to_reference``.
    Per star: ``star_mag`` (AB; NaN without used measurements), ``star_mag_err``
    (conditional on the zero points), ``star_n_measurements``.  Scalars: ``chi2``
    (measurements; from the normal equations, replaced by the exact sum of the residual
    pass in :meth:`with_residuals`), ``chi2_reference`` (reference priors), ``dof``, ``n_stars`` (with used
    measurements), ``n_reference_stars`` (priors used), ``n_measurements`` (used),
    ``n_clipped``, ``rms_mmag`` (unweighted rms of the used residuals; NaN from the bare
    solve, filled by the residual pass), ``n_iterations``, ``clipped`` (bool per input row
    of the parts, in part order, or None), ``method``.
    """

    order: int
    ccdvisit_id: np.ndarray = field(repr=False)
    zero_point: np.ndarray = field(repr=False)
    zero_point_offset: np.ndarray = field(repr=False)
    zero_point_err: np.ndarray = field(repr=False)
    zp_coeffs: np.ndarray = field(repr=False)
    ccdvisit_n_stars: np.ndarray = field(repr=False)
    ccdvisit_tied_to_reference: np.ndarray = field(repr=False)
    star_mag: np.ndarray = field(repr=False)
    star_mag_err: np.ndarray = field(repr=False)
    star_n_measurements: np.ndarray = field(repr=False)
    pixel_x0: np.ndarray = field(repr=False)
    pixel_y0: np.ndarray = field(repr=False)
    pixel_scale: np.ndarray = field(repr=False)
    chi2: float
    chi2_reference: float
    dof: int
    n_stars: int
    n_reference_stars: int
    n_measurements: int
    n_clipped: int = 0
    rms_mmag: float = float("nan")
    n_iterations: int = 1
    clipped: np.ndarray | None = field(default=None, repr=False)
    method: str = ""
    colour_term: float = 0.0
    colour_term_err: float = float("nan")
    colour_pivot: float = float("nan")

    @property
    def nJy_per_electron(self) -> np.ndarray:
        return 10.0 ** (-0.4 * (self.zero_point - AB_NJY_ZERO_POINT))

    @property
    def reduced_chi2(self) -> float:
        return (self.chi2 + self.chi2_reference) / max(self.dof, 1)

    def with_residuals(self, stats: ResidualStats, n_iterations: int, clipped: np.ndarray | None = None):
        """This solution with the figures of the residual pass over the rows it used (summed
        over all parts/ranks): exact ``chi2``, ``rms_mmag``, ``n_clipped``, ``n_iterations``."""
        return dataclasses.replace(self, chi2=stats.chi2, rms_mmag=1e3 * stats.rms, n_iterations=int(n_iterations),
                                   n_clipped=stats.n_rows - stats.n_used, clipped=clipped)

    def zero_point_at(self, ccdvisit_index, x, y) -> np.ndarray:
        """Corrected zero point at pixel (x, y) of ccdvisit(s) ``ccdvisit_index``."""
        k = np.asarray(ccdvisit_index, np.int64)
        u = (np.asarray(x, float) - self.pixel_x0[k]) / self.pixel_scale[k]
        v = (np.asarray(y, float) - self.pixel_y0[k]) / self.pixel_scale[k]
        base = self.zero_point[k] - self.zero_point_offset[k]
        return base + np.sum(poly_basis(u, v, self.order) * self.zp_coeffs[k], axis=-1)

    def to_dict(self) -> dict[str, float | int]:
        """Scalars for provenance."""
        return {"chi2": self.chi2, "chi2_reference": self.chi2_reference, "dof": self.dof, "n_stars": self.n_stars,
                "n_reference_stars": self.n_reference_stars, "n_measurements": self.n_measurements,
                "n_clipped": self.n_clipped, "rms_mmag": self.rms_mmag, "n_iterations": self.n_iterations,
                "n_ccdvisits": int(len(self.zero_point)),
                "n_ccdvisits_untied": int(np.sum(~self.ccdvisit_tied_to_reference)),
                "colour_term": self.colour_term, "colour_term_err": self.colour_term_err,
                "colour_pivot": self.colour_pivot}


def solve_photometric(
    normals: PartialNormals,
    ccdvisits: CcdVisits,
    star_ref_mag: np.ndarray | None = None,
    star_ref_mag_err: np.ndarray | None = None,
    *,
    star_ref_colour: np.ndarray | None = None,
    colour_pivot: float = 1.0,
    colour_term_prior_sigma: float = 0.1,
    zp_prior_mag: float = 1.0,
    min_stars_per_ccdvisit: int = 5,
    method: str = "auto",
    compute_errors: bool = True,
) -> PhotometricSolution:
    """Solve the (reduced) normal equations for the zero points and star magnitudes.

    ``star_ref_mag``/``star_ref_mag_err`` (S,): reference AB magnitude of each star and its
    error (NaN = no reference; see :func:`reference_magnitudes`).  ``star_ref_colour`` (S,):
    reference colour per star (NaN: the star's reference prior is dropped): fits one colour
    term ``k`` with ``m_s + k (c - colour_pivot) = m_ref`` and the prior
    ``k ~ N(0, colour_term_prior_sigma^2)``.  Raises
    :class:`~lsst_prod.errors.AlgorithmError` (metadata ``n_stars``, ``ccdvisit_ids``) if a
    ccdvisit has fewer than ``min_stars_per_ccdvisit`` used measurements.
    """
    L = normals.layout
    K, S, p = L.pairs.n_ccdvisits, L.pairs.n_stars, L.n_ccd_params
    order = int(round((np.sqrt(8 * p + 1) - 3) / 2))
    if K != len(ccdvisits):
        raise ValueError(f"normals have {K} ccdvisits, the table {len(ccdvisits)}")
    check_ccdvisit_counts(normals, ccdvisits.ccdvisit_id, max(min_stars_per_ccdvisit, p), "photometric")
    ref_mag, ref_info = _reference_info(star_ref_mag, star_ref_mag_err, S)
    x = None
    if star_ref_colour is not None:
        col = np.asarray(star_ref_colour, float)
        if col.shape != (S,):
            raise ValueError(f"star_ref_colour must have shape ({S},)")
        ref_info = np.where(np.isfinite(col), ref_info, 0.0)
        x = np.where(np.isfinite(col), col - colour_pivot, 0.0)

    def solve(shift: np.ndarray | float, errors: bool):
        m = ref_mag - shift
        return schur_solve(
            normals, ccd_prior_info=np.full((K, p), 1.0 / zp_prior_mag**2),
            star_prior_matrix=ref_info[:, None, None], star_prior_vector=(ref_info * m)[:, None],
            star_anchor=ref_info > 0, method=method, ccd_cov=errors,
        )  # fmt: skip

    k, var_k, dtheta = 0.0, 0.0, None
    if x is None:
        res = solve(0.0, compute_errors)
    else:
        # x(k) = x(0) + k dx is the solution with reference magnitudes m_ref - k (c - c0)
        r0, r1 = solve(0.0, False), solve(x, False)
        dphi = r1.star_params[:, 0] - r0.star_params[:, 0]
        dtheta = r1.ccd_params[:, 0] - r0.ccd_params[:, 0]
        k_info = 1.0 / colour_term_prior_sigma**2 if colour_term_prior_sigma > 0 else 0.0
        # d chi2/dk = 0: sum info x (phi0 + k dphi + k x - m_ref) + k k_info = 0 (observed stars only:
        # a star without used measurements is left out of the solve)
        w = np.where(normals.star_count > 0, ref_info, 0.0)
        h = float(np.sum(w * x * (x + dphi))) + k_info
        if h > 0:
            k = float(np.sum(w * x * (ref_mag - r0.star_params[:, 0]))) / h
            var_k = 1.0 / h
        res = solve(k * x, compute_errors)
    observed = normals.star_count > 0
    star_mag = np.where(observed, res.star_params[:, 0], np.nan)
    star_err = np.where(observed, np.sqrt(res.star_cov[:, 0, 0]), np.nan)
    has_ref = (ref_info > 0) & observed
    m_ref_eff = ref_mag - (k * x if x is not None else 0.0)
    chi2_ref = float(np.sum(ref_info[has_ref] * (star_mag[has_ref] - m_ref_eff[has_ref]) ** 2))
    n_meas = normals.n_measurements
    dof = int(n_meas + has_ref.sum() - K * p - observed.sum() - (1 if x is not None else 0))
    offset = res.ccd_params[:, 0]
    if res.ccd_cov is not None:
        zp_var = res.ccd_cov[:, 0, 0] + (dtheta**2 * var_k if dtheta is not None else 0.0)
        zp_err = np.sqrt(zp_var)
    else:
        zp_err = np.full(K, np.nan)
    x0, y0, scale = ccdvisits.pixel_normalisation()
    return PhotometricSolution(
        order=order, ccdvisit_id=ccdvisits.ccdvisit_id.copy(), zero_point=ccdvisits.zero_point + offset,
        zero_point_offset=offset, zero_point_err=zp_err, zp_coeffs=res.ccd_params,
        ccdvisit_n_stars=np.rint(normals.ccd_count).astype(np.int64), ccdvisit_tied_to_reference=res.ccd_tied,
        star_mag=star_mag, star_mag_err=star_err, star_n_measurements=np.rint(normals.star_count).astype(np.int64),
        pixel_x0=x0, pixel_y0=y0, pixel_scale=scale, chi2=float(res.chi2_data), chi2_reference=chi2_ref, dof=dof,
        n_stars=int(observed.sum()), n_reference_stars=int(has_ref.sum()), n_measurements=n_meas, method=res.method,
        colour_term=float(k), colour_term_err=float(np.sqrt(var_k)) if x is not None and var_k > 0 else float("nan"),
        colour_pivot=float(colour_pivot) if x is not None else float("nan"),
    )  # fmt: skip


def _reference_info(mag, err, n_stars: int) -> tuple[np.ndarray, np.ndarray]:
    if mag is None and err is None:
        return np.zeros(n_stars), np.zeros(n_stars)
    if mag is None or err is None:
        raise ValueError("give both star_ref_mag and star_ref_mag_err, or neither")
    mag, err = np.asarray(mag, float), np.asarray(err, float)
    if mag.shape != (n_stars,) or err.shape != (n_stars,):
        raise ValueError(f"reference magnitudes must have shape ({n_stars},)")
    ok = np.isfinite(mag) & np.isfinite(err) & (err > 0)
    return np.where(ok, mag, 0.0), np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)


def reference_magnitudes(
    star_ref_index: np.ndarray,
    ref_flux: np.ndarray,
    ref_flux_err: np.ndarray,
    usable: np.ndarray | None = None,
    error_floor_mag: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-star reference AB magnitude and error from ``{band}_flux/_fluxErr`` (nJy).

    NaN for stars without a reference star, a non-positive flux, or ``usable`` False
    (e.g. ``~phot_variable_flag``) for their reference row.
    """
    r = np.asarray(star_ref_index, np.int64)
    f, fe = np.asarray(ref_flux, float), np.asarray(ref_flux_err, float)
    mag, err = np.full(len(r), np.nan), np.full(len(r), np.nan)
    has = r >= 0
    rr = r[has]
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (f[rr] > 0) & (fe[rr] > 0) & np.isfinite(f[rr]) & np.isfinite(fe[rr])
        if usable is not None:
            ok &= np.asarray(usable, bool)[rr]
        m = AB_NJY_ZERO_POINT - 2.5 * np.log10(f[rr])
        e = np.hypot(MAG_PER_FRAC * fe[rr] / f[rr], error_floor_mag)
    idx = np.flatnonzero(has)[ok]
    mag[idx], err[idx] = m[ok], e[ok]
    return mag, err


def reference_colours(star_ref_index: np.ndarray, ref_colour: np.ndarray,
                      usable: np.ndarray | None = None) -> np.ndarray:
    """Per-star reference colour (e.g. the refcat's ``bp_rp``); NaN without a (usable) reference row."""
    r = np.asarray(star_ref_index, np.int64)
    c = np.asarray(ref_colour, float)
    out = np.full(len(r), np.nan)
    has = r >= 0
    vals = c[r[has]]
    if usable is not None:
        vals = np.where(np.asarray(usable, bool)[r[has]], vals, np.nan)
    out[has] = vals
    return out


def photometric_residuals(part: PhotometricPart, solution: PhotometricSolution) -> np.ndarray:
    """Residual (mag) of every row of the part: m_sf + ZP correction - m_star."""
    corr = np.sum(part.basis * solution.zp_coeffs[part.ccdvisit_index], axis=1)
    return part.mag + corr - solution.star_mag[part.star_index]


def clip_photometric_part(
    part: PhotometricPart, solution: PhotometricSolution, nsigma: float = 4.0
) -> tuple[PhotometricPart, ResidualStats]:
    """New ``used`` flags: |residual| <= nsigma * max(1, sqrt(chi2/dof)) * mag_err.

    Every row is re-tested (a row clipped earlier comes back if it now fits).  The
    statistics refer to the rows used by ``solution``.
    """
    r = photometric_residuals(part, solution)
    scale = max(1.0, float(np.sqrt(solution.reduced_chi2)))
    with np.errstate(invalid="ignore"):
        new_used = np.abs(r) <= nsigma * scale * part.mag_err
    ru = r[part.used]
    stats = ResidualStats(part.n_measurements, int(part.used.sum()), int((~new_used).sum()),
                          int((new_used != part.used).sum()), float(np.sum(ru**2)),
                          float(np.sum((ru / part.mag_err[part.used]) ** 2)))
    return dataclasses.replace(part, used=new_used), stats


def clip_photometric_references(
    solution: PhotometricSolution, star_ref_mag: np.ndarray, star_ref_mag_err: np.ndarray, nsigma: float = 4.0,
    star_ref_colour: np.ndarray | None = None,
) -> np.ndarray:
    """Reference errors with outliers (|m_star + k (c - c0) - m_ref| > nsigma * sigma) set to NaN.

    Deterministic given the solution, so every MPI rank computes the same result.
    """
    mag, err = np.asarray(star_ref_mag, float), np.asarray(star_ref_mag_err, float)
    if star_ref_colour is not None and np.isfinite(solution.colour_pivot):
        mag = mag - solution.colour_term * (np.asarray(star_ref_colour, float) - solution.colour_pivot)
    scale = max(1.0, float(np.sqrt(solution.reduced_chi2)))
    sig = np.hypot(err, np.nan_to_num(solution.star_mag_err))
    with np.errstate(invalid="ignore"):
        bad = np.abs(solution.star_mag - mag) > nsigma * scale * sig
    return np.where(bad, np.nan, err)


def fit_photometry(
    parts: PhotometricPart | Sequence[PhotometricPart],
    ccdvisits: CcdVisits,
    star_ref_mag: np.ndarray | None = None,
    star_ref_mag_err: np.ndarray | None = None,
    *,
    nsigma: float = 4.0,
    max_iter: int = 10,
    clip_references: bool = True,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
    **solve_kwargs,
) -> PhotometricSolution:
    """Iterate accumulate (over the parts, as MPI ranks would) / solve / clip until no flag changes.

    Under MPI each rank passes its own parts and ``allreduce`` (a function summing a float64
    buffer over all ranks, e.g. ``lambda b: comm.allreduce(b)`` or an in-place ``Allreduce``):
    every rank then holds the same normal equations and computes the same solution.

    ``solve_kwargs`` go to :func:`solve_photometric`; the zero-point errors
    (``compute_errors``, default True) are computed for the final solution only.  The
    returned solution carries
    ``rms_mmag``, ``n_clipped``, ``n_iterations`` and ``clipped`` (concatenated over the
    parts, each part in its input-row order).
    """
    parts = [parts] if isinstance(parts, PhotometricPart) else list(parts)
    ref_err = None if star_ref_mag_err is None else np.asarray(star_ref_mag_err, float)
    want_errors = solve_kwargs.pop("compute_errors", True)  # only for the final solution
    for it in range(1, max_iter + 1):
        normals = sum(accumulate_photometric_normal_equations(pt) for pt in parts)
        if allreduce is not None:  # MPI: this rank's parts are summed with every other rank's
            normals = PartialNormals.from_arrays(allreduce(normals.to_arrays()), normals.layout)
        sol = solve_photometric(normals, ccdvisits, star_ref_mag, ref_err, compute_errors=False, **solve_kwargs)
        clipped = [clip_photometric_part(pt, sol, nsigma) for pt in parts]
        stats = sum((c[1] for c in clipped), ResidualStats())
        if allreduce is not None:
            stats = ResidualStats.from_array(allreduce(stats.to_array()))
        new_ref_err = ref_err
        if clip_references and star_ref_mag is not None and ref_err is not None:
            new_ref_err = clip_photometric_references(sol, star_ref_mag, star_ref_mag_err, nsigma,
                                                      solve_kwargs.get("star_ref_colour"))
            ref_changed = not np.array_equal(np.isnan(new_ref_err), np.isnan(ref_err))
        else:
            ref_changed = False
        if (stats.n_changed == 0 and not ref_changed) or it == max_iter:
            break
        parts = [c[0] for c in clipped]
        ref_err = new_ref_err
    if want_errors:
        sol = solve_photometric(normals, ccdvisits, star_ref_mag, ref_err, compute_errors=True, **solve_kwargs)
    flags = []
    for pt in parts:
        f = np.zeros(pt.n_input, bool)
        f[pt.row[~pt.used]] = True
        flags.append(f)
    return sol.with_residuals(stats, it, np.concatenate(flags))
