"""Decoder-only transformer: layers, tied output projection and the full model."""

import torch
from torch import nn

from tinytune.kernels.cpu_gemm import linear
from tinytune.modules.attention import seq_lens_to_document_ids
from tinytune.modules.multi_head_attention import MultiHeadAttention


class TransformerSelfAttentionLayer(nn.Module):
    """Pre-norm block: ``x + attn(sa_norm(x))`` then ``h + mlp(mlp_norm(h))``.

    Args:
        attn: self-attention module.
        mlp: feed-forward module.
        sa_norm: norm applied before attention.
        mlp_norm: norm applied before the MLP.
    """

    def __init__(self, *, attn: MultiHeadAttention, mlp: nn.Module, sa_norm: nn.Module, mlp_norm: nn.Module) -> None:
        super().__init__()
        self.sa_norm = sa_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        *,
        input_pos: torch.Tensor,
        seq_lens: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``[b, s, dim]``.
            input_pos: ``[b, s]`` positions.
            seq_lens: ``[b, max_docs]`` packed document lengths, or ``None``.
            document_ids: ``[b, s]`` document ids, or ``None``.
            mask: ``[b, s, s_kv]`` explicit boolean mask, or ``None``.

        Returns:
            ``[b, s, dim]``.
        """
        h = x + self.attn(
            self.sa_norm(x), input_pos=input_pos, seq_lens=seq_lens, document_ids=document_ids, mask=mask
        )  # [b, s, dim]
        return h + self.mlp(self.mlp_norm(h))  # [b, s, dim]


class TiedLinear(nn.Module):
    """Output projection that reuses the token-embedding weight (no parameters of its own).

    The embedding module is held by reference outside the module tree, so the weight appears
    once in ``state_dict`` (as ``tok_embeddings.weight``).

    Args:
        embedding: the model's token embedding.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list keeps it out of the module tree

    @property
    def weight(self) -> torch.Tensor:
        """The tied weight ``[vocab, dim]``."""
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, dim] -> [b, s, vocab]``."""
        return linear(x, self.weight)  # [b, s, vocab]


class TransformerDecoder(nn.Module):
    """Decoder-only language model.

    Args:
        tok_embeddings: token embedding ``[vocab, dim]``.
        layers: the transformer blocks.
        norm: final norm.
        output: output projection (``nn.Linear``-like) or :class:`TiedLinear`.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        layers: nn.ModuleList | list[nn.Module],
        norm: nn.Module,
        output: nn.Module,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        self.norm = norm
        self.output = output

    @property
    def output_weight(self) -> torch.Tensor:
        """Weight ``[vocab, dim]`` of the output projection (the embedding weight when tied)."""
        return self.output.weight

    @property
    def is_tied(self) -> bool:
        """Whether the output projection reuses the token embedding."""
        return isinstance(self.output, TiedLinear)

    # ---- KV cache management -------------------------------------------------------------
    def setup_caches(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Attach empty KV caches to every attention layer.

        Args:
            batch_size: rows that will be decoded together.
            max_seq_len: capacity (prompt + new tokens).
            dtype: cache dtype (defaults to the embedding dtype).
            device: cache device (defaults to the embedding device).
        """
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attn.setup_cache(batch_size, max_seq_len, dtype or weight.dtype, device or weight.device)

    def caches_are_enabled(self) -> bool:
        """Whether KV caches are attached."""
        return any(getattr(layer.attn, "kv_cache", None) is not None for layer in self.layers)

    def reset_caches(self) -> None:
        """Empty the caches without freeing them."""
        for layer in self.layers:
            if layer.attn.kv_cache is not None:
                layer.attn.kv_cache.reset()

    def clear_caches(self) -> None:
        """Remove the caches (back to training behaviour)."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            tokens: ``[b, s]`` token ids.
            input_pos: ``[b, s]`` positions; ``None`` means ``arange(s)`` (continuing after the
                cached positions when KV caches are attached). Packed rows restart at 0 per document.
            seq_lens: ``[b, max_docs]`` packed document lengths (zero-padded, rows sum to ``s``).
            mask: ``[b, s, s_kv]`` explicit attention mask, boolean (True = attend) or additive
                float (0 = attend, -inf = not), for left-padded batches and KV-cache decoding;
                replaces the causal/packed mask.
            return_hidden: return the final-normed hidden states instead of logits.

        Returns:
            ``[b, s, vocab]`` logits, or ``[b, s, dim]`` hidden states when ``return_hidden``.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        b, s = tokens.shape
        if input_pos is None:
            start = 0
            if self.caches_are_enabled():
                start = self.layers[0].attn.kv_cache.size
            input_pos = torch.arange(start, start + s, device=tokens.device).expand(b, s)  # [b, s]
        elif input_pos.shape != tokens.shape:
            raise ValueError(f"input_pos shape {tuple(input_pos.shape)} must equal tokens shape {tuple(tokens.shape)}")
        document_ids = None
        if seq_lens is not None:
            if mask is not None:
                raise ValueError("pass either seq_lens (packed) or mask, not both")
            document_ids = seq_lens_to_document_ids(seq_lens, s)  # [b, s]

        h = self.tok_embeddings(tokens)  # [b, s, dim]
        for layer in self.layers:
            h = layer(h, input_pos=input_pos, seq_lens=seq_lens, document_ids=document_ids, mask=mask)  # [b, s, dim]
        h = self.norm(h)  # [b, s, dim]
        if return_hidden:
            return h
        return self.output(h)  # [b, s, vocab]
