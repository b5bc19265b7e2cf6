"""Llama 2 model builders (official sizes) and a tiny test model."""

from tinytune.models._component_builders import LinearFactory, llama_decoder
from tinytune.modules import TransformerDecoder


def llama2_7b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Llama 2 7B: 32 layers, dim 4096, 32 heads (MHA), MLP 11008, vocab 32000, theta 1e4."""
    return llama_decoder(
        vocab_size=32_000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        hidden_dim=11_008,
        max_seq_len=4096,
        rope_base=10_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )


def llama2_tiny(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Tiny Llama 2-style model for tests: 2 layers, dim 64, 4 heads (MHA), vocab 256."""
    return llama_decoder(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        head_dim=16,
        hidden_dim=160,
        max_seq_len=512,
        rope_base=10_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        linear_factory=linear_factory,
    )
