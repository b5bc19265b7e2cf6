"""Prompt templates as data: format strings per role plus a few switches.

A template renders a conversation to :class:`Segment` s. Each segment carries a ``train`` flag
(assistant output and its end-of-turn marker) so loss masks are exact at token level: segments
are tokenized separately, and every segment border sits at a special token or a pre-token border.

Format strings use three placeholders: ``{content}`` (the message text, inserted verbatim),
``{bos}`` and ``{eos}`` (the tokenizer's BOS/EOS token ids; skipped when the tokenizer has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tinytune.datasets.templates import tool_calls
from tinytune.datasets.templates.template_error import TemplateError

_PLACEHOLDER = re.compile(r"\{(bos|eos|content)\}")


@dataclass
class Segment:
    """A piece of rendered conversation.

    Attributes:
        text: text to tokenize (special-token strings inside are parsed as specials).
        special: ``"bos"`` or ``"eos"`` for a bare special token (``text`` is then empty).
        train: True for assistant output (content, reasoning, end-of-turn marker).
        message: index of the message the segment belongs to (-1 for conversation scaffolding).
    """

    text: str = ""
    special: str | None = None
    train: bool = False
    message: int = -1


def emit(out: list[Segment], fmt: str, content: str = "", *, train: bool = False, message: int = -1) -> None:
    """Appends the segments of one format string (``{content}`` substituted verbatim)."""
    pos = 0
    for m in _PLACEHOLDER.finditer(fmt):
        if m.start() > pos:
            out.append(Segment(text=fmt[pos : m.start()], train=train, message=message))
        name = m.group(1)
        if name == "content":
            if content:
                out.append(Segment(text=content, train=train, message=message))
        else:
            out.append(Segment(special=name, train=train, message=message))
        pos = m.end()
    if pos < len(fmt):
        out.append(Segment(text=fmt[pos:], train=train, message=message))


def segments_to_text(segments: list[Segment], bos_token: str = "", eos_token: str = "") -> str:
    """Joins segments into the rendered string (BOS/EOS written as the given token strings)."""
    parts = []
    for s in segments:
        if s.special == "bos":
            parts.append(bos_token)
        elif s.special == "eos":
            parts.append(eos_token)
        else:
            parts.append(s.text)
    return "".join(parts)


def qwen3_last_query_index(messages: list[dict]) -> int:
    """Index of the last real user query (not a wrapped tool response), as Qwen3's template computes it."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m.get("content")
        if (
            m["role"] == "user"
            and isinstance(c, str)
            and not (c.startswith("<tool_response>") and c.endswith("</tool_response>"))
        ):
            return i
    return len(messages) - 1


def qwen3_split_reasoning(message: dict) -> tuple[str, str]:
    """Returns ``(reasoning, content)`` the way Qwen3's template reads an assistant message."""
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    reasoning = ""
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    return reasoning, content


def check_enable_thinking(value, key: str = "enable_thinking") -> bool | None:
    """Returns ``value`` when it is True, False or None; anything else is a config error.

    Strings such as ``'false'``, ``'0'`` or ``'no'`` and integers are refused rather than read as
    truthy/falsy, so a quoted YAML value never silently switches thinking on.

    Raises:
        TemplateError: naming ``key`` and the value received.
    """
    if value is None or isinstance(value, bool):
        return value
    raise TemplateError(
        f"{key} must be true, false or null (got {value!r} of type {type(value).__name__}); "
        f"write {key}: true / false / null without quotes"
    )


def has_reasoning(message: dict) -> bool:
    """True when an assistant message carries a think block (``</think>`` in its content) or a
    non-empty ``reasoning_content`` (the "slow-thinking" samples of Qwen3's SFT guide)."""
    reasoning = message.get("reasoning_content")
    content = message.get("content")
    return (isinstance(reasoning, str) and bool(reasoning.strip())) or (
        isinstance(content, str) and "</think>" in content
    )


def without_reasoning(message: dict) -> dict:
    """A copy of an assistant message with its reasoning removed (``reasoning_content`` dropped and
    a leading ``<think>...</think>`` block cut from the content, as Qwen3's template splits it)."""
    if message.get("role") != "assistant" or not (has_reasoning(message) or "reasoning_content" in message):
        return message
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    content = out.get("content")
    if isinstance(content, str) and "</think>" in content:
        out["content"] = content.split("</think>")[-1].lstrip("\n")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A prompt template defined by format strings (see module docstring for placeholders).

    Attributes:
        name: registry name.
        prefix: once at the start of every conversation (e.g. ``"{bos}"``).
        system: format of the system block.
        user: format of a user turn.
        tool: format of a tool/observation turn (None: the template has no tool role).
        tool_open: written before a run of consecutive tool turns (Qwen: ``"<|im_start|>user"``).
        tool_close: written after such a run (Qwen: ``"<|im_end|>\\n"``).
        tool_roles: roles rendered with ``tool`` (Llama 3.1 also takes ``ipython``).
        tool_content_json: JSON-encode tool results, strings included (Llama 3.1).
        assistant_prefix: role header before assistant output (masked).
        assistant: format of the assistant output (trained).
        assistant_end: end-of-turn marker after the output (trained), e.g. ``"<|im_end|>"``, ``"{eos}"``.
        assistant_suffix: text after the end-of-turn marker (masked), e.g. ``"\\n"``.
        separator: masked text before every prompt turn except the first.
        default_system: system prompt used when a conversation has none.
        system_placement: ``"block"`` (own block), ``"first_user"`` (merged into the first user
            turn with ``first_user_system``) or ``"none"`` (system messages are an error).
        first_user_system: how a merged system prompt joins the first user message.
        first_user_strip: with ``strip_content``, how a merged first user turn is trimmed:
            ``"parts"`` (system and user each), ``"user"`` (only the user text; Gemma 3) or
            ``"combined"`` (the joined text; Llama 2).
        system_intro: text that opens every system block (``{date_string}`` is filled in), e.g.
            Llama 3.1's knowledge-cutoff and date lines.
        date_string: the date Llama 3.1's system block names (its template's default).
        strip_content: strip whitespace around message contents (Jinja ``| trim``).
        reasoning: ``"qwen3"`` for Qwen3's ``<think>`` handling, else None.
        tool_format: tool-calling syntax (``tool_calls.TOOL_FORMATS``) or None (no tool calls).
        tool_call: format of one call, with ``{name}`` and ``{arguments}``.
        tool_call_separator: written before a call that follows content or another call.
        stop_strings: strings that end an assistant turn at inference.
    """

    name: str
    prefix: str = ""
    system: str = "{content}"
    user: str = "{content}"
    tool: str | None = None
    tool_open: str = ""
    tool_close: str = ""
    tool_roles: tuple[str, ...] = ("tool",)
    tool_content_json: bool = False
    assistant_prefix: str = ""
    assistant: str = "{content}"
    assistant_end: str = "{eos}"
    assistant_suffix: str = ""
    separator: str = ""
    default_system: str | None = None
    system_placement: str = "block"
    first_user_system: str = "{system}\n\n{content}"
    first_user_strip: str = "parts"
    system_intro: str = ""
    date_string: str = "26 Jul 2024"
    strip_content: bool = False
    reasoning: str | None = None
    tool_format: str | None = None
    tool_call: str = ""
    tool_call_separator: str = ""
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def bind(self, tokenizer) -> "ChatTemplate":
        """Returns the template to use with ``tokenizer`` (data templates need nothing from it)."""
        return self

    def _content(self, m: dict) -> str:
        c = m.get("content") or ""
        if not isinstance(c, str):
            raise TemplateError(
                f"template {self.name!r}: {m.get('role')} content must be a string, got {type(c).__name__}"
            )
        return c.strip() if self.strip_content else c

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> list[Segment]:
        """Renders a conversation to segments.

        Args:
            messages: OpenAI-format messages: ``{"role", "content"[, "reasoning_content"]
                [, "tool_calls"]}``, system first if any; tool results as ``{"role": "tool", "content"}``.
            tools: JSON-schema function dicts offered to the model (templates with a ``tool_format``).
            add_generation_prompt: end with the assistant header (for generation).
            enable_thinking: Qwen3 only (Qwen3 SFT guide semantics): True trains an empty think
                block on answers without reasoning; False removes all reasoning and puts the empty
                think block into the prompt (masked); None keeps reasoning where a turn has it
                (trained) and puts the empty block into the prompt elsewhere.

        Raises:
            TemplateError: for a role, tool call or tool list the template cannot render.
        """
        check_enable_thinking(enable_thinking)
        if self.reasoning == "qwen3" and enable_thinking is False:
            messages = [without_reasoning(m) for m in messages]
        if tools and self.tool_format is None:
            raise TemplateError(
                f"template {self.name!r} cannot render a `tools` column (it has no tool-calling "
                "format); use qwen2_5, qwen3, llama3_1 or hf (the model's own chat template)"
            )
        out: list[Segment] = []
        emit(out, self.prefix)
        system = None
        start = 0
        if messages and messages[0]["role"] == "system":
            system, start = self._content(messages[0]), 1
        elif self.default_system is not None:
            system = self.default_system
        tools_text = tool_calls.tools_text(self.tool_format, tools) if tools else None
        if tools_text is not None and self.tool_format in ("qwen2_5", "qwen3"):
            system = tools_text if system is None else system + "\n\n" + tools_text
        if system is not None:
            if self.system_intro:
                env = "Environment: ipython\n" if tools_text is not None else ""
                system = env + self.system_intro.replace("{date_string}", self.date_string) + system
            if self.system_placement == "block":
                emit(out, self.system, system, message=0 if start else -1)
            elif self.system_placement == "none":
                raise TemplateError(
                    f"template {self.name!r} has no system role; drop the system message or pick another template"
                )
        if tools_text is not None and self.tool_format == "llama3_1":
            if start >= len(messages) or messages[start]["role"] != "user":
                raise TemplateError(
                    f"template {self.name!r}: with tools the first message after the system "
                    "prompt must be a user message (the tool list opens it)"
                )
        lqi = qwen3_last_query_index(messages) if self.reasoning == "qwen3" else -1
        first_prompt = True
        for i in range(start, len(messages)):
            m = messages[i]
            role = m["role"]
            if role == "user":
                if not first_prompt and self.separator:
                    emit(out, self.separator, message=i)
                content = self._content(m)
                if first_prompt and system is not None and self.system_placement == "first_user":
                    content = self._merge_system(system, messages[start - 1] if start else None, m)
                if i == start and tools_text is not None and self.tool_format == "llama3_1":
                    content = tools_text + content
                emit(out, self.user, content, message=i)
                first_prompt = False
            elif role in self.tool_roles and self.tool is not None:
                self._tool_turn(out, messages, i, first_prompt)
                first_prompt = False
            elif role == "assistant":
                emit(out, self.assistant_prefix, message=i)
                self._assistant_body(out, messages, i, lqi, enable_thinking)
                emit(out, self.assistant_end, train=True, message=i)
                emit(out, self.assistant_suffix, message=i)
            elif role == "tool":
                raise TemplateError(f"template {self.name!r} has no tool role (message {i})")
            else:
                raise TemplateError(f"template {self.name!r}: unknown role {role!r} at message {i}")
        if add_generation_prompt:
            emit(out, self.assistant_prefix)
            if self.reasoning == "qwen3" and enable_thinking is False:
                emit(out, "<think>\n\n</think>\n\n")
        return out

    def _merge_system(self, system: str, system_message: dict | None, user: dict) -> str:
        """The first user turn with the system prompt joined to it (``first_user_strip`` rules)."""
        raw_system = system if system_message is None else (system_message.get("content") or "")
        raw_user = user.get("content") or ""
        if not self.strip_content or self.first_user_strip == "parts":
            sys_text, user_text = system, self._content(user)
        elif self.first_user_strip == "user":
            sys_text, user_text = raw_system, raw_user.strip()
        else:
            sys_text, user_text = raw_system, raw_user
        merged = self.first_user_system.replace("{system}", sys_text).replace("{content}", user_text)
        return merged.strip() if self.strip_content and self.first_user_strip == "combined" else merged

    def _tool_turn(self, out: list[Segment], messages: list[dict], i: int, first_prompt: bool) -> None:
        """A tool result (masked); consecutive results share ``tool_open``/``tool_close``."""
        prev_tool = i > 0 and messages[i - 1]["role"] in self.tool_roles
        next_tool = i + 1 < len(messages) and messages[i + 1]["role"] in self.tool_roles
        if not first_prompt and self.separator and not prev_tool:
            emit(out, self.separator, message=i)
        raw = messages[i].get("content")
        if self.tool_content_json:
            content = tool_calls.tool_content(raw, as_json=True, message=i)
        else:
            content = self._content(messages[i])
        if not prev_tool:
            emit(out, self.tool_open, message=i)
        emit(out, self.tool, content, message=i)
        if not next_tool:
            emit(out, self.tool_close, message=i)

    def _assistant_body(
        self, out: list[Segment], messages: list[dict], i: int, lqi: int, enable_thinking: bool | None
    ) -> None:
        """The trained part of an assistant turn: (reasoning,) content and tool calls."""
        m = messages[i]
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, (list, tuple)):
            raise TemplateError(f"message {i}: tool_calls must be a list, got {type(calls).__name__}")
        if calls and not self.tool_format:
            raise TemplateError(
                f"template {self.name!r} cannot render tool calls (message {i} has tool_calls); "
                "use qwen2_5, qwen3, llama3_1 or hf"
            )
        if self.reasoning == "qwen3":
            content = self._qwen3_assistant(out, messages, i, lqi, enable_thinking)
        elif calls and self.tool_format == "llama3_1":
            if len(calls) != 1:
                raise TemplateError(
                    f"message {i}: Llama 3.1 takes exactly one tool call per assistant message "
                    f"(got {len(calls)}); split them into separate turns"
                )
            if self._content(m):
                raise TemplateError(
                    f"message {i}: Llama 3.1's template drops the content of an assistant "
                    "message with a tool call; move the text into its own assistant turn"
                )
            content = ""
        else:
            content = self._content(m)
            emit(out, self.assistant, content, train=True, message=i)
        for k, call in enumerate(calls or ()):
            name, arguments = tool_calls.function_of(call, i)
            args = tool_calls.arguments_text(arguments, verbatim_strings=self.tool_format == "qwen3", message=i)
            text = tool_calls.call_text(self.tool_call, name, args)
            if k or content:
                text = self.tool_call_separator + text
            emit(out, "{content}", text, train=True, message=i)

    def _qwen3_assistant(
        self, out: list[Segment], messages: list[dict], i: int, lqi: int, enable_thinking: bool | None
    ) -> str:
        """Qwen3's think block and content; returns the content as the template tests it for tool calls."""
        reasoning, content = qwen3_split_reasoning(messages[i])
        is_last = i == len(messages) - 1
        if i > lqi and (is_last or reasoning):
            think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
            # An empty block the model did not write is prompt (the generation prompt with
            # enable_thinking=False writes it) unless thinking is forced on.
            trained = enable_thinking is True or has_reasoning(messages[i])
            emit(out, think, train=trained, message=i)
            emit(out, "{content}", content.lstrip("\n"), train=True, message=i)
        else:
            emit(out, "{content}", content, train=True, message=i)
        return content

    def render_text(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        bos_token: str = "",
        eos_token: str = "",
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> str:
        """Renders a conversation to one string (for inspection and parity tests)."""
        segs = self.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        return segments_to_text(segs, bos_token, eos_token)
