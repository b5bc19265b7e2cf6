"""LoRA / QLoRA model builders: logits before training, merge, and parity with peft on an HF model."""

import os

import pytest
import torch

from tinytune.models import lora_builders
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.modules.peft import LoRALinear, get_adapter_params, get_merged_state_dict, merge_lora
from tinytune.modules.peft.nf4 import dequantize, is_nf4

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _tokens():
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["smollm2", "llama3", "llama2", "qwen2", "qwen3"])
def test_lora_builder_logits_equal_base_before_training(family):
    from importlib import import_module

    base_fn = getattr(import_module(f"tinytune.models.{family}"), f"{family}_tiny")
    torch.manual_seed(0)
    base = base_fn()
    lora = getattr(lora_builders, f"lora_{family}_tiny")(lora_attn_modules=ALL, apply_lora_to_mlp=True)
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 7 * len(lora.layers)
    t = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(lora(t), base(t), atol=1e-5, rtol=1e-5)


def test_qlora_builder_logits_equal_dequantized_base():
    torch.manual_seed(0)
    base = smollm2_tiny()
    q = lora_builders.qlora_smollm2_tiny(lora_attn_modules=ALL, apply_lora_to_mlp=True)
    q.load_state_dict(base.state_dict(), strict=False)
    assert all(is_nf4(m.weight) for m in q.modules() if isinstance(m, LoRALinear))
    ref = smollm2_tiny()
    ref.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" not in k})  # dequantized base
    t = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(q(t), ref(t), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(q(t), base(t), atol=1e-6)  # NF4 really changed the weights


def test_merged_model_equals_adapter_model():
    torch.manual_seed(0)
    m = lora_builders.lora_smollm2_tiny(lora_attn_modules=ALL, apply_lora_to_mlp=True)
    for p in get_adapter_params(m).values():
        torch.nn.init.normal_(p, std=0.05)
    t = _tokens()
    with torch.no_grad():
        want = m(t)
        sd = get_merged_state_dict(m)
        plain = smollm2_tiny()
        plain.load_state_dict(sd)
        torch.testing.assert_close(plain(t), want, atol=1e-5, rtol=1e-5)
        merge_lora(m)
        assert not any(isinstance(x, LoRALinear) for x in m.modules())
        torch.testing.assert_close(m(t), want, atol=1e-5, rtol=1e-5)


def test_lora_matches_peft_on_hf_llama(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tinytune.checkpoint import ModelInfo, save_hf_checkpoint

    torch.manual_seed(0)
    ours = lora_builders.lora_smollm2_tiny(lora_attn_modules=ALL, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    for p in get_adapter_params(ours).values():
        torch.nn.init.normal_(p, std=0.05)
    info = ModelInfo(
        model_type="llama",
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_dim=160,
        norm_eps=1e-5,
        rope_base=100_000.0,
        max_seq_len=512,
        tie_word_embeddings=True,
    )
    base_sd = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    save_hf_checkpoint(base_sd, info, str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL + ["gate_proj", "up_proj", "down_proj"]
    )
    pm = peft.get_peft_model(hf, cfg)
    named = dict(pm.named_parameters())
    with torch.no_grad():
        for k, v in get_adapter_params(ours).items():
            layer, rest = k.split(".", 2)[1], k.split(".", 2)[2]  # layers.{i}.attn.q_proj.lora_a.weight
            block, proj, ab = rest.split(".")[:3]
            hf_block = "self_attn" if block == "attn" else "mlp"
            key = (
                f"base_model.model.model.layers.{layer}.{hf_block}.{proj}."
                f"{'lora_A' if ab == 'lora_a' else 'lora_B'}.default.weight"
            )
            named[key].copy_(v)
    t = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(t), pm(t).logits, atol=1e-4, rtol=1e-4)
        merged_hf = pm.merge_and_unload()
        merged_ours = get_merged_state_dict(ours)
        for i in range(2):
            torch.testing.assert_close(
                merged_ours[f"layers.{i}.attn.q_proj.weight"],
                merged_hf.model.layers[i].self_attn.q_proj.weight,
                atol=1e-6,
                rtol=1e-6,
            )
            torch.testing.assert_close(
                merged_ours[f"layers.{i}.mlp.down_proj.weight"],
                merged_hf.model.layers[i].mlp.down_proj.weight,
                atol=1e-6,
                rtol=1e-6,
            )
    assert os.path.isdir(tmp_path / "base")
