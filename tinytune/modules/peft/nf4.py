"""NF4 (4-bit NormalFloat) storage for frozen QLoRA base weights, backed by torchao.

torchao is imported lazily: its import is slow and only QLoRA needs it.
"""

from __future__ import annotations

import logging
import threading

import torch

_SCALER_BLOCK_CHOICES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_BLOCK_CHOICES = (64, 32, 16)


def _torchao_nf4():
    """Returns torchao's ``(NF4Tensor, to_nf4, linear_nf4)``, with a clear error if missing."""
    # torchao logs failures to load optional CUDA extensions on CPU machines; they are harmless here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (  # noqa: PLC0415 (optional: torchao layout by version); torchao >= 0.13
            NF4Tensor,
            linear_nf4,
            to_nf4,
        )
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4  # noqa: PLC0415 (optional: older torchao); older torchao
        except ImportError as e:  # pragma: no cover - depends on the installed torchao
            raise ImportError(
                "QLoRA (quantize_base=True) needs torchao with NF4 support: pip install 'torchao>=0.10'"
            ) from e
    return NF4Tensor, to_nf4, linear_nf4


def pick_nf4_block_sizes(shape: torch.Size) -> tuple[int, int]:
    """Chooses NF4 ``(block_size, scaler_block_size)`` that divide the weight's sizes.

    torchao needs ``numel % block_size == 0`` and ``(numel // block_size) % scaler_block_size == 0``.
    The standard choice is (64, 256); smaller values are used for small (test) weights.

    Args:
        shape: weight shape, e.g. ``[out_dim, in_dim]``.

    Returns:
        ``(block_size, scaler_block_size)``.

    Raises:
        ValueError: if no supported block size divides the number of elements.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    for block in _BLOCK_CHOICES:
        if numel % block == 0:
            n_blocks = numel // block
            for scaler in _SCALER_BLOCK_CHOICES:
                if n_blocks % scaler == 0:
                    return block, scaler
    raise ValueError(
        f"Cannot quantize a weight of shape {tuple(shape)} to NF4: its {numel} elements are not "
        f"divisible by any block size in {_BLOCK_CHOICES}. Leave this module out of the LoRA "
        "modules or use quantize_base=False."
    )


def is_nf4(t: torch.Tensor) -> bool:
    """True if ``t`` is a torchao NF4 tensor (without importing torchao when not loaded)."""
    return type(t).__name__ == "NF4Tensor"


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantizes a 2-D weight to a torchao ``NF4Tensor`` with block sizes that fit its shape."""
    _, _to_nf4, _ = _torchao_nf4()
    block, scaler = pick_nf4_block_sizes(weight.shape)
    return _to_nf4(weight.detach().contiguous(), block_size=block, scaler_block_size=scaler)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """Returns a plain tensor: NF4 weights are dequantized to their original dtype."""
    if is_nf4(weight):
        return weight.get_original_weight()
    return weight


class _Scratch(threading.local):
    """Per-thread reusable buffers of :func:`dequantize_nf4` (one set per size, dtype and device)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.luts: dict[tuple, torch.Tensor] = {}


_SCRATCH = _Scratch()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (name, numel, dtype, device)
    buf = _SCRATCH.buffers.get(key)
    if buf is None:
        # a normal tensor even when first made under inference_mode (generation), so that a later
        # training forward may write into it (inference tensors refuse in-place updates outside it)
        with torch.inference_mode(False):
            buf = _SCRATCH.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _pair_lut(nf4: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 2]``: the two NF4 code values packed in each byte (high nibble first)."""
    key = (nf4.data_ptr(), dtype, nf4.device)
    lut = _SCRATCH.luts.get(key)
    if lut is None:
        with torch.inference_mode(False):  # usable in and outside inference_mode, as the scratch buffers
            codes = torch.arange(256, device=nf4.device)
            lut = _SCRATCH.luts[key] = torch.stack([nf4[codes >> 4], nf4[codes & 15]], dim=-1).to(dtype)
    return lut


def dequantize_nf4(weight: torch.Tensor, reuse: bool = False) -> torch.Tensor:
    """Dequantizes a torchao ``NF4Tensor``: the same values as ``weight.get_original_weight()``.

    One table lookup per byte (both nibbles at once) and one multiply by the block scalers,
    instead of torchao's two int64 index tensors, two lookups, two multiplies and a stack.

    Args:
        weight: an ``NF4Tensor`` ``[out, in]``.
        reuse: write into a per-thread scratch buffer kept for this size and dtype instead of a new
            tensor. The result is then overwritten by the next ``reuse=True`` call of the same size:
            use it at once (one GEMM), never keep it.

    Returns:
        ``[out, in]`` plain tensor in the weight's dtype.
    """
    dtype, device, numel = weight.dtype, weight.device, weight.numel()
    data = weight.quantized_data  # [numel / 2] uint8, two codes per byte
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    lut = _pair_lut(weight.nf4, dtype)  # [256, 2]
    if reuse:
        idx = _scratch("idx", data.numel(), torch.int32, device)
        idx.copy_(data)
        vals = _scratch("vals", numel, dtype, device).view(-1, 2)
        torch.index_select(lut, 0, idx, out=vals)  # [numel / 2, 2]
        out = _scratch("out", numel, dtype, device)
    else:
        vals = lut.index_select(0, data.int())  # [numel / 2, 2]
        out = torch.empty(numel, dtype=dtype, device=device)
    blocks = vals.view(weight.n_blocks, weight.block_size)  # [n_blocks, block]
    torch.mul(blocks, scalers[:, None], out=out.view(weight.n_blocks, weight.block_size))
    return out.view(weight.shape)


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(weight).T`` without storing a full-precision copy for backward."""
    _, _, _linear_nf4 = _torchao_nf4()
    return _linear_nf4(x, weight)
