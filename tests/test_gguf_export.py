"""GGUF export, checked by independent consumers: transformers loads the file (gguf_file=...) and
its logits equal the HF model's with weights rounded like the file (f16/bf16) or quantized by
gguf's own Q8_0 quantizer; our GGUF import reads it back; transformers' GGUF tokenizer matches."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _ckpt_helpers import hf_logits, tiny_hf_model, tokens

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from tinytune.checkpoint import CheckpointError, convert_gguf_to_hf, read_gguf  # noqa: E402
from tinytune.checkpoint.gguf_writer import convert_hf_to_gguf  # noqa: E402
from tinytune.cli.main import main as tune_main  # noqa: E402
from tinytune.tokenizers import load_tokenizer  # noqa: E402

VOCAB = 49152  # the bundled SmolLM2 tokenizer's size
EXTRA = {"qwen3": {"head_dim": 128}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_with_tokenizer(tmp_path, smollm2_dir, model_type: str):
    """A tiny random HF model of ``model_type`` saved with SmolLM2's tokenizer files."""
    # Qwen3: transformers' GGUF config mapping has no head_dim and uses Qwen3Config's 128 (real Qwen3s use 128)
    hf = tiny_hf_model(model_type, seed=5, vocab_size=VOCAB, **EXTRA.get(model_type, {}))
    d = tmp_path / f"hf_{model_type}"
    hf.save_pretrained(str(d))
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(smollm2_dir, f)):
            shutil.copy(os.path.join(smollm2_dir, f), d / f)
    return hf, str(d)


def rounded_reference(hf, out_type: str):
    """The HF model with every 2-D weight rounded as the file stores it (norms/biases stay f32)."""
    ref = tiny_hf_model(hf.config.model_type, seed=5, vocab_size=VOCAB, **EXTRA.get(hf.config.model_type, {}))
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim != 2:
                continue
            if out_type == "f16":
                p.copy_(p.half().float())
            elif out_type == "bf16":
                p.copy_(p.bfloat16().float())
            elif out_type == "q8_0":
                arr = p.numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(arr, Q.Q8_0), Q.Q8_0).reshape(arr.shape)))
    return ref.eval()


def load_gguf_in_transformers(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


# Each family and each type in the default suite; the rest of the 3 x 3 matrix with `make test-slow`.
FAST = {("llama", "f16"), ("qwen2", "bf16"), ("qwen3", "q8_0")}
MATRIX = [
    pytest.param(m, t, marks=() if (m, t) in FAST else pytest.mark.slow)
    for m in ("llama", "qwen2", "qwen3")
    for t in ("f16", "bf16", "q8_0")
]


@pytest.mark.parametrize("model_type,out_type", MATRIX)
def test_transformers_loads_our_gguf(tmp_path, smollm2_dir, model_type, out_type):
    hf, d = tiny_with_tokenizer(tmp_path, smollm2_dir, model_type)
    path = convert_hf_to_gguf(d, str(tmp_path / "out" / f"m-{out_type}.gguf"), out_type)
    loaded = load_gguf_in_transformers(path)
    t = tokens(2, vocab=VOCAB, s=16)
    got = hf_logits(loaded, t)
    # equal to the HF model with weights rounded like the file: only fp32 op-order noise is left
    torch.testing.assert_close(got, hf_logits(rounded_reference(hf, out_type), t), atol=2e-5, rtol=1e-4)
    # against the unrounded model: the documented bounds (README) relative to the largest logit
    ref = hf_logits(hf, t)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < {"f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}[out_type], rel


@pytest.mark.parametrize(
    "model_type",
    ["llama", pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("qwen3", marks=pytest.mark.slow)],
)
def test_our_import_round_trips_the_export(tmp_path, smollm2_dir, model_type):
    hf, d = tiny_with_tokenizer(tmp_path, smollm2_dir, model_type)
    path = convert_hf_to_gguf(d, str(tmp_path / "m.gguf"), "f32")
    g = read_gguf(path)
    assert g.info.model_type == model_type and g.info.num_kv_heads == 2 and g.info.vocab_size == VOCAB
    assert g.info.tie_word_embeddings == hf.config.tie_word_embeddings
    from tinytune.checkpoint import hf_key_map

    keymap = hf_key_map(model_type)
    assert {keymap.to_external(k) for k in g.state_dict} | (
        {"lm_head.weight"} if g.info.tie_word_embeddings else set()
    ) == set(hf.state_dict())
    sd = hf.state_dict()
    for name, t in g.state_dict.items():  # f32: exact after our permute + the reader's un-permute
        torch.testing.assert_close(t, sd[keymap.to_external(name)], atol=0, rtol=0)
    assert g.metadata["tokenizer.chat_template"] == load_tokenizer(d).chat_template
    # back to an HF directory: same tokenizer behaviour as the source
    out, _ = convert_gguf_to_hf(path, str(tmp_path / "back"))
    a, b = load_tokenizer(d), load_tokenizer(out)
    text = "<|im_start|>user\nHello, what's 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert a.encode(text, add_bos=False, add_eos=False) == b.encode(text, add_bos=False, add_eos=False)
    assert (a.eos_id, a.bos_id) == (b.eos_id, b.bos_id)


def test_transformers_reads_our_tokenizer_metadata(tmp_path, smollm2_dir):
    _, d = tiny_with_tokenizer(tmp_path, smollm2_dir, "qwen2")
    path = convert_hf_to_gguf(d, str(tmp_path / "m.gguf"), "q8_0")
    got = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ref = transformers.AutoTokenizer.from_pretrained(d)
    text = "Hello world!  <|im_start|>user\nWhat's up? 123<|im_end|>"
    assert got(text)["input_ids"] == ref(text)["input_ids"]
    assert got.chat_template == ref.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_q8_0_keeps_odd_rows_in_f16_and_norms_in_f32(tmp_path, smollm2_dir):
    _, d = tiny_with_tokenizer(tmp_path, smollm2_dir, "llama")
    path = convert_hf_to_gguf(d, str(tmp_path / "m.gguf"), "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.attn_q.weight"] == Q.Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 96 = 3 blocks


def test_cli_and_bad_type(tmp_path, smollm2_dir, capsys):
    _, d = tiny_with_tokenizer(tmp_path, smollm2_dir, "llama")
    out = str(tmp_path / "cli.gguf")
    assert tune_main(["convert", "hf-to-gguf", d, out, "--type", "bf16"]) == 0
    assert "Wrote bf16 GGUF" in capsys.readouterr().out and os.path.isfile(out)
    assert tune_main(["convert", "hf-to-gguf", d, out]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert tune_main(["convert", "hf-to-gguf", d, out, "--type", "q4_k", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "tune convert: error: --type: 'q4_k' is not a GGUF type tinytune writes; choose f32, f16, bf16, q8_0\n"
    )
    with pytest.raises(CheckpointError, match="no byte-level BPE tokenizer.json"):
        os.remove(os.path.join(d, "tokenizer.json"))
        convert_hf_to_gguf(d, str(tmp_path / "x.gguf"))


def test_sentencepiece_tokenizer_export(tmp_path):
    """Llama 2 style: tokenizer.model goes in as a llama (SentencePiece) vocabulary that
    transformers' GGUF tokenizer reads back to the same ids as sentencepiece itself."""
    import sentencepiece as spm
    import tokenizer_refs as R

    proto = R.train_sentencepiece([s for s in R.corpus() if s.strip()] * 2)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    hf = tiny_hf_model("llama", seed=5, vocab_size=sp.get_piece_size() + 3)  # padded embedding rows
    d = tmp_path / "sp_model"
    hf.save_pretrained(str(d))
    (d / "tokenizer.model").write_bytes(proto)
    path = convert_hf_to_gguf(str(d), str(tmp_path / "sp.gguf"), "f16")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    toks = reader.fields["tokenizer.ggml.tokens"].contents()
    assert toks[: sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert toks[-1] == f"[PAD{sp.get_piece_size() + 2}]"
    got = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["Hello world, this is a test.", "Numbers 12345 and  spaces"]:
        assert got(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    t = tokens(3, vocab=sp.get_piece_size(), s=10)
    torch.testing.assert_close(
        hf_logits(load_gguf_in_transformers(path), t), hf_logits(rounded_reference_sp(hf), t), atol=2e-5, rtol=1e-4
    )


def rounded_reference_sp(hf):
    ref = tiny_hf_model("llama", seed=5, vocab_size=hf.config.vocab_size)
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return ref.eval()
