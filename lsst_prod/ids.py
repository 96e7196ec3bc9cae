"""Release-unique 64-bit IDs (LSE-163 section 3.4: IDs are unique across data releases).

Every catalogue ID packs the release number in its top bits, so a row of DR3
can never collide with a row of DR4, and the packing is reversible (a user can
read the visit, detector, tract or patch back from an ID).  All IDs are
positive signed 64-bit integers (bit 63 stays 0) so Parquet/SQL ``long``
columns hold them.

Layout, most significant bit first::

    0 | release (6) | kind (1) | payload (56)

    sourceId     kind 0, payload = ccdVisitId (41) | counter (15)
    diaSourceId  kind 1, payload = ccdVisitId (41) | counter (15)
    objectId     kind 0, payload = tract (16) | patch (10) | counter (30)
    diaObjectId  kind 1, payload = tract (16) | patch (10) | counter (30)
    ccdVisitId   = visit (33) | detector (8)      (not release-specific: it names an observation)

Visit IDs are ``(day_obs - 20000000) * 10000 + seq`` (33 bits last until 2085).
The ``kind`` bit keeps difference-image IDs apart from direct ones of the same
release; a sourceId and an objectId live in different tables and may coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidQuantum

RELEASE_BITS = 6
PAYLOAD_BITS = 56
VISIT_BITS = 33
DETECTOR_BITS = 8
SOURCE_COUNTER_BITS = 15
TRACT_BITS = 16
PATCH_BITS = 10
OBJECT_COUNTER_BITS = 30


def _check(name: str, value: int, bits: int) -> int:
    value = int(value)
    if value < 0 or value >= (1 << bits):
        raise InvalidQuantum(f"{name}={value} does not fit in the {bits} bits of the ID layout")
    return value


def _head(release: int, kind: int) -> int:
    return (_check("release", release, RELEASE_BITS) << (PAYLOAD_BITS + 1)) | (_check("kind", kind, 1) << PAYLOAD_BITS)


def visit_id(day_obs: int, seq: int) -> int:
    if not 0 <= int(seq) < 10000:
        raise InvalidQuantum(f"sequence number {seq} out of range 0..9999")
    return _check("visit", (int(day_obs) - 20000000) * 10000 + int(seq), VISIT_BITS)


def ccd_visit_id(visit: int, detector: int) -> int:
    return (_check("visit", visit, VISIT_BITS) << DETECTOR_BITS) | _check("detector", detector, DETECTOR_BITS)


def unpack_ccd_visit_id(ccd_visit: int) -> tuple[int, int]:
    return int(ccd_visit) >> DETECTOR_BITS, int(ccd_visit) & ((1 << DETECTOR_BITS) - 1)


@dataclass(frozen=True)
class SourceIdFactory:
    """sourceIds (kind 0) or diaSourceIds (kind 1) for one (release, visit, detector)."""

    release: int
    visit: int
    detector: int
    kind: int = 0

    def make(self, n: int) -> np.ndarray:
        """IDs for rows 1..n (counter 0 is never used, so 0 can mean 'no parent')."""
        if n >= (1 << SOURCE_COUNTER_BITS):
            raise InvalidQuantum(f"{n} sources on visit {self.visit} detector {self.detector} exceed the "
                                 f"{SOURCE_COUNTER_BITS}-bit counter of the ID layout")
        base = _head(self.release, self.kind) | (ccd_visit_id(self.visit, self.detector) << SOURCE_COUNTER_BITS)
        return base + np.arange(1, n + 1, dtype=np.int64)


@dataclass(frozen=True)
class ObjectIdFactory:
    """objectIds (kind 0) or diaObjectIds (kind 1) for one (release, tract, patch)."""

    release: int
    tract: int
    patch: int
    kind: int = 0

    def make(self, n: int) -> np.ndarray:
        if n >= (1 << OBJECT_COUNTER_BITS):
            raise InvalidQuantum(f"{n} objects in tract {self.tract} patch {self.patch} exceed the ID counter")
        tp = (_check("tract", self.tract, TRACT_BITS) << PATCH_BITS) | _check("patch", self.patch, PATCH_BITS)
        base = _head(self.release, self.kind) | (tp << OBJECT_COUNTER_BITS)
        return base + np.arange(1, n + 1, dtype=np.int64)


def _split(value: int) -> tuple[int, int, int]:
    v = int(value)
    return v >> (PAYLOAD_BITS + 1), (v >> PAYLOAD_BITS) & 1, v & ((1 << PAYLOAD_BITS) - 1)


def unpack_source_id(source_id: int) -> dict[str, int]:
    release, kind, payload = _split(source_id)
    visit, detector = unpack_ccd_visit_id(payload >> SOURCE_COUNTER_BITS)
    return {"release": release, "kind": kind, "visit": visit, "detector": detector,
            "counter": payload & ((1 << SOURCE_COUNTER_BITS) - 1)}


def unpack_object_id(object_id: int) -> dict[str, int]:
    release, kind, payload = _split(object_id)
    tp = payload >> OBJECT_COUNTER_BITS
    return {"release": release, "kind": kind, "tract": tp >> PATCH_BITS, "patch": tp & ((1 << PATCH_BITS) - 1),
            "counter": payload & ((1 << OBJECT_COUNTER_BITS) - 1)}
