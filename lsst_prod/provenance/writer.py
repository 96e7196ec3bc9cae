"""The single provenance writer: only the driver process calls it.

Recording an attempt is one transaction: the attempt row, its input/output
dataset rows, the registration of its outputs (on success) and the quantum's
new status commit together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from ..repo import DataId, DatasetRef, Repository
from ..repo.registry import utcnow
from .db import attempt_datasets, attempts, left_out, quanta


class ProvenanceWriter:
    def __init__(self, repo: Repository, run: str) -> None:
        self.repo = repo
        self.run = run
        self.engine = repo.engine
        left_out.create(self.engine, checkfirst=True)  # repositories made before the table existed

    def plan(self, graph, campaign_info: dict[str, Any] | None) -> None:
        """Create the run and one 'planned' row per quantum (keeps existing rows on restart)."""
        now = utcnow()
        with self.engine.begin() as c:
            self.repo.registry.ensure_run(self.run, "processing", campaign_info, conn=c)
            existing = {r.quantum_id for r in c.execute(sa.select(quanta.c.quantum_id).where(quanta.c.run == self.run))}
            rows = [
                {"run": self.run, "quantum_id": q.id, "stage": q.stage, "data_id": q.data_id.key(),
                 "status": "planned", "n_attempts": 0, "updated": now}
                for q in graph if q.id not in existing
            ]
            if rows:
                c.execute(quanta.insert(), rows)

    def record_lost_in_flight(self, previous_driver: dict[str, Any]) -> list[str]:
        """Attempts that a dead driver had in flight (quanta left ``submitted`` or ``running``)
        become failed attempts of class ``DriverLost``, so provenance shows every attempt that
        was started; returns their quantum IDs.  Called by ``restart`` once it holds the lock."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(quanta.c.quantum_id, quanta.c.stage, quanta.c.data_id, quanta.c.n_attempts,
                                       quanta.c.status)
                             .where((quanta.c.run == self.run) & quanta.c.status.in_(("submitted", "running"))))
            rows = list(rows)
        who = f"pid {previous_driver.get('pid', '?')} on {previous_driver.get('host', '?')}"
        for r in rows:
            self.record_attempt({
                "quantum_id": r.quantum_id, "stage": r.stage, "data_id": DataId.from_key(r.data_id).to_dict(),
                "attempt": int(r.n_attempts or 0) + 1, "outcome": "failed", "error_class": "DriverLost",
                "error_message": f"the driver ({who}, started {previous_driver.get('started', '?')}) died while "
                                 f"this attempt was {r.status}; its result, if any, was never recorded",
                "end": utcnow(),
            }, final_status="planned")
        return [r.quantum_id for r in rows]

    def set_status(self, quantum_ids: Iterable[str], status: str, error_class: str | None = None,
                   error_message: str | None = None) -> None:
        ids = list(quantum_ids)
        if not ids:
            return
        with self.engine.begin() as c:
            for chunk in _chunks(ids, 500):
                c.execute(
                    quanta.update()
                    .where((quanta.c.run == self.run) & quanta.c.quantum_id.in_(chunk))
                    .values(status=status, error_class=error_class, error_message=error_message, updated=utcnow())
                )

    def record_attempt(self, record: dict[str, Any], final_status: str) -> int:
        """Store one attempt; register its outputs if it succeeded; set the quantum's status."""
        outputs = [DatasetRef.from_dict(o) for o in record.get("outputs", [])]
        with self.engine.begin() as c:
            res = c.execute(
                attempts.insert().values(
                    run=self.run,
                    quantum_id=record["quantum_id"],
                    attempt=record["attempt"],
                    stage=record["stage"],
                    data_id=DataId(record["data_id"]).key(),
                    outcome=record["outcome"],
                    error_class=record.get("error_class"),
                    error_message=record.get("error_message"),
                    error_metadata=json.dumps(record.get("error_metadata") or {}, default=str),
                    host=record.get("host"),
                    node=record.get("node"),
                    pid=record.get("pid"),
                    slurm_job_id=record.get("slurm_job_id"),
                    executor=record.get("executor"),
                    memory_class=record.get("memory_class"),
                    start=record.get("start"),
                    end=record.get("end"),
                    wall_s=record.get("wall_s"),
                    cpu_s=record.get("cpu_s"),
                    peak_rss_mib=record.get("peak_rss_mib"),
                    params=json.dumps(record.get("params") or {}, sort_keys=True),
                    versions=json.dumps(record.get("versions") or {}, sort_keys=True),
                    code_version=(record.get("versions") or {}).get("lsst-prod"),
                    summary=json.dumps(record.get("summary") or {}, default=float),
                    log_tail=record.get("log_tail"),
                )
            )
            attempt_id = int(res.inserted_primary_key[0])
            rows = [
                {"attempt_id": attempt_id, "role": "input", "dataset_type": i["dataset_type"], "run": i["run"],
                 "data_id": DataId(i["data_id"]).key(), "path": i["path"], "checksum": i.get("checksum")}
                for i in record.get("inputs", [])
            ] + [
                {"attempt_id": attempt_id, "role": "output", "dataset_type": o.dataset_type, "run": o.run,
                 "data_id": o.data_id.key(), "path": o.path, "checksum": o.checksum}
                for o in outputs
            ]
            if rows:
                c.execute(attempt_datasets.insert(), rows)
            lost = [
                {"attempt_id": attempt_id, "run": self.run, "quantum_id": record["quantum_id"],
                 "dataset_type": x["dataset_type"], "data_id": DataId(x["data_id"]).key(),
                 "producer": x["producer"], "reason": x.get("reason")}
                for x in record.get("left_out") or []
            ]
            if lost:
                c.execute(left_out.insert(), lost)
            if record["outcome"] == "succeeded" and outputs:
                self.repo.registry.register(outputs, conn=c)
            c.execute(
                quanta.update()
                .where((quanta.c.run == self.run) & (quanta.c.quantum_id == record["quantum_id"]))
                .values(
                    status=final_status,
                    n_attempts=quanta.c.n_attempts + 1,
                    # the class the NEXT attempt uses (escalated after OutOfMemory): restart reads it
                    memory_class=record.get("memory_class_next") or record.get("memory_class"),
                    error_class=record.get("error_class") if final_status != "succeeded" else None,
                    error_message=record.get("error_message") if final_status != "succeeded" else None,
                    updated=utcnow(),
                )
            )
        return attempt_id


def _chunks(items: list[str], n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]
