"""Typed config dataclasses, filled from YAML presets and CLI overrides, checked before any work starts."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
import types
import typing
from pathlib import Path

import yaml

from dstudio.distill.core.errors import UserError


def _config_dir() -> Path:
    """The presets: the repository's configs/, installed as the package data `dstudio.configs`."""
    spec = importlib.util.find_spec("dstudio.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "configs"  # an editable install made before configs was mapped


CONFIG_DIR = _config_dir()
DEFAULT_PRESET = "quick"


class ConfigError(UserError):
    """A config value that cannot be used; the message names the key, the value and what is accepted."""


def _coerce(name: str, value, tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        item = args[0] if args else typing.Any
        out = [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`: unknown keys get a did-you-mean, wrong types a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def to_dict(obj) -> dict:
    """A config dataclass as plain YAML-safe data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def load_preset(method: str, preset: str, data: str = "mnist") -> dict:
    """The named preset of `configs/<method>_<data>.yaml` (a YAML file path is also accepted as `preset`)."""
    data = Path(data).name if data else "mnist"
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file '{preset}' does not exist")
        return yaml.safe_load(path.read_text()) or {}
    path = CONFIG_DIR / f"{method}_{data}.yaml"
    if not path.is_file():  # user folders and sets without their own presets start from the MNIST ones
        path = CONFIG_DIR / f"{method}_mnist.yaml"
    if not path.is_file() and preset == DEFAULT_PRESET:  # a method without presets runs on its config defaults
        print(f"dstudio: note: {method} has no presets in configs/: '{preset}' means its config defaults",
              file=sys.stderr)
        return {}
    presets = yaml.safe_load(path.read_text()) if path.is_file() else {}
    if preset not in presets:
        raise ConfigError(f"unknown preset '{preset}' for {method} on {data}: use one of "
                          f"{', '.join(presets) or '(none)'} or a YAML file")
    return presets[preset] or {}


def parse_override(text: str) -> tuple[str, object]:
    """`section.key=value` with a YAML value, e.g. `trainer.steps=100` or `method.channels=[32,64]`."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def merge_overrides(config: dict, overrides: list[str]) -> dict:
    out = {k: dict(v or {}) for k, v in config.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section not in ("trainer", "method") or not name:
            raise ConfigError(f"override '{text}' must start with trainer. or method.")
        out.setdefault(section, {})[name] = value
    return out
