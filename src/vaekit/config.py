"""Typed job configs: dataclasses loaded from YAML, overridden by `a.b=value`, saved resolved.

Unknown keys and values of the wrong type are errors that name the key, never silent defaults.
"""

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from vaekit.errors import VaekitError
from vaekit.io import write_text

# The dtype names config keys and flags take (--dtype, --compute_dtype); vaekit.device maps them to torch.
DTYPE_NAMES = ("fp32", "fp16", "bf16")


class OverrideValue:
    """A `key=value` override: the text as typed and its YAML reading, resolved by the field's type.

    YAML 1.1 reads `no`, `off`, `yes` as booleans and `1e-6` as text; a field that takes text (or one
    of some words, like `mixed_precision: no`) gets the text as typed, every other field the YAML value.
    """

    def __init__(self, text, value):
        self.text, self.value = text, value

    def __repr__(self):
        return repr(self.text)


def plain(value):
    """`value` with every OverrideValue replaced by its YAML reading (for untyped fields such as dicts)."""
    if isinstance(value, OverrideValue):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _accepts_text(tp, text):
    """Whether a field of type `tp` takes `text` itself as its value."""
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return text in typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_text(arg, text) for arg in typing.get_args(tp))
    return False


def _yaml_word(choices, value):
    """The choice that YAML reads as `value` (`no` for False), so `mixed_precision: no` keeps its meaning."""
    for choice in choices:
        if isinstance(choice, str) and yaml.safe_load(choice) == value and type(yaml.safe_load(choice)) is type(value):
            return choice
    return None


def _type_name(tp):
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key):
    """Check `value` against the annotation `tp` and convert it where the conversion is lossless."""
    if isinstance(value, OverrideValue):
        value = value.text if value.value is not None and _accepts_text(tp, value.text) else value.value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except VaekitError as e:
                errors.append(str(e))
        raise VaekitError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid value ({tp}).")
    if origin is typing.Literal:
        if isinstance(value, bool) and value not in args and _yaml_word(args, value) is not None:
            return _yaml_word(args, value)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise VaekitError(f"{key}: {value!r} is not one of {choices}.")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise VaekitError(f"{key}: expected a list, got {value!r}.")
        inner = args[0] if args else typing.Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise VaekitError(f"{key}: expected a mapping, got {value!r}.")
        return plain(dict(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise VaekitError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}.")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise VaekitError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise VaekitError(f"{key}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-6` as a string; accept it as the number it means.
                return float(value)
            except ValueError:
                pass
        raise VaekitError(f"{key}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise VaekitError(f"{key}: expected a string, got {value!r}.")
    return plain(value)


def from_dict(cls, data, prefix=""):
    """Build dataclass `cls` from a (nested) dict; an unknown key is an error naming it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VaekitError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise VaekitError(
            f"Unknown config key '{prefix}{unknown[0]}'. Valid keys here: {', '.join(prefix + n for n in names)}."
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise VaekitError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


def to_dict(obj):
    """A dataclass as plain nested dicts and lists (safe for YAML and JSON)."""
    return dataclasses.asdict(obj)


def parse_override(text):
    """Split `a.b=value` into (['a', 'b'], value); the value is read as YAML (`true`, `3`, `[1, 2]`).

    See OverrideValue for how a config field then takes it.
    """
    if "=" not in text:
        raise VaekitError(f"Override '{text}' must look like key=value (for example train.lr=1e-4).")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise VaekitError(f"Override '{text}' has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def flat_overrides(items, what="model"):
    """`key=value` strings (or a dict, returned as is) as a dict of top-level keys, e.g. model config overrides."""
    if isinstance(items, dict):
        return dict(items)
    overrides = {}
    for text in items or ():
        path, value = parse_override(text)
        if len(path) != 1:
            raise VaekitError(f"{what.capitalize()} override '{text}' must name a top-level config key, like "
                              f"scaling_factor=0.13.")
        overrides[path[0]] = value
    return overrides


def apply_overrides(data, overrides):
    """Apply `a.b=value` strings to a nested dict in place and return it."""
    for text in overrides:
        path, value = parse_override(text)
        raw = text.split("=", 1)[1].strip()
        value = OverrideValue(raw, value)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise VaekitError(f"Override '{text}': '{part}' is a value, not a section.")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path):
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise VaekitError(f"Config file not found: {path}. Pass an existing YAML file (see configs/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VaekitError(f"Config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VaekitError(f"Config file {path} must hold a mapping of keys to values.")
    return data


def load_config(cls, path=None, overrides=()):
    """Defaults from `cls`, then the YAML file at `path`, then `a.b=value` overrides."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def save_config(obj, path):
    """Write the resolved config as YAML atomically."""
    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
