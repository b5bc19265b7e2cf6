"""Shared helpers for the checkpoint tests: tiny random HF models and logits comparison."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny HF causal LM (fp32) of the given family."""
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[
        model_type
    ]
    kwargs = dict(TINY)
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so the test can see them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(seed: int = 0, vocab: int = 128, b: int = 2, s: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)


@torch.no_grad()
def hf_logits(model, toks: torch.Tensor) -> torch.Tensor:
    return model(input_ids=toks).logits.float()


@torch.no_grad()
def our_logits(model, toks: torch.Tensor) -> torch.Tensor:
    return model(toks).float()
