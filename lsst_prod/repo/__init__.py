"""Data repository: file layout, atomic writes and the dataset registry."""

from .dataid import DataId
from .registry import DatasetRef, Registry
from .repository import Repository

__all__ = ["DataId", "DatasetRef", "Registry", "Repository"]
