"""Global relative calibration (LSE-163 5.2 step 2) as one MPI quantum per instrument.

Ranks own ccdvisits round-robin.  Each rank reads its Source tables and selects
good stars; rank 0 gathers their (ccdvisit, ra, dec), matches them into stars
observed many times and to the reference catalogue, and broadcasts the global
star and (ccdvisit, star) index spaces.  Each rank then accumulates its part of
the normal equations; an Allreduce sums them and every rank solves the same
system (kernels in lsst_prod.algorithms.relcal*), clipping outliers until
nothing changes: photometry per band (zero point per ccdvisit, tied to the
reference catalogue's aperture-corrected-PSF-flux scale), astrometry over all
bands (a polynomial per ccdvisit on top of its single-frame WCS, stars with
proper motions, reference stars propagated to each epoch).

Outputs: ``relcal_solution`` (one row per ccdvisit: zero points, their errors,
astrometric coefficients) and ``source_calibrated`` per visit x detector (the
Source table with relatively calibrated fluxes and positions), each rank
writing the tables of its own ccdvisits.  Without MPI (1 rank) the same code
runs with a serial communicator.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ..algorithms.relcal import (
    AstrometricCorrection,
    CcdVisits,
    PairIndex,
    apply_astrometric_correction,
    fit_astrometry,
    fit_photometry,
    make_astrometric_part,
    make_astrometric_stars,
    make_photometric_part,
    match_sources,
    reference_colours,
    reference_magnitudes,
    select_good_sources,
)
from ..config.stages import RelcalConfig
from ..algorithms.relcal_normals import ThinCcdVisits
from ..errors import AlgorithmError, InsufficientInputs
from ..repo import DataId
from ..repo.formats import read_columns, read_parquet, table_columns, table_from_columns, write_parquet
from .base import QuantumContext, QuantumSpec, Resources, Stage

FLUX_COLUMNS_PREFIXES = ("psfFlux", "calibFlux", "gaussianFlux", "ap", "sky")
SOURCE_COLUMNS = ("x", "y", "ra", "dec", "raErr", "decErr", "psfFlux", "psfFluxErr", "extendedness",
                  "pixelFlags_saturatedCenter", "deblend_nChild", "parentSourceId")


class SerialComm:
    """The few mpi4py calls the stage uses, for one process."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def allreduce(self, obj, op=None):
        return obj


def _allreduce_sum(comm):
    if isinstance(comm, SerialComm):
        return None  # the kernels' serial path

    def reduce(buffer: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(buffer)
        comm.Allreduce(np.ascontiguousarray(buffer), out, op=MPI.SUM)
        return out

    return reduce



def _left_out_note(ctx: QuantumContext) -> str:
    n = len({(x["data_id"].get("visit"), x["data_id"].get("detector")) for x in ctx.left_out})
    return f" ({n} detector-visits left out: their single_frame quanta failed)" if n else ""


def _bands_below_minimum(ctx: QuantumContext, bands: np.ndarray, visits: list[int], min_visits: int) -> dict[str, int]:
    """Bands with fewer than ``min_visits`` visits (band -> visits): they are left out of the
    calibration (their warps and forced photometry are blocked: no relcal zero point), the other
    bands are calibrated.  Only when no band is left is the quantum blocked (InsufficientInputs)."""
    short = {}
    for band in sorted(set(bands.tolist())):
        n = len({v for v, b in zip(visits, bands) if b == band})
        if n < min_visits:
            short[band] = n
    if short and len(short) == len(set(bands.tolist())):
        raise InsufficientInputs("no band has enough visits with a successful single-frame quantum: "
                                 + ", ".join(f"{b} {n}" for b, n in short.items()) + f" (minimum {min_visits})"
                                 + _left_out_note(ctx), n_visits=short, minimum=min_visits,
                                 n_left_out=len(ctx.left_out))
    return short


class RelcalStage(Stage):
    name = "relcal"
    dimensions = ("instrument",)
    input_types = ("source", "ccdVisit", "refcat")
    output_types = ("relcal_solution", "relcal_stars", "source_calibrated")
    # runs on the detector-visits that succeeded; per band it also needs min_visits_per_band visits
    # and min_reference_stars_per_band matched reference stars (InsufficientInputs otherwise)
    gather = {"source": 2, "ccdVisit": 2}
    resources = Resources(cores=2, memory_gib=4.0, walltime_s=3600, mpi_ranks=2)
    description = "global relative photometric and astrometric calibration (MPI)"

    def plan(self, ctx, config: RelcalConfig) -> list[QuantumSpec]:
        ccd_keys = sorted(k for k in ctx.produced if k[0] == "source")
        if not ccd_keys:
            return []
        instrument = ctx.instrument
        inputs = [("source", d) for _, d in ccd_keys] + [("ccdVisit", d) for _, d in ccd_keys] + [("refcat", DataId())]
        outputs = [("relcal_solution", DataId(instrument=instrument)), ("relcal_stars", DataId(instrument=instrument))] \
            + [("source_calibrated", d) for _, d in ccd_keys]
        return [QuantumSpec(self.name, DataId(instrument=instrument), tuple(inputs), tuple(outputs))]

    def run_quantum(self, ctx: QuantumContext) -> None:
        cfg: RelcalConfig = ctx.config  # type: ignore[assignment]
        comm = ctx.comm if ctx.comm is not None else SerialComm()
        rank, size = comm.Get_rank(), comm.Get_size()
        allreduce = _allreduce_sum(comm)

        # --- the global ccdvisit table (every rank reads the small ccdVisit rows)
        all_rows = [read_columns(ctx.repo.path_of(r)) for r in ctx.inputs_of("ccdVisit")]
        order = np.argsort([int(c["ccdVisitId"][0]) for c in all_rows], kind="stable")
        all_rows = [all_rows[i] for i in order]
        src_refs = {(int(r.data_id["visit"]), int(r.data_id["detector"])): r for r in ctx.inputs_of("source")}
        ref = read_columns(ctx.input_path("refcat"))
        cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        # ccdvisits set aside because they hold too few usable stars (ccdVisitId -> reason): the
        # calibration is solved again without them, so one thin ccdvisit never stops the release
        thin: dict[int, str] = {}
        # below this a ccdvisit is set aside; between it and twice the polynomial's terms its correction is
        # held at order 1 (offset and linear map: 3 terms per axis).  A minimum the campaign sets is used
        # as given, even above twice the terms
        n_terms = (cfg.astrometry_order + 1) * (cfg.astrometry_order + 2) // 2
        min_astrom = cfg.min_stars_per_ccdvisit_astrometry or 2 * min(3, n_terms)
        # below this a ccdvisit's terms above order 1 are held at 0 (a fit to N stars with p terms carries
        # sqrt(p / N) of their position error)
        min_full = max(min_astrom, math.ceil(cfg.astrometry_min_stars_per_term * n_terms))
        for _ in range(cfg.max_exclusion_rounds + 1):
            ccd_rows = [c for c in all_rows if int(c["ccdVisitId"][0]) not in thin]
            try:
                solved = self._solve(ctx, cfg, comm, allreduce, ccd_rows, src_refs, ref, cache, min_astrom, min_full)
            except ThinCcdVisits as e:
                if not e.ccdvisit_ids or len(thin) + len(e.ccdvisit_ids) > cfg.max_excluded_fraction * len(all_rows):
                    raise
                thin.update({int(i): e.reason for i in e.ccdvisit_ids})
                if ctx.log is not None:
                    ctx.log.warning("[%s] %d ccdvisit(s) set aside (%s); solving again without them", ctx.data_id,
                                    len(e.ccdvisit_ids), e.reason)
                continue
            break
        else:
            raise AlgorithmError(f"the set of usable ccdvisits did not settle after {cfg.max_exclusion_rounds} rounds "
                                 f"of setting aside thin ones ({len(thin)} set aside)", n_set_aside=len(thin))
        for c in all_rows:
            cid = int(c["ccdVisitId"][0])
            if cid in thin:
                did = DataId(instrument=ctx.data_id["instrument"], visit=int(c["visitId"][0]),
                             detector=int(c["detector"][0]))
                for dtype in ("source", "ccdVisit"):
                    ctx.exclude(dtype, did, thin[cid])
        if thin:
            ctx.summary["n_ccdvisits_set_aside"] = len(thin)
        self._write(ctx, cfg, comm, solved, [c for c in all_rows if int(c["ccdVisitId"][0]) in thin], thin)

    def _solve(self, ctx, cfg: RelcalConfig, comm, allreduce, ccd_rows, src_refs, ref, cache,
               min_astrom: int, min_full: int) -> dict[str, Any]:
        """One solution on ``ccd_rows``; ThinCcdVisits when some ccdvisit has too few usable stars."""
        rank, size = comm.Get_rank(), comm.Get_size()
        short = _bands_below_minimum(ctx, np.array([str(c["band"][0]) for c in ccd_rows]),
                                     [int(c["visitId"][0]) for c in ccd_rows], cfg.min_visits_per_band)
        ctx.summary.pop("bands_left_out", None)
        if short:
            ccd_rows = [c for c in ccd_rows if str(c["band"][0]) not in short]
            ctx.summary["bands_left_out"] = ",".join(f"{b}:{n}_visits" for b, n in short.items())
            if ctx.log is not None:
                ctx.log.warning("[%s] bands left out of the calibration (fewer than %d visits): %s", ctx.data_id,
                                cfg.min_visits_per_band, ctx.summary["bands_left_out"])
        cv_ids = np.array([int(c["ccdVisitId"][0]) for c in ccd_rows])
        zp_sf = np.array([float(c["zeroPoint"][0]) for c in ccd_rows])
        bands = np.array([str(c["band"][0]) for c in ccd_rows])
        cv = CcdVisits(cv_ids, np.array([float(c["expMidptMJD"][0]) for c in ccd_rows]),
                       np.array([float(c["ra"][0]) for c in ccd_rows]), np.array([float(c["dec"][0]) for c in ccd_rows]),
                       np.array([int(c["xSize"][0]) for c in ccd_rows]), np.array([int(c["ySize"][0]) for c in ccd_rows]),
                       10 ** (-0.4 * (zp_sf - 31.4)))
        keys = [(int(c["visitId"][0]), int(c["detector"][0])) for c in ccd_rows]
        mine = [k for k in range(len(keys)) if k % size == rank]

        # --- this rank's sources and its good stars
        local = {name: [] for name in SOURCE_COLUMNS + ("k",)}
        for k in mine:
            if keys[k] not in cache:
                cache[keys[k]] = read_columns(ctx.repo.path_of(src_refs[keys[k]]), list(SOURCE_COLUMNS))
            s = cache[keys[k]]
            for name in SOURCE_COLUMNS:
                local[name].append(s[name])
            local["k"].append(np.full(len(s["x"]), k))
        S = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in local.items()}
        S["k"] = S["k"].astype(np.int64)
        good = select_good_sources(S["k"], S["ra"], S["dec"], S["psfFlux"], S["psfFluxErr"], S["extendedness"],
                                   S["pixelFlags_saturatedCenter"].astype(bool), S["deblend_nChild"],
                                   S["parentSourceId"], snr_min=cfg.snr_min, isolation_arcsec=cfg.isolation_arcsec)
        rows = np.flatnonzero(good)

        # --- matching on rank 0 over everybody's good rows; global index spaces broadcast
        gathered = comm.gather((S["k"][rows], S["ra"][rows], S["dec"][rows]), root=0)
        if rank == 0:
            gk = np.concatenate([g[0] for g in gathered])
            gra = np.concatenate([g[1] for g in gathered])
            gdec = np.concatenate([g[2] for g in gathered])
            match = match_sources(gk, gra, gdec, cv, ref["ra"], ref["dec"], ref["pmra"], ref["pmdec"],
                                  ref["parallax"], ref["epoch_mjd"], radius_arcsec=cfg.match_radius_arcsec)
            counts = np.cumsum([0] + [len(g[0]) for g in gathered])
            per_rank = [match.star_index[counts[r]:counts[r + 1]] for r in range(size)]
            shared = {"match": match, "all_k": gk, "all_star": match.star_index}
        else:
            per_rank, shared = None, None
        star_of_rows = comm.bcast(per_rank, root=0)[rank]
        shared = comm.bcast(shared, root=0)
        match, all_k, all_star = shared["match"], shared["all_k"], shared["all_star"]
        if match.n_stars == 0:
            raise AlgorithmError("no star observed twice", n_good_sources=int(len(all_k)))
        # ccdvisits with too few stars matched across visits cannot be tied to the others: set aside
        n_matched = np.bincount(all_k[all_star >= 0], minlength=len(cv_ids))
        few = np.flatnonzero(n_matched < min_astrom)
        if len(few):
            raise ThinCcdVisits(cv_ids[few], f"fewer than {min_astrom} stars matched in other visits")
        used = star_of_rows >= 0
        R = rows[used]
        sidx = star_of_rows[used]

        # --- photometry, band by band (its own ccdvisit and star index spaces)
        zp = zp_sf.copy()
        zp_err = np.full(len(cv_ids), np.nan)
        n_stars_phot = np.zeros(len(cv_ids), int)
        phot_summary: dict[str, Any] = {}
        # the refcat's phot_variable_flag is incomplete: the missed variables are caught by the clipping of
        # measurements and of reference priors (clip_photometric_references)
        is_var = np.asarray(ref.get("phot_variable_flag", np.zeros(len(ref["ra"]), bool)), bool)
        for band in sorted(set(bands)):
            kb = np.flatnonzero(bands == band)
            kmap = np.full(len(cv_ids), -1)
            kmap[kb] = np.arange(len(kb))
            in_band = kmap[all_k] >= 0
            stars_b = np.unique(all_star[in_band & (all_star >= 0)])
            smap = np.full(match.n_stars, -1)
            smap[stars_b] = np.arange(len(stars_b))
            cv_b = CcdVisits(cv_ids[kb], cv.mjd[kb], cv.center_ra[kb], cv.center_dec[kb], cv.nx[kb], cv.ny[kb],
                             cv.nJy_per_electron[kb])
            sel_all = in_band & (all_star >= 0)
            pairs = PairIndex.from_measurements(len(kb), len(stars_b), kmap[all_k[sel_all]], smap[all_star[sel_all]])
            mine_b = kmap[S["k"][R]] >= 0
            part = make_photometric_part(cv_b, pairs, kmap[S["k"][R][mine_b]], smap[sidx[mine_b]],
                                         S["psfFlux"][R][mine_b], S["psfFluxErr"][R][mine_b],
                                         error_floor_mag=cfg.phot_error_floor_mag)
            n_ref_b = int(np.count_nonzero(match.star_ref_index[stars_b] >= 0))
            if n_ref_b < cfg.min_reference_stars_per_band:
                raise InsufficientInputs(
                    f"band {band}: {n_ref_b} reference stars matched (minimum {cfg.min_reference_stars_per_band})"
                    + _left_out_note(ctx), band=band, n_reference_stars=n_ref_b,
                    minimum=cfg.min_reference_stars_per_band, n_left_out=len(ctx.left_out))
            ref_mag, ref_err = reference_magnitudes(match.star_ref_index[stars_b], ref[f"{band}_flux"],
                                                    ref[f"{band}_fluxErr"], usable=~is_var)
            colour_kw = {}
            if cfg.phot_colour_term and "bp_rp" in ref:
                colour_kw = dict(star_ref_colour=reference_colours(match.star_ref_index[stars_b], ref["bp_rp"]),
                                 colour_pivot=cfg.phot_colour_pivot,
                                 colour_term_prior_sigma=cfg.phot_colour_term_prior_sigma)
            sol = fit_photometry(part, cv_b, ref_mag, ref_err, nsigma=cfg.nsigma, max_iter=cfg.max_iter, **colour_kw,
                                 allreduce=allreduce)
            zp[kb] = sol.zero_point
            zp_err[kb] = sol.zero_point_err
            n_stars_phot[kb] = sol.ccdvisit_n_stars
            phot_summary[band] = sol.to_dict()

        # --- astrometry over all bands
        stars = make_astrometric_stars(match, float(np.mean(cv.mjd)), ref["ra"], ref["dec"], ref["ra_err"],
                                       ref["dec_err"], ref["pmra"], ref["pmdec"], ref["pmra_err"], ref["pmdec_err"],
                                       ref["parallax"], ref["epoch_mjd"])
        pairs = PairIndex.from_measurements(len(cv_ids), match.n_stars, all_k[all_star >= 0], all_star[all_star >= 0])
        apart = make_astrometric_part(cv, stars, pairs, S["k"][R], sidx, S["x"][R], S["y"][R], S["ra"][R],
                                      S["dec"][R], S["raErr"][R], S["decErr"][R], order=cfg.astrometry_order,
                                      error_floor_mas=cfg.astrometry_error_floor_mas)
        asol = fit_astrometry(apart, cv, stars, nsigma=cfg.nsigma, max_iter=cfg.max_iter, allreduce=allreduce,
                              min_stars_linear=min_astrom, min_stars_per_ccdvisit=min_full)
        return {"cv_ids": cv_ids, "zp_sf": zp_sf, "zp": zp, "zp_err": zp_err, "bands": bands, "keys": keys,
                "mine": mine, "n_stars_phot": n_stars_phot, "phot_summary": phot_summary, "asol": asol,
                "match": match, "ref": ref}

    def _write(self, ctx: QuantumContext, cfg: RelcalConfig, comm, solved: dict[str, Any], aside_rows: list,
               thin: dict[int, str]) -> None:
        rank, size = comm.Get_rank(), comm.Get_size()
        cv_ids, zp_sf, zp, zp_err = solved["cv_ids"], solved["zp_sf"], solved["zp"], solved["zp_err"]
        bands, keys, mine, asol = solved["bands"], solved["keys"], solved["mine"], solved["asol"]
        n_stars_phot, phot_summary, match = solved["n_stars_phot"], solved["phot_summary"], solved["match"]
        src_refs = {(int(r.data_id["visit"]), int(r.data_id["detector"])): r for r in ctx.inputs_of("source")}
        # --- outputs: each rank writes its ccdvisits' calibrated Source tables
        refs = []
        for k in mine:
            corr = asol.correction(k)
            src_ref = src_refs[keys[k]]
            table = read_parquet(ctx.repo.path_of(src_ref))
            cols = table_columns(table)
            scale = 10 ** (-0.4 * (zp[k] - zp_sf[k]))
            for n in list(cols):
                if n.startswith(FLUX_COLUMNS_PREFIXES) and ("Flux" in n or n in ("sky", "skyErr")) \
                        and not n.endswith(("_flag", "instFlux", "instFluxErr", "apCorr", "apCorrErr", "_area")) \
                        and cols[n].dtype.kind == "f":
                    cols[n] = cols[n] * scale
            ra, dec = apply_astrometric_correction(corr, cols["x"], cols["y"], cols["ra"], cols["dec"])
            cols["ra"], cols["dec"], cols["coord_ra"], cols["coord_dec"] = ra, dec, ra, dec
            units = {f.name: f.metadata[b"unit"].decode() for f in table.schema if f.metadata and b"unit" in f.metadata}
            meta = {"release_id": ctx.release_id, "zero_point": float(zp[k]), "zero_point_single_frame": float(zp_sf[k]),
                    "relcal": True}
            out = table_from_columns(cols, units, meta)
            did = src_ref.data_id
            refs.append(ctx.put("source_calibrated", lambda p, out=out: write_parquet(p, out), did).to_dict())
        all_refs = comm.gather(refs, root=0)

        if rank == 0:
            from ..repo import DatasetRef

            ctx.outputs = [DatasetRef.from_dict(r) for group in all_refs for r in group]
            corr_rows = [asol.correction(k) for k in range(len(cv_ids))]
            # the ccdvisits set aside keep a row (NaN zero point, the reason): warps leave them out and
            # their forced photometry has no work, instead of mixing in an uncalibrated detector
            na = len(aside_rows)
            zp_sf_aside = np.array([float(c["zeroPoint"][0]) for c in aside_rows])
            sol_cols = {
                "ccdVisitId": np.concatenate([cv_ids, [int(c["ccdVisitId"][0]) for c in aside_rows]]).astype(np.int64),
                "visit": np.array([k[0] for k in keys] + [int(c["visitId"][0]) for c in aside_rows], np.int64),
                "detector": np.array([k[1] for k in keys] + [int(c["detector"][0]) for c in aside_rows], np.int64),
                "band": np.concatenate([bands, [str(c["band"][0]) for c in aside_rows]]).astype(str),
                "zeroPointSingleFrame": np.concatenate([zp_sf, zp_sf_aside]),
                "zeroPoint": np.concatenate([zp, np.full(na, np.nan)]),
                "zeroPointErr": np.concatenate([zp_err, np.full(na, np.nan)]),
                "zeroPointOffset": np.concatenate([zp - zp_sf, np.full(na, np.nan)]),
                "nStarsPhotometry": np.concatenate([n_stars_phot, np.zeros(na, int)]),
                "nStarsAstrometry": np.concatenate([np.asarray(asol.ccdvisit_n_stars), np.zeros(na, int)]),
                "astromOrder": np.concatenate([np.where(asol.ccdvisit_reduced, min(1, asol.order), asol.order),
                                               np.full(na, -1)]).astype(np.int64),
                "astromCorrection": np.array([json.dumps(_corr_dict(c)) for c in corr_rows] + [""] * na),
                "setAside": np.array([""] * len(cv_ids) + [thin[int(c["ccdVisitId"][0])] for c in aside_rows]),
            }
            table = table_from_columns(sol_cols, {"zeroPoint": "mag", "zeroPointSingleFrame": "mag",
                                                  "zeroPointErr": "mag", "zeroPointOffset": "mag"},
                                       {"release_id": ctx.release_id, "photometry": phot_summary,
                                        "astrometry": asol.to_dict()})
            ctx.put("relcal_solution", lambda p: write_parquet(p, table), DataId(instrument=ctx.data_id["instrument"]))
            stars = _star_table(asol, match, solved["ref"])
            ctx.put("relcal_stars", lambda p: write_parquet(p, stars), DataId(instrument=ctx.data_id["instrument"]))
            ctx.summary.update(
                n_ccdvisits=int(len(cv_ids)), n_stars=int(match.n_stars),
                n_reference_stars=int(match.n_reference_stars), mpi_ranks=size,
                phot_rms_mmag=float(np.median([v["rms_mmag"] for v in phot_summary.values()])),
                phot_chi2_dof=float(np.median([v["chi2"] / max(v["dof"], 1) for v in phot_summary.values()])),
                astrom_rms_mas=float(asol.rms_mas), astrom_chi2_dof=float(asol.chi2 / max(asol.dof, 1)),
                zp_offset_rms_mmag=float(1000 * np.std(zp - zp_sf)),
                n_ccdvisits_astrometry_order1=int(np.sum(asol.ccdvisit_reduced)),
            )


def _star_table(asol, match, ref: dict[str, np.ndarray]):
    """``relcal_stars``: every star of the astrometric solution (position at ``epochMjd``, proper motion,
    parallax, their errors): forced photometry measures moving stars where they are at each epoch."""
    ok = np.isfinite(asol.star_ra) & np.isfinite(asol.star_dec) & np.isfinite(asol.star_pmra) \
        & np.isfinite(asol.star_pmdec) & (np.asarray(asol.star_n_measurements) > 0)
    idx = np.flatnonzero(ok)
    ref_row = np.asarray(match.star_ref_index)[idx]
    ref_ids = np.asarray(ref.get("ref_id", np.arange(len(ref["ra"]))), np.int64)
    cols = {
        "starId": idx.astype(np.int64), "ra": np.asarray(asol.star_ra)[idx], "dec": np.asarray(asol.star_dec)[idx],
        "pmRa": np.asarray(asol.star_pmra)[idx], "pmDec": np.asarray(asol.star_pmdec)[idx],
        "parallax": np.asarray(asol.star_parallax)[idx], "epochMjd": np.full(len(idx), float(asol.epoch_mjd)),
        "raErr": np.asarray(asol.star_pos_err)[idx, 0], "decErr": np.asarray(asol.star_pos_err)[idx, 1],
        "pmRaErr": np.asarray(asol.star_pm_err)[idx, 0], "pmDecErr": np.asarray(asol.star_pm_err)[idx, 1],
        "nMeasurements": np.asarray(asol.star_n_measurements)[idx].astype(np.int64),
        "refId": np.where(ref_row >= 0, ref_ids[np.maximum(ref_row, 0)], -1).astype(np.int64),
    }
    units = {"ra": "deg", "dec": "deg", "pmRa": "mas/yr", "pmDec": "mas/yr", "parallax": "mas", "epochMjd": "d",
             "raErr": "mas", "decErr": "mas", "pmRaErr": "mas/yr", "pmDecErr": "mas/yr"}
    return table_from_columns(cols, units, {"epoch_mjd": float(asol.epoch_mjd),
                                            "description": "relcal astrometric stars; pmRa includes cos(dec)"})


def _corr_dict(c: AstrometricCorrection) -> dict[str, Any]:
    return {"ccdvisit_id": int(c.ccdvisit_id), "order": int(c.order), "center_ra": float(c.center_ra),
            "center_dec": float(c.center_dec), "x0": float(c.x0), "y0": float(c.y0), "scale": float(c.scale),
            "xi_coeffs": [float(v) for v in np.ravel(c.xi_coeffs)],
            "eta_coeffs": [float(v) for v in np.ravel(c.eta_coeffs)]}
