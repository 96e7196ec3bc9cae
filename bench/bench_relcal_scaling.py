#!/usr/bin/env python
"""Relative calibration: time and memory of accumulate + solve vs the number of visits.

Synthetic catalogues only (``lsst_prod.algorithms.relcal.simulate_relcal_catalogs``, no
images): N visits x 2 detectors (2000^2 px at 0.2"), ~200 stars per ccdvisit, visits
spread over fields of 10 visits on a square grid (neighbouring fields overlap), so the
sky area, the number of stars and the number of measurements grow linearly with N while
each ccdvisit keeps the same neighbourhood (as in a survey).  Times are CPU seconds of the
benchmark process (equal to wall time on an idle core with single-threaded BLAS, and not
inflated when other jobs share the machine); the fit's wall time is printed too.  For each
N, in a fresh process (so that the memory figures are that size's own):

* ``match``: select_good_sources + match_sources (all ccdvisits, one process);
* photometric and astrometric (order 1), separately: ``prepare`` (make_*_part, the
  linearisation), one ``accumulate`` (all ccdvisits at once = the serial case), one
  ``solve`` (Schur complement + dense Cholesky or sparse LU; photometric with the
  zero-point errors, astrometric without coefficient errors), and the full ``fit``
  (accumulate/solve/clip iterations to convergence);
* peak memory: the process's peak resident set during the phase minus its resident set
  at the start of the phase (Linux ``/proc/self/clear_refs``), and the size of the
  normal-equation buffer that an MPI Allreduce would move;
* accuracy against the truth: zero points (rms after removing the mean, mmag) and
  corrected positions of bright (r < 19) stars (rms, mas).

BLAS is single-threaded (as one MPI rank per core would run) unless ``--threads``.

Usage (from the project root, with the project's virtualenv)::

    python bench/bench_relcal_scaling.py [--visits 10 100 1000] [--stars 200] [--json]

The default run takes about 30 s of wall time (up to a minute on a busy machine);
``--visits 3000`` about 4 minutes and 2.2 GB.  Figures: docs/algorithms-relcal.md.
"""

from __future__ import annotations

import os
import sys

if "--threads" not in sys.argv:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402


def _status_kb(key: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


class _Phase:
    """Wall time and extra peak RSS (MB) of a block of code."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.rss0 = _status_kb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    process_peak_kb = 0.0

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        hwm = _status_kb("VmHWM")
        self.peak_mb = (hwm - self.rss0) / 1024.0
        _Phase.process_peak_kb = max(_Phase.process_peak_kb, hwm)
        return False


def _timed(fn, *args, **kw):
    """Result and CPU seconds of the process (single-threaded BLAS: = wall time on an idle core,
    but not inflated when other jobs share the machine)."""
    t0 = time.process_time()
    out = fn(*args, **kw)
    return out, time.process_time() - t0


def run_case(n_visits: int, stars_per_ccdvisit: float, n_detectors: int, order: int, seed: int) -> dict:
    import numpy as np

    from lsst_prod.algorithms import relcal as rc

    out: dict = {"n_visits": n_visits}
    data, out["simulate_s"] = _timed(rc.simulate_relcal_catalogs, n_visits, n_detectors, stars_per_ccdvisit,
                                     seed=seed, phot_outlier_fraction=0.005, astrom_outlier_fraction=0.005)
    S, R, cv = data.sources, data.refcat, data.ccdvisits
    k = S["ccdvisit_index"]
    c0 = time.process_time()
    with _Phase() as ph:
        good = rc.select_good_sources(k, S["ra"], S["dec"], S["psfFlux"], S["psfFluxErr"], S["extendedness"],
                                      S["pixelFlags_saturatedCenter"], S["deblend_nChild"], S["parentSourceId"])
        m = rc.match_sources(k, S["ra"], S["dec"], cv, R["ra"], R["dec"], R["pmra"], R["pmdec"], R["parallax"],
                             R["epoch_mjd"], good=good)
        pairs = rc.PairIndex.from_measurements(len(cv), m.n_stars, k, m.star_index)
    out.update(n_ccdvisits=len(cv), n_sources=len(k), n_matched=m.n_matched_sources, n_stars=m.n_stars,
               n_ref_stars=m.n_reference_stars, n_pairs=len(pairs), match_s=time.process_time() - c0,
               match_mb=ph.peak_mb)
    si = m.star_index

    # --- photometric -------------------------------------------------------------------
    ref_mag, ref_err = rc.reference_magnitudes(m.star_ref_index, R["r_flux"], R["r_fluxErr"])
    with _Phase() as ph:
        part, t_prep = _timed(rc.make_photometric_part, cv, pairs, k, si, S["psfFlux"], S["psfFluxErr"])
        normals, t_acc = _timed(rc.accumulate_photometric_normal_equations, part)
        sol, t_solve = _timed(rc.solve_photometric, normals, cv, ref_mag, ref_err)
        w0 = time.perf_counter()
        fit, t_fit = _timed(rc.fit_photometry, part, cv, ref_mag, ref_err)
        w_fit = time.perf_counter() - w0
    d = fit.zero_point - data.truth["zp_true"]
    out["phot"] = dict(unknowns=len(cv), prepare_s=t_prep, accumulate_s=t_acc, solve_s=t_solve, method=sol.method,
                       fit_s=t_fit, fit_wall_s=w_fit, iterations=fit.n_iterations, peak_mb=ph.peak_mb,
                       buffer_mb=normals.layout.buffer_size * 8 / 1e6, zp_rms_mmag=1e3 * float(np.std(d)),
                       n_measurements=fit.n_measurements, n_clipped=fit.n_clipped)
    del part, normals, sol

    # --- astrometric -------------------------------------------------------------------
    stars = rc.make_astrometric_stars(m, float(cv.mjd.mean()), R["ra"], R["dec"], R["ra_err"], R["dec_err"], R["pmra"],
                                      R["pmdec"], R["pmra_err"], R["pmdec_err"], R["parallax"], R["epoch_mjd"])
    with _Phase() as ph:
        part, t_prep = _timed(rc.make_astrometric_part, cv, stars, pairs, k, si, S["x"], S["y"], S["ra"], S["dec"],
                              S["raErr"], S["decErr"], order=order)
        normals, t_acc = _timed(rc.accumulate_astrometric_normal_equations, part)
        sol, t_solve = _timed(rc.solve_astrometric, normals, cv, stars)
        w0 = time.perf_counter()
        fit, t_fit = _timed(rc.fit_astrometry, part, cv, stars)
        w_fit = time.perf_counter() - w0
    ra, dec = S["ra"].copy(), S["dec"].copy()
    order_k = np.argsort(k, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(k, minlength=len(cv)))]
    for kk in range(len(cv)):
        rows = order_k[bounds[kk]:bounds[kk + 1]]
        ra[rows], dec[rows] = rc.apply_astrometric_correction(fit.correction(kk), S["x"][rows], S["y"][rows],
                                                              ra[rows], dec[rows])
    bright = (si >= 0) & (S["true_mag"] < 19) & ~S["outlier_astrom"]
    dra = (ra - S["true_ra"]) * np.cos(np.deg2rad(S["true_dec"])) * 3.6e6
    ddec = (dec - S["true_dec"]) * 3.6e6
    out["astro"] = dict(unknowns=int(len(cv) * normals.layout.n_ccd_params), prepare_s=t_prep, accumulate_s=t_acc,
                        solve_s=t_solve, method=sol.method, fit_s=t_fit, fit_wall_s=w_fit,
                        iterations=fit.n_iterations, peak_mb=ph.peak_mb, buffer_mb=normals.layout.buffer_size * 8 / 1e6,
                        pos_rms_mas=float(np.sqrt(np.mean((dra**2 + ddec**2)[bright]))),
                        n_measurements=fit.n_measurements, n_clipped=fit.n_clipped)
    out["peak_rss_mb"] = _Phase.process_peak_kb / 1024.0  # whole process (data + kernels)
    return out


def _child(args, queue):
    try:
        queue.put(run_case(*args))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": repr(exc), "n_visits": args[0]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--visits", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--stars", type=float, default=200.0, help="stars per ccdvisit (default 200)")
    ap.add_argument("--detectors", type=int, default=2)
    ap.add_argument("--order", type=int, default=1, help="astrometric polynomial order (default 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", action="store_true", help="leave BLAS multi-threaded")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for nv in args.visits:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=((nv, args.stars, args.detectors, args.order, args.seed), q))
        p.start()
        res = q.get()
        p.join()
        if "error" in res:
            print(f"{nv} visits: {res['error']}", file=sys.stderr)
            return 1
        results.append(res)
        if not args.json:
            print(f"... {nv} visits done ({res['phot']['fit_s'] + res['astro']['fit_s']:.1f} s of fits)",
                  file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"host": platform.node(), "python": platform.python_version(), "results": results}, indent=1))
        return 0
    print(f"relcal scaling: {args.detectors} detectors/visit, ~{args.stars:.0f} stars/ccdvisit, astrometric order "
          f"{args.order}, BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    print()
    print(f"{'visits':>6} {'ccdvis':>6} {'sources':>8} {'matched':>8} {'stars':>6} {'refs':>5} {'pairs':>8} "
          f"{'match s':>7} {'match MB':>8} {'peak MB':>7}")
    for r in results:
        print(f"{r['n_visits']:>6} {r['n_ccdvisits']:>6} {r['n_sources']:>8} {r['n_matched']:>8} {r['n_stars']:>6} "
              f"{r['n_ref_stars']:>5} {r['n_pairs']:>8} {r['match_s']:>7.2f} {r['match_mb']:>8.0f} "
              f"{r['peak_rss_mb']:>7.0f}")
    for kind, unit, metric in (("phot", "zp rms mmag", "zp_rms_mmag"), ("astro", "pos rms mas", "pos_rms_mas")):
        print()
        print(("photometric" if kind == "phot" else f"astrometric (order {args.order})") + ":")
        print(f"{'visits':>6} {'unknowns':>8} {'prep s':>7} {'accum s':>7} {'solve s':>7} {'method':>14} "
              f"{'fit s':>7} {'wall s':>7} {'iter':>4} {'peak MB':>7} {'buffer MB':>9} {unit:>12}")
        for r in results:
            x = r[kind]
            print(f"{r['n_visits']:>6} {x['unknowns']:>8} {x['prepare_s']:>7.3f} {x['accumulate_s']:>7.3f} "
                  f"{x['solve_s']:>7.3f} {x['method']:>14} {x['fit_s']:>7.2f} {x['fit_wall_s']:>7.2f} "
                  f"{x['iterations']:>4} {x['peak_mb']:>7.0f} {x['buffer_mb']:>9.1f} {x[metric]:>12.2f}")
    print()
    print("times: CPU seconds of the process (BLAS single-threaded); 'wall s': wall time of the fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
