"""Memory-saving autograd Functions for the decoder's elementwise ops (the PyTorch CPU/GPU path).

Each Function computes the same forward as the eager module code (same operation order, so fp32
results agree to rounding) but saves fewer tensors for backward and writes its gradients
analytically:

* :func:`rms_norm` saves the input and the per-row ``rstd`` (``[..., 1]``) instead of the
  normalised activations; backward recomputes ``x * rstd``.
* :func:`swiglu` (``silu(gate) * up``) saves ``gate`` and ``up`` only (eager autograd also keeps
  ``silu(gate)``, one more ``[b, s, hidden]`` tensor per layer).
* :func:`apply_rope` (HF rotate-half layout) saves only ``cos``/``sin``: its backward is the
  inverse rotation (same kernel with ``-sin``).
* :func:`lora_linear` computes ``x W^T + b + scale * (x_d A^T) B^T`` with the scale and the add
  folded into one ``addmm_``; it saves ``x`` (shared with the caller), ``x_d`` when dropout made a
  copy, and the ``[N, rank]`` product ``x_d A^T``. A frozen base held compressed (QLoRA's NF4) is
  given as ``weight_fn``: called once in forward and once in backward, its result is used at once
  and never saved.
* :func:`frozen_linear` is ``x W^T`` for such a ``weight_fn`` alone (adapters off, DoRA's base).

Tensor subclasses (DTensor, NF4Tensor, ...) are not handled here; :func:`plain_tensors` lets the
modules fall back to their eager code for them. With grad disabled (``no_grad`` /
``inference_mode``: generation, evaluation) each wrapper runs its forward directly, without an
autograd node or a recompute recipe: same operations, less Python per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels import cpu_gemm
from tinytune.kernels.compiled_ops import compiled

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def plain_tensors(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is a plain ``torch.Tensor``/``nn.Parameter`` (or ``None``).

    DTensors, NF4 tensors and other subclasses return False so callers use their eager path.
    """
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (bf16/fp16 -> fp32; fp32 and fp64 unchanged, no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ============================================================================ RMSNorm


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * normalised x, rstd [..., 1])``: the forward shared by the Function and the no-grad path."""
    xf = _upcast(x)  # [..., d] fp32 (no copy when x is fp32; fp64 stays fp64)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    y = (xf * rstd).to(x.dtype)  # [..., d]
    if y.dtype == torch.promote_types(weight.dtype, x.dtype):
        return y.mul_(weight), rstd  # [..., d]; y is a fresh tensor, scale it in place
    return weight * y, rstd  # [..., d]


def _rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_weight)`` of :func:`_rms_norm_forward` (``None`` where not needed)."""
    xf = _upcast(x)
    xhat = xf * rstd  # [..., d] fp32
    grad_w = None
    if need_w:
        y = xhat.to(x.dtype)
        grad_w = (grad * y).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)  # [d]
    grad_x = None
    if need_x:
        gy = _upcast((grad * weight).to(x.dtype))  # [..., d] grad of the normalised value
        dot = (gy * xhat).mean(-1, keepdim=True)  # [..., 1]
        grad_x = (gy - xhat.mul_(dot)).mul_(rstd).to(x.dtype)  # [..., d]
    return grad_x, grad_w


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = compiled(_rms_norm_forward)(x, weight, eps)  # [..., d], [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_w = compiled(_rms_norm_backward)(grad, x, weight, rstd, need_x, need_w)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`` saving only ``x`` and ``rstd``.

    Args:
        x: ``[..., d]`` input.
        weight: ``[d]`` scale.
        eps: added to the mean square.

    Returns:
        ``[..., d]`` in ``promote_types(weight.dtype, x.dtype)``.
    """
    if not torch.is_grad_enabled():
        return compiled(_rms_norm_forward)(x, weight, eps)[0]
    return _RMSNormFn.apply(x, weight, eps)


# ============================================================================ SwiGLU


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).mul_(up) if gate.dtype == torch.promote_types(gate.dtype, up.dtype) else F.silu(gate) * up


def _swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool, need_up: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_gate, grad_up)`` of :func:`_swiglu_forward` (``None`` where not needed)."""
    grad_gate = grad_up = None
    if need_up:
        grad_up = F.silu(gate).mul_(grad).to(up.dtype)  # [..., h]
    if need_gate:
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate).to(gate.dtype)  # [..., h]
    return grad_gate, grad_up


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return compiled(_swiglu_forward)(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return compiled(_swiglu_backward)(grad, gate, up, need_gate, need_up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` saving only ``gate`` and ``up`` for backward.

    Args:
        gate: ``[..., hidden]`` output of the gate projection.
        up: ``[..., hidden]`` output of the up projection.

    Returns:
        ``[..., hidden]``.
    """
    if not torch.is_grad_enabled():
        return compiled(_swiglu_forward)(gate, up)
    return _SwiGLUFn.apply(gate, up)


# ============================================================================ RoPE


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``x * cos + rotate_half(x) * (sign * sin)`` in fp32, written half by half (no cat, no neg copy).

    ``cos``/``sin`` are the full ``[..., d]`` tables of the HF layout (both halves equal).
    """
    xf = _upcast(x)  # [b, h, s, d]
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    s1 = sin[..., :half]  # [b, 1, s, d/2]
    out = xf * cos  # [b, h, s, d] (same strides as x)
    out[..., :half].addcmul_(x2, s1, value=-sign)  # x1 c - sign * x2 s
    out[..., half:].addcmul_(x1, s1, value=sign)  # x2 c + sign * x1 s
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """:func:`_rotate` back in ``x``'s dtype."""
    return _rotate(x, cos, sin, sign).to(x.dtype)


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return compiled(_rope)(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its transpose is the rotation by the opposite angle.
        return compiled(_rope)(grad, cos, sin, -1.0).to(ctx.dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (HF rotate-half convention) saving only ``cos``/``sin`` for backward.

    Args:
        x: ``[b, h, s, d]`` queries or keys (any strides).
        cos: ``[b, 1, s, d]`` fp32 cosines (both halves equal, as from ``cos_sin``).
        sin: ``[b, 1, s, d]`` fp32 sines.

    Returns:
        ``[b, h, s, d]`` in the dtype of ``x``. Gradients flow to ``x`` only.
    """
    if not torch.is_grad_enabled():
        return compiled(_rope)(x, cos, sin, 1.0)
    return _RoPEFn.apply(x, cos.detach(), sin.detach())


# ============================================================================ LoRA


def _lora_forward(x, x_d, weight, bias, lora_a, lora_b, scale):
    """``(out [..., out], ax [N, r])``: the forward shared by the Function and the no-grad path."""
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    xd2 = x2 if x_d is None else x_d.reshape(-1, x_d.shape[-1])  # [N, in]
    out = cpu_gemm.linear_nograd(x2, weight, bias)  # [N, out]
    ax = cpu_gemm.thin_mm(xd2, lora_a.t())  # [N, r]
    out.addmm_(ax, lora_b.t(), alpha=scale)  # out += scale * ax @ B^T
    return out.view(*x.shape[:-1], out.shape[-1]), ax  # [..., out], [N, r]


class _LoRALinearFn(torch.autograd.Function):
    """The backward's rank-``r`` GEMMs with a long reduction (``g B`` over the layer's output width,
    ``g^T ax`` over the ``N`` tokens) are computed with ``r`` as the rows of the product
    (``B^T g^T``, ``ax^T g``) and used transposed: in MKL on one CPU thread 3.5-7x faster than with
    ``r`` as the columns at rank 8 (the same speed from rank 16 up), at 0.31-0.99x the rounding
    error (``benchmarks/bench_cpu_gemm.py``; ``benchmarks/RESULTS.md``). The forward's ``x A^T``
    keeps ``r`` as the columns: ``A x^T`` was 1.5-2.2x faster but rounded 1.12-1.14x worse at
    ``in = 576``.

    Under ``cpu_gemm: onednn_fast`` the four long-reduction rank-``r`` products run in oneDNN in one
    pass (:func:`cpu_gemm.thin_mm`). The products whose reduction is ``r`` (``out += ax B^T``,
    ``grad_x += g B A``) stay in-place ``addmm_``: they are bound by the ``[N, out]`` accumulator's
    memory traffic, and oneDNN's add epilogue was no faster."""

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scale, weight_fn):
        w = weight if weight_fn is None else weight_fn().to(x.dtype)  # [out, in], used at once
        out, ax = _lora_forward(x, x_d, w, bias, lora_a, lora_b, scale)
        ctx.save_for_backward(x, x_d, weight, lora_a, lora_b, ax)  # weight is None with weight_fn
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.weight_fn = weight_fn
        return out

    @staticmethod
    def backward(ctx, grad):
        x, x_d, weight, lora_a, lora_b, ax = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_xd, need_w, need_b, need_a, need_bb, _, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # [N, out]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        xd2 = x2 if x_d is None else x_d.reshape(-1, x_d.shape[-1])
        gb = cpu_gemm.thin_mm(lora_b.t(), g.t()).mul_(scale).t()  # [N, r] = scale * g B (column-major)
        grad_x = grad_xd = grad_w = grad_b = grad_a = grad_bb = None
        if need_x:
            w = weight if ctx.weight_fn is None else ctx.weight_fn().to(g.dtype)  # recomputed, not saved
            grad_x = cpu_gemm.mm(g, w)  # [N, in]
            if x_d is None:
                grad_x.addmm_(gb, lora_a)
            grad_x = grad_x.view(x.shape)
        if need_xd:
            grad_xd = cpu_gemm.mm(gb, lora_a).view(x_d.shape)
        if need_w:
            grad_w = cpu_gemm.mm(g.t(), x2)  # [out, in]
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)  # [out]
        if need_a:
            grad_a = cpu_gemm.thin_mm(gb.t(), xd2)  # [r, in]
        if need_bb:
            grad_bb = cpu_gemm.thin_mm(ax.t(), g).mul_(scale).t()  # [out, r] = scale * g^T ax (column-major)
        return grad_x, grad_xd, grad_w, grad_b, grad_a, grad_bb, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
    weight_fn: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * F.linear(F.linear(x_d, lora_a), lora_b)`` in one Function.

    Args:
        x: ``[..., in]`` input of the base projection.
        weight: ``[out, in]`` base weight (frozen or trainable), or ``None`` with ``weight_fn``.
        bias: ``[out]`` or ``None``.
        lora_a: ``[rank, in]``.
        lora_b: ``[out, rank]``.
        scale: ``alpha / rank``.
        x_dropped: adapter input after dropout (``None``: the adapter reads ``x``).
        weight_fn: instead of ``weight``, a zero-argument callable returning the frozen ``[out, in]``
            base weight (e.g. dequantizing NF4 into a scratch buffer). Called in forward and again
            in backward for ``grad_x``; the result is used at once and never saved or kept.

    Returns:
        ``[..., out]``. Saves ``x``, ``x_dropped`` and the ``[N, rank]`` product for backward.
        Under autocast (fp16 training, bf16 mixed precision) every input is cast to the autocast dtype first, as
        ``F.linear`` would be, and the Function runs with autocast off (its in-place GEMMs are not
        autocast ops and would meet mixed dtypes); gradients reach fp32 parameters through the casts.
    """
    if (weight is None) == (weight_fn is None):
        raise ValueError("lora_linear: pass exactly one of weight and weight_fn")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, x_dropped, weight, bias, lora_a, lora_b = (
            None if t is None else t.to(dt) for t in (x, x_dropped, weight, bias, lora_a, lora_b)
        )
        with torch.autocast(device_type, enabled=False):  # the call below takes the plain path
            return lora_linear(x, weight, bias, lora_a, lora_b, scale, x_dropped, weight_fn)
    if not torch.is_grad_enabled():
        w = weight if weight_fn is None else weight_fn().to(x.dtype)
        x_d = x_dropped
        return _lora_forward(x, x_d, w, bias, lora_a, lora_b, float(scale))[0]
    return _LoRALinearFn.apply(x, x_dropped, weight, bias, lora_a, lora_b, float(scale), weight_fn)


class _FrozenLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fn):
        ctx.weight_fn = weight_fn
        return cpu_gemm.linear_nograd(x, weight_fn().to(x.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight_fn().to(grad.dtype)  # [out, in]
        return cpu_gemm.mm(grad.reshape(-1, grad.shape[-1]), w).view(*grad.shape[:-1], w.shape[1]), None  # [..., in]


def frozen_linear(x: torch.Tensor, weight_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``x @ W^T`` for a frozen weight produced by ``weight_fn`` (see :func:`lora_linear`): nothing
    but the callable is kept for backward, which calls it again for ``grad_x``.

    Args:
        x: ``[..., in]``.
        weight_fn: zero-argument callable returning ``[out, in]``.

    Returns:
        ``[..., out]``.
    """
    if not torch.is_grad_enabled():
        return cpu_gemm.linear_nograd(x, weight_fn().to(x.dtype))
    return _FrozenLinearFn.apply(x, weight_fn)


# ============================================================================ recompute-on-unpack


class _Recomputed:
    """Lazily recomputes one activation in backward; shared by every saved view of it."""

    __slots__ = ("fn", "value")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.value = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn().contiguous()
        return self.value


def _outer_saved_tensor_hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except Exception:  # noqa: BLE001 - unknown torch internals: assume hooks are active (play safe)
        return True


class recompute_when_saved:
    """Context manager: ops run inside it save ``target`` (or views of it) as a recipe, not a tensor.

    Whatever an op saves for backward that lives in ``target``'s storage is replaced by a marker;
    backward calls ``recompute()`` once (under ``no_grad``) and hands out the same views of the
    result. Use it when ``target`` is cheap to recompute from tensors that are saved anyway (e.g.
    ``silu(gate) * up`` from the ``gate``/``up`` that :func:`swiglu` keeps), so the consumer's copy
    of the activation is not kept alive. It does nothing (plain saving) when ``target`` is not a
    contiguous plain tensor, when grad is off, or when other saved-tensor hooks are active
    (activation checkpointing, CPU offload): those own the saving then.

    Args:
        target: the activation whose saves should be replaced.
        recompute: zero-argument callable returning a tensor equal to ``target`` (same shape/dtype).
    """

    def __init__(self, target: torch.Tensor, recompute) -> None:
        self.active = (
            torch.is_grad_enabled()
            and plain_tensors(target)
            and target.is_contiguous()
            and target.storage_offset() == 0
            and not _outer_saved_tensor_hooks_active()
        )
        self.target = target
        self.recompute = recompute
        self._hooks = None

    def __enter__(self):
        if not self.active:
            return self
        target, holder = self.target, _Recomputed(self.recompute)
        ptr, dtype, device = target.untyped_storage().data_ptr(), target.dtype, target.device
        nbytes = target.untyped_storage().nbytes()

        def pack(t: torch.Tensor):
            if (
                type(t) in _PLAIN_TYPES
                and t.dtype == dtype
                and t.device == device
                and t.untyped_storage().data_ptr() == ptr
                and t.untyped_storage().nbytes() == nbytes
            ):
                return (holder, t.shape, t.stride(), t.storage_offset())
            return t

        def unpack(p):
            if isinstance(p, tuple):
                h, shape, stride, offset = p
                return h.get().as_strided(shape, stride, offset)
            return p

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self.target = None


_RECIPE_ATTR = "_tinytune_recompute"


def attach_recompute(out: torch.Tensor, recompute) -> torch.Tensor:
    """Tags ``out`` with a zero-argument callable that recomputes it (see :func:`saved_as_recompute`).

    Without grad nothing is saved for backward, so nothing is tagged."""
    if torch.is_grad_enabled():
        setattr(out, _RECIPE_ATTR, recompute)
    return out


def saved_as_recompute(x: torch.Tensor):
    """Context for the consumers of ``x``: if ``x`` carries a recipe (:func:`attach_recompute`),
    their saves of ``x`` become that recipe (:class:`recompute_when_saved`); otherwise a no-op."""
    recipe = getattr(x, _RECIPE_ATTR, None)
    if recipe is None:
        return contextlib.nullcontext()
    return recompute_when_saved(x, recipe)
