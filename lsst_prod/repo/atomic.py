"""Atomic file writes: write to a temporary file beside the target, fsync, rename.

A reader (or a restarted run) never sees a half-written file: either the old
file, the new one, or none.  Leftover temporaries of a killed writer carry a
recognisable prefix and are swept by :func:`sweep_temporaries`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"


def temporary_path(final: Path) -> Path:
    """A unique temporary path in the target's directory, keeping the extension."""
    return final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return "sha256:" + h.hexdigest()


def write_atomic(final: Path, writer: Callable[[Path], None]) -> tuple[str, int]:
    """Run ``writer(tmp)`` then move ``tmp`` onto ``final``; return (checksum, size).

    The temporary is removed if the writer fails, so nothing half-written stays.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        writer(tmp)
        if not tmp.exists():
            raise RuntimeError(f"writer for {final} did not create its file")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        checksum = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return checksum, size


def write_bytes_atomic(final: Path, data: bytes) -> tuple[str, int]:
    return write_atomic(final, lambda p: p.write_bytes(data))


def sweep_temporaries(root: Path) -> int:
    """Remove temporaries left by killed writers under ``root``; return how many."""
    n = 0
    for p in Path(root).rglob(f"{TMP_PREFIX}*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
