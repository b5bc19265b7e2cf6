"""Qwen3 model builders (official sizes) and a tiny test model."""

from tinytune.models._component_builders import LinearFactory, qwen3_decoder
from tinytune.modules import TransformerDecoder


def qwen3_0_6b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen3 0.6B: 28 layers, dim 1024, 16/8 heads of 128, MLP 3072, vocab 151936, tied."""
    return qwen3_decoder(
        vocab_size=151_936,
        dim=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=3072,
        max_seq_len=40_960,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def qwen3_1_7b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen3 1.7B: 28 layers, dim 2048, 16/8 heads of 128, MLP 6144, vocab 151936, tied."""
    return qwen3_decoder(
        vocab_size=151_936,
        dim=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=6144,
        max_seq_len=40_960,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def qwen3_4b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen3 4B: 36 layers, dim 2560, 32/8 heads of 128, MLP 9728, vocab 151936, tied."""
    return qwen3_decoder(
        vocab_size=151_936,
        dim=2560,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=9728,
        max_seq_len=40_960,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def qwen3_8b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Qwen3 8B: 36 layers, dim 4096, 32/8 heads of 128, MLP 12288, vocab 151936, untied."""
    return qwen3_decoder(
        vocab_size=151_936,
        dim=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=12_288,
        max_seq_len=40_960,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )


def qwen3_tiny(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Tiny Qwen3-style model for tests: q/k norm, GQA 4/2, head_dim 32 != dim / heads, untied."""
    return qwen3_decoder(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        hidden_dim=160,
        max_seq_len=512,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )
