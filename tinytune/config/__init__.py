"""tinytune configs: YAML + OmegaConf, command-line overrides, ``instantiate`` and ``parse``.

Typical recipe::

    from tinytune import config

    def recipe_main(cfg):
        model = config.instantiate(cfg.model)
        opt = config.instantiate(cfg.optimizer, model.parameters())

    if __name__ == "__main__":
        config.parse(recipe_main)()
"""

from tinytune.config._errors import ConfigError, close_matches
from tinytune.config._instantiate import instantiate, locate
from tinytune.config._loader import (
    apply_overrides,
    config_source,
    key_paths,
    load_config,
    load_yaml,
    node_path,
    parse_value,
    resolve_interpolations,
)
from tinytune.config._parse import parse
from tinytune.config._validate import Problem, validate_config

__all__ = [
    "ConfigError",
    "Problem",
    "apply_overrides",
    "close_matches",
    "config_source",
    "instantiate",
    "key_paths",
    "load_config",
    "load_yaml",
    "locate",
    "node_path",
    "parse",
    "parse_value",
    "resolve_interpolations",
    "validate_config",
]
