"""Reports built from provenance: per-stage counts, failures with reasons, timings, attempts.

``build_report`` returns plain data (the JSON of ``report --json``); the CLI
renders it with rich.  Nothing here prints.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa

from ..repo import DataId, Repository
from .db import attempt_datasets, attempts, left_out, quanta

STATUSES = ("succeeded", "nowork", "failed", "blocked", "running", "submitted", "planned")


def build_report(repo: Repository, run: str, with_quanta: bool = True) -> dict[str, Any]:
    with repo.engine.connect() as c:
        qrows = list(c.execute(sa.select(quanta).where(quanta.c.run == run).order_by(quanta.c.quantum_id)))
        arows = list(c.execute(sa.select(attempts).where(attempts.c.run == run).order_by(attempts.c.id)))
        lrows = _left_out_rows(c, run)
    if not qrows:
        raise KeyError(f"run {run!r} has no quanta in {repo.root}")
    runs = {r["name"]: r for r in repo.registry.list_runs()}
    stages: dict[str, dict[str, Any]] = {}
    for q in qrows:
        s = stages.setdefault(q.stage, {"quanta": 0, **{k: 0 for k in STATUSES}})
        s["quanta"] += 1
        s[q.status] = s.get(q.status, 0) + 1
    by_stage_attempts: dict[str, list] = defaultdict(list)
    per_quantum: dict[str, list] = defaultdict(list)
    for a in arows:
        by_stage_attempts[a.stage].append(a)
        per_quantum[a.quantum_id].append(a)
    for stage, rows in by_stage_attempts.items():
        walls = [r.wall_s for r in rows if r.wall_s is not None]
        cpus = [r.cpu_s for r in rows if r.cpu_s is not None]
        mems = [r.peak_rss_mib for r in rows if r.peak_rss_mib is not None]
        stages[stage]["attempts"] = len(rows)
        stages[stage]["retries"] = len(rows) - len({r.quantum_id for r in rows})
        stages[stage]["timing"] = {
            "wall_s_median": statistics.median(walls) if walls else None,
            "wall_s_max": max(walls) if walls else None,
            "wall_s_total": sum(walls) if walls else None,
            "cpu_s_total": sum(cpus) if cpus else None,
            "peak_rss_mib_max": max(mems) if mems else None,
        }
        stages[stage]["summary"] = _aggregate_summaries(
            [json.loads(r.summary) for r in rows if r.outcome == "succeeded" and r.summary]
        )
    # inputs each quantum's latest attempt ran without (gather stages on partial inputs)
    lost_by_attempt: dict[int, list] = defaultdict(list)
    for r in lrows:
        lost_by_attempt[r.attempt_id].append(r)
    partial = []
    for q in qrows:
        tries = per_quantum.get(q.quantum_id, [])
        lost = lost_by_attempt.get(tries[-1].id, []) if tries else []
        s_ = stages[q.stage]
        s_.setdefault("partial", 0)
        s_.setdefault("inputs_left_out", 0)
        if not lost or q.status not in ("succeeded", "nowork"):
            continue
        s_["partial"] += 1
        s_["inputs_left_out"] += len(lost)
        partial.append({
            "quantum_id": q.quantum_id,
            "stage": q.stage,
            "data_id": DataId.from_key(q.data_id).to_dict(),
            "n_left_out": len(lost),
            "left_out": [{"dataset_type": r.dataset_type, "data_id": DataId.from_key(r.data_id).to_dict(),
                          "producer": r.producer, "reason": r.reason} for r in lost],
            "why": _summarise_causes(lost),
        })
    # inputs each quantum's latest successful attempt set aside itself (data quality, not failures)
    excluded = []
    for q in qrows:
        tries = per_quantum.get(q.quantum_id, [])
        if not tries or q.status != "succeeded" or not tries[-1].summary:
            continue
        ex = json.loads(tries[-1].summary).get("excluded") or []
        if ex:
            s_ = stages[q.stage]
            s_["excluded"] = s_.get("excluded", 0) + len(ex)
            excluded.append({"quantum_id": q.quantum_id, "stage": q.stage,
                             "data_id": DataId.from_key(q.data_id).to_dict(), "n_excluded": len(ex),
                             "excluded": ex, "why": _summarise_exclusions(ex)})
    failures = []
    for q in qrows:
        if q.status in ("failed", "blocked"):
            tries = per_quantum.get(q.quantum_id, [])
            last = tries[-1] if tries else None
            meta = json.loads(last.error_metadata) if last is not None and last.error_metadata else {}
            meta.pop("traceback", None) if q.status == "blocked" else None
            failures.append({
                "quantum_id": q.quantum_id,
                "stage": q.stage,
                "data_id": DataId.from_key(q.data_id).to_dict(),
                "status": q.status,
                "attempts": q.n_attempts,
                "error_class": q.error_class,
                "error_message": q.error_message,
                "error_metadata": meta,
            })
    # failures first (the causes), then what they blocked
    failures.sort(key=lambda f: (f["status"] != "failed", f["quantum_id"]))
    starts = [a.start for a in arows if a.start]
    ends = [a.end for a in arows if a.end]
    report: dict[str, Any] = {
        "run": run,
        "info": runs.get(run, {}).get("info", {}),
        "created": runs.get(run, {}).get("created"),
        "first_start": min(starts) if starts else None,
        "last_end": max(ends) if ends else None,
        "hosts": sorted({a.host for a in arows if a.host}),
        "totals": {k: sum(s.get(k, 0) for s in stages.values()) for k in ("quanta", *STATUSES)},
        "stages": stages,
        "failures": failures,
        "partial": partial,
        "excluded": excluded,
    }
    report["totals"]["attempts"] = len(arows)
    report["totals"]["partial"] = len(partial)
    report["totals"]["inputs_left_out"] = sum(p["n_left_out"] for p in partial)
    report["totals"]["inputs_excluded"] = sum(e["n_excluded"] for e in excluded)
    report["complete"] = report["totals"]["quanta"] == report["totals"]["succeeded"] + report["totals"]["nowork"]
    if with_quanta:
        report["quanta"] = [
            {
                "quantum_id": q.quantum_id,
                "stage": q.stage,
                "data_id": DataId.from_key(q.data_id).to_dict(),
                "status": q.status,
                "slurm_job_id": per_quantum[q.quantum_id][-1].slurm_job_id if per_quantum.get(q.quantum_id) else None,
                "node": per_quantum[q.quantum_id][-1].node if per_quantum.get(q.quantum_id) else None,
                "left_out": [
                    {"dataset_type": r.dataset_type, "data_id": DataId.from_key(r.data_id).to_dict(),
                     "producer": r.producer, "reason": r.reason}
                    for r in (lost_by_attempt.get(per_quantum[q.quantum_id][-1].id, [])
                              if per_quantum.get(q.quantum_id) else [])
                ],
                "attempts": [
                    {
                        "attempt": a.attempt, "outcome": a.outcome, "error_class": a.error_class,
                        "error_message": a.error_message, "host": a.host, "node": a.node, "pid": a.pid,
                        "slurm_job_id": a.slurm_job_id, "executor": a.executor, "memory_class": a.memory_class,
                        "start": a.start, "end": a.end, "wall_s": a.wall_s, "cpu_s": a.cpu_s,
                        "peak_rss_mib": a.peak_rss_mib, "code_version": a.code_version,
                        "summary": json.loads(a.summary) if a.summary else {},
                    }
                    for a in per_quantum.get(q.quantum_id, [])
                ],
            }
            for q in qrows
        ]
    return report


def _left_out_rows(conn, run: str) -> list:
    """Rows of the ``left_out`` table for ``run`` (none in a repository made before it existed)."""
    if not sa.inspect(conn).has_table(left_out.name):
        return []
    return list(conn.execute(sa.select(left_out).where(left_out.c.run == run)))


def partial_quanta(repo: Repository, run: str) -> dict[str, tuple[str, int]]:
    """Quanta whose latest attempt succeeded on partial inputs: quantum -> (stage, inputs left out)."""
    with repo.engine.connect() as c:
        if not sa.inspect(c).has_table(left_out.name):
            return {}
        latest = (sa.select(attempts.c.quantum_id, sa.func.max(attempts.c.id).label("aid"))
                  .where(attempts.c.run == run).group_by(attempts.c.quantum_id).subquery())
        rows = c.execute(sa.select(latest.c.quantum_id, quanta.c.stage, sa.func.count())
                         .join(left_out, left_out.c.attempt_id == latest.c.aid)
                         .join(quanta, (quanta.c.run == run) & (quanta.c.quantum_id == latest.c.quantum_id))
                         .where(quanta.c.status.in_(("succeeded", "nowork")))
                         .group_by(latest.c.quantum_id, quanta.c.stage))
        return {qid: (str(stage), int(n)) for qid, stage, n in rows}


def _summarise_causes(rows) -> str:
    """'5 source, 5 ccdVisit (single_frame failed: AlgorithmError)' from left_out rows."""
    by_cause: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        cause = (r.reason or "").split(":")[0].strip() or "?"
        detail = (r.reason or "").split(":")[1].strip() if ":" in (r.reason or "") else ""
        key = f"{r.producer.split(':')[0]} {cause}" + (f": {detail}" if detail else "")
        by_cause[key][r.dataset_type] += 1
    return "; ".join(", ".join(f"{n} {t}" for t, n in types.items()) + f" ({cause})"
                     for cause, types in by_cause.items())


def _summarise_exclusions(items: list[dict[str, Any]]) -> str:
    """'3 source (fewer than 20 matched stars for the astrometric fit)' from a summary's ``excluded``."""
    by_reason: dict[str, Counter] = defaultdict(Counter)
    for x in items:
        by_reason[str(x.get("reason") or "?")][str(x.get("dataset_type") or "?")] += 1
    return "; ".join(", ".join(f"{n} {t}" for t, n in types.items()) + f" ({reason})"
                     for reason, types in by_reason.items())


def _aggregate_summaries(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric summary key across a stage's successful attempts (and sums of counts)."""
    keys = sorted({k for it in items for k, v in it.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(it[k]) for it in items if isinstance(it.get(k), (int, float)) and it[k] == it[k]]
        if not vals:
            continue
        if k.startswith("n_"):
            out[k + "_total"] = int(sum(vals))
        else:
            out[k + "_median"] = statistics.median(vals)
    return out


def status_counts(repo: Repository, run: str) -> dict[str, dict[str, int]]:
    """Live per-stage status counts (for ``status``)."""
    with repo.engine.connect() as c:
        rows = c.execute(
            sa.select(quanta.c.stage, quanta.c.status, sa.func.count())
            .where(quanta.c.run == run)
            .group_by(quanta.c.stage, quanta.c.status)
        )
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for stage, status, n in rows:
            out[stage][status] = int(n)
    return dict(out)


def lineage(repo: Repository, run: str, path: str, max_depth: int = 20) -> dict[str, Any]:
    """The chain of attempts that produced ``path`` back to datasets no quantum produced (raw pixels,
    calibrations, reference catalogues).  Returns a tree of {dataset, produced_by, inputs}."""
    with repo.engine.connect() as c:

        def node(p: str, depth: int) -> dict[str, Any]:
            row = c.execute(
                sa.select(attempt_datasets.c.attempt_id, attempt_datasets.c.checksum, attempt_datasets.c.dataset_type,
                          attempt_datasets.c.data_id)
                .join(attempts, attempts.c.id == attempt_datasets.c.attempt_id)
                .where((attempt_datasets.c.path == p) & (attempt_datasets.c.role == "output")
                       & (attempts.c.outcome == "succeeded"))
                .order_by(attempt_datasets.c.attempt_id.desc())
            ).first()
            if row is None or depth >= max_depth:
                return {"path": p, "produced_by": None}
            a = c.execute(sa.select(attempts).where(attempts.c.id == row.attempt_id)).first()
            ins = c.execute(
                sa.select(attempt_datasets).where(
                    (attempt_datasets.c.attempt_id == row.attempt_id) & (attempt_datasets.c.role == "input")
                )
            ).fetchall()
            return {
                "path": p,
                "dataset_type": row.dataset_type,
                "data_id": json.loads(row.data_id),
                "checksum": row.checksum,
                "produced_by": {"run": a.run, "quantum_id": a.quantum_id, "attempt": a.attempt, "host": a.host,
                                "start": a.start, "code_version": a.code_version,
                                "params": json.loads(a.params or "{}")},
                "inputs": [
                    node(i.path, depth + 1) | {"dataset_type": i.dataset_type, "data_id": json.loads(i.data_id),
                                               "checksum": i.checksum}
                    for i in ins
                ],
            }

        return node(path, 0)
