"""Early stopping survives a resume: the best loss and step, the patience count and the kept best
weights go into training checkpoints, so a run killed after its best step and resumed stops at the
step and exports the bytes an uninterrupted run does. Changed early-stopping settings are refused."""

import os

import pytest
from _recipe_fixtures import tiny_recipe_assets, tiny_sft_config
from omegaconf import OmegaConf

from recipes.lora_finetune import recipe_main as lora_main
from tinytune.checkpoint import TrainingCheckpointer
from tinytune.errors import ResumeError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_recipe_assets(tmp_path_factory.mktemp("es_resume"))


@pytest.fixture(autouse=True)
def _env(assets, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(assets["root"] / "home"))


def _cfg(assets, out, **over):
    # lr 0.2 on the tiny model: validation losses 7.49 6.48 6.58 6.00 6.41 6.13: best at step 4, and
    # patience 2 stops at step 6; a run resumed at step 5 that forgot its state would take step 6's
    # 6.13 as a new best and run on
    return OmegaConf.create(
        tiny_sft_config(
            assets,
            out,
            **{
                "model": {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0},
                "batch_size": 2,
                "shuffle": True,
                "max_steps": 12,
                "optimizer": {"name": "adamw", "lr": 0.2},
                "validation": {"split_size": 4, "every_n_steps": 1},
                "early_stopping": {"patience": 2},
                "save_best": True,
                "checkpoint_every_n_steps": 1,
                "metric_loggers": ["jsonl"],
                **over,
            },
        )
    )


def _bytes(out):
    with open(os.path.join(out, "hf_model", "model.safetensors"), "rb") as f:
        return f.read()


def test_resumed_run_stops_and_exports_like_an_uninterrupted_one(assets, tmp_path):
    straight = lora_main(_cfg(assets, tmp_path / "straight"))
    assert straight["stopped_early"] and straight["step"] == 6 and straight["best_step"] == 4
    # killed after the best step, with one validation without improvement counted
    first = lora_main(_cfg(assets, tmp_path / "resumed", stop_after_steps=5))
    assert first["step"] == 5
    resumed = lora_main(_cfg(assets, tmp_path / "resumed", resume_from_checkpoint="auto"))
    for key in ("step", "best_step", "best_val_loss", "stopped_early", "val_loss"):
        assert resumed[key] == straight[key], key
    assert _bytes(tmp_path / "resumed") == _bytes(tmp_path / "straight")
    state = TrainingCheckpointer(str(tmp_path / "resumed" / "checkpoints")).load_latest()  # step 6 stopped: none
    assert state["step"] == 5
    assert state["early_stopping"]["best_step"] == 4 and state["early_stopping"]["bad"] == 1


@pytest.mark.parametrize(
    "change, words",
    [
        ({"early_stopping": {"patience": 3}}, "patience: 2 -> 3"),
        ({"early_stopping": {"patience": 2, "min_delta": 0.5}}, "min_delta: 0.0 -> 0.5"),
        ({"save_best": False}, "save_best: True -> False"),
        ({"early_stopping": {"patience": None}, "save_best": False}, "patience: 2 -> None"),
    ],
)
def test_resume_refuses_changed_early_stopping_settings(assets, tmp_path, change, words):
    lora_main(_cfg(assets, tmp_path / "run", stop_after_steps=2, max_steps=3))
    with pytest.raises(ResumeError, match=f"other early stopping settings \\({words}"):
        lora_main(_cfg(assets, tmp_path / "run", resume_from_checkpoint="auto", max_steps=3, **change))


def test_resume_refuses_early_stopping_added_to_a_run_without_it(assets, tmp_path):
    plain = {"early_stopping": {"patience": None}, "save_best": False, "max_steps": 3}
    lora_main(_cfg(assets, tmp_path / "run", stop_after_steps=2, **plain))
    with pytest.raises(ResumeError, match="patience: None -> 2"):
        lora_main(_cfg(assets, tmp_path / "run", resume_from_checkpoint="auto", max_steps=3))
