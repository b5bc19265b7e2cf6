"""Recipe features of the hub/data issue end to end on the tiny model: dataset mixes and streaming
datasets resume exactly, export_gguf writes a GGUF our import reads back, held-out scoring."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from _recipe_fixtures import make_tiny_checkpoint, write_chat_jsonl

from tinytune.cli.main import main as tune_main

LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes_hub")
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(str(root / "tiny_model")),
        "chat": write_chat_jsonl(str(root / "chat.jsonl")),
        "chat2": write_chat_jsonl(str(root / "chat2.jsonl"), n=5),
    }


@pytest.fixture(autouse=True)
def _env(assets, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(assets["root"] / "home"))


def _node(source):
    return {
        "_component_": "tinytune.datasets.chat_dataset",
        "source": source,
        "template": "chatml",
        "max_seq_len": 64,
        "num_workers": 1,
    }


def _cfg(assets, out, **over):
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "template": "chatml",
        "dataset": _node(assets["chat"]),
        "model": dict(LORA),
        "batch_size": 2,
        "max_steps": 6,
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "lr_scheduler": {"name": "constant"},
        "clip_grad_norm": None,
        "metric_loggers": ["jsonl"],
        "resume_from_checkpoint": None,
        "save_adapter": False,
        "save_merged": False,
    }
    cfg.update(over)
    return cfg


def _run(recipe, cfg, path, *extra):
    with open(path, "w") as f:
        f.write(f"# recipe: {recipe}\n")
        yaml.safe_dump(cfg, f)
    return tune_main(["run", recipe, "--config", str(path), *extra])


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip() and "loss" in json.loads(line)]


def _resume_equals_uninterrupted(assets, tmp_path, **over):
    full = _cfg(assets, tmp_path / "full", **over)
    assert _run("lora_finetune", full, tmp_path / "full.yaml") in (0, None)
    part = _cfg(
        assets, tmp_path / "part", stop_after_steps=3, checkpoint_every_n_steps=3, resume_from_checkpoint="auto", **over
    )
    assert _run("lora_finetune", part, tmp_path / "part.yaml") in (0, None)
    part["stop_after_steps"] = 0
    assert _run("lora_finetune", part, tmp_path / "part.yaml") in (0, None)
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(got) == 6 and got == pytest.approx(want, abs=1e-6)


def test_mix_resume_equals_uninterrupted_and_records_served_counts(assets, tmp_path):
    mix = [dict(_node(assets["chat"]), weight=0.7), dict(_node(assets["chat2"]), weight=0.3)]
    _resume_equals_uninterrupted(assets, tmp_path, dataset=mix)
    from tinytune.checkpoint import TrainingCheckpointer

    ck = TrainingCheckpointer(str(tmp_path / "part" / "checkpoints"))
    state = ck.load(ck.resolve("auto"))
    served = state["data"]["dataset"]["served"]
    assert sum(served) >= 6 * 2 and all(s > 0 for s in served)


def test_streaming_resume_equals_uninterrupted(assets, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in open(assets["chat"])]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    node = {
        "_component_": "tinytune.datasets.hf_source.hf_dataset",
        "source": str(tmp_path / "disk"),
        "streaming": True,
        "template": "chatml",
        "max_seq_len": 64,
    }
    _resume_equals_uninterrupted(assets, tmp_path, dataset=node, shuffle=False)


def test_bad_mix_and_streaming_settings_are_config_errors(assets, tmp_path, capsys):
    mix = [dict(_node(assets["chat"]), weight=1.0), dict(_node(assets["chat2"]), weight=0)]
    assert _run("lora_finetune", _cfg(assets, tmp_path / "a", dataset=mix), tmp_path / "a.yaml") == 2
    assert "dataset[1].weight: 0 must be > 0" in capsys.readouterr().err
    pytest.importorskip("datasets")
    stream = {"_component_": "tinytune.datasets.hf_source.hf_dataset", "source": "acme/x", "streaming": True}
    mix = [dict(_node(assets["chat"]), epochs=1), dict(stream, epochs=2)]
    assert _run("lora_finetune", _cfg(assets, tmp_path / "b", dataset=mix), tmp_path / "b.yaml") == 2
    assert "dataset[1].epochs: 2 is meaningless for a streaming dataset" in capsys.readouterr().err
    assert _run("lora_finetune", _cfg(assets, tmp_path / "c", export_gguf="q4_k"), tmp_path / "c.yaml") == 2
    assert "export_gguf: 'q4_k' is not a GGUF type tinytune writes" in capsys.readouterr().err


def test_export_gguf_and_held_out_scores(assets, tmp_path):
    from tinytune.checkpoint import load_hf_model, read_gguf

    cfg = _cfg(
        assets,
        tmp_path / "g",
        max_steps=2,
        save_merged=True,
        export_gguf="f32",
        sample_generation={
            "max_new_tokens": 8,
            "held_out": [{"prompt": "What is ice?", "expect": "ice"}, {"prompt": "Say hello.", "expect": ["zzz"]}],
        },
    )
    assert _run("lora_finetune", cfg, tmp_path / "g.yaml") in (0, None)
    summary = json.load(open(tmp_path / "g" / "summary.json"))
    assert summary["gguf"].endswith("model-f32.gguf") and summary["held_out_correct_after"] in (0.0, 0.5)
    gens = json.load(open(tmp_path / "g" / "generations.json"))
    assert gens[1]["correct_after"] is False and gens[1]["expect"] == ["zzz"]
    assert summary["held_out_correct_after"] == sum(g["correct_after"] for g in gens) / 2
    # the GGUF holds the merged fine-tuned weights (f32: exactly the merged HF checkpoint's)
    merged, _ = load_hf_model(str(tmp_path / "g" / "hf_model"))
    g = read_gguf(summary["gguf"])
    for name, t in merged.state_dict().items():
        if name in g.state_dict:
            torch.testing.assert_close(g.state_dict[name], t, atol=0, rtol=0)
