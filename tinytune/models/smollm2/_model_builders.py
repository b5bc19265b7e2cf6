"""SmolLM2 model builders (official sizes) and a tiny test model. Llama architecture, tied."""

from tinytune.models._component_builders import LinearFactory, llama_decoder
from tinytune.modules import TransformerDecoder


def smollm2_135m(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """SmolLM2 135M: 30 layers, dim 576, 9/3 heads, MLP 1536, vocab 49152, theta 1e5, tied."""
    return llama_decoder(
        vocab_size=49_152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        hidden_dim=1536,
        max_seq_len=8192,
        rope_base=100_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def smollm2_360m(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """SmolLM2 360M: 32 layers, dim 960, 15/5 heads, MLP 2560, vocab 49152, theta 1e5, tied."""
    return llama_decoder(
        vocab_size=49_152,
        dim=960,
        n_layers=32,
        n_heads=15,
        n_kv_heads=5,
        head_dim=64,
        hidden_dim=2560,
        max_seq_len=8192,
        rope_base=100_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def smollm2_1_7b(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """SmolLM2 1.7B: 24 layers, dim 2048, 32 heads (MHA), MLP 8192, vocab 49152, theta 1.3e5, tied."""
    return llama_decoder(
        vocab_size=49_152,
        dim=2048,
        n_layers=24,
        n_heads=32,
        n_kv_heads=32,
        head_dim=64,
        hidden_dim=8192,
        max_seq_len=8192,
        rope_base=130_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )


def smollm2_tiny(linear_factory: LinearFactory | None = None) -> TransformerDecoder:
    """Tiny SmolLM2-style model for tests: GQA 4/2, theta 1e5, tied embeddings, vocab 256."""
    return llama_decoder(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=160,
        max_seq_len=512,
        rope_base=100_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=linear_factory,
    )
