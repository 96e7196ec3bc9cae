"""Global relative calibration (photometric + astrometric): public entry point.

The kernels live in four modules; this one re-exports their public names and adds
:func:`simulate_relcal_catalogs`, a synthetic-catalogue generator (no images) used by the
tests, the scaling benchmark and anyone checking the stage end to end.

* :mod:`.relcal_normals`: ``CcdVisits``, ``PairIndex``, ``NormalsLayout``,
  ``PartialNormals`` (``+``, ``to_arrays``/``from_arrays`` for MPI), ``ResidualStats``,
  the Schur-complement solver;
* :mod:`.relcal_match`: ``select_good_sources``, ``match_sources`` -> ``MatchResult``;
* :mod:`.relcal_photometry`: ``make_photometric_part``,
  ``accumulate_photometric_normal_equations``, ``solve_photometric``,
  ``clip_photometric_part``, ``fit_photometry`` -> ``PhotometricSolution``;
* :mod:`.relcal_astrometry`: ``make_astrometric_stars``, ``make_astrometric_part``,
  ``accumulate_astrometric_normal_equations``, ``solve_astrometric``,
  ``clip_astrometric_part``, ``fit_astrometry`` -> ``AstrometricSolution``,
  ``apply_astrometric_correction``.

Documentation: docs/algorithms-relcal.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .astrometry import propagate_positions
from .relcal_astrometry import (
    AstrometricCorrection,
    AstrometricPart,
    AstrometricSolution,
    AstrometricStars,
    accumulate_astrometric_normal_equations,
    apply_astrometric_correction,
    astrometric_residuals,
    clip_astrometric_part,
    fit_astrometry,
    gnomonic,
    inverse_gnomonic,
    make_astrometric_part,
    make_astrometric_stars,
    solve_astrometric,
)
from .relcal_match import MatchResult, match_sources, select_good_sources, unit_vectors
from .relcal_normals import (
    AB_NJY_ZERO_POINT,
    MAS_PER_RAD,
    CcdVisits,
    NormalsLayout,
    PairIndex,
    PartialNormals,
    ResidualStats,
    poly_terms,
)
from .relcal_photometry import (
    PhotometricPart,
    PhotometricSolution,
    accumulate_photometric_normal_equations,
    clip_photometric_part,
    clip_photometric_references,
    fit_photometry,
    make_photometric_part,
    photometric_residuals,
    reference_colours,
    reference_magnitudes,
    solve_photometric,
)

__all__ = [
    "AstrometricCorrection", "AstrometricPart", "AstrometricSolution", "AstrometricStars", "CcdVisits",
    "MatchResult", "NormalsLayout", "PairIndex", "PartialNormals", "PhotometricPart", "PhotometricSolution",
    "ResidualStats", "SyntheticRelcalData", "accumulate_astrometric_normal_equations",
    "accumulate_photometric_normal_equations", "apply_astrometric_correction", "astrometric_residuals",
    "clip_astrometric_part", "clip_photometric_part", "clip_photometric_references", "fit_astrometry",
    "fit_photometry", "gnomonic", "inverse_gnomonic", "make_astrometric_part", "make_astrometric_stars",
    "make_photometric_part", "match_sources", "photometric_residuals", "poly_terms", "reference_colours", "reference_magnitudes",
    "select_good_sources", "simulate_relcal_catalogs", "solve_astrometric", "solve_photometric",
]  # fmt: skip


@dataclass(frozen=True, eq=False)
class SyntheticRelcalData:
    """Output of :func:`simulate_relcal_catalogs`.

    ``sources``: DP1-named Source columns of all ccdvisits (``ccdVisitId``, ``x, y``,
    ``ra, dec``, ``raErr, decErr`` (deg), ``psfFlux, psfFluxErr`` (nJy, single-frame
    calibration), ``extendedness``, ``pixelFlags_saturatedCenter``, ``deblend_nChild``,
    ``parentSourceId``) plus ``ccdvisit_index`` and truth columns ``truth_star`` (-1:
    galaxy), ``true_ra, true_dec`` (deg at the ccdvisit epoch), ``true_mag``,
    ``outlier_phot``, ``outlier_astrom``.  ``refcat``: the simulator's refcat columns.
    ``truth``: per star ``star_ra, star_dec`` (deg at ``ref_epoch_mjd``), ``star_pmra,
    star_pmdec, star_parallax, star_mag, star_ref_row``; per ccdvisit ``zp_true``,
    ``zp_sf``, ``zp_offset`` (= true - single-frame: what relcal should add),
    ``astrom_offset_mas`` (K, 2) and ``astrom_matrix`` (K, 2, 2) (true - single-frame
    linear map, relative).
    """

    ccdvisits: CcdVisits
    sources: dict[str, np.ndarray] = field(repr=False)
    refcat: dict[str, np.ndarray] = field(repr=False)
    truth: dict[str, np.ndarray] = field(repr=False)
    band: str = "r"
    ref_epoch_mjd: float = 57388.0


def _mag_err(mag: np.ndarray) -> np.ndarray:
    return np.hypot(0.002, 0.015 * 10.0 ** (0.4 * (mag - 20.0)))


def simulate_relcal_catalogs(
    n_visits: int = 30,
    n_detectors: int = 2,
    stars_per_ccdvisit: float = 300.0,
    *,
    seed: int = 0,
    visits_per_field: int | None = None,
    zp_offset_rms_mag: float = 0.05,
    astrometric_error_mas: float = 20.0,
    pm_max_mas_yr: float = 50.0,
    span_years: float = 3.0,
    phot_outlier_fraction: float = 0.0,
    astrom_outlier_fraction: float = 0.0,
    galaxy_fraction: float = 0.05,
    ref_mag_limit: float = 20.5,
    mag_range: tuple[float, float] = (16.0, 22.5),
    saturation_mag: float = 16.3,
    detector_size: int = 2000,
    pixel_scale_arcsec: float = 0.2,
    ra0: float = 150.0,
    dec0: float = -30.0,
    band: str = "r",
    mjd_start: float = 60600.0,
    ref_epoch_mjd: float = 57388.0,
    fwhm_arcsec: float = 0.7,
    ref_colour_term: float = 0.0,
    ref_colour_pivot: float = 1.0,
) -> SyntheticRelcalData:
    """Synthetic Source tables of ``n_visits`` x ``n_detectors`` ccdvisits, a refcat and the truth.

    Visits are spread over ``ceil(n_visits / visits_per_field)`` fields on a square grid
    (spacing 0.6 x the focal-plane width, so neighbouring fields overlap), each visited in
    turn over ``span_years`` with a small dither and a random rotation.  Stars are uniform
    (density giving ``stars_per_ccdvisit``), magnitudes with dN/dm ~ 10^(0.3 m), proper
    motions uniform in a disc of ``pm_max_mas_yr``, parallaxes 0.1 + Exp(0.8) mas.  Each
    ccdvisit's single-frame WCS is the nominal linear TAN map about its centre, while the
    truth differs by an offset (``astrometric_error_mas`` rms per axis) and a linear
    distortion of the same size at the detector edge; its single-frame zero point is off
    by N(0, ``zp_offset_rms_mag``).  Photometric errors ``hypot(2, 15 * 10^(0.4 (m - 20)))``
    mmag, centroid errors FWHM / (2.35 S/N) with a 1 mas floor.  Reference stars have a
    colour ``bp_rp ~ U(0.3, 3.0)`` (own random stream: the rest does not depend on it) and the
    refcat magnitudes are ``m_true + ref_colour_term (bp_rp - ref_colour_pivot)`` + noise (a
    reference system that differs from the instrument's natural system by a colour term).
    """
    rng = np.random.default_rng(seed)
    N, s_arcsec = int(detector_size), float(pixel_scale_arcsec)
    s_rad = s_arcsec / MAS_PER_RAD * 1e3
    vpf = int(visits_per_field or (n_visits if n_visits <= 30 else 10))
    n_fields = int(np.ceil(n_visits / vpf))
    grid = int(np.ceil(np.sqrt(n_fields)))
    width_deg = n_detectors * (N + 50) * s_arcsec / 3600.0
    spacing = 0.6 * width_deg
    half_diag = np.hypot(width_deg / 2, N * s_arcsec / 3600.0 / 2)
    dither = 0.2 * N * s_arcsec / 3600.0
    reach = half_diag + dither + 0.005
    gi = np.arange(n_fields)
    fxi = (gi % grid - (grid - 1) / 2.0) * spacing
    feta = (gi // grid - (grid - 1) / 2.0) * spacing
    f_ra, f_dec = inverse_gnomonic(np.deg2rad(fxi), np.deg2rad(feta), ra0, dec0)

    # --- stars (truth at the reference epoch) and the reference catalogue -----------------
    half = (grid - 1) / 2.0 * spacing + reach
    density = stars_per_ccdvisit / (N * s_arcsec / 3600.0) ** 2
    n_stars = rng.poisson(density * (2 * half) ** 2)
    sxi, seta = rng.uniform(-half, half, (2, n_stars))
    st_ra, st_dec = inverse_gnomonic(np.deg2rad(sxi), np.deg2rad(seta), ra0, dec0)
    lo, hi = mag_range
    a = 0.3 * np.log(10.0)
    st_mag = lo + np.log1p(rng.uniform(size=n_stars) * np.expm1(a * (hi - lo))) / a
    pm_r, pm_t = pm_max_mas_yr * np.sqrt(rng.uniform(size=n_stars)), rng.uniform(0, 2 * np.pi, n_stars)
    st_pmra, st_pmdec = pm_r * np.cos(pm_t), pm_r * np.sin(pm_t)
    st_plx = 0.1 + rng.exponential(0.8, n_stars)
    st_flux = 10.0 ** (-0.4 * (st_mag - AB_NJY_ZERO_POINT))
    ref_rows = np.flatnonzero(st_mag < ref_mag_limit)
    nr = len(ref_rows)
    frac = 10.0 ** (0.4 * (st_mag[ref_rows] - ref_mag_limit))
    s_pos = 0.1 + 1.9 * frac
    s_flux = 0.01 + 0.01 * frac
    cosd = np.cos(np.deg2rad(st_dec[ref_rows]))
    bp_rp = np.random.default_rng([int(seed), 1]).uniform(0.3, 3.0, nr)
    ref_flux = st_flux[ref_rows] * 10.0 ** (-0.4 * ref_colour_term * (bp_rp - ref_colour_pivot))
    refcat = {
        "ref_id": np.arange(1, nr + 1, dtype=np.int64),
        "ra": st_ra[ref_rows] + rng.normal(0, s_pos) / 3.6e6 / cosd,
        "dec": st_dec[ref_rows] + rng.normal(0, s_pos) / 3.6e6,
        "ra_err": s_pos, "dec_err": s_pos.copy(),
        "pmra": st_pmra[ref_rows] + rng.normal(0, s_pos), "pmdec": st_pmdec[ref_rows] + rng.normal(0, s_pos),
        "pmra_err": s_pos.copy(), "pmdec_err": s_pos.copy(),
        "parallax": st_plx[ref_rows] + rng.normal(0, 1.2 * s_pos), "parallax_err": 1.2 * s_pos,
        "epoch_mjd": np.full(nr, float(ref_epoch_mjd)),
        f"{band}_flux": ref_flux * (1 + rng.normal(0, s_flux)), f"{band}_fluxErr": s_flux * ref_flux,
        "bp_rp": bp_rp, "phot_variable_flag": np.zeros(nr, bool),
    }  # fmt: skip
    star_ref_row = np.full(n_stars, -1, np.int64)
    star_ref_row[ref_rows] = np.arange(nr)
    star_tree = cKDTree(unit_vectors(st_ra, st_dec))

    # --- visits and ccdvisits --------------------------------------------------------------
    mjd = np.sort(mjd_start + rng.uniform(0, span_years * 365.25, n_visits))
    K = n_visits * n_detectors
    cols: dict[str, list] = {c: [] for c in (
        "ccdvisit_index", "x", "y", "ra", "dec", "raErr", "decErr", "psfFlux", "psfFluxErr", "extendedness",
        "pixelFlags_saturatedCenter", "truth_star", "true_ra", "true_dec", "true_mag", "outlier_phot",
        "outlier_astrom")}  # fmt: skip
    ccd = {c: np.zeros(K) for c in ("center_ra", "center_dec", "njpe", "zp_true", "zp_sf")}
    astrom_offset, astrom_matrix = np.zeros((K, 2)), np.zeros((K, 2, 2))
    x0 = (N - 1) / 2.0
    half_mas = x0 * s_arcsec * 1e3
    for v in range(n_visits):
        f = v % n_fields
        r_d, t_d = dither * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        bxi, beta = np.deg2rad(r_d * np.cos(t_d)), np.deg2rad(r_d * np.sin(t_d))
        b_ra, b_dec = inverse_gnomonic(bxi, beta, f_ra[f], f_dec[f])
        theta = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.diag([-1.0, 1.0])
        cand = np.asarray(star_tree.query_ball_point(unit_vectors(b_ra, b_dec), np.deg2rad(reach + 0.002)), np.int64)
        t_ra, t_dec = propagate_positions(st_ra[cand], st_dec[cand], st_pmra[cand], st_pmdec[cand], st_plx[cand],
                                          ref_epoch_mjd, float(mjd[v]))
        for d in range(n_detectors):
            kk = v * n_detectors + d
            fp = np.array([(d - (n_detectors - 1) / 2.0) * (N + 50), 0.0])
            c_xi, c_eta = rot @ fp * s_rad
            c_ra, c_dec = inverse_gnomonic(c_xi, c_eta, b_ra, b_dec)
            A_nom = rot * s_rad
            e = rng.normal(0, astrometric_error_mas / half_mas, 4)
            E = np.array([[e[0] + e[2], -e[1] + e[3]], [e[1] + e[3], e[0] - e[2]]])
            A_true = A_nom @ (np.eye(2) + E)
            c_true = rng.normal(0, astrometric_error_mas, 2) / MAS_PER_RAD
            astrom_offset[kk], astrom_matrix[kk] = c_true * MAS_PER_RAD, E
            xi, eta = gnomonic(t_ra, t_dec, c_ra, c_dec)
            pix = np.linalg.solve(A_true, np.vstack([xi - c_true[0], eta - c_true[1]])) + x0
            on = (pix[0] >= 0) & (pix[0] <= N - 1) & (pix[1] >= 0) & (pix[1] <= N - 1) & (xi**2 + eta**2 < 0.01)
            idx = cand[on]
            n = len(idx)
            mag = st_mag[idx]
            merr = _mag_err(mag)
            pos_err = np.hypot(fwhm_arcsec * 1e3 / (2.35 * 1.0857 / merr), 1.0)  # mas
            px = pix[0, on] + rng.normal(0, 1, n) * pos_err / (s_arcsec * 1e3)
            py = pix[1, on] + rng.normal(0, 1, n) * pos_err / (s_arcsec * 1e3)
            out_a = rng.uniform(size=n) < astrom_outlier_fraction
            sxi_, seta_ = A_nom @ np.vstack([px - x0, py - x0])
            amp, ang = rng.uniform(100, 300, n) / MAS_PER_RAD, rng.uniform(0, 2 * np.pi, n)
            sxi_, seta_ = sxi_ + out_a * amp * np.cos(ang), seta_ + out_a * amp * np.sin(ang)
            sra, sdec = inverse_gnomonic(sxi_, seta_, c_ra, c_dec)
            zp_true = 28.0 + rng.normal(0, 0.1)
            zp_sf = zp_true - rng.normal(0, zp_offset_rms_mag)
            njpe_true = 10.0 ** (-0.4 * (zp_true - AB_NJY_ZERO_POINT))
            njpe_sf = 10.0 ** (-0.4 * (zp_sf - AB_NJY_ZERO_POINT))
            electrons = st_flux[idx] / njpe_true
            meas = electrons * (1 + rng.normal(0, 1, n) * merr / 1.0857)
            sat = mag < saturation_mag
            meas = np.where(sat, 0.8 * meas, meas)
            out_p = rng.uniform(size=n) < phot_outlier_fraction
            meas = meas * np.where(out_p, 10.0 ** (-0.4 * rng.choice([-1, 1], n) * rng.uniform(0.3, 1.0, n)), 1.0)
            # a few galaxies (extended, not repeated)
            ng = rng.binomial(n, galaxy_fraction) if galaxy_fraction > 0 else 0
            gx, gy = rng.uniform(0, N - 1, (2, ng))
            gxi, geta = A_nom @ np.vstack([gx - x0, gy - x0])
            g_ra, g_dec = inverse_gnomonic(gxi, geta, c_ra, c_dec)
            g_mag = rng.uniform(18, 22, ng)
            g_e = 10.0 ** (-0.4 * (g_mag - zp_true))
            for name, star_val, gal_val in (
                ("x", px, gx), ("y", py, gy), ("ra", sra, g_ra), ("dec", sdec, g_dec),
                ("raErr", pos_err / 3.6e6, np.full(ng, 5e-6)), ("decErr", pos_err / 3.6e6, np.full(ng, 5e-6)),
                ("psfFlux", meas * njpe_sf, g_e * njpe_sf), ("psfFluxErr", electrons * merr / 1.0857 * njpe_sf,
                                                           0.02 * g_e * njpe_sf),
                ("extendedness", np.zeros(n), np.ones(ng)), ("pixelFlags_saturatedCenter", sat, np.zeros(ng, bool)),
                ("truth_star", idx, np.full(ng, -1)), ("true_ra", t_ra[on], g_ra), ("true_dec", t_dec[on], g_dec),
                ("true_mag", mag, g_mag), ("outlier_phot", out_p, np.zeros(ng, bool)),
                ("outlier_astrom", out_a, np.zeros(ng, bool)), ("ccdvisit_index", np.full(n, kk), np.full(ng, kk)),
            ):  # fmt: skip
                cols[name].append(np.concatenate([np.asarray(star_val), np.asarray(gal_val)]))
            ccd["center_ra"][kk], ccd["center_dec"][kk] = c_ra, c_dec
            ccd["njpe"][kk], ccd["zp_true"][kk], ccd["zp_sf"][kk] = njpe_sf, zp_true, zp_sf
    sources = {c: np.concatenate(v) for c, v in cols.items()}
    dtypes = {"ccdvisit_index": np.int64, "truth_star": np.int64, "pixelFlags_saturatedCenter": bool,
              "outlier_phot": bool, "outlier_astrom": bool}
    for c, dt in dtypes.items():
        sources[c] = sources[c].astype(dt)
    ids = 1000 * np.arange(n_visits).repeat(n_detectors) + np.tile(np.arange(n_detectors), n_visits)
    nsrc = len(sources["x"])
    sources["ccdVisitId"] = ids[sources["ccdvisit_index"]]
    sources["sourceId"] = np.arange(1, nsrc + 1, dtype=np.int64)
    sources["deblend_nChild"] = np.zeros(nsrc, np.int64)
    sources["parentSourceId"] = np.zeros(nsrc, np.int64)
    ccdvisits = CcdVisits(ids, np.repeat(mjd, n_detectors), ccd["center_ra"], ccd["center_dec"], np.full(K, N),
                          np.full(K, N), ccd["njpe"])
    truth = {
        "star_ra": st_ra, "star_dec": st_dec, "star_pmra": st_pmra, "star_pmdec": st_pmdec, "star_parallax": st_plx,
        "star_mag": st_mag, "star_ref_row": star_ref_row, "zp_true": ccd["zp_true"], "zp_sf": ccd["zp_sf"],
        "zp_offset": ccd["zp_true"] - ccd["zp_sf"], "astrom_offset_mas": astrom_offset, "astrom_matrix": astrom_matrix,
    }  # fmt: skip
    return SyntheticRelcalData(ccdvisits, sources, refcat, truth, band, float(ref_epoch_mjd))
