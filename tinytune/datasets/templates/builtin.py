"""The built-in prompt templates. Each is data: format strings per role (see ``base.ChatTemplate``).

Formats follow each family's official Hugging Face chat template (Llama 2/3/3.1, Qwen 2.5/3, Gemma,
Mistral Instruct, SmolLM2's ChatML) and, for Alpaca, the Stanford Alpaca prompt as MindSpeed /
LLaMA-Factory write it.
"""

from __future__ import annotations

from tinytune.datasets.templates.template_spec import ChatTemplate

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    assistant_suffix="\n",
    stop_strings=("<|im_end|>",),
)
# Qwen: consecutive tool results share one user turn, each wrapped in <tool_response>.
_QWEN_TOOLS = dict(
    tool="\n<tool_response>\n{content}\n</tool_response>",
    tool_open="<|im_start|>user",
    tool_close="<|im_end|>\n",
    tool_call='<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>',
    tool_call_separator="\n",
)
_LLAMA3_HEADERS = dict(
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    strip_content=True,
    stop_strings=("<|eot_id|>", "<|eom_id|>"),
)

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
            first_user_strip="combined",
            user="{bos}[INST] {content} [/INST]",
            assistant=" {content} ",
            assistant_end="{eos}",
            strip_content=True,
        ),
        # Llama 3.0: every message is "<header>role</header>\n\n" + content | trim; tool results
        # keep their role name, and there is no tool-call syntax.
        ChatTemplate(
            name="llama3", tool="<|start_header_id|>tool<|end_header_id|>\n\n{content}<|eot_id|>", **_LLAMA3_HEADERS
        ),
        # Llama 3.1 / 3.2: the system block always opens with the knowledge cutoff and the date;
        # tool results are the "ipython" role, JSON-encoded; one JSON call per assistant message.
        ChatTemplate(
            name="llama3_1",
            tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
            tool_roles=("tool", "ipython"),
            tool_content_json=True,
            default_system="",
            system_intro="Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n",
            tool_format="llama3_1",
            tool_call='{"name": "{name}", "parameters": {arguments}}',
            **_LLAMA3_HEADERS,
        ),
        ChatTemplate(name="chatml", **_CHATML),
        ChatTemplate(
            name="smollm2",
            **{**_CHATML, "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
        ),
        ChatTemplate(
            name="qwen2_5",
            tool_format="qwen2_5",
            **{
                **_CHATML,
                **_QWEN_TOOLS,
                "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            },
        ),
        ChatTemplate(name="qwen3", tool_format="qwen3", reasoning="qwen3", **{**_CHATML, **_QWEN_TOOLS}),
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
            first_user_strip="user",
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
