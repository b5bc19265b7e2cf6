"""Reading llama / qwen2 / qwen3 GGUF files: hyperparameters, dequantized tensors, q/k un-permute.

llama.cpp's converter reorders the rows of the q and k projections of every head so that the two
rotary halves are interleaved (pairs ``(x[2i], x[2i+1])``). tinytune (like HF transformers) uses
the rotate-half convention, so :func:`unpermute_qk` restores the original row order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tinytune.checkpoint.keys import gguf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo
from tinytune.modules.position_embeddings import RotaryPositionalEmbeddings


def _gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from None
    return gguf


def permute_qk(w: np.ndarray | torch.Tensor, n_heads: int):
    """llama.cpp's row order: per head, interleave the two rotary halves (``[out, in]`` or ``[out]``)."""
    head_dim = w.shape[0] // n_heads
    rest = tuple(w.shape[1:])
    x = w.reshape(n_heads, 2, head_dim // 2, *rest)
    x = x.swapaxes(1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)
    return x.reshape(w.shape)


def unpermute_qk(w: np.ndarray | torch.Tensor, n_heads: int):
    """Inverse of :func:`permute_qk`: back to rotate-half row order."""
    head_dim = w.shape[0] // n_heads
    rest = tuple(w.shape[1:])
    x = w.reshape(n_heads, head_dim // 2, 2, *rest)
    x = x.swapaxes(1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)
    return x.reshape(w.shape)


def dequantize_tensor(tensor: Any, path: str = "") -> np.ndarray:
    """Dequantizes one ``gguf.ReaderTensor`` to float32 in numpy (row-major) shape.

    Supports every type ``gguf.quants`` implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, K-quants, ...).

    Raises:
        CheckpointError: the tensor type cannot be dequantized.
    """
    gguf = _gguf()
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
    try:
        out = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which gguf cannot dequantize; "
            "re-export the GGUF with F16/Q8_0/Q4_0/Q4_1 tensors"
        ) from None
    out = np.asarray(out, dtype=np.float32).reshape(shape)
    if not out.flags.writeable or not out.flags.c_contiguous:  # F32 tensors are views of the mmap
        out = np.array(out, copy=True, order="C")
    return out


@dataclass
class GGUFModel:
    """A GGUF file read into memory.

    Attributes:
        info: hyperparameters (HF ``model_type`` llama).
        state_dict: tinytune-named float32 tensors (q/k un-permuted).
        metadata: all scalar / small metadata fields (token arrays excluded).
        tensor_types: tinytune name -> GGUF type name (e.g. ``Q4_1``).
    """

    info: ModelInfo
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)


def _field(reader: Any, key: str, path: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise CheckpointError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    return f.contents()


def read_gguf_metadata(reader: Any, path: str) -> dict[str, Any]:
    """All metadata fields except the big tokenizer arrays."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _f32(x: float) -> float:
    """GGUF stores these as float32: drop the float32 noise (9.9999997e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


IMPORT_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # qwen: NEOX RoPE, rows are stored unpermuted


def gguf_model_info(reader: Any, path: str) -> ModelInfo:
    """Reads the hyperparameters of a llama-architecture GGUF into a :class:`ModelInfo`."""
    arch = _field(reader, "general.architecture", path)
    if arch not in IMPORT_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (tinytune imports {', '.join(IMPORT_ARCHITECTURES)})"
        )
    dim = int(_field(reader, f"{arch}.embedding_length", path))
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", path, heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _field(reader, f"{arch}.vocab_size", path)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", path, dim // heads))
    names = {t.name for t in reader.tensors}
    cfg_ids = {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", path, None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", path, None),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", path, None),
    }
    return ModelInfo(
        model_type=arch,
        qkv_bias=arch == "qwen2",  # Qwen2/2.5 always carry q/k/v biases
        qk_norm=arch == "qwen3",
        vocab_size=int(vocab),
        dim=dim,
        num_layers=int(_field(reader, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_dim=int(_field(reader, f"{arch}.feed_forward_length", path)),
        norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        rope_base=_f32(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        max_seq_len=int(_field(reader, f"{arch}.context_length", path, 4096)),
        tie_word_embeddings="output.weight" not in names,
        hf_config={k: int(v) for k, v in cfg_ids.items() if v is not None},
        source_dir=None,
    )


_LLAMA3_GRID = {
    "low_freq_factor": (1.0, 2.0),
    "high_freq_factor": (2.0, 4.0, 8.0),
    "original_max_position_embeddings": (8192, 4096, 2048, 16384, 32768),
}


def fit_llama3_rope_scaling(rope_freqs: np.ndarray, info: ModelInfo, path: str = "") -> dict | None:
    """Recovers HF ``rope_scaling`` (llama3 type) from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp divides each RoPE frequency by ``rope_freqs[i]``; HF describes the same scaling by
    ``factor``, ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``.
    ``factor`` is the largest divisor; the other three come from a line fit through the blended
    band (or a grid of the values released models use) and are accepted only when they
    reproduce every divisor.

    Raises:
        CheckpointError: no parameter set reproduces the tensor.
    """

    freqs = torch.from_numpy(np.asarray(rope_freqs, dtype=np.float32)).reshape(-1)  # [head_dim/2]
    if torch.allclose(freqs, torch.ones_like(freqs)):
        return None
    plain = RotaryPositionalEmbeddings(info.head_dim, base=info.rope_base).inv_freq(torch.device("cpu"))
    if plain.shape != freqs.shape:
        raise CheckpointError(f"{path}: rope_freqs has {freqs.numel()} entries, expected {plain.numel()}")
    factor = float(freqs.max())
    candidates = [
        (low, high, orig)
        for low in _LLAMA3_GRID["low_freq_factor"]
        for high in _LLAMA3_GRID["high_freq_factor"]
        for orig in _LLAMA3_GRID["original_max_position_embeddings"]
    ]
    # In the blended band the divisor is 1 / ((1 - s) / factor + s) with s linear in 1/wavelength:
    # s = orig / (high - low) / wavelen - low / (high - low). Fit the line, then try each low.
    medium = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    if int(medium.sum()) >= 2:
        s_i = ((1 / freqs[medium]) - 1 / factor) / (1 - 1 / factor)  # [m]
        x = plain[medium].double() / (2 * math.pi)  # 1 / wavelength, [m]
        slope, intercept = np.polyfit(x.numpy(), s_i.double().numpy(), 1)
        if intercept < 0:  # (low, high, orig) is fixed up to a common scale: prefer low = 1
            fitted = []
            for low in _LLAMA3_GRID["low_freq_factor"]:
                span = -low / float(intercept)  # high - low
                fitted.append((low, round(low + span, 4), int(round(float(slope) * span))))
            candidates = fitted + candidates
    for low, high, orig in candidates:
        cand = {
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
        rope = RotaryPositionalEmbeddings(info.head_dim, base=info.rope_base, rope_scaling=cand)
        divisors = plain / rope.inv_freq(torch.device("cpu"))  # [head_dim/2]
        if torch.allclose(divisors, freqs, rtol=1e-4, atol=1e-5):
            return cand
    raise CheckpointError(
        f"{path}: rope_freqs does not match Llama 3 style scaling with factor {factor}; "
        "this rope scaling cannot be expressed as an HF config"
    )


def read_gguf(path: str, dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Reads a llama-architecture GGUF: hyperparameters and every tensor, dequantized.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned tensors.

    Returns:
        A :class:`GGUFModel` with tinytune parameter names.

    Raises:
        CheckpointError: unsupported architecture, unknown tensor name, missing tensors, or a
            tensor whose shape does not match the metadata.
    """
    gguf = _gguf()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    info = gguf_model_info(reader, path)
    keymap = gguf_key_map(info.model_type)
    permuted = info.model_type == "llama"  # llama.cpp interleaves llama's q/k rows only
    sd: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3.1+ rope scaling, stored as per-frequency divisors
            info.rope_scaling = fit_llama3_rope_scaling(dequantize_tensor(t, path), info, path)
            continue
        if keymap.is_ignored(t.name):
            continue
        name = keymap.to_tinytune(t.name)
        if name is None:
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} has no tinytune equivalent")
        w = dequantize_tensor(t, path)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, info.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, info.num_kv_heads)
        sd[name] = torch.from_numpy(w).to(dtype)
        types[name] = t.tensor_type.name
    _check_shapes(sd, info, path)
    return GGUFModel(info=info, state_dict=sd, metadata=read_gguf_metadata(reader, path), tensor_types=types)


def _check_shapes(sd: dict[str, torch.Tensor], info: ModelInfo, path: str) -> None:
    """Verifies that every expected tensor is present with the shape the metadata implies."""
    q = info.num_heads * info.head_dim
    kv = info.num_kv_heads * info.head_dim
    expect = {"tok_embeddings.weight": (info.vocab_size, info.dim), "norm.weight": (info.dim,)}
    if not info.tie_word_embeddings:
        expect["output.weight"] = (info.vocab_size, info.dim)
    for i in range(info.num_layers):
        p = f"layers.{i}."
        expect.update(
            {
                p + "sa_norm.weight": (info.dim,),
                p + "attn.q_proj.weight": (q, info.dim),
                p + "attn.k_proj.weight": (kv, info.dim),
                p + "attn.v_proj.weight": (kv, info.dim),
                p + "attn.o_proj.weight": (info.dim, q),
                p + "mlp_norm.weight": (info.dim,),
                p + "mlp.gate_proj.weight": (info.hidden_dim, info.dim),
                p + "mlp.up_proj.weight": (info.hidden_dim, info.dim),
                p + "mlp.down_proj.weight": (info.dim, info.hidden_dim),
            }
        )
        if info.qkv_bias:
            expect.update({p + "attn.q_proj.bias": (q,), p + "attn.k_proj.bias": (kv,), p + "attn.v_proj.bias": (kv,)})
        if info.qk_norm:
            expect.update({p + "attn.q_norm.weight": (info.head_dim,), p + "attn.k_norm.weight": (info.head_dim,)})
    missing = sorted(set(expect) - set(sd))
    if missing:
        raise CheckpointError(f"{path}: GGUF is missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, shape in expect.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, metadata implies {shape}")
    if any(k.endswith(".bias") for k in sd) != info.qkv_bias:
        raise CheckpointError(
            f"{path}: q/k/v biases are {'missing' if info.qkv_bias else 'not supported'} for "
            f"GGUF {info.model_type} import"
        )
