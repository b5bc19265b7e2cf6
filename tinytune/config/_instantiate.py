"""``instantiate``: build Python objects from config nodes that carry a ``_component_`` path.

A node such as::

    optimizer:
      _component_: torch.optim.AdamW
      lr: 2e-5

becomes ``torch.optim.AdamW(params, lr=2e-5)`` with ``instantiate(cfg.optimizer, params)``.
Nested nodes with a ``_component_`` are built first (depth first) and passed in as arguments;
other mappings and lists are passed as plain ``dict`` / ``list``. Keyword arguments given to
``instantiate`` override (and replace, without building) the node's own fields. A node with
``_partial_: true`` returns a ``functools.partial`` instead of calling the component.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from tinytune.config._errors import ConfigError, close_matches, did_you_mean
from tinytune.config._loader import config_source, format_path, node_path, where

SPECIAL_KEYS = ("_component_", "_partial_")


def _describe(path: str, source: str | None) -> str:
    return f"'{path or '<root>'}'{where(source)}"


def locate(dotted: str, path: str = "", source: str | None = None) -> Any:
    """Import the object named by a dotted path such as ``torch.optim.AdamW``.

    Args:
        dotted: ``package.module.attr`` (attributes may be nested: ``pkg.Class.method``).
        path: Key path of the node naming it (for error messages).
        source: YAML file of the config (for error messages).

    Returns:
        The imported object.

    Raises:
        ConfigError: The module or attribute does not exist (with close matches from the
            module that did import) or the module fails to import.
    """
    key = f"{path}._component_" if path else "_component_"
    if not isinstance(dotted, str) or not dotted.strip() or any(not p for p in dotted.split(".")):
        raise ConfigError(f"{_describe(key, source)}: {dotted!r} is not a dotted import path like 'torch.optim.AdamW'.")
    parts = dotted.split(".")
    module = None
    n = 0  # parts[:n] is the deepest importable module; the rest are attributes
    for k in range(1, len(parts) + 1):
        modname = ".".join(parts[:k])
        try:
            module = importlib.import_module(modname)
            n = k
        except ModuleNotFoundError as e:
            if e.name == modname:
                break  # not a module: the remaining parts are attributes
            raise ConfigError(
                f"{_describe(key, source)}: importing module '{modname}' for '{dotted}' failed: {e}. "
                "A dependency of that module is missing."
            ) from e
        except Exception as e:  # noqa: BLE001 - report any import-time failure with its key
            raise ConfigError(
                f"{_describe(key, source)}: importing module '{modname}' for '{dotted}' failed: {type(e).__name__}: {e}"
            ) from e
    if module is None:
        top = sorted({m.name for m in pkgutil.iter_modules()})
        raise ConfigError(
            f"{_describe(key, source)}: cannot import '{dotted}': no module named '{parts[0]}'."
            + did_you_mean(parts[0], top)
        )
    obj: Any = module
    for i in range(n, len(parts)):
        attr = parts[i]
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        owner = ".".join(parts[:i])
        candidates = [a for a in dir(obj) if not a.startswith("_")]
        if hasattr(obj, "__path__"):  # a package: its submodules are candidates too
            candidates += [m.name for m in pkgutil.iter_modules(obj.__path__)]
        matches = close_matches(attr, candidates)
        hint = (" Did you mean " + " or ".join(f"'{owner}.{c}'" for c in matches) + "?") if matches else ""
        raise ConfigError(
            f"{_describe(key, source)}: cannot import '{dotted}': '{owner}' has no attribute '{attr}'.{hint}"
        )
    return obj


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature
        return None


def check_arguments(
    fn: Callable, args: tuple, kwargs: dict, *, partial: bool, path: str, source: str | None, dotted: str
) -> None:
    """Raise ConfigError when ``args``/``kwargs`` do not bind to ``fn``'s signature.

    With ``partial=True`` missing arguments are allowed (``inspect.Signature.bind_partial``).
    Unknown keyword names are reported with close matches among the real parameter names.
    """
    sig = _signature(fn)
    if sig is None:
        return
    params = sig.parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in named]
        if unknown:
            msgs = []
            for k in unknown:
                matches = close_matches(k, named)
                hint = f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
                msgs.append(f"'{format_path([path, k]) if path else k}'{hint}")
            raise ConfigError(
                f"{_describe(path, source)}: {dotted} has no parameter for key "
                + ", ".join(msgs)
                + f". Its parameters are: {', '.join(named) or '(none)'}."
            )
    try:
        (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{_describe(path, source)}: arguments do not fit {dotted}{sig}: {e}.") from e


def _build(value: Any, path: str, source: str | None) -> Any:
    """Turn a config value into plain Python, instantiating nested ``_component_`` nodes."""
    if isinstance(value, DictConfig):
        if "_component_" in value.keys():
            return _instantiate_node(value, path, source, (), {})
        return {str(k): _build(value[k], format_path([path, k]) if path else str(k), source) for k in value.keys()}
    if isinstance(value, ListConfig):
        return [_build(v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "_component_" in value:
            return _instantiate_node(OmegaConf.create(value), path, source, (), {})
        return {k: _build(v, format_path([path, k]) if path else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    return value


def _instantiate_node(node: DictConfig, path: str, source: str | None, args: tuple, overrides: dict) -> Any:
    if "_component_" not in node.keys():
        keys = ", ".join(str(k) for k in node.keys()) or "(empty)"
        raise ConfigError(f"{_describe(path, source)}: cannot instantiate a node without '_component_' (keys: {keys}).")
    dotted = node["_component_"]
    fn = locate(dotted, path, source)
    partial = bool(node.get("_partial_", False))
    kwargs: dict[str, Any] = {}
    for k in node.keys():
        k = str(k)
        if k in SPECIAL_KEYS or k in overrides:
            continue
        key = format_path([path, k]) if path else k
        if OmegaConf.is_missing(node, k):
            raise ConfigError(
                f"{_describe(key, source)}: has no value ('???'); set it on the command line: {key}=VALUE."
            )
        kwargs[k] = _build(node[k], key, source)
    kwargs.update(overrides)
    check_arguments(fn, args, kwargs, partial=partial, path=path, source=source, dotted=dotted)
    if partial:
        return functools.partial(fn, *args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"while instantiating {_describe(path, source)} ({dotted})")
        raise


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object described by a config node.

    Args:
        node: A DictConfig (or dict) with a ``_component_`` dotted path; None returns None.
        *args: Positional arguments passed first (e.g. model parameters for an optimizer).
        **kwargs: Keyword arguments that override the node's fields.

    Returns:
        ``component(*args, **fields)``, with nested ``_component_`` nodes built first, or a
        ``functools.partial`` when the node sets ``_partial_: true``.

    Raises:
        ConfigError: No ``_component_``, an import failure, or arguments that do not fit the
            component's signature; the message names the key path and the YAML file.

    Example:
        >>> opt = instantiate(cfg.optimizer, model.parameters(), lr=1e-3)
    """
    if node is None:
        return None
    if isinstance(node, dict):
        node = OmegaConf.create(node)
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"instantiate() needs a config mapping with a '_component_' key, got {type(node).__name__}: {node!r}."
        )
    return _instantiate_node(node, node_path(node), config_source(node), args, kwargs)
