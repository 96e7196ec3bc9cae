"""Data IDs: small frozen, hashable, sortable mappings of dimension -> value."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

#: Dimensions in the order Rubin's middleware sorts them (others sort after, by name).
DIMENSION_ORDER = (
    "instrument",
    "skymap",
    "tract",
    "patch",
    "band",
    "physical_filter",
    "day_obs",
    "visit",
    "detector",
)


def _dim_rank(name: str) -> tuple[int, str]:
    try:
        return (DIMENSION_ORDER.index(name), name)
    except ValueError:
        return (len(DIMENSION_ORDER), name)


class DataId(Mapping[str, Any]):
    """An immutable data ID: ``DataId(visit=2512010003, detector=1)``.

    Values are ints or strings.  Two data IDs with the same items are equal and
    hash alike whatever the order they were given in; they sort by dimension
    order then value, so graphs and reports are deterministic.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, mapping: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        merged = dict(mapping or {})
        merged.update(kwargs)
        for key, value in merged.items():
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                # numpy integers are fine, everything else is a bug upstream
                if hasattr(value, "__index__") and not isinstance(value, bool):
                    merged[key] = int(value)
                else:
                    raise TypeError(f"data ID value for {key!r} must be int or str, got {value!r}")
        self._items = tuple(sorted(merged.items(), key=lambda kv: _dim_rank(kv[0])))
        self._hash = hash(self._items)

    # Mapping protocol
    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DataId):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self == DataId(other)
        return NotImplemented

    def _sort_key(self) -> tuple:
        return tuple((_dim_rank(k), (0, v, "") if isinstance(v, int) else (1, 0, v)) for k, v in self._items)

    def __lt__(self, other: "DataId") -> bool:
        return self._sort_key() < other._sort_key()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k}: {v!r}" for k, v in self._items) + "}"

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._items)

    def key(self) -> str:
        """Canonical JSON text, used as the registry key."""
        return json.dumps(dict(self._items), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, text: str) -> "DataId":
        return cls(json.loads(text))

    def subset(self, dims: tuple[str, ...] | list[str]) -> "DataId":
        return DataId({k: self[k] for k in dims if k in self})

    def union(self, other: Mapping[str, Any]) -> "DataId":
        merged = dict(self)
        for k, v in other.items():
            if k in merged and merged[k] != v:
                raise ValueError(f"data IDs disagree on {k}: {merged[k]!r} != {v!r}")
            merged[k] = v
        return DataId(merged)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._items)
