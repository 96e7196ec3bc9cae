"""The data repository: a directory of files laid out by run and dataset type, plus a registry.

Layout::

    ROOT/registry.sqlite3                      registry + provenance (SQLite, WAL)
    ROOT/<run>/<dataset_type>/[<instrument>/]<v1>/.../<dataset_type>_<v1>_..._<vn>.<ext>

Files are written atomically (:mod:`.atomic`); the path of a dataset depends
only on (run, dataset type, data ID), so re-running a quantum overwrites its
outputs instead of duplicating them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..names import check_name, check_run_name, relative_inside
from .atomic import sha256_file, write_atomic
from .dataid import DataId
from .dataset_types import get_dataset_type
from .registry import DatasetRef, Registry, default_url, make_engine

REGISTRY_FILE = "registry.sqlite3"


def _check_sqlite_file(path: Path) -> None:
    """ConfigError (never a rewrite) when the registry file is empty or not an SQLite database."""
    from ..errors import ConfigError

    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the registry: {exc.strerror}") from None
    if not head:
        raise ConfigError(f"{path}: the registry is empty (0 bytes): it was truncated; restore it from a "
                          f"backup (it is left untouched)")
    if head != b"SQLite format 3\x00":
        raise ConfigError(f"{path}: not an SQLite database (damaged registry?); it is left untouched")


class Repository:
    """A data repository rooted at a directory."""

    def __init__(self, root: str | Path, url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.url = url or default_url(self.root)
        self._engine = None
        self._registry: Registry | None = None

    # Engines are created lazily so that a Repository can be pickled to workers
    # (which only compute paths and write files; they never touch the database).
    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.url = state["url"]
        self._engine = None
        self._registry = None

    @property
    def read_only(self) -> bool:
        """True when this process cannot write the repository (read-only file system, no
        permission): queries still work, writes raise StorageFull."""
        reg = self.root / REGISTRY_FILE
        return self.url == default_url(self.root) and reg.exists() and not (
            os.access(self.root, os.W_OK) and os.access(reg, os.W_OK))

    @property
    def engine(self):
        if self._engine is None:
            self._engine = make_engine(self.url, read_only=self.read_only)
        return self._engine

    def require_writable(self, what: str) -> None:
        """StorageFull (in words) when ``what`` would have to write a read-only repository."""
        if self.read_only:
            from ..errors import StorageFull

            raise StorageFull(f"{self.root} is read-only for this user or file system: cannot {what}")

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.engine)
        return self._registry

    @classmethod
    def create(cls, root: str | Path, url: str | None = None) -> "Repository":
        """Create the repository (or open it if it exists) and its tables."""
        repo = cls(root, url)
        repo.root.mkdir(parents=True, exist_ok=True)
        repo.registry.create_tables()
        from ..provenance.db import create_tables as create_provenance_tables

        create_provenance_tables(repo.engine)
        return repo

    @classmethod
    def open(cls, root: str | Path, url: str | None = None) -> "Repository":
        """Open an existing repository; FileNotFoundError if there is none."""
        repo = cls(root, url)
        reg = repo.root / REGISTRY_FILE
        if repo.url == default_url(repo.root):
            if not reg.exists():
                raise FileNotFoundError(f"{repo.root} is not an lsst-prod repository (no {REGISTRY_FILE}); "
                                        f"create one with `lsst-prod simulate CAMPAIGN --repo {root}`")
            _check_sqlite_file(reg)
        return repo

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._registry = None

    # ---------------------------------------------------------------- paths
    def relpath_for(self, dataset_type: str, data_id: Mapping[str, Any], run: str) -> str:
        dtype = get_dataset_type(dataset_type)
        did = DataId(data_id)
        missing = [d for d in dtype.dimensions if d not in did]
        if missing:
            raise KeyError(f"data ID {did!r} for {dataset_type} lacks {missing}")
        # The instrument is a directory level, not part of the file name (it is in every raw's name
        # otherwise); every other value appears in both, so a file is recognisable out of place.
        # Every component is checked against the one safe-name rule (lsst_prod.names): no value
        # of a campaign, data ID or command line can make a path leave the repository.
        check_run_name(run)
        for d in dtype.dimensions:
            check_name(str(did[d]), f"data ID value {d}")
        head = [str(did["instrument"])] if "instrument" in dtype.dimensions else []
        values = [str(did[d]) for d in dtype.dimensions if d != "instrument"]
        parts = [run, dataset_type, *head, *values[:-1]]
        stem = "_".join([dataset_type, *values]) if values else dataset_type
        return "/".join(parts + [stem + dtype.extension])

    def path_of(self, ref: DatasetRef | str) -> Path:
        """The file of a dataset; ConfigError if its registered path would leave the repository."""
        rel = ref.path if isinstance(ref, DatasetRef) else ref
        return self.root / relative_inside(rel, "dataset path")

    def verify(self, ref: DatasetRef) -> int:
        """Check a dataset's file against its registered size and checksum; return its size.

        CorruptInput (naming the file, what was expected and what was found) when the file is
        missing, has another size, or another SHA-256.  SHA-256 because it is what the registry
        has always recorded and, with the CPU's SHA extensions, it streams at ~1 GB/s on the
        project's reference machine (BLAKE2b 0.5 GB/s, xxh3 7 GB/s but not cryptographic and a
        new dependency); the cost per stage is in docs/performance.md."""
        from ..errors import CorruptInput

        path = self.path_of(ref)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptInput(f"input {path} is missing ({ref.dataset_type} {ref.data_id})") from None
        if size != ref.size:
            raise CorruptInput(f"input {path} has {size} bytes, {ref.size} were registered "
                               f"({ref.dataset_type} {ref.data_id}): truncated or replaced")
        actual = sha256_file(path)
        if actual != ref.checksum:
            raise CorruptInput(f"input {path} does not match its registered checksum ({ref.dataset_type} "
                               f"{ref.data_id}): {ref.checksum[:19]}... registered, {actual[:19]}... found")
        return size

    # --------------------------------------------------------------- writes
    def stage_file(
        self, dataset_type: str, data_id: Mapping[str, Any], run: str, writer: Callable[[Path], None]
    ) -> DatasetRef:
        """Write a dataset's file atomically and return its ref, WITHOUT registering it.

        This is what workers call; the driver registers the refs they return.
        """
        did = DataId(data_id).subset(get_dataset_type(dataset_type).dimensions)
        rel = self.relpath_for(dataset_type, did, run)
        checksum, size = write_atomic(self.path_of(rel), writer)
        return DatasetRef(dataset_type, did, run, rel, checksum, size)

    def put_file(
        self, dataset_type: str, data_id: Mapping[str, Any], run: str, writer: Callable[[Path], None]
    ) -> DatasetRef:
        """Write a dataset atomically and register it (single-writer processes only)."""
        ref = self.stage_file(dataset_type, data_id, run, writer)
        self.registry.ensure_run(run, "input")
        self.registry.register([ref])
        return ref

    def register(self, refs: Iterable[DatasetRef]) -> None:
        self.registry.register(list(refs))

    def insert_visits(self, records: Iterable[dict[str, Any]]) -> None:
        self.registry.insert_visits(records)

    # -------------------------------------------------------------- queries
    def find(self, dataset_type: str, data_id: Mapping[str, Any], runs: Sequence[str]) -> DatasetRef | None:
        did = DataId(data_id).subset(get_dataset_type(dataset_type).dimensions)
        return self.registry.find(dataset_type, did, runs)

    def get_path(self, dataset_type: str, data_id: Mapping[str, Any], runs: Sequence[str]) -> Path:
        ref = self.find(dataset_type, data_id, runs)
        if ref is None:
            raise FileNotFoundError(f"no {dataset_type} for {DataId(data_id)} in runs {list(runs)}")
        return self.path_of(ref)

    def query(self, dataset_type: str | None = None, runs: Sequence[str] | None = None) -> list[DatasetRef]:
        return self.registry.query(dataset_type, runs)

    def visits(self, instrument: str | None = None) -> list[dict[str, Any]]:
        return self.registry.visits(instrument)
