"""Provenance tables: quanta of a run, every attempt, and the datasets each read and wrote.

They live in the repository's database beside the registry, so that one
transaction can record an attempt and register its outputs together.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

quanta = sa.Table(
    "quanta",
    metadata,
    sa.Column("run", sa.String(256), primary_key=True),
    sa.Column("quantum_id", sa.String(256), primary_key=True),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    # planned | submitted | running | succeeded | failed | blocked | nowork
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("n_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("memory_class", sa.String(32)),
    sa.Column("error_class", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("updated", sa.String(40), nullable=False),
)
sa.Index("ix_quanta_run_stage", quanta.c.run, quanta.c.stage)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run", sa.String(256), nullable=False),
    sa.Column("quantum_id", sa.String(256), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # succeeded | failed | nowork
    sa.Column("error_class", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("error_metadata", sa.Text),
    sa.Column("host", sa.String(128)),
    sa.Column("node", sa.String(128)),
    sa.Column("pid", sa.Integer),
    sa.Column("slurm_job_id", sa.String(32)),
    sa.Column("executor", sa.String(64)),
    sa.Column("memory_class", sa.String(32)),
    sa.Column("start", sa.String(40)),
    sa.Column("end", sa.String(40)),
    sa.Column("wall_s", sa.Float),
    sa.Column("cpu_s", sa.Float),
    sa.Column("peak_rss_mib", sa.Float),
    sa.Column("params", sa.Text),
    sa.Column("versions", sa.Text),
    sa.Column("code_version", sa.String(128)),
    sa.Column("summary", sa.Text),
    sa.Column("log_tail", sa.Text),
)
sa.Index("ix_attempts_run_quantum", attempts.c.run, attempts.c.quantum_id)

attempt_datasets = sa.Table(
    "attempt_datasets",
    metadata,
    sa.Column("attempt_id", sa.Integer, sa.ForeignKey("attempts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("role", sa.String(8), nullable=False),  # input | output
    sa.Column("dataset_type", sa.String(64), nullable=False),
    sa.Column("run", sa.String(256), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    sa.Column("path", sa.String(1024), nullable=False),
    sa.Column("checksum", sa.String(80)),
)
sa.Index("ix_attempt_datasets_path", attempt_datasets.c.path)
sa.Index("ix_attempt_datasets_attempt", attempt_datasets.c.attempt_id)


# Inputs a gather quantum's attempt ran without: planned, but their producer failed or was
# blocked (see Stage.gather).  A table of its own so that repositories made before it gain it.
left_out = sa.Table(
    "left_out",
    metadata,
    sa.Column("attempt_id", sa.Integer, sa.ForeignKey("attempts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run", sa.String(256), nullable=False),
    sa.Column("quantum_id", sa.String(256), nullable=False),
    sa.Column("dataset_type", sa.String(64), nullable=False),
    sa.Column("data_id", sa.String(512), nullable=False),
    sa.Column("producer", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text),
)
sa.Index("ix_left_out_run_quantum", left_out.c.run, left_out.c.quantum_id)
sa.Index("ix_left_out_attempt", left_out.c.attempt_id)


def create_tables(engine: sa.Engine) -> None:
    metadata.create_all(engine)
