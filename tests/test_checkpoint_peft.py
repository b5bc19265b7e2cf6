"""PEFT adapter export (loads in peft with equal logits) and merged export (loads in transformers)."""

import json

import pytest
import torch
from _ckpt_helpers import hf_logits, our_logits, tiny_hf_model, tokens

from tinytune.checkpoint import (
    CheckpointError,
    load_hf_model,
    load_peft_adapter,
    merge_lora_state_dict,
    save_hf_checkpoint,
    save_peft_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
lora_mod = pytest.importorskip("tinytune.modules.peft")

LORA_CFG = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}


def _lora_model(tmp_path, model_type, targets, **overrides):
    hf = tiny_hf_model(model_type, **overrides)
    src = tmp_path / "base"
    hf.save_pretrained(src)
    factory = lora_mod.lora_linear_factory(targets, rank=4, alpha=8.0)
    model, info = load_hf_model(str(src), linear_factory=factory)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(0, 0.05)  # non-zero B so the adapter changes the output
    return hf, model, info, src


@pytest.mark.parametrize(
    "model_type,targets,overrides",
    [
        ("llama", ["q_proj", "v_proj", "gate_proj", "down_proj", "output"], {}),
        ("qwen2", ["q_proj", "k_proj", "o_proj", "up_proj"], {"tie_word_embeddings": True}),
    ],
)
def test_peft_adapter_matches_peft(tmp_path, model_type, targets, overrides):
    hf, model, info, src = _lora_model(tmp_path, model_type, targets, **overrides)
    toks = tokens()
    ours = our_logits(model, toks)
    assert not torch.allclose(ours, hf_logits(hf, toks), atol=1e-3)  # the adapter does something

    out = tmp_path / "adapter"
    save_peft_adapter(model, info, str(out), LORA_CFG)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    expect_targets = {"output": "lm_head"}
    assert sorted(cfg["target_modules"]) == sorted(expect_targets.get(t, t) for t in targets)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    peft_model = peft.PeftModel.from_pretrained(tiny_hf_model(model_type, **overrides), str(out)).eval()
    torch.testing.assert_close(hf_logits(peft_model, toks), ours, atol=2e-5, rtol=1e-4)

    # adapter back into a fresh tinytune LoRA model
    factory = lora_mod.lora_linear_factory(targets, rank=4, alpha=8.0)
    fresh, _ = load_hf_model(str(src), linear_factory=factory)
    load_peft_adapter(str(out), info, fresh)
    torch.testing.assert_close(our_logits(fresh, toks), ours, atol=1e-6, rtol=1e-6)


def test_merged_export_equals_adapter_model(tmp_path):
    hf, model, info, _ = _lora_model(tmp_path, "llama", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "output"])
    toks = tokens()
    ours = our_logits(model, toks)
    out = tmp_path / "merged"
    save_hf_checkpoint(model, info, str(out), lora_cfg=LORA_CFG)  # merged W + alpha/r * B @ A
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(merged, toks), ours, atol=5e-5, rtol=1e-4)
    # without lora_cfg the scaling comes from the model's LoRA modules
    save_hf_checkpoint(model, info, str(tmp_path / "merged2"))
    again, _ = load_hf_model(str(tmp_path / "merged2"))
    torch.testing.assert_close(our_logits(again, toks), ours, atol=5e-5, rtol=1e-4)
    # and it agrees with the LoRA module's own merge
    sd = merge_lora_state_dict(model.state_dict(), 8.0 / 4)
    q = model.layers[0].attn.q_proj
    torch.testing.assert_close(sd["layers.0.attn.q_proj.weight"], q.merged_weight())


def test_unmerged_lora_state_dict_needs_settings(tmp_path):
    _, model, info, _ = _lora_model(tmp_path, "llama", ["q_proj"])
    with pytest.raises(CheckpointError, match="lora_rank and lora_alpha"):
        save_hf_checkpoint(dict(model.state_dict()), info, str(tmp_path / "x"), lora_cfg={"lora_rank": 4})
    with pytest.raises(CheckpointError, match="no LoRA weights"):
        save_peft_adapter({"layers.0.attn.q_proj.weight": torch.zeros(2, 2)}, info, str(tmp_path / "y"), LORA_CFG)


def test_qlora_load_keeps_nf4_base_and_exports(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "base")
    factory = lora_mod.lora_linear_factory(["q_proj", "v_proj"], rank=4, alpha=8.0, quantize_base=True)
    model, info = load_hf_model(str(tmp_path / "base"), dtype=torch.bfloat16, linear_factory=factory)
    q = model.layers[0].attn.q_proj
    assert type(q.weight.data).__name__ == "NF4Tensor" and not q.weight.requires_grad
    assert q.lora_a.weight.requires_grad and torch.count_nonzero(q.lora_b.weight) == 0
    toks = tokens()
    ref = hf_logits(hf, toks)
    assert (our_logits(model, toks) - ref).abs().max() < 0.2  # bf16 + 4-bit base
    save_hf_checkpoint(model, info, str(tmp_path / "out"))  # NF4 base is dequantized on save
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, toks), our_logits(model, toks), atol=0.05, rtol=0.05)
