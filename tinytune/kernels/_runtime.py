"""Runtime switches shared by the kernels: Triton availability and interpreter mode."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional (no wheel on some platforms); the PyTorch paths never need it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``).

    The switch must be set before kernels are decorated, i.e. before tinytune.kernels is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors (CUDA tensors, or CPU under the interpreter)."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes matmuls in on ``device_type`` right now (None: autocast off).

    The fused autograd Functions cast their floating inputs to it and run with autocast off, so a
    Function sees one dtype (autocast would cast some of its matmuls and not its in-place ones).
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
