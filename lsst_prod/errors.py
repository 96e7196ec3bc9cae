"""Exception types, grouped by what the orchestrator must do with them.

Every error a stage, the planner or the configuration layer raises belongs to one of
these classes; :mod:`lsst_prod.execution.policy` maps the class to an action (retry,
retry with more memory, block downstream, stop) and :mod:`lsst_prod.cli` maps it to an
exit code.  Messages should name the quantum's data ID (or the file and key).
"""

from __future__ import annotations

from typing import Any


class LsstProdError(Exception):
    """Base class of every error this package raises on purpose."""

    #: Stable short name recorded in provenance (``error_class`` column).
    error_class = "LsstProdError"


class ConfigError(LsstProdError):
    """Bad campaign/site input; raised before anything is submitted (exit code 2)."""

    error_class = "ConfigError"


class PlanningError(LsstProdError):
    """The campaign cannot be planned (empty selection, missing producer)."""

    error_class = "PlanningError"


class TransientError(LsstProdError):
    """Worth retrying as is: node lost, I/O timeout, preemption."""

    error_class = "TransientError"


class OutOfMemory(LsstProdError):
    """Retry with more memory, up to the site's limit."""

    error_class = "OutOfMemory"


class AlgorithmError(LsstProdError):
    """The data cannot be processed this way: do not retry; downstream is blocked.

    ``metadata`` is a small dict that explains why (n_stars, chi2, ...); it is
    stored in provenance and printed by ``report``.
    """

    error_class = "AlgorithmError"

    def __init__(self, message: str, **metadata: Any) -> None:
        super().__init__(message)
        self.metadata = dict(metadata)


class NoWorkFound(LsstProdError):
    """Nothing to do for this quantum (e.g. a patch with no coverage); not a failure."""

    error_class = "NoWorkFound"


class InvalidQuantum(LsstProdError):
    """A bug or an inconsistent configuration: stop the stage."""

    error_class = "InvalidQuantum"


class InsufficientInputs(LsstProdError):
    """A gather quantum has too few inputs left to meet its stage's declared minimum (its
    producers failed): not retried; the quantum is *blocked* until ``restart`` brings the
    missing inputs back.  ``metadata`` says what was counted and what was needed."""

    error_class = "InsufficientInputs"

    def __init__(self, message: str, **metadata: Any) -> None:
        super().__init__(message)
        self.metadata = dict(metadata)


class InjectedFailure(TransientError):
    """Raised on purpose by a campaign's ``inject_failures`` option (tests, drills)."""

    error_class = "InjectedFailure"


ERROR_CLASSES: dict[str, type[LsstProdError]] = {
    cls.error_class: cls
    for cls in (
        LsstProdError,
        ConfigError,
        PlanningError,
        TransientError,
        OutOfMemory,
        AlgorithmError,
        NoWorkFound,
        InvalidQuantum,
        InsufficientInputs,
        InjectedFailure,
    )
}


class CorruptInput(LsstProdError):
    """An input file is missing, or its content no longer matches the checksum registered when
    it was written or ingested (a flipped byte, a truncated copy).  Not retried: the same bytes
    would be read again.  Restore the file (or re-ingest it), then ``restart`` (``--verify``
    re-checks every input and output of the run)."""

    error_class = "CorruptInput"


class StorageFull(LsstProdError):
    """The file system or the database has no space left (ENOSPC, EDQUOT) or is read-only
    (EROFS).  Not retried within the run (every retry would fail the same way); free space, then
    ``restart``."""

    error_class = "StorageFull"
