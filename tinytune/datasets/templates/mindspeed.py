"""MindSpeed-LLM ``prompt_type`` templates rendered from their slot table (one JSON file, no classes).

``mindspeed_templates.json`` beside this file is MindSpeed-LLM's ``configs/finetune/templates.json``
(LLaMA-Factory 0.8.2 slot format), copied unchanged. Each entry names slot lists per role
(``format_user``, ``format_assistant``, ``format_system``, ``format_observation``,
``format_function``, ``format_separator``, ``format_prefix``); a slot is a string with
``{{content}}`` (``{{idx}}``, ``{{name}}``, ``{{arguments}}``), ``["bos_token"]`` /
``["eos_token"]`` (the tokenizer's BOS/EOS), or ``{"token": ...}`` (a special token by name).

Rendering follows MindSpeed's ``Template._encode``:

- turn 0 opens with the prefix and (when there is a system prompt or tools) the system slot,
  whose content is ``system + tool text``; an empty or missing system uses ``default_system``;
- every later user/observation turn starts with the separator;
- missing formats default as MindSpeed's ``_register_template`` does (assistant:
  ``{{content}}`` + EOS unless ``efficient_eos``; system: ``{{content}}``; observation: the user
  format);
- ``replace_eos``: EOS is ``stop_words[0]``; ``efficient_eos``: one EOS closes the conversation;
- ``Llama2Template`` merges the system text into the first user message;
- ``ReasoningTemplate`` adds an empty thought to answers without one: with ``enable_thinking``
  True it is part of the answer (trained), otherwise it closes the prompt (masked); False also
  removes every thought. Thought words are the entry's ``thought_words`` (default
  ``<think>``/``</think>``).

Trained: every assistant/function slot (answer and its end-of-turn), and the closing EOS of an
``efficient_eos`` template. MindSpeed also puts an EOS *label* at the first token of the turn that
follows an ``efficient_eos`` answer, where the input holds a different token; tinytune's labels are
the input tokens, so that position is masked (the closing EOS is trained). User content is inserted
verbatim (MindSpeed would also substitute a literal ``{{idx}}`` inside user text).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tinytune.datasets.templates.template_spec import Segment, TemplateError, segments_to_text

TABLE_FILE = os.path.join(os.path.dirname(__file__), "mindspeed_templates.json")

DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}]).\n"
    "Action Input: the input to the tool{format_prompt}.\n```\n"
)
JSON_FORMAT_PROMPT = (
    """, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)"""
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)
DEFAULT_FUNCTION_SLOTS = ["Action: {{name}}\nAction Input: {{arguments}}"]
# Strings in slots that only make sense as one special token of the model's vocabulary.
_SPECIAL_LIKE = re.compile(r"<\|[A-Za-z_]+\|>|<｜[^｜]+｜>|\[gMASK\]|<sop>|<reserved_\d+>")


@lru_cache(maxsize=1)
def mindspeed_table() -> dict[str, dict]:
    """``prompt_type`` name -> raw entry of the packaged MindSpeed template table."""
    with open(TABLE_FILE, encoding="utf-8") as f:
        return {entry["name"]: entry for entry in json.load(f)}


def mindspeed_names() -> list[str]:
    """All MindSpeed ``prompt_type`` names."""
    return sorted(mindspeed_table())


def _slots(entry: dict, key: str) -> list | None:
    fmt = entry.get(key)
    return list(fmt["slots"]) if fmt and fmt.get("slots") else None


def _tools_list(tools: Any) -> list[dict]:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TemplateError(f"`tools` is not valid JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TemplateError("`tools` must be a list of JSON-schema function objects")
    return tools


def _default_tool_text(tools: list[dict]) -> str:
    text, names = "", []
    for tool in tools:
        fn = tool.get("function", tool) if tool.get("type") == "function" else tool
        params = ""
        props = (fn.get("parameters") or {}).get("properties") or {}
        required = (fn.get("parameters") or {}).get("required", [])
        for name, p in props.items():
            req = ", required" if name in required else ""
            enum = ", should be one of [{}]".format(", ".join(p["enum"])) if p.get("enum") else ""
            items = ", where each item should be {}".format(p["items"].get("type", "")) if p.get("items") else ""
            params += f"  - {name} ({p.get('type', '')}{req}): {p.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {fn['name']}\nTool Description: {fn.get('description', '')}\nTool Args:\n{params}\n"
        names.append(fn["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=", ".join(names), format_prompt=JSON_FORMAT_PROMPT)


def _qwen_tool_text(tools: list[dict]) -> str:
    text = "".join(
        "\n" + json.dumps(t if t.get("type") == "function" else {"type": "function", "function": t}, ensure_ascii=False)
        for t in tools
    )
    return QWEN_TOOL_PROMPT.format(tool_text=text)


def _calls(message: dict) -> list[tuple[str, Any]]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise TemplateError(f"tool call {call!r:.80} needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise TemplateError(f"tool call {fn['name']!r}: arguments are not valid JSON") from None
        out.append((fn["name"], args))
    return out


@dataclass(frozen=True)
class MindSpeedTemplate:
    """One MindSpeed ``prompt_type``, rendered from its slot-table entry (see module docstring).

    Args:
        name: the prompt-type name.
        entry: its entry of the MindSpeed table.
        default_system: overrides the entry's ``default_system`` when not None.
    """

    name: str
    entry: dict
    default_system: str | None = None

    def __post_init__(self):
        if self.default_system is None:
            object.__setattr__(self, "default_system", self.entry.get("default_system", ""))

    # -- table lookups ------------------------------------------------------------------------
    @property
    def efficient_eos(self) -> bool:
        return bool(self.entry.get("efficient_eos"))

    @property
    def reasoning(self) -> bool:
        return self.entry.get("template_class") == "ReasoningTemplate"

    @property
    def thought_words(self) -> tuple[str, str]:
        words = self.entry.get("thought_words") or ["<think>", "</think>"]
        return words[0], words[1]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.entry.get("stop_words") or ())

    def _fmt(self, role: str) -> list:
        e = self.entry
        eos = [] if self.efficient_eos else [["eos_token"]]
        if role == "assistant":
            return _slots(e, "format_assistant") or ["{{content}}"] + eos
        if role == "system":
            return _slots(e, "format_system") or ["{{content}}"]
        if role == "observation":
            return _slots(e, "format_observation") or _slots(e, "format_user") or ["{{content}}"]
        if role == "function":
            return _slots(e, "format_function") or DEFAULT_FUNCTION_SLOTS + eos
        return _slots(e, role) or (["{{content}}"] if role == "format_user" else [])

    def _eos_text(self) -> str | None:
        """EOS as text when the template replaces it (``replace_eos``), else None (tokenizer's EOS)."""
        return self.stop_strings[0] if self.entry.get("replace_eos") and self.stop_strings else None

    def required_tokens(self) -> list[str]:
        """Special tokens the tokenizer must have: slot tokens, stop words, special-looking slot text."""
        need: list[str] = []
        for key, fmt in self.entry.items():
            if not (key.startswith("format_") and isinstance(fmt, dict)):
                continue
            for slot in fmt.get("slots") or []:
                if isinstance(slot, dict):
                    need.append(slot["token"])
                elif isinstance(slot, str):
                    need.extend(_SPECIAL_LIKE.findall(slot))
        need.extend(self.stop_strings)
        return list(dict.fromkeys(need))

    def bind(self, tokenizer) -> "MindSpeedTemplate":
        """Checks that ``tokenizer`` has every special token this prompt type needs.

        Raises:
            TemplateError: naming the first missing token.
        """
        specials = getattr(tokenizer, "special_tokens", None) or {}
        for tok in self.required_tokens():
            if tok not in specials:
                raise TemplateError(
                    f"prompt type {self.name!r} needs the special token {tok!r}, which the "
                    "tokenizer does not have; pick the prompt type of this model's family"
                )
        uses_eos = self.efficient_eos or any(["eos_token"] in self._fmt(r) for r in ("assistant", "function"))
        if uses_eos and self._eos_text() is None and getattr(tokenizer, "eos_id", None) is None:
            raise TemplateError(f"prompt type {self.name!r} ends answers with EOS, but the tokenizer has none")
        return self

    # -- rendering ----------------------------------------------------------------------------
    def _emit(self, out: list[Segment], slots: list, *, train: bool = False, message: int = -1, **values) -> None:
        eos_text = self._eos_text()
        for slot in slots:
            if isinstance(slot, dict):
                out.append(Segment(text=slot["token"], train=train, message=message))
            elif isinstance(slot, list):
                if "bos_token" in slot:
                    out.append(Segment(special="bos", train=train, message=message))
                elif "eos_token" in slot:
                    out.append(
                        Segment(text=eos_text, train=train, message=message)
                        if eos_text
                        else Segment(special="eos", train=train, message=message)
                    )
            else:
                # Substitute placeholders left to right so inserted values are never re-scanned.
                pieces = re.split(r"(\{\{(?:content|idx|name|arguments)\}\})", slot)
                text = "".join(values.get(p[2:-2], p) if p.startswith("{{") else p for p in pieces)
                if text:
                    out.append(Segment(text=text, train=train, message=message))

    def _with_reasoning(self, m: dict) -> str:
        content = m.get("content") or ""
        reasoning = m.get("reasoning_content")
        if reasoning:
            start, end = self.thought_words
            content = f"{start}\n{reasoning.strip(chr(10))}\n{end}\n\n{content.lstrip(chr(10))}"
        return content

    def _remove_thought(self, content: str) -> str:
        start, end = self.thought_words
        return re.sub(f"{re.escape(start)}(.*?){re.escape(end)}", "", content, flags=re.DOTALL).lstrip("\n")

    def _function_text(self, m: dict, content: str) -> tuple[list, dict]:
        calls = _calls(m)
        fmt = (self.entry.get("format_function") or {}).get("tool_format")
        slots = self._fmt("function")
        thought = re.search(
            f"{re.escape(self.thought_words[0])}(.*){re.escape(self.thought_words[1])}", content, re.DOTALL
        )
        rest = content.replace(thought.group(0), "") if thought else content
        if rest.strip() or (thought and fmt != "qwen"):
            raise TemplateError(
                f"prompt type {self.name!r}: an assistant turn with tool calls has text too; "
                "MindSpeed renders a function-call turn as the calls alone"
            )
        if fmt == "qwen":
            text = "\n".join(
                "<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False) + "\n</tool_call>"
                for n, a in calls
            )
            return slots, {"content": (thought.group(0) if thought else "") + text}
        if not any("{{name}}" in s for s in slots if isinstance(s, str)):
            raise TemplateError(f"prompt type {self.name!r} has no function-call format tinytune can render")
        if len(calls) != 1:
            raise TemplateError(f"prompt type {self.name!r} renders one tool call per assistant turn, got {len(calls)}")
        return slots, {"name": calls[0][0], "arguments": json.dumps(calls[0][1], ensure_ascii=False)}

    def _tool_text(self, tools: Any) -> str:
        tools = _tools_list(tools)
        if not tools:
            return ""
        fmt = (self.entry.get("format_tools") or {}).get("tool_format", "default")
        if fmt == "default":
            return _default_tool_text(tools)
        if fmt == "qwen":
            return _qwen_tool_text(tools)
        raise TemplateError(
            f"prompt type {self.name!r}: tool format {fmt!r} has no renderer (MindSpeed drops "
            "the tools silently); use a template with tool support or drop the `tools` column"
        )

    def render(
        self,
        messages: list[dict],
        *,
        tools: Any = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> list[Segment]:
        """Renders a conversation to segments (answers and their end-of-turn trained).

        Args:
            messages: OpenAI-format messages (system first if any; assistant ``tool_calls``;
                ``tool`` results; ``reasoning_content``).
            tools: JSON-schema function list (or its JSON string) for the system prompt.
            add_generation_prompt: accepted for interface parity; the user slot already ends
                with the assistant header, so nothing is added (except an empty thought for a
                reasoning template with thinking off).
            enable_thinking: reasoning templates only (see module docstring).

        Raises:
            TemplateError: for roles out of MindSpeed's user/assistant alternation or tools it
                cannot render.
        """
        out: list[Segment] = []
        system, start = None, 0
        if messages and messages[0]["role"] == "system":
            system, start = messages[0].get("content") or "", 1
        system = system or self.default_system
        tool_text = self._tool_text(tools) if tools else ""
        llama2 = self.entry.get("template_class") == "Llama2Template"
        turns = messages[start:]
        empty_thought = "{}\n\n{}\n\n".format(*self.thought_words)
        for i, m in enumerate(turns):
            k = i + start
            role = m["role"]
            want_prompt = i % 2 == 0
            if (role in ("user", "tool")) != want_prompt or role not in ("user", "tool", "assistant"):
                raise TemplateError(
                    f"prompt type {self.name!r}: message {k} has role {role!r}; MindSpeed "
                    "templates need user/tool and assistant turns alternating"
                )
            system_text = ""
            if i == 0:
                self._emit(out, self._fmt("format_prefix"), message=-1)
                if system or tool_text:
                    if llama2:
                        first = self._fmt("system")[0]
                        system_text = first.replace("{{content}}", system + tool_text, 1)
                    else:
                        self._emit(out, self._fmt("system"), message=0 if start else -1, content=system + tool_text)
            elif want_prompt:
                self._emit(out, self._fmt("format_separator"), message=k)
            if role == "user":
                self._emit(
                    out,
                    self._fmt("format_user"),
                    message=k,
                    content=system_text + (m.get("content") or ""),
                    idx=str(i // 2),
                )
            elif role == "tool":
                self._emit(out, self._fmt("observation"), message=k, content=m.get("content") or "")
            else:
                content = self._with_reasoning(m)
                thought = ""
                if self.reasoning:
                    if enable_thinking is False:
                        content = self._remove_thought(content)
                    if self.thought_words[0] not in content and self.thought_words[1] not in content:
                        if enable_thinking:
                            thought = empty_thought
                        else:
                            self._emit(out, [empty_thought], message=k)
                if m.get("tool_calls"):
                    slots, values = self._function_text(m, content)
                else:
                    slots, values = self._fmt("assistant"), {"content": content}
                if thought:
                    out.append(Segment(text=thought, train=True, message=k))
                self._emit(out, slots, train=True, message=k, **values)
        if add_generation_prompt and self.reasoning and not enable_thinking:
            out.append(Segment(text=empty_thought))
        if self.efficient_eos and turns and turns[-1]["role"] == "assistant" and not add_generation_prompt:
            self._emit(out, [["eos_token"]], train=True, message=start + len(turns) - 1)
        return out

    def render_text(
        self,
        messages: list[dict],
        *,
        bos_token: str = "",
        eos_token: str = "",
        tools: Any = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> str:
        """Renders a conversation to one string (BOS/EOS written as the given token strings)."""
        segs = self.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        return segments_to_text(segs, bos_token, eos_token)


def mindspeed_template(name: str, default_system: str | None = None) -> MindSpeedTemplate:
    """The MindSpeed ``prompt_type`` called ``name``.

    Raises:
        TemplateError: for an unknown name (the message lists the known ones).
    """
    table = mindspeed_table()
    if name not in table:
        raise TemplateError(f"unknown MindSpeed prompt type {name!r}; choose from {', '.join(sorted(table))}")
    return MindSpeedTemplate(name, table[name], default_system)
