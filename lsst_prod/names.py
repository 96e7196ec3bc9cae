"""The one rule for names that reach a file path, and the check that a path stays inside its root.

Every name a user can choose and that becomes part of a path or of a generated script (release,
run, instrument, sky map, band, dataset type, string data-ID values) must match
:data:`SAFE_NAME`: a letter or digit, then letters, digits, ``_``, ``.`` or ``-``, at most 64
characters.  That excludes ``/``, ``..`` as a component, absolute paths, white space, newlines,
quotes and shell metacharacters, so such a name is also safe in an sbatch script.  A run name is
one to four safe names joined by ``/`` (``RELEASE/TIMESTAMP`` by default).

:func:`inside` is the second line of defence: every path the repository computes is resolved
and must lie under the repository root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import StringConstraints

from .errors import ConfigError

SAFE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
SAFE_NAME = re.compile(SAFE_PATTERN)
MAX_RUN_COMPONENTS = 4

#: A pydantic string type for configuration fields that become path components.
SafeName = Annotated[str, StringConstraints(pattern=SAFE_PATTERN)]

_RULE = "1-64 characters: a letter or digit, then letters, digits, '_', '.' or '-'"


def check_name(value: object, what: str) -> str:
    """``value`` if it is a safe name, else ConfigError naming ``what`` and the rule."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or value.endswith("\n"):
        raise ConfigError(f"{what}: {value!r} is not a safe name ({_RULE})")
    return value


def check_run_name(run: object, what: str = "run name") -> str:
    """A run name: 1-4 safe names joined by '/' (no absolute path, no '..', no newline)."""
    if not isinstance(run, str) or not run:
        raise ConfigError(f"{what}: {run!r} is not a run name (one to {MAX_RUN_COMPONENTS} names joined by '/')")
    parts = run.split("/")
    if len(parts) > MAX_RUN_COMPONENTS:
        raise ConfigError(f"{what}: {run!r} has {len(parts)} '/'-separated parts; at most {MAX_RUN_COMPONENTS}")
    for part in parts:
        if not isinstance(part, str) or not SAFE_NAME.match(part) or part.endswith("\n"):
            raise ConfigError(f"{what}: {run!r}: part {part!r} is not a safe name ({_RULE}; parts are "
                              f"joined by '/', no absolute path or '..')")
    return run


def relative_inside(rel: str | Path, what: str = "path") -> str:
    """``rel`` if it is a relative path that stays inside its root lexically (no absolute path,
    no '..' climbing out, no NUL or newline); ConfigError otherwise.

    Lexical on purpose: a repository may legitimately hold symlinks to other file systems
    (scratch space on a cluster), which resolving would wrongly refuse."""
    text = str(rel)
    norm = os.path.normpath(text)
    if (not text or os.path.isabs(text) or norm == ".." or norm.startswith("../") or "\0" in text
            or "\n" in text or "\r" in text):
        raise ConfigError(f"{what} {text!r} is not a relative path inside the repository")
    return text


def inside(root: Path, path: Path, what: str = "path") -> Path:
    """``path`` resolved, if it lies under ``root`` (resolved); ConfigError otherwise."""
    root_r = Path(root).resolve()
    try:
        resolved = (root_r / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes, over-long names
        raise ConfigError(f"{what} {str(path)!r}: cannot be resolved ({exc})") from None
    if resolved != root_r and root_r not in resolved.parents:
        raise ConfigError(f"{what} {str(path)!r} resolves to {resolved}, outside {root_r}")
    return resolved
