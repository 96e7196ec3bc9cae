"""Write a whole simulation into a data repository.

The parent process builds the survey, writes the camera, calibrations,
reference catalog, truth tables and visit records, and farms the
(visit, detector) renders out to a ``ProcessPoolExecutor``; workers are pure
(they return arrays, header cards and truth rows), the parent does every write
through ``Repository.put_file``.  Re-running replaces every dataset with an
identical one (same config -> same bytes of pixel data).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config.simulation import SimulationConfig
from .instrument import HeaderCards, bias_structure, calib_header, defects_mask, flat_field
from .refcat import make_refcat
from .render import CcdRender, render_ccd
from .spec import KIND_ASTEROID, KIND_GALAXY, KIND_STAR, KIND_TRANSIENT
from .survey import build_survey
from .truth import truth_ccdvisits_table, truth_objects_table, truth_sources_table, write_parquet

Progress = Callable[[int, int], None]


def _fits_header(cards: HeaderCards) -> list[dict[str, Any]]:
    return [{"name": k, "value": v, "comment": c} for k, v, c in cards]


def write_fits_image(path: Path | str, array: np.ndarray, cards: HeaderCards) -> None:
    """Write ``array`` as the primary HDU of a new FITS file with the given header cards."""
    import fitsio

    fitsio.write(str(path), array, header=_fits_header(cards), clobber=True)


def _render_worker(config_json: str, visit: int, detector: int) -> CcdRender:
    config = SimulationConfig.model_validate_json(config_json)
    return render_ccd(config, visit, detector)


def simulate_to_repo(config: SimulationConfig, repo_root: str | Path, progress: Progress | None = None,
                     *, max_workers: int | None = None) -> dict[str, Any]:
    """Simulate the survey described by ``config`` into the repository at ``repo_root``.

    ``progress(done, total)`` is called as raws are written (total = visits x
    detectors).  ``max_workers``: rendering processes (default
    ``min(os.cpu_count(), number of raws)``; 1 renders in this process).
    Returns a summary dict.
    """
    from ..repo import Repository

    t0 = time.perf_counter()
    survey = build_survey(config)
    camera = survey.camera
    inst = config.instrument
    calib_run, raw_run = f"{inst}/calib", f"{inst}/raw"
    repo = Repository.create(repo_root)

    # ---- camera and calibrations
    repo.put_file("camera", {"instrument": inst}, calib_run, lambda p: Path(p).write_text(camera.to_json()))
    for det in camera.detectors:
        bias = bias_structure(config, det)
        repo.put_file("bias", {"instrument": inst, "detector": det.id}, calib_run,
                      lambda p, a=bias, d=det: write_fits_image(p, a, calib_header(config, camera, d, "bias")))
        mask = defects_mask(config, det)
        repo.put_file("defects", {"instrument": inst, "detector": det.id}, calib_run,
                      lambda p, a=mask, d=det: write_fits_image(p, a, calib_header(config, camera, d, "defects")))
        for pf in camera.physical_filters:
            flat = flat_field(config, camera, det, pf)
            repo.put_file("flat", {"instrument": inst, "detector": det.id, "physical_filter": pf}, calib_run,
                          lambda p, a=flat, d=det, f=pf: write_fits_image(p, a, calib_header(config, camera, d, "flat", f)))

    # ---- reference catalog, object truth, visits
    refcat = make_refcat(config, survey.sky)
    repo.put_file("refcat", {}, "refcats", lambda p: write_parquet(refcat, p))
    objects = truth_objects_table(config, survey.sky)
    repo.put_file("truth_objects", {}, "truth", lambda p: write_parquet(objects, p))
    repo.insert_visits([v.record(inst) for v in survey.visits])

    # ---- raws and per-CCD truth
    tasks = [(v.visit, d.id) for v in survey.visits for d in camera.detectors]
    total = len(tasks)
    workers = max_workers if max_workers is not None else min(os.cpu_count() or 1, total)
    workers = max(1, min(int(workers), max(total, 1)))
    ccd_rows: list[dict[str, Any]] = []
    done = 0
    if progress:
        progress(0, total)

    def handle(res: CcdRender) -> None:
        nonlocal done
        did = {"instrument": inst, "visit": res.visit, "detector": res.detector}
        repo.put_file("raw", did, raw_run, lambda p: write_fits_image(p, res.raw, res.header))
        table = truth_sources_table(config, res.sources, res.visit, res.detector)
        repo.put_file("truth_sources", did, "truth", lambda p: write_parquet(table, p))
        ccd_rows.append(res.ccdvisit)
        done += 1
        if progress:
            progress(done, total)

    if workers == 1:
        for visit, det in tasks:
            handle(render_ccd(config, visit, det))
    else:
        cfg_json = config.model_dump_json()
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_render_worker, cfg_json, visit, det) for visit, det in tasks]
            try:
                for fut in cf.as_completed(futures):
                    handle(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    ccd_table = truth_ccdvisits_table(config, ccd_rows)
    repo.put_file("truth_ccdvisits", {}, "truth", lambda p: write_parquet(ccd_table, p))

    kinds = survey.sky.kind
    return {
        "instrument": inst,
        "repo": str(Path(repo_root).resolve()),
        "seed": config.seed,
        "n_visits": len(survey.visits),
        "n_detectors": len(camera.detectors),
        "n_raws": total,
        "visits": [v.visit for v in survey.visits],
        "bands": list(config.bands),
        "n_objects": len(survey.sky),
        "n_stars": int(np.count_nonzero(kinds == KIND_STAR)),
        "n_galaxies": int(np.count_nonzero(kinds == KIND_GALAXY)),
        "n_transients": int(np.count_nonzero(kinds == KIND_TRANSIENT)),
        "n_asteroids": int(np.count_nonzero(kinds == KIND_ASTEROID)),
        "n_refcat": int(refcat.num_rows),
        "workers": workers,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
