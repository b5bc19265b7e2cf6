"""Tiny random HF-format checkpoints (no transformers import: fast in every test process)."""

import torch

from tinytune.checkpoint import save_hf_checkpoint
from tinytune.checkpoint.model_info import model_info_from_hf_config
from tinytune.checkpoint.model_loading import build_model


def write_tiny_checkpoint(
    out_dir: str, model_type: str = "qwen3", tie: bool = False, seed: int = 0, num_layers: int = 2
) -> str:
    """Random tiny checkpoint (vocab 320, dim 32, ``num_layers`` layers, 4/2 heads) with the tiny test tokenizer."""
    from tests._recipe_fixtures import make_tokenizer_files

    make_tokenizer_files(out_dir, vocab_size=320)
    cfg = {
        "model_type": model_type,
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
        ],
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
    }
    info = model_info_from_hf_config(cfg)
    torch.manual_seed(seed)
    model = build_model(info)
    with torch.no_grad():
        for name, p in model.named_parameters():  # visible norms / biases, small weights
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    save_hf_checkpoint(model, info, out_dir, tokenizer_dir=out_dir)
    return out_dir
