"""The no-grad paths of the fused ops and the per-forward RoPE tables: same numbers as the
autograd paths and the eager formulas, no autograd nodes, no stale tables."""

import torch
import torch.nn.functional as F

from tinytune.kernels.fused_ops import apply_rope, lora_linear, rms_norm, swiglu
from tinytune.models.llama3 import llama3_tiny
from tinytune.modules import RotaryPositionalEmbeddings


def _eager_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_no_grad_paths_equal_function_paths():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 32), torch.randn(32)
    gate, up = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    q = torch.randn(2, 4, 5, 16)
    cos, sin = RotaryPositionalEmbeddings(16).cos_sin(torch.arange(5).expand(2, 5))
    a, b, wl = torch.randn(4, 32), torch.randn(48, 4), torch.randn(48, 32)
    with_grad = [
        rms_norm(x, w, 1e-5),
        swiglu(gate, up),
        apply_rope(q, cos, sin),
        lora_linear(x, wl, None, a, b, 2.0),
    ]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            fast = [
                rms_norm(x, w, 1e-5),
                swiglu(gate, up),
                apply_rope(q, cos, sin),
                lora_linear(x, wl, None, a, b, 2.0),
            ]
        for got, ref in zip(fast, with_grad):
            assert got.grad_fn is None
            torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same operations
    # and the eager formulas
    torch.testing.assert_close(fast[0], w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(fast[1], F.silu(gate) * up)
    torch.testing.assert_close(fast[2], _eager_rope(q, cos, sin))
    torch.testing.assert_close(fast[3], F.linear(x, wl) + 2.0 * F.linear(F.linear(x, a), b))


def test_rope_tables_follow_the_positions():
    rope = RotaryPositionalEmbeddings(16)
    pos = torch.arange(6).expand(2, 6).clone()
    with torch.inference_mode():
        pos_inf = pos.clone()
        c1, s1 = rope.cos_sin(pos_inf)
        assert rope.cos_sin(pos_inf)[0] is c1  # the next layer of the same forward reuses them
        pos_inf += 3  # changed in place (inference tensors have no version counter)
        c2, _ = rope.cos_sin(pos_inf)
    fresh = RotaryPositionalEmbeddings(16)
    torch.testing.assert_close(c2, fresh.cos_sin(pos + 3)[0])
    assert not torch.equal(c1, c2)
    # tables made under inference_mode are not handed to a training forward (autograd refuses them)
    c3, _ = rope.cos_sin(pos + 3)
    assert not c3.is_inference()
    q = torch.randn(2, 4, 6, 16, requires_grad=True)
    apply_rope(q, c3, rope.cos_sin(pos + 3)[1]).sum().backward()


def test_model_forward_no_grad_equals_grad():
    torch.manual_seed(0)
    model = llama3_tiny().eval()
    tokens = torch.randint(0, 100, (2, 9))
    ref = model(tokens)
    with torch.inference_mode():
        got = model(tokens)
    torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0)


def test_decode_layout_same_tokens_and_restores_weights():
    from tinytune.generation import decode_layout, generate

    torch.manual_seed(0)
    model = llama3_tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[5, 6, 7, 8], [9, 10]]
    ref = generate(model, prompts, max_new_tokens=6)
    tokens = torch.tensor([[5, 6, 7, 8]])
    ref_logits = model(tokens).detach()
    w = model.layers[0].attn.q_proj.weight
    ptr = w.data_ptr()
    with decode_layout(model):
        # the decode plan holds its own fused copies; the model's parameters are only read
        assert w.is_contiguous() and w.data_ptr() == ptr
        assert generate(model, prompts, max_new_tokens=6) == ref
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), ref_logits, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].is_contiguous() and torch.equal(after[k], v), k
