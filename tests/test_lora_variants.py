"""LoRA variants (DoRA, rsLoRA, gaussian / PiSSA init, LoRA+) against peft and the papers' formulas:
exported adapters load in peft with the matching adapter_config fields and equal logits (fp32),
merges equal the adapter model, QLoRA + DoRA trains."""

import json
import math

import pytest
import torch
from _ckpt_helpers import hf_logits, our_logits, tiny_hf_model, tokens

from tinytune.checkpoint import load_hf_model, load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from tinytune.config.recipe_settings import LoRASettings
from tinytune.modules.peft import (
    LoRALinear,
    disable_adapters,
    get_adapter_params,
    get_merged_state_dict,
    lora_linear_factory,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True),
    "dora_rslora": dict(use_dora=True, use_rslora=True),
    "gaussian": dict(init="gaussian"),
    "pissa": dict(init="pissa"),
    "pissa_dora": dict(init="pissa", use_dora=True),
}


def _model(tmp_path, **variant):
    hf = tiny_hf_model("llama")
    src = tmp_path / "base"
    hf.save_pretrained(src)
    factory = lora_linear_factory(TARGETS, rank=4, alpha=8.0, **variant)
    model, info = load_hf_model(str(src), linear_factory=factory)
    return hf, model, info, src


def _train_a_little(model):
    """Moves every adapter parameter (A, B, magnitudes) off its init, deterministically."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.add_(torch.randn_like(p) * 0.05)


def test_dora_forward_matches_formula_and_merge():
    torch.manual_seed(0)
    m = LoRALinear(16, 12, rank=4, alpha=8.0, use_bias=True, use_dora=True)
    w0 = m.weight.detach().clone()
    torch.testing.assert_close(m.lora_magnitude.weight, w0.norm(dim=1))  # m starts at ||W||_row
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), x @ w0.T + m.bias)  # fresh DoRA adapter is the identity
    with torch.no_grad():
        m.lora_b.weight.normal_(0, 0.1)
        m.lora_magnitude.weight.mul_(1.3)
    v = w0 + 2.0 * m.lora_b.weight @ m.lora_a.weight  # W + s B A
    want = x @ ((m.lora_magnitude.weight / v.norm(dim=1))[:, None] * v).T + m.bias  # Liu et al. eq. 5
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x @ m.merged_weight().T + m.bias, want, atol=1e-6, rtol=1e-5)
    # gradients reach A, B and m; the norm is treated as a constant (detached)
    m(x).sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in (m.lora_a.weight, m.lora_b.weight, m.lora_magnitude.weight)
    )


def test_rslora_scaling_gaussian_and_pissa_init():
    torch.manual_seed(0)
    assert LoRALinear(16, 12, rank=4, alpha=8.0, use_rslora=True).scaling == pytest.approx(8.0 / math.sqrt(4))
    g = LoRALinear(64, 64, rank=8, alpha=8.0, init="gaussian")
    assert abs(float(g.lora_a.weight.std()) - 1 / 8) < 0.02 and torch.count_nonzero(g.lora_b.weight) == 0
    torch.manual_seed(1)
    w = torch.randn(12, 16)
    p = LoRALinear(16, 12, rank=4, alpha=8.0, init="pissa")
    with torch.no_grad():
        p.weight.copy_(w)
    p.reset_lora_parameters()
    s = 8.0 / 4
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    principal = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
    torch.testing.assert_close(s * p.lora_b.weight @ p.lora_a.weight, principal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.weight, w - principal, atol=1e-5, rtol=1e-5)  # residual base
    x = torch.randn(2, 16)
    torch.testing.assert_close(p(x), x @ w.T, atol=1e-5, rtol=1e-5)  # output unchanged at init
    with pytest.raises(ValueError, match="pissa.*quantize_base"):
        LoRALinear(16, 12, rank=4, alpha=8.0, init="pissa", quantize_base=True)
    with pytest.raises(ValueError, match="choose from"):
        LoRALinear(16, 12, rank=4, alpha=8.0, init="olora")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_adapter_loads_in_peft_with_equal_logits_and_merges(tmp_path, name):
    variant = VARIANTS[name]
    hf, model, info, src = _model(tmp_path, **variant)
    toks = tokens()
    base_logits = hf_logits(hf, toks)
    # fresh adapters leave the model unchanged (PiSSA: residual + principal part = W)
    torch.testing.assert_close(our_logits(model, toks), base_logits, atol=2e-5, rtol=1e-4)
    _train_a_little(model)
    with disable_adapters(model):  # the reference of DPO / KTO: the original base (PiSSA: residual + principal)
        torch.testing.assert_close(our_logits(model, toks), base_logits, atol=2e-5, rtol=1e-4)
    ours = our_logits(model, toks)
    assert not torch.allclose(ours, base_logits, atol=1e-3)
    out = tmp_path / "adapter"
    lora = LoRASettings(
        lora_rank=4,
        lora_alpha=8.0,
        use_dora=variant.get("use_dora", False),
        use_rslora=variant.get("use_rslora", False),
        lora_init=variant.get("init", "default"),
    )
    save_peft_adapter(model, info, str(out), lora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] == variant.get("use_dora", False)
    assert cfg["use_rslora"] == variant.get("use_rslora", False)
    pissa = variant.get("init") == "pissa"
    assert cfg["r"] == (8 if pissa else 4)  # PiSSA goes out converted to plain LoRA of rank 2r
    assert cfg["init_lora_weights"] == ("gaussian" if variant.get("init") == "gaussian" else True)
    peft_model = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), str(out)).eval()
    torch.testing.assert_close(hf_logits(peft_model, toks), ours, atol=1e-4, rtol=1e-4)
    # merged export (transformers) equals the adapter model; so does our module merge
    save_hf_checkpoint(model, info, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(merged, toks), ours, atol=1e-4, rtol=1e-4)
    sd = get_merged_state_dict(model)
    assert not any("lora" in k for k in sd)
    if not pissa:  # peft's own merge agrees with ours weight by weight
        merged_peft = peft_model.merge_and_unload()
        q_peft = merged_peft.model.layers[0].self_attn.q_proj.weight
        torch.testing.assert_close(sd["layers.0.attn.q_proj.weight"], q_peft, atol=1e-6, rtol=1e-5)
        # and the peft adapter loads back into a fresh tinytune model of the same variant
        fresh, _ = load_hf_model(str(src), linear_factory=lora_linear_factory(TARGETS, rank=4, alpha=8.0, **variant))
        load_peft_adapter(str(out), info, fresh)
        torch.testing.assert_close(our_logits(fresh, toks), ours, atol=1e-6, rtol=1e-6)


def test_qlora_with_dora_trains(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "base")
    factory = lora_linear_factory(["q_proj", "v_proj"], rank=4, alpha=8.0, quantize_base=True, use_dora=True)
    model, info = load_hf_model(str(tmp_path / "base"), linear_factory=factory)
    q = model.layers[0].attn.q_proj
    assert type(q.weight.data).__name__ == "NF4Tensor"
    from tinytune.modules.peft.nf4 import dequantize

    torch.testing.assert_close(q.lora_magnitude.weight, dequantize(q.weight).float().norm(dim=1))
    from tinytune.modules.peft import set_trainable_params

    set_trainable_params(model)
    toks = tokens()
    loss = model(toks).float().logsumexp(-1).mean()
    loss.backward()
    assert q.lora_magnitude.weight.grad is not None and q.lora_a.weight.grad is not None


def test_loraplus_param_groups():
    from omegaconf import OmegaConf

    from tinytune.config.recipe_settings import OptimSettings
    from tinytune.training.steps import build_optimizer_and_scheduler

    torch.manual_seed(0)
    layer = torch.nn.Sequential(LoRALinear(8, 8, rank=2, alpha=4.0), torch.nn.LayerNorm(8))
    layer[0].weight.requires_grad_(False)
    cfg = OptimSettings.from_config(OmegaConf.create({"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}}))
    opt, _ = build_optimizer_and_scheduler(cfg, layer.named_parameters(), 10, loraplus_lr_ratio=16.0)
    lrs = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert lrs[id(layer[0].lora_b.weight)] == pytest.approx((1.6e-2, 0.1))
    assert lrs[id(layer[0].lora_a.weight)] == pytest.approx((1e-3, 0.1))
    assert lrs[id(layer[1].weight)] == pytest.approx((1e-3, 0.1))
    assert lrs[id(layer[1].bias)] == pytest.approx((1e-3, 0.0))  # biases: no decay
    assert id(layer[0].weight) not in lrs  # frozen parameters are left out
    with pytest.raises(ValueError, match="no trainable LoRA B"):
        build_optimizer_and_scheduler(cfg, torch.nn.Linear(2, 2).named_parameters(), 10, loraplus_lr_ratio=2.0)
