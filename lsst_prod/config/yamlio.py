"""The only YAML reader: loads a file, remembers where each key is, and turns
pydantic validation errors into messages that name ``file:line``, the key and
what was expected (with the close match for a typo).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

Loc = tuple[Any, ...]


class LocatedYaml:
    """A YAML document plus the line number of every key/item path."""

    def __init__(self, path: Path, data: Any, lines: dict[Loc, int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    def line_of(self, loc: Loc) -> int | None:
        """Line (1-based) of the deepest known prefix of ``loc``."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def where(self, loc: Loc) -> str:
        line = self.line_of(loc)
        return f"{self.path}:{line}" if line else str(self.path)


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[loc + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, loc + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _walk(item, loc + (i,), lines)


def load_yaml(path: str | Path) -> LocatedYaml:
    """Read a YAML file; ConfigError (file:line) if it is missing or not valid YAML."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{path}:{line}: not valid YAML: {exc.problem}") from None
    lines: dict[Loc, int] = {(): 1}
    if node is not None:
        _walk(node, (), lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of keys at the top level, found {type(data).__name__}")
    return LocatedYaml(path, data, lines)


def _allowed_fields(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names allowed at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = _model_in(ann)
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation like ``Foo | None`` or ``dict[str, Foo]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(doc: LocatedYaml, model: type[BaseModel], exc: ValidationError) -> str:
    """One paragraph per problem: ``file:line: key 'a.b': message``."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = doc.where(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            allowed_txt = f" Allowed keys here: {', '.join(sorted(allowed))}." if allowed else ""
            out.append(f"{where}: unknown key {key!r}{hint}.{allowed_txt}")
        elif kind == "missing":
            out.append(f"{where}: missing required key {key!r}.")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            out.append(f"{where}: key {key!r}: {err['msg']} (got {shown}).")
    return "\n".join(out)


def validate(doc: LocatedYaml, model: type[BaseModel], context: dict[str, Any] | None = None) -> BaseModel:
    """Validate ``doc.data`` against ``model``; ConfigError with file:line messages."""
    try:
        return model.model_validate(doc.data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(doc, model, exc)) from None
