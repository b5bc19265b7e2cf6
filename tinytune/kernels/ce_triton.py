"""Triton softmax/cross-entropy row step used by :mod:`tinytune.kernels.linear_ce` on CUDA.

One program handles one token row of a ``[c, V]`` fp32 logits chunk: an online logsumexp over vocab
tiles, then a second sweep that overwrites the logits with ``(softmax - onehot(label)) * scale``
(fp32, so the target-class gradient ``p - 1`` is exact to fp32) and writes the row loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinytune.kernels._runtime import interpreting


@triton.jit
def _ce_row_kernel(
    logits_ptr,  # [c, V] fp32, overwritten with the gradient
    labels_ptr,  # [c] int64
    loss_ptr,  # [c] fp32 out
    scale_ptr,  # [] fp32 gradient scale (1 / normaliser); read only if HAS_SCALE
    stride_row,
    V,
    ignore_index,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    in_range = valid & (label >= 0) & (label < V)
    target = tl.load(base + label, mask=in_range, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    scale = tl.where(valid, 1.0, 0.0)
    if HAS_SCALE:
        scale = scale * tl.load(scale_ptr).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(base + cols, g * scale, mask=mask)


def triton_row_step(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of :func:`tinytune.kernels.linear_ce.torch_row_step` (same contract).

    Args:
        logits: fp32 ``[c, V]`` chunk logits (row-contiguous); overwritten with the scaled gradient.
        labels: ``[c]`` int64 targets.
        ignore_index: masked label value.
        grad_scale: optional fp32 scalar tensor multiplied into the gradient.

    Returns:
        fp32 ``[c]`` per-row loss (0 for ignored rows).
    """
    c, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    block = 128 if interpreting() else min(4096, triton.next_power_of_2(vocab))
    scale = grad_scale if grad_scale is not None else loss  # dummy pointer when unused
    _ce_row_kernel[(c,)](
        logits,
        labels.contiguous(),
        loss,
        scale,
        logits.stride(0),
        vocab,
        ignore_index,
        HAS_SCALE=grad_scale is not None,
        BLOCK_V=block,
        num_warps=1 if interpreting() else 8,
    )
    return loss
