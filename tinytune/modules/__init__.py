"""Model building blocks.

The attention dispatch function is ``tinytune.modules.attention.attention`` (the submodule is not
shadowed by a package-level name).
"""

from tinytune.modules import attention  # the submodule
from tinytune.modules.attention import packed_causal_mask, seq_lens_to_document_ids
from tinytune.modules.feed_forward import FeedForward
from tinytune.modules.init import init_weights
from tinytune.modules.kv_cache import KVCache
from tinytune.modules.linear import Linear
from tinytune.modules.multi_head_attention import MultiHeadAttention
from tinytune.modules.position_embeddings import RotaryPositionalEmbeddings, check_rope_scaling
from tinytune.modules.rms_norm import RMSNorm
from tinytune.modules.transformer import TiedLinear, TransformerDecoder, TransformerSelfAttentionLayer

__all__ = [
    "FeedForward",
    "KVCache",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "TiedLinear",
    "TransformerDecoder",
    "TransformerSelfAttentionLayer",
    "attention",
    "check_rope_scaling",
    "init_weights",
    "packed_causal_mask",
    "seq_lens_to_document_ids",
]
