"""Reading what users write: YAML safely (no object tags, no duplicate keys, no alias bombs), strict
pydantic models (unknown keys and booleans-for-numbers refused), and every problem as one line naming
the file and the key. The configs (config.py) and the search spaces (search/space.py) share it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, worded as one line a user can act on."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_YAML_VALUES = 100_000  # a config is a few hundred values; anchors expanding past this are a bomb
MAX_YAML_DEPTH = 50


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML safely (no tags that build objects, no duplicate keys); errors as one line with the
    line and column of the problem. Aliases that would expand a small file into millions of values
    ("billion laughs") and absurd nesting are refused, naming the key, before anything walks the document."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # a control character (a NUL byte, say): PyYAML gives its offset
        raise ConfigError(f"{source}: not valid YAML at {_line_column(text, exc.position)} (character "
                          f"#x{exc.character:04x} is not allowed in YAML text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where} ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a configuration{_too_deep(text)}") from None
    size, depth = _expanded_size(data, {}, 0)
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep{_too_deep(text)} (refused: "
                          "a configuration needs a few)")
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"{source}: {_bomb_key(data)}its aliases expand to more than {MAX_YAML_VALUES:,} values "
                          "(refused: a configuration is a few hundred)")
    return data


def _expanded_size(node: Any, memo: dict[int, tuple[int, int]], depth: int) -> tuple[int, int]:
    """(values once every alias is expanded, nesting depth), counting each shared node once per use."""
    if not isinstance(node, dict | list):
        return 1, 0
    if id(node) in memo:
        return memo[id(node)]
    if depth > MAX_YAML_DEPTH:
        return 1, MAX_YAML_DEPTH + 1
    children = list(node.values()) + list(node.keys()) if isinstance(node, dict) else node
    size, deepest = 1, 0
    for child in children:
        child_size, child_depth = _expanded_size(child, memo, depth + 1)
        size, deepest = min(size + child_size, 10 * MAX_YAML_VALUES), max(deepest, child_depth + 1)
    memo[id(node)] = (size, deepest)
    return size, deepest


def _line_column(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"line {line}, column {offset - (text.rfind(chr(10), 0, offset) + 1) + 1}"


def _too_deep(text: str) -> str:
    """Where nesting first passes the limit: " in 'KEY.PATH' at line L, column C", read from PyYAML's event
    stream (its parser keeps an explicit stack; only building the document recurses)."""
    frames: list[dict[str, Any]] = []  # open collections: {"map": bool, "at_key": bool, "key": str | None}
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionEndEvent):
            frames.pop()
            continue
        if not isinstance(event, yaml.ScalarEvent | yaml.AliasEvent | yaml.CollectionStartEvent):
            continue
        parent = frames[-1] if frames else None
        if parent and parent["map"]:
            if parent["at_key"]:
                parent["key"] = event.value if isinstance(event, yaml.ScalarEvent) else None
            parent["at_key"] = not parent["at_key"]
        if isinstance(event, yaml.CollectionStartEvent):
            frames.append({"map": isinstance(event, yaml.MappingStartEvent), "at_key": True, "key": None})
            if len(frames) > MAX_YAML_DEPTH:
                path = ".".join(str(f["key"]) for f in frames[:-1] if f["map"] and f["key"] is not None)
                mark = event.start_mark
                return f" in '{path}' at line {mark.line + 1}, column {mark.column + 1}"
    return ""


def _bomb_key(data: Any) -> str:
    """"key 'K': " for the top-level key whose value's expansion passes the limit, when one does."""
    if isinstance(data, dict):
        memo: dict[int, tuple[int, int]] = {}
        for key, value in data.items():
            if _expanded_size(value, memo, 1)[0] > MAX_YAML_VALUES:
                return f"key '{key}': "
    return ""


def at_most(bound: int, unit: str, why: str) -> AfterValidator:
    """A ceiling that says why: values past it are typos (``1e9`` epochs), not plans, and would start Ray
    for a search that never ends."""

    def check(value: int) -> int:
        if value > bound:
            raise ValueError(f"{value:,} {unit} is past the {bound:,} accepted ({why})")
        return value

    return AfterValidator(check)


MAX_EPOCHS = 10_000
Epochs = Annotated[int, Field(ge=1), at_most(MAX_EPOCHS, "epochs", "the MAE paper's longest schedule is 1,600")]


def no_bool_numbers(cls: type[BaseModel], data: Any) -> Any:
    """YAML's ``true`` is not a number: pydantic would read ``epochs: true`` as 1 epoch."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if isinstance(value, bool) and field is not None and field.annotation in NUMBER_TYPES:
                raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
    return data


NUMBER_TYPES = (int, float, int | None, float | None)


class StrictModel(BaseModel):
    """Refuses unknown keys and a boolean given for a number, so a typo in a config or space file is an
    error naming it rather than a silent default (shared by the configs here and the search spaces)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        return no_bool_numbers(cls, data)


def read_text(path: Path) -> str:
    """A config file's text, or one line saying why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[data.rfind(b"\n", 0, exc.start) + 1:exc.start].decode("utf-8", "replace")) + 1
        raise ConfigError(f"{path}: not UTF-8 text at line {line}, column {column} (byte "
                          f"0x{data[exc.start]:02x})") from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``raw["a"]["b"] = value`` for ``"a.b"``, refusing keys the config does not have."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{source}: unknown parameter '{dotted}'")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"{source}: unknown parameter '{dotted}'")
    node[leaf] = value


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """Collapse pydantic's multi-line report into one line naming the key."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}" if key else msg)  # a model-level check names its key itself
    return f"{source}: " + "; ".join(parts)
