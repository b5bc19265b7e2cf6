"""The single-device SFT recipes in mixed precision (``dtype: bf16`` + ``mixed_precision: true``), end to end
on a tiny model: losses track an fp32 run; the training-state checkpoint holds fp32 trainable
weights and fp32 AdamW state. Unit tests of the pieces: ``test_mixed_precision.py``."""

import json
import os

import pytest
import torch
import yaml
from _recipe_fixtures import make_tiny_checkpoint, write_chat_jsonl

from tinytune.cli.main import main as tune_main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("mixed_recipes") / "tiny"))


def _cfg(ckpt, chat, out, **over):
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": ckpt,
        "device": "cpu",
        "dtype": "bf16",
        "mixed_precision": True,
        "seed": 0,
        "template": "chatml",
        "dataset": {
            "_component_": "tinytune.datasets.chat_dataset",
            "source": chat,
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        "batch_size": 4,
        "shuffle": False,
        "max_steps": 2,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "metric_loggers": ["jsonl"],
        "checkpoint_every_n_steps": 2,
        "resume_from_checkpoint": None,
        "sample_generation": {"prompts": ["What is ice?"], "max_new_tokens": 4},
    }
    cfg.update(over)
    return cfg


def _run(recipe, cfg, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    with open(path, "w") as f:
        f.write(f"# recipe: {recipe}\n")
        yaml.safe_dump(cfg, f)
    assert tune_main(["run", recipe, "--config", str(path)]) in (0, None)
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_recipes_train_in_mixed_precision(ckpt, tmp_path, monkeypatch, recipe):
    monkeypatch.setenv("TINYTUNE_HOME", str(tmp_path / "home"))
    chat = write_chat_jsonl(str(tmp_path / "chat.jsonl"))
    over = {"model": {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4}} if recipe == "lora_finetune" else {}
    mixed = _run(recipe, _cfg(ckpt, chat, tmp_path / "mixed", **over), tmp_path, "mixed")
    fp32 = _run(
        recipe, _cfg(ckpt, chat, tmp_path / "fp32", dtype="fp32", mixed_precision=False, **over), tmp_path, "fp32"
    )
    assert len(mixed) == len(fp32) == 2
    assert mixed == pytest.approx(fp32, rel=2e-2)  # bf16 compute, same updates
    # the training-state checkpoint holds fp32 trainable weights and fp32 AdamW state
    step_dir = [d for d in (tmp_path / "mixed").rglob("step_2") if d.is_dir()]
    assert step_dir, list((tmp_path / "mixed").iterdir())
    tensors = [f for f in step_dir[0].rglob("*") if f.is_file() and f.suffix in (".pt", ".safetensors", ".bin")]
    found = {}
    for f in tensors:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            found.update({f"{f.name}:{k}": v.dtype for k, v in load_file(str(f)).items()})
        else:
            state = torch.load(f, weights_only=True, map_location="cpu")
            stack = [(f.name, state)]
            while stack:
                key, obj = stack.pop()
                if isinstance(obj, dict):
                    stack += [(f"{key}.{k}", v) for k, v in obj.items()]
                elif isinstance(obj, (list, tuple)):
                    stack += [(f"{key}.{i}", v) for i, v in enumerate(obj)]
                elif torch.is_tensor(obj) and obj.is_floating_point() and obj.numel() > 1:
                    found[key] = obj.dtype
    weights = {k: v for k, v in found.items() if "exp_avg" not in k}
    moments = {k: v for k, v in found.items() if "exp_avg" in k}
    assert moments and set(moments.values()) == {torch.float32}, moments
    assert weights and set(weights.values()) == {torch.float32}, weights
