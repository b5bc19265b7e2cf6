"""fp32 GEMMs on the CPU through oneDNN where PyTorch's default BLAS is the slower one.

PyTorch's x86 wheels run fp32 ``torch.mm`` / ``F.linear`` in MKL. On AMD CPUs MKL runs its generic
code path: on the 2-vCPU AMD EPYC (Zen 5, AVX-512) test VM, one thread, 83-106 GFLOP/s on the
SmolLM2 training shapes, while oneDNN (shipped in the same wheel, and what PyTorch already uses for
bf16 matmuls and for convolutions) reaches 160-240 GFLOP/s on them, in plain fp32 (no bf16 or TF32
rounding; ``benchmarks/bench_cpu_gemm.py`` measures both and their errors against fp64).

``cpu_gemm`` (a key of every recipe, :func:`set_cpu_gemm` in code):

* ``torch`` (default): ``torch.mm`` / ``F.linear`` as PyTorch dispatches them.
* ``onednn``: fp32 CPU GEMMs of at least :data:`MIN_MACS` multiply-adds go to oneDNN's matmul
  (``torch.ops.mkldnn._linear_pointwise``); everything else (other dtypes, other devices, tensor
  subclasses such as DTensor or NF4, autocast regions, small products) stays on ``torch``.

``onednn`` is opt-in because it is less accurate: both back ends accumulate in fp32 and are
deterministic for the same shapes and threads, but oneDNN's rounding error grows faster with the
reduction length (mean absolute error against fp64 1.4-2x MKL's on the SmolLM2 shapes; on the
whole 30-layer SmolLM2-135M forward the logits' RMS error was 1.76x that of HF transformers on
MKL), both far below bf16's. ``tests/test_cpu_gemm.py`` holds it to the worst-case fp32 summation
bound. A run keeps one back end from start to end, so a resumed run repeats the uninterrupted one
exactly.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

CPU_GEMM_CHOICES = ("torch", "onednn")
#: Products smaller than this (``m * k * n``) stay on ``torch.mm``: oneDNN's per-call cost loses
#: on tiny GEMMs (64 x 64 x 64: 15 us against MKL's 7 us on the test VM).
MIN_MACS = 1 << 21

_STATE: dict[str, str | None] = {"backend": None, "why": None}


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN ``x @ w.T (+ b)`` for a 2-D ``x`` ``[m, k]`` and ``w`` ``[n, k]`` (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _lp_add(x: torch.Tensor, acc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN ``acc + x @ w.T`` into a new tensor (the add is the GEMM's epilogue)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, acc, w, None, "add")


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN and its dense fp32 matmul op works here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.arange(12, dtype=torch.float32).view(3, 4)
        return bool(torch.equal(_lp(a, a), a @ a.t()))  # small integers: exact in any order
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def cpu_vendor() -> str:
    """The CPU vendor string on x86 Linux (``AuthenticAMD``, ``GenuineIntel``), else ``""``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_cpu_gemm(choice: str) -> tuple[str, str]:
    """``(backend, why)`` for a ``cpu_gemm`` choice: ``backend`` is ``torch`` or ``onednn``.

    Raises:
        ValueError: ``choice`` is not one of :data:`CPU_GEMM_CHOICES`.
        RuntimeError: ``onednn`` asked for where this PyTorch build has no usable oneDNN.
    """
    if choice not in CPU_GEMM_CHOICES:
        raise ValueError(f"cpu_gemm: {choice!r} is not one of {' | '.join(CPU_GEMM_CHOICES)}")
    if choice == "torch":
        return "torch", "asked for"
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no usable oneDNN matmul (torch.backends.mkldnn)")
    vendor = cpu_vendor()
    return "onednn", f"asked for; CPU vendor {vendor or 'not x86'}"


def set_cpu_gemm(choice: str) -> str:
    """Sets the fp32 CPU GEMM back end of this process; returns it with the reason, in words.

    Raises:
        ValueError, RuntimeError: see :func:`resolve_cpu_gemm`.
    """
    backend, why = resolve_cpu_gemm(choice)
    _STATE["backend"], _STATE["why"] = backend, why
    return f"{backend} ({why})"


def cpu_gemm_backend() -> str:
    """The back end in use: ``torch`` (the default) or ``onednn``."""
    if _STATE["backend"] is None:
        set_cpu_gemm("torch")
    return _STATE["backend"]  # type: ignore[return-value]


def _plain_fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (
        type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"
    )


def use_onednn(a: torch.Tensor, w: torch.Tensor, *more: torch.Tensor | None, macs: int) -> bool:
    """Whether a GEMM of ``macs`` multiply-adds on these tensors goes to oneDNN (see the module doc)."""
    if macs < MIN_MACS or cpu_gemm_backend() != "onednn" or torch.is_autocast_enabled("cpu"):
        return False
    return _plain_fp32_cpu(a) and _plain_fp32_cpu(w) and all(_plain_fp32_cpu(t) for t in more)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[m, k]`` and ``b`` ``[k, n]`` (any strides); no autograd.

    Returns:
        A new contiguous ``[m, n]`` tensor.
    """
    if use_onednn(a, b, macs=a.shape[0] * a.shape[1] * b.shape[1]):
        return _lp(a, b.t())  # [m, n]
    return torch.mm(a, b)


def mm_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` (``acc`` ``[m, n]``, ``a`` ``[m, k]``, ``b`` ``[k, n]``); no autograd.

    Returns:
        The sum: ``acc`` itself, updated in place, on the ``torch`` path; a new tensor on the oneDNN
        path (the add is the GEMM's epilogue there; ``acc`` is unchanged). Use the returned tensor.
    """
    if use_onednn(a, b, acc, macs=a.shape[0] * a.shape[1] * b.shape[1]) and acc.is_contiguous():
        return _lp_add(a, acc, b.t())  # [m, n]
    return acc.addmm_(a, b)


def linear_nograd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` without autograd (inside Functions, or under ``torch.no_grad``)."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    if use_onednn(x2, w, b, macs=x2.shape[0] * w.shape[0] * w.shape[1]):
        return _lp(x2, w, b).view(*x.shape[:-1], w.shape[0])  # [..., out]
    return F.linear(x, w, b)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):  # noqa: D102
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        ctx.save_for_backward(x2, w)
        ctx.has_bias = b is not None
        return _lp(x2, w, b).view(*x.shape[:-1], w.shape[0])  # [..., out]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x2, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # [N, out]
        grad_x = mm(g, w).view(*grad.shape[:-1], w.shape[1]) if need_x else None  # [..., in]
        grad_w = mm(g.t(), x2) if need_w else None  # [out, in]
        grad_b = g.sum(0) if need_b and ctx.has_bias else None  # [out]
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``: ``x`` ``[..., in]``, ``w`` ``[out, in]``, ``b`` ``[out]`` or None.

    On the oneDNN path (see :func:`use_onednn`) forward and backward GEMMs run in oneDNN; the
    autograd graph saves the same tensors ``F.linear`` saves (``x`` and ``w``).
    """
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if not use_onednn(x2, w, b, macs=x2.shape[0] * w.shape[0] * w.shape[1]):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        return _OneDNNLinear.apply(x, w, b)
    return linear_nograd(x, w, b)
