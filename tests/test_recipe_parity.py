"""The distributed recipes behave like the single-device ones for the same keys.

One test per behaviour that used to differ (progress bar, final-step checkpoint, ``save_merged``,
resume checks, fp16 refused before any work). The distributed recipes run in this process as a one-process gloo
group (what ``python recipes/<name>.py`` does without torchrun); ``test_distributed_recipes.py``
covers real multi-process runs.
"""

import os

import pytest
import torch.distributed as dist
from _recipe_fixtures import make_tiny_checkpoint, write_chat_jsonl
from omegaconf import OmegaConf

from tinytune.config import ConfigError

PAIRS = {
    "full": ("recipes.full_finetune", "recipes.full_finetune_distributed"),
    "lora": ("recipes.lora_finetune", "recipes.lora_finetune_distributed"),
}
LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(str(root / "tiny_model")),
        "chat": write_chat_jsonl(str(root / "chat.jsonl")),
    }


@pytest.fixture(autouse=True)
def _env(assets, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(assets["root"] / "home"))


def _cfg(assets, out, kind, distributed, **over):
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "dataset": {
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "shuffle": False,
        "max_steps": 2,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "metric_loggers": ["jsonl"],
    }
    if kind == "lora":
        cfg["model"] = dict(LORA)
    cfg.update(over)
    return OmegaConf.create(cfg)


def _main(kind, distributed):
    import importlib

    return importlib.import_module(PAIRS[kind][int(distributed)]).recipe_main


def _run(assets, tmp_path, kind, distributed, **over):
    out = tmp_path / ("dist" if distributed else "single")
    summary = _main(kind, distributed)(_cfg(assets, out, kind, distributed, **over))
    assert not dist.is_initialized()
    return out, summary


BOTH = pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])


@BOTH
def test_progress_bar(assets, tmp_path, capsys, distributed):
    _run(assets, tmp_path, "full", distributed)
    err = capsys.readouterr().err
    name = "full_finetune_distributed" if distributed else "full_finetune"
    assert f"{name}: 100%" in err and "2/2" in err


@BOTH
def test_final_step_checkpoint(assets, tmp_path, distributed):
    out, _ = _run(assets, tmp_path, "full", distributed, checkpoint_every_n_steps=2)
    step_dir = out / ("dcp" if distributed else "checkpoints") / "step_2"
    assert (step_dir / "COMPLETE").exists()


@BOTH
def test_save_merged_false_writes_only_the_adapter(assets, tmp_path, distributed):
    out, summary = _run(assets, tmp_path, "lora", distributed, save_merged=False)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "hf_model").exists() and "hf_dir" not in summary


@BOTH
@pytest.mark.parametrize(
    "change, words",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1"),
        ({"batch_size": 1}, "batch_size=2"),
    ],
)
def test_resume_refuses_other_batching(assets, tmp_path, distributed, change, words):
    _run(assets, tmp_path, "lora", distributed, stop_after_steps=1, resume_from_checkpoint="auto")
    with pytest.raises(ValueError, match=words):  # ConfigError is a ValueError
        _run(assets, tmp_path, "lora", distributed, resume_from_checkpoint="auto", **change)
    if dist.is_initialized():  # the failed run's group (a raised error skips nothing else)
        dist.destroy_process_group()


@BOTH
def test_fp16_is_refused_before_any_work(assets, tmp_path, distributed):
    # single-device: loss scaling exists but runs on CUDA only; distributed: no loss scaling (FSDP2)
    words = "needs loss scaling, which only the single-device" if distributed else "trains with dynamic loss scaling"
    with pytest.raises(ConfigError, match=f"dtype: fp16 {words}.* use bf16 or fp32"):
        _run(assets, tmp_path, "full", distributed, dtype="fp16")
    assert not os.path.exists(tmp_path / ("dist" if distributed else "single"))
