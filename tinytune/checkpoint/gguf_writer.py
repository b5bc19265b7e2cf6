"""Writing GGUF files (llama.cpp / Ollama) with the ``gguf`` package's writer.

Architectures: ``llama`` (Llama 2/3, SmolLM2), ``qwen2`` (Qwen2/2.5), ``qwen3``. Tensor names and
metadata follow llama.cpp's converter: llama q/k rows are permuted into llama.cpp's interleaved
RoPE order (``permute_qk``; Qwen uses NEOX RoPE and is written as is), norms and biases stay F32,
2-D weights get the requested type (``f32``, ``f16``, ``bf16``, ``q8_0``; a q8_0 matrix whose row
length is not a multiple of 32 falls back to F16). The tokenizer (byte-level BPE from
``tokenizer.json``, or SentencePiece from ``tokenizer.model``), its special ids, ``add_bos`` and
the chat template go into the metadata. Llama 3.1 style RoPE scaling is written as llama.cpp's
``rope_freqs`` tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tinytune.checkpoint.atomic import write_file_atomic
from tinytune.checkpoint.gguf_reader import _gguf, permute_qk
from tinytune.checkpoint.keys import gguf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = ("llama", "qwen2", "qwen3")


def check_gguf_type(out_type: str, key: str = "--type") -> str:
    """Lower-cased ``out_type`` when tinytune writes it.

    Raises:
        CheckpointError: ``KEY: 'X' is not a GGUF type tinytune writes; choose f32, f16, bf16, q8_0``.
    """
    t = str(out_type).lower()
    if t not in GGUF_TYPES:
        raise CheckpointError(f"{key}: {out_type!r} is not a GGUF type tinytune writes; choose {', '.join(GGUF_TYPES)}")
    return t


def _tensor_type(out_type: str, arr: np.ndarray):
    q = _gguf().GGMLQuantizationType
    if arr.ndim == 1 or out_type == "f32":
        return q.F32
    if out_type == "q8_0" and arr.shape[-1] % 32 == 0:
        return q.Q8_0
    return q.BF16 if out_type == "bf16" else q.F16


def _add_tensor(writer, name: str, arr: np.ndarray, qtype) -> None:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif qtype == q.F16:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
    else:  # BF16 and Q8_0 are packed by gguf's quantizer
        writer.add_tensor(
            name, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), raw_dtype=qtype
        )


def _file_type(out_type: str) -> int:
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[out_type]


def _pre_tokenizer(info: ModelInfo) -> str:
    """llama.cpp's pre-tokenizer name for the families tinytune trains (``default`` otherwise)."""
    if info.model_type in ("qwen2", "qwen3"):
        return "qwen2"
    return {128256: "llama-bpe", 49152: "smollm"}.get(info.vocab_size, "default")


def _bpe_vocab(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` of a byte-level BPE ``tokenizer.json``, padded to ``n_vocab``."""
    tt = _gguf().TokenType
    model = tokenizer_json["model"]
    tokens: list[str | None] = [None] * n_vocab
    types = [int(tt.NORMAL)] * n_vocab
    for tok, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = tok
    for a in tokenizer_json.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = int(tt.CONTROL if a.get("special") else tt.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows beyond the tokenizer (padded vocab), as llama.cpp names them
            tokens[i] = f"[PAD{i}]"
            types[i] = int(tt.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges  # type: ignore[return-value]


def add_tokenizer(writer, info: ModelInfo, tokenizer_dir: str, chat_template: str | None = None) -> None:
    """Writes the tokenizer of ``tokenizer_dir`` into the GGUF metadata.

    Raises:
        CheckpointError: no byte-level BPE ``tokenizer.json`` and no SentencePiece ``tokenizer.model``.
    """
    gguf = _gguf()
    n = info.vocab_size
    tj_path = os.path.join(tokenizer_dir, "tokenizer.json")
    tj = None
    if os.path.isfile(tj_path):
        with open(tj_path, encoding="utf-8") as f:
            tj = json.load(f)
    if tj is not None and tj["model"].get("type") == "BPE" and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, types, merges = _bpe_vocab(tj, n)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(info))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    elif os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model")):
        vocab = gguf.vocab.SentencePieceVocab(Path(tokenizer_dir))
        toks, scores, types = zip(*vocab.all_tokens())
        if len(toks) > n:
            raise CheckpointError(f"{tokenizer_dir}: tokenizer has {len(toks)} tokens, the model only {n} embeddings")
        pad = n - len(toks)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(toks) + [f"[PAD{i}]".encode() for i in range(len(toks), n)])
        writer.add_token_scores(list(scores) + [-1000.0] * pad)
        writer.add_token_types([int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * pad)
        merges = []
    else:
        raise CheckpointError(
            f"{tokenizer_dir}: no byte-level BPE tokenizer.json and no SentencePiece tokenizer.model; GGUF export "
            "needs one of them (pass the model's original directory as the tokenizer source)"
        )
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=n)
    special.merges = merges
    if special.chat_template is None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def _rope_freqs(info: ModelInfo) -> np.ndarray:
    """llama.cpp's per-frequency divisors for Llama 3.1 style RoPE scaling, float32 [head_dim/2]."""
    from tinytune.modules.position_embeddings import RotaryPositionalEmbeddings  # noqa: PLC0415  (models layer)

    cpu = torch.device("cpu")
    plain = RotaryPositionalEmbeddings(info.head_dim, base=info.rope_base).inv_freq(cpu)
    scaled = RotaryPositionalEmbeddings(info.head_dim, base=info.rope_base, rope_scaling=info.rope_scaling).inv_freq(
        cpu
    )
    return (plain / scaled).float().numpy()


def write_gguf(
    state_dict: Mapping[str, torch.Tensor],
    info: ModelInfo,
    out_path: str,
    out_type: str = "f16",
    *,
    tokenizer_dir: str | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> str:
    """Writes a tinytune-named state dict (merged LoRA) as a GGUF file, atomically.

    Args:
        state_dict: tinytune parameter names (docs/ARCHITECTURE.md); LoRA keys must be merged.
        info: the model's hyperparameters.
        out_path: the ``.gguf`` file.
        out_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (2-D weights; norms/biases stay F32).
        tokenizer_dir: directory with the tokenizer files (default ``info.source_dir``).
        chat_template: used when the tokenizer files carry none.
        name: ``general.name`` (default: the output file's stem).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: unknown type or architecture, unmerged LoRA keys, no tokenizer.
    """
    gguf = _gguf()
    out_type = check_gguf_type(out_type)
    arch = info.model_type
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF export supports {', '.join(ARCHITECTURES)}, not model_type {arch!r}")
    tokenizer_dir = tokenizer_dir or info.source_dir
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise CheckpointError("GGUF export needs the tokenizer files: pass tokenizer_dir (the model's directory)")
    keymap = gguf_key_map(arch)

    def write(tmp_path: str) -> None:
        w = gguf.GGUFWriter(tmp_path, arch)
        w.add_name(name or os.path.splitext(os.path.basename(out_path))[0])
        w.add_context_length(info.max_seq_len)
        w.add_embedding_length(info.dim)
        w.add_block_count(info.num_layers)
        w.add_feed_forward_length(info.hidden_dim)
        w.add_head_count(info.num_heads)
        w.add_head_count_kv(info.num_kv_heads)
        w.add_key_length(info.head_dim)
        w.add_value_length(info.head_dim)
        w.add_rope_dimension_count(info.head_dim)
        w.add_rope_freq_base(float(info.rope_base))
        w.add_layer_norm_rms_eps(float(info.norm_eps))
        w.add_vocab_size(info.vocab_size)
        w.add_file_type(int(_file_type(out_type)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, info, tokenizer_dir, chat_template)
        if info.rope_scaling:
            w.add_tensor("rope_freqs.weight", _rope_freqs(info))
        for key, t in state_dict.items():
            if key == "output.weight" and info.tie_word_embeddings:
                continue  # tied: llama.cpp reads token_embd for the output
            ext = keymap.to_external(key)
            if ext is None:
                raise CheckpointError(f"state dict key {key!r} has no GGUF name for {arch} (merge LoRA weights first)")
            arr = t.detach().to("cpu", torch.float32).numpy()
            if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
                arr = permute_qk(arr, info.num_heads)
            elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
                arr = permute_qk(arr, info.num_kv_heads)
            _add_tensor(w, ext, arr, _tensor_type(out_type, arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_file_atomic(out_path, write)
    return out_path


def convert_hf_to_gguf(hf_dir: str, out_path: str, out_type: str = "f16") -> str:
    """``tune convert hf-to-gguf``: an HF checkpoint directory -> one GGUF file.

    Returns:
        ``out_path``.
    """
    from tinytune.checkpoint.model_loading import load_hf_model  # noqa: PLC0415  (loader imports the model builders)
    from tinytune.tokenizers import load_tokenizer  # noqa: PLC0415

    out_type = check_gguf_type(out_type)
    model, info = load_hf_model(hf_dir, dtype=torch.float32)
    try:
        template = getattr(load_tokenizer(hf_dir), "chat_template", None)
    except (FileNotFoundError, ValueError):
        template = None  # no tokenizer here: add_tokenizer says what is missing
    return write_gguf(model.state_dict(), info, out_path, out_type, tokenizer_dir=hf_dir, chat_template=template)
