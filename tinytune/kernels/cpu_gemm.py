"""fp32 GEMMs on the CPU through oneDNN where PyTorch's default BLAS is the slower one.

PyTorch's x86 wheels run fp32 ``torch.mm`` / ``F.linear`` in MKL. On AMD CPUs MKL runs its generic
code path: on the 2-vCPU AMD EPYC (Zen 5, AVX-512) test VM, one thread, 97-104 GFLOP/s on the
SmolLM2 training shapes, while oneDNN (shipped in the same wheel, and what PyTorch already uses for
bf16 matmuls and for convolutions) reaches 197-238 GFLOP/s on them in plain fp32 (no bf16 or TF32
rounding; ``benchmarks/bench_cpu_gemm.py`` measures all back ends and their errors against fp64).

``cpu_gemm`` (a key of every recipe, :func:`set_cpu_gemm` in code):

* ``auto`` (the recipes' default): ``onednn`` on AMD x86 CPUs with a usable oneDNN, else ``torch``.
* ``torch`` (what a process that never sets one gets): ``torch.mm`` / ``F.linear`` as PyTorch
  dispatches them.
* ``onednn``: fp32 CPU GEMMs of at least :data:`MIN_MACS` multiply-adds and :data:`MIN_ROWS` rows
  go to oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``), with the reduction summed in
  MKL's ``k``-blocks (:func:`_k_bounds`): the same rounding as ``torch.mm`` (bitwise equal products
  on the test VM) at 1.4-1.75x its speed there. Everything else (other dtypes and devices, tensor
  subclasses such as DTensor or NF4, autocast regions, small products, few rows) stays on
  ``torch``. Large ``k``-blocked outputs are computed in cache-sized tiles (:data:`TILED_FROM`).
* ``onednn_fast``: the same, with each product in one pass over ``k``: 1.9-2.3x MKL's speed on the
  test VM, at 1.4-2x its rounding error (one pass accumulates longer sums; on the whole 30-layer
  SmolLM2-135M forward the logits' RMS error against fp64 was 1.76x that of HF transformers on MKL),
  both far below bf16's. LoRA's rank-``r`` adapter products with a long reduction also run in
  oneDNN here (:func:`thin_mm`; under ``onednn`` they stay on ``torch.mm``).

``tests/test_cpu_gemm.py`` holds every variant to the worst-case fp32 summation bound and
``onednn``'s mean error to ``torch.mm``'s. A run keeps one back end from start to end, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

CPU_GEMM_CHOICES = ("auto", "torch", "onednn", "onednn_fast")
#: Products smaller than this (``m * k * n``) stay on ``torch.mm``: oneDNN's per-call cost loses
#: on tiny GEMMs (64 x 64 x 64: 15 us against MKL's 7 us on the test VM).
MIN_MACS = 1 << 21
#: ... and so do products with fewer rows than this on the left (decoding, short prompts): the
#: ``k``-block copies of the weight cost more than the GEMM there (``m = 64``: about MKL's speed).
MIN_ROWS = 128

_STATE: dict[str, str | None] = {"backend": None, "why": None}


#: oneDNN sums a whole reduction in one pass, so its rounding error grows with ``k`` faster than
#: MKL's, which works in blocks of ``k``. ``onednn`` computes a product with a reduction longer than
#: this as a sum of ``k``-blocks, each block's partial product added in the next GEMM's epilogue, in
#: the blocks MKL uses (see :func:`_k_bounds`).
K_BLOCK = 192
#: Each ``k``-block re-reads and rewrites its output. A ``k``-blocked output larger than this (32 MiB
#: of fp32, the test VM's L3) is computed in tiles of :data:`TILE_OUT` elements, each tile through
#: all its ``k``-blocks before the next, so the partial sums stay in cache: the fused CE's
#: ``[chunk, V]`` logits and ``[V, d]`` weight gradient (untiled 0.9-0.96x MKL's speed on the test
#: VM, tiled 1.5-2x). Smaller outputs (the projections) measured no faster tiled.
TILED_FROM = 1 << 23
TILE_OUT = 1 << 18


def _k_bounds(k: int) -> list[tuple[int, int]]:
    """The ``k``-blocks summed one after the other: one block up to :data:`K_BLOCK`, two halves up to
    twice that, blocks of :data:`K_BLOCK` (and a shorter last one) beyond.

    These are the blocks of PyTorch's MKL on the AMD test VM: with them oneDNN's fp32 products were
    bitwise equal to ``torch.mm``'s on every shape of a SmolLM2 training step and on a sweep of
    16-1624 rows, ``k`` 64-2048 (odd ``k`` between 193 and 383 excepted) and 64-1536 columns, one
    and two threads (``tests/test_cpu_gemm.py`` checks the error bound, not the bits).
    """
    if _STATE["backend"] == "onednn_fast" or k <= K_BLOCK:
        return [(0, k)]
    if k <= 2 * K_BLOCK:
        half = (k + 1) // 2
        return [(0, half), (half, k)]
    return [(j, min(j + K_BLOCK, k)) for j in range(0, k, K_BLOCK)]


def _w_block(w: torch.Tensor, j: int, e: int) -> torch.Tensor:
    """Columns ``j:e`` of ``w`` in a layout oneDNN runs fast (row- or column-major, else a copy).

    A column block of a row-major weight is strided: it is copied (oneDNN's strided path is its slow
    reference kernel), once per call, or once per weight version inside :func:`reuse_weight_blocks`.
    """
    blk = w[:, j:e]  # [n, e - j]
    if blk.is_contiguous() or blk.t().is_contiguous():
        return blk
    cache = _BLOCKS.get("cache")
    if cache is None:
        return blk.contiguous()
    key = (w.data_ptr(), w._version, tuple(w.shape), w.stride(), j, e)
    if key not in cache:
        cache[key] = blk.contiguous()
    return cache[key]


_BLOCKS: dict[str, dict | None] = {"cache": None}


@contextlib.contextmanager
def reuse_weight_blocks():
    """Inside this block the ``k``-block copies of a weight are made once and reused by every GEMM
    on the same weight (the row tiles of one column tile in :func:`_tiled`). They are dropped on exit
    (the outermost block's); an in-place change of the weight makes new ones."""
    outer = _BLOCKS["cache"]
    _BLOCKS["cache"] = {} if outer is None else outer
    try:
        yield
    finally:
        _BLOCKS["cache"] = outer


def one_pass(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN ``x @ w.T (+ b)`` in one pass over ``k`` (``x`` ``[m, k]``, ``w`` ``[n, k]`` row- or
    column-major): the fastest fp32 GEMM of the process on AMD CPUs (the benchmarks' peak)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # [m, n]


def _tiles(m: int, n: int) -> tuple[int, int]:
    """``(rows, cols)`` of the output tiles of a ``k``-blocked ``[m, n]`` product: one tile up to
    :data:`TILED_FROM` elements; past it tiles of :data:`TILE_OUT`, whole rows where 64 of them fit,
    else column tiles (multiples of 16) of all ``m`` rows."""
    if m * n <= TILED_FROM:
        return m, n
    if 64 * n <= TILE_OUT:
        return TILE_OUT // n, n
    return m, max(16, TILE_OUT // m // 16 * 16)


def _blocked(xs, w: torch.Tensor, acc: torch.Tensor | None, b: torch.Tensor | None, bounds) -> torch.Tensor:
    """``acc + x @ w.T (+ b)`` for one output tile, summed over the ``k``-blocks ``bounds`` in order;
    ``xs`` holds x's columns of each block (``[m, e - j]`` each), ``w`` is ``[n, k]``."""
    (j, e), x0 = bounds[0], xs[0]
    if acc is None:
        out = one_pass(x0, _w_block(w, j, e), b)  # [m, n]
    else:
        out = torch.ops.mkldnn._linear_pointwise.binary(x0, acc, _w_block(w, j, e), b, "add")
    for (j, e), xj in zip(bounds[1:], xs[1:]):
        out = torch.ops.mkldnn._linear_pointwise.binary(xj, out, _w_block(w, j, e), None, "add")
    return out


def _tiled(x, w, acc, b, out: torch.Tensor, bounds, tm: int, tn: int) -> torch.Tensor:
    """``out = acc + x @ w.T (+ b)`` in ``[tm, tn]`` tiles (``acc`` None or ``out`` itself), each tile
    through all its ``k``-blocks before the next (see :data:`TILED_FROM`)."""
    m, n = out.shape
    # column tiles multiply all of x: its k-blocks are copied once (oneDNN copies strided inputs)
    xs = [x[:, j:e] if tn == n else x[:, j:e].contiguous() for j, e in bounds]
    for c in range(0, n, tn):
        # the row tiles of one column tile share its weight k-block copies, dropped after it (one tile's
        # copies live at a time, not a whole copy of w)
        with reuse_weight_blocks():
            for r in range(0, m, tm):
                a = None if acc is None else acc[r : r + tm, c : c + tn].contiguous()
                bias = None if b is None else b[c : c + tn]
                out[r : r + tm, c : c + tn] = _blocked([xj[r : r + tm] for xj in xs], w[c : c + tn], a, bias, bounds)
    return out


def _lp(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """oneDNN ``x @ w.T (+ b)`` for a 2-D ``x`` ``[m, k]`` and ``w`` ``[n, k]`` (any strides), into
    ``out`` (``[m, n]``, written tile by tile, or copied into) when given, else a new tensor."""
    bounds = _k_bounds(x.shape[1])
    (m, n), (tm, tn) = (x.shape[0], w.shape[0]), _tiles(x.shape[0], w.shape[0])
    if len(bounds) == 1 or (tm, tn) == (m, n):
        res = _blocked([x[:, j:e] for j, e in bounds], w, None, b, bounds)  # [m, n]
        return res if out is None else out.copy_(res)
    out = torch.empty((m, n), dtype=x.dtype) if out is None else out
    return _tiled(x, w, None, b, out, bounds, tm, tn)


def _lp_add(x: torch.Tensor, acc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN ``acc + x @ w.T`` (the add is the GEMM's epilogue): a new tensor from an untiled
    product, ``acc`` updated in place from a tiled ``k``-blocked one."""
    bounds = _k_bounds(x.shape[1])
    (m, n), (tm, tn) = acc.shape, _tiles(*acc.shape)
    if len(bounds) == 1 or (tm, tn) == (m, n):
        return _blocked([x[:, j:e] for j, e in bounds], w, acc, None, bounds)  # [m, n]
    return _tiled(x, w, acc, None, acc, bounds, tm, tn)


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN and its dense fp32 matmul op works here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.arange(12, dtype=torch.float32).view(3, 4)
        return bool(torch.equal(one_pass(a, a), a @ a.t()))  # small integers: exact in any order
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
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
    """``(backend, why)`` for a ``cpu_gemm`` choice: ``backend`` is ``torch``, ``onednn`` or
    ``onednn_fast``; ``auto`` picks ``onednn`` on AMD x86 CPUs with a usable oneDNN, else ``torch``.

    Raises:
        ValueError: ``choice`` is not one of :data:`CPU_GEMM_CHOICES`.
        RuntimeError: ``onednn`` / ``onednn_fast`` asked for where this PyTorch build has no usable
            oneDNN.
    """
    if choice not in CPU_GEMM_CHOICES:
        raise ValueError(f"cpu_gemm: {choice!r} is not one of {' | '.join(CPU_GEMM_CHOICES)}")
    vendor = cpu_vendor() or "not x86"
    if choice == "torch":
        return "torch", "asked for"
    if choice == "auto":
        if vendor != "AuthenticAMD":
            return "torch", f"auto: CPU vendor {vendor}"
        if not onednn_available():
            return "torch", "auto: this PyTorch build has no usable oneDNN matmul"
        return "onednn", "auto: AMD CPU, where MKL runs its generic code path"
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no usable oneDNN matmul (torch.backends.mkldnn)")
    return choice, f"asked for; CPU vendor {vendor}"


def set_cpu_gemm(choice: str) -> str:
    """Sets the fp32 CPU GEMM back end of this process; returns it with the reason, in words.

    Raises:
        ValueError, RuntimeError: see :func:`resolve_cpu_gemm`.
    """
    backend, why = resolve_cpu_gemm(choice)
    _STATE["backend"], _STATE["why"] = backend, why
    return f"{backend} ({why})"


def cpu_gemm_backend() -> str:
    """The back end in use: ``torch`` (until :func:`set_cpu_gemm` is called), ``onednn`` or
    ``onednn_fast``."""
    if _STATE["backend"] is None:
        set_cpu_gemm("torch")
    return _STATE["backend"]  # type: ignore[return-value]


def describe_cpu_gemm() -> str:
    """The back end in use and why, in words (``onednn (auto: AMD CPU, ...)``)."""
    backend = cpu_gemm_backend()
    return f"{backend} ({_STATE['why']})"


def _plain_fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (
        type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"
    )


def use_onednn(a: torch.Tensor, w: torch.Tensor, *more: torch.Tensor | None, macs: int) -> bool:
    """Whether a GEMM of ``macs`` multiply-adds on these tensors goes to oneDNN (see the module doc)."""
    if macs < MIN_MACS or a.dim() != 2 or a.shape[0] < MIN_ROWS or cpu_gemm_backend() == "torch":
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return _plain_fp32_cpu(a) and _plain_fp32_cpu(w) and all(_plain_fp32_cpu(t) for t in more)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[m, k]`` and ``b`` ``[k, n]`` (any strides); no autograd.

    Args:
        out: a contiguous ``[m, n]`` tensor to write the product into (a kept buffer: no fresh
            memory to fault in), or None.

    Returns:
        ``out``, or a new contiguous ``[m, n]`` tensor.
    """
    if use_onednn(a, b, macs=a.shape[0] * a.shape[1] * b.shape[1]):
        return _lp(a, b.t(), out=out)  # [m, n]
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def mm_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` (``acc`` ``[m, n]``, ``a`` ``[m, k]``, ``b`` ``[k, n]``); no autograd.

    Returns:
        The sum: ``acc`` itself, updated in place, on the ``torch`` path; a new tensor on the oneDNN
        path (the add is the GEMM's epilogue there; ``acc`` is unchanged). Use the returned tensor.
    """
    if use_onednn(a, b, acc, macs=a.shape[0] * a.shape[1] * b.shape[1]) and acc.is_contiguous():
        return _lp_add(a, acc, b.t())  # [m, n]
    return acc.addmm_(a, b)


def thin_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a rank-``r`` product with a long reduction (LoRA's ``x A^T``, ``B^T g^T``,
    ``(g B)^T x``, ``ax^T g``: ``r`` rows or columns, ``k`` the layer width or the token count).

    Under ``onednn_fast`` these run in oneDNN in one pass over ``k``, ``a`` made contiguous first (an
    ``[r, N]`` or ``[N, r]`` copy): 1.4-2.6x MKL's speed at rank 16 on the test VM, at 1.0-2.3x its
    rounding error (``benchmarks/bench_cpu_gemm.py``). Under ``onednn`` they stay on ``torch.mm``:
    summed in MKL's ``k``-blocks through oneDNN they ran at 0.47-1.75x MKL's speed, as ``r`` rows
    or columns leave each block's GEMM too little work. Small products and the cases
    :func:`use_onednn` refuses (other dtypes and devices, subclasses, autocast) stay on ``torch.mm``.

    Returns:
        A new ``[m, n]`` tensor (contiguous on the oneDNN path).
    """
    k = a.shape[1]
    if (
        cpu_gemm_backend() != "onednn_fast"
        or a.shape[0] * k * b.shape[1] < MIN_MACS
        or torch.is_autocast_enabled("cpu")
        or not (_plain_fp32_cpu(a) and _plain_fp32_cpu(b))
    ):
        return torch.mm(a, b)
    return one_pass(a.contiguous(), _w_block(b.t(), 0, k))  # [m, n]; b^T copied only if strided


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
