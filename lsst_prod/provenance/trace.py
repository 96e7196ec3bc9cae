"""Trace one catalogue row back to the raw pixels that made it."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from ..errors import PlanningError
from ..ids import unpack_source_id
from ..repo import Repository
from .report import lineage


def trace_source(repo: Repository, run: str, source_id: int) -> dict[str, Any]:
    """Find ``source_id``'s Source table in ``run`` and return its row and full lineage."""
    parts = unpack_source_id(source_id)
    if parts["kind"] != 0:
        raise PlanningError(f"{source_id} is a diaSourceId (kind bit set), not a sourceId")
    instrument = None
    for ref in repo.query("source", [run]):
        if ref.data_id.get("visit") == parts["visit"] and ref.data_id.get("detector") == parts["detector"]:
            instrument = ref.data_id.get("instrument")
            path = repo.path_of(ref)
            table = pq.read_table(path)
            ids = table.column("sourceId").to_numpy()
            hit = (ids == source_id).nonzero()[0]
            if len(hit) == 0:
                raise PlanningError(f"sourceId {source_id} decodes to visit {parts['visit']} detector "
                                    f"{parts['detector']}, but {ref.path} has no such row")
            row = {k: v[0] for k, v in table.slice(int(hit[0]), 1).to_pydict().items()}
            return {"source_id": source_id, "decoded": parts, "instrument": instrument, "row": row,
                    "lineage": lineage(repo, run, ref.path)}
    raise PlanningError(f"sourceId {source_id} decodes to release {parts['release']}, visit {parts['visit']}, "
                        f"detector {parts['detector']}; run {run!r} has no Source table for it")
