"""YAML config files: read one, apply dotted `key=value` overrides, validate it into a pydantic
model, and say in one line what is wrong when it cannot be used.

Both config families read their files here: the run config of train and evaluate
(tasks/training/run_config.py, configs/*.yaml) and the build config of build-dataset
(tasks/dataset/build_config.py, configs/dataset/*.yaml). An override's value is parsed as YAML,
so `3` is an int, `null` is None and `[0.9,0.99]` a list; intermediate sections are created.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file, an override or a value that cannot be used; the message is one line that
    names the file (or what the config came from), the overrides and each bad key."""


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict (value parsed as YAML); intermediate sections are created."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {override!r}: empty key in {dotted!r}")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {key!r} is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"override {override!r}: the value is not YAML ({_yaml_problem(error)})") from error


def read_mapping(path: str | Path, what: str, hint: str) -> dict:
    """The top-level mapping of YAML file `path` (an empty file is {}); `what` and `hint` word the
    errors, e.g. "build config" and "see configs/dataset/*.yaml"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found ({hint})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(error)})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def validate_config(cls: type[M], data: dict, overrides: Iterable[str] = (), where: str = "config") -> M:
    """Apply `overrides` to `data` (in place) and validate it as `cls`.

    Raises ConfigError with one line: `where`, the overrides, then `key: what is wrong` for each
    bad key (an unknown key lists the keys its section takes)."""
    overrides = list(overrides)
    context = f"{where} (with --set {' '.join(overrides)})" if overrides else where
    try:
        for override in overrides:
            apply_override(data, override)
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{context}: {describe_errors(error, cls)}") from error
    except ValueError as error:
        raise ConfigError(f"{context}: {_first_line(error)}") from error


def describe_errors(error: ValidationError, cls: type[BaseModel]) -> str:
    """A pydantic ValidationError in one line: `key: problem (got value)` for each error."""
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            section = _model_at(cls, loc[:-1])
            known = (
                f" ({'.'.join(map(str, loc[:-1])) or 'the top level'} takes: {', '.join(section.model_fields)})"
                if section is not None
                else ""
            )
            parts.append(f"{key}: unknown key{known}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        # A validator's own message names the value already; pydantic's built-in ones do not.
        plain = item["type"] not in ("missing", "value_error", "assertion_error") and not isinstance(
            value, (dict, list)
        )
        shown = f" (got {value!r})" if plain else ""
        parts.append(f"{key}: {message}{shown}")
    return _first_line("; ".join(parts))


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class of the section at `loc` under `cls` (None when it is not one model)."""
    for part in loc:
        if part == cls.__name__:  # pydantic names the member of a union it tried
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        models = [t for t in _members(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if len(models) != 1:
            return None
        cls = models[0]
    return cls


def _members(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _first_line(error: object) -> str:
    return " ".join(str(error).split())


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None:
        return _first_line(error)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem
