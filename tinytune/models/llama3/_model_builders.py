"""Llama 3.1 / 3.2 model builders (official sizes) and a tiny test model."""

from tinytune.models._component_builders import LinearFactory, llama_decoder
from tinytune.modules import TransformerDecoder


def _llama3_scaling(factor: float) -> dict[str, float]:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_1_8b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Llama 3.1 8B: 32 layers, dim 4096, 32/8 heads, MLP 14336, vocab 128256, rope scaling x8."""
    return llama_decoder(
        vocab_size=128_256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14_336,
        max_seq_len=131_072,
        rope_base=500_000.0,
        rope_scaling=_llama3_scaling(8.0),
        norm_eps=1e-5,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )


def llama3_2_1b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Llama 3.2 1B: 16 layers, dim 2048, 32/8 heads, MLP 8192, tied embeddings, rope scaling x32."""
    return llama_decoder(
        vocab_size=128_256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        hidden_dim=8192,
        max_seq_len=131_072,
        rope_base=500_000.0,
        rope_scaling=_llama3_scaling(32.0),
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def llama3_2_3b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Llama 3.2 3B: 28 layers, dim 3072, 24/8 heads, MLP 8192, tied embeddings, rope scaling x32."""
    return llama_decoder(
        vocab_size=128_256,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=8192,
        max_seq_len=131_072,
        rope_base=500_000.0,
        rope_scaling=_llama3_scaling(32.0),
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def llama3_tiny(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Tiny Llama 3.x-style model for tests: GQA 4/2, theta 5e5, rope scaling (x8, original 64)."""
    return llama_decoder(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=160,
        max_seq_len=512,
        rope_base=500_000.0,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        norm_eps=1e-5,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )
