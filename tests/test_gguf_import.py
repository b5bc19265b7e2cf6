"""GGUF import: dequantization vs gguf's quantizer, q/k un-permute, HF export parity."""

import numpy as np
import pytest
import torch
from _ckpt_helpers import hf_logits, our_logits, tiny_hf_model, tokens

from tinytune.checkpoint import (
    CheckpointError,
    convert_gguf_to_hf,
    load_gguf_model,
    permute_qk,
    read_gguf,
    unpermute_qk,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

# tinytune-free names of the HF weights, as llama.cpp's converter maps them
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation in llama.cpp's convert_hf_to_gguf.py (reference for this test)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}"


def write_gguf(path, hf_model, qtypes: dict[str, Q], extra: dict | None = None):
    """Writes an HF llama model into a GGUF the way llama.cpp does (q/k permuted)."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    originals = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output tensor
        arr = t.detach().float().numpy()
        g = gguf_name(name)
        if g.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        qt = next((q for suffix, q in qtypes.items() if g.endswith(suffix)), Q.F32)
        if arr.ndim == 1:
            qt = Q.F32  # llama.cpp keeps norms in F32
        if qt == Q.F32:
            w.add_tensor(g, arr.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(g, arr.astype(np.float16))
        else:
            w.add_tensor(g, quantize(arr, qt), raw_dtype=qt)
        originals[g] = (arr, qt)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


def test_permute_matches_llama_cpp_and_inverts():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, 4), llama_cpp_permute(w, 4))
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 4), 4), w)
    t = torch.from_numpy(w)
    torch.testing.assert_close(unpermute_qk(permute_qk(t, 4), 4), t, atol=0, rtol=0)


@pytest.mark.parametrize("qt,tol", [(Q.F16, 2e-3), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.15)])
def test_dequantize_against_gguf_quantizer(qt, tol):
    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32) * 0.05
    q = x.astype(np.float16) if qt == Q.F16 else quantize(x, qt)
    d = dequantize(q, qt)
    assert np.abs(d - x).max() <= tol * np.abs(x).max()


def test_gguf_mixed_quant_round_trip(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=True, vocab_size=128)
    qtypes = {"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q8_0, "ffn_gate.weight": Q.F16, "token_embd.weight": Q.Q8_0}
    path = tmp_path / "mixed.gguf"
    originals = write_gguf(path, hf, qtypes)
    g = read_gguf(str(path))
    assert g.info.tie_word_embeddings and g.info.num_kv_heads == 2 and g.info.vocab_size == 128
    assert {"F32", "F16", "Q8_0", "Q4_0"} <= set(g.tensor_types.values())
    hf_sd = hf.state_dict()
    from tinytune.checkpoint import hf_key_map

    keymap = hf_key_map("llama")
    for name, ours in g.state_dict.items():
        ref = hf_sd[keymap.to_external(name)].float()
        gname = gguf_name(keymap.to_external(name))
        arr, qt = originals[gname]
        # exact: our result is gguf's dequantization, un-permuted
        deq = (
            arr
            if qt == Q.F32
            else (arr.astype(np.float16).astype(np.float32) if qt == Q.F16 else dequantize(quantize(arr, qt), qt))
        )
        if "attn_q" in gname:
            deq = unpermute_qk(deq, 4)
        elif "attn_k" in gname:
            deq = unpermute_qk(deq, 2)
        np.testing.assert_array_equal(ours.numpy(), deq.reshape(ours.shape))
        # close to the original HF weight within the quantization error
        tol = {Q.F32: 0, Q.F16: 2e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.2}[qt]
        assert (ours - ref).abs().max() <= tol * ref.abs().max() + 1e-7, name


def test_gguf_f32_convert_matches_hf_exactly(tmp_path):
    hf = tiny_hf_model("llama", tie_word_embeddings=False)
    path = tmp_path / "f32.gguf"
    write_gguf(path, hf, {})
    toks = tokens()
    ref = hf_logits(hf, toks)
    model, info = load_gguf_model(str(path))
    assert not info.tie_word_embeddings
    torch.testing.assert_close(our_logits(model, toks), ref, atol=2e-5, rtol=1e-4)
    from tinytune.checkpoint import load_hf_model
    from tinytune.modules.peft import lora_linear_factory

    lora, _ = load_hf_model(str(path), linear_factory=lora_linear_factory(["q_proj"], rank=2, alpha=4.0))
    torch.testing.assert_close(our_logits(lora, toks), ref, atol=2e-5, rtol=1e-4)  # B = 0 at init

    out, _ = convert_gguf_to_hf(str(path), str(tmp_path / "hf"), dtype=torch.float32, tokenizer=False)
    transformers = pytest.importorskip("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, toks), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(str(path), out, tokenizer=False)


def test_gguf_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        read_gguf(str(bad))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        read_gguf(str(tmp_path / "gpt2.gguf"))


def test_tune_convert_gguf_cli(tmp_path, capsys):
    from tinytune.cli.main import main

    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, {"ffn_up.weight": Q.Q8_0})
    out = tmp_path / "hf"
    assert (
        main(["convert", "gguf", str(path), str(out), "--dtype", "fp32", "--no-tokenizer", "--max-shard-size", "30KB"])
        == 0
    )
    assert str(out) in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    from tinytune.checkpoint import load_hf_model

    model, info = load_hf_model(str(out))
    assert info.tie_word_embeddings
    toks = tokens()
    torch.testing.assert_close(our_logits(model, toks), hf_logits(hf, toks), atol=0.05, rtol=0.05)
    assert main(["convert", "gguf", str(path), str(out), "--no-tokenizer"]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o2")]) == 1
    assert "missing.gguf" in capsys.readouterr().err


def test_rope_freqs_becomes_llama3_rope_scaling(tmp_path):
    import math

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    # reference: llama.cpp's converter computes the divisors like this
    head_dim, base = 64, 10000.0  # several frequencies inside the blended band to fit it
    hf = tiny_hf_model(
        "llama",
        rope_theta=base,
        max_position_embeddings=1024,
        head_dim=head_dim,
        rope_scaling={"rope_type": "llama3", **scaling},
    )
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        lo, hi = (
            scaling["original_max_position_embeddings"] / scaling["low_freq_factor"],
            scaling["original_max_position_embeddings"] / scaling["high_freq_factor"],
        )
        if wavelen < hi:
            factors.append(1.0)
        elif wavelen > lo:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    path = tmp_path / "l31.gguf"
    write_gguf(path, hf, {}, extra={"rope_freqs.weight": np.array(factors, np.float32)})
    g = read_gguf(str(path))
    assert g.info.rope_scaling == scaling
    model, _ = load_gguf_model(str(path))
    toks = tokens(s=200)  # beyond the original context: the scaling matters
    torch.testing.assert_close(our_logits(model, toks), hf_logits(hf, toks), atol=5e-5, rtol=1e-4)


def test_gguf_without_tokenizer_needs_no_tokenizer_flag(tmp_path):
    hf = tiny_hf_model("llama")
    path = tmp_path / "notok.gguf"
    write_gguf(path, hf, {})
    with pytest.raises(CheckpointError, match="--no-tokenizer"):
        convert_gguf_to_hf(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
