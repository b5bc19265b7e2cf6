"""Grouped-query self-attention with rotary embeddings."""

import torch
from torch import nn

from tinytune.kernels.fused_ops import saved_as_recompute
from tinytune.modules.attention import attention
from tinytune.modules.kv_cache import KVCache
from tinytune.modules.position_embeddings import RotaryPositionalEmbeddings


class MultiHeadAttention(nn.Module):
    """Multi-head attention with GQA, optional per-head q/k RMSNorm and an optional KV cache.

    Projections and norms are injected by the builders; variants (qkv bias for Qwen2, q/k norm
    for Qwen3) come from what is passed in, not from flags.

    Args:
        dim: model width.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (divides ``n_heads``).
        head_dim: size of each head.
        q_proj: ``dim -> n_heads * head_dim``.
        k_proj: ``dim -> n_kv_heads * head_dim``.
        v_proj: ``dim -> n_kv_heads * head_dim``.
        o_proj: ``n_heads * head_dim -> dim``.
        pos_embeddings: rotary embeddings (may be shared between layers).
        q_norm: optional norm over ``head_dim`` applied to queries before RoPE.
        k_norm: optional norm over ``head_dim`` applied to keys before RoPE.
    """

    def __init__(
        self,
        *,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        pos_embeddings: RotaryPositionalEmbeddings,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.o_proj = o_proj
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.kv_cache: KVCache | None = None

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Attach an empty KV cache."""
        self.kv_cache = KVCache(batch_size, max_seq_len, self.n_kv_heads, self.head_dim, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        *,
        input_pos: torch.Tensor,
        seq_lens: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over ``x`` (and the cache, when one is attached).

        Args:
            x: ``[b, s, dim]``.
            input_pos: ``[b, s]`` positions used by RoPE.
            seq_lens: ``[b, max_docs]`` packed document lengths (no cache).
            document_ids: ``[b, s]`` document ids matching ``seq_lens``.
            mask: ``[b, s, s_kv]`` boolean mask (True = attend) or additive float mask (0 / -inf);
                with a cache ``s_kv`` counts every cached position including the new ones.
                ``None`` with a cache means causal over cache slots.

        Returns:
            ``[b, s, dim]``.
        """
        b, s, _ = x.shape
        with saved_as_recompute(x):  # a normalised x is recomputed in backward, not kept
            q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # [b, s, h, d]
            k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, h_kv, d]
            v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, h_kv, d]
        if self.q_norm is not None:
            q = self.q_norm(q)  # [b, s, h, d]
        if self.k_norm is not None:
            k = self.k_norm(k)  # [b, s, h_kv, d]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h(_kv), s, d]

        cos, sin = self.pos_embeddings.cos_sin(input_pos)  # [b, 1, s, d] each
        q = self.pos_embeddings.rotate(q, cos, sin)  # [b, h, s, d]
        k = self.pos_embeddings.rotate(k, cos, sin)  # [b, h_kv, s, d]

        if self.kv_cache is not None:
            if seq_lens is not None or document_ids is not None:
                raise ValueError("packed input (seq_lens) cannot be decoded with a KV cache; call clear_caches() first")
            start = self.kv_cache.size
            k, v = self.kv_cache.update(k, v)  # [b, h_kv, s_kv, d] each
            if mask is None:
                q_slot = torch.arange(start, start + s, device=x.device)[:, None]  # [s, 1]
                k_slot = torch.arange(k.shape[2], device=x.device)[None, :]  # [1, s_kv]
                mask = (k_slot <= q_slot).expand(b, s, k.shape[2])  # [b, s, s_kv]
            out = attention(q, k, v, kv_cache_mask=mask)  # [b, h, s, d]
        else:
            out = attention(q, k, v, seq_lens=seq_lens, document_ids=document_ids, kv_cache_mask=mask)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # [b, s, h * d]
        return self.o_proj(out)  # [b, s, dim]
