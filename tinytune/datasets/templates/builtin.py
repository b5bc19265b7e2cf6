"""The built-in prompt templates. Each is data: format strings per role (see ``base.ChatTemplate``).

Formats follow each family's official Hugging Face chat template (Llama 2/3, Qwen 2.5/3, Gemma,
Mistral Instruct, SmolLM2's ChatML) and, for Alpaca, the Stanford Alpaca prompt as MindSpeed /
LLaMA-Factory write it.
"""

from __future__ import annotations

from tinytune.datasets.templates.base import ChatTemplate

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    assistant_suffix="\n",
    stop_strings=("<|im_end|>",),
)
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate(
            name="alpaca",
            prefix="{bos}",
            system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
                           "Write a response that appropriately completes the request.",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant_end="{eos}",
            separator="\n\n",
        ),
        ChatTemplate(
            name="llama2",
            system_placement="first_user",
            first_user_system="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
            user="{bos}[INST] {content} [/INST]",
            assistant=" {content} ",
            assistant_end="{eos}",
            strip_content=True,
        ),
        ChatTemplate(
            name="llama3",
            prefix="{bos}",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_end="<|eot_id|>",
            strip_content=True,
            stop_strings=("<|eot_id|>", "<|eom_id|>"),
        ),
        ChatTemplate(name="chatml", **_CHATML),
        ChatTemplate(name="smollm2", **{**_CHATML, "default_system":
                                        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}),
        ChatTemplate(name="qwen2_5", **{**_CHATML, "tool": _QWEN_TOOL, "default_system":
                                        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}),
        ChatTemplate(name="qwen3", **{**_CHATML, "tool": _QWEN_TOOL, "reasoning": "qwen3"}),
        # Mistral Instruct v0.1/v0.2 have no system role; a system prompt is joined to the first user turn.
        ChatTemplate(
            name="mistral",
            prefix="{bos}",
            system_placement="first_user",
            user="[INST] {content} [/INST]",
            assistant_end="{eos}",
        ),
        # Gemma 1 rejects system messages; like Gemma 3, a system prompt opens the first user turn.
        ChatTemplate(
            name="gemma",
            prefix="{bos}",
            system_placement="first_user",
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            tool="<start_of_turn>tool\n{content}<end_of_turn>\n",
            assistant_prefix="<start_of_turn>model\n",
            assistant_end="<end_of_turn>",
            assistant_suffix="\n",
            strip_content=True,
            stop_strings=("<end_of_turn>",),
        ),
        ChatTemplate(name="plain", prefix="{bos}", assistant_end="{eos}"),
    ]
}
