"""Run settings as dataclasses filled from a YAML recipe and ``--set KEY=VALUE`` overrides.

Shared by ``rewardlab train`` and ``rewardlab finetune`` so both read recipes the same way: unknown keys
are errors naming the file, override values are parsed as YAML, and YAML 1.1 quirks (``2e-5`` read as a
string, ``no`` read as False) are undone using each field's declared type.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError

T = TypeVar("T")


def _base_kind(kind: Any) -> tuple[str, bool]:
    """``"float | None"`` -> ("float", True); works on the string annotations of ``from __future__``."""
    text = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    return (parts[0] if parts else text), optional


def coerce_setting(key: str, value: Any, kind: Any) -> Any:
    """Give ``value`` the declared type ``kind`` where YAML guessed another one."""
    base, optional = _base_kind(kind)
    if value is None and optional:
        return None
    try:
        if base == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if base == "int" and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigError(f"setting {key}: {value!r} is not a number") from None
    if base.startswith("str") and isinstance(value, bool):
        return "yes" if value else "no"
    if base.startswith("list") and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


def config_from_yaml(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """An instance of dataclass ``cls`` from the YAML file ``path`` (optional) and ``KEY=VALUE`` overrides."""
    where = str(path) if path else "config"
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    else:
        values = {}
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(str, unknown))}",
                          f"known settings: {', '.join(known)}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"bad override {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return cls(**{key: coerce_setting(key, value, known[key].type) for key, value in values.items()})
