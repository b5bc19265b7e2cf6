"""Causal attention of one document from batched GEMMs (CPU): forward and backward.

PyTorch's fused CPU attention kernel runs at 35-40 GFLOP/s at head dim 64 on the machines this
project measures on, a third to a half of an fp32 GEMM there. This path computes the same
FlashAttention-2 algebra with ``bmm`` on query blocks:

* GQA without repeating K/V: the ``g`` query heads that share a key/value head are stacked as the
  rows of one GEMM (``[h_kv, block * g, d] @ [h_kv, d, keys]``), queries in token-major order so a
  block's rows are contiguous.
* Query block ``[qs, qe)`` multiplies only keys ``[0, qe)`` (the causal part plus the diagonal
  block, which is masked), so about ``block / n`` of the work is wasted instead of half.
* fp32 scores and softmax; forward saves only the log-sum-exp; backward recomputes ``P`` per block.
* Every GEMM is fp32, also for bf16 inputs (they are converted per document, a small cost next to
  the ``[queries, keys]`` work). PyTorch's bf16 kernel rounds ``P`` and ``dS`` to bf16 for its
  GEMMs; this path does not, so its bf16 results are closer to an fp64 reference (tested). A bf16
  ``bmm`` would be faster but rounds its output: scores rounded to bf16 before the softmax are not
  acceptable. (oneDNN's ``fp32_precision = "bf16"`` did not change the results or the speed on the
  AMD EPYC test machine, so it is not used.)

Blocks are small (32 queries) so a block's scores stay in the L2 cache: larger blocks were slower
(measured 0.6-0.8x the fused kernel at 256 queries, 1.2-1.4x at 32-48).

All tensors here are one document's: ``q`` ``[h, n, d]``, ``k``/``v`` ``[h_kv, n, d]`` (any strides).
"""

from __future__ import annotations

import torch

BLOCK = 32
_MASKS: dict[int, torch.Tensor] = {}


def _diag_mask(b: int) -> torch.Tensor:
    """``[b, 1, b]`` True above the diagonal (keys after the query inside the diagonal block)."""
    if b not in _MASKS:
        _MASKS[b] = torch.ones(b, b, dtype=torch.bool).triu_(1)[:, None, :]
    return _MASKS[b]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _grouped_queries(q: torch.Tensor, h_kv: int, scale: float) -> torch.Tensor:
    """``[h, n, d]`` -> scaled ``[h_kv, n, g, d]`` in the compute dtype (contiguous: a query block is a row range)."""
    h, n, d = q.shape
    out = torch.empty((h_kv, n, h // h_kv, d), dtype=_acc(q.dtype))
    torch.mul(q.view(h_kv, h // h_kv, n, d).transpose(1, 2), scale, out=out)
    return out


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous in the compute dtype (no copy when it already is)."""
    return x.to(_acc(x.dtype)).contiguous()


def _token_major(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[h, n, d]`` -> ``[h_kv, n, g, d]`` contiguous in the compute dtype."""
    h, n, d = x.shape
    return _f32(x.view(h_kv, h // h_kv, n, d).transpose(1, 2))


def _scores(qg: torch.Tensor, k: torch.Tensor, qs: int, qe: int) -> torch.Tensor:
    """Masked scores of query block ``[qs, qe)``: ``[h_kv, b, g, qe]`` fp32 (a view of ``[h_kv, b*g, qe]``)."""
    h_kv, _, g, d = qg.shape
    b = qe - qs
    s = torch.bmm(qg[:, qs:qe].view(h_kv, b * g, d), k[:, :qe].transpose(1, 2)).view(h_kv, b, g, qe)
    s[..., qs:qe].masked_fill_(_diag_mask(b), float("-inf"))
    return s


def gemm_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Causal attention of one document; writes ``out`` and ``lse``.

    Args:
        q: ``[h, n, d]`` queries.
        k: ``[h_kv, n, d]`` keys.
        v: ``[h_kv, n, d]`` values.
        scale: softmax scale.
        out: ``[h, n, d]`` output (any dtype; a view of token-major storage, such as a slice of a
            ``[b, s, h, d]`` buffer seen as ``[b, h, s, d]``).
        lse: ``[h, n]`` log-sum-exp of each query's scaled scores (fp32; fp64 for fp64 inputs).
    """
    h, n, d = q.shape
    h_kv = k.shape[0]
    g = h // h_kv
    qg = _grouped_queries(q, h_kv, scale)  # [h_kv, n, g, d]
    kf = _f32(k)  # [h_kv, n, d]
    vf = _f32(v)  # [h_kv, n, d]
    out_g = out.transpose(0, 1).view(n, h_kv, g, d)
    lse_g = lse.view(h_kv, g, n)
    for qs in range(0, n, BLOCK):
        qe = min(n, qs + BLOCK)
        b = qe - qs
        s = _scores(qg, kf, qs, qe)  # [h_kv, b, g, qe]
        m = s.amax(-1, keepdim=True)  # [h_kv, b, g, 1]
        s.sub_(m).exp_()
        denom = s.sum(-1, keepdim=True)  # [h_kv, b, g, 1]
        o = torch.bmm(s.view(h_kv, b * g, qe), vf[:, :qe]).view(h_kv, b, g, d)  # unnormalised
        o.div_(denom)
        out_g[qs:qe].copy_(o.transpose(0, 1))
        lse_g[:, :, qs:qe].copy_(m.add_(denom.log_()).squeeze(-1).transpose(1, 2))


def gemm_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Gradients of :func:`gemm_attention_forward`; writes ``dq``, ``dk``, ``dv``.

    Args:
        dout: ``[h, n, d]`` gradient of the output.
        q: ``[h, n, d]``; k, v: ``[h_kv, n, d]``.
        out: ``[h, n, d]`` the forward's output.
        lse: ``[h, n]`` the forward's log-sum-exp.
        scale: softmax scale.
        dq: ``[h, n, d]``; dk, dv: ``[h_kv, n, d]`` outputs (any dtype and strides).
    """
    h, n, d = q.shape
    h_kv = k.shape[0]
    g = h // h_kv
    qg = _grouped_queries(q, h_kv, scale)  # [h_kv, n, g, d]
    kf = _f32(k)
    vf = _f32(v)
    do_g = _token_major(dout, h_kv)  # [h_kv, n, g, d]
    delta = (do_g * _token_major(out, h_kv)).sum(-1, keepdim=True)  # [h_kv, n, g, 1]
    lse_g = lse.view(h_kv, g, n).transpose(1, 2).unsqueeze(-1)  # [h_kv, n, g, 1]
    dq_g = torch.empty_like(qg)  # [h_kv, n, g, d]
    dk_f = torch.zeros_like(kf)  # [h_kv, n, d]
    dv_f = torch.zeros_like(vf)
    for qs in range(0, n, BLOCK):
        qe = min(n, qs + BLOCK)
        b = qe - qs
        p = _scores(qg, kf, qs, qe).sub_(lse_g[:, qs:qe]).exp_()  # [h_kv, b, g, qe]
        p2 = p.view(h_kv, b * g, qe)
        do_b = do_g[:, qs:qe].view(h_kv, b * g, d)
        dv_f[:, :qe].baddbmm_(p2.transpose(1, 2), do_b)
        dp = torch.bmm(do_b, vf[:, :qe].transpose(1, 2)).view(h_kv, b, g, qe)
        ds = dp.sub_(delta[:, qs:qe]).mul_(p).view(h_kv, b * g, qe)  # dS (scores were pre-scaled)
        torch.bmm(ds, kf[:, :qe], out=dq_g[:, qs:qe].view(h_kv, b * g, d))
        dk_f[:, :qe].baddbmm_(ds.transpose(1, 2), qg[:, qs:qe].view(h_kv, b * g, d))
    dq.view(h_kv, g, n, d).copy_(dq_g.mul_(scale).transpose(1, 2))
    dk.copy_(dk_f)  # qg carried the scale already
    dv.copy_(dv_f)
