"""Rotary positional embeddings (Hugging Face rotate-half convention)."""

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tinytune.kernels.fused_ops import apply_rope, plain_tensors

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama3_scale(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1+ frequency scaling: slow down low frequencies, keep high ones, blend in between."""
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq  # [d/2]
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # [d/2]
    smooth = (old_ctx / wavelen - low) / (high - low)  # [d/2]
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # [d/2]
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)  # [d/2]


def check_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, float] | None:
    """Validate a rope-scaling dict (Hugging Face ``rope_scaling`` keys) and return a clean copy.

    Only the Llama 3 scheme (``rope_type: llama3``) is supported.

    Args:
        rope_scaling: ``None`` or a mapping with ``factor``, ``low_freq_factor``,
            ``high_freq_factor`` and ``original_max_position_embeddings`` (``rope_type``/``type``
            and ``rope_theta`` are accepted and ignored when they say ``llama3``).

    Returns:
        ``None`` or a dict holding the four float values.

    Raises:
        ValueError: on an unsupported scheme or missing keys.
    """
    if rope_scaling is None:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "llama3"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; only 'llama3' (or null) is")
    missing = [k for k in _LLAMA3_KEYS if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling is missing keys {missing}; llama3 scaling needs {list(_LLAMA3_KEYS)}")
    return {k: float(rope_scaling[k]) for k in _LLAMA3_KEYS}


class RotaryPositionalEmbeddings(nn.Module):
    """Rotary embeddings applied to the two halves of each head (HF ``rotate_half`` layout).

    Angles are computed on the fly from ``input_pos`` in fp32, so any position (packed documents
    restarting at 0, left-padded prompts, KV-cache decoding) works with no precomputed table and
    the module has no state to load or to materialise after meta-device construction.

    Args:
        head_dim: size of each attention head (must be even).
        max_seq_len: longest sequence the model is meant for (informational, used for checks).
        base: RoPE theta.
        rope_scaling: optional Llama 3.1+ scaling dict, see :func:`check_rope_scaling`.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        rope_scaling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = float(base)
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self._inv_freq_cache: dict[torch.device, torch.Tensor] = {}
        # the last (copy of input_pos, inference mode, cos, sin): the module is shared by every layer,
        # so one forward computes the tables once instead of once per layer
        self._last: tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor] | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Inverse frequencies ``[head_dim / 2]`` in fp32 on ``device`` (cached per device)."""
        cached = self._inv_freq_cache.get(device)
        if cached is None:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inv = 1.0 / (self.base**exponent)  # [d/2]
            if self.rope_scaling is not None:
                inv = _llama3_scale(inv, self.rope_scaling)
            cached = inv.to(device)
            if device.type != "meta":
                self._inv_freq_cache[device] = cached
        return cached

    def cos_sin(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos/sin tables for the given positions.

        Args:
            input_pos: ``[b, s]`` integer positions.

        Returns:
            ``(cos, sin)``, each ``[b, 1, s, head_dim]`` in fp32. Consecutive calls with equal
            positions return the same tables (computed once per forward, not once per layer).
        """
        last, inference = self._last, torch.is_inference_mode_enabled()
        if (
            last is not None
            and last[1] == inference
            and last[0].device == input_pos.device
            and torch.equal(last[0], input_pos)
        ):
            return last[2], last[3]
        inv = self.inv_freq(input_pos.device)  # [d/2]
        freqs = input_pos.float()[..., None] * inv  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [b, 1, s, d] each
        if not torch.compiler.is_compiling() and type(input_pos) is torch.Tensor and not input_pos.is_meta:
            self._last = (input_pos.clone(), inference, cos, sin)
        return cos, sin

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
        x1, x2 = x.chunk(2, dim=-1)  # [..., d/2] each
        return torch.cat((-x2, x1), dim=-1)  # [..., d]

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Rotate queries or keys.

        Args:
            x: ``[b, h, s, head_dim]``.
            input_pos: ``[b, s]`` positions of the tokens.

        Returns:
            ``[b, h, s, head_dim]`` in the dtype of ``x``.
        """
        cos, sin = self.cos_sin(input_pos)  # [b, 1, s, d] each
        return self.rotate(x, cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [b, h, s, d]`` with precomputed ``cos``/``sin`` ``[b, 1, s, d]``."""
        if plain_tensors(x, cos, sin):
            return apply_rope(x, cos, sin)  # backward = inverse rotation, saves only cos/sin
        xf = x.float()  # [b, h, s, d]
        out = xf * cos + self.rotate_half(xf) * sin  # [b, h, s, d]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, rope_scaling={self.rope_scaling}"
