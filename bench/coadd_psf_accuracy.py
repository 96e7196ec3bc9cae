#!/usr/bin/env python
"""How well two coadd PSF models predict the coadd's stars: the star-fit model the objects stage uses
(PSFEx-like, fitted on the coadd's own stars) against the per-position sum of the inputs' calexp PSFs
(``algorithms.stack.CoaddPsf``, Rubin's CoaddPsf), on a finished run.

For every bright (PSF S/N > 100), isolated, non-variable star of the truth in a patch and band: the
PSF-fit flux at its true position (fixed position, uniform weights over the model's stamp) with each
model, divided by the true flux and normalised by its median (the aperture correction removes a
constant).  Printed: the per-star robust scatter (the photometric error the model makes star by star)
and the 3 x 3 grid of medians over the patch (its spatial structure).

Usage (project root, the project's virtualenv)::

    python bench/coadd_psf_accuracy.py --repo demo-repo [--run NAME] [--patch 91] [--band g]

Figures: docs/algorithms-coadd.md ("The coadd's flux scale").
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from lsst_prod.algorithms import masks
from lsst_prod.algorithms.psf import PsfModel
from lsst_prod.algorithms.stack import CoaddPsf, CoaddPsfInput
from lsst_prod.execution.runs import load_run, newest_run
from lsst_prod.repo import Repository
from lsst_prod.repo.formats import read_exposure
from lsst_prod.skymap import SkyMap
from lsst_prod.stages.common import wcs_from_header
from lsst_prod.validate.objects import load_objects, match_truth


def _coadd_psf_from_inputs(repo: Repository, run: str, coadd, patch: int, skymap: SkyMap, stamp: int) -> CoaddPsf:
    tract = int(coadd.data_id["tract"])
    e = read_exposure(repo.path_of(coadd))
    visits = set(json.loads(e.metadata["VISITS"]))
    warps = {int(w.data_id["visit"]): w for w in repo.query("warp", [run]) if int(w.data_id["patch"]) == patch}
    calexps = [c for c in repo.query("calexp", [run]) if int(c.data_id["visit"]) in visits]
    inputs = []
    for v in sorted(visits):
        we = read_exposure(repo.path_of(warps[v]))
        good = ((we.mask & masks.UNUSABLE) == 0) & (we.variance > 0)
        weight = 1.0 / float(np.median(we.variance[good]))  # as stack_warps weighs its inputs
        for c in calexps:
            if int(c.data_id["visit"]) == v:
                ce = read_exposure(repo.path_of(c))
                inputs.append(CoaddPsfInput(PsfModel.from_fits(*ce.psf), wcs_from_header(ce.wcs_header),
                                            ce.image.shape, weight))
    return CoaddPsf(inputs, skymap.tract_info(tract).wcs(), skymap.patch_info(tract, patch).outer, stamp_size=stamp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--run", help="default: the newest run")
    ap.add_argument("--patch", type=int, default=91)
    ap.add_argument("--band", default="g")
    args = ap.parse_args(argv)
    repo = Repository(args.repo)
    run = args.run or newest_run(repo)
    campaign, _ = load_run(repo, run)
    skymap = SkyMap(campaign.config.skymap)
    inp = load_objects(repo, run)
    T, obj = inp.truth, inp.obj
    j = match_truth(inp)
    jj = np.clip(j, 0, None)
    coadd = next((c for c in repo.query("coadd", [run])
                  if int(c.data_id["patch"]) == args.patch and c.data_id["band"] == args.band), None)
    if coadd is None:
        print(f"no coadd of patch {args.patch} band {args.band} in {run}", file=sys.stderr)
        return 2
    e = read_exposure(repo.path_of(coadd))
    star_fit = PsfModel.from_fits(*e.psf)
    size = star_fit.image_at(e.image.shape[1] / 2, e.image.shape[0] / 2).shape[0]
    from_inputs = _coadd_psf_from_inputs(repo, run, coadd, args.patch, skymap, size)
    b = args.band
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = obj[f"{b}_psfFlux"][jj] / obj[f"{b}_psfFluxErr"][jj]
    sel = np.flatnonzero((j >= 0) & (T["kind"] == "star") & ~np.asarray(T["is_variable"], bool) & inp.inner
                        & (snr > 100) & (obj["patch"][jj] == args.patch) & (obj["parentObjectId"][jj] == 0)
                        & (obj["deblend_nChild"][jj] == 0))
    x, y = wcs_from_header(e.wcs_header).all_world2pix(T["ra_t"][sel], T["dec_t"][sel], 0)
    img, h = np.nan_to_num(e.image).astype(float), size // 2
    ratios: dict[str, list[float]] = {"star fit (objects stage)": [], "inputs (CoaddPsf)": []}
    kept = []
    for k, (xs, ys) in enumerate(zip(x, y)):
        ix, iy = int(round(xs)), int(round(ys))
        if ix - h < 0 or iy - h < 0 or ix + h >= img.shape[1] or iy + h >= img.shape[0]:
            continue
        try:
            mi = from_inputs.image_at(xs, ys)
        except ValueError:  # no input covers it
            continue
        d = img[iy - h:iy + h + 1, ix - h:ix + h + 1]
        kept.append(k)
        for name, m in (("star fit (objects stage)", star_fit.image_at(xs, ys, size)), ("inputs (CoaddPsf)", mi)):
            ratios[name].append(float((m * d).sum() / (m * m).sum()) / float(T[f"{b}_flux"][sel][k]))
    xk, yk = x[kept], y[kept]
    qx, qy = np.digitize(xk, np.percentile(xk, [33, 67])), np.digitize(yk, np.percentile(yk, [33, 67]))
    print(f"{run} patch {args.patch} band {b}: {len(kept)} stars (PSF S/N > 100, isolated, non-variable)")
    for name, r in ratios.items():
        r = np.array(r) / np.median(r)
        grid = np.array([[np.median(r[(qx == i) & (qy == q)]) for i in range(3)] for q in range(3)])
        print(f"  {name:26s} per-star scatter {1.4826 * np.median(np.abs(r - 1)):.4f}   "
              f"3x3 medians {grid.min():.4f} - {grid.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
