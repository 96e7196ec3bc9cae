#!/usr/bin/env python
"""What measuring with the inputs' per-position coadd PSF costs the objects stage, on a finished run.

Runs the objects stage's quantum for one patch of a finished run twice in this process, outputs
discarded: with ``objects.psf_from_inputs`` true (``algorithms.stack.CoaddPsf`` from the inputs the
coadd stores, the default) and false (the PSF fitted on the coadd's own stars).  Prints the wall time
of each and the per-band aperture-correction figures (its per-star rms is the scatter of the inputs'
calibrated fluxes over the coadd PSF fluxes: how well each PSF predicts the coadd's stars).

Usage (project root, the project's virtualenv)::

    python bench/objects_psf_cost.py --repo demo-repo [--run NAME] [--patch 91] [--grid 100]

Figures: docs/algorithms-coadd.md ("The per-position coadd PSF").
"""

from __future__ import annotations

import argparse
import sys
import time

from lsst_prod.config.stages import ObjectsConfig
from lsst_prod.execution.runs import load_run, newest_run
from lsst_prod.repo import DataId, Repository
from lsst_prod.stages.base import QuantumContext
from lsst_prod.stages.objects import ObjectsStage


def run_objects(repo: Repository, run: str, patch: int, skymap: dict, config: ObjectsConfig) -> tuple[float, dict]:
    inputs = {("coadd", r.data_id): r for r in repo.query("coadd", [run]) if int(r.data_id["patch"]) == patch}
    if not inputs:
        raise SystemExit(f"no coadd of patch {patch} in {run}")
    first = next(iter(inputs))[1]
    did = DataId(skymap=first["skymap"], tract=first["tract"], patch=patch)
    ctx = QuantumContext(repo, f"bench/objects-psf-cost/{time.time():.0f}", "objects", did, config, inputs,
                         release_id=1, extra={"skymap": skymap})
    ctx.put = lambda dataset_type, write: None  # measure only: nothing is written
    t0 = time.perf_counter()
    ObjectsStage().run_quantum(ctx)
    return time.perf_counter() - t0, ctx.summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--run", help="default: the newest run")
    ap.add_argument("--patch", type=int, default=91)
    ap.add_argument("--grid", type=int, default=ObjectsConfig().psf_grid_pixels, help="objects.psf_grid_pixels")
    args = ap.parse_args(argv)
    repo = Repository(args.repo)
    run = args.run or newest_run(repo)
    campaign, _ = load_run(repo, run)
    skymap = campaign.config.skymap.model_dump()
    print(f"{run} patch {args.patch}")
    for label, from_inputs in (("inputs (CoaddPsf)", True), ("star fit", False)):
        cfg = ObjectsConfig(psf_from_inputs=from_inputs, psf_grid_pixels=args.grid)
        wall, s = run_objects(repo, run, args.patch, skymap, cfg)
        bands = sorted(k[: -len("_apcorr")] for k in s if k.endswith("_apcorr"))
        figures = "  ".join(f"{b}: apcorr {s[f'{b}_apcorr']:.4f} +- {s[f'{b}_apcorr_error']:.4f}, per-star rms "
                            f"{s[f'{b}_apcorr_rms']:.4f} ({s[f'{b}_apcorr_n_stars']} stars)" for b in bands)
        print(f"  {label:18s} {wall:6.1f} s  {s['n_objects']} objects  {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
