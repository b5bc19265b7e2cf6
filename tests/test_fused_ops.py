"""Fused autograd Functions (tinytune.kernels.fused_ops) vs the eager reference ops.

Each Function is checked three ways: ``torch.autograd.gradcheck`` in fp64 on tiny shapes, forward and
every gradient against eager PyTorch in fp32, and the bytes it saves for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``) against the claim in its docstring.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels.fused_ops import apply_rope, lora_linear, plain_tensors, rms_norm, swiglu
from tinytune.modules import RMSNorm, RotaryPositionalEmbeddings
from tinytune.modules.feed_forward import FeedForward
from tinytune.modules.peft.lora import LoRALinear


# ---------------------------------------------------------------- eager references
def ref_rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_swiglu(gate, up):
    return F.silu(gate) * up


def ref_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def ref_lora(x, w, b, a, bb, scale, xd=None):
    xd = x if xd is None else xd
    return F.linear(x, w, b) + scale * F.linear(F.linear(xd, a), bb)


def rope_tables(b, s, d, dtype=torch.float32, offset=0):
    pos = torch.arange(offset, offset + s).expand(b, s)
    cos, sin = RotaryPositionalEmbeddings(d, base=10_000.0).cos_sin(pos)
    return cos.to(dtype), sin.to(dtype)


class SavedBytes:
    """Counts the bytes of distinct storages saved for backward inside the context."""

    def __init__(self):
        self.ptrs = {}

    def pack(self, t):
        st = t.untyped_storage()
        self.ptrs[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def total(self, exclude=()):
        skip = {t.untyped_storage().data_ptr() for t in exclude}
        return sum(n for p, n in self.ptrs.items() if p not in skip)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _close(a, b, atol=1e-5, rtol=1e-5):
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- gradcheck (fp64)
def test_gradcheck_fp64():
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(2, 3, 8, **dd), torch.randn(8, **dd)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    g, u = torch.randn(2, 3, 10, **dd), torch.randn(2, 3, 10, **dd)
    assert torch.autograd.gradcheck(swiglu, (g, u))
    q = torch.randn(2, 3, 5, 8, **dd)
    cos, sin = rope_tables(2, 5, 8, torch.float64, offset=3)
    assert torch.autograd.gradcheck(lambda q: apply_rope(q, cos, sin), (q,))
    x = torch.randn(2, 3, 6, **dd)
    xd = torch.randn(2, 3, 6, **dd)
    wb, bias = torch.randn(5, 6, **dd), torch.randn(5, **dd)
    a, bb = torch.randn(2, 6, **dd), torch.randn(5, 2, **dd)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 1.5), (x, wb, bias, a, bb))
    assert torch.autograd.gradcheck(lambda x, xd, a, bb: lora_linear(x, wb, None, a, bb, 0.5, xd), (x, xd, a, bb))


# ---------------------------------------------------------------- fp32 vs eager
def test_rms_norm_matches_eager_fp32():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).requires_grad_()
    g = torch.randn(3, 17, 64)
    out, ref = rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # same op order: bit-identical forward
    for a, b in zip(_grads(out, (x, w), g), _grads(ref, (x, w), g)):
        _close(a, b, atol=1e-5, rtol=1e-4)


def test_rms_norm_bf16_input_fp32_weight():
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    g = torch.randn(4, 32)
    out, ref = rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    (gx, gw), (rx, rw) = _grads(out, (x, w), g), _grads(ref, (x, w), g)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    _close(gx.float(), rx.float(), atol=2e-2, rtol=2e-2)
    _close(gw, rw, atol=1e-4, rtol=1e-4)


def test_swiglu_matches_eager_fp32():
    torch.manual_seed(0)
    gate = torch.randn(2, 9, 40, requires_grad=True)
    up = torch.randn(2, 9, 40, requires_grad=True)
    g = torch.randn(2, 9, 40)
    out, ref = swiglu(gate, up), ref_swiglu(gate, up)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(_grads(out, (gate, up), g), _grads(ref, (gate, up), g)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_rope_matches_eager_fp32(transposed):
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 11, 16
    base = torch.randn(b, s, h, d) if transposed else torch.randn(b, h, s, d)
    x = (base.transpose(1, 2) if transposed else base).requires_grad_()
    if transposed:  # the attention layout: a [b, s, h, d] projection viewed as [b, h, s, d]
        x = base.requires_grad_().transpose(1, 2)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], list(range(5, 16))])  # packed row + offset row
    cos, sin = RotaryPositionalEmbeddings(d).cos_sin(pos)
    g = torch.randn(b, h, s, d)
    out, ref = apply_rope(x, cos, sin), ref_rope(x, cos, sin)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_grads(out, (base,), g)[0], _grads(ref, (base,), g)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_lora_linear_matches_eager_fp32(bias, train_base):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    w = torch.randn(20, 24, requires_grad=train_base)
    b = torch.randn(20, requires_grad=True) if bias else None
    a = torch.randn(4, 24, requires_grad=True)
    bb = torch.randn(20, 4, requires_grad=True)
    g = torch.randn(2, 7, 20)
    out, ref = lora_linear(x, w, b, a, bb, 2.0), ref_lora(x, w, b, a, bb, 2.0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    inputs = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    for r, e in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        _close(r, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cpu_gemm_backend", ["torch", "onednn", "onednn_fast"])
@pytest.mark.parametrize("d_in, d_out", [(576, 1536), (1536, 576)])
def test_lora_linear_rank_r_gemms_round_no_worse_than_eager(d_in, d_out, cpu_gemm_backend, cpu_gemm_calls, monkeypatch):
    """At SmolLM2 widths (the backward runs its rank-r GEMMs with r as the rows): the output and every
    gradient's error against fp64 is within 1.02x that of the eager fp32 composition's (``torch``,
    ``onednn``); ``onednn_fast`` (every product but the rank-r-reduction ones in one pass) within 2.5x."""
    from tinytune.kernels import cpu_gemm

    torch.manual_seed(0)
    x = torch.randn(512, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    a = torch.randn(8, d_in, dtype=torch.float64) / d_in**0.5
    bb = torch.randn(d_out, 8, dtype=torch.float64)
    g = torch.randn(512, d_out, dtype=torch.float64)

    def run(fn, dtype):
        ts = [t.to(dtype).requires_grad_() for t in (x, w, a, bb)]
        out = fn(ts[0], ts[1], None, ts[2], ts[3], 2.0)
        return [out.double(), *(t.double() for t in _grads(out, ts, g.to(dtype)))]

    exact, eager = run(ref_lora, torch.float64), run(ref_lora, torch.float32)
    cpu_gemm_calls(cpu_gemm_backend)  # set for this test, restored after it
    calls, real = [], cpu_gemm.one_pass
    monkeypatch.setattr(
        cpu_gemm, "one_pass", lambda x_, w_, b_=None: calls.append((*x_.shape, *w_.shape)) or real(x_, w_, b_)
    )
    ours = run(lora_linear, torch.float32)
    # x [m, k] w [n, k]: x A^T, B^T g^T, (g B)^T x, ax^T g
    thin = [(512, d_in, 8, d_in), (8, d_out, 512, d_out), (8, 512, d_in, 512), (8, 512, d_out, 512)]
    assert [c for c in calls if 8 in c] == (thin if cpu_gemm_backend == "onednn_fast" else [])
    limit = 2.5 if cpu_gemm_backend == "onednn_fast" else 1.02
    for name, e, o, r in zip(("out", "grad_x", "grad_w", "grad_a", "grad_b"), exact, ours, eager):
        err_o, err_r = (o - e).norm() / e.norm(), (r - e).norm() / e.norm()
        assert err_o <= limit * err_r, (name, float(err_o), float(err_r))


# ---------------------------------------------------------------- modules use the fused path
def test_modules_match_eager_and_use_functions():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = norm(x)
    assert type(out.grad_fn).__name__ == "_RMSNormFnBackward"
    torch.testing.assert_close(out, ref_rms_norm(x, norm.weight, 1e-5), atol=0, rtol=0)

    ff = FeedForward(
        gate_proj=nn.Linear(32, 48, bias=False),
        up_proj=nn.Linear(32, 48, bias=False),
        down_proj=nn.Linear(48, 32, bias=False),
    )
    y = ff(x)
    ref = ff.down_proj(ref_swiglu(ff.gate_proj(x), ff.up_proj(x)))
    torch.testing.assert_close(y, ref, atol=0, rtol=0)

    lora = LoRALinear(32, 24, rank=4, alpha=8.0, use_bias=True)
    nn.init.normal_(lora.lora_b.weight)
    y = lora(x)
    assert type(y.grad_fn).__name__ == "_LoRALinearFnBackward"
    torch.testing.assert_close(
        y, ref_lora(x, lora.weight, lora.bias, lora.lora_a.weight, lora.lora_b.weight, 2.0), atol=1e-5, rtol=1e-5
    )
    lora.disabled = True
    torch.testing.assert_close(lora(x), F.linear(x, lora.weight, lora.bias))


def test_lora_dropout_uses_dropped_input_for_adapter_only():
    torch.manual_seed(0)
    lora = LoRALinear(16, 8, rank=2, alpha=4.0, dropout=0.5)
    nn.init.normal_(lora.lora_b.weight)
    x = torch.randn(3, 16, requires_grad=True)
    torch.manual_seed(1)
    y = lora(x)
    torch.manual_seed(1)
    xd = lora.dropout(x)
    ref = ref_lora(x, lora.weight, lora.bias, lora.lora_a.weight, lora.lora_b.weight, 2.0, xd)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(3, 8)
    params = [x, lora.weight, lora.lora_a.weight, lora.lora_b.weight]
    for a, b in zip(_grads(y, params, g), _grads(ref, params, g)):
        _close(a, b, atol=1e-5, rtol=1e-5)


def test_plain_tensors_rejects_subclasses():
    from torch.distributed.tensor import DTensor  # noqa: F401 - only the type check matters here

    class Sub(torch.Tensor):
        pass

    assert plain_tensors(torch.zeros(1), nn.Parameter(torch.zeros(1)), None)
    assert not plain_tensors(torch.zeros(1).as_subclass(Sub))


# ---------------------------------------------------------------- saved-tensor footprint
def test_saved_bytes_are_as_claimed():
    torch.manual_seed(0)
    n, d, hid = 64, 32, 96
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(d, requires_grad=True)
    with SavedBytes() as fused:
        rms_norm(x, w, 1e-6)
    assert fused.total(exclude=(x, w)) == n * 4  # rstd [n, 1] fp32 only
    with SavedBytes() as eager:
        ref_rms_norm(x, w, 1e-6)
    assert eager.total(exclude=(x, w)) >= n * d * 4  # eager keeps at least the normalised activations

    gate = torch.randn(n, hid, requires_grad=True)
    up = torch.randn(n, hid, requires_grad=True)
    with SavedBytes() as fused:
        swiglu(gate, up)
    assert fused.total(exclude=(gate, up)) == 0
    with SavedBytes() as eager:
        ref_swiglu(gate, up)
    assert eager.total(exclude=(gate, up)) == n * hid * 4  # silu(gate)

    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    cos, sin = rope_tables(2, 8, 16)
    with SavedBytes() as fused:
        apply_rope(q, cos, sin)
    assert fused.total(exclude=(cos, sin)) == 0  # nothing but the tables

    lin_w, a, bb = torch.randn(48, d), torch.randn(4, d, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    with SavedBytes() as fused:
        lora_linear(x, lin_w, None, a, bb, 2.0)
    assert fused.total(exclude=(x, lin_w, a, bb)) == n * 4 * 4  # x A^T [n, rank]


def _hidden_alive_after_forward(ff, x, outer_hooks):
    """Runs ``ff(x)`` and reports whether the ``[.., hidden]`` input of ``down_proj`` is still alive."""
    import contextlib
    import gc
    import weakref

    seen = []
    handle = ff.down_proj.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    ctx = (
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if outer_hooks else contextlib.nullcontext()
    )
    with ctx:
        y = ff(x)
    handle.remove()
    gc.collect()
    return y, seen[0]() is not None


@pytest.mark.parametrize("lora", [False, True])
def test_feed_forward_recomputes_hidden_instead_of_saving_it(lora):
    from tinytune.modules.peft.lora import lora_linear_factory

    torch.manual_seed(0)
    fac = lora_linear_factory(["gate_proj", "up_proj", "down_proj"], rank=4, alpha=8.0) if lora else None
    mk = (lambda name, i, o: fac(name, i, o, False)) if lora else (lambda name, i, o: nn.Linear(i, o, bias=False))
    ff = FeedForward(
        gate_proj=mk("gate_proj", 32, 80), up_proj=mk("up_proj", 32, 80), down_proj=mk("down_proj", 80, 32)
    )
    for m in ff.modules():
        if hasattr(m, "lora_b"):
            nn.init.normal_(m.lora_b.weight)
    x = torch.randn(2, 6, 32, requires_grad=True)
    params = [p for p in ff.parameters() if p.requires_grad]
    y, alive = _hidden_alive_after_forward(ff, x, outer_hooks=False)
    assert not alive  # silu(gate) * up is not kept for backward: recomputed from gate and up
    ref = ff.down_proj(ref_swiglu(ff.gate_proj(x), ff.up_proj(x)))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, [x, *params], g), _grads(ref, [x, *params], g)):
        _close(a, b, atol=1e-5, rtol=1e-5)


def test_recompute_is_off_under_outer_hooks():
    """With activation checkpointing (or any outer saved-tensor hooks) the hidden product is saved normally."""
    torch.manual_seed(0)
    ff = FeedForward(
        gate_proj=nn.Linear(8, 16, bias=False),
        up_proj=nn.Linear(8, 16, bias=False),
        down_proj=nn.Linear(16, 8, bias=False),
    )
    x = torch.randn(3, 8, requires_grad=True)
    y, alive = _hidden_alive_after_forward(ff, x, outer_hooks=True)
    assert alive
    y.sum().backward()
    ref = ff.down_proj(ref_swiglu(ff.gate_proj(x), ff.up_proj(x)))
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref.sum(), x)[0])


def test_norm_output_is_recomputed_by_its_consumers():
    """The projections after an RMSNorm keep a recipe for the normalised input, not the tensor."""
    import gc
    import weakref

    from tinytune.models import smollm2

    torch.manual_seed(0)
    model = smollm2.smollm2_tiny()
    layer = model.layers[0]
    for m in model.modules():
        if isinstance(m, RMSNorm):
            nn.init.normal_(m.weight)
    x = torch.randn(2, 8, layer.sa_norm.dim, requires_grad=True)
    pos = torch.arange(8).expand(2, 8)
    outs = []
    hooks = [
        n.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o))) for n in (layer.sa_norm, layer.mlp_norm)
    ]
    y = layer(x, input_pos=pos)
    for h in hooks:
        h.remove()
    gc.collect()
    assert [o() is None for o in outs] == [True, True]
    # gradients equal those of the eager reference (no recompute): same layer under an outer hook
    g = torch.randn_like(y)
    params = list(layer.parameters())
    got = _grads(y, [x, *params], g)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        ref = layer(x, input_pos=pos)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    for a, b in zip(got, _grads(ref, [x, *params], g)):
        _close(a, b, atol=1e-6, rtol=1e-6)
