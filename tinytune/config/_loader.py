"""Loading YAML configs and applying ``key=value`` command-line overrides.

Override grammar (one token per override):

* ``key=value``      set an existing key (nested ``a.b.c``, list items ``a.0`` or ``a[0]``);
  a key that does not exist is an error that suggests close matches.
* ``+key=value``     add a new key (an error if it already exists); parents are created.
* ``++key=value``    set the key whether or not it exists.
* ``~key``           delete a key (or a list item).
* ``model=pkg.fn``   shorthand for ``model._component_=pkg.fn`` when ``model`` is a mapping
  with a ``_component_``.

Values are parsed as YAML (``1e-4`` -> float, ``[1, 2]`` -> list, ``{a: 1}`` -> dict,
``null`` -> None); ``${...}`` interpolations are resolved after all overrides are applied.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tinytune.config._errors import ConfigError, close_matches, did_you_mean
from tinytune.config.registry import resolve_config

# id(root DictConfig) -> the YAML file it was loaded from. Entries are dropped when the config dies.
_SOURCES: dict[int, str] = {}

_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[^=\s]+?)(?:=(?P<value>.*))?$", re.S)
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]+$")
_BARE_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


# ----------------------------------------------------------------------------------------------
# source tracking and key paths


def remember_source(cfg: DictConfig, source: str | os.PathLike) -> None:
    """Record the file ``cfg`` was loaded from, so later errors can name it."""
    key = id(cfg)
    _SOURCES[key] = os.fspath(source)
    weakref.finalize(cfg, _SOURCES.pop, key, None)


def config_source(node: Any) -> str | None:
    """The YAML file that the config holding ``node`` was loaded from, if known."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return None
    root = node._get_root()
    return _SOURCES.get(id(root))


def node_path(node: Any) -> str:
    """The key path of ``node`` inside its config, e.g. ``"model"`` or ``"dataset[1].source"``.

    Returns an empty string for the root (or for plain Python objects).
    """
    parts: list[Any] = []
    while isinstance(node, (DictConfig, ListConfig)) and node._get_parent() is not None:
        parts.append(node._key())
        node = node._get_parent()
    return format_path(reversed(parts))


def format_path(parts: Iterable[Any]) -> str:
    """Join key segments: ``["a", 0, "b"]`` -> ``"a[0].b"``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def where(source: str | None) -> str:
    """``" (in FILE)"`` or an empty string."""
    return f" (in {source})" if source else ""


def key_paths(cfg: DictConfig | ListConfig) -> list[str]:
    """Every key path in ``cfg`` (containers and leaves), without resolving interpolations."""
    out: list[str] = []

    def walk(obj: Any, prefix: list[Any]) -> None:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for k, v in items:
            path = prefix + [k]
            out.append(format_path(path))
            walk(v, path)

    walk(OmegaConf.to_container(cfg, resolve=False), [])
    return out


# ----------------------------------------------------------------------------------------------
# loading


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """Load one YAML file into a DictConfig (no overrides, interpolations left as written).

    Raises:
        ConfigError: The file is missing, is not valid YAML, or is not a mapping at the top.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}.") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{loc}: invalid YAML: {problem}.") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys, got {type(data).__name__}.")
    try:
        cfg = OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from e
    remember_source(cfg, path)
    return cfg


def load_config(
    name_or_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    resolve: bool = True,
) -> DictConfig:
    """Load a config by registry name or path, apply overrides and resolve interpolations.

    Args:
        name_or_path: A registered config name (``"smollm2/135M_lora"``) or a YAML path.
        overrides: ``key=value`` / ``+key=value`` / ``~key`` tokens, applied in order.
        resolve: Resolve ``${...}`` interpolations (errors name the key and the file).

    Returns:
        The config. ``config_source(cfg)`` gives the file it came from.

    Raises:
        ConfigError: Unknown name, unreadable file, bad override or unresolvable interpolation.
    """
    path = resolve_config(name_or_path)
    cfg = load_yaml(path)
    apply_overrides(cfg, overrides)
    if resolve:
        resolve_interpolations(cfg)
    return cfg


def resolve_interpolations(cfg: DictConfig) -> DictConfig:
    """Resolve every ``${...}`` in place; errors name the key, the file and close key names."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = getattr(e, "msg", None) or str(e)
        hint = ""
        m = re.search(r"Interpolation key '([^']+)' not found", msg)
        if m:
            hint = did_you_mean(m.group(1), key_paths(cfg))
        raise ConfigError(
            f"cannot resolve the interpolation at key '{key}'{where(config_source(cfg))}: {msg.splitlines()[0]}.{hint}"
        ) from e
    return cfg


# ----------------------------------------------------------------------------------------------
# overrides


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``1e-4`` counts as a float, ``""`` stays a string)."""
    if text == "":
        return ""
    if _BARE_FLOAT.match(text.strip()):
        return float(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if _plain(value) else text


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False  # e.g. YAML dates: keep the raw text instead


def _split_key(key: str, token: str) -> list[Any]:
    """``"a.b[0].c"`` or ``"a.b.0.c"`` -> ``["a", "b", 0, "c"]``."""
    parts: list[Any] = []
    for chunk in key.replace("[", ".[").split("."):
        if chunk.startswith("[") and chunk.endswith("]") and chunk[1:-1].isdigit():
            parts.append(int(chunk[1:-1]))
        elif chunk and _SEGMENT.match(chunk):
            parts.append(int(chunk) if chunk.isdigit() else chunk)
        else:
            raise ConfigError(f"override '{token}': '{key}' is not a valid key path (write a.b.c or a.list[0]).")
    return parts


def _child(node: Any, seg: Any) -> tuple[bool, Any]:
    """(exists, child) without resolving interpolations of leaves."""
    if isinstance(node, DictConfig):
        if str(seg) in node.keys():
            return True, node._get_node(str(seg))
        return False, None
    if isinstance(node, ListConfig) and isinstance(seg, int):
        if 0 <= seg < len(node):
            return True, node._get_node(seg)
    return False, None


def _missing(cfg: DictConfig, key: str, token: str, prefix: str, value: str | None) -> ConfigError:
    paths = key_paths(cfg)
    hint = did_you_mean(key, paths)
    if not hint:
        # Maybe the prefix is missing or wrong (``lr`` for ``optimizer.lr``): match on the last segment.
        last = re.split(r"[.\[]", key)[-1]
        same_leaf = [p for p in paths if close_matches(last, [re.split(r"[.\[]", p)[-1]], n=1, cutoff=0.8)]
        if same_leaf:
            hint = " Did you mean " + " or ".join(repr(p) for p in same_leaf[:3]) + "?"
    add = f" To add a new key, write '+{key}={value}'." if prefix == "" and value is not None else ""
    return ConfigError(f"override '{token}': key '{key}' does not exist{where(config_source(cfg))}.{hint}{add}")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply command-line overrides to ``cfg`` in place (grammar in the module docstring).

    Args:
        cfg: The loaded config.
        overrides: Tokens such as ``optimizer.lr=1e-4``, ``+new.key=3``, ``~profiler``.

    Returns:
        ``cfg``, for chaining.

    Raises:
        ConfigError: Malformed token, unknown key (with suggestions), or a type clash.
    """
    for token in overrides:
        m = _OVERRIDE.match(token)
        if not m:
            raise ConfigError(f"override '{token}' is not of the form key=value, +key=value or ~key.")
        prefix, key, value = m.group("prefix") or "", m.group("key"), m.group("value")
        if prefix == "~":
            if value is not None:
                raise ConfigError(f"override '{token}': '~{key}' deletes a key and takes no value.")
        elif value is None:
            raise ConfigError(f"override '{token}' has no '='; write {key}=VALUE (or ~{key} to delete).")
        parts = _split_key(key, token)
        _apply_one(cfg, token, prefix, key, parts, value)
    return cfg


def _apply_one(cfg: DictConfig, token: str, prefix: str, key: str, parts: list[Any], raw: str | None) -> None:
    node: Any = cfg
    for i, seg in enumerate(parts[:-1]):
        exists, child = _child(node, seg)
        if exists and isinstance(child, (DictConfig, ListConfig)):
            node = child
            continue
        if exists and prefix not in ("+", "++"):
            raise ConfigError(
                f"override '{token}': '{format_path(parts[: i + 1])}' is a value, not a mapping{where(config_source(cfg))}."
            )
        if not exists and prefix not in ("+", "++"):
            raise _missing(cfg, key, token, prefix, raw)
        if isinstance(node, ListConfig):
            raise ConfigError(f"override '{token}': list index {seg} is out of range at '{format_path(parts[:i])}'.")
        node[str(seg)] = {}
        node = node._get_node(str(seg))

    last = parts[-1]
    exists, current = _child(node, last)
    if prefix == "~":
        if not exists:
            raise _missing(cfg, key, token, prefix, raw)
        del node[last if isinstance(node, ListConfig) else str(last)]
        return

    value = parse_value(raw)
    if prefix == "+" and exists:
        raise ConfigError(
            f"override '{token}': key '{key}' already exists{where(config_source(cfg))}; "
            f"drop the '+' to change it, or write '++{key}=...' to set it either way."
        )
    if prefix == "" and not exists:
        raise _missing(cfg, key, token, prefix, raw)

    if isinstance(node, ListConfig):
        if not isinstance(last, int):
            raise ConfigError(f"override '{token}': '{format_path(parts[:-1])}' is a list; index it with a number.")
        if exists:
            node[last] = value
        elif last == len(node):
            node.append(value)
        else:
            raise ConfigError(
                f"override '{token}': index {last} is out of range for the list "
                f"'{format_path(parts[:-1])}' of length {len(node)}."
            )
        return

    if exists and isinstance(current, DictConfig) and not isinstance(value, dict) and value is not None:
        if "_component_" in current.keys() and isinstance(value, str):
            current["_component_"] = value  # shorthand: model=pkg.builder
            return
        raise ConfigError(
            f"override '{token}': '{key}' is a mapping{where(config_source(cfg))}; set its fields "
            f"({key}.FIELD=...) or replace it with a mapping ({key}={{a: 1}})."
        )
    node[str(last)] = value


__all__ = [
    "apply_overrides",
    "close_matches",
    "config_source",
    "key_paths",
    "load_config",
    "load_yaml",
    "node_path",
    "parse_value",
    "remember_source",
    "resolve_interpolations",
]
