"""One attention entry point: Triton flash attention on CUDA, PyTorch SDPA (or per-document SDPA) on CPU.

Masking modes (exactly one applies):

* ``kv_cache_mask`` given: a complete mask ``[b, s_q, s_kv]``, boolean (True = may attend) or
  additive float (0 = attend, -inf = not), used for KV-cache decoding and left-padded batches.
  Nothing else is added to it.
* ``seq_lens`` or ``document_ids`` given: packed documents; causal attention inside each document.
* neither: plain causal attention (requires ``s_q == s_kv``).

On CUDA, training-shaped calls (plain causal or packed) go through the Triton kernel: packed
documents are skipped block by block with no ``[s, s]`` mask, and on an H200 it measured 1.22-1.34x
SDPA's flash backend on plain causal bf16 (``benchmarks/RESULTS.md``). ``TINYTUNE_ATTENTION=sdpa``
sends them to SDPA instead, ``=packed`` uses the kernel for packed rows only (for comparisons and
debugging). On CPU, packed rows given as ``seq_lens`` run one fused SDPA call
per document (:mod:`tinytune.modules.document_attention`); other masks use SDPA with a boolean mask.
"""

import os

import torch
import torch.nn.functional as F

from tinytune.kernels.fused_ops import plain_tensors
from tinytune.modules.document_attention import document_attention

_KERNEL_STATE: dict[str, object] = {}


def seq_lens_to_document_ids(seq_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Turn per-row document lengths into a document id per position.

    Args:
        seq_lens: ``[b, max_docs]`` integer lengths, zero-padded; each row should sum to ``seq_len``.
        seq_len: number of positions ``s``.

    Returns:
        ``[b, s]`` int64 document ids (0, 1, ...). Positions past a row's total get one extra id.
    """
    if seq_lens.dim() != 2:
        raise ValueError(f"seq_lens must be [batch, max_docs], got shape {tuple(seq_lens.shape)}")
    ends = seq_lens.long().cumsum(-1)  # [b, D]
    pos = torch.arange(seq_len, device=seq_lens.device).expand(seq_lens.shape[0], seq_len)  # [b, s]
    return torch.searchsorted(ends.contiguous(), pos.contiguous(), right=True)  # [b, s]


def packed_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows.

    Args:
        document_ids: ``[b, s]`` document id of every position.

    Returns:
        ``[b, 1, s, s]`` boolean mask, True where query ``i`` may attend key ``j``.
    """
    s = document_ids.shape[-1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril_()  # [s, s]
    return (same_doc & causal)[:, None]  # [b, 1, s, s]


def _flash_kernel():
    """The Triton kernel, or ``None`` when it cannot be imported (looked up once)."""
    if "fn" not in _KERNEL_STATE:
        try:
            from tinytune.kernels import flash_attention  # noqa: PLC0415 (optional: triton (slow import, CUDA only)); lazy: Triton import is slow and CUDA-only here
        except Exception:  # noqa: BLE001 - any import failure means "use SDPA"
            flash_attention = None
        _KERNEL_STATE["fn"] = flash_attention
    return _KERNEL_STATE["fn"]


def _use_kernel(q: torch.Tensor, packed: bool) -> bool:
    if not q.is_cuda:
        return False
    mode = os.environ.get("TINYTUNE_ATTENTION", "auto").lower()
    if mode == "sdpa" or (mode == "packed" and not packed):
        return False
    return _flash_kernel() is not None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_lens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    kv_cache_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with causal, packed or explicit masking.

    Args:
        q: queries ``[b, h, s_q, d]``.
        k: keys ``[b, h_kv, s_kv, d]``; ``h`` must be a multiple of ``h_kv`` (GQA).
        v: values ``[b, h_kv, s_kv, d]``.
        seq_lens: packed document lengths ``[b, max_docs]`` (zero-padded, rows sum to ``s``).
        document_ids: ``[b, s]`` document id per position (alternative to ``seq_lens``).
        kv_cache_mask: complete mask ``[b, s_q, s_kv]``: boolean (True = attend) or additive in
            the dtype of ``q`` (0 = attend, -inf = not). Every query row needs at least one
            attended entry.
        softmax_scale: defaults to ``1 / sqrt(d)``.

    Returns:
        ``[b, h, s_q, d]`` attention output.
    """
    b, h, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    if h % h_kv:
        raise ValueError(f"number of query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if kv_cache_mask is None and s_q != s_kv:
        raise ValueError(f"causal attention needs s_q == s_kv (got {s_q} and {s_kv}); pass kv_cache_mask")

    if (
        kv_cache_mask is None
        and (document_ids is None or seq_lens is not None)
        and _use_kernel(q, seq_lens is not None)
    ):
        kernel = _flash_kernel()
        return kernel(q, k, v, causal=True, seq_lens=seq_lens, softmax_scale=softmax_scale)  # [b, h, s, d]

    if kv_cache_mask is None and seq_lens is not None and q.device.type == "cpu" and plain_tensors(q, k, v):
        return document_attention(q, k, v, seq_lens, softmax_scale)  # [b, h, s, d], one SDPA per document

    mask = None
    if kv_cache_mask is not None:
        if kv_cache_mask.shape[-1] != s_kv:
            kv_cache_mask = kv_cache_mask[..., :s_kv]
        mask = kv_cache_mask[:, None] if kv_cache_mask.dim() == 3 else kv_cache_mask  # [b, 1, s_q, s_kv]
    elif document_ids is not None or seq_lens is not None:
        if document_ids is None:
            document_ids = seq_lens_to_document_ids(seq_lens, s_q)
        mask = packed_causal_mask(document_ids)  # [b, 1, s, s]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=softmax_scale,
        enable_gqa=h != h_kv,
    )  # [b, h, s_q, d]
