"""Key/value cache for incremental decoding."""

import torch
from torch import nn


class KVCache(nn.Module):
    """Fixed-size key/value cache of one attention layer.

    All rows of the batch share one write offset (``size``); rows of different prompt length are
    handled by left padding plus an attention mask, see :mod:`tinytune.generation`.

    Args:
        batch_size: number of rows.
        max_seq_len: capacity in positions.
        n_kv_heads: number of key/value heads.
        head_dim: size of each head.
        dtype: storage dtype.
        device: storage device.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.size = 0

    def reset(self) -> None:
        """Forget every cached position."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values and return everything cached so far.

        Args:
            k: new keys ``[b, h_kv, s, d]``.
            v: new values ``[b, h_kv, s, d]``.

        Returns:
            ``(k_all, v_all)``, each ``[b, h_kv, size, d]`` where ``size`` includes the new positions.

        Raises:
            ValueError: on a batch-size mismatch or when the cache would overflow.
        """
        b, _, s, _ = k.shape
        if b != self.batch_size:
            raise ValueError(f"KVCache was set up for batch size {self.batch_size}, got {b}; call setup_caches again")
        if self.size + s > self.max_seq_len:
            raise ValueError(
                f"KVCache overflow: {self.size} cached + {s} new > capacity {self.max_seq_len}; "
                "set up the caches with a larger max_seq_len"
            )
        end = self.size + s
        self.k_cache[:, :, self.size : end] = k
        self.v_cache[:, :, self.size : end] = v
        self.size = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]  # [b, h_kv, size, d] each
