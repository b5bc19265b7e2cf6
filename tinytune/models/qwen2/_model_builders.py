"""Qwen 2.5 model builders (official sizes) and a tiny test model."""

from tinytune.models._component_builders import LinearFactory, qwen2_decoder
from tinytune.modules import TransformerDecoder


def qwen2_5_0_5b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen2.5 0.5B: 24 layers, dim 896, 14/2 heads, MLP 4864, vocab 151936, tied."""
    return qwen2_decoder(
        vocab_size=151_936,
        dim=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        head_dim=64,
        hidden_dim=4864,
        max_seq_len=32_768,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def qwen2_5_1_5b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen2.5 1.5B: 28 layers, dim 1536, 12/2 heads, MLP 8960, vocab 151936, tied."""
    return qwen2_decoder(
        vocab_size=151_936,
        dim=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        head_dim=128,
        hidden_dim=8960,
        max_seq_len=32_768,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def qwen2_5_7b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen2.5 7B: 28 layers, dim 3584, 28/4 heads, MLP 18944, vocab 152064, untied."""
    return qwen2_decoder(
        vocab_size=152_064,
        dim=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        hidden_dim=18_944,
        max_seq_len=32_768,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )


def qwen2_tiny(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Tiny Qwen2-style model for tests: qkv bias, GQA 4/2, theta 1e6, tied, vocab 512."""
    return qwen2_decoder(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=160,
        max_seq_len=512,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )
