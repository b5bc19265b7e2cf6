"""Tool-calling SFT: built-in qwen2_5 / qwen3 / llama3_1 and ``hf`` render ``tools=`` and
OpenAI-format ``tool_calls`` / ``tool`` messages token- and mask-exact against the official Jinja
(transformers' apply_chat_template with ``tools=``): calls trained, tool results masked."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
from template_corpus import reference_encoding
from test_datasets_helpers import tinytune_test_tokenizer
from test_templates_fidelity import encode, jinja, reference_tokenizer

from tinytune.datasets import sft_dataset
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import TemplateError, get_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市 / city"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}
CITIES = ["Paris", "東京", "São Paulo", "d", "user", "im_end | city"]


def call(rng, as_string: bool):
    name, args = rng.choice(
        [
            ("get_weather", {"city": rng.choice(CITIES), "unit": "c"}),
            ("search", {"q": rng.choice(["2+2", "tool_call", "ipython", "yes"])}),
        ]
    )
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def tool_conversation(rng: random.Random, *, multi_calls: bool, content_with_calls: bool, string_args: bool):
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["", "You are a weather bot.", "get_weather"])})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": rng.choice(["Weather in Paris?", "search 2+2 please", "d", "Hi"])})
        for _ in range(rng.randint(0, 2)):  # tool rounds
            n = rng.randint(1, 2) if multi_calls else 1
            content = rng.choice(["", "Let me check."]) if content_with_calls else ""
            msgs.append(
                {
                    "role": "assistant",
                    "content": content,
                    "tool_calls": [call(rng, string_args and rng.random() < 0.5) for _ in range(n)],
                }
            )
            for _ in range(n):
                msgs.append({"role": "tool", "content": rng.choice(['{"temp": 21}', "sunny, 21 °C", "4", "yes"])})
        msgs.append({"role": "assistant", "content": rng.choice(["It is sunny.", "4", "d", "get_weather"])})
    return msgs


def parsed_args(msgs):
    """Test-side: tool-call arguments given as JSON strings, as objects (what tojson should write)."""
    out = []
    for m in msgs:
        if m.get("tool_calls"):
            m = dict(
                m,
                tool_calls=[
                    {
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": json.loads(c["function"]["arguments"])
                            if isinstance(c["function"]["arguments"], str)
                            else c["function"]["arguments"],
                        },
                    }
                    for c in m["tool_calls"]
                ],
            )
        out.append(m)
    return out


# official Jinja -> (end-of-turn, builtin, corpus options, arguments written verbatim when a string)
CASES = {
    "qwen2_5": ("<|im_end|>", "qwen2_5", dict(multi_calls=True, content_with_calls=True), False),
    "qwen3": ("<|im_end|>", "qwen3", dict(multi_calls=True, content_with_calls=True), True),
    "llama3_1": ("<|eot_id|>", "llama3_1", dict(multi_calls=False, content_with_calls=False), False),
}


@pytest.mark.parametrize("ref_name", list(CASES))
def test_tool_calling_matches_official_template(ref_name):
    end, builtin, opts, verbatim = CASES[ref_name]
    family = "llama3" if ref_name.startswith("llama") else "chatml"
    tok = tinytune_test_tokenizer(family)
    hf_tok = reference_tokenizer(family)
    source = jinja(ref_name)
    rng = random.Random(3)
    kw = {"enable_thinking": True} if ref_name == "qwen3" else {}
    templates = [get_template(builtin).bind(tok), get_template("hf", chat_template=source, end_of_turn=[end]).bind(tok)]
    checked = 0
    for i in range(60):
        msgs = tool_conversation(rng, string_args=True, **opts)
        tools = [WEATHER, SEARCH][: 1 + i % 2] if i % 5 else None  # some conversations call without a tool list
        ref_msgs = msgs if verbatim else parsed_args(msgs)
        ref = reference_encoding(hf_tok, source, ref_msgs, end, **({"tools": tools} if tools else {}), **kw)
        assert ref is not None
        for t in templates[:1] if (not verbatim and ref_msgs != msgs) else templates:
            # hf renders what the official template does: string arguments are its business
            assert encode(tok, t, msgs, tools=tools, **kw) == ref, (t.name, msgs)
        checked += 1
    assert checked == 60


def trained(tok, tokens, labels) -> str:
    return tok.decode([tokens[i + 1] for i in range(len(tokens) - 1) if labels[i] != -100], skip_special_tokens=False)


def test_calls_trained_observations_masked():
    tok = tinytune_test_tokenizer("chatml")
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    for name in ("qwen2_5", "qwen3"):
        tokens, labels = encode(tok, get_template(name).bind(tok), msgs, tools=[WEATHER])
        got = trained(tok, tokens, labels)
        assert got == (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
            "Sunny.<|im_end|>"
        ), name
        assert "sunny" not in got and "# Tools" not in got
    tok = tinytune_test_tokenizer("llama3")
    msgs[2] = {"role": "ipython", "content": {"sky": "sunny"}}
    tokens, labels = encode(tok, get_template("llama3_1").bind(tok), msgs, tools=[WEATHER])
    assert trained(tok, tokens, labels) == (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>Sunny.<|eot_id|>'
    )
    text = tok.decode(tokens, skip_special_tokens=False)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"sky": "sunny"}<|eot_id|>' in text
    assert "Environment: ipython\n" in text


def test_tool_errors_are_clear():
    tok = tinytune_test_tokenizer("llama3")
    call_msg = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}] * 2,
    }
    msgs = [{"role": "user", "content": "q"}, call_msg]
    with pytest.raises(TemplateError, match="exactly one tool call"):
        get_template("llama3_1").render(msgs)
    with pytest.raises(TemplateError, match="drops the content"):
        get_template("llama3_1").render(
            [msgs[0], dict(call_msg, content="Sure.", tool_calls=call_msg["tool_calls"][:1])]
        )
    with pytest.raises(TemplateError, match="cannot render tool calls"):
        get_template("llama3").render(msgs)
    with pytest.raises(TemplateError, match="cannot render a `tools` column"):
        get_template("chatml").render(msgs[:1], tools=[WEATHER])
    bad = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
    with pytest.raises(TemplateError, match="message 1: tool-call arguments are a string but not JSON"):
        get_template("qwen2_5").render([msgs[0], bad])
    with pytest.raises(TemplateError, match="needs"):
        get_template("qwen2_5").render([msgs[0], {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}])
    assert tok is not None


def test_llama3_1_date_string_and_tool_turn_of_llama3():
    t = get_template("llama3_1", date_string="01 Jan 2025")
    text = t.render_text([{"role": "user", "content": "hi"}], bos_token="<|begin_of_text|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nhi<|eot_id|>"
    )
    from template_corpus import render

    hf_tok = reference_tokenizer("llama3")
    assert text == render(hf_tok, jinja("llama3_1"), [{"role": "user", "content": "hi"}], date_string="01 Jan 2025")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": " r "}]
    assert get_template("llama3").render_text(msgs, bos_token="<|begin_of_text|>") == render(
        hf_tok, jinja("llama3"), msgs
    )


EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "examples", "tool_calls.jsonl"
)


def test_example_tool_dataset_renders_like_official_qwen2_5(tmp_path):
    """The README's example rows (configs/qwen2_5/0.5B_lora_tools.yaml) through qwen2_5 and hf."""
    tok = tinytune_test_tokenizer("chatml")
    hf_tok = reference_tokenizer("chatml")
    with open(EXAMPLE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) >= 4
    hf_t = get_template("hf", chat_template=jinja("qwen2_5"), end_of_turn=["<|im_end|>"]).bind(tok)
    for row in rows:
        ref = reference_encoding(hf_tok, jinja("qwen2_5"), row["messages"], "<|im_end|>", tools=row["tools"])
        for t in (get_template("qwen2_5").bind(tok), hf_t):
            assert encode(tok, t, row["messages"], tools=row["tools"]) == ref
    if "tools" not in {f.name for f in dataclasses.fields(ChatSample)}:
        pytest.skip("the dataset side does not read a `tools` column on this branch yet")
    ds = sft_dataset(tok, EXAMPLE, style="messages", template="qwen2_5", cache_dir=str(tmp_path), num_workers=1)
    for i, row in enumerate(rows):
        ref = reference_encoding(hf_tok, jinja("qwen2_5"), row["messages"], "<|im_end|>", tools=row["tools"])
        assert (list(ds[i]["tokens"]), list(ds[i]["labels"])) == (ref[0], ref[1])
