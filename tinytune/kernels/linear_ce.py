"""Fused linear + cross-entropy that never materializes the full ``[tokens, vocab]`` logits.

Design (shared by the PyTorch and the Triton back ends):

* Tokens are processed in chunks of ``chunk_size`` rows. For one chunk we compute the logits
  ``h_c @ W.T`` (``[c, V]``, matmul in the input dtype, then fp32), turn that buffer *in place* into
  ``softmax - onehot(label)`` (fp32, so the target-class gradient ``p - 1`` keeps full precision) and
  the per-row loss, then immediately use it for ``grad_hidden[c] = g @ W`` and
  ``grad_weight += g.T @ h_c`` (the weight gradient accumulates in an fp32 buffer).
* Gradients are therefore computed **in the forward pass** and stored; backward only scales them by
  the incoming scalar gradient. Why not recompute in backward: recomputation needs the logits matmul
  twice (4 matmuls per chunk instead of 3, ~33% more FLOPs), and the loss is always a scalar consumed
  directly by ``backward()`` in training, so the stored gradients (``[N, d]`` in the input dtype plus
  the fp32 ``[V, d]`` accumulator) live only from the loss forward to the start of backward. When no
  gradient is needed (``torch.no_grad()`` / eval, frozen inputs) nothing is stored.
* Only the per-chunk "softmax + loss + gradient" step differs between back ends: a Triton kernel on
  CUDA (one program per row, online logsumexp over vocab tiles), PyTorch ops elsewhere.

On CUDA with bf16/fp16 inputs the matmuls that feed fp32 buffers write fp32 directly (``out_dtype``:
fp32 accumulation inside cuBLAS): the logits come out of the GEMM in fp32 and ``g.T @ h_c`` is added
to the fp32 weight-gradient accumulator in the GEMM's epilogue (``beta = 1``), with no ``[V, d]``
temporaries. Chunks are larger there (1 GiB budget): each chunk reads and writes the ``[V, d]`` fp32
accumulator once, so few large chunks keep that traffic small next to the matmuls.

Memory: per chunk about ``c * V * (4 + 2 * elem_size)`` bytes (the default chunk size is derived from
a budget, ``TINYTUNE_CE_CHUNK_BYTES``, default 256 MiB, 1 GiB on CUDA; on CPU at most 256 rows unless
the budget is set), plus the gradients: ``[N, d]`` in
the input dtype and the fp32 ``[V, d]`` weight-gradient accumulator (for a bf16 weight that is 2x the
weight's size on top of the final bf16 gradient; the price of fp32 accumulation without recomputing
the logits).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from tinytune.kernels import cpu_gemm
from tinytune.kernels._runtime import autocast_dtype, triton_usable

_DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
_CUDA_CHUNK_BYTES = 1024 * 1024 * 1024
# CPU: more rows per chunk than this buy no speed (the chunk's GEMMs already run at the back end's
# rate from here on; 448 vs 256 rows: 1-5% of the CE's time) and only grow the [chunk, V] scratch
# buffers, which are live at the step's memory peak (the end of the forward).
CPU_MAX_CHUNK_ROWS = 256
_OUT_DTYPE_STATE: dict[str, bool] = {}
_CPU_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _fp32_gemm_ok(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.mm/addmm(..., out_dtype=torch.float32)`` works here for ``dtype`` inputs,
    accumulating in place (``out`` = the added matrix). Checked once per device and dtype on a small
    case against an fp32 reference."""
    key = f"{device}/{dtype}"
    if key not in _OUT_DTYPE_STATE:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(64, 48, device=device, generator=g).to(dtype)
            b = torch.randn(48, 32, device=device, generator=g).to(dtype)
            acc = torch.randn(64, 32, device=device, generator=g)
            want = acc + a.float() @ b.float()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            mm = torch.mm(a, b, out_dtype=torch.float32)
            ok = bool(torch.allclose(acc, want, atol=1e-3)) and mm.dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):  # older torch, or a backend without it
            ok = False
        _OUT_DTYPE_STATE[key] = ok
    return _OUT_DTYPE_STATE[key]


# (logits fp32 [c, V] (overwritten with the gradient), labels [c] int64, ignore_index,
#  grad_scale fp32 [] | None) -> loss per row fp32 [c]
RowStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def default_chunk_size(
    num_tokens: int,
    vocab: int,
    dtype: torch.dtype,
    budget_bytes: int | None = None,
    cuda: bool = False,
    cpu: bool = False,
) -> int:
    """Chunk size (tokens per chunk) that keeps the per-chunk logits/gradient buffers within a budget.

    Args:
        num_tokens: total tokens N.
        vocab: vocabulary size V.
        dtype: dtype of the hidden states (native logits are produced in it).
        budget_bytes: memory budget per chunk; default from ``TINYTUNE_CE_CHUNK_BYTES``, else 256 MiB
            (1 GiB when ``cuda``).
        cuda: the chunks run on a CUDA device (larger default budget).
        cpu: the chunks run on the CPU: without an explicit budget (argument or
            ``TINYTUNE_CE_CHUNK_BYTES``) at most :data:`CPU_MAX_CHUNK_ROWS` tokens.

    Returns:
        A chunk size in ``[1, N]``; a multiple of 8 when larger than 8.
    """
    explicit = budget_bytes is not None or "TINYTUNE_CE_CHUNK_BYTES" in os.environ
    if budget_bytes is None:
        default = _CUDA_CHUNK_BYTES if cuda else _DEFAULT_CHUNK_BYTES
        budget_bytes = int(os.environ.get("TINYTUNE_CE_CHUNK_BYTES", default))
    elem = torch.empty((), dtype=dtype).element_size()
    per_row = vocab * (4 + 2 * elem)  # fp32 logits/grad buffer + native logits + native grad copy
    chunk = max(1, budget_bytes // per_row)
    if cpu and not explicit:
        chunk = min(chunk, CPU_MAX_CHUNK_ROWS)
    if chunk > 8:
        chunk -= chunk % 8
    return int(max(1, min(chunk, num_tokens)))


def cpu_workspace(name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` view of a CPU scratch buffer kept between calls (grown when too small).

    A buffer of ``[chunk, V]`` size (hundreds of MiB) is above glibc's mmap threshold: allocated
    fresh, it is mapped and page-faulted in on every call and unmapped at the end. On the 2-core VMs
    this project measures on, faulting in a fresh 134 MB fp32 buffer cost 300 ms against 6-8 ms for
    a copy into an already-touched one, i.e. 0.3-0.6 s of system time per training step. The
    buffers are only scratch inside one forward call (nothing returned or saved aliases them), so
    one per ``(name, dtype)`` serves every call; :func:`release_cpu_workspace` frees them.

    Args:
        name: which scratch buffer (calls that use two at once pass different names).
        shape: the ``[rows, cols]`` view wanted.
        dtype: its dtype.

    Returns:
        An uninitialised contiguous ``[rows, cols]`` tensor.
    """
    numel = shape[0] * shape[1]
    buf = _CPU_WORKSPACE.get((name, dtype))
    if buf is None or buf.numel() < numel:
        _CPU_WORKSPACE.pop((name, dtype), None)  # free the old one before allocating the larger one
        buf = torch.empty(numel, dtype=dtype)
        _CPU_WORKSPACE[(name, dtype)] = buf
    return buf[:numel].view(shape)


def release_cpu_workspace() -> None:
    """Frees the CPU scratch buffers of :func:`cpu_workspace` (e.g. before generation)."""
    _CPU_WORKSPACE.clear()


def torch_row_step(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch softmax/CE step on one chunk; turns ``logits`` into ``dloss/dlogits`` in place.

    Args:
        logits: fp32 ``[c, V]`` logits; overwritten with ``(softmax - onehot) * valid * grad_scale``.
        labels: ``[c]`` int64 targets, ``ignore_index`` where masked.
        ignore_index: label value that contributes no loss and no gradient.
        grad_scale: optional fp32 scalar tensor multiplied into the gradient (1 / normaliser).

    Returns:
        fp32 ``[c]`` per-row loss (0 for ignored rows).
    """
    valid = labels != ignore_index  # [c]
    safe = torch.where(valid, labels, torch.zeros_like(labels))  # [c]
    target = logits.gather(1, safe[:, None]).squeeze(1)  # [c]
    # One exp pass and no [c, V] temporary (torch.logsumexp allocates one and a second exp would
    # follow): shift by the row max, exponentiate in place, normalise while scaling.
    row_max = logits.amax(dim=-1, keepdim=True)  # [c, 1]
    logits.sub_(row_max).exp_()  # [c, V] unnormalised probabilities
    denom = logits.sum(dim=-1, keepdim=True)  # [c, 1]
    lse = (row_max + denom.log()).squeeze(1)  # [c]
    loss = torch.where(valid, lse - target, torch.zeros_like(lse))  # [c]
    row_scale = valid.to(logits.dtype)  # [c]
    if grad_scale is not None:
        row_scale = row_scale * grad_scale
    logits.mul_(row_scale[:, None] / denom)  # softmax * scale
    logits.scatter_add_(1, safe[:, None], -row_scale[:, None])  # - onehot * scale
    return loss


class _LinearCE(torch.autograd.Function):
    """CE summed over non-ignored tokens (divided by ``denom`` if given); grads computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denom, ignore_index, chunk_size, row_step):  # noqa: D102
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = None  # CPU: drop ignored rows up front (no logits, loss or gradient for them)
        if hidden.device.type == "cpu":  # (on accelerators counting them would force a host sync)
            valid = labels != ignore_index  # [N]
            if int(valid.sum()) < labels.shape[0]:
                rows = valid.nonzero().squeeze(1)  # [N_valid]
                hidden_all, hidden, labels = hidden, hidden.index_select(0, rows), labels.index_select(0, rows)
        n, _ = hidden.shape
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, d] (only the kept rows)
        # fp32 on the CPU with cpu_gemm's oneDNN path: the first chunk's weight gradient starts the
        # fp32 accumulator, later chunks add theirs in the GEMM's epilogue (cpu_gemm.mm_add).
        dnn = hidden.dtype == torch.float32 and cpu_gemm.use_onednn(hidden, weight, macs=cpu_gemm.MIN_MACS)
        if need_w and not dnn:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, d]
        else:
            grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The normaliser scales the fp32 gradient before any cast, so low-precision grads round once.
        inv = None if denom is None else 1.0 / denom.to(device=hidden.device, dtype=torch.float32)
        # half inputs on CUDA: GEMMs write fp32 directly (see the module docstring)
        half = hidden.dtype in (torch.bfloat16, torch.float16)
        f32_gemm = hidden.is_cuda and half and _fp32_gemm_ok(hidden.device, hidden.dtype)
        # CPU: one fp32 (and one native) [chunk, V] buffer, kept between calls (see cpu_workspace).
        reuse = hidden.device.type == "cpu" and (half or hidden.dtype == torch.float32)  # fp64: as before
        if reuse:
            rows_c = min(chunk_size, n)
            f32_buf = cpu_workspace("f32", (rows_c, weight.shape[0]), torch.float32)  # [c, V]
            native_buf = cpu_workspace("native", (rows_c, weight.shape[0]), hidden.dtype) if half else None  # [c, V]
        # oneDNN: each chunk's logits GEMM copies the weight's k-blocks one column tile at a time
        # (cpu_gemm._tiled). Keeping the copies for all chunks saved 0-5% of the CE's time but held a
        # whole copy of the [V, d] weight at the step's memory peak (113 MB for SmolLM2).
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h_c = hidden[start:end]  # [c, d]
            if f32_gemm:
                logits = torch.mm(h_c, weight.t(), out_dtype=torch.float32)  # [c, V] fp32
            elif reuse and half:
                native = torch.mm(h_c, weight.t(), out=native_buf[: end - start])  # [c, V] bf16/fp16
                logits = f32_buf[: end - start].copy_(native)  # [c, V] fp32
            elif reuse:  # fp32 (oneDNN or torch.mm) into the kept buffer
                logits = cpu_gemm.mm(h_c, weight.t(), out=f32_buf[: end - start])  # [c, V] fp32
            else:
                logits = (h_c @ weight.t()).float()  # [c, V] fp32
            total += row_step(logits, labels[start:end], ignore_index, inv).sum()
            if not (need_h or need_w):
                continue
            if hidden.dtype == torch.float32:
                g = logits  # [c, V]
            elif reuse:
                g = native.copy_(logits)  # [c, V] the gradient, rounded once to the native dtype
            else:
                g = logits.to(hidden.dtype)  # [c, V]
            del logits
            if need_h:
                cpu_gemm.mm(g, weight, out=grad_h[start:end])  # [c, d]
            if need_w:
                if dnn:
                    grad_w = cpu_gemm.mm(g.t(), h_c) if grad_w is None else cpu_gemm.mm_add(grad_w, g.t(), h_c)
                elif g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h_c)
                elif f32_gemm:
                    torch.addmm(grad_w, g.t(), h_c, out_dtype=torch.float32, out=grad_w)  # [V, d] += fp32
                elif reuse:  # CPU bf16/fp16: the [V, d] product in a kept scratch buffer, added in fp32
                    gw = torch.mm(g.t(), h_c, out=cpu_workspace("grad_w", tuple(weight.shape), g.dtype))  # [V, d]
                    grad_w += cpu_workspace("grad_w32", tuple(weight.shape), torch.float32).copy_(gw)  # [V, d]
                else:
                    grad_w += (g.t() @ h_c).float()
        if need_w and grad_w is None:  # oneDNN path with no row left to train on
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, d]
        if rows is not None and grad_h is not None:
            grad_h = torch.zeros_like(hidden_all).index_copy_(0, rows, grad_h)  # [N, d], 0 on ignored rows
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total if inv is None else total * inv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        # In place: no second [V, d] buffer. A second backward through the same graph would unpack
        # the modified tensors and fail autograd's version check instead of returning wrong grads.
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h.mul_(grad_out.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            "linear_cross_entropy: expected hidden [N, d] (or [b, s, d]) and weight [V, d], got "
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden dim {hidden.shape[1]} does not match weight dim {weight.shape[1]} "
            "(weight must be [vocab, dim], e.g. model.output_weight)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}; "
            "cast one of them (e.g. hidden.to(weight.dtype))"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: labels shape {tuple(labels.shape)} does not match the token count "
            f"{hidden.shape[0]} of hidden"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    num_tokens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the full logits tensor.

    Uses a Triton softmax/CE kernel on CUDA and PyTorch ops elsewhere (CPU, NPU); both process the
    tokens in chunks and compute the gradients during the forward pass (see the module docstring).

    Args:
        hidden: ``[N, d]`` (or ``[b, s, d]``, flattened) final hidden states, fp32/bf16/fp16.
        weight: ``[V, d]`` output projection (``model.output_weight``).
        labels: ``[N]`` (or ``[b, s]``) integer targets, already shifted; ``ignore_index`` = masked.
        ignore_index: label value excluded from loss and normaliser.
        reduction: ``"sum"`` (summed loss) or ``"mean"`` (divided by the normaliser).
        num_tokens: optional scalar tensor used as the normaliser for ``reduction="mean"`` (e.g. the
            label-token count of the whole accumulation window); no host synchronisation happens.
            Default: the number of non-ignored labels here (clamped to >= 1, so an all-ignored batch
            gives 0, not NaN).
        chunk_size: tokens per chunk; default from a memory budget (:func:`default_chunk_size`).

    Returns:
        fp32 scalar loss. Under ``torch.autocast`` ``hidden`` and ``weight`` are cast to the
        autocast dtype first (the matmuls in it, the softmax and loss in fp32).

    Example:
        >>> hidden = model(tokens, return_hidden=True)            # [b, s, d]
        >>> loss = linear_cross_entropy(hidden, model.output_weight, labels, reduction="mean")
    """
    amp = autocast_dtype(hidden.device.type)
    if amp is not None:
        # Mixed precision: the GEMMs in the autocast dtype (as autocast does for a matmul), the
        # softmax/CE and the weight-gradient accumulation in fp32 as for bf16 inputs; the casts are
        # autograd ops, so an fp32 weight gets an fp32 gradient.
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_cross_entropy(
                hidden.to(amp),
                weight.to(amp),
                labels,
                ignore_index=ignore_index,
                reduction=reduction,
                num_tokens=num_tokens,
                chunk_size=chunk_size,
            )
    if hidden.dim() == 3:
        if labels.dim() != 2 or labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"linear_cross_entropy: hidden {tuple(hidden.shape)} is [b, s, d], so labels must be [b, s]; "
                f"got {tuple(labels.shape)}"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
    _check_inputs(hidden, weight, labels, reduction)
    if num_tokens is not None and reduction != "mean":
        raise ValueError(
            "linear_cross_entropy: num_tokens is the normaliser of reduction='mean'; pass reduction='mean' "
            "(or divide the 'sum' result yourself)"
        )
    labels = labels.long()
    n, vocab = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, hidden.dtype, cuda=hidden.is_cuda, cpu=hidden.device.type == "cpu")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if hidden.device.type == "cpu":  # cheap here; on accelerators this would force a host sync
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"linear_cross_entropy: label {int(labels[idx])} at token {idx} is outside [0, {vocab}) and is "
                f"not ignore_index={ignore_index}; check the tokenizer/vocab size of the dataset"
            )
    row_step = torch_row_step
    if hidden.is_cuda and triton_usable(hidden, weight):
        from tinytune.kernels.ce_triton import triton_row_step  # noqa: PLC0415 (optional: triton kernels)

        row_step = triton_row_step
    return _linear_ce(hidden, weight, labels, ignore_index, reduction, num_tokens, chunk_size, row_step)


def _linear_ce(hidden, weight, labels, ignore_index, reduction, num_tokens, chunk_size, row_step):
    """Validated entry with an explicit row step (tests use it to run the Triton step on CPU)."""
    denom = None
    if reduction == "mean":
        denom = num_tokens if num_tokens is not None else (labels != ignore_index).sum().clamp(min=1)
        denom = torch.as_tensor(denom).detach()
    return _LinearCE.apply(hidden, weight, labels, denom, ignore_index, chunk_size, row_step)
