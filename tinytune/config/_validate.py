"""Static checks of a config: every ``_component_`` imports and its fields fit its signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tinytune.config._errors import ConfigError
from tinytune.config._instantiate import SPECIAL_KEYS, check_arguments, locate
from tinytune.config._loader import format_path


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`validate_config`.

    Attributes:
        key: Key path of the offending node (``"<root>"`` for file-level problems).
        message: What is wrong and what to do.
    """

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def validate_config(cfg: DictConfig) -> tuple[list[Problem], int]:
    """Check every ``_component_`` node of a (resolved) config without calling anything.

    Each component must import, and the node's fields must bind to its signature with
    ``inspect.Signature.bind_partial`` (positional arguments the recipe passes at run time,
    such as model parameters, may be missing).

    Args:
        cfg: A loaded config.

    Returns:
        ``(problems, n_components)``: every problem found, and how many components were checked.
    """
    problems: list[Problem] = []
    count = 0
    data = OmegaConf.to_container(cfg, resolve=False)

    def walk(obj: Any, path: list[Any]) -> None:
        nonlocal count
        if isinstance(obj, dict):
            if "_component_" in obj:
                count += 1
                key = format_path(path) or "<root>"
                try:
                    fn = locate(obj["_component_"], format_path(path), None)
                    # items of a dataset mix (`dataset: [...]`) also carry weight/epochs (training.setup reads them)
                    mix_item = len(path) == 2 and path[0] == "dataset" and isinstance(path[1], int)
                    skip = SPECIAL_KEYS + (("weight", "epochs") if mix_item else ())
                    kwargs = {str(k): v for k, v in obj.items() if k not in skip}
                    check_arguments(
                        fn, (), kwargs, partial=True, path=format_path(path), source=None, dotted=obj["_component_"]
                    )
                except ConfigError as e:
                    problems.append(Problem(key, _strip_key(str(e))))
            for k, v in obj.items():
                walk(v, path + [k])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, path + [i])

    walk(data, [])
    return problems, count


def _strip_key(message: str) -> str:
    """Drop the leading ``'key': `` that ConfigError messages start with (Problem carries the key)."""
    if message.startswith("'") and "': " in message:
        return message.split("': ", 1)[1]
    return message
