"""Public flash-attention entry point: autograd wrapper around the Triton kernels."""

from __future__ import annotations

import math
import weakref

import torch

from tinytune.kernels._runtime import interpreting, triton_usable


def doc_tables(seq_lens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token document tables from zero-padded document lengths.

    Args:
        seq_lens: ``[b, max_docs]`` integer document lengths, zero-padded; each row sums to ``seq_len``.
        seq_len: packed sequence length ``s``.

    Returns:
        ``(doc_id, doc_start, doc_end)``, each ``[b, s]`` int32: the token's document index and the
        ``[start, end)`` positions of that document (``cu_seqlens`` per row, expanded per token).
    """
    cu = torch.cumsum(seq_lens.to(torch.int64), dim=-1)  # [b, D] document end offsets (cu_seqlens[1:])
    starts = cu - seq_lens.to(torch.int64)  # [b, D]
    pos = torch.arange(seq_len, device=seq_lens.device).expand(seq_lens.shape[0], seq_len).contiguous()  # [b, s]
    doc_id = torch.searchsorted(cu.contiguous(), pos, right=True)  # [b, s]; zero-length docs never chosen
    doc_id = doc_id.clamp(max=seq_lens.shape[1] - 1)
    doc_start = torch.gather(starts, 1, doc_id)
    doc_end = torch.gather(cu, 1, doc_id)
    return doc_id.to(torch.int32), doc_start.to(torch.int32), doc_end.to(torch.int32)


_DOCS_CACHE: dict[str, tuple] = {}


def _doc_tables_cached(seq_lens: torch.Tensor, seq_len: int):
    """:func:`doc_tables`, reused while the same unmodified ``seq_lens`` tensor comes back (every layer of
    one forward passes the same one: the tables are built once per step, not once per layer)."""
    key = (seq_lens._version, tuple(seq_lens.shape), seq_len, seq_lens.device)
    hit = _DOCS_CACHE.get("last")
    if hit is not None and hit[0]() is seq_lens and hit[1] == key:
        return hit[2]
    docs = doc_tables(seq_lens, seq_len)
    _DOCS_CACHE["last"] = (weakref.ref(seq_lens), key, docs)
    return docs


def _check(q, k, v, seq_lens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention: expected q [b, h, s, d] and k/v [b, h_kv, s, d], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if k.shape[2] != s:
        raise ValueError(
            f"flash_attention: q has {s} positions but k/v have {k.shape[2]}; the kernel is for training "
            "(equal lengths); use SDPA for KV-cache decoding"
        )
    if h % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {k.shape[1]} kv heads")
    if d > 256:
        raise ValueError(f"flash_attention: head dim {d} > 256 is not supported")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flash_attention: q/k/v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_lens is not None:
        if seq_lens.dim() != 2 or seq_lens.shape[0] != b or seq_lens.dtype.is_floating_point:
            raise ValueError(
                f"flash_attention: seq_lens must be an integer [b={b}, max_docs] tensor, got "
                f"{tuple(seq_lens.shape)} {seq_lens.dtype}"
            )
        if seq_lens.device.type == "cpu":  # a check on GPU would cost a host sync per layer
            check_seq_lens(seq_lens, s, "flash_attention: ")


def check_seq_lens(seq_lens: torch.Tensor, seq_len: int, prefix: str = "") -> None:
    """Raises a ValueError naming the first row of ``seq_lens`` ``[b, max_docs]`` that has a negative
    length or does not sum to ``seq_len`` (``prefix`` starts the message)."""
    bad = ((seq_lens.sum(-1) != seq_len) | (seq_lens < 0).any(-1)).nonzero()  # [n_bad, 1]
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"{prefix}seq_lens row {row} = {seq_lens[row].tolist()} must be non-negative and sum to the sequence "
            f"length {seq_len} (count the padding tail as its own document)"
        )


def _strides(t):
    return [t.stride(i) for i in range(4)]


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, docs, softmax_scale, visits):  # noqa: D102
        import triton  # noqa: PLC0415 (optional: triton (CUDA / interpreter only))

        from tinytune.kernels import flash_attn_kernels as K  # noqa: PLC0415 (optional: triton kernels)

        b, h, s, d = q.shape
        hkv = k.shape[1]
        block_d = max(16, triton.next_power_of_2(d))
        o = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        has_docs = docs is not None
        doc_id, doc_start, doc_end = docs if has_docs else (lse, lse, lse)  # dummies when unused
        f32 = interpreting() or q.dtype == torch.float32
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        fwd_visits = visits[0] if visits is not None else lse

        def grid(meta):
            return (triton.cdiv(s, meta["BLOCK_M"]), b * h)

        K._fwd_kernel[grid](
            q,
            k,
            v,
            o,
            lse,
            doc_id,
            doc_start,
            doc_end,
            fwd_visits,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(o),
            h,
            s,
            d,
            softmax_scale * K.LOG2E,
            K.s_bucket(s),
            GROUP=h // hkv,
            CAUSAL=causal,
            HAS_DOCS=has_docs,
            COUNT_VISITS=visits is not None,
            F32=f32,
            DOT_PREC=prec,
            BLOCK_D=block_d,
        )
        ctx.save_for_backward(q, k, v, o, lse, *(docs if has_docs else ()))
        ctx.cfg = (causal, has_docs, softmax_scale, f32, prec, block_d, visits)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):  # noqa: D102
        import triton  # noqa: PLC0415 (optional: triton (CUDA / interpreter only))

        from tinytune.kernels import flash_attn_kernels as K  # noqa: PLC0415 (optional: triton kernels)

        q, k, v, o, lse, *docs = ctx.saved_tensors
        causal, has_docs, softmax_scale, f32, prec, block_d, visits = ctx.cfg
        b, h, s, d = q.shape
        hkv = k.shape[1]
        doc_id, doc_start, doc_end = docs if has_docs else (lse, lse, lse)
        delta = torch.empty_like(lse)  # [b, h, s]
        K._bwd_preprocess_kernel[(triton.cdiv(s, 64), b * h)](
            o, do, delta, *_strides(o), *_strides(do), h, s, d, BLOCK_M=64, BLOCK_D=block_d
        )
        dk = torch.empty((b, hkv, s, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((b, hkv, s, d), dtype=v.dtype, device=v.device)
        dq = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
        common = dict(GROUP=h // hkv, CAUSAL=causal, HAS_DOCS=has_docs, F32=f32, DOT_PREC=prec, BLOCK_D=block_d)
        K._bwd_dkdv_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * hkv)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            doc_id,
            doc_start,
            doc_end,
            visits[1] if visits is not None else lse,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            h,
            hkv,
            s,
            d,
            softmax_scale * K.LOG2E,
            softmax_scale,
            K.s_bucket(s),
            COUNT_VISITS=visits is not None,
            **common,
        )
        K._bwd_dq_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            doc_id,
            doc_start,
            doc_end,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            h,
            s,
            d,
            softmax_scale * K.LOG2E,
            softmax_scale,
            K.s_bucket(s),
            **common,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    seq_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    _visits: tuple[torch.Tensor, torch.Tensor] | None = None,
    _return_lse: bool = False,
):
    """Fused (flash) attention in Triton with causal masking, GQA and packed documents.

    Args:
        q: ``[b, h, s, d]`` queries (fp32/fp16/bf16, CUDA; CPU only under ``TRITON_INTERPRET=1``).
        k: ``[b, h_kv, s, d]`` keys; ``h`` must be a multiple of ``h_kv`` (GQA, no K/V expansion).
        v: ``[b, h_kv, s, d]`` values.
        causal: apply the causal mask.
        seq_lens: optional ``[b, max_docs]`` int document lengths (zero-padded, rows sum to ``s``): a
            token attends only within its document; key blocks outside the documents of a query
            block are skipped, not masked.
        softmax_scale: defaults to ``1 / sqrt(d)``.
        _visits: testing hook: two int32 buffers ``[b*h, cdiv(s, BLOCK_M)]`` and
            ``[b*h_kv, cdiv(s, BLOCK_N)]`` filled with the number of blocks each forward / dK-dV
            program visited.
        _return_lse: also return the fp32 ``[b, h, s]`` log-sum-exp.

    Returns:
        ``[b, h, s, d]`` attention output (and the log-sum-exp if requested).

    Example:
        >>> o = flash_attention(q, k, v, causal=True, seq_lens=batch["seq_lens"])
    """
    _check(q, k, v, seq_lens)
    if not triton_usable(q, k, v):
        raise RuntimeError(
            "flash_attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 before importing "
            "tinytune on CPU); use tinytune.modules.attention.attention, which falls back to SDPA"
        )
    d = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    docs = _doc_tables_cached(seq_lens, q.shape[2]) if seq_lens is not None else None
    o, lse = _FlashAttention.apply(q, k, v, bool(causal), docs, scale, _visits)
    return (o, lse) if _return_lse else o
