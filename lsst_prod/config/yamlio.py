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


#: Limits that keep every input linear in its size: a campaign or site file is a few KB; these
#: refuse alias bombs ("billion laughs"), recursive aliases and pathological nesting with a
#: ConfigError instead of a hang or a RecursionError.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 20_000
MAX_DEPTH = 32


def _line_of_offset(raw: bytes, offset: int) -> int:
    return raw[:offset].count(b"\n") + 1


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text (a UTF-8 BOM is allowed); ConfigError naming the line of the first bad byte."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise ConfigError(f"{path}:1: the file is {name} encoded; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}:{_line_of_offset(raw, exc.start)}: not UTF-8 text (byte "
                          f"0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8") from None


def _walk(path: Path, root: yaml.Node) -> dict[Loc, int]:
    """Line of every key/item path, iteratively and with limits (see MAX_VALUES, MAX_DEPTH).

    Aliases are followed (a key reached through an alias gets the line of its anchor), so the
    walk counts what the document *expands* to: that is what validation will have to visit.
    Duplicate keys in one mapping are an error (YAML would silently keep the last)."""
    lines: dict[Loc, int] = {(): 1}
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    n = 0
    while stack:
        node, loc = stack.pop()
        n += 1
        if n > MAX_VALUES:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: the document expands to more than {MAX_VALUES} "
                              f"values (recursive or exponential YAML aliases?)")
        if len(loc) > MAX_DEPTH:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.tag}>"
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    raise ConfigError(f"{path}:{line}: duplicate key {key!r} (first at line {seen[key]})")
                seen[key] = line
                lines[loc + (key,)] = line
                stack.append((value_node, loc + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[loc + (i,)] = item.start_mark.line + 1
                stack.append((item, loc + (i,)))
    return lines


def _yaml_error(path: Path, exc: yaml.YAMLError, text: str) -> ConfigError:
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[:exc.position].count("\n") + 1
        return ConfigError(f"{path}:{line}: not valid YAML: character {chr(exc.character)!r} (code {exc.character}) "
                           f"is not allowed (control characters are not YAML text)")
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else "?"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{path}:{line}: not valid YAML: {problem}")


def load_yaml(path: str | Path) -> LocatedYaml:
    """Read a YAML file; ConfigError (file:line) for anything that is not a small, valid,
    UTF-8 YAML mapping.  Never a traceback, never a hang (see the limits above)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ConfigError(f"{str(path)!r}: not a usable path ({exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a campaign or site file")
    text = _decode(path, raw)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc, text) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(path, exc, text) from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read (more than {MAX_DEPTH} levels allowed)") from None
        lines = _walk(path, node) if node is not None else {(): 1}
        try:
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            raise _yaml_error(path, exc, text) from None
        except (ValueError, OverflowError, RecursionError, TypeError) as exc:
            raise ConfigError(f"{path}: a value cannot be read: {str(exc)[:200]}") from None
    finally:
        loader.dispose()
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
            if len(shown) > 80:
                shown = shown[:60] + f"... ({len(shown)} characters)"
            out.append(f"{where}: key {key!r}: {err['msg']} (got {shown}).")
    return "\n".join(out)


def validate(doc: LocatedYaml, model: type[BaseModel], context: dict[str, Any] | None = None) -> BaseModel:
    """Validate ``doc.data`` against ``model``; ConfigError with file:line messages."""
    try:
        return model.model_validate(doc.data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(doc, model, exc)) from None
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:  # raised outside pydantic's wrapping
        raise ConfigError(f"{doc.path}: {type(exc).__name__}: {str(exc)[:300]}") from None
