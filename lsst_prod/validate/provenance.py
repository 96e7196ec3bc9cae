"""What validation reads from provenance: which stages the run has, and which quanta it left out.

A stage is *enabled* when the run has at least one quantum of it that is not ``nowork``: all its
metrics are then owed (``checks.REQUIRED``).  Metrics are computed on whatever outputs exist; the
quanta that produced none (``failed``, or ``blocked`` behind a failure) are counted per stage so the
report says what the numbers do not cover.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..provenance.db import quanta
from ..repo import Repository

LEFT_OUT_STATUSES = ("failed", "blocked")


def _counts(repo: Repository, run: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    try:
        with repo.engine.connect() as c:
            rows = c.execute(sa.select(quanta.c.stage, quanta.c.status, sa.func.count())
                             .where(quanta.c.run == run).group_by(quanta.c.stage, quanta.c.status))
            for stage, status, n in rows:
                out.setdefault(str(stage), {})[str(status)] = int(n)
    except sa.exc.OperationalError:  # a repository without provenance tables
        return {}
    return out


def enabled_stages(repo: Repository, run: str) -> set[str]:
    return {stage for stage, by in _counts(repo, run).items() if any(s != "nowork" and n for s, n in by.items())}


def _partial(repo: Repository, run: str) -> dict[str, dict[str, int]]:
    """Per stage: quanta whose latest attempt ran on partial inputs, and the inputs they left out."""
    from ..provenance.report import partial_quanta

    out: dict[str, dict[str, int]] = {}
    try:
        for stage, n in partial_quanta(repo, run).values():
            d = out.setdefault(stage, {"partial": 0, "inputs_left_out": 0})
            d["partial"] += 1
            d["inputs_left_out"] += n
    except sa.exc.OperationalError:
        return {}
    return out


def _excluded(repo: Repository, run: str) -> dict[str, int]:
    """Per stage: inputs its quanta set aside themselves (too few stars...), from the attempts' summaries."""
    from ..provenance.report import build_report

    try:
        report = build_report(repo, run, with_quanta=False)
    except (KeyError, sa.exc.OperationalError):
        return {}
    return {stage: int(s["excluded"]) for stage, s in report["stages"].items() if s.get("excluded")}


def left_out_quanta(repo: Repository, run: str) -> dict[str, dict[str, int]]:
    """Per stage with any: {"failed": n, "blocked": n, "partial": n, "inputs_left_out": n,
    "inputs_excluded": n, "quanta": total}: quanta that produced nothing, gather quanta that ran
    without some of their inputs, and inputs a quantum set aside itself for what they hold
    (stages with none are omitted)."""
    out = {}
    partial = _partial(repo, run)
    excluded = _excluded(repo, run)
    for stage, by in sorted(_counts(repo, run).items()):
        lo = {s: int(by.get(s, 0)) for s in LEFT_OUT_STATUSES}
        lo.update(partial.get(stage, {"partial": 0, "inputs_left_out": 0}))
        lo["inputs_excluded"] = excluded.get(stage, 0)
        if any(lo.values()):
            out[stage] = {**lo, "quanta": int(sum(by.values()))}
    return out
