"""The ``hf`` template: render a model's own Jinja ``chat_template`` the way transformers does.

The whole conversation is rendered once (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``tojson``); then each assistant answer is located in the rendered text and
marked trainable together with the end-of-turn token that follows it. Everything else is masked.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from tinytune.datasets.templates.base import Segment, TemplateError, qwen3_split_reasoning


def _raise_exception(message: str):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers some templates carry):
    rendered as their body; tinytune finds answers in the text itself."""
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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_jinja(source: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                 add_generation_prompt: bool = False, **kwargs) -> str:
    """Renders ``messages`` with a Jinja chat template (extra ``kwargs`` become template variables)."""
    return compile_chat_template(source).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt, **kwargs)


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
    """

    name = "hf"

    def __init__(self, chat_template: str | None = None, end_of_turn: list[str] | None = None,
                 bos_token: str = "", eos_token: str = ""):
        if chat_template and "{" not in chat_template and chat_template.endswith((".jinja", ".j2", ".txt")):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template
        self.end_of_turn = list(end_of_turn or [])
        self.bos_token = bos_token
        self.eos_token = eos_token

    def bind(self, tokenizer) -> "HFChatTemplate":
        """Returns a copy that uses ``tokenizer``'s chat template and special-token strings."""
        source = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not source:
            raise TemplateError("template 'hf' needs a chat template: the tokenizer has none; set "
                                "`chat_template` (Jinja text or a .jinja file) or pick a named template")
        ends = list(self.end_of_turn)
        if not ends:
            ids = [getattr(tokenizer, "eos_id", None)] + list(getattr(tokenizer, "stop_tokens", None) or [])
            ends = [s for s in (_token_string(tokenizer, i) for i in ids) if s]
        bos = self.bos_token or _token_string(tokenizer, getattr(tokenizer, "bos_id", None)) or ""
        eos = self.eos_token or _token_string(tokenizer, getattr(tokenizer, "eos_id", None)) or ""
        return HFChatTemplate(source, sorted(set(ends), key=len, reverse=True), bos, eos)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.end_of_turn)

    def render_text(self, messages: list[dict], *, bos_token: str | None = None, eos_token: str | None = None,
                    add_generation_prompt: bool = False, enable_thinking: bool | None = None) -> str:
        """Renders a conversation to one string."""
        if not self.chat_template:
            raise TemplateError("template 'hf' is not bound to a tokenizer/chat template")
        kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return render_jinja(self.chat_template, messages,
                            bos_token=self.bos_token if bos_token is None else bos_token,
                            eos_token=self.eos_token if eos_token is None else eos_token,
                            add_generation_prompt=add_generation_prompt, **kw)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               enable_thinking: bool | None = None) -> list[Segment]:
        """Renders, then splits the text into masked prompt and trained answer segments.

        Raises:
            TemplateError: when an assistant answer cannot be found in the rendered text (the
                template rewrites answers in a way tinytune cannot follow; use a named template).
        """
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking)
        out: list[Segment] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            reasoning, post_think = qwen3_split_reasoning(m)
            raw = m.get("content") or ""
            candidates = [c for c in {raw, raw.strip(), post_think, post_think.lstrip("\n"), post_think.strip()} if c]
            found = [(text.find(c, cursor), -len(c), c) for c in candidates]
            found = [f for f in found if f[0] >= 0]
            if not found:
                raise TemplateError(f"message {i}: the assistant answer does not appear in the text rendered by "
                                    "the chat template; use a named template instead of 'hf'")
            start, _, cand = min(found)
            end = start + len(cand)
            if enable_thinking is not False or reasoning.strip():
                think = text.rfind("<think>", cursor, start)
                if think >= 0 and text.find("</think>", think, start) >= 0:
                    start = think
            gap = len(text[end:end + 8]) - len(text[end:end + 8].lstrip(" \n"))  # e.g. Llama 2's " </s>"
            for s in self.end_of_turn:
                if text.startswith(s, end):
                    end += len(s)
                    break
                if gap and text.startswith(s, end + gap):
                    end += gap + len(s)
                    break
            if start > cursor:
                out.append(Segment(text=text[cursor:start], message=i))
            out.append(Segment(text=text[start:end], train=True, message=i))
            cursor = end
        if cursor < len(text):
            out.append(Segment(text=text[cursor:]))
        return out
