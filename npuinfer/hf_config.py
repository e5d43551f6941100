"""config.json of a Hugging Face checkpoint directory: read as JSON, its fields read with their types checked.

A field that holds the wrong JSON type (``"3"``, ``3.0`` or ``true`` where an integer belongs, ``null``, a string
where a number belongs) is refused with the field's name and the type expected; nothing is coerced.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint directory, file, field or tensor is not what the family expects."""


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a Hugging Face checkpoint directory holds config.json")
    return read_json_object(path)


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file that must hold one object; CheckpointError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object{what}")
    return data


_ABSENT = object()


class ConfigFields:
    """Typed access to config.json fields; every error names the file and the field.

    A field is looked up under each of ``names`` in turn (legacy names and those transformers 5 writes);
    a dotted name looks inside a nested object. ``default`` applies only when none is present: a field
    present with ``null`` is an error, not a default.
    """

    def __init__(self, config: dict, path: str = "config.json") -> None:
        self.config = config
        self.path = path

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def has(self, name: str) -> bool:
        return self._lookup(name) is not _ABSENT

    def _lookup(self, name: str) -> Any:
        node: Any = self.config
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                return _ABSENT
            node = node[part]
        return node

    def _first(self, names: tuple[str, ...], default: Any, expected: str) -> tuple[str, Any]:
        for name in names:
            value = self._lookup(name)
            if value is None:
                raise self.error(f"{name} is null; expected {expected}")
            if value is not _ABSENT:
                return name, value
        if default is _ABSENT:
            raise self.error(f"missing field {' or '.join(names)} ({expected})")
        return "", default

    def optional_value(self, name: str) -> Any:
        """The raw value of a field that may be absent or ``null`` (both: None), for fields real configs write
        as null (``rope_scaling``, ``sliding_window``)."""
        value = self._lookup(name)
        return None if value is _ABSENT else value

    def optional_object(self, name: str) -> dict | None:
        """A JSON object field that may be absent or null (None); any other type is refused."""
        value = self.optional_value(name)
        if value is not None and not isinstance(value, dict):
            raise self.error(f"{name} is {json.dumps(value)}; expected a JSON object or null")
        return value

    def integer(self, *names: str, default: Any = _ABSENT, minimum: int = 1) -> int:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        name, value = self._first(names, default, expected)
        if type(value) is not int or value < minimum:  # bool is a subclass of int: refused too
            raise self.error(f"{name} is {json.dumps(value)}; expected {expected}")
        return value

    def number(self, *names: str, default: Any = _ABSENT, positive: bool = False) -> float:
        expected = "a positive number" if positive else "a number"
        name, value = self._first(names, default, expected)
        if type(value) not in (int, float) or (positive and not value > 0):
            raise self.error(f"{name} is {json.dumps(value)}; expected {expected}")
        return float(value)

    def flag(self, *names: str, default: Any = _ABSENT) -> bool:
        name, value = self._first(names, default, "true or false")
        if type(value) is not bool:
            raise self.error(f"{name} is {json.dumps(value)}; expected true or false")
        return value

    def text(self, *names: str, default: Any = _ABSENT, choices: tuple[str, ...] = ()) -> str:
        expected = f"one of {', '.join(choices)}" if choices else "a string"
        name, value = self._first(names, default, expected)
        if not isinstance(value, str) or (choices and value not in choices):
            raise self.error(f"{name} is {json.dumps(value)}; expected {expected}")
        return value

    def head_dim(self, hidden: int, heads: int, *explicit: str) -> int:
        """Width of one head: an explicit field when the config has one, else hidden_size / heads, which must divide."""
        if any(self.has(name) for name in explicit):
            return self.integer(*explicit)
        if hidden % heads:
            raise self.error(f"num_attention_heads={heads} does not divide hidden_size={hidden}; each head must "
                             f"get hidden_size / num_attention_heads dimensions")
        return hidden // heads
