"""Settings dataclasses filled from YAML files, typed values and ``KEY=VALUE`` overrides.

One loader for every feature with a config file (training, generator fine-tuning ...): the dataclass's
fields and their annotated types are the schema. Unknown keys, values of the wrong type and unreadable
YAML are one-line :class:`~rewardlab.errors.ConfigError`s naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _describe(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` as type ``kind`` (int, float, bool, str, list[...], dict, X | None); ``where`` names the
    setting in the error. YAML 1.1 reads ``2e-5`` as a string and ``no`` as False: both are fixed here."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if kind is Any:
        return value
    if origin in (list, tuple) or kind in (list, tuple):
        args = typing.get_args(kind)
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(item, inner, f"{where}[{i}]") for i, item in enumerate(items)]
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping (key: value), got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{where}: {value!r} is not true/false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(value) if isinstance(value, (str, float)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{where}: {value!r} is not an integer")
        return int(number)
    if kind is float:
        try:
            number = float(value) if not isinstance(value, bool) and isinstance(value, (str, int, float)) else None
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"{where}: {value!r} is not a number")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    if kind is str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: settings of type {_describe(kind)} are not supported")


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"known settings: {', '.join(known)}"
    return ConfigError(f"{where}: unknown setting {key!r}", hint)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}{line}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected key: value settings at the top level, got {type(data).__name__}")
    return data


def _is_text(kind: Any) -> bool:
    """Whether a setting of type ``kind`` holds text (``str`` or ``str | None``)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    return str in options and all(o in (str, type(None)) for o in options)


def parse_override(item: str, types_: Mapping[str, Any]) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value): YAML-parsed (numbers, lists, mappings, true/false), except that text
    settings take VALUE as written (a JSON spec, a path with ``:``), ``null`` meaning None."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE")
    if key not in types_:
        raise _unknown(key, types_, f"override {item!r}")
    if _is_text(types_[key]):
        return key, None if raw.strip() in ("null", "~") and type(None) in typing.get_args(types_[key]) else raw
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        return key, raw


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                values: Mapping[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from a YAML file, then ``overrides`` (``KEY=VALUE`` strings, e.g. a CLI's
    ``--set``), then ``values`` (already-typed settings, e.g. CLI options), later ones winning.

    Every value is checked against the field's type; ``cls.__post_init__`` may validate further."""
    types_ = field_types(cls)
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is not None:
        for key, value in read_yaml(path).items():
            if key not in types_:
                raise _unknown(str(key), types_, str(path))
            merged[key], source[key] = value, f"{path}: setting {key}"
    for item in overrides:
        key, value = parse_override(item, types_)
        merged[key], source[key] = value, f"--set: setting {key}"
    for key, value in (values or {}).items():
        if key not in types_:
            raise _unknown(key, types_, "option")
        merged[key], source[key] = value, f"setting {key}"
    typed = {key: coerce(value, types_[key], source[key]) for key, value in merged.items()}
    return cls(**typed)
