"""Kernels: Triton flash attention and fused linear cross-entropy (with PyTorch fallbacks).

Import this package after setting ``TRITON_INTERPRET=1`` if the Triton kernels should run on CPU.
"""

from tinytune.kernels.flash_attn import flash_attention
from tinytune.kernels.linear_ce import default_chunk_size, linear_cross_entropy

__all__ = ["flash_attention", "linear_cross_entropy", "default_chunk_size"]
