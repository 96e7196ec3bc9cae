#!/usr/bin/env python
"""How honest are the forced-photometry errors?  Median chi2/dof of constant stars by S/N, on a finished run.

For every isolated (no truth neighbour within 3 FWHM), non-variable truth star matched to an Object, the
chi2 of its forced light curve about its weighted mean (per band, summed) over the degrees of freedom,
binned by the star's median per-visit S/N (truth flux / error).  Two rows: with ``psfFluxErr`` as the
pipeline writes it, and with the statistical part alone (``sqrt(psfFluxErr^2 - psfFluxErrCalib^2)``,
when the run has that column).  Correct errors give a median near 1 in every bin (a little below: the
median of chi2/dof for ~15 degrees of freedom is ~0.95); an excess that grows with S/N is a
multiplicative error the errors leave out.  ``validate`` scores the S/N 10-50 stars only
(``forced_constant_chi2_dof_median``); this prints the whole range.

Usage (project root, the project's virtualenv)::

    python bench/forced_chi2_by_snr.py --repo demo-repo [--run NAME]

Figures: docs/algorithms-objects.md ("The calibration's uncertainty in the errors").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy import stats
from scipy.spatial import cKDTree

from lsst_prod.execution.runs import newest_run
from lsst_prod.repo import Repository
from lsst_prod.repo.formats import read_columns
from lsst_prod.validate.objects import ISOLATION_FWHM, VAR_ALPHA, chord, load_objects, match_truth, unit_vectors

BINS = ((0.0, 10.0), (10.0, 30.0), (30.0, 100.0), (100.0, 300.0), (300.0, np.inf))


def chi2_table(repo: Repository, run: str) -> dict[str, list[tuple[int, float, float]]]:
    """{"psfFluxErr": [(n, median chi2/dof, rejected fraction) per S/N bin], "statistical": [...]}."""
    inp = load_objects(repo, run)
    if inp is None:
        raise SystemExit(f"run {run} has no objects")
    T, j = inp.truth, match_truth(inp)
    cols = ["objectId", "band", "psfFlux", "psfFluxErr", "psfFlux_flag"]
    parts = []
    for ref in repo.query("forcedSource", [run]):
        path = repo.path_of(ref)
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        parts.append(read_columns(path, cols + (["psfFluxErrCalib"] if "psfFluxErrCalib" in names else [])))
    if not parts:
        raise SystemExit(f"run {run} has no forcedSource")
    F = {k: np.concatenate([p[k] for p in parts]) for k in cols}
    calib = np.concatenate([p.get("psfFluxErrCalib", np.zeros(len(p["objectId"]))) for p in parts])
    ok = ~np.asarray(F["psfFlux_flag"], bool) & np.isfinite(F["psfFlux"]) & (F["psfFluxErr"] > 0)
    u = unit_vectors(T["ra_t"], T["dec_t"])
    nn, _ = cKDTree(u).query(u, k=2)
    iso = nn[:, 1] > chord(ISOLATION_FWHM * inp.fwhm_arcsec)
    const = (T["kind"] == "star") & (j >= 0) & ~np.asarray(T["is_variable"], bool) & iso
    order = np.argsort(F["objectId"], kind="stable")
    sorted_ids = F["objectId"][order]
    out = {}
    for label, err in (("psfFluxErr", F["psfFluxErr"]),
                       ("statistical", np.sqrt(np.maximum(F["psfFluxErr"] ** 2 - calib**2, 0.0)))):
        rows = []
        for i in np.flatnonzero(const):
            oid = inp.obj["objectId"][j[i]]
            idx = order[np.searchsorted(sorted_ids, oid): np.searchsorted(sorted_ids, oid, "right")]
            idx = idx[ok[idx] & (err[idx] > 0)]
            chi, dof, snr = 0.0, 0, []
            for b in np.unique(F["band"][idx]):
                k = idx[F["band"][idx] == b]
                if len(k) < 2 or f"{b}_flux" not in T:
                    continue
                w = 1.0 / err[k] ** 2
                mean = np.sum(w * F["psfFlux"][k]) / np.sum(w)
                chi += float(np.sum(w * (F["psfFlux"][k] - mean) ** 2))
                dof += len(k) - 1
                snr.append(float(T[f"{b}_flux"][i]) / err[k])
            if dof:
                rows.append((float(np.median(np.concatenate(snr))), chi / dof, chi > stats.chi2.isf(VAR_ALPHA, dof)))
        r = np.array(rows, float).reshape(-1, 3)
        out[label] = [(int(s.sum()), float(np.median(r[s, 1])) if s.any() else float("nan"),
                       float(r[s, 2].mean()) if s.any() else float("nan"))
                      for s in ((r[:, 0] >= lo) & (r[:, 0] < hi) for lo, hi in BINS)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="repository of a finished run with forced photometry")
    ap.add_argument("--run", help="run name (default: the newest run)")
    args = ap.parse_args(argv)
    repo = Repository(args.repo)
    run = args.run or newest_run(repo)
    table = chi2_table(repo, run)
    head = " | ".join(f"S/N {lo:g}-{hi:g}" for lo, hi in BINS)
    print(f"run {run}: median chi2/dof (n, rejected at alpha {VAR_ALPHA:g}) of isolated constant stars")
    print(f"{'errors':12s} | {head}")
    for label, cells in table.items():
        print(f"{label:12s} | " + " | ".join(f"{m:.2f} ({n}, {fp * 100:.1f} %)" for n, m, fp in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
