"""Reward model: scores at the last non-pad token equal transformers' ...ForSequenceClassification on
the exported checkpoint; Bradley-Terry loss, k x bs1 == bs k; the recipe end to end (its logged
validation loss / accuracy reproduced from transformers' scores of its export)."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from _recipe_fixtures import make_tiny_checkpoint, write_preference_jsonl

from tinytune.checkpoint import load_hf_model, save_reward_checkpoint
from tinytune.modules.reward_head import RewardModel, last_non_pad_index
from tinytune.training.reward_step import reward_accumulate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(str(root / "model")),
        "pairs": write_preference_jsonl(str(root / "pairs.jsonl")),
    }


def _hf_scores(path, tokens):
    m = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=tokens).logits.squeeze(-1)


def test_last_non_pad_index():
    t = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    assert last_non_pad_index(t, 0).tolist() == [2, 3, 4, 0]


def test_export_loads_in_transformers_with_the_same_scores(tiny, tmp_path):
    decoder, info = load_hf_model(tiny["ckpt"])
    pad = 1
    model = RewardModel(decoder, info.dim, pad).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 300, (4, 12), generator=g)
    tokens[0, 9:] = pad  # right padding
    tokens[1, :3] = pad  # left padding
    tokens[2, 5:] = pad
    with torch.no_grad():
        ours = model(tokens)
    out = save_reward_checkpoint(
        decoder.state_dict(),
        model.score.weight,
        info,
        str(tmp_path / "rm"),
        pad_token_id=pad,
        tokenizer_dir=tiny["ckpt"],
    )
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == pad
    torch.testing.assert_close(_hf_scores(out, tokens), ours, atol=1e-5, rtol=1e-5)
    # sharded export: score.weight lands in the index
    out2 = save_reward_checkpoint(
        decoder.state_dict(), model.score.weight, info, str(tmp_path / "rm2"), pad_token_id=pad, max_shard_size="200KB"
    )
    wm = json.load(open(os.path.join(out2, "model.safetensors.index.json")))["weight_map"]
    assert "score.weight" in wm and "lm_head.weight" not in wm
    torch.testing.assert_close(_hf_scores(out2, tokens), ours, atol=1e-5, rtol=1e-5)


def test_bradley_terry_grad_accumulation_kx1_equals_bs_k(tiny):
    decoder, info = load_hf_model(tiny["ckpt"])
    torch.manual_seed(0)
    m1 = RewardModel(decoder, info.dim, pad_id=0)
    torch.nn.init.normal_(m1.score.weight, std=0.1)
    m2 = copy.deepcopy(m1)
    g = torch.Generator().manual_seed(0)
    k = 3
    tokens = torch.randint(1, 300, (2 * k, 10), generator=g)
    for i, n in enumerate([10, 7, 5, 9, 6, 8]):
        tokens[i, n:] = 0
    full = reward_accumulate(m1, [{"tokens": tokens}], torch.device("cpu"))
    micro = [{"tokens": tokens[[i, k + i]]} for i in range(k)]
    acc = reward_accumulate(m2, micro, torch.device("cpu"))
    with torch.no_grad():
        s = m1(tokens)
    want = -F.logsigmoid(s[:k] - s[k:]).mean()
    assert full["loss"] == pytest.approx(float(want), rel=1e-6)
    assert full["accuracy"] == pytest.approx(float((s[:k] > s[k:]).float().mean()))
    for key in ("loss", "accuracy", "rewards/margins"):
        assert acc[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7)
    for (name, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_reward_recipe_export_reproduces_validation_metrics(tiny, tmp_path, monkeypatch, lora):
    from tinytune.cli.main import main as tune_main
    from tinytune.datasets import preference_dataset
    from tinytune.tokenizers import load_tokenizer

    monkeypatch.setenv("TINYTUNE_HOME", str(tiny["root"] / "home"))
    node = {
        "_component_": "tinytune.datasets.preference_dataset",
        "source": tiny["pairs"],
        "template": "chatml",
        "max_seq_len": 64,
        "num_workers": 1,
        "val_fraction": 0.25,
        "seed": 0,
    }
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "checkpoint_dir": tiny["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "dataset": {**node, "split": "train"},
        "validation": {"dataset": {**node, "split": "validation"}, "every_n_steps": 3},
        "batch_size": 3,
        "shuffle": False,
        "max_steps": 3,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "metric_loggers": ["jsonl"],
        "resume_from_checkpoint": None,
    }
    if lora:
        cfg["model"] = {
            "lora_attn_modules": ["q_proj", "v_proj"],
            "apply_lora_to_mlp": True,
            "lora_rank": 4,
            "lora_alpha": 8.0,
        }
    path = tmp_path / "rm.yaml"
    path.write_text("# recipe: reward_model\n" + yaml.safe_dump(cfg))
    assert tune_main(["run", "reward_model", "--config", str(path)]) in (0, None)
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    val = [r for r in rows if "val_loss" in r][-1]
    tok = load_tokenizer(tiny["ckpt"])
    ds = preference_dataset(
        tok,
        tiny["pairs"],
        template="chatml",
        max_seq_len=64,
        num_workers=1,
        split="validation",
        val_fraction=0.25,
        seed=0,
    )
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    s = _hf_scores(str(tmp_path / "out" / "hf_model"), batch["tokens"])
    n = len(ds)
    assert val["val_loss"] == pytest.approx(float(-F.logsigmoid(s[:n] - s[n:]).mean()), rel=1e-4)
    assert val["val_accuracy"] == pytest.approx(float((s[:n] > s[n:]).float().mean()))
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["val_accuracy"] == val["val_accuracy"]
