#!/usr/bin/env python
"""The survey matrix: the whole release on simulated surveys unlike dp-mini, every metric per survey.

Each survey starts from ``campaigns/dp-mini.yaml`` and changes its ``simulation`` block (sky
position, density, seeing, detectors, bands, pointing errors), then runs as a user would:
``lsst-prod simulate`` -> ``submit`` -> ``report --json`` -> ``validate --json --strict``.  A
survey passes when ``validate --strict`` passes (every metric of every enabled stage present
and in bounds) and no gather quantum was blocked (a failed single-frame quantum may cost its own
detector-visit: its forced photometry and the warps that only it covered; nothing else).

Usage (from the project root, with the project's virtualenv)::

    python bench/survey_matrix.py [--only NAME ...] [--workdir DIR] [--keep] [--json-out FILE] [--list]

Exit codes: 0 every survey passed, 1 some survey failed, 2 bad arguments.
Figures: docs/performance.md ("Survey matrix").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: name -> (what it probes, changes to the campaign's simulation block, campaign bands)
SURVEYS: dict[str, tuple[str, dict[str, Any], list[str] | None]] = {
    "dp-mini": ("the demo survey itself (reference row)", {}, None),
    "ra-wrap": ("field across RA = 0, southern sky, r/i, good seeing 0.5-0.9\"",
                {"field_ra_deg": 359.98, "field_dec_deg": -31.0, "bands": ["r", "i"],
                 "seeing_min_arcsec": 0.5, "seeing_max_arcsec": 0.9, "seed": 7101}, ["r", "i"]),
    "crowded-bad-seeing": ("3x dp-mini's density (600,000 stars/deg2) at 1.2-2.0\" seeing, 4 detectors, brighter sky",
                           {"field_ra_deg": 271.0, "field_dec_deg": -29.0, "n_detectors": 4, "n_nights": 4,
                            "star_density_per_deg2": 600000, "seeing_min_arcsec": 1.2,
                            "seeing_max_arcsec": 2.0, "sky_factor_min": 1.2, "sky_factor_max": 2.0,
                            "seed": 7102}, None),
    "sparse-north": ("dec +75 from a northern site (lat +32), a tenth of dp-mini's stars, i/z, 0.7-1.4\"",
                     {"field_ra_deg": 40.0, "field_dec_deg": 75.0, "star_density_per_deg2": 10000,
                      "site_latitude_deg": 31.96, "site_longitude_deg": -111.6,
                      "bands": ["i", "z"], "seeing_min_arcsec": 0.7, "seeing_max_arcsec": 1.4,
                      "seed": 7103}, ["i", "z"]),
    "polar-south-offsets": ("dec -75, 4 detectors, 1' pointing and 1 deg rotator errors, g/i",
                            {"field_ra_deg": 120.0, "field_dec_deg": -75.0, "n_detectors": 4, "n_nights": 4,
                             "bands": ["g", "i"], "pointing_error_rms_arcsec": 60.0,
                             "rotation_error_rms_arcsec": 3600.0, "seed": 7104}, ["g", "i"]),
}

GATHER_STAGES = ("visit_summary", "relcal", "coadd", "objects")


def _campaign(name: str, sim: dict[str, Any], bands: list[str] | None, workdir: Path) -> Path:
    doc = yaml.safe_load((ROOT / "campaigns" / "dp-mini.yaml").read_text())
    doc["release"] = f"matrix-{name}"
    doc["repo"] = str(workdir / name / "repo")
    doc["site"] = str(ROOT / "sites" / "local.yaml")
    doc["simulation"] = {**doc["simulation"], **sim}
    if bands:
        doc["bands"] = bands
    path = workdir / name / "campaign.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cli(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("lsst-prod") or str(Path(sys.executable).parent / "lsst-prod")
    return subprocess.run([exe, *args], capture_output=capture, text=True)


def run_survey(name: str, workdir: Path) -> dict[str, Any]:
    what, sim, bands = SURVEYS[name]
    campaign = _campaign(name, sim, bands, workdir)
    repo = str(workdir / name / "repo")
    out: dict[str, Any] = {"survey": name, "what": what}
    t0 = time.perf_counter()
    p = _cli("simulate", str(campaign), "--repo", repo)
    out["simulate_s"] = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        return out | {"pass": False, "error": f"simulate exit {p.returncode}: {p.stderr.strip()[-500:]}"}
    t1 = time.perf_counter()
    p = _cli("submit", str(campaign), "--repo", repo, "--no-progress")
    out["submit_s"] = round(time.perf_counter() - t1, 1)
    lines = [x for x in p.stdout.strip().splitlines() if x.strip()]
    if p.returncode == 2 or not lines:
        return out | {"pass": False, "error": f"submit exit {p.returncode}: {p.stderr.strip()[-500:]}"}
    run = lines[-1].strip()
    out["run"] = run
    rep = json.loads(_cli("report", run, "--repo", repo, "--json").stdout)
    t = rep["totals"]
    blocked_gather = [f["quantum_id"] for f in rep["failures"]
                      if f["status"] == "blocked" and f["stage"] in GATHER_STAGES]
    out["quanta"] = {k: t.get(k, 0) for k in ("quanta", "succeeded", "nowork", "failed", "blocked", "partial",
                                              "inputs_left_out")}
    out["failures"] = [f"{f['quantum_id']}: {f['error_class']}: {(f['error_message'] or '')[:120]}"
                       for f in rep["failures"] if f["status"] == "failed"]
    out["blocked_gather"] = blocked_gather
    v = _cli("validate", run, "--repo", repo, "--json", "--strict")
    try:
        metrics = json.loads(v.stdout)
    except ValueError:
        return out | {"pass": False, "error": f"validate exit {v.returncode}: {v.stderr.strip()[-500:]}"}
    out["validate_exit"] = v.returncode
    out["metrics"] = metrics
    out["pass"] = v.returncode == 0 and not blocked_gather
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def _checks(metrics: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    """(metric, value, bound, status) rows from validate's JSON (its `checks` block; status is
    pass, fail, missing or insufficient)."""
    return [(name, c.get("value"), str(c.get("bound", "")), str(c.get("status")))
            for name, c in (metrics.get("checks") or {}).items() if isinstance(c, dict)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"surveys to run (default all: {', '.join(SURVEYS)})")
    ap.add_argument("--workdir", type=Path, help="where repositories go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the repositories")
    ap.add_argument("--json-out", type=Path, help="write every result as JSON here")
    ap.add_argument("--list", action="store_true", help="list the surveys and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, sim, _) in SURVEYS.items():
            print(f"{name:22s} {what}\n{'':22s} {sim}")
        return 0
    names = args.only or list(SURVEYS)
    unknown = [n for n in names if n not in SURVEYS]
    if unknown:
        print(f"unknown survey(s) {unknown}; known: {', '.join(SURVEYS)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="survey-matrix-"))
    results = []
    try:
        for name in names:
            print(f"== {name}: {SURVEYS[name][0]}", flush=True)
            r = run_survey(name, workdir)
            results.append(r)
            q = r.get("quanta", {})
            print(f"   {'PASS' if r.get('pass') else 'FAIL'}  quanta {q.get('quanta')} failed {q.get('failed')} "
                  f"blocked {q.get('blocked')} (gather {len(r.get('blocked_gather', []))}) partial "
                  f"{q.get('partial')}  simulate {r.get('simulate_s')} s, submit {r.get('submit_s')} s"
                  + (f"  error: {r['error']}" if r.get("error") else ""), flush=True)
            for f in r.get("failures", [])[:5]:
                print(f"   failed: {f}")
            for m, val, bound, status in _checks(r.get("metrics", {})):
                print(f"   {status:12s} {m:44s} {_fmt(val):>10s}  {bound}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))
    print("\nsurvey                 pass  quanta  failed  blocked  partial")
    for r in results:
        q = r.get("quanta", {})
        print(f"{r['survey']:22s} {'yes ' if r.get('pass') else 'NO  '} {_fmt(q.get('quanta')):>6s} "
              f"{_fmt(q.get('failed')):>7s} {_fmt(q.get('blocked')):>8s} {_fmt(q.get('partial')):>8s}")
    return 0 if all(r.get("pass") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
