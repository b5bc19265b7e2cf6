"""Discovery of the recipes and configs shipped with tinytune.

Recipes are the ``recipes/*.py`` modules of the installed ``recipes`` package (recipe name = file
stem; files starting with ``_`` are helpers, not recipes). Configs are the
``configs/<family>/<name>.yaml`` files of the installed ``configs`` package (config name =
``<family>/<name>``). Each config declares the recipe it is written for in a comment on its first
line::

    # recipe: lora_finetune

Nothing here is hard-coded: a YAML file dropped into ``configs/<family>/`` shows up in
``tune ls`` and resolves by name in ``tune run`` / ``--config``. Only the standard library is
imported, so ``tune --help`` stays fast.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tinytune.config._errors import ConfigError, did_you_mean

_RECIPE_LINE = re.compile(r"^#\s*recipe\s*:\s*(\S+)\s*$")


@dataclass(frozen=True)
class ConfigEntry:
    """One registered config.

    Attributes:
        name: Registry name, ``<family>/<name>``.
        path: The YAML file.
        recipe: The recipe named in its ``# recipe:`` header, or None when the header is missing.
    """

    name: str
    path: Path
    recipe: str | None


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, or None when it is not installed."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        return None
    # Regular installs and editable installs give a real directory; zipped installs are unsupported.
    path = Path(os.fspath(root)) if isinstance(root, os.PathLike) else Path(str(root))
    return path if path.is_dir() else None


def recipes_dir() -> Path | None:
    """Directory holding the shipped recipe scripts."""
    return _package_dir("recipes")


def configs_dir() -> Path | None:
    """Directory holding the shipped ``<family>/<name>.yaml`` configs."""
    return _package_dir("configs")


def declared_recipe(path: str | os.PathLike) -> str | None:
    """Read the ``# recipe: NAME`` header of a config file.

    The header is looked for in the leading block of comment lines (normally it is line 1).

    Args:
        path: A YAML config file.

    Returns:
        The recipe name, or None when the file has no such header.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if not line.startswith("#"):
                return None
            m = _RECIPE_LINE.match(line)
            if m:
                return m.group(1)
    return None


def list_recipes() -> dict[str, Path]:
    """All shipped recipes, ``{name: path}``, sorted by name."""
    root = recipes_dir()
    if root is None:
        return {}
    found = {p.stem: p for p in root.glob("*.py") if not p.stem.startswith("_")}
    return dict(sorted(found.items()))


def list_configs() -> dict[str, ConfigEntry]:
    """All shipped configs, ``{"<family>/<name>": ConfigEntry}``, sorted by name."""
    root = configs_dir()
    if root is None:
        return {}
    found: dict[str, ConfigEntry] = {}
    for family in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for path in sorted(family.glob("*.yaml")):
            name = f"{family.name}/{path.stem}"
            found[name] = ConfigEntry(name=name, path=path, recipe=declared_recipe(path))
    return found


def _looks_like_path(arg: str, suffixes: tuple[str, ...]) -> bool:
    return arg.endswith(suffixes) or arg.startswith((".", "/", "~"))


def resolve_config(name_or_path: str | os.PathLike) -> Path:
    """Turn a config registry name or a file path into a file path.

    Args:
        name_or_path: ``"smollm2/135M_lora"`` (registry name, ``.yaml`` optional) or a path.

    Returns:
        The config file.

    Raises:
        ConfigError: Neither an existing file nor a registered name; suggests close names.
    """
    arg = os.fspath(name_or_path)
    expanded = os.path.expanduser(arg)
    if os.path.isfile(expanded):
        return Path(expanded)
    configs = list_configs()
    key = arg[: -len(".yaml")] if arg.endswith(".yaml") else arg
    if key in configs:
        return configs[key].path
    if _looks_like_path(arg, (".yaml", ".yml")):
        if os.path.isdir(expanded):
            raise ConfigError(f"config '{arg}' is a directory; pass a YAML file or a registry name.")
        raise ConfigError(
            f"config file '{arg}' does not exist."
            + did_you_mean(key, configs)
            + " Run `tune ls` for the shipped configs."
        )
    raise ConfigError(
        f"unknown config '{arg}': not a file and not a registered config name."
        + did_you_mean(key, configs)
        + " Run `tune ls` for the shipped configs."
    )


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """Turn a recipe name or a path to a ``.py`` script into a file path.

    Args:
        name_or_path: ``"lora_finetune"`` (registry name) or a path such as ``./my_recipe.py``.

    Returns:
        The recipe script.

    Raises:
        ConfigError: Neither an existing file nor a registered recipe; suggests close names.
    """
    arg = os.fspath(name_or_path)
    expanded = os.path.expanduser(arg)
    if os.path.isfile(expanded):
        return Path(expanded)
    recipes = list_recipes()
    key = arg[: -len(".py")] if arg.endswith(".py") and "/" not in arg else arg
    if key in recipes:
        return recipes[key]
    if _looks_like_path(arg, (".py",)):
        raise ConfigError(f"recipe file '{arg}' does not exist." + did_you_mean(key, recipes))
    raise ConfigError(
        f"unknown recipe '{arg}': not a file and not a registered recipe."
        + did_you_mean(key, recipes)
        + " Run `tune ls` for the shipped recipes."
    )
