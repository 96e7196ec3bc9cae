"""The registry: which datasets exist, where, with which checksum (SQLAlchemy Core).

SQLite (WAL mode) inside the repository by default; any SQLAlchemy URL (e.g.
PostgreSQL for a shared deployment) through ``LSST_PROD_DB_URL``.  Only the
process that drives a run writes here; workers hand back :class:`DatasetRef`
values and the driver registers them in one transaction with the provenance
record (see :mod:`lsst_prod.provenance.writer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from .dataid import DataId

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dataset_type", sa.String(64), nullable=False),
    sa.Column("run", sa.String(256), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    sa.Column("path", sa.String(1024), nullable=False),
    sa.Column("checksum", sa.String(80), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
    sa.UniqueConstraint("dataset_type", "run", "data_id", name="uq_dataset"),
)
sa.Index("ix_datasets_type_run", datasets.c.dataset_type, datasets.c.run)

visits = sa.Table(
    "visits",
    metadata,
    sa.Column("instrument", sa.String(32), primary_key=True),
    sa.Column("visit", sa.BigInteger, primary_key=True),
    sa.Column("band", sa.String(8), nullable=False),
    sa.Column("physical_filter", sa.String(32), nullable=False),
    sa.Column("day_obs", sa.Integer, nullable=False),
    sa.Column("exposure_time", sa.Float, nullable=False),
    sa.Column("mjd_start", sa.Float, nullable=False),
    sa.Column("mjd_mid", sa.Float, nullable=False),
    sa.Column("ra", sa.Float, nullable=False),
    sa.Column("dec", sa.Float, nullable=False),
    sa.Column("rotation", sa.Float, nullable=False),
    sa.Column("airmass", sa.Float),
    sa.Column("altitude", sa.Float),
    sa.Column("azimuth", sa.Float),
    sa.Column("zenith_distance", sa.Float),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),  # "input" | "processing"
    sa.Column("created", sa.String(40), nullable=False),
    sa.Column("info", sa.Text, nullable=False, default="{}"),
)

VISIT_COLUMNS = tuple(c.name for c in visits.columns)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DatasetRef:
    """A dataset written (and possibly registered) in a repository.

    ``path`` is relative to the repository root so repositories can move.
    """

    dataset_type: str
    data_id: DataId
    run: str
    path: str
    checksum: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_type": self.dataset_type,
            "data_id": self.data_id.to_dict(),
            "run": self.run,
            "path": self.path,
            "checksum": self.checksum,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetRef":
        return cls(d["dataset_type"], DataId(d["data_id"]), d["run"], d["path"], d["checksum"], int(d["size"]))


def make_engine(url: str, read_only: bool = False) -> sa.Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys.

    ``read_only`` (a repository on a read-only file system or without write permission): SQLite
    opens the file immutable, so reading it never tries to create its -wal/-shm sidecars."""
    if url.startswith("sqlite"):
        if read_only:
            path = url.split("sqlite:///", 1)[1]
            engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true")

            @event.listens_for(engine, "connect")
            def _ro(dbapi_conn, _record):  # pragma: no cover - trivial
                dbapi_conn.execute("PRAGMA query_only=ON")

            return engine
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def default_url(root: Path) -> str:
    return os.environ.get("LSST_PROD_DB_URL") or f"sqlite:///{(root / 'registry.sqlite3').resolve()}"


class Registry:
    """Queries and inserts on the registry tables."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create_tables(self) -> None:
        metadata.create_all(self.engine)

    # ---------------------------------------------------------------- runs
    def ensure_run(self, name: str, kind: str, info: dict[str, Any] | None = None, conn=None) -> None:
        def _do(c):
            exists = c.execute(sa.select(runs.c.name).where(runs.c.name == name)).first()
            if exists is None:
                c.execute(runs.insert().values(name=name, kind=kind, created=utcnow(), info=json.dumps(info or {})))
            elif info is not None:
                c.execute(runs.update().where(runs.c.name == name).values(info=json.dumps(info)))

        if conn is not None:
            _do(conn)
        else:
            with self.engine.begin() as c:
                _do(c)

    def list_runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(runs).order_by(runs.c.created)
        if kind:
            q = q.where(runs.c.kind == kind)
        with self.engine.connect() as c:
            return [dict(r._mapping) | {"info": json.loads(r.info)} for r in c.execute(q)]

    # ------------------------------------------------------------ datasets
    def register(self, refs: Iterable[DatasetRef], conn=None) -> None:
        """Insert or replace dataset rows (idempotent for a re-run quantum)."""
        rows = [
            {
                "dataset_type": r.dataset_type,
                "run": r.run,
                "data_id": r.data_id.key(),
                "path": r.path,
                "checksum": r.checksum,
                "size": r.size,
                "created": utcnow(),
            }
            for r in refs
        ]
        if not rows:
            return

        def _do(c):
            for row in rows:
                c.execute(
                    datasets.delete().where(
                        (datasets.c.dataset_type == row["dataset_type"])
                        & (datasets.c.run == row["run"])
                        & (datasets.c.data_id == row["data_id"])
                    )
                )
            c.execute(datasets.insert(), rows)

        if conn is not None:
            _do(conn)
        else:
            with self.engine.begin() as c:
                _do(c)

    def find(self, dataset_type: str, data_id: DataId, runs_: Sequence[str]) -> DatasetRef | None:
        """The dataset in the first of ``runs_`` that has it (a collection search path)."""
        with self.engine.connect() as c:
            for run in runs_:
                row = c.execute(
                    sa.select(datasets).where(
                        (datasets.c.dataset_type == dataset_type)
                        & (datasets.c.run == run)
                        & (datasets.c.data_id == data_id.key())
                    )
                ).first()
                if row is not None:
                    return _ref(row)
        return None

    def query(self, dataset_type: str | None = None, runs_: Sequence[str] | None = None) -> list[DatasetRef]:
        q = sa.select(datasets).order_by(datasets.c.id)
        if dataset_type is not None:
            q = q.where(datasets.c.dataset_type == dataset_type)
        if runs_ is not None:
            q = q.where(datasets.c.run.in_(list(runs_)))
        with self.engine.connect() as c:
            return [_ref(r) for r in c.execute(q)]

    # -------------------------------------------------------------- visits
    def insert_visits(self, records: Iterable[dict[str, Any]]) -> None:
        rows = []
        for rec in records:
            missing = {"instrument", "visit", "band", "physical_filter", "day_obs", "exposure_time", "mjd_start",
                       "mjd_mid", "ra", "dec", "rotation"} - set(rec)
            if missing:
                raise ValueError(f"visit record {rec.get('visit')} lacks {sorted(missing)}")
            rows.append({k: rec.get(k) for k in VISIT_COLUMNS})
        with self.engine.begin() as c:
            for row in rows:
                c.execute(
                    visits.delete().where((visits.c.instrument == row["instrument"]) & (visits.c.visit == row["visit"]))
                )
            if rows:
                c.execute(visits.insert(), rows)

    def visits(self, instrument: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(visits).order_by(visits.c.visit)
        if instrument is not None:
            q = q.where(visits.c.instrument == instrument)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]


def _ref(row) -> DatasetRef:
    return DatasetRef(row.dataset_type, DataId.from_key(row.data_id), row.run, row.path, row.checksum, int(row.size))
