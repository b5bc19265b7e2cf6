"""Reward-model export for every family the reward recipe trains: Llama, SmolLM2 (Llama architecture,
tied embeddings), Qwen2 (q/k/v biases), Qwen3 (q/k norms). Tiny random HF models built by
transformers go through our loader, get a random score head, are exported, and transformers'
``AutoModelForSequenceClassification`` on the export gives our scores (fp32, 1e-4); the reward
recipe itself is run on Qwen2 and Qwen3 and its logged validation loss reproduced from the export."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _ckpt_helpers import tiny_hf_model
from _recipe_fixtures import make_tokenizer_files, write_preference_jsonl
from omegaconf import OmegaConf

from tinytune.checkpoint import load_hf_model, save_reward_checkpoint
from tinytune.modules.reward_head import RewardModel

transformers = pytest.importorskip("transformers")

FAMILIES = {
    # name: (model_type, expected architecture, overrides of the tiny HF config)
    "llama3": ("llama", "LlamaForSequenceClassification", {"tie_word_embeddings": False}),
    "smollm2": ("llama", "LlamaForSequenceClassification", {"tie_word_embeddings": True, "head_dim": 16}),
    "qwen2": ("qwen2", "Qwen2ForSequenceClassification", {"tie_word_embeddings": True}),
    "qwen2_untied": ("qwen2", "Qwen2ForSequenceClassification", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", "Qwen3ForSequenceClassification", {"tie_word_embeddings": True}),
    "qwen3_untied": ("qwen3", "Qwen3ForSequenceClassification", {"tie_word_embeddings": False}),
}
PAD = 1


def _hf_dir(path, family, vocab_size=128, seed=0):
    model_type, _, over = FAMILIES[family]
    hf = tiny_hf_model(model_type, seed=seed, vocab_size=vocab_size, **over)
    hf.save_pretrained(path, safe_serialization=True)
    return str(path)


def _hf_scores(path, tokens):
    m = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=tokens).logits.squeeze(-1)


def _padded_tokens(vocab):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, vocab, (4, 12), generator=g)
    tokens[0, 9:] = PAD  # right padding
    tokens[1, :3] = PAD  # left padding
    tokens[2, 5:] = PAD
    return tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_our_scores(tmp_path, family):
    decoder, info = load_hf_model(_hf_dir(tmp_path / "base", family))
    model = RewardModel(decoder, info.dim, PAD).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    tokens = _padded_tokens(info.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
    out = save_reward_checkpoint(decoder.state_dict(), model.score.weight, info, str(tmp_path / "rm"), pad_token_id=PAD)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == [FAMILIES[family][1]] and cfg["model_type"] == FAMILIES[family][0]
    assert cfg["num_labels"] == 1 and cfg["pad_token_id"] == PAD
    hf = _hf_scores(out, tokens)
    assert float(hf.std()) > 1e-3  # the rows score differently, so a wrong position would show
    torch.testing.assert_close(hf, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3_untied"])
def test_reward_recipe_on_qwen_exports_what_it_validated(tmp_path, monkeypatch, family):
    from recipes.reward_model import recipe_main
    from tinytune.datasets import preference_dataset
    from tinytune.tokenizers import load_tokenizer

    monkeypatch.setenv("TINYTUNE_HOME", str(tmp_path / "home"))
    base = tmp_path / "base"
    make_tokenizer_files(str(base))
    vocab = -(-load_tokenizer(str(base)).vocab_size // 64) * 64
    _hf_dir(base, family, vocab_size=vocab)
    pairs = write_preference_jsonl(str(tmp_path / "pairs.jsonl"))
    node = {
        "_component_": "tinytune.datasets.preference_dataset",
        "source": pairs,
        "template": "chatml",
        "max_seq_len": 64,
        "val_fraction": 0.25,
        "seed": 0,
    }
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "checkpoint_dir": str(base),
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "dataset": {**node, "split": "train"},
        "validation": {"dataset": {**node, "split": "validation"}, "every_n_steps": 2},
        "model": {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0},
        "batch_size": 3,
        "shuffle": False,
        "max_steps": 2,
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "metric_loggers": ["jsonl"],
    }
    recipe_main(OmegaConf.create(cfg))
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    val = [r for r in rows if "val_loss" in r][-1]
    ds = preference_dataset(
        load_tokenizer(str(base)),
        pairs,
        template="chatml",
        max_seq_len=64,
        split="validation",
        val_fraction=0.25,
        seed=0,
    )
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    out = str(tmp_path / "out" / "hf_model")
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [FAMILIES[family][1]]
    s = _hf_scores(out, batch["tokens"])
    n = len(ds)
    assert val["val_loss"] == pytest.approx(float(-F.logsigmoid(s[:n] - s[n:]).mean()), rel=1e-4)
    assert val["val_accuracy"] == pytest.approx(float((s[:n] > s[n:]).float().mean()))
