"""Config system: YAML loading, overrides, interpolation, instantiate, parse, validation."""

import functools
import sys
import textwrap

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tinytune.config import (
    ConfigError,
    apply_overrides,
    config_source,
    instantiate,
    load_config,
    parse,
    parse_value,
    registry,
    validate_config,
)

BASE = """\
# recipe: tiny_recipe
output_dir: /tmp/out
log_dir: ${output_dir}/logs
seed: 3
batch_size: 2
layers: [1, 2, 3]
model:
  _component_: torch.nn.Linear
  in_features: 4
  out_features: 2
optimizer:
  _component_: torch.optim.SGD
  lr: 0.1
dataset:
  source: text
  options: {a: 1}
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------- loading


def test_load_resolves_interpolation_and_remembers_file(cfg_file):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, DictConfig)
    assert cfg.log_dir == "/tmp/out/logs"
    assert config_source(cfg) == str(cfg_file)
    assert config_source(cfg.model) == str(cfg_file)  # sub-nodes know their file too


def test_interpolation_follows_overrides(cfg_file):
    cfg = load_config(cfg_file, ["output_dir=/data/run1"])
    assert cfg.log_dir == "/data/run1/logs"


def test_bad_interpolation_names_key_file_and_suggests(tmp_path):
    path = write(tmp_path, "output_dir: /x\nlog_dir: ${outptu_dir}/logs\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "log_dir" in msg and str(path) in msg and "'output_dir'" in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level of a config must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown config 'nofamily/noname'"):
        load_config("nofamily/noname")


def test_load_by_registry_name(tmp_path, monkeypatch):
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "small_lora.yaml").write_text(BASE)
    monkeypatch.setattr(registry, "configs_dir", lambda: tmp_path)
    assert load_config("fam/small_lora").seed == 3
    assert load_config("fam/small_lora.yaml").seed == 3
    with pytest.raises(ConfigError, match="Did you mean 'fam/small_lora'"):
        load_config("fam/smal_lora")


# ---------------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 1e-4),
        ("3", 3),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ("{a: 1}", {"a": 1}),
        ("hello", "hello"),
        ("", ""),
        ("${x}/y", "${x}/y"),
        ("2024-01-01", "2024-01-01"),
    ],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_nested_and_list_overrides(cfg_file):
    cfg = load_config(
        cfg_file,
        ["optimizer.lr=1e-4", "dataset.options.a=5", "layers=[7, 8]", "layers.0=9", "layers[1]=10", "+layers.2=11"],
    )
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.dataset.options.a == 5
    assert list(cfg.layers) == [9, 10, 11]


def test_delete_and_add(cfg_file):
    cfg = load_config(
        cfg_file, ["~seed", "~dataset.options", "+new.deep.key=[1, 2]", "~layers.0", "++batch_size=4", "++fresh=x"]
    )
    assert "seed" not in cfg and "options" not in cfg.dataset
    assert list(cfg.new.deep.key) == [1, 2]
    assert list(cfg.layers) == [2, 3]
    assert cfg.batch_size == 4 and cfg.fresh == "x"


def test_add_existing_key_is_an_error(cfg_file):
    with pytest.raises(ConfigError, match=r"already exists.*\+\+seed"):
        load_config(cfg_file, ["+seed=1"])


def test_misspelt_override_suggests_the_key(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["optimzer.lr=1"])
    msg = str(e.value)
    assert "optimzer.lr" in msg and "'optimizer.lr'" in msg and str(cfg_file) in msg
    assert "+optimzer.lr=1" in msg  # tells how to add a new key on purpose


def test_missing_prefix_suggests_full_key(cfg_file):
    with pytest.raises(ConfigError, match=r"Did you mean 'optimizer\.lr'"):
        load_config(cfg_file, ["lr=1"])


def test_delete_missing_key_is_an_error(cfg_file):
    with pytest.raises(ConfigError, match=r"'sed' does not exist.*'seed'"):
        load_config(cfg_file, ["~sed"])


def test_component_shorthand(cfg_file):
    cfg = load_config(cfg_file, ["optimizer=torch.optim.AdamW"])
    assert cfg.optimizer._component_ == "torch.optim.AdamW" and cfg.optimizer.lr == 0.1


def test_scalar_over_plain_mapping_is_an_error(cfg_file):
    with pytest.raises(ConfigError, match="'dataset' is a mapping"):
        load_config(cfg_file, ["dataset=text"])
    cfg = load_config(cfg_file, ["dataset={source: json}", "model=null"])  # whole replacement is fine
    assert OmegaConf.to_container(cfg.dataset) == {"source": "json"} and cfg.model is None


@pytest.mark.parametrize(
    "token, pattern",
    [
        ("seed", "has no '='"),
        ("~seed=1", "takes no value"),
        ("a..b=1", "not a valid key path"),
        ("layers.9=1", "does not exist"),
        ("+layers.9=1", "out of range"),
        ("seed.x=1", "is a value, not a mapping"),
    ],
)
def test_malformed_overrides(cfg_file, token, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(cfg_file, [token])


def test_overrides_on_missing_value_marker(tmp_path):
    cfg = OmegaConf.create({"checkpoint_dir": "???"})
    apply_overrides(cfg, ["checkpoint_dir=/ckpt"])
    assert cfg.checkpoint_dir == "/ckpt"


# ---------------------------------------------------------------------------------------------- instantiate


class Holder:
    """Test component taking a nested object, a positional arg, a list and a dict."""

    def __init__(self, first, inner=None, items=(), options=None, scale=1.0):
        self.first, self.inner, self.items, self.options, self.scale = first, inner, items, options, scale


def make_pair(a, b=2):
    return (a, b)


def test_instantiate_recursive_positional_and_kwargs():
    cfg = OmegaConf.create(
        {
            "holder": {
                "_component_": "tests.test_config.Holder",
                "inner": {"_component_": "torch.nn.Linear", "in_features": 3, "out_features": 5},
                "items": [{"_component_": "tests.test_config.make_pair", "a": 1}, 7],
                "options": {"x": {"_component_": "tests.test_config.make_pair", "a": 0, "b": 9}, "y": [1]},
                "scale": 2.0,
            }
        }
    )
    h = instantiate(cfg.holder, "pos", scale=3.0)
    assert h.first == "pos" and h.scale == 3.0
    assert isinstance(h.inner, torch.nn.Linear) and h.inner.out_features == 5
    assert h.items == [(1, 2), 7]
    assert h.options == {"x": (0, 9), "y": [1]} and type(h.options) is dict


def test_kwargs_replace_nested_node_without_building_it():
    cfg = OmegaConf.create(
        {"_component_": "tests.test_config.Holder", "first": 1, "inner": {"_component_": "does.not.exist"}}
    )
    assert instantiate(cfg, inner="given").inner == "given"


def test_instantiate_optimizer_with_params():
    model = torch.nn.Linear(2, 2)
    opt = instantiate({"_component_": "torch.optim.SGD", "lr": 0.5}, model.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5


def test_partial():
    fn = instantiate({"_component_": "tests.test_config.make_pair", "_partial_": True, "b": 5})
    assert isinstance(fn, functools.partial) and fn(1) == (1, 5)


def test_instantiate_none_and_non_mapping():
    assert instantiate(None) is None
    with pytest.raises(ConfigError, match="needs a config mapping"):
        instantiate(OmegaConf.create([1, 2]))
    with pytest.raises(ConfigError, match=r"'model'.*without '_component_'"):
        instantiate(OmegaConf.create({"model": {"dim": 3}}).model)


def test_misspelt_component_names_key_file_and_close_matches(tmp_path):
    path = write(tmp_path, "model:\n  _component_: torch.nn.Lineer\n  in_features: 2\n  out_features: 2\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:
        instantiate(cfg.model)
    msg = str(e.value)
    assert "model._component_" in msg and str(path) in msg and "'torch.nn.Linear'" in msg


def test_misspelt_module_suggests_submodule():
    with pytest.raises(ConfigError, match=r"'tinytune.modules'"):
        instantiate({"_component_": "tinytune.modlues.Thing"})
    with pytest.raises(ConfigError, match="no module named 'nosuchtoplevel_xyz'"):
        instantiate({"_component_": "nosuchtoplevel_xyz.Thing"})


def test_failing_dependency_import_is_reported_as_such(tmp_path, monkeypatch):
    (tmp_path / "tt_broken_mod.py").write_text("import tt_missing_dependency_abc\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing module 'tt_broken_mod'.*tt_missing_dependency_abc"):
        instantiate({"_component_": "tt_broken_mod.X"})
    sys.modules.pop("tt_broken_mod", None)


def test_misspelt_argument_suggests_parameter(tmp_path):
    path = write(tmp_path, "model:\n  _component_: torch.nn.Linear\n  in_featurs: 2\n  out_features: 2\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:
        instantiate(cfg.model)
    msg = str(e.value)
    assert "model.in_featurs" in msg and "'in_features'" in msg and str(path) in msg


def test_mandatory_missing_value_is_named():
    cfg = OmegaConf.create({"ckpt": {"_component_": "tests.test_config.make_pair", "a": "???"}})
    with pytest.raises(ConfigError, match=r"'ckpt.a'.*has no value.*ckpt.a=VALUE"):
        instantiate(cfg.ckpt)


def test_missing_required_argument():
    with pytest.raises(ConfigError, match="missing a required argument: 'a'"):
        instantiate({"_component_": "tests.test_config.make_pair"})


def test_error_inside_component_gets_a_note():
    cfg = OmegaConf.create({"m": {"_component_": "torch.nn.Linear", "in_features": -1, "out_features": 2}})
    with pytest.raises(RuntimeError) as e:
        instantiate(cfg.m)
    assert any("'m'" in n for n in getattr(e.value, "__notes__", []))


# ---------------------------------------------------------------------------------------------- validate


def test_validate_config_reports_every_problem(tmp_path):
    path = write(
        tmp_path,
        """\
        model:
          _component_: torch.nn.Linear
          in_featurs: 2
        optimizer:
          _component_: torch.optim.AdamWW
        parts:
          - _component_: tests.test_config.make_pair
            a: 1
          - _component_: tests.test_config.make_pair
            c: 1
        """,
    )
    problems, count = validate_config(load_config(path))
    keys = sorted(p.key for p in problems)
    assert count == 4
    assert keys == ["model", "optimizer", "parts[1]"]
    assert "'in_features'" in next(p.message for p in problems if p.key == "model")
    assert "AdamW" in next(p.message for p in problems if p.key == "optimizer")


def test_validate_config_ok(cfg_file):
    problems, count = validate_config(load_config(cfg_file))
    assert problems == [] and count == 2


# ---------------------------------------------------------------------------------------------- parse


def test_parse_builds_config_and_calls_recipe(cfg_file):
    seen = {}

    def recipe_main(cfg):
        seen["cfg"] = cfg
        return "done"

    main = parse(recipe_main)
    assert main(["optimizer.lr=0.5", "--config", str(cfg_file), "+extra=1"]) == "done"
    cfg = seen["cfg"]
    assert cfg.optimizer.lr == 0.5 and cfg.extra == 1 and cfg.log_dir == "/tmp/out/logs"


def test_parse_reads_sys_argv(cfg_file, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--config", str(cfg_file), "seed=11"])
    assert parse(lambda cfg: cfg.seed)() == 11


def test_parse_reports_config_errors_without_traceback(cfg_file, capsys, monkeypatch):
    monkeypatch.delenv("TINYTUNE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        parse(lambda cfg: None)(["--config", str(cfg_file), "optimzer.lr=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "optimizer.lr" in err and "Traceback" not in err

    def bad_recipe(cfg):
        instantiate(OmegaConf.create({"_component_": "torch.nn.Lineer"}))

    with pytest.raises(SystemExit):
        parse(bad_recipe)(["--config", str(cfg_file)])
    assert "torch.nn.Linear" in capsys.readouterr().err


def test_parse_requires_config(capsys):
    with pytest.raises(SystemExit):
        parse(lambda cfg: None)([])
    assert "--config" in capsys.readouterr().err
