"""QLoRA's fused NF4 path: the fast dequantization against torchao's own, and the fused LoRA
Function (dequantize in forward, again in backward, nothing full-precision saved) against the
unfused composition of torchao's ``linear_nf4`` and a plain adapter."""

import pytest
import torch
import torch.nn.functional as F

from tinytune.modules.peft import LoRALinear
from tinytune.modules.peft.nf4 import dequantize_nf4, to_nf4

torchao_nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 64), (192, 576), (48, 40)])
def test_dequantize_nf4_equals_torchao(shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype) * 0.05
    w[0, :8] = 0.0  # a block with zeros and a block with one large outlier
    w[1, 0] = 3.0
    q = to_nf4(w)
    ref = q.get_original_weight()  # torchao's reference dequantization
    for reuse in (False, True):
        got = dequantize_nf4(q, reuse=reuse)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref), f"reuse={reuse}: max diff {(got.float() - ref.float()).abs().max()}"
    # the scratch buffer is overwritten by the next call of the same size: a fresh result is not
    other = to_nf4(torch.randn(shape, dtype=dtype))
    fresh = dequantize_nf4(q)
    dequantize_nf4(other, reuse=True)
    assert torch.equal(fresh, ref)


def _qlora(bias: bool, dropout: float = 0.0, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    m = LoRALinear(64, 96, rank=8, alpha=16.0, dropout=dropout, use_bias=bias, quantize_base=True)
    torch.nn.init.normal_(m.lora_b.weight, std=0.1)  # non-zero update so the adapter's gradients matter
    return m


def _unfused(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Reference: torchao's ``linear_nf4`` for the base, eager modules for the adapter."""
    out = torchao_nf4.linear_nf4(x, m.weight)
    if m.bias is not None:
        out = out + m.bias
    return out + m.scaling * m.lora_b(m.lora_a(m.dropout(x)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_qlora_matches_unfused(bias, dropout):
    m = _qlora(bias, dropout)
    m.train()
    x = torch.randn(3, 7, 64)
    grads = []
    for fn in (m, lambda t: _unfused(m, t)):
        torch.manual_seed(1)  # same dropout mask on both sides
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(2))
        out.backward(g)
        params = [m.lora_a.weight, m.lora_b.weight] + ([m.bias] if bias else [])
        grads.append([out.detach(), xi.grad] + [p.grad.clone() for p in params])
        m.zero_grad(set_to_none=True)
    names = ["out", "grad_x", "grad_A", "grad_B", "grad_bias"]
    for name, got, ref in zip(names, *grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
    assert m.weight.grad is None


def test_fused_qlora_saves_no_full_precision_weight():
    m = _qlora(bias=False)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x).sum().backward()
    assert (96, 64) not in saved, f"a [out, in] weight was saved for backward: {saved}"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        _unfused(m, x).sum().backward()  # the check itself can fail: torchao's path saves the weight
    assert (96, 64) in saved


def test_fused_qlora_no_grad_and_disabled_paths():
    m = _qlora(bias=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _unfused(m, x), rtol=1e-5, atol=1e-5)
    # adapters off: the frozen base alone, forward and grad_x as torchao's linear_nf4
    m.disabled = True
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    out.sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = torchao_nf4.linear_nf4(xr, m.weight) + m.bias
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-5, atol=1e-5)
    deq = m.weight.get_original_weight()
    torch.testing.assert_close(out, F.linear(x, deq, m.bias), rtol=1e-5, atol=1e-5)
