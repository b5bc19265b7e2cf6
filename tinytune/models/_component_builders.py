"""Component builders shared by every model family.

A component builder takes every hyperparameter explicitly and assembles a
:class:`~tinytune.modules.TransformerDecoder`. Family builders (``llama_decoder``,
``qwen2_decoder``, ``qwen3_decoder``) fix the architectural variant; model builders in
``tinytune/models/<family>/`` fix the sizes.

``linear_factory(name, in_dim, out_dim, bias)`` builds every projection (``name`` in
``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj output``); LoRA builders pass a
factory that returns ``LoRALinear`` for the chosen names.
"""

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from tinytune.modules import (
    FeedForward,
    Linear,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
    init_weights,
)

LinearFactory = Callable[[str, int, int, bool], nn.Module]

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output")


def default_linear_factory(name: str, in_dim: int, out_dim: int, bias: bool) -> nn.Module:
    """A plain linear layer (:class:`tinytune.modules.Linear`, an ``nn.Linear``); ``name`` is ignored."""
    return Linear(in_dim, out_dim, bias=bias)


def transformer_decoder(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int | None,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float,
    rope_scaling: Mapping[str, Any] | None = None,
    norm_eps: float = 1e-5,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    tie_embeddings: bool = False,
    linear_factory: LinearFactory | None = None,
) -> TransformerDecoder:
    """Build a pre-norm, RoPE, GQA, SwiGLU decoder from explicit hyperparameters.

    Args:
        vocab_size: vocabulary size.
        dim: model width.
        n_layers: number of blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (divides ``n_heads``).
        head_dim: per-head size; ``None`` means ``dim // n_heads``.
        hidden_dim: MLP width.
        max_seq_len: longest supported sequence.
        rope_base: RoPE theta.
        rope_scaling: Llama 3.1+ scaling dict (HF ``rope_scaling`` keys) or ``None``.
        norm_eps: RMSNorm epsilon (also used by q/k norms).
        qkv_bias: biases on q/k/v projections (Qwen2/2.5).
        qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
        tie_embeddings: reuse the embedding weight as output projection.
        linear_factory: builds every projection; default :class:`~tinytune.modules.Linear`.

    Returns:
        A randomly initialised :class:`TransformerDecoder` (std 0.02 matrices, zero biases,
        unit norms); on the meta device construction is cheap and init is skipped.
    """
    for key, val in {
        "vocab_size": vocab_size,
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "hidden_dim": hidden_dim,
        "max_seq_len": max_seq_len,
    }.items():
        if int(val) <= 0:
            raise ValueError(f"{key} must be a positive integer, got {val}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) is not divisible by n_heads ({n_heads}); pass head_dim explicitly")
        head_dim = dim // n_heads
    make = linear_factory or default_linear_factory

    rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=rope_base, rope_scaling=rope_scaling)
    layers = []
    for _ in range(n_layers):
        attn = MultiHeadAttention(
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            q_proj=make("q_proj", dim, n_heads * head_dim, qkv_bias),
            k_proj=make("k_proj", dim, n_kv_heads * head_dim, qkv_bias),
            v_proj=make("v_proj", dim, n_kv_heads * head_dim, qkv_bias),
            o_proj=make("o_proj", n_heads * head_dim, dim, False),
            pos_embeddings=rope,
            q_norm=RMSNorm(head_dim, eps=norm_eps) if qk_norm else None,
            k_norm=RMSNorm(head_dim, eps=norm_eps) if qk_norm else None,
        )
        mlp = FeedForward(
            gate_proj=make("gate_proj", dim, hidden_dim, False),
            up_proj=make("up_proj", dim, hidden_dim, False),
            down_proj=make("down_proj", hidden_dim, dim, False),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn, mlp=mlp, sa_norm=RMSNorm(dim, eps=norm_eps), mlp_norm=RMSNorm(dim, eps=norm_eps)
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, dim)
    output = TiedLinear(tok_embeddings) if tie_embeddings else make("output", dim, vocab_size, False)
    model = TransformerDecoder(
        tok_embeddings=tok_embeddings, layers=nn.ModuleList(layers), norm=RMSNorm(dim, eps=norm_eps), output=output
    )
    return init_weights(model)


def llama_decoder(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int | None,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float,
    rope_scaling: Mapping[str, Any] | None = None,
    norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
    linear_factory: LinearFactory | None = None,
) -> TransformerDecoder:
    """Llama-architecture decoder (Llama 2, Llama 3.x, SmolLM2): no biases, no q/k norm.

    See :func:`transformer_decoder` for the arguments.
    """
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        norm_eps=norm_eps,
        qkv_bias=False,
        qk_norm=False,
        tie_embeddings=tie_embeddings,
        linear_factory=linear_factory,
    )


def qwen2_decoder(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int | None,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    tie_embeddings: bool = False,
    linear_factory: LinearFactory | None = None,
) -> TransformerDecoder:
    """Qwen2/2.5 decoder: biases on q/k/v projections.

    See :func:`transformer_decoder` for the arguments.
    """
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        rope_scaling=None,
        norm_eps=norm_eps,
        qkv_bias=True,
        qk_norm=False,
        tie_embeddings=tie_embeddings,
        linear_factory=linear_factory,
    )


def qwen3_decoder(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    tie_embeddings: bool = False,
    linear_factory: LinearFactory | None = None,
) -> TransformerDecoder:
    """Qwen3 decoder: per-head RMSNorm on queries and keys before RoPE, no biases.

    See :func:`transformer_decoder` for the arguments.
    """
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        rope_scaling=None,
        norm_eps=norm_eps,
        qkv_bias=False,
        qk_norm=True,
        tie_embeddings=tie_embeddings,
        linear_factory=linear_factory,
    )
