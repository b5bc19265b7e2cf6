"""Causal attention inside each packed document, one attention call per document (CPU path).

A dense ``[s, s]`` block-diagonal mask makes SDPA's CPU kernel visit every (query, key) block of
the row and apply the mask element by element. Attending once per document, causally, does only
the work inside the documents (``sum(n_i^2) / 2`` instead of ``s^2``) and builds no mask. Each
document runs through the blocked-GEMM attention of :mod:`tinytune.kernels.cpu_attention` or
PyTorch's fused CPU kernel: by default the GEMM path for documents long enough for it to be the
faster one (:data:`GEMM_MIN_TOKENS`), ``TINYTUNE_CPU_ATTENTION=gemm|sdpa`` forces one. The documents' outputs,
log-sum-exps and gradients are written into whole-row buffers, so autograd sees one node (no
per-slice gradient buffers).
"""

from __future__ import annotations

import os

import torch

from tinytune.kernels.cpu_attention import gemm_attention_backward, gemm_attention_forward
from tinytune.kernels.flash_attn import check_seq_lens

_aten = torch.ops.aten


def _segments(seq_lens: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every non-empty document; ``seq_lens`` is ``[b, max_docs]`` on the CPU."""
    out = []
    for r, row in enumerate(seq_lens.tolist()):
        start = 0
        for n in row:
            if n > 0:
                out.append((r, start, start + n))
                start += n
    return out


CPU_ATTENTION_CHOICES = ("auto", "gemm", "sdpa")
#: ``auto``: the shortest document the GEMM path takes, per dtype (others: the fused kernel). Measured
#: with ``benchmarks/bench_cpu_attention.py`` (2-vCPU AMD EPYC, one thread, 9/3 heads, head dim 64):
#: fp32 crosses over at ~256 tokens (0.80x at 128, 1.03x at 256, 1.16-1.41x at 314-497); in bf16
#: PyTorch's fused backward is slow on short documents, so the GEMM path wins from 32 tokens
#: (1.6-2.2x at 32-128, 1.1-1.3x at 256-497) but not at 5 (0.16x).
GEMM_MIN_TOKENS = {torch.float32: 256, torch.bfloat16: 32}


def cpu_attention_mode() -> str:
    """``TINYTUNE_CPU_ATTENTION``: ``auto`` (default: by document length, :data:`GEMM_MIN_TOKENS`),
    ``gemm`` (always :mod:`tinytune.kernels.cpu_attention`) or ``sdpa`` (always PyTorch's fused CPU
    kernel, one call per document).

    Raises:
        ValueError: any other value (names the variable and the choices).
    """
    mode = os.environ.get("TINYTUNE_CPU_ATTENTION", "auto").lower()
    if mode not in CPU_ATTENTION_CHOICES:
        raise ValueError(f"TINYTUNE_CPU_ATTENTION={mode!r}: use one of {' | '.join(CPU_ATTENTION_CHOICES)}")
    return mode


class _DocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, scale):  # noqa: D102
        b, h, s, d = q.shape
        out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # [b, h, s, d] view
        lse = torch.empty((b, h, s), dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)  # [b, h, s]
        mode = cpu_attention_mode()
        min_len = GEMM_MIN_TOKENS.get(q.dtype) if mode == "auto" else (0 if mode == "gemm" else None)
        gemm = [min_len is not None and e - a >= min_len for _, a, e in segments]  # per document
        scale_ = scale if scale is not None else q.shape[-1] ** -0.5
        for (r, a, e), use_gemm in zip(segments, gemm):
            if use_gemm:
                gemm_attention_forward(q[r, :, a:e], k[r, :, a:e], v[r, :, a:e], scale_, out[r, :, a:e], lse[r, :, a:e])
                continue
            o, l_ = _aten._scaled_dot_product_flash_attention_for_cpu(
                q[r : r + 1, :, a:e], k[r : r + 1, :, a:e], v[r : r + 1, :, a:e], 0.0, True, scale=scale
            )  # [1, h, n, d], [1, h, n]
            out[r : r + 1, :, a:e] = o
            lse[r : r + 1, :, a:e] = l_
        ctx.gemm, ctx.scale_ = gemm, scale_
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments, ctx.scale = segments, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for (r, a, e), use_gemm in zip(ctx.segments, ctx.gemm):
            if use_gemm:
                s_ = (r, slice(None), slice(a, e))
                gemm_attention_backward(
                    dout[s_], q[s_], k[s_], v[s_], out[s_], lse[s_], ctx.scale_, dq[s_], dk[s_], dv[s_]
                )
                continue
            sl = (slice(r, r + 1), slice(None), slice(a, e))
            gq, gk, gv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout[sl], q[sl], k[sl], v[sl], out[sl], lse[sl], 0.0, True, scale=ctx.scale
            )
            dq[sl], dk[sl], dv[sl] = gq, gk, gv
        return dq, dk, dv, None, None


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Causal attention restricted to each document of packed rows (CPU tensors).

    Args:
        q: ``[b, h, s, d]`` queries.
        k: ``[b, h_kv, s, d]`` keys (GQA: ``h`` a multiple of ``h_kv``).
        v: ``[b, h_kv, s, d]`` values.
        seq_lens: ``[b, max_docs]`` document lengths, zero-padded; every row sums to ``s``.
        softmax_scale: defaults to ``1 / sqrt(d)``.

    Returns:
        ``[b, h, s, d]`` (a transposed view of a ``[b, s, h, d]`` buffer: merging heads is free).

    Raises:
        ValueError: a row of ``seq_lens`` has a negative length or does not sum to ``s``.
    """
    check_seq_lens(seq_lens, q.shape[2])
    return _DocumentAttention.apply(q, k, v, _segments(seq_lens.cpu()), softmax_scale)
