"""Declared settings: every key a recipe reads, with its type, default, range and help, in one place.

A settings class is a frozen dataclass whose fields are declared with :func:`setting` (a value),
:func:`section` (a nested mapping such as ``validation:``), :func:`group` (keys that sit at the
same level, bundled for a helper, e.g. the loop cadence) or :func:`component` (a node built with
``instantiate``; its fields are checked against the target's signature). Reading a config with
:meth:`Settings.from_config` checks everything before any heavy work:

- every value's type (``lr: abc`` is refused, ``batch_size: 2.5`` too) and range (``ge``/``gt``/
  ``choices``/``check``);
- every key: one that no field declares, in the YAML or from a ``+key`` override, is an error
  naming the file, the key and the closest declared keys;
- ``null`` means "use the default".

Adding a key is one line in the class that owns it, e.g.::

    nan_policy: str = setting("stop", "non-finite loss: stop the run or skip the step",
                              choices=("stop", "skip_step"))

No heavy imports here: ``tune validate`` runs these checks without importing torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, ClassVar, Iterator, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from tinytune.config._errors import ConfigError, close_matches
from tinytune.config._instantiate import SPECIAL_KEYS, check_arguments, locate
from tinytune.config._loader import config_source, format_path

__all__ = [
    "Settings",
    "SettingsProblem",
    "component",
    "group",
    "section",
    "setting",
]

_KIND = "tinytune_kind"


def setting(
    default: Any = None,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    required: bool = False,
    key: str | None = None,
) -> Any:
    """Declare one value key.

    Args:
        default: the value when the key is missing or null.
        help: one line for the README table and ``tune validate``.
        ge, gt, le: numeric bounds (``value >= ge``, ``value > gt``, ``value <= le``).
        choices: the allowed values.
        check: ``value -> message | None`` for any other rule.
        required: missing or null is an error.
        key: the config key when it differs from the field name.
    """
    meta = {
        _KIND: "value",
        "help": help,
        "ge": ge,
        "gt": gt,
        "le": le,
        "choices": tuple(choices) if choices else None,
        "check": check,
        "required": required,
        "key": key,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str = "", key: str | None = None) -> Any:
    """Declare a nested mapping (``validation: {...}``) read into the settings class ``cls``."""
    return dataclasses.field(default_factory=cls, metadata={_KIND: "section", "help": help, "key": key})


def group(cls: type, help: str = "") -> Any:
    """Declare keys of ``cls`` that sit at this level of the config (bundled for one helper)."""
    return dataclasses.field(default_factory=cls, metadata={_KIND: "group", "help": help})


def component(
    help: str = "",
    *,
    required: bool = False,
    runtime_args: Sequence[str] = (),
    plain: type | None = None,
    plain_target: str | None = None,
    key: str | None = None,
    mix_keys: Sequence[str] = (),
    typed: type | None = None,
) -> Any:
    """Declare a node that is built from a ``_component_`` (model, dataset, optimizer, ...).

    The node stays a config node (``instantiate`` builds it later); its ``_component_`` must import
    and its fields must fit the target's signature (nested components too).

    Args:
        help: one line for the README table.
        required: missing or null is an error.
        runtime_args: arguments the recipe passes itself (e.g. ``tokenizer``): not allowed in the node.
        plain: a settings class for the node when it has no ``_component_`` (e.g. LoRA keys only).
        plain_target: dotted function whose keyword arguments the node's keys are when it has no
            ``_component_`` (e.g. ``name``-based optimizers).
        key: the config key when it differs from the field name.
        mix_keys: when given, the node may also be a list of component nodes (a mix), each with these
            extra keys beside its ``_component_`` (positive numbers, e.g. ``weight``, ``epochs``).
        typed: a settings class for value keys the target takes (e.g. a dataset's ``truncation``): those
            present beside the ``_component_`` are typed and range-checked here too (every node of a mix);
            the target's signature still decides which keys exist.
    """
    return dataclasses.field(
        default=None,
        metadata={
            _KIND: "component",
            "help": help,
            "required": required,
            "runtime_args": tuple(runtime_args),
            "plain": plain,
            "plain_target": plain_target,
            "key": key,
            "mix_keys": tuple(mix_keys),
            "typed": typed,
        },
    )


@dataclasses.dataclass(frozen=True)
class SettingsProblem:
    """One problem found while reading settings: the key path and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class _Reader:
    """Collects problems while a config is read into settings."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.problems: list[SettingsProblem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(SettingsProblem(path or "<root>", message))


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _kind(f: dataclasses.Field) -> str:
    return f.metadata.get(_KIND, "value")


class Settings:
    """Base of every settings class (use with ``@dataclasses.dataclass(frozen=True)``)."""

    #: Name used in messages (the recipe, for recipe settings).
    NAME: ClassVar[str] = ""

    # ---- reading ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, *, source: str | None = None) -> Any:
        """Read and check ``cfg``; raise one :class:`ConfigError` listing every problem.

        Args:
            cfg: the recipe config (``DictConfig``) or a plain mapping.
            source: the YAML file, for messages (default: where ``cfg`` was loaded from).
        """
        settings, problems = cls.read(cfg, source=source)
        if problems:
            src = source or config_source(cfg)
            where = f" in {src}" if src else ""
            what = f"{cls.NAME} " if cls.NAME else ""
            lines = "\n  ".join(str(p) for p in problems)
            raise ConfigError(f"{len(problems)} problem(s) with the {what}config{where}:\n  {lines}")
        return settings

    @classmethod
    def read(cls, cfg: Any, *, source: str | None = None) -> tuple[Any, list[SettingsProblem]]:
        """``(settings or None, problems)`` without raising (for ``tune validate``)."""
        reader = _Reader(source or config_source(cfg))
        if cfg is None:
            cfg = {}
        if not _is_mapping(cfg):
            reader.add("", f"expected a mapping of keys, got {_typename(cfg)}")
            return None, reader.problems
        value = _read_mapping(cls, cfg, "", reader, claim_all=True)
        return (value if not reader.problems else None), reader.problems

    # ---- documentation ------------------------------------------------------------------------
    @classmethod
    def describe(cls, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
        """``(key, type, default, help)`` for every declared key (sections as ``a.b``)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _kind(f)
            key = format_path([prefix, _key(f)]) if prefix else _key(f)
            if kind == "group":
                yield from hints[f.name].describe(prefix)
            elif kind == "section":
                yield from hints[f.name].describe(key)
            elif kind == "component":
                yield (
                    key,
                    "component",
                    "-" if not f.metadata.get("required") else "required",
                    f.metadata.get("help", ""),
                )
                for extra in (f.metadata.get("plain"), f.metadata.get("typed")):
                    if extra is not None:
                        yield from extra.describe(key)
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                shown = "required" if f.metadata.get("required") else _show(default)
                yield key, _type_name(hints[f.name]), shown, _help_with_range(f)

    @classmethod
    def declared_keys(cls) -> list[str]:
        """Every key path this class declares."""
        return [k for k, *_ in cls.describe()]


# ---- reading helpers ---------------------------------------------------------------------------------
def _is_mapping(v: Any) -> bool:
    return isinstance(v, (DictConfig, dict))


def _keys_at_level(cls: type) -> dict[str, tuple[type, dataclasses.Field]]:
    """Config keys read at this level: own fields plus the fields of groups (recursively)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if _kind(f) == "group":
            out.update(_keys_at_level(hints[f.name]))
        else:
            out[_key(f)] = (cls, f)
    return out


def _get(node: Any, key: str) -> Any:
    if isinstance(node, DictConfig):
        if key not in node:
            return None
        return node[key]  # resolved value, or a DictConfig / ListConfig
    return node.get(key)


def _read_mapping(cls: type, node: Any, path: str, reader: _Reader, claim_all: bool) -> Any:
    known = _keys_at_level(cls)
    if claim_all:
        for k in node.keys() if node is not None else ():
            k = str(k)
            if k not in known:
                where = f" (in {reader.source})" if reader.source else ""
                hint = close_matches(k, known)
                tip = f" Did you mean {' or '.join(repr(m) for m in hint)}?" if hint else ""
                keys = "" if hint else f" Keys here: {', '.join(sorted(known))}."
                reader.add(
                    format_path([path, k]) if path else k,
                    f"unknown key{where}: nothing in {cls.NAME or 'this section'} reads it.{tip}{keys}",
                )
    return _build(cls, node, path, reader)


def _build(cls: type, node: Any, path: str, reader: _Reader) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _kind(f)
        tp = hints[f.name]
        if kind == "group":
            values[f.name] = _build(tp, node, path, reader)
            continue
        key = _key(f)
        sub = format_path([path, key]) if path else key
        raw = _get(node, key) if node is not None else None
        if kind == "section":
            if raw is None:
                raw = {}
            if not _is_mapping(raw):
                reader.add(sub, f"expected a mapping (a section of keys), got {_typename(raw)}")
                values[f.name] = tp()
                continue
            values[f.name] = _read_mapping(tp, raw, sub, reader, claim_all=True)
        elif kind == "component":
            values[f.name] = _read_component(f, raw, sub, reader)
        else:
            values[f.name] = _read_value(f, tp, raw, sub, reader)
    try:
        return cls(**values)
    except Exception as e:  # a __post_init__ rule across keys
        reader.add(path, str(e))
        return None


def _read_value(f: dataclasses.Field, tp: Any, raw: Any, path: str, reader: _Reader) -> Any:
    meta = f.metadata
    if raw is None:
        if meta.get("required"):
            reader.add(path, f"required: {meta.get('help') or 'set it'}")
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(raw, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(raw, resolve=True)
    ok, value, why = _coerce(tp, raw)
    if not ok:
        reader.add(path, f"expected {_type_name(tp)}, got {raw!r} ({_typename(raw)}){why}")
        return raw
    msg = _range_problem(meta, value)
    if msg:
        reader.add(path, msg)
    return value


def _coerce(tp: Any, raw: Any) -> tuple[bool, Any, str]:
    """``(ok, value, reason)``: ``raw`` checked against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, raw, ""
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                continue
            ok, v, _ = _coerce(a, raw)
            if ok:
                return True, v, ""
        return False, raw, ""
    if origin is typing.Literal:
        return (raw in args), raw, f"; choose from {list(args)}"
    if tp is bool:
        return isinstance(raw, bool), raw, ""
    if tp is int:
        if isinstance(raw, bool):
            return False, raw, ""
        if isinstance(raw, int):
            return True, raw, ""
        if isinstance(raw, float) and raw.is_integer():
            return True, int(raw), ""
        return False, raw, ""
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return False, raw, ""
        return True, float(raw), ""
    if tp is str:
        return isinstance(raw, str), raw, ""
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(raw, (list, tuple)):
            hint = '; write a list, e.g. ["..."]' if isinstance(raw, str) else ""
            return False, raw, hint
        item = args[0] if args else Any
        out = []
        for i, x in enumerate(raw):
            ok, v, _ = _coerce(item, x)
            if not ok:
                return False, raw, f"; item {i} ({x!r}) is not {_type_name(item)}"
            out.append(v)
        return True, out, ""
    if origin is dict or tp is dict:
        return isinstance(raw, dict), raw, ""
    return isinstance(raw, tp), raw, ""


def _range_problem(meta: Any, value: Any) -> str | None:
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"{value!r} is not one of {list(meta['choices'])}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and value < meta["ge"]:
            return f"{value!r} is out of range: must be >= {meta['ge']}"
        if meta.get("gt") is not None and value <= meta["gt"]:
            return f"{value!r} is out of range: must be > {meta['gt']}"
        if meta.get("le") is not None and value > meta["le"]:
            return f"{value!r} is out of range: must be <= {meta['le']}"
    if meta.get("check") is not None:
        return meta["check"](value)
    return None


def _read_component(f: dataclasses.Field, raw: Any, path: str, reader: _Reader) -> Any:
    meta = f.metadata
    if raw is None:
        if meta.get("required"):
            reader.add(path, f"required: {meta.get('help') or 'a node with _component_'}")
        return None
    if meta.get("mix_keys") and isinstance(raw, (ListConfig, list)):
        _read_mix(meta, raw, path, reader)
        return raw
    if not _is_mapping(raw):
        reader.add(path, f"expected a mapping with '_component_', got {_typename(raw)}")
        return None
    data = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
    plain, target = meta.get("plain"), meta.get("plain_target")
    if "_component_" in data:
        _check_component_tree(data, path, reader, top_runtime=meta.get("runtime_args", ()))
        if plain is not None:  # keys the plain form shares (e.g. LoRA keys beside a lora_* builder): typed too
            shared = {f.name for f in dataclasses.fields(plain)} & set(data)
            _read_mapping(plain, {k: data[k] for k in shared}, path, reader, claim_all=True)
        _read_typed(meta, data, path, reader)
        return raw
    if plain is not None:
        _read_mapping(plain, raw, path, reader, claim_all=True)
        return raw
    if target is not None:
        _check_kwargs(target, data, path, reader)
        _check_component_tree(data, path, reader, top_runtime=(), skip_top=True)
        return raw
    reader.add(path, "needs a '_component_' (the dotted path of what to build)")
    return None


def _read_mix(meta: Any, raw: Any, path: str, reader: _Reader) -> None:
    """A list of component nodes, each with ``meta["mix_keys"]`` (positive numbers) beside ``_component_``."""
    items = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, ListConfig) else list(raw)
    if not items:
        reader.add(path, "an empty list: give one node, or several nodes with " + " / ".join(meta["mix_keys"]))
    for i, item in enumerate(items):
        sub = f"{path}[{i}]"
        if not isinstance(item, dict) or "_component_" not in item:
            reader.add(sub, f"expected a mapping with '_component_', got {_typename(item)}")
            continue
        for k in meta["mix_keys"]:
            v = item.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                reader.add(format_path([sub, k]), f"expected a positive number, got {v!r}")
            elif v <= 0:
                reader.add(format_path([sub, k]), f"{v!r} must be > 0 (drop the source instead of giving it {v!r})")
        node = {k: v for k, v in item.items() if k not in meta["mix_keys"]}
        _check_component_tree(node, sub, reader, top_runtime=meta.get("runtime_args", ()))
        _read_typed(meta, node, sub, reader)


def _read_typed(meta: Any, data: dict, path: str, reader: _Reader) -> None:
    """The keys of ``data`` that ``meta["typed"]`` declares, read (typed, range-checked) with it."""
    typed = meta.get("typed")
    if typed is not None:
        shared = {f.name for f in dataclasses.fields(typed)} & set(data)
        _read_mapping(typed, {k: data[k] for k in shared}, path, reader, claim_all=True)


def _check_kwargs(target: str, kwargs: dict, path: str, reader: _Reader) -> None:
    try:
        fn = locate(target, path, reader.source)
        check_arguments(
            fn,
            (),
            {k: v for k, v in kwargs.items() if k not in SPECIAL_KEYS},
            partial=True,
            path=path,
            source=None,
            dotted=path,
        )
    except ConfigError as e:
        reader.add(path, _strip_key(str(e)))


def _check_component_tree(
    obj: Any, path: str, reader: _Reader, top_runtime: Sequence[str] = (), skip_top: bool = False
) -> None:
    """Every ``_component_`` in ``obj`` imports and its fields bind to the target's signature."""
    if isinstance(obj, dict):
        if "_component_" in obj and not skip_top:
            kwargs = {str(k): v for k, v in obj.items() if k not in SPECIAL_KEYS}
            taken = [k for k in top_runtime if k in kwargs]
            if taken:
                reader.add(path, f"{', '.join(taken)}: set by the recipe itself; remove it from the config")
            try:
                fn = locate(obj["_component_"], path, None)
                check_arguments(fn, (), kwargs, partial=True, path=path, source=None, dotted=obj["_component_"])
            except ConfigError as e:
                reader.add(path, _strip_key(str(e)))
        for k, v in obj.items():
            if k != "_component_":
                _check_component_tree(v, format_path([path, k]) if path else str(k), reader)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_component_tree(v, f"{path}[{i}]", reader)


def _strip_key(message: str) -> str:
    if message.startswith("'") and "': " in message:
        return message.split("': ", 1)[1]
    return message


# ---- names for messages and the README table ---------------------------------------------------------
def _typename(v: Any) -> str:
    if isinstance(v, (DictConfig, dict)):
        return "a mapping"
    if isinstance(v, (ListConfig, list, tuple)):
        return "a list"
    return type(v).__name__


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (list, tuple, Sequence):
        return f"list[{_type_name(args[0]) if args else 'any'}]"
    if tp is float:
        return "number"
    return getattr(tp, "__name__", str(tp))


def _show(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, (list, tuple)):
        return "[" + ", ".join(str(x) for x in default) + "]"
    return str(default)


def _help_with_range(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices"):
        parts.append(" | ".join(str(c) for c in meta["choices"]))
    for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<=")):
        if meta.get(name) is not None:
            parts.append(f"{sym} {meta[name]}")
    text = meta.get("help", "")
    return f"{text} ({'; '.join(parts)})" if parts else text
