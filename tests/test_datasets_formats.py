"""Seed data formats (pairwise alpaca, ShareGPT pairwise and tags, TRL prompt/completion, Qwen3 guide
conversations, tools), unused-column warnings, undetectable formats, file encodings, and the
structure-keeping truncation with its per-reason counts."""

from __future__ import annotations

import json
import logging

import pytest
from test_datasets_helpers import chatml_test_tokenizer, llama3_test_tokenizer

from tinytune.datasets import IGNORE_INDEX, DatasetError, TemplateError, preference_dataset, sft_dataset
from tinytune.datasets.encoding import SampleEncoder, answer_budget
from tinytune.datasets.styles import ChatSample, PreferenceSample, row_to_sample

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def _trained(tok, item, prefix=""):
    t, lab = item[prefix + "tokens"], item[prefix + "labels"]
    return tok.decode([t[i + 1] for i in range(len(t) - 1) if lab[i] != IGNORE_INDEX], skip_special_tokens=False)


def test_pairwise_alpaca_keeps_input():
    row = {
        "instruction": "Translate",
        "input": "bonjour",
        "chosen": "hello",
        "rejected": "goodbye",
        "system": "Be exact.",
    }
    s = row_to_sample(row, "auto", "f", 1)
    assert isinstance(s, PreferenceSample) and s.unused == ()
    assert s.chosen == [{"role": "system", "content": "Be exact."}, U("Translate\nbonjour"), A("hello")]
    assert s.rejected[-1] == A("goodbye") and s.rejected[:-1] == s.chosen[:-1]


def test_sharegpt_pairwise_and_trl_preference():
    row = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "human", "value": "q2"},
        ],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    s = row_to_sample(row, "auto", "f", 1)
    assert s.chosen == [U("q"), A("a"), U("q2"), A("good")] and s.rejected[-1] == A("bad")
    trl = row_to_sample({"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}, "auto", "f", 1)
    assert trl.chosen == [U("q"), A("good")] and trl.rejected == [U("q"), A("bad")]


def test_preference_dataset_from_pairwise_alpaca_trains_only_answers(tmp_path, caplog):
    tok = chatml_test_tokenizer()
    rows = [{"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "goodbye"}]
    with caplog.at_level(logging.WARNING, logger="tinytune.datasets"):
        ds = preference_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path), num_workers=1)
    assert "does not use" not in caplog.text
    item = ds[0]
    assert "Translate\nbonjour" in tok.decode(item["chosen_tokens"], skip_special_tokens=False)
    assert _trained(tok, item, "chosen_") == "hello<|im_end|>"
    assert _trained(tok, item, "rejected_") == "goodbye<|im_end|>"


def test_qwen3_guide_conversations_with_role_content():
    row = {
        "conversations": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    s = row_to_sample(row, "auto", "f", 1)
    assert isinstance(s, ChatSample) and s.messages == [{"role": "system", "content": "S"}, U("q"), A("a")]


def test_sharegpt_tags_like_mindspeed_map_keys():
    tags = {
        "role_tag": "speaker",
        "content_tag": "text",
        "user_tag": "USER",
        "assistant_tag": "BOT",
        "system_tag": "SYS",
        "observation_tag": "RESULT",
        "function_tag": "CALL",
    }
    row = {
        "conversations": [
            {"speaker": "SYS", "text": "S"},
            {"speaker": "USER", "text": "weather?"},
            {"speaker": "CALL", "text": json.dumps({"name": "wx", "arguments": {"city": "Oslo"}})},
            {"speaker": "RESULT", "text": "rain"},
            {"speaker": "BOT", "text": "It rains."},
        ]
    }
    s = row_to_sample(row, "sharegpt", "f", 1, tags)
    assert s.messages == [
        {"role": "system", "content": "S"},
        U("weather?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "wx", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "rain"},
        A("It rains."),
    ]
    with pytest.raises(DatasetError, match="needs `from` and `value`.*set `tags`"):
        row_to_sample(row, "sharegpt", "f", 1)
    with pytest.raises(DatasetError, match="unknown role tag 'SYS'"):
        row_to_sample(row, "sharegpt", "f", 1, {"role_tag": "speaker", "content_tag": "text"})
    with pytest.raises(DatasetError, match="unknown `tags` key"):
        sft_dataset(chatml_test_tokenizer(), [row], tags={"speaker_tag": "x"}, template="chatml")


def test_trl_prompt_completion_plain_and_conversational():
    s = row_to_sample({"prompt": "The sky is", "completion": " blue."}, "auto", "f", 1)
    assert s.messages == [U("The sky is"), A(" blue.")]
    s = row_to_sample({"prompt": [{"role": "system", "content": "S"}, U("q")], "completion": [A("a")]}, "auto", "f", 1)
    assert s.messages == [{"role": "system", "content": "S"}, U("q"), A("a")]


def test_unused_column_is_one_warning_naming_it(tmp_path, caplog):
    tok = chatml_test_tokenizer()
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "id": i, "source": "web"} for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="tinytune.datasets"):
        ds = sft_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path), num_workers=1)
    warns = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warns) == 1 and "'id'" in warns[0] and "'source'" in warns[0]
    assert ds.meta["unused_columns"] == {"id": 5, "source": 5}
    assert ds.meta["columns"] == {"instruction": 5, "output": 5, "id": 5, "source": 5}


def test_undetectable_format_lists_styles_and_a_column_map(tmp_path):
    with pytest.raises(DatasetError) as e:
        sft_dataset(
            chatml_test_tokenizer(), [{"question": "q", "answer": "a"}], template="chatml", cache_dir=str(tmp_path)
        )
    msg = str(e.value)
    for style in ("messages", "sharegpt", "preference", "prompt_completion", "alpaca", "text"):
        assert style in msg
    assert "column_map: {instruction: question, output: answer}" in msg


def test_null_value_is_not_a_missing_column():
    with pytest.raises(DatasetError, match="column 'output' is null"):
        row_to_sample({"instruction": "q", "output": None}, "auto", "f", 3)
    with pytest.raises(DatasetError, match="missing column 'output'"):
        row_to_sample({"instruction": "q"}, "alpaca", "f", 3)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "wx",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONV = [
    U("weather in Oslo?"),
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "wx", "arguments": {"city": "Oslo"}}}],
    },
    {"role": "tool", "content": "rain"},
    A("It rains."),
]


class RecordingTemplate:
    """Wraps a template and records the keyword arguments ``render`` receives."""

    def __init__(self, inner):
        self.inner, self.calls, self.name = inner, [], "recording"

    def render(self, messages, **kwargs):
        self.calls.append(kwargs)
        return self.inner.render(messages, **kwargs)


def test_tools_column_is_passed_to_render():
    from tinytune.datasets.templates import get_template

    tok = chatml_test_tokenizer()
    rec = RecordingTemplate(get_template("mindspeed:qwen3").bind(tok))
    for tools in (TOOLS, json.dumps(TOOLS)):
        s = row_to_sample({"messages": TOOL_CONV, "tools": tools}, "auto", "f", 1)
        assert s.tools == TOOLS
        [[seq]] = SampleEncoder(tok, rec).encode_samples([s])
        assert rec.calls[-1] == {"enable_thinking": None, "tools": TOOLS}
        text = tok.decode(seq.tokens, skip_special_tokens=False)
        assert "# Tools" in text and json.dumps(TOOLS[0]) in text
        trained = _trained(tok, {"tokens": seq.tokens, "labels": seq.labels})
        assert trained == (
            '<tool_call>\n{"name": "wx", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\nIt rains.<|im_end|>\n'
        )  # the call trained, the observation masked
    # A template that cannot take tools is an error, never a silent drop.
    s = row_to_sample(
        {"messages": TOOL_CONV[:2] + [{"role": "tool", "content": "x"}, A("y")], "tools": TOOLS}, "auto", "f", 1
    )
    res = SampleEncoder(tok, get_template("chatml")).encode_samples([s])
    assert isinstance(res[0], str) and "'chatml'" in res[0] and "tool" in res[0]
    with pytest.raises(DatasetError, match="`tools` is not valid JSON"):
        row_to_sample({"messages": TOOL_CONV, "tools": "[{"}, "auto", "f", 1)


def test_csv_with_bom_and_non_utf8_file(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffinstruction,output\nq,a\n".encode())
    tok = chatml_test_tokenizer()
    ds = sft_dataset(tok, str(p), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1)
    assert _trained(tok, ds[0]) == "a<|im_end|>"
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(json.dumps({"instruction": "café", "output": "crème"}, ensure_ascii=False).encode("cp1252"))
    with pytest.raises(DatasetError) as e:
        sft_dataset(tok, str(bad), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1)
    assert str(bad) in str(e.value) and "not UTF-8" in str(e.value) and "CP1252" in str(e.value)
    assert "iconv -f CP1252" in str(e.value)
    gb = tmp_path / "zh.txt"
    gb.write_bytes("你好，世界。这是一个测试。".encode("gb18030"))
    with pytest.raises(DatasetError, match="GB18030"):
        sft_dataset(tok, str(gb), style="text", cache_dir=str(tmp_path / "c"), num_workers=1)


# -- truncation --------------------------------------------------------------------------------------
def test_answer_budget_rule():
    assert answer_budget(100, 10, 64) == 10  # short answer kept whole
    assert answer_budget(10, 100, 64) == 54  # short prompt kept whole
    assert answer_budget(100, 100, 64) == 32  # both long: in proportion


def test_default_truncation_keeps_structure_and_counts(tmp_path, caplog):
    tok = llama3_test_tokenizer()
    long_a = " ".join(["answer"] * 300)
    long_q = " ".join(["question"] * 300)
    rows = [
        {"instruction": "Short question?", "output": long_a},  # answer cut, prompt whole
        {"instruction": long_q, "output": long_a},  # both cut in proportion
        {"instruction": long_q, "output": "Yes."},  # prompt cut from the left
        {"instruction": "Hi", "output": "Hello."},
    ]  # untouched
    kw = dict(template="llama3", cache_dir=str(tmp_path), num_workers=1, max_seq_len=64)
    with caplog.at_level(logging.WARNING, logger="tinytune.datasets"):
        ds = sft_dataset(tok, rows, **kw)
    assert ds.meta["truncated"] == {"truncated_answer": 2, "truncated_prompt": 1}
    assert "truncated" in caplog.text and "truncated_answer" in caplog.text
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    for i in range(3):
        item = ds[i]
        text = tok.decode(item["tokens"], skip_special_tokens=False)
        assert len(item["tokens"]) == 64 and item["tokens"][0] == tok.bos_id
        assert header in text  # the answer keeps its turn header
    first = tok.decode(ds[0]["tokens"], skip_special_tokens=False)
    assert "Short question?<|eot_id|>" in first and not first.endswith("<|eot_id|>")  # cut answer: no end-of-turn
    second = ds[1]
    n_trained = sum(x != IGNORE_INDEX for x in second["labels"])
    assert 20 <= n_trained <= 40  # about half of the 64 tokens each
    assert _trained(tok, ds[2]) == "Yes.<|eot_id|>"
    # prompt_first keeps the whole prompt share rule only when the answer alone does not fit.
    pf = sft_dataset(tok, rows, truncation="prompt_first", **kw)
    assert pf.meta["truncated"] == {"truncated_answer": 2, "truncated_prompt": 1}
    assert _trained(tok, pf[2]) == "Yes.<|eot_id|>"


def test_truncation_counts_on_preference_and_no_trained_drop(tmp_path):
    tok = llama3_test_tokenizer()
    long_q = " ".join(["question"] * 300)
    rows = [{"prompt": long_q, "chosen": "good", "rejected": "bad"}]
    ds = preference_dataset(tok, rows, template="llama3", max_seq_len=32, cache_dir=str(tmp_path), num_workers=1)
    assert ds.meta["truncated"] == {"truncated_prompt": 1}
    assert _trained(tok, ds[0], "chosen_") == "good<|eot_id|>"
    with pytest.raises(DatasetError, match="no_trained_tokens"):
        sft_dataset(
            tok,
            [{"instruction": long_q, "output": "x"}],
            template="llama3",
            truncation="right",
            max_seq_len=32,
            cache_dir=str(tmp_path),
            num_workers=1,
        )


def test_prompt_type_and_template_together_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="both `template`"):
        sft_dataset(
            chatml_test_tokenizer(),
            [{"instruction": "q", "output": "a"}],
            template="chatml",
            prompt_type="qwen",
            cache_dir=str(tmp_path),
        )


def test_missing_tool_support_names_template():
    from tinytune.datasets.templates import get_template

    s = row_to_sample({"messages": TOOL_CONV}, "auto", "f", 1)
    res = SampleEncoder(chatml_test_tokenizer(), get_template("chatml")).encode_samples([s])
    assert isinstance(res[0], str) and "'chatml'" in res[0] and "tool" in res[0]
    with pytest.raises(TemplateError):
        get_template("mindspeed:glm4").render(TOOL_CONV, tools=TOOLS)


def test_long_text_chunks_are_counted(tmp_path):
    from tinytune.datasets import text_dataset

    tok = llama3_test_tokenizer()
    ds = text_dataset(
        tok,
        [{"text": " ".join(["word"] * 200)}, {"text": "short"}],
        max_seq_len=64,
        cache_dir=str(tmp_path),
        num_workers=1,
    )
    assert len(ds) == 5 and ds.meta["truncated"] == {"text_chunked": 1}


def test_tool_call_turn_with_text_is_an_error_for_mindspeed():
    from tinytune.datasets.templates import get_template

    msgs = [
        U("q"),
        {"role": "assistant", "content": "Let me check.", "tool_calls": TOOL_CONV[1]["tool_calls"]},
        {"role": "tool", "content": "rain"},
        A("It rains."),
    ]
    with pytest.raises(TemplateError, match="has text too"):
        get_template("mindspeed:qwen3").render(msgs, tools=TOOLS)
    default = get_template("mindspeed:chatml").render_text(TOOL_CONV, tools=TOOLS, eos_token="<E>")
    assert "You have access to the following tools:\n> Tool Name: wx\n" in default
    assert 'Action: wx\nAction Input: {"city": "Oslo"}<|im_end|>' in default  # replace_eos: EOS is <|im_end|>


def test_parallel_tool_results_are_one_prompt_turn():
    calls = [{"type": "function", "function": {"name": "wx", "arguments": {"city": c}}} for c in ("Oslo", "Rome")]
    msgs = [
        U("compare"),
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "rain"},
        {"role": "tool", "content": "sun"},
        A("Rome is sunnier."),
    ]
    assert row_to_sample({"messages": msgs}, "auto", "f", 1).messages[3] == {"role": "tool", "content": "sun"}
    with pytest.raises(DatasetError, match="out of order"):
        row_to_sample({"messages": [U("a"), {"role": "tool", "content": "x"}, A("b")]}, "auto", "f", 1)
