"""Tool-calling text of the built-in templates: the tool list in the prompt and the calls an
assistant writes, in each family's official syntax.

Messages use the OpenAI format (see docs/ARCHITECTURE.md, Data): an assistant message may carry
``tool_calls=[{"type": "function", "function": {"name": str, "arguments": dict | str}}]`` and a
tool result is ``{"role": "tool", "content": str}``. ``tools`` is a list of JSON-schema function
dicts, written into the prompt with transformers' ``tojson``.

Formats (``ChatTemplate.tool_format``):

- ``qwen2_5`` / ``qwen3``: a ``# Tools`` section with one ``<tools>`` JSON line per tool at the end
  of the system block; each call is ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
  (Qwen3 writes string arguments verbatim, Qwen2.5 serialises the parsed object).
- ``llama3_1``: the tool list (JSON, indent 4) opens the first user message (the official default
  ``tools_in_user_message``); a call is ``{"name": ..., "parameters": ...}``, one per message.
"""

from __future__ import annotations

import json
import re

from tinytune.datasets.templates.template_error import TemplateError

TOOL_FORMATS = ("qwen2_5", "qwen3", "llama3_1")

_QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_LLAMA31_TOOLS_HEAD = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)
_FIELD = re.compile(r"\{(name|arguments)\}")


def tojson(x, indent: int | None = None) -> str:
    """JSON exactly as transformers' chat-template ``tojson`` filter writes it (no HTML escaping)."""
    return json.dumps(x, ensure_ascii=False, indent=indent)


def tools_text(tool_format: str, tools: list) -> str:
    """The tool list as the template writes it into the prompt (system block or first user turn)."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise TemplateError(f"tools must be a list of JSON-schema function dicts, got {type(tools).__name__}")
    if tool_format in ("qwen2_5", "qwen3"):
        return _QWEN_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + _QWEN_TOOLS_TAIL
    if tool_format == "llama3_1":
        return _LLAMA31_TOOLS_HEAD + "".join(tojson(t, indent=4) + "\n\n" for t in tools)
    raise TemplateError(f"unknown tool format {tool_format!r}; choose from {', '.join(TOOL_FORMATS)}")


def function_of(call, message: int) -> tuple[str, object]:
    """``(name, arguments)`` of one OpenAI tool call (``{"function": {...}}`` or a bare function dict)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise TemplateError(
            f"message {message}: a tool call needs {{'type': 'function', 'function': "
            f"{{'name': str, 'arguments': dict or JSON string}}}}, got {call!r}"
        )
    return fn["name"], fn.get("arguments", {})


def arguments_text(arguments, *, verbatim_strings: bool, message: int) -> str:
    """A call's arguments as JSON text.

    Args:
        arguments: a dict (or other JSON value), or a JSON string.
        verbatim_strings: write a string as it is (Qwen3); otherwise parse it and serialise the
            object (the official Qwen2.5 / Llama 3.1 templates would JSON-quote the string itself).
        message: message index for errors.
    """
    if isinstance(arguments, str):
        if verbatim_strings:
            return arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise TemplateError(
                f"message {message}: tool-call arguments are a string but not JSON ({e}): {arguments[:80]!r}"
            ) from None
    return tojson(arguments)


def call_text(fmt: str, name: str, arguments: str) -> str:
    """Fills ``{name}`` and ``{arguments}`` of a call format in one pass (literal braces stay)."""
    return _FIELD.sub(lambda m: name if m.group(1) == "name" else arguments, fmt)


def tool_content(content, *, as_json: bool, message: int) -> str:
    """A tool result's text: JSON-encoded when the template does so (Llama 3.1 quotes even strings)."""
    if as_json:
        return tojson(content)
    if not isinstance(content, str):
        raise TemplateError(
            f"message {message}: tool content must be a string for this template, "
            f"got {type(content).__name__}; serialise it with json.dumps first"
        )
    return content
