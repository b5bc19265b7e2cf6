"""Key tables: checkpoint parameter names <-> tinytune parameter names, as data.

Each family has a list of rows ``(external_template, tinytune_template)``. Templates contain
placeholders in braces (``{layer}``, ``{proj}``, ``{kind}``) whose allowed values are regular
expressions in ``PLACEHOLDERS``. A :class:`KeyMap` compiles the rows into regexes in both
directions, so one table serves loading and saving.

tinytune names follow docs/ARCHITECTURE.md ("Parameter names").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDERS: dict[str, str] = {
    "layer": r"\d+",
    "attn_proj": r"q_proj|k_proj|v_proj|o_proj",
    "mlp_proj": r"gate_proj|up_proj|down_proj",
    "qk": r"q|k",
    "kind": r"weight|bias",
}

# Hugging Face transformers names (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
_HF_COMMON_ROWS: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.sa_norm.weight"),
    ("model.layers.{layer}.self_attn.{attn_proj}.{kind}", "layers.{layer}.attn.{attn_proj}.{kind}"),
    ("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.mlp_norm.weight"),
    ("model.layers.{layer}.mlp.{mlp_proj}.weight", "layers.{layer}.mlp.{mlp_proj}.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]

HF_KEY_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": list(_HF_COMMON_ROWS),
    "qwen2": list(_HF_COMMON_ROWS),
    "qwen3": _HF_COMMON_ROWS
    + [("model.layers.{layer}.self_attn.{qk}_norm.weight", "layers.{layer}.attn.{qk}_norm.weight")],
}

# Keys that some HF checkpoints carry but that are derived buffers, not parameters.
HF_IGNORED_KEYS: list[str] = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

# llama.cpp GGUF tensor names (llama architecture).
GGUF_KEY_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": [
        ("token_embd.weight", "tok_embeddings.weight"),
        ("blk.{layer}.attn_norm.weight", "layers.{layer}.sa_norm.weight"),
        ("blk.{layer}.attn_q.{kind}", "layers.{layer}.attn.q_proj.{kind}"),
        ("blk.{layer}.attn_k.{kind}", "layers.{layer}.attn.k_proj.{kind}"),
        ("blk.{layer}.attn_v.{kind}", "layers.{layer}.attn.v_proj.{kind}"),
        ("blk.{layer}.attn_output.weight", "layers.{layer}.attn.o_proj.weight"),
        ("blk.{layer}.ffn_norm.weight", "layers.{layer}.mlp_norm.weight"),
        ("blk.{layer}.ffn_gate.weight", "layers.{layer}.mlp.gate_proj.weight"),
        ("blk.{layer}.ffn_up.weight", "layers.{layer}.mlp.up_proj.weight"),
        ("blk.{layer}.ffn_down.weight", "layers.{layer}.mlp.down_proj.weight"),
        ("output_norm.weight", "norm.weight"),
        ("output.weight", "output.weight"),
    ],
}
# Qwen2/2.5 (q/k/v biases via {kind}) and Qwen3 (per-head q/k norms) use llama's names (GGUF export).
GGUF_KEY_TABLES["qwen2"] = list(GGUF_KEY_TABLES["llama"])
GGUF_KEY_TABLES["qwen3"] = GGUF_KEY_TABLES["llama"] + [
    ("blk.{layer}.attn_{qk}_norm.weight", "layers.{layer}.attn.{qk}_norm.weight")
]
# Tensors llama.cpp stores that a checkpoint does not need (recomputed from the config).
GGUF_IGNORED_KEYS: list[str] = [r"rope_freqs\.weight", r"rope_factors_(long|short)\.weight"]


def _template_to_regex(template: str) -> tuple[re.Pattern, list[str]]:
    """Compiles ``a.{layer}.b`` into an anchored regex with one named group per placeholder."""
    names: list[str] = []
    parts: list[str] = []
    pos = 0
    for m in re.finditer(r"\{(\w+)\}", template):
        parts.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise ValueError(f"Unknown placeholder {{{name}}} in key template {template!r}")
        parts.append(f"(?P<{name}>{PLACEHOLDERS[name]})")
        names.append(name)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$"), names


@dataclass
class _Row:
    src: str
    dst: str
    src_re: re.Pattern
    dst_re: re.Pattern


class KeyMap:
    """Two-way key translation built from a table of template rows.

    Args:
        rows: ``(external_template, tinytune_template)`` pairs.
        ignored: regexes for external keys that are silently dropped when loading.
    """

    def __init__(self, rows: list[tuple[str, str]], ignored: list[str] | None = None) -> None:
        self.rows = []
        for src, dst in rows:
            src_re, src_names = _template_to_regex(src)
            dst_re, dst_names = _template_to_regex(dst)
            if sorted(src_names) != sorted(dst_names):
                raise ValueError(f"Key table row {src!r} -> {dst!r} has mismatched placeholders")
            self.rows.append(_Row(src, dst, src_re, dst_re))
        self.ignored = [re.compile("^" + p + "$") for p in (ignored or [])]

    def is_ignored(self, external_key: str) -> bool:
        """True for external keys that carry no parameter (e.g. cached RoPE frequencies)."""
        return any(p.match(external_key) for p in self.ignored)

    def to_tinytune(self, external_key: str) -> str | None:
        """Maps an external key to the tinytune name, or None when no row matches."""
        for row in self.rows:
            m = row.src_re.match(external_key)
            if m:
                return row.dst.format(**m.groupdict())
        return None

    def to_external(self, tinytune_key: str) -> str | None:
        """Maps a tinytune name to the external key, or None when no row matches."""
        for row in self.rows:
            m = row.dst_re.match(tinytune_key)
            if m:
                return row.src.format(**m.groupdict())
        return None


def hf_key_map(model_type: str) -> KeyMap:
    """The HF <-> tinytune key map for an HF ``model_type`` (``llama``, ``qwen2``, ``qwen3``)."""
    if model_type not in HF_KEY_TABLES:
        raise ValueError(f"No key table for model_type {model_type!r}; supported: {sorted(HF_KEY_TABLES)}")
    return KeyMap(HF_KEY_TABLES[model_type], HF_IGNORED_KEYS)


def gguf_key_map(arch: str) -> KeyMap:
    """The GGUF <-> tinytune key map for a GGUF ``general.architecture``."""
    if arch not in GGUF_KEY_TABLES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_KEY_TABLES)}")
    return KeyMap(GGUF_KEY_TABLES[arch], GGUF_IGNORED_KEYS)
