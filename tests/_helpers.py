"""Helpers shared by the end-to-end tests (import as ``from _helpers import ...``).

Not in conftest.py: several conftest modules exist under tests/, and ``from conftest import``
would pick whichever was imported first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lsst_prod.cli import main

ROOT = Path(__file__).resolve().parents[1]

CAMPAIGN = """
release: dp-test
release_id: 7
instrument: SimCam
repo: repo
site: {site}
bands: [g, r]
stages:
  single_frame: {{}}
retry:
  max_attempts: 2
{extra}
simulation:
  seed: 4242
  n_detectors: 2
  detector_nx: 1024
  detector_ny: 1024
  bands: [g, r]
  n_nights: 2
  visits_per_night_per_band: 1
  star_density_per_deg2: 100000
  n_transients: 0
  n_asteroids: 0
"""


def write_campaign(dirpath: Path, site: str = "threads", extra: str = "") -> Path:
    (dirpath / "sites").mkdir(parents=True, exist_ok=True)
    for name in ("threads", "local", "slurm-localhost"):
        shutil.copy(ROOT / "sites" / f"{name}.yaml", dirpath / "sites" / f"{name}.yaml")
    path = dirpath / "campaign.yaml"
    path.write_text(CAMPAIGN.format(site=f"sites/{site}.yaml", extra=extra))
    return path


def inject_single_frame(visit: int, detector: int, error: str = "algorithm") -> str:
    """Campaign text (``write_campaign(extra=...)``) that fails single_frame (visit, detector) on attempt 1."""
    return f"""inject_failures:
  - stage: single_frame
    data_id: {{visit: {visit}, detector: {detector}}}
    error: {error}
    attempts: [1]
"""


def last_line(out: str) -> str:
    return [line for line in out.strip().splitlines() if line.strip()][-1].strip()


def report_json(repo: Path, run: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["report", run, "--repo", str(repo), "--json"]) == 0
    return json.loads(capsys.readouterr().out)



def count_status(repo_path: Path, run: str, status: str) -> int:
    """Quanta of ``run`` in ``status``, read straight from the database (0 before it exists)."""
    import sqlalchemy as sa

    from lsst_prod.provenance.db import quanta

    engine = sa.create_engine(f"sqlite:///{repo_path / 'registry.sqlite3'}")
    try:
        with engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(quanta)
                             .where((quanta.c.run == run) & (quanta.c.status == status))).scalar()
    except sa.exc.OperationalError:
        return 0
    finally:
        engine.dispose()


def processed_ccd(config):
    """Detector 0 of the first visit of a simulated survey, rendered, through ISR and a first background
    subtraction (mesh 128): (survey, rendering, image, variance, mask, background), as single_frame
    starts from.  Imports inside: most tests never simulate pixels."""
    import numpy as np

    from lsst_prod.algorithms.background import estimate_background
    from lsst_prod.algorithms.isr import run_isr
    from lsst_prod.sim import build_survey, render_ccd
    from lsst_prod.sim.render import _calibs

    survey = build_survey(config)
    vt = survey.visits[0]
    det = survey.camera.detector(0)
    r = render_ccd(config, vt.visit, 0)
    flat, bias, _ = _calibs(config.model_dump_json(), 0, vt.physical_filter)
    isr = run_isr(r.raw, det, bias, flat, np.zeros((det.ny, det.nx), bool), edge_pixels=4)
    image, variance, mask = isr.image.astype(np.float32), isr.variance, isr.mask.copy()
    bg = estimate_background(image, mask, mesh_size=128, filter_size=3)
    return survey, r, image - bg.image, variance, mask, bg
