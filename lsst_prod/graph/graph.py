"""The quantum graph: nodes are stage x data ID, edges are datasets one quantum writes and another reads."""

from __future__ import annotations

import json
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..repo import DataId, DatasetRef
from ..repo.atomic import write_bytes_atomic
from ..stages.base import QuantumSpec


@dataclass(frozen=True)
class Quantum:
    spec: QuantumSpec
    #: inputs that exist before the run (raw, calibs, refcats), resolved to refs at plan time
    prerequisites: tuple[DatasetRef, ...]
    #: quantum IDs this one waits for
    depends_on: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.spec.quantum_id

    @property
    def stage(self) -> str:
        return self.spec.stage

    @property
    def data_id(self) -> DataId:
        return self.spec.data_id


class QuantumGraph:
    """An immutable DAG of quanta, in a deterministic topological order."""

    def __init__(self, quanta: Iterable[Quantum], stage_order: list[str]) -> None:
        self.stage_order = list(stage_order)
        rank = {s: i for i, s in enumerate(self.stage_order)}
        self._quanta = {q.id: q for q in sorted(quanta, key=lambda q: (rank.get(q.stage, 99), q.data_id))}
        self._children: dict[str, list[str]] = defaultdict(list)
        for q in self._quanta.values():
            for dep in q.depends_on:
                if dep not in self._quanta:
                    raise ValueError(f"quantum {q.id} depends on unknown {dep}")
                self._children[dep].append(q.id)
        self._check_acyclic()

    def __len__(self) -> int:
        return len(self._quanta)

    def __iter__(self):
        return iter(self._quanta.values())

    def __getitem__(self, quantum_id: str) -> Quantum:
        return self._quanta[quantum_id]

    def __contains__(self, quantum_id: str) -> bool:
        return quantum_id in self._quanta

    def children(self, quantum_id: str) -> list[str]:
        return list(self._children.get(quantum_id, ()))

    def counts_by_stage(self) -> dict[str, int]:
        c = Counter(q.stage for q in self)
        return {s: c[s] for s in self.stage_order if c[s]}

    def descendants(self, roots: Iterable[str]) -> set[str]:
        """All quanta downstream of ``roots`` (not including the roots)."""
        seen: set[str] = set()
        todo = deque(roots)
        while todo:
            for child in self._children.get(todo.popleft(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    def _check_acyclic(self) -> None:
        indeg = {qid: len(q.depends_on) for qid, q in self._quanta.items()}
        ready = deque(qid for qid, n in indeg.items() if n == 0)
        n_done = 0
        while ready:
            qid = ready.popleft()
            n_done += 1
            for child in self._children.get(qid, ()):
                indeg[child] -= 1
                if indeg[child] == 0:
                    ready.append(child)
        if n_done != len(self._quanta):
            raise ValueError("the quantum graph has a cycle")

    # ------------------------------------------------------------ storage
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "lsst-prod-quantum-graph/1",
            "stage_order": self.stage_order,
            "quanta": [
                {
                    "stage": q.stage,
                    "data_id": q.data_id.to_dict(),
                    "inputs": [[t, d.to_dict()] for t, d in q.spec.inputs],
                    "outputs": [[t, d.to_dict()] for t, d in q.spec.outputs],
                    "prerequisites": [r.to_dict() for r in q.prerequisites],
                    "depends_on": list(q.depends_on),
                }
                for q in self
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantumGraph":
        quanta = []
        for item in data["quanta"]:
            spec = QuantumSpec(
                stage=item["stage"],
                data_id=DataId(item["data_id"]),
                inputs=tuple((t, DataId(d)) for t, d in item["inputs"]),
                outputs=tuple((t, DataId(d)) for t, d in item["outputs"]),
            )
            quanta.append(
                Quantum(spec, tuple(DatasetRef.from_dict(r) for r in item["prerequisites"]), tuple(item["depends_on"]))
            )
        return cls(quanta, data["stage_order"])

    def save(self, path: Path) -> None:
        write_bytes_atomic(path, json.dumps(self.to_json(), separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: Path) -> "QuantumGraph":
        return cls.from_json(json.loads(Path(path).read_text()))
