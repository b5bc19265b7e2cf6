"""The settings layer: every key a recipe reads is declared once; anything else is an error.

Each recipe is run through `tune run` with a bad config: the error must come from the settings
check (named key, the file, exit status 2) before any model, tokenizer or dataset is loaded
(``checkpoint_dir`` points nowhere, so getting further would fail differently).
"""

import os

import pytest
import torch
import yaml

from tinytune.cli.main import main as tune_main
from tinytune.config import ConfigError, load_config
from tinytune.config.recipe_settings import (
    RECIPE_SETTINGS,
    DPOSettings,
    LoRAFinetuneDistributedSettings,
    LoRAFinetuneSettings,
    LoRASettings,
)
from tinytune.config.registry import list_configs

# One shipped config per recipe (the first registered).
CONFIG_OF = {}
for _name, _entry in sorted(list_configs().items()):
    CONFIG_OF.setdefault(_entry.recipe, _name)


def _write(tmp_path, recipe, cfg):
    path = tmp_path / f"{recipe}.yaml"
    with open(path, "w") as f:
        f.write(f"# recipe: {recipe}\n")
        yaml.safe_dump(cfg, f)
    return str(path)


def _shipped(recipe, tmp_path, **changes):
    """The recipe's shipped config as a plain dict, with a missing checkpoint and output in tmp_path."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config(CONFIG_OF[recipe]), resolve=True)
    cfg["checkpoint_dir"] = str(tmp_path / "no_such_model")
    cfg.pop("bundled_model", None)
    if "output_dir" in cfg:
        cfg["output_dir"] = str(tmp_path / "out")
    cfg.update(changes)
    return cfg


def _run_expect_config_error(recipe, path, capsys, *overrides):
    rc = tune_main(["run", recipe, "--config", path, *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "config error" in err
    return err


def test_every_recipe_has_settings_and_a_shipped_config():
    from tinytune.config.registry import list_recipes

    assert set(RECIPE_SETTINGS) == set(list_recipes())
    assert set(CONFIG_OF) == set(RECIPE_SETTINGS)


@pytest.mark.parametrize("name", sorted(list_configs()))
def test_every_shipped_config_passes_the_strict_check(name):
    entry = list_configs()[name]
    _, problems = RECIPE_SETTINGS[entry.recipe].read(load_config(str(entry.path)))
    assert not problems, [str(p) for p in problems]


@pytest.mark.parametrize("recipe", sorted(RECIPE_SETTINGS))
def test_unknown_key_in_the_yaml_is_an_error_naming_file_key_and_suggestion(recipe, tmp_path, capsys):
    path = _write(tmp_path, recipe, _shipped(recipe, tmp_path, seeed=3))
    err = _run_expect_config_error(recipe, path, capsys)
    assert "seeed: unknown key" in err and path in err and "Did you mean 'seed'" in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("recipe", sorted(RECIPE_SETTINGS))
def test_unknown_plus_key_override_is_an_error(recipe, tmp_path, capsys):
    path = _write(tmp_path, recipe, _shipped(recipe, tmp_path))
    err = _run_expect_config_error(recipe, path, capsys, "+group_by_length=true")
    assert "group_by_length: unknown key" in err


def test_unknown_nested_key_is_an_error(tmp_path, capsys):
    cfg = _shipped("lora_finetune_distributed", tmp_path)
    path = _write(tmp_path, "lora_finetune_distributed", cfg)
    err = _run_expect_config_error("lora_finetune_distributed", path, capsys, "+parallelism.context_parallel=2")
    assert "parallelism.context_parallel: unknown key" in err
    err = _run_expect_config_error("lora_finetune_distributed", path, capsys, "+model.lora_rnak=4")
    assert "model.lora_rnak: unknown key" in err and "'lora_rank'" in err


@pytest.mark.parametrize(
    "override, words",
    [
        ("max_steps=-3", "max_steps: -3 is out of range: must be >= 0"),
        ("batch_size=0", "batch_size: 0 is out of range: must be >= 1"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps: 0 is out of range: must be >= 1"),
        ("optimizer.lr=abc", "optimizer.lr: expected number, got 'abc'"),
        ("batch_size=2.5", "batch_size: expected int, got 2.5"),
        ("shuffle=yes please", "shuffle: expected bool"),
        ("log_every_n_steps=0", "log_every_n_steps: 0 is out of range"),
        ("model.lora_rank=0", "model.lora_rank: 0 is out of range"),
        ("dtype=fp17", "dtype: 'fp17' is not one of"),
    ],
)
@pytest.mark.parametrize("recipe", ["lora_finetune", "lora_finetune_distributed"])
def test_wrong_types_and_ranges_are_refused_before_the_model_loads(recipe, override, words, tmp_path, capsys):
    path = _write(tmp_path, recipe, _shipped(recipe, tmp_path))
    err = _run_expect_config_error(recipe, path, capsys, override)
    assert words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["+parallelism.pipeline_schedule=zigzag"], "parallelism.pipeline_schedule: 'zigzag' is not one of"),
        (["+parallelism.pipeline_parallel=0"], "parallelism.pipeline_parallel: 0 is out of range: must be >= 1"),
        (
            ["+parallelism.pipeline_parallel=2", "+parallelism.microbatches=0"],
            "parallelism.microbatches: 0 is out of range",
        ),
        (
            ["+parallelism.pipeline_parallel=2", "+parallelism.layers_per_stage=two"],
            "parallelism.layers_per_stage: expected",
        ),
        (["+parallelism.microbatches=4"], "only apply with parallelism.pipeline_parallel > 1"),
        (["+parallelism.pipeline_schedule=gpipe"], "only apply with parallelism.pipeline_parallel > 1"),
    ],
)
@pytest.mark.parametrize("recipe", ["full_finetune_distributed", "lora_finetune_distributed"])
def test_pipeline_keys_are_checked_by_the_settings_layer(recipe, overrides, words, tmp_path, capsys):
    path = _write(tmp_path, recipe, _shipped(recipe, tmp_path))
    err = _run_expect_config_error(recipe, path, capsys, *overrides)
    assert words in err
    assert not (tmp_path / "out").exists()


def test_tune_validate_runs_the_same_check(tmp_path, capsys):
    path = _write(tmp_path, "lora_finetune", _shipped("lora_finetune", tmp_path))
    assert tune_main(["validate", path]) == 0
    rc = tune_main(
        [
            "validate",
            path,
            "max_steps=-3",
            "batch_size=0",
            "gradient_accumulation_steps=0",
            "optimizer.lr=abc",
            "+group_by_length=true",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "optimizer.lr", "group_by_length"):
        assert f"  {key}: " in err, key


def test_sample_generation_prompts_as_a_string_is_refused(tmp_path, capsys):
    """A string is refused (not split into characters, not silently wrapped): write a list."""
    path = _write(tmp_path, "lora_finetune", _shipped("lora_finetune", tmp_path))
    err = _run_expect_config_error("lora_finetune", path, capsys, "+sample_generation.prompts=Hi there")
    assert "sample_generation.prompts: expected list" in err and "write a list" in err
    s = LoRAFinetuneSettings.from_config(load_config(path, ["+sample_generation.prompts=[Hi there]"]))
    assert s.sample_generation.prompts == ["Hi there"]


def test_null_means_default_and_values_are_typed():
    s = LoRAFinetuneSettings.from_config(
        {
            "output_dir": "x",
            "dataset": {"_component_": "tinytune.datasets.chat_dataset"},
            "batch_size": None,
            "clip_grad_norm": 1,
        }
    )
    assert s.data.batch_size == 4 and s.loop.clip_grad_norm == 1.0 and isinstance(s.loop.clip_grad_norm, float)
    with pytest.raises(ConfigError, match="output_dir: required"):
        LoRAFinetuneSettings.from_config({"dataset": {"_component_": "tinytune.datasets.chat_dataset"}})


def test_component_fields_are_checked_against_the_signature():
    _, problems = LoRAFinetuneSettings.read(
        {
            "output_dir": "x",
            "dataset": {"_component_": "tinytune.datasets.chat_dataset", "max_seq_lenn": 3},
            "model": {"_component_": "tinytune.models.lora_builders.lora_llama3_tiny", "lora_rank": "big"},
        }
    )
    text = "\n".join(str(p) for p in problems)
    assert "max_seq_lenn" in text and "max_seq_len" in text
    assert "model.lora_rank: expected int" in text


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing: not used by loss=ipo"),
        ({"loss": "hinge", "label_smoothing": 0.1}, "label_smoothing: not used by loss=hinge"),
        ({"loss": "robust", "label_smoothing": 0.5}, "label_smoothing: must be < 0.5 for loss=robust"),
        ({"loss": "sigmoid", "gamma": 0.5}, "gamma: only loss=simpo uses it"),
        ({"loss": "orpo", "gamma": 0.5}, "gamma: only loss=simpo uses it"),
    ],
)
def test_dpo_keys_the_chosen_loss_does_not_read_are_refused(keys, message):
    _, problems = DPOSettings.read(
        {"output_dir": "x", "dataset": {"_component_": "tinytune.datasets.chat_dataset"}, **keys}
    )
    assert message in "\n".join(str(p) for p in problems)


@pytest.mark.parametrize(
    "keys",
    [
        {"loss": "sigmoid", "label_smoothing": 0.2},
        {"loss": "robust", "label_smoothing": 0.4},
        {"loss": "simpo", "gamma": 0.5, "label_smoothing": 0.1},
        {"loss": "ipo"},
    ],
)
def test_dpo_keys_the_chosen_loss_reads_are_accepted(keys):
    _, problems = DPOSettings.read(
        {"output_dir": "x", "dataset": {"_component_": "tinytune.datasets.chat_dataset"}, **keys}
    )
    assert not problems, problems


# ---- one LoRA definition ---------------------------------------------------------------------------
def _adapted(model):
    from tinytune.modules.peft import lora_modules

    return sorted(name for name, _ in lora_modules(model))


def _tiny_with(factory):
    from tinytune.models.llama3 import llama3_tiny

    return llama3_tiny(linear_factory=factory)


@pytest.mark.parametrize(
    "block",
    [
        {"lora_rank": 16},  # the defaults decide: they used to differ between the recipes
        {"lora_attn_modules": ["q_proj", "k_proj"], "apply_lora_to_mlp": False, "lora_rank": 4},
        {"lora_attn_modules": ["v"], "apply_lora_to_mlp": True, "apply_lora_to_output": True, "lora_alpha": 8},
    ],
)
def test_both_lora_recipes_and_both_model_forms_adapt_the_same_modules(block):
    from tinytune.config import instantiate
    from tinytune.models.lora_builders import lora_factory
    from tinytune.training.setup import model_lora

    base = {"output_dir": "x", "dataset": {"_component_": "tinytune.datasets.chat_dataset"}}
    single = LoRAFinetuneSettings.from_config({**base, "model": dict(block)})
    multi = LoRAFinetuneDistributedSettings.from_config({**base, "model": dict(block)})
    comp = LoRAFinetuneSettings.from_config(
        {**base, "model": {"_component_": "tinytune.models.lora_builders.lora_llama3_tiny", **block}}
    )
    lora_single, lora_multi, lora_comp = model_lora(single.model), model_lora(multi.model), model_lora(comp.model)
    assert (
        lora_single
        == lora_multi
        == lora_comp
        == LoRASettings(**{k: (list(v) if isinstance(v, list) else v) for k, v in block.items()})
    )
    torch.manual_seed(0)
    names_single = _adapted(_tiny_with(lora_factory(lora_single)))
    names_multi = _adapted(_tiny_with(lora_factory(lora_multi)))
    names_comp = _adapted(instantiate(comp.model))
    assert names_single == names_multi == names_comp
    assert names_single  # something is adapted
    mlp = any(n.endswith("mlp.gate_proj") for n in names_single)
    assert mlp == block.get("apply_lora_to_mlp", True)
    # the PEFT export reads the same object
    assert lora_single.peft_config() == {
        "lora_rank": lora_single.lora_rank,
        "lora_alpha": lora_single.lora_alpha,
        "lora_dropout": lora_single.lora_dropout,
        "use_rslora": lora_single.use_rslora,
        "use_dora": lora_single.use_dora,
        "init": lora_single.lora_init,
    }


def test_lora_builder_signature_is_the_settings_declaration():
    import dataclasses
    import inspect

    from tinytune.models import lora_builders

    sig = inspect.signature(lora_builders.lora_smollm2_135m)
    fields = {f.name: f for f in dataclasses.fields(LoRASettings)}
    assert list(sig.parameters) == list(fields)
    assert sig.parameters["apply_lora_to_mlp"].default is LoRASettings().apply_lora_to_mlp
    assert inspect.signature(lora_builders.qlora_smollm2_135m).parameters["quantize_base"].default is True
    with pytest.raises(ConfigError, match="lora_rnak"):
        lora_builders.lora_llama3_tiny(lora_rnak=4)


# ---- dataset node values (issue 14 options), typed before any build ---------------------------------
def _sft_node(tmp_path, **options):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    return {"_component_": "tinytune.datasets.sft_dataset", "source": str(data), **options}


@pytest.mark.parametrize(
    "options, words",
    [
        ({"truncation": "middle"}, "dataset.truncation: 'middle' is not one of ['balanced', 'prompt_first'"),
        ({"truncation": 3}, "dataset.truncation: expected str | null, got 3"),
        ({"enable_thinking": "false"}, "dataset.enable_thinking: expected bool | null, got 'false'"),
        ({"packing_strategy": "best"}, "dataset.packing_strategy: 'best' is not one of ['ffd', 'greedy']"),
        ({"tags": {"role_tag": "role", "speaker_tag": "x"}}, "dataset.tags: unknown tag name(s) ['speaker_tag']"),
        ({"max_seq_len": 0}, "dataset.max_seq_len: 0 is out of range: must be >= 1"),
    ],
)
def test_dataset_option_values_are_refused_before_the_model_loads(options, words, tmp_path, capsys):
    cfg = _shipped("lora_finetune", tmp_path, dataset=_sft_node(tmp_path, **options))
    path = _write(tmp_path, "lora_finetune", cfg)
    err = _run_expect_config_error("lora_finetune", path, capsys)
    assert words in err
    assert not (tmp_path / "out").exists()


def test_dataset_option_values_checked_in_every_node_of_a_mix_and_the_validation_node(tmp_path):
    good, bad = _sft_node(tmp_path, truncation="balanced"), _sft_node(tmp_path, truncation="left")
    cfg = _shipped(
        "lora_finetune",
        tmp_path,
        dataset=[{**good, "weight": 1}, {**bad, "weight": 1}],
        validation={"dataset": _sft_node(tmp_path, packed="yes")},
    )
    _, problems = LoRAFinetuneSettings.read(cfg)
    assert sorted(p.key for p in problems) == ["dataset[1].truncation", "validation.dataset.packed"]
    cfg = _shipped(
        "lora_finetune",
        tmp_path,
        dataset=_sft_node(
            tmp_path, truncation="drop", enable_thinking=None, tags={"role_tag": "role", "content_tag": "text"}
        ),
    )
    assert LoRAFinetuneSettings.read(cfg)[1] == []


def test_dataset_option_choices_are_the_datasets_own():
    from tinytune.config import recipe_settings as rs
    from tinytune.datasets.encoding import TRUNCATION_POLICIES
    from tinytune.datasets.packing import pack_bins
    from tinytune.datasets.styles import DEFAULT_TAGS

    assert rs.TRUNCATION_POLICIES == TRUNCATION_POLICIES
    assert rs.SHAREGPT_TAGS == tuple(DEFAULT_TAGS)
    for strategy in rs.PACKING_STRATEGIES:
        assert pack_bins([3, 2, 1], 4, strategy)
    with pytest.raises(ValueError):
        pack_bins([3, 2, 1], 4, "best")


# ---- the README key table ---------------------------------------------------------------------------
def test_readme_key_table_matches_the_declarations():
    from tinytune.config.recipe_settings import settings_table

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    assert start in readme and end in readme
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == settings_table().strip(), "regenerate: python -m tinytune.config.recipe_settings"


def test_declared_choices_equal_the_runtime_tables():
    """The settings layer imports nothing above config/, so it repeats a few name tables: they must agree."""
    from tinytune.checkpoint.gguf_writer import GGUF_TYPES
    from tinytune.config import recipe_settings as rs
    from tinytune.kernels.cpu_gemm import CPU_GEMM_CHOICES
    from tinytune.modules.peft.lora import LORA_INITS
    from tinytune.training.optim import OPTIMIZERS, PAGED_ALIASES
    from tinytune.training.preference_losses import PREFERENCE_LOSSES

    assert set(rs.GGUF_TYPES) == set(GGUF_TYPES)
    assert tuple(rs.LORA_INITS) == tuple(LORA_INITS)
    assert tuple(rs.PREFERENCE_LOSSES) == tuple(PREFERENCE_LOSSES)
    assert set(rs.OPTIMIZER_NAMES) == set(OPTIMIZERS) | set(PAGED_ALIASES)
    assert rs.CPU_GEMM_CHOICES == CPU_GEMM_CHOICES


def test_every_registered_recipe_has_settings():
    from tinytune.config import registry
    from tinytune.config.recipe_settings import RECIPE_SETTINGS

    assert set(registry.list_recipes()) == set(RECIPE_SETTINGS)
