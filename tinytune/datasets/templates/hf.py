"""The ``hf`` template: render a model's own Jinja ``chat_template`` the way transformers does.

The whole conversation is rendered once (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``tojson``). Assistant turns are located by structure, never by searching
for their text: answer ``k`` starts where ``render(messages[:k], add_generation_prompt=True)``
ends (that render must be a prefix of the whole one) and runs up to and including the first
end-of-turn token after it. That span is trained; everything else is masked.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from tinytune.datasets.templates.template_spec import (
    Segment,
    TemplateError,
    check_enable_thinking,
    has_reasoning,
    without_reasoning,
)


def _raise_exception(message: str):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers some templates carry):
    rendered as their body; tinytune locates answers by prefix renders instead."""
    from jinja2 import nodes  # noqa: PLC0415 (jinja2 only for hf templates (import cost))
    from jinja2.ext import Extension  # noqa: PLC0415 (jinja2 only for hf templates (import cost))

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """Compiles a chat template in a sandboxed Jinja environment configured like transformers'."""
    from jinja2.ext import loopcontrols  # noqa: PLC0415 (jinja2 only for hf templates (import cost))
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415 (jinja2 only for hf templates (import cost))

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_extension()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_jinja(
    source: str,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = False,
    **kwargs,
) -> str:
    """Renders ``messages`` with a Jinja chat template (extra ``kwargs`` become template variables)."""
    return compile_chat_template(source).render(
        messages=messages,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def _token_string(tokenizer, token_id) -> str | None:
    if token_id is None:
        return None
    for name, i in (getattr(tokenizer, "special_tokens", None) or {}).items():
        if i == token_id:
            return name
    return None


class HFChatTemplate:
    """Renders with a Jinja chat template (from the tokenizer, a string, or a ``.jinja`` file).

    Args:
        chat_template: Jinja source or a path to a file holding it; None takes
            ``tokenizer.chat_template`` at :meth:`bind` time.
        end_of_turn: strings that close an assistant turn and are trained with it; by default the
            tokenizer's EOS and stop-token strings.
        template_kwargs: extra template variables (e.g. ``{"date_string": "01 Jan 2025"}``).
    """

    name = "hf"
    MASKING = "prefix-render"  # part of the token-cache key: caches built with other rules are not reused

    def __init__(
        self,
        chat_template: str | None = None,
        end_of_turn: list[str] | None = None,
        bos_token: str = "",
        eos_token: str = "",
        template_kwargs: dict | None = None,
    ):
        if chat_template and "{" not in chat_template and chat_template.endswith((".jinja", ".j2", ".txt")):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template
        self.end_of_turn = list(end_of_turn or [])
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.template_kwargs = dict(template_kwargs or {})
        reserved = {"messages", "tools", "add_generation_prompt", "enable_thinking", "bos_token", "eos_token"}
        if reserved & set(self.template_kwargs):
            raise TemplateError(
                f"template_kwargs may not set {sorted(reserved & set(self.template_kwargs))}; they are render arguments"
            )

    def bind(self, tokenizer) -> "HFChatTemplate":
        """Returns a copy that uses ``tokenizer``'s chat template and special-token strings."""
        source = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not source:
            raise TemplateError(
                "template 'hf' needs a chat template: the tokenizer has none; set "
                "`chat_template` (Jinja text or a .jinja file) or pick a named template"
            )
        ends = list(self.end_of_turn)
        if not ends:
            ids = [getattr(tokenizer, "eos_id", None)] + list(getattr(tokenizer, "stop_tokens", None) or [])
            ends = [s for s in (_token_string(tokenizer, i) for i in ids) if s]
        if not ends:
            raise TemplateError(
                "template 'hf': the tokenizer names no EOS or stop token, so the end of an "
                "assistant turn is unknown; set `end_of_turn` (e.g. ['<|im_end|>'])"
            )
        bos = self.bos_token or _token_string(tokenizer, getattr(tokenizer, "bos_id", None)) or ""
        eos = self.eos_token or _token_string(tokenizer, getattr(tokenizer, "eos_id", None)) or ""
        return HFChatTemplate(source, sorted(set(ends), key=len, reverse=True), bos, eos, self.template_kwargs)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.end_of_turn)

    def _thinking(self, enable_thinking: bool | None) -> bool | None:
        """``enable_thinking`` after the type check; None for a template that does not read it (then
        the value changes nothing, as for the built-in templates other than qwen3)."""
        check_enable_thinking(enable_thinking)
        return enable_thinking if "enable_thinking" in (self.chat_template or "") else None

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool, thinking_kw: dict) -> str:
        if not self.chat_template:
            raise TemplateError("template 'hf' is not bound to a tokenizer/chat template")
        kw = dict(self.template_kwargs, **thinking_kw)
        if tools is not None:
            kw["tools"] = tools
        try:
            return render_jinja(
                self.chat_template,
                messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                **kw,
            )
        except TemplateError:
            raise
        except Exception as e:  # jinja2 errors, or a template indexing a message that is not there
            raise TemplateError(
                f"template 'hf': the chat template failed on {len(messages)} message(s)"
                f"{' + generation prompt' if add_generation_prompt else ''}: "
                f"{type(e).__name__}: {e}"
            ) from None

    def render_text(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> str:
        """Renders a conversation to one string (``enable_thinking`` is passed on when not None;
        with False, reasoning is first removed from the messages as in :meth:`render`)."""
        enable_thinking = self._thinking(enable_thinking)
        if enable_thinking is False:
            messages = [without_reasoning(m) for m in messages]
        kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if bos_token is not None or eos_token is not None:
            t = HFChatTemplate(
                self.chat_template,
                self.end_of_turn,
                self.bos_token if bos_token is None else bos_token,
                self.eos_token if eos_token is None else eos_token,
                self.template_kwargs,
            )
            return t._render(messages, tools, add_generation_prompt, kw)
        return self._render(messages, tools, add_generation_prompt, kw)

    def _answer_start(self, messages: list[dict], k: int, text: str, tools, enable_thinking: bool | None) -> int:
        """Where assistant message ``k``'s answer begins in ``text``: the end of the generation
        prompt rendered for ``messages[:k]``.

        The prompt is rendered with ``enable_thinking=False`` first where the answer should not
        train an empty think block (thinking off, or null and the turn has no reasoning), so a
        Qwen3-style template puts that block into the prompt; where that render is not a prefix
        (the template writes no think block for this turn, e.g. a historical turn) the plain
        generation prompt is used. If neither is a prefix, the same renders of ``messages[:k]``
        with the reasoning of earlier assistant turns removed are tried (Qwen3 drops it from
        turns before the last user query, which ``messages[:k]`` alone may not contain).
        """
        if enable_thinking is True or (enable_thinking is None and has_reasoning(messages[k])):
            tries = [{"enable_thinking": True}]
        else:
            tries = [{"enable_thinking": False}, {"enable_thinking": True}]
        seen = []
        # A template may drop the reasoning of earlier turns once a later user query exists (Qwen3);
        # the full render then shows those turns without it, so the prefix is rendered that way too.
        stripped = [without_reasoning(m) for m in messages[:k]]
        for history in (messages[:k], stripped):
            for kw in tries:
                prompt = self._render(history, tools, True, kw)
                if text.startswith(prompt):
                    return len(prompt)
                seen.append(prompt)
            if stripped == messages[:k]:
                break
        common = 0
        limit = min(len(seen[-1]), len(text))
        while common < limit and seen[-1][common] == text[common]:
            common += 1
        raise TemplateError(
            f"template 'hf': message {k} (assistant): the chat template's render of the first {k} message(s) "
            f"with add_generation_prompt=True is not a prefix of the whole conversation's render (they differ "
            f"at character {common}: {seen[-1][common : common + 40]!r} vs {text[common : common + 40]!r}), so the "
            "answer cannot be located; the template rewrites earlier turns depending on later ones. Use the "
            "family's named template (e.g. qwen3), or split the conversation into samples that end before "
            "the rewritten turn"
        )

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> list[Segment]:
        """Renders, then marks each assistant turn (located by structure) as trained.

        Args:
            messages: OpenAI-format messages (see docs/ARCHITECTURE.md, Data).
            tools: JSON-schema function dicts, passed to the template as ``tools``.
            add_generation_prompt: end with the assistant header (for generation).
            enable_thinking: True / False / None with the Qwen3 SFT-guide semantics of the
                built-in ``qwen3`` template (False removes reasoning from the messages first); the
                value is passed to the template as ``enable_thinking`` when not None. Ignored
                (after its type check) by templates that do not read ``enable_thinking``.

        Raises:
            TemplateError: when a turn cannot be located by structure (see :meth:`_answer_start`)
                or has no end-of-turn token.
        """
        enable_thinking = self._thinking(enable_thinking)
        if enable_thinking is False:
            messages = [without_reasoning(m) for m in messages]
        kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        text = self._render(messages, tools, add_generation_prompt, kw)
        out: list[Segment] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = self._answer_start(messages, k, text, tools, enable_thinking)
            if start < cursor:
                raise TemplateError(
                    f"template 'hf': message {k} (assistant) starts inside the previous answer; "
                    "the template does not render turns in order"
                )
            hits = [(text.find(s, start), s) for s in self.end_of_turn]
            hits = [(i, s) for i, s in hits if i >= 0]
            if not hits:
                raise TemplateError(
                    f"template 'hf': message {k} (assistant): no end-of-turn token "
                    f"({', '.join(self.end_of_turn)}) follows the answer; set `end_of_turn`"
                )
            at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            end = at + len(s)
            if start > cursor:
                # The assistant header (the generation prompt's own text) belongs to turn k, what
                # comes before it to the earlier messages (truncation keeps turn k whole).
                prev = self._render(messages[:k], tools, False, kw) if k else ""
                head = len(prev) if cursor <= len(prev) < start and text.startswith(prev) else cursor
                if head > cursor:
                    out.append(Segment(text=text[cursor:head]))
                out.append(Segment(text=text[head:start], message=k))
            out.append(Segment(text=text[start:end], train=True, message=k))
            cursor = end
        if cursor < len(text):
            out.append(Segment(text=text[cursor:]))
        return out
