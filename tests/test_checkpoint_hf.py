"""HF checkpoint load/save: logits parity with transformers, sharding, .bin input, errors."""

import json

import pytest
import torch
from _ckpt_helpers import hf_logits, our_logits, tiny_hf_model, tokens

from tinytune.checkpoint import CheckpointError, load_hf_model, read_model_info, save_hf_checkpoint

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope_scaling": (
        "llama",
        {
            "rope_theta": 500000.0,
            "max_position_embeddings": 16384,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_round_trip(case, tmp_path):
    model_type, overrides = CASES[case]
    hf = tiny_hf_model(model_type, **overrides)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    toks = tokens(s=80)  # > original_max_position_embeddings: exercises the llama3 scaling
    ref = hf_logits(hf, toks)

    ours, info = load_hf_model(str(src))
    assert info.model_type == model_type
    assert not any(p.is_meta for p in ours.parameters())
    torch.testing.assert_close(our_logits(ours, toks), ref, atol=2e-5, rtol=1e-4)

    out = tmp_path / "out"
    save_hf_checkpoint(ours, info, str(out))
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, toks), ref, atol=2e-5, rtol=1e-4)
    for k, v in hf.state_dict().items():  # the weights themselves survive the round trip
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)


def test_sharded_save_and_load(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "src")
    ours, info = load_hf_model(str(tmp_path / "src"))
    out = tmp_path / "sharded"
    save_hf_checkpoint(ours, info, str(out), max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    toks = tokens()
    again, _ = load_hf_model(str(out))
    torch.testing.assert_close(our_logits(again, toks), hf_logits(hf, toks), atol=2e-5, rtol=1e-4)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, toks), hf_logits(hf, toks), atol=2e-5, rtol=1e-4)
    # saving again unsharded removes the stale shards and index
    save_hf_checkpoint(ours, info, str(out))
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bin_input_and_dtype(tmp_path):
    hf = tiny_hf_model("qwen2")
    src = tmp_path / "bin"
    src.mkdir()
    hf.config.save_pretrained(src)
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    ours, _ = load_hf_model(str(src))
    toks = tokens()
    torch.testing.assert_close(our_logits(ours, toks), hf_logits(hf, toks), atol=2e-5, rtol=1e-4)
    bf, _ = load_hf_model(str(src), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())


def test_tokenizer_files_copied(tmp_path):
    hf = tiny_hf_model("llama")
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    ours, info = load_hf_model(str(src))
    save_hf_checkpoint(ours, info, str(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "out" / "chat_template.jinja").is_file()


def _edit_weights(src, fn):
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_errors_name_key_and_file(tmp_path):
    hf = tiny_hf_model("llama")
    src = tmp_path / "src"
    hf.save_pretrained(src)

    _edit_weights(src, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.extra\.weight"):
        load_hf_model(str(src))

    hf.save_pretrained(src)
    _edit_weights(src, lambda sd: sd.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*norm\.weight.*\(3,\).*\(64,\)"):
        load_hf_model(str(src))

    hf.save_pretrained(src)
    _edit_weights(src, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(str(src))

    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*gpt2"):
        read_model_info(str(src))
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_model(str(tmp_path / "nowhere"))


def test_lm_head_absent_means_tied(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = False  # wrong flag, but the file has no lm_head
    (src / "config.json").write_text(json.dumps(cfg))
    ours, info = load_hf_model(str(src))
    assert info.tie_word_embeddings
    assert ours.output_weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()
    toks = tokens()
    torch.testing.assert_close(our_logits(ours, toks), hf_logits(hf, toks), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
def test_load_to_cuda_bf16(tmp_path):
    hf = tiny_hf_model("qwen3")
    hf.save_pretrained(tmp_path / "src")
    ours, _ = load_hf_model(str(tmp_path / "src"), dtype=torch.bfloat16, device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in ours.parameters())
    toks = tokens()
    with torch.no_grad():
        got = ours(toks.cuda()).float().cpu()
    torch.testing.assert_close(got, hf_logits(hf, toks), atol=0.1, rtol=0.05)
