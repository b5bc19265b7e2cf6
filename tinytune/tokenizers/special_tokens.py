"""Special-token tables of the tokenizer families (ids as in their published HF `tokenizer_config.json`).

Read by the family constructors (`families.py`) and by the file loaders (`autodetect.py`).
"""

from __future__ import annotations

# ---- Llama 3 -----------------------------------------------------------------------------------
LLAMA3_NUM_BASE = 128000
LLAMA3_NUM_RESERVED = 256


def llama3_special_tokens(version: str = "3.1") -> dict[str, int]:
    """Llama 3 special tokens from id 128000.

    Args:
        version: "3.0" (Llama 3) or "3.1" (Llama 3.1 / 3.2 / 3.3, adds ``<|eom_id|>``,
            ``<|python_tag|>`` and ``<|finetune_right_pad_id|>``).
    """
    if version == "3.0":
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "R",
            "R",
            "R",
            "R",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "R",
            "<|eot_id|>",
        ]
    elif version == "3.1":
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "R",
            "R",
            "<|finetune_right_pad_id|>",
            "R",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ]
    else:
        raise ValueError(f"unknown Llama 3 tokenizer version {version!r}; use '3.0' or '3.1'")
    out: dict[str, int] = {}
    reserved = 0
    for i in range(LLAMA3_NUM_RESERVED):
        name = named[i] if i < len(named) else "R"
        if name == "R":
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        out[name] = LLAMA3_NUM_BASE + i
    return out


# ---- Qwen ----------------------------------------------------------------------------------------
QWEN_SPECIAL_START = 151643
QWEN2_5_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
#: Tokens HF marks ``special: false`` (they stay in decoded text with skip_special_tokens=True).
QWEN_NON_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}


def qwen_special_tokens(version: str = "3") -> dict[str, int]:
    """Qwen added tokens from id 151643: "2" gives the first three (Qwen2), "2.5" 22, "3" 26."""
    names = {"2": QWEN2_5_SPECIALS[:3], "2.5": QWEN2_5_SPECIALS, "3": QWEN2_5_SPECIALS + QWEN3_EXTRA}
    if version not in names:
        raise ValueError(f"unknown Qwen tokenizer version {version!r}; use '2', '2.5' or '3'")
    return {s: QWEN_SPECIAL_START + i for i, s in enumerate(names[version])}
