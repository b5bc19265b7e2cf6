"""Decode-time weights and a lean one-position decode step for a :class:`TransformerDecoder` on CPU.

:func:`tinytune.generation.decode_layout` builds a :class:`DecodePlan` on entry and
:func:`tinytune.generation.generate` runs its KV-cache steps (one new position per row) through
:meth:`DecodePlan.step` instead of the module tree. The plan holds its own copies of the
projection weights, laid out for multiplying a few rows by every weight:

* q/k/v fused into one ``[dim, (h + 2 h_kv) d]`` matrix and gate/up into one ``[dim, 2 hidden]``
  matrix (two GEMMs per layer instead of five), every matrix stored as ``W^T`` contiguous
  (column-major ``W``, the faster operand for MKL's small-M GEMM), all in one buffer on
  transparent huge pages where Linux allows;
* LoRA adapters merged (``W + s B A``; DoRA's magnitude included; an adapter switched off is left
  out);
* for batches of more than one row in fp32, MKL's packed GEMM format, packed on the first call for
  a batch size (``torch.ops.mkl._mkl_reorder_linear_weight``, the format inductor uses on CPU).

The step is the module code without the module calls and without the checks only training needs:
RMSNorm spelled out, RoPE rows gathered from a table of every position and applied to q and k
together, keys and values written straight into the cache slot, SDPA over the cached slots, the
o and down GEMMs accumulating into the residual. Outputs agree with the module path to fp32
rounding (the GEMMs sum in another order). The model's parameters are only read; a changed
parameter (``load_state_dict``, an optimizer step, a swapped ``.data``) or LoRA switch is noticed
by :meth:`DecodePlan.current`, which builds a new plan.

Models with a part the plan does not know (NF4 bases, tensor subclasses, non-CPU weights,
parameters of mixed dtypes, training-mode dropout, other module types) get no plan
(:meth:`DecodePlan.build` returns ``None``) and generation runs the modules.
"""

from __future__ import annotations

import dataclasses
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels.fused_ops import rms_norm
from tinytune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from tinytune.modules.linear import Linear
from tinytune.modules.peft.lora import LoRALinear
from tinytune.modules.peft.nf4 import is_nf4

_PLAIN = (torch.Tensor, nn.Parameter)
_HUGE_PAGE = 2 << 20


def _mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _weight_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat ``[numel]`` buffer for the plan's matrices, on transparent huge pages where Linux allows.

    Every weight is streamed once per decoded token; 2 MiB pages spare the TLB misses of 4 KiB
    ones. Elsewhere (or when ``madvise`` is refused) an ordinary tensor.
    """
    size = numel * dtype.itemsize
    if size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError, AttributeError):
            return torch.empty(numel, dtype=dtype)
        flat = torch.frombuffer(buf, dtype=torch.uint8)  # keeps the mapping alive while any view lives
        start = -flat.data_ptr() % _HUGE_PAGE  # huge pages cover 2 MiB-aligned ranges
        return flat[start : start + size].view(dtype)
    return torch.empty(numel, dtype=dtype)


class _Linear:
    """``x [n, in] -> [n, out]`` with ``W^T`` stored contiguous, optionally MKL-packed for ``n`` rows.

    Built from the ``[out_i, in]`` weights to fuse (concatenated along ``out``); :meth:`place`
    writes ``W^T`` into its slot of the plan's weight buffer.
    """

    __slots__ = ("w_t", "bias", "packed", "rows", "_weights")

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        self._weights = weights
        self.w_t = torch.empty(0)
        if any(b is not None for b in biases):
            parts = [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
            self.bias = torch.cat(parts).contiguous()  # [out]
        else:
            self.bias = None
        self.packed: torch.Tensor | None = None
        self.rows = 1

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self._weights)

    def place(self, flat: torch.Tensor) -> None:
        """Writes ``W^T [in, out]`` into ``flat`` (``numel`` elements) and keeps it as the weight."""
        n_in = self._weights[0].shape[1]
        n_out = sum(w.shape[0] for w in self._weights)
        self.w_t = flat.view(n_in, n_out)  # [in, out]
        col = 0
        for w in self._weights:
            self.w_t[:, col : col + w.shape[0]].copy_(w.t())
            col += w.shape[0]
        self._weights = []

    def pack(self, rows: int) -> None:
        """Packs ``W`` for ``rows``-row inputs (fp32, MKL builds only); ``rows == 1`` unpacks."""
        if rows == self.rows:
            return
        self.packed, self.rows = None, rows
        if rows > 1 and self.w_t.dtype == torch.float32 and _mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w_t.t(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] == self.rows:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.w_t.t(), self.bias, self.rows)  # [n, out]
        if self.bias is not None:
            return torch.addmm(self.bias, x, self.w_t)  # [n, out]
        return torch.mm(x, self.w_t)  # [n, out]

    def add_into(self, h: torch.Tensor, x: torch.Tensor) -> None:
        """``h += self(x)`` (one GEMM accumulating into ``h`` when unpacked and bias-free)."""
        if self.bias is None and self.packed is None:
            h.addmm_(x, self.w_t)  # [n, out]
        else:
            h.add_(self(x))


@dataclasses.dataclass
class _Layer:
    attn: MultiHeadAttention  # for its KV cache
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int  # the MLP's hidden size
    rope: RotaryPositionalEmbeddings
    sa_norm: RMSNorm
    mlp_norm: RMSNorm
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear


def _effective_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(W [out, in], bias)`` that ``module`` applies in eval mode, or ``None`` when not plannable."""
    if type(module) in (nn.Linear, Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module) is TiedLinear:
        return module.weight.detach(), None
    if type(module) is LoRALinear:
        if is_nf4(module.weight) or type(module.weight) not in _PLAIN:
            return None  # QLoRA keeps its base compressed: a full-precision copy would defeat it
        if module.training and isinstance(module.dropout, nn.Dropout):
            return None  # dropout is active: the merged weight would not be what the module computes
        bias = None if module.bias is None else module.bias.detach()
        if module.disabled:
            return (module.weight.detach(), bias) if module.pissa_a0 is None else None
        return module.merged_weight(), bias
    return None


def _norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """``norm(x)``: in fp32 the operations of its no-grad path, spelled out (no dtype round trips)."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        rstd = x.pow(2).mean(-1, keepdim=True).add_(norm.eps).rsqrt_()  # [..., 1]
        return (x * rstd).mul_(norm.weight)  # [..., d]
    return rms_norm(x, norm.weight, norm.eps)  # HF's order for bf16/fp16: normalise, cast, scale


def _sources(model: nn.Module) -> list[tuple[torch.Tensor, int, int]]:
    """``(parameter, storage pointer, version)`` of every parameter, to notice later changes."""
    return [(p, p.data_ptr(), -1 if p.is_inference() else p._version) for p in model.parameters()]


def _lora_flags(model: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    """``(module, disabled, training)`` of every LoRA layer: what its merged weight depends on besides weights."""
    return [(m, m.disabled, m.training) for m in model.modules() if type(m) is LoRALinear]


class DecodePlan:
    """Decode-time weights of one :class:`TransformerDecoder` and its one-position step.

    Build it with :meth:`build` (``None`` when the model cannot be planned); see the module
    docstring for what it holds. Not thread-safe; valid while the model's weights are unchanged
    (:meth:`current` rebuilds it otherwise).
    """

    def __init__(self, model: TransformerDecoder, layers: list[_Layer], output: _Linear) -> None:
        self.model = model
        self.layers = layers
        self.output = output
        linears = [lin for layer in layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [output]
        flat = _weight_buffer(sum(lin.numel for lin in linears), model.tok_embeddings.weight.dtype)
        start = 0
        for lin in linears:
            n = lin.numel
            lin.place(flat[start : start + n])
            start += n
        self._flags = _lora_flags(model)
        self._sources = _sources(model)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rope) -> cos, [-sin, sin] [T, d]
        self._rows = 1

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module) -> DecodePlan | None:
        """The plan of ``model``, or ``None`` when any part of it is not a known CPU module.

        Args:
            model: a :class:`TransformerDecoder` (anything else returns ``None``).
        """
        if type(model) is not TransformerDecoder or type(model.tok_embeddings) is not nn.Embedding:
            return None
        params = list(model.parameters())
        dtype = model.tok_embeddings.weight.dtype  # the plan's buffer holds every matrix in this dtype
        if not params or any(type(p) not in _PLAIN or p.device.type != "cpu" or p.dtype != dtype for p in params):
            return None
        if type(model.norm) is not RMSNorm:
            return None
        out = _effective_linear(model.output)
        if out is None:
            return None
        layers = []
        for layer in model.layers:
            planned = _plan_layer(layer)
            if planned is None:
                return None
            layers.append(planned)
        return cls(model, layers, _Linear([out[0]], [out[1]]))

    def current(self) -> DecodePlan | None:
        """This plan while the model's parameters are unchanged since it was built, else a new one."""
        now = _sources(self.model)
        same = len(now) == len(self._sources) and all(
            p is q and ptr == ptr0 and ver == ver0 for (p, ptr, ver), (q, ptr0, ver0) in zip(now, self._sources)
        )
        if same and _lora_flags(self.model) == self._flags:
            return self
        return DecodePlan.build(self.model)

    def prepare(self, batch_size: int, max_positions: int) -> None:
        """Readies ``step`` for ``batch_size`` rows and positions below ``max_positions``.

        Packs the GEMM weights for ``batch_size`` rows when that changed (fp32 with MKL: about one
        copy of the weights) and extends the RoPE tables.
        """
        for layer in self.layers:
            cache = layer.attn.kv_cache
            if cache is None or cache.batch_size != batch_size or cache.k_cache.dtype != self.output.w_t.dtype:
                raise ValueError(
                    f"decode plan: every layer needs a KV cache for batch {batch_size} in the weights' dtype"
                )
        if batch_size != self._rows:
            for layer in self.layers:
                for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    lin.pack(batch_size)
            self.output.pack(batch_size)
            self._rows = batch_size
        for layer in self.layers:
            table = self._tables.get(id(layer.rope))
            if table is None or table[0].shape[0] < max_positions:
                pos = torch.arange(max(max_positions, 64), device=self.output.w_t.device)[None]  # [1, T]
                cos, sin = layer.rope.cos_sin(pos)  # [1, 1, T, d] each in fp32: the module's own tables
                cos, sin = cos[0, 0], sin[0, 0]  # [T, d] each
                half = sin.shape[1] // 2
                self._tables[id(layer.rope)] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output projection of final-normed hidden states ``[b, dim] -> [b, vocab]``."""
        return self.output(hidden)

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One new position per row through every layer, appending to the model's KV caches.

        Args:
            tokens: ``[b]`` token ids (``b`` as given to :meth:`prepare`).
            input_pos: ``[b]`` RoPE positions (below ``prepare``'s ``max_positions``).
            mask: ``[b, 1, 1, s_kv]`` additive mask over every cache slot including the new one
                (0 = attend, -inf = not), or ``None`` to attend to all of them.

        Returns:
            ``[b, vocab]`` logits.
        """
        b = tokens.shape[0]
        h = F.embedding(tokens, self.model.tok_embeddings.weight)  # [b, dim] (a fresh tensor)
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            nh, nkv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
            cs = rows.get(id(layer.rope))
            if cs is None:
                cos, sin_signed = self._tables[id(layer.rope)]
                cs = rows[id(layer.rope)] = (cos[input_pos][:, None], sin_signed[input_pos][:, None])  # [b, 1, d]
            qkv = layer.qkv(_norm(h, layer.sa_norm))  # [b, (h + 2 h_kv) d]
            if layer.q_norm is None and layer.k_norm is None:
                qk = _rope(qkv[:, : (nh + nkv) * d].view(b, nh + nkv, d), *cs)  # [b, h + h_kv, d]
                q, k = qk[:, :nh], qk[:, nh:]  # [b, h, d], [b, h_kv, d]
            else:
                q = qkv[:, : nh * d].view(b, nh, d)  # [b, h, d]
                k = qkv[:, nh * d : (nh + nkv) * d].view(b, nkv, d)  # [b, h_kv, d]
                q = _rope(q if layer.q_norm is None else _norm(q, layer.q_norm), *cs)
                k = _rope(k if layer.k_norm is None else _norm(k, layer.k_norm), *cs)
            cache = layer.attn.kv_cache
            end = cache.size + 1
            if end > cache.max_seq_len:
                raise ValueError(f"KVCache overflow: {cache.size} cached + 1 new > capacity {cache.max_seq_len}")
            cache.k_cache[:, :, cache.size] = k
            cache.v_cache[:, :, cache.size] = qkv[:, (nh + nkv) * d :].view(b, nkv, d)
            cache.size = end
            keys, values = cache.k_cache[:, :, :end], cache.v_cache[:, :, :end]  # [b, h_kv, s_kv, d] each
            out = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, attn_mask=mask, enable_gqa=nh != nkv
            )  # [b, h, 1, d]
            layer.o.add_into(h, out.view(b, nh * d))  # h [b, dim] += o(out)
            gate_up = layer.gate_up(_norm(h, layer.mlp_norm))  # [b, 2 hidden]
            act = F.silu(gate_up[:, : layer.hidden], inplace=True).mul_(gate_up[:, layer.hidden :])  # [b, hidden]
            layer.down.add_into(h, act)  # h [b, dim] += down(act)
        return self.output(_norm(h, self.model.norm))  # [b, vocab]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE (HF rotate-half) of ``x [b, heads, d]`` with table rows ``[b, 1, d]``; ``sin_signed = [-sin, sin]``.

    ``x * cos + [x2, x1] * [-sin, sin]``: the products and sums of ``apply_rope``, in three ops.
    """
    if x.dtype != cos.dtype:  # bf16/fp16: rotate in fp32 as the module path does, then cast back
        return _rope(x.to(cos.dtype), cos, sin_signed).to(x.dtype)
    b, n, d = x.shape
    swapped = x.view(b, n, 2, d // 2).flip(2).view(b, n, d)  # [b, heads, d] = [x2, x1]
    return (x * cos).addcmul_(swapped, sin_signed)  # [b, heads, d]


def _plan_layer(layer: nn.Module) -> _Layer | None:
    """One layer's fused weights, or ``None`` when a part of it is not a known module."""
    if type(layer) is not TransformerSelfAttentionLayer:
        return None
    attn, mlp = layer.attn, layer.mlp
    if type(attn) is not MultiHeadAttention or type(mlp) is not FeedForward:
        return None
    if attn.kv_cache is not None and attn.kv_cache.k_cache.device.type != "cpu":
        return None
    if type(attn.pos_embeddings) is not RotaryPositionalEmbeddings:
        return None
    norms = (layer.sa_norm, layer.mlp_norm, attn.q_norm, attn.k_norm)
    if any(n is not None and type(n) is not RMSNorm for n in norms) or layer.sa_norm is None or layer.mlp_norm is None:
        return None
    lins = [_effective_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    lins += [_effective_linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    if any(x is None for x in lins):
        return None
    (q, k, v, o, gate, up, down) = lins
    d = attn.head_dim
    if q[0].shape[0] != attn.n_heads * d or k[0].shape[0] != attn.n_kv_heads * d or v[0].shape[0] != k[0].shape[0]:
        return None
    return _Layer(
        attn=attn,
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        head_dim=d,
        hidden=gate[0].shape[0],
        rope=attn.pos_embeddings,
        sa_norm=layer.sa_norm,
        mlp_norm=layer.mlp_norm,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        qkv=_Linear([q[0], k[0], v[0]], [q[1], k[1], v[1]]),
        o=_Linear([o[0]], [o[1]]),
        gate_up=_Linear([gate[0], up[0]], [gate[1], up[1]]),
        down=_Linear([down[0]], [down[1]]),
    )
