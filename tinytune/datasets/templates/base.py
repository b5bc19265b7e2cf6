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

from tinytune.errors import TinytuneError

_PLACEHOLDER = re.compile(r"\{(bos|eos|content)\}")


class TemplateError(TinytuneError, ValueError):
    """A conversation the template cannot render (e.g. a role it has no format for)."""


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
            out.append(Segment(text=fmt[pos:m.start()], train=train, message=message))
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
        if m["role"] == "user" and isinstance(c, str) and not (
            c.startswith("<tool_response>") and c.endswith("</tool_response>")
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


@dataclass(frozen=True)
class ChatTemplate:
    """A prompt template defined by format strings (see module docstring for placeholders).

    Attributes:
        name: registry name.
        prefix: once at the start of every conversation (e.g. ``"{bos}"``).
        system: format of the system block.
        user: format of a user turn.
        tool: format of a tool/observation turn (None: the template has no tool role).
        assistant_prefix: role header before assistant output (masked).
        assistant: format of the assistant output (trained).
        assistant_end: end-of-turn marker after the output (trained), e.g. ``"<|im_end|>"``, ``"{eos}"``.
        assistant_suffix: text after the end-of-turn marker (masked), e.g. ``"\\n"``.
        separator: masked text before every prompt turn except the first.
        default_system: system prompt used when a conversation has none.
        system_placement: ``"block"`` (own block), ``"first_user"`` (merged into the first user
            turn with ``first_user_system``) or ``"none"`` (system messages are an error).
        first_user_system: how a merged system prompt joins the first user message.
        strip_content: strip whitespace around message contents (Jinja ``| trim``).
        reasoning: ``"qwen3"`` for Qwen3's ``<think>`` handling, else None.
        stop_strings: strings that end an assistant turn at inference.
    """

    name: str
    prefix: str = ""
    system: str = "{content}"
    user: str = "{content}"
    tool: str | None = None
    assistant_prefix: str = ""
    assistant: str = "{content}"
    assistant_end: str = "{eos}"
    assistant_suffix: str = ""
    separator: str = ""
    default_system: str | None = None
    system_placement: str = "block"
    first_user_system: str = "{system}\n\n{content}"
    strip_content: bool = False
    reasoning: str | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def bind(self, tokenizer) -> "ChatTemplate":
        """Returns the template to use with ``tokenizer`` (data templates need nothing from it)."""
        return self

    def _content(self, m: dict) -> str:
        c = m.get("content") or ""
        return c.strip() if self.strip_content else c

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               enable_thinking: bool | None = None) -> list[Segment]:
        """Renders a conversation to segments.

        Args:
            messages: ``[{"role", "content"[, "reasoning_content"]}]``, system first if any.
            add_generation_prompt: end with the assistant header (for generation).
            enable_thinking: Qwen3 only: False puts the empty think block into the prompt
                (masked) the way the official template's generation prompt does; None/True leave
                the model to write it (trained).

        Raises:
            TemplateError: for a role the template cannot render.
        """
        out: list[Segment] = []
        emit(out, self.prefix)
        system = None
        start = 0
        if messages and messages[0]["role"] == "system":
            system, start = self._content(messages[0]), 1
        elif self.default_system is not None:
            system = self.default_system
        if system is not None:
            if self.system_placement == "block":
                emit(out, self.system, system, message=0 if start else -1)
            elif self.system_placement == "none":
                raise TemplateError(f"template {self.name!r} has no system role; drop the system message "
                                    "or pick another template")
        lqi = qwen3_last_query_index(messages) if self.reasoning == "qwen3" else -1
        first_prompt = True
        for i in range(start, len(messages)):
            m = messages[i]
            role = m["role"]
            if role in ("user", "tool"):
                if not first_prompt and self.separator:
                    emit(out, self.separator, message=i)
                content = self._content(m)
                if role == "user":
                    if first_prompt and system is not None and self.system_placement == "first_user":
                        content = self.first_user_system.replace("{system}", system).replace("{content}", content)
                    emit(out, self.user, content, message=i)
                else:
                    if self.tool is None:
                        raise TemplateError(f"template {self.name!r} has no tool role (message {i})")
                    emit(out, self.tool, content, message=i)
                first_prompt = False
            elif role == "assistant":
                emit(out, self.assistant_prefix, message=i)
                if self.reasoning == "qwen3":
                    self._qwen3_assistant(out, messages, i, lqi, enable_thinking)
                else:
                    emit(out, self.assistant, self._content(m), train=True, message=i)
                emit(out, self.assistant_end, train=True, message=i)
                emit(out, self.assistant_suffix, message=i)
            else:
                raise TemplateError(f"template {self.name!r}: unknown role {role!r} at message {i}")
        if add_generation_prompt:
            emit(out, self.assistant_prefix)
            if self.reasoning == "qwen3" and enable_thinking is False:
                emit(out, "<think>\n\n</think>\n\n")
        return out

    def _qwen3_assistant(self, out: list[Segment], messages: list[dict], i: int, lqi: int,
                         enable_thinking: bool | None) -> None:
        reasoning, content = qwen3_split_reasoning(messages[i])
        is_last = i == len(messages) - 1
        if i > lqi and (is_last or reasoning):
            think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
            # With thinking off the empty block belongs to the prompt (the generation prompt writes it).
            emit(out, think, train=not (enable_thinking is False and not reasoning.strip("\n")), message=i)
            emit(out, "{content}", content.lstrip("\n"), train=True, message=i)
        else:
            emit(out, "{content}", content, train=True, message=i)

    def render_text(self, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = False, enable_thinking: bool | None = None) -> str:
        """Renders a conversation to one string (for inspection and parity tests)."""
        segs = self.render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        return segments_to_text(segs, bos_token, eos_token)
