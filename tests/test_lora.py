"""LoRALinear / QLoRA / adapter utilities, checked against plain PyTorch and peft."""

import copy

import pytest
import torch
from torch import nn

from tinytune.modules import Linear
from tinytune.modules.peft import (
    LoRALinear,
    disable_adapters,
    get_adapter_params,
    get_merged_state_dict,
    lora_linear_factory,
    merge_lora,
    set_trainable_params,
)
from tinytune.modules.peft.nf4 import dequantize, is_nf4, pick_nf4_block_sizes


def _lora(in_dim=32, out_dim=48, rank=4, alpha=8.0, bias=False, quantize=False, seed=0):
    torch.manual_seed(seed)
    m = LoRALinear(in_dim, out_dim, rank=rank, alpha=alpha, use_bias=bias, quantize_base=quantize)
    nn.init.normal_(m.lora_b.weight, std=0.1)  # non-zero update so merges are tested
    return m


def test_param_names_and_init():
    m = LoRALinear(16, 24, rank=4, alpha=8.0, use_bias=True)
    names = dict(m.named_parameters())
    assert set(names) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}
    assert names["lora_a.weight"].shape == (4, 16)
    assert names["lora_b.weight"].shape == (24, 4)
    assert torch.count_nonzero(m.lora_b.weight) == 0
    assert torch.count_nonzero(m.lora_a.weight) > 0
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert m.lora_a.weight.abs().max() <= bound + 1e-6


def test_forward_matches_formula_and_disabled():
    m = _lora(bias=True)
    x = torch.randn(3, 5, 32)
    ref = x @ m.weight.T + m.bias + (8.0 / 4) * (x @ m.lora_a.weight.T @ m.lora_b.weight.T)
    torch.testing.assert_close(m(x), ref)
    with disable_adapters(m):
        torch.testing.assert_close(m(x), x @ m.weight.T + m.bias)
    assert not m.disabled


def test_fresh_adapter_is_identity():
    torch.manual_seed(0)
    m = LoRALinear(32, 48, rank=4, alpha=8.0)
    x = torch.randn(2, 32)
    torch.testing.assert_close(m(x), x @ m.weight.T)


def test_merge_equals_adapter_forward():
    m = _lora(bias=True)
    x = torch.randn(4, 32)
    want = m(x)
    merged = merge_lora(copy.deepcopy(m))
    assert type(merged) is Linear
    torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def test_merge_matches_peft():
    peft = pytest.importorskip("peft")
    m = _lora(bias=True)
    base = nn.Sequential(nn.Linear(32, 48, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(m.weight)
        base[0].bias.copy_(m.bias)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(m.lora_a.weight)
        layer.lora_B["default"].weight.copy_(m.lora_b.weight)
    x = torch.randn(4, 32)
    torch.testing.assert_close(pm(x), m(x), atol=1e-5, rtol=1e-5)
    peft_merged = pm.merge_and_unload()[0]
    ours = merge_lora(copy.deepcopy(m))
    torch.testing.assert_close(ours.weight, peft_merged.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.bias, peft_merged.bias)


def test_factory_adapter_utils_and_merged_state_dict():
    torch.manual_seed(0)
    f = lora_linear_factory(["q", "v_proj", "down"], rank=2, alpha=4.0)
    model = nn.ModuleDict({n: f(n, 16, 16, False) for n in ["q_proj", "k_proj", "v_proj", "down_proj"]})
    assert isinstance(model["q_proj"], LoRALinear) and isinstance(model["down_proj"], LoRALinear)
    assert type(model["k_proj"]) is Linear
    params = get_adapter_params(model)
    assert set(params) == {f"{n}.{ab}.weight" for n in ["q_proj", "v_proj", "down_proj"] for ab in ["lora_a", "lora_b"]}
    n_train = set_trainable_params(model)
    assert n_train == 3 * (2 * 16 + 16 * 2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(
        n for n, _ in model.named_parameters() if "lora_" in n
    )
    for p in params.values():
        nn.init.normal_(p, std=0.1)
    sd = get_merged_state_dict(model)
    assert set(sd) == {f"{n}.weight" for n in ["q_proj", "k_proj", "v_proj", "down_proj"]}
    x = torch.randn(3, 16)
    want = {n: model[n](x) for n in model}
    merge_lora(model)
    for n in model:
        assert type(model[n]) is Linear
        torch.testing.assert_close(model[n](x), want[n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model[n].weight, sd[f"{n}.weight"])


def test_factory_rejects_unknown_module():
    with pytest.raises(ValueError, match="Unknown LoRA module 'qq'"):
        lora_linear_factory(["qq"], rank=2, alpha=4.0)


# ---- QLoRA -------------------------------------------------------------------------------------


def test_qlora_base_is_nf4_and_matches_dequantized_base():
    m = _lora(in_dim=64, out_dim=64, quantize=True)
    assert is_nf4(m.weight) and not m.weight.requires_grad
    w = dequantize(m.weight)
    x = torch.randn(2, 7, 64)
    with disable_adapters(m):
        torch.testing.assert_close(m(x), x @ w.T, atol=1e-5, rtol=1e-5)
    nn.init.zeros_(m.lora_b.weight)  # fresh adapter: output == dequantized base
    torch.testing.assert_close(m(x), x @ w.T, atol=1e-5, rtol=1e-5)


def test_qlora_backward_reaches_adapters_only():
    m = _lora(in_dim=64, out_dim=32, quantize=True)
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert m.lora_a.weight.grad is not None and m.lora_b.weight.grad is not None
    assert x.grad is not None and x.grad.shape == x.shape


def test_qlora_state_dict_round_trip_and_merge():
    m = _lora(in_dim=64, out_dim=32, quantize=True)
    sd = m.state_dict()
    assert not is_nf4(sd["weight"])  # exported dequantized
    plain = torch.randn(32, 64)
    m.load_state_dict({**sd, "weight": plain})  # re-quantized on load
    assert is_nf4(m.weight)
    assert (dequantize(m.weight) - plain).abs().max() < 0.25 * plain.abs().max()
    x = torch.randn(3, 64)
    want = m(x)
    merged = merge_lora(m)  # (torchao's NF4 clone ignores custom block sizes: no deepcopy here)
    torch.testing.assert_close(merged(x), want, atol=1e-4, rtol=1e-4)


def test_qlora_dtype_move_keeps_nf4():
    m = _lora(in_dim=64, out_dim=32, quantize=True)
    m.to(torch.bfloat16)
    assert is_nf4(m.weight) and m.weight.dtype == torch.bfloat16
    assert m.lora_a.weight.dtype == torch.bfloat16
    y = m(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_nf4_block_sizes():
    assert pick_nf4_block_sizes((2048, 512)) == (64, 256)
    assert pick_nf4_block_sizes((576, 576)) == (64, 64)  # 5184 blocks: 256 does not divide
    b, s = pick_nf4_block_sizes((48, 32))
    assert (48 * 32) % b == 0 and ((48 * 32) // b) % s == 0
    with pytest.raises(ValueError, match="Cannot quantize a weight of shape"):
        pick_nf4_block_sizes((3, 5))
