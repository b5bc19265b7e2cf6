"""Sample styles: turn a raw row into messages (chat), plain text, or a chosen/rejected pair.

Styles: ``alpaca`` (instruction/input/output/system/history), ``sharegpt`` (conversations with
from/value, or role/content; ShareGPT ``tags`` rename keys and roles; function-call and observation
turns become OpenAI ``tool_calls`` and ``tool`` messages), ``messages`` (OpenAI role/content),
``prompt_completion`` (TRL: prompt/completion as texts or message lists), ``text`` (continued
pre-training) and ``preference`` (chosen/rejected with a prompt from ``prompt``, alpaca
``instruction``/``input`` or ShareGPT ``conversations``, or as full conversations). ``auto`` picks
per row from the keys present. A ``tools`` column (function schemas) is kept on chat samples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tinytune.datasets.data_errors import DatasetError

STYLES = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}

# ShareGPT tag names (MindSpeed/LLaMA-Factory ``tags``) and their defaults.
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}
_TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function_call",
}

PROMPT_ROLES = ("user", "tool")

# Columns every style reads besides its own (see ``STYLE_COLUMNS``).
_COMMON = ("system", "tools")
STYLE_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "history"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "instruction", "input", "history", "conversations", "messages"),
}


@dataclass
class ChatSample:
    """A conversation: list of ``{"role", "content"[, "reasoning_content", "tool_calls"]}`` dicts.

    Attributes:
        messages: the conversation (OpenAI format).
        tools: JSON-schema function list for the template (None: no tools).
        unused: columns of the row the style did not read.
    """

    messages: list[dict]
    tools: list | None = None
    unused: tuple = ()


@dataclass
class TextSample:
    """Raw text for continued pre-training (every token is trained)."""

    text: str
    unused: tuple = ()


@dataclass
class PreferenceSample:
    """Two conversations sharing a prompt; they differ only in the last assistant turn."""

    chosen: list[dict]
    rejected: list[dict]
    tools: list | None = None
    unused: tuple = ()


def detect_style(row: Mapping) -> str:
    """Guesses the style of one row from its keys (``"unknown"`` when nothing fits)."""
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return "unknown"


_NEEDS = (
    "messages: `messages`; sharegpt: `conversations`; preference: `chosen` + `rejected`; "
    "prompt_completion: `prompt` + `completion`; alpaca: `instruction` + `output`; text: `text`"
)
_GUESS = {
    "instruction": ("question", "query", "prompt", "input_text", "problem", "instruction_text", "source"),
    "output": ("answer", "response", "output_text", "target", "solution", "reply", "label"),
    "messages": ("conversation", "dialog", "dialogue", "chat", "turns"),
    "text": ("content", "document", "body", "passage", "sentence"),
}


def suggest_column_map(columns: list[str]) -> dict[str, str]:
    """A ``column_map`` guess from common column names (may be empty)."""
    out = {}
    low = {c.lower(): c for c in columns}
    for field_name, names in _GUESS.items():
        for n in names:
            if n in low and low[n] not in out.values():
                out[field_name] = low[n]
                break
    if "instruction" in out and "output" not in out or "output" in out and "instruction" not in out:
        out.pop("instruction", None)
        out.pop("output", None)
    return out


def undetectable(row: Mapping, file: str, row_no: int) -> DatasetError:
    """The error for a row whose style cannot be told from its columns."""
    cols = sorted(row)
    guess = suggest_column_map(cols)
    if not guess and len(cols) >= 2:
        guess = {"instruction": cols[0], "output": cols[1]}
    pairs = ", ".join(f"{k}: {v}" for k, v in guess.items()) if guess else "instruction: ..., output: ..."
    example = "{" + pairs + "}"
    return DatasetError(
        f"cannot tell the sample style from the columns {cols}; styles tried ({_NEEDS})",
        file=file,
        row=row_no,
        hint=f"Map your columns, e.g. `column_map: {example}`, or set `style`",
    )


def _need(row: Mapping, key: str, file: str, row_no: int, style: str) -> Any:
    if key not in row:
        raise DatasetError(
            f"missing column {key!r} for style {style!r}; row has {sorted(row)}",
            file=file,
            row=row_no,
            hint="Map your column names with `column_map` (e.g. "
            f"column_map: {{{key}: your_column}}) or pick another `style`",
        )
    if row[key] is None:
        raise DatasetError(
            f"column {key!r} is null (style {style!r} needs a value)",
            file=file,
            row=row_no,
            hint="Fill in the value, drop the row, or set skip_bad_samples: true",
        )
    return row[key]


def _text(value: Any, what: str, file: str, row_no: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DatasetError(
            f"{what} must be a string, got {type(value).__name__}",
            file=file,
            row=row_no,
            hint="Fix the row or set skip_bad_samples: true",
        )
    return value


def _tools(row: Mapping, file: str, row_no: int) -> list | None:
    """The row's ``tools`` column: a JSON-schema function list, or a JSON string of one."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"`tools` is not valid JSON ({e.msg} at column {e.colno})",
                file=file,
                row=row_no,
                hint="Write tools as a JSON list of function schemas",
            ) from None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise DatasetError(
            "`tools` must be a list of function schemas ({name, description, parameters})",
            file=file,
            row=row_no,
            hint="Fix the row or set skip_bad_samples: true",
        )
    return [dict(t) for t in tools] or None


def _tool_calls(value: Any, file: str, row_no: int) -> list[dict]:
    """A ShareGPT function-call turn (JSON ``{name, arguments}`` or a list of them) as OpenAI tool_calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"function-call turn is not valid JSON ({e.msg})",
                file=file,
                row=row_no,
                hint='Write it as {"name": ..., "arguments": {...}}',
            ) from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        if not isinstance(c, Mapping) or "name" not in c:
            raise DatasetError(
                f"function call {c!r:.80} needs a `name`",
                file=file,
                row=row_no,
                hint='Write it as {"name": ..., "arguments": {...}}',
            )
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise DatasetError(
                    f"function call {c['name']!r}: arguments are not valid JSON",
                    file=file,
                    row=row_no,
                    hint="Fix the row or set skip_bad_samples: true",
                ) from None
        out.append({"type": "function", "function": {"name": str(c["name"]), "arguments": args}})
    return out


def validate_conversation(messages: list[dict], file: str, row_no: int, *, need_answer: bool = True) -> list[dict]:
    """Checks role order and non-empty answers.

    Rules: an optional system message first; then prompt turns (user/tool) and assistant turns
    alternate, starting with a prompt turn (consecutive tool messages count as one turn: the
    results of parallel calls); an assistant turn has content, reasoning or tool calls; a
    training conversation ends with an assistant turn.

    Raises:
        DatasetError: naming the message index and the problem.
    """
    hint = "Fix the conversation or set skip_bad_samples: true"
    if not messages:
        raise DatasetError("empty conversation", file=file, row=row_no, hint=hint)
    start = 1 if messages[0]["role"] == "system" else 0
    expect_prompt = True
    for k, m in enumerate(messages[start:], start):
        role = m["role"]
        if role == "system":
            raise DatasetError(f"message {k}: a system message is only allowed first", file=file, row=row_no, hint=hint)
        if role not in ("user", "assistant", "tool"):
            raise DatasetError(
                f"message {k}: unknown role {role!r} (use system/user/assistant/tool)", file=file, row=row_no, hint=hint
            )
        is_prompt = role in PROMPT_ROLES
        if role == "tool" and k > start and messages[k - 1]["role"] == "tool":
            continue  # results of parallel tool calls, one message each
        if is_prompt != expect_prompt:
            want = "user" if expect_prompt else "assistant"
            raise DatasetError(
                f"message {k}: role {role!r} out of order (expected {want}; roles must alternate "
                f"user/assistant after an optional system message)",
                file=file,
                row=row_no,
                hint=hint,
            )
        if role == "assistant" and not (
            m["content"].strip() or (m.get("reasoning_content") or "").strip() or m.get("tool_calls")
        ):
            raise DatasetError(f"message {k}: empty assistant answer", file=file, row=row_no, hint=hint)
        expect_prompt = not expect_prompt
    if need_answer and (len(messages) == start or messages[-1]["role"] != "assistant"):
        raise DatasetError(
            "conversation does not end with an assistant answer",
            file=file,
            row=row_no,
            hint="Drop the trailing prompt turn, or set skip_bad_samples: true",
        )
    return messages


def _system(row: Mapping, file: str, row_no: int) -> list[dict]:
    system = _text(row.get("system"), "system", file, row_no)
    return [{"role": "system", "content": system}] if system else []


def _alpaca_prompt(row: Mapping, file: str, row_no: int, style: str) -> list[dict]:
    """System, history pairs and the user turn ``instruction`` + ``"\n"`` + ``input`` (input optional)."""
    instruction = _text(_need(row, "instruction", file, row_no, style), "instruction", file, row_no)
    inp = _text(row.get("input"), "input", file, row_no)
    messages = _system(row, file, row_no)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DatasetError(
            "history must be a list of [question, answer] pairs",
            file=file,
            row=row_no,
            hint="Fix the row or set skip_bad_samples: true",
        )
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DatasetError(
                f"history entry {pair!r} is not a [question, answer] pair",
                file=file,
                row=row_no,
                hint="Fix the row or set skip_bad_samples: true",
            )
        messages.append({"role": "user", "content": _text(pair[0], "history question", file, row_no)})
        messages.append({"role": "assistant", "content": _text(pair[1], "history answer", file, row_no)})
    prompt = f"{instruction}\n{inp}" if inp else instruction
    if not prompt.strip():
        raise DatasetError("empty instruction", file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true")
    messages.append({"role": "user", "content": prompt})
    return messages


def _alpaca(row: Mapping, file: str, row_no: int) -> list[dict]:
    prompt = _alpaca_prompt(row, file, row_no, "alpaca")
    output = _text(_need(row, "output", file, row_no, "alpaca"), "output", file, row_no)
    return prompt + [{"role": "assistant", "content": output}]


def _openai_message(m: Mapping, k: int, file: str, row_no: int) -> dict:
    msg = {"role": str(m["role"]), "content": _text(m.get("content"), "content", file, row_no)}
    if m.get("reasoning_content"):
        msg["reasoning_content"] = _text(m["reasoning_content"], "reasoning_content", file, row_no)
    if m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise DatasetError(
                f"message {k}: tool_calls must be a list",
                file=file,
                row=row_no,
                hint="Fix the row or set skip_bad_samples: true",
            )
        msg["tool_calls"] = _tool_calls(
            [c.get("function", c) if isinstance(c, Mapping) else c for c in calls], file, row_no
        )
    return msg


def _turns(conv: Any, tags: Mapping | None, file: str, row_no: int, what: str) -> list[dict]:
    """ShareGPT turns (``tags``: role/content keys and role names) or OpenAI messages -> messages."""
    if not isinstance(conv, list):
        raise DatasetError(
            f"`{what}` must be a list of turns", file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true"
        )
    t = {**DEFAULT_TAGS, **(tags or {})}
    roles = dict(SHAREGPT_ROLES)
    roles.update({str(t[k]).lower(): r for k, r in _TAG_ROLES.items()})
    out: list[dict] = []
    for k, turn in enumerate(conv):
        if isinstance(turn, Mapping) and t["role_tag"] in turn and t["content_tag"] in turn:
            tag = str(turn[t["role_tag"]]).lower()
            if tag not in roles:
                raise DatasetError(
                    f"{what} turn {k}: unknown role tag {turn[t['role_tag']]!r} (known: {', '.join(sorted(roles))})",
                    file=file,
                    row=row_no,
                    hint="Map your role names with `tags` (user_tag, assistant_tag, ...)",
                )
            value = turn[t["content_tag"]]
            if roles[tag] == "function_call":
                out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(value, file, row_no)})
            else:
                out.append({"role": roles[tag], "content": _text(value, t["content_tag"], file, row_no)})
        elif isinstance(turn, Mapping) and "role" in turn and "content" in turn:
            out.append(_openai_message(turn, k, file, row_no))
        else:
            raise DatasetError(
                f"{what} turn {k} needs `{t['role_tag']}` and `{t['content_tag']}` (or `role` and "
                f"`content`) keys, got {turn!r:.80}",
                file=file,
                row=row_no,
                hint='Use turns like {"from": "human", "value": "..."} or set `tags`',
            )
    return out


def _answer(value: Any, prompt: list[dict], tags: Mapping | None, file: str, row_no: int, what: str) -> list[dict]:
    """A chosen/rejected/completion value (text, one turn, or turns) appended to ``prompt``."""
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):
        msgs = _turns(value, tags, file, row_no, what)
        if msgs and msgs[0]["role"] != "assistant":
            return msgs  # a full conversation
        return prompt + msgs
    raise DatasetError(
        f"`{what}` must be a string, a turn, or a list of turns",
        file=file,
        row=row_no,
        hint="Fix the row or set skip_bad_samples: true",
    )


def _prompt_messages(row: Mapping, tags: Mapping | None, file: str, row_no: int) -> tuple[list[dict], str | None]:
    """The shared prompt of a preference row and the column it came from."""
    if "conversations" in row:
        return _system(row, file, row_no) + _turns(
            row["conversations"], tags, file, row_no, "conversations"
        ), "conversations"
    if "messages" in row:
        return _system(row, file, row_no) + _turns(row["messages"], tags, file, row_no, "messages"), "messages"
    if "instruction" in row:
        return _alpaca_prompt(row, file, row_no, "preference"), "instruction"
    if "prompt" in row:
        p = _need(row, "prompt", file, row_no, "preference")
        if isinstance(p, list):
            return _system(row, file, row_no) + _turns(p, tags, file, row_no, "prompt"), "prompt"
        return _system(row, file, row_no) + [{"role": "user", "content": _text(p, "prompt", file, row_no)}], "prompt"
    return _system(row, file, row_no), None


def _preference(row: Mapping, tags: Mapping | None, file: str, row_no: int) -> tuple[PreferenceSample, set]:
    chosen = _need(row, "chosen", file, row_no, "preference")
    rejected = _need(row, "rejected", file, row_no, "preference")
    prompt, source = _prompt_messages(row, tags, file, row_no)
    if source is None and (isinstance(chosen, (str, Mapping))):
        raise DatasetError(
            "a chosen/rejected answer needs a prompt: a `prompt`, `instruction` or `conversations` "
            f"column; row has {sorted(row)}",
            file=file,
            row=row_no,
            hint="Map your prompt column with `column_map`, or give chosen/rejected as full conversations",
        )
    c = validate_conversation(_answer(chosen, prompt, tags, file, row_no, "chosen"), file, row_no)
    r = validate_conversation(_answer(rejected, prompt, tags, file, row_no, "rejected"), file, row_no)
    if c[:-1] != r[:-1]:
        raise DatasetError(
            "chosen and rejected conversations must share everything but the last answer",
            file=file,
            row=row_no,
            hint="Fix the row or set skip_bad_samples: true",
        )
    used = {"chosen", "rejected", "system", "tools"}
    used |= {"instruction", "input", "history"} if source == "instruction" else ({source} if source else set())
    return PreferenceSample(c, r, _tools(row, file, row_no)), used


def check_tags(tags: Any) -> dict | None:
    """Validates a ShareGPT ``tags`` mapping (unknown keys and non-string values are errors)."""
    if not tags:
        return None
    if not isinstance(tags, Mapping):
        raise DatasetError(
            f"`tags` must be a mapping, got {type(tags).__name__}",
            hint=f"Fix `tags` in the dataset config; keys: {', '.join(DEFAULT_TAGS)}",
        )
    unknown = sorted(set(tags) - set(DEFAULT_TAGS))
    if unknown:
        raise DatasetError(f"unknown `tags` key(s) {unknown}", hint=f"Use {', '.join(DEFAULT_TAGS)}")
    bad = [k for k, v in tags.items() if not isinstance(v, str) or not v]
    if bad:
        raise DatasetError(f"`tags` values must be non-empty strings ({', '.join(bad)})", hint="Fix `tags`")
    return dict(tags)


def row_to_sample(
    row: Mapping, style: str, file: str, row_no: int, tags: Mapping | None = None
) -> ChatSample | TextSample | PreferenceSample:
    """Converts one (column-mapped) row into a sample of the given style.

    Args:
        row: the row after ``column_map``.
        style: a name of :data:`STYLES` (``auto`` detects per row).
        file, row_no: where the row is (for errors).
        tags: ShareGPT tag names (see :data:`DEFAULT_TAGS`).

    Returns:
        The sample; its ``unused`` lists the row's columns the style did not read.

    Raises:
        DatasetError: for missing or null columns, empty answers or roles out of order.
    """
    if style == "auto":
        style = detect_style(row)
        if style == "unknown":
            raise undetectable(row, file, row_no)
    used = set(STYLE_COLUMNS.get(style, ())) | set(_COMMON)
    if style == "alpaca":
        sample = ChatSample(validate_conversation(_alpaca(row, file, row_no), file, row_no), _tools(row, file, row_no))
    elif style in ("sharegpt", "messages"):
        key = "conversations" if style == "sharegpt" else "messages"
        msgs = _system(row, file, row_no) + _turns(_need(row, key, file, row_no, style), tags, file, row_no, key)
        sample = ChatSample(validate_conversation(msgs, file, row_no), _tools(row, file, row_no))
    elif style == "prompt_completion":
        p = _need(row, "prompt", file, row_no, style)
        prompt = _system(row, file, row_no) + (
            _turns(p, tags, file, row_no, "prompt")
            if isinstance(p, list)
            else [{"role": "user", "content": _text(p, "prompt", file, row_no)}]
        )
        msgs = _answer(_need(row, "completion", file, row_no, style), prompt, tags, file, row_no, "completion")
        sample = ChatSample(validate_conversation(msgs, file, row_no), _tools(row, file, row_no))
    elif style == "text":
        text = _text(_need(row, "text", file, row_no, style), "text", file, row_no)
        if not text.strip():
            raise DatasetError("empty text", file=file, row=row_no, hint="Fix the row or set skip_bad_samples: true")
        sample, used = TextSample(text), {"text"}
    elif style == "preference":
        sample, used = _preference(row, tags, file, row_no)
    else:
        raise DatasetError(
            f"unknown style {style!r} (choose from {', '.join(STYLES)})", hint="Fix `style` in the dataset config"
        )
    sample.unused = tuple(sorted(str(c) for c in row if c not in used))
    return sample
