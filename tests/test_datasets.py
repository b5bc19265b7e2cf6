"""Datasets: file formats, styles, bad rows, masking policies, truncation, splits, token cache."""

from __future__ import annotations

import csv
import json
import logging
import os

import pytest

from test_datasets_helpers import chatml_test_tokenizer, llama3_test_tokenizer
from tinytune.datasets import (
    IGNORE_INDEX,
    DatasetError,
    iter_rows,
    preference_dataset,
    sft_dataset,
    text_dataset,
)
from tinytune.datasets.styles import ChatSample, PreferenceSample, TextSample, row_to_sample

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi, politely.", "input": "", "output": "Hello, nice to meet you!"},
]


def write_all_formats(d) -> dict[str, str]:
    """Writes ROWS in every supported format; returns {format: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["json_list"] = os.path.join(d, "rows.json")
    json.dump(ROWS, open(paths["json_list"], "w"))
    paths["json_data"] = os.path.join(d, "wrapped.json")
    json.dump({"data": ROWS}, open(paths["json_data"], "w"))
    paths["jsonl"] = os.path.join(d, "rows.jsonl")
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    paths["csv"] = os.path.join(d, "rows.csv")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    table = pa.Table.from_pylist(ROWS)
    paths["parquet"] = os.path.join(d, "rows.parquet")
    pq.write_table(table, paths["parquet"])
    paths["arrow_file"] = os.path.join(d, "file.arrow")
    with pa.OSFile(paths["arrow_file"], "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    paths["arrow_stream"] = os.path.join(d, "stream.arrow")
    with pa.OSFile(paths["arrow_stream"], "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return paths


def test_every_format_reads_the_same_rows(tmp_path):
    paths = write_all_formats(tmp_path)
    for fmt, p in paths.items():
        rows = [r for _, _, r in iter_rows(p)]
        assert rows == ROWS, fmt
        assert [n for _, n, _ in iter_rows(p)] == [1, 2, 3]
    assert [r for _, _, r in iter_rows(ROWS)] == ROWS
    # A directory and a glob read every file (sorted by name).
    assert len(list(iter_rows(str(tmp_path)))) == 3 * len(paths)
    assert [r for _, _, r in iter_rows(str(tmp_path / "*.jsonl"))] == ROWS
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert [(n, r) for _, n, r in iter_rows(str(tmp_path / "lines.txt"))] == [
        (1, {"text": "first line"}),
        (3, {"text": "second line"}),
    ]


def test_same_tokens_from_every_format(tmp_path):
    tok = llama3_test_tokenizer()
    os.makedirs(tmp_path / "data")
    paths = write_all_formats(tmp_path / "data")
    ref = None
    for p in list(paths.values()) + [ROWS]:
        ds = sft_dataset(tok, p, template="llama3", cache_dir=str(tmp_path / "cache"), num_workers=1)
        items = [ds[i] for i in range(len(ds))]
        ref = ref or items
        assert items == ref


def test_column_map_and_styles():
    from tinytune.datasets.readers import apply_column_map

    row = apply_column_map({"prompt": "Hi?", "answer": "Hello."}, {"instruction": "prompt", "output": "answer"}, "f", 1)
    assert row == {"instruction": "Hi?", "output": "Hello."}
    sample = row_to_sample(
        {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be exact.", "history": [["Hi", "Hello"]]},
        "auto",
        "f",
        1,
    )
    assert isinstance(sample, ChatSample)
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[3]["content"] == "Sum\n1 2"
    sg = row_to_sample(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "f"}'},
                {"from": "observation", "value": "42"},
                {"from": "gpt", "value": "a"},
            ]
        },
        "auto",
        "f",
        1,
    )
    assert [m["role"] for m in sg.messages] == ["system", "user", "assistant", "tool", "assistant"]
    msg = row_to_sample(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "auto", "f", 1
    )
    assert msg.messages[-1] == {"role": "assistant", "content": "a"}
    assert isinstance(row_to_sample({"text": "plain"}, "auto", "f", 1), TextSample)
    pref = row_to_sample({"prompt": "q", "chosen": "good", "rejected": "bad"}, "auto", "f", 1)
    assert isinstance(pref, PreferenceSample) and pref.chosen[-1]["content"] == "good"
    pref2 = row_to_sample(
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        },
        "preference",
        "f",
        1,
    )
    assert pref2.chosen[:-1] == pref2.rejected[:-1]


@pytest.mark.parametrize(
    "row,match",
    [
        ({"instruction": "q"}, r"missing column 'output'"),
        ({"instruction": "q", "output": "  "}, r"empty assistant answer"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, r"out of order"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            r"out of order",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, r"does not end with an assistant"),
        ({"conversations": [{"from": "alien", "value": "q"}]}, r"unknown role tag"),
        ({"foo": 1}, r"cannot tell the sample style"),
    ],
)
def test_bad_rows_raise_clear_errors(tmp_path, row, match):
    p = tmp_path / "bad.jsonl"
    good = {"instruction": "ok", "output": "fine"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=match) as e:
        sft_dataset(chatml_test_tokenizer(), str(p), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1)
    assert str(p) in str(e.value) and "row 2" in str(e.value)
    assert e.value.hint


def test_malformed_json_line_and_skip_bad_samples(tmp_path, caplog):
    p = tmp_path / "data.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(4)]
    lines.insert(2, '{"instruction": "broken", ')
    lines.append(json.dumps({"instruction": "q", "output": ""}))
    p.write_text("\n".join(lines) + "\n")
    tok = chatml_test_tokenizer()
    with pytest.raises(DatasetError, match=r"data.jsonl: row 3: malformed JSON line") as e:
        sft_dataset(tok, str(p), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1)
    assert "skip_bad_samples" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="tinytune.datasets"):
        ds = sft_dataset(
            tok, str(p), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1, skip_bad_samples=True
        )
    assert len(ds) == 4 and ds.meta["skipped_bad"] == 2
    assert "skipped 2 bad sample(s)" in caplog.text and "row 3" in caplog.text and "row 6" in caplog.text


def _trained(tok, item):
    t, lab = item["tokens"], item["labels"]
    assert len(t) == len(lab) and lab[-1] == IGNORE_INDEX
    return tok.decode([t[i + 1] for i in range(len(t) - 1) if lab[i] != IGNORE_INDEX], skip_special_tokens=False)


CONV = {
    "messages": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "dos"},
    ]
}


def test_masking_policies_end_to_end(tmp_path):
    tok = chatml_test_tokenizer()
    kw = dict(template="chatml", cache_dir=str(tmp_path), num_workers=1)
    assert _trained(tok, sft_dataset(tok, [CONV], **kw)[0]) == "uno<|im_end|>dos<|im_end|>"
    assert _trained(tok, sft_dataset(tok, [CONV], mask_history=True, **kw)[0]) == "dos<|im_end|>"
    item = sft_dataset(tok, [CONV], train_on_input=True, **kw)[0]
    assert item["labels"][:-1] == item["tokens"][1:]
    item = text_dataset(llama3_test_tokenizer(), [{"text": "All of this is trained."}], cache_dir=str(tmp_path))[0]
    assert item["tokens"][0] == 128000 and item["tokens"][-1] == llama3_test_tokenizer().eos_id
    assert item["labels"][:-1] == item["tokens"][1:]


def test_truncation_policies(tmp_path, caplog):
    tok = llama3_test_tokenizer()
    long_q = " ".join(["word"] * 200)
    rows = [{"instruction": long_q, "output": "The short answer."}, {"instruction": "Hi", "output": "Hello."}]
    kw = dict(template="llama3", cache_dir=str(tmp_path), num_workers=1, max_seq_len=48)
    ds = sft_dataset(tok, rows, **kw)
    item = ds[0]
    assert len(item["tokens"]) == 48 and item["tokens"][0] == tok.bos_id
    assert _trained(tok, item) == "The short answer.<|eot_id|>"  # the answer survives whole
    with caplog.at_level(logging.WARNING, logger="tinytune.datasets"):
        dropped = sft_dataset(tok, rows, truncation="drop", **kw)
    assert len(dropped) == 1 and dropped.meta["dropped_too_long"] == 1 and "dropped 1 sample" in caplog.text
    right = sft_dataset(tok, rows, truncation="right", **kw)
    assert len(right) == 1 and right.meta["dropped"] == {"no_trained_tokens": 1}  # nothing left to train
    assert ds.meta["truncated"] == {"truncated_prompt": 1}
    long_text = text_dataset(tok, [{"text": long_q}], cache_dir=str(tmp_path), max_seq_len=64)
    assert len(long_text) == 4 and sum(len(long_text[i]["tokens"]) for i in range(4)) == 202


def test_train_validation_split(tmp_path):
    tok = chatml_test_tokenizer()
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    kw = dict(template="chatml", cache_dir=str(tmp_path), num_workers=1, val_fraction=0.25, seed=3)
    train, val = sft_dataset(tok, rows, split="train", **kw), sft_dataset(tok, rows, split="validation", **kw)
    assert len(train) == 30 and len(val) == 10
    as_set = lambda ds: {tuple(ds[i]["tokens"]) for i in range(len(ds))}  # noqa: E731
    assert not as_set(train) & as_set(val) and len(as_set(train) | as_set(val)) == 40
    assert list(sft_dataset(tok, rows, split="validation", **kw).indices) == list(val.indices)
    with pytest.raises(DatasetError, match="val_fraction"):
        sft_dataset(tok, rows, split="validation", template="chatml", cache_dir=str(tmp_path))


class CountingTokenizer:
    """Forwards to a tokenizer and counts encode_batch calls (tests the cache)."""

    def __init__(self, inner):
        self.inner = inner
        self.batches = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_batch(self, texts, **kw):
        self.batches += 1
        return self.inner.encode_batch(texts, **kw)


def test_cache_hit_second_build_does_not_tokenize(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(50)))
    tok = CountingTokenizer(chatml_test_tokenizer())
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = sft_dataset(tok, str(p), **kw)
    assert not first.cache_hit and tok.batches > 0
    tok.batches = 0
    second = sft_dataset(tok, str(p), **kw)
    assert second.cache_hit and tok.batches == 0
    assert [second[i] for i in range(50)] == [first[i] for i in range(50)]
    # Any change of data, template or options is a new entry.
    assert not sft_dataset(tok, str(p), mask_history=True, **kw).cache_hit
    assert not sft_dataset(tok, str(p), **{**kw, "template": "qwen2_5"}).cache_hit
    p.write_text(p.read_text() + json.dumps({"instruction": "new", "output": "row"}) + "\n")
    assert len(sft_dataset(tok, str(p), **kw)) == 51
    entries = [e for e in os.listdir(tmp_path / "cache") if not e.startswith(".")]
    assert len(entries) == 4 and not any(".tmp" in e for e in entries)


def test_worker_processes_give_identical_cache(tmp_path):
    rows = [{"instruction": f"question {i} " * (i % 7 + 1), "output": f"answer {i}"} for i in range(700)]
    tok = chatml_test_tokenizer()
    one = sft_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path / "a"), num_workers=1)
    two = sft_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path / "b"), num_workers=2)
    assert one.meta["num_workers"] == 1 and two.meta["num_workers"] == 2
    assert len(one) == len(two) == 700
    assert all(one[i] == two[i] for i in range(0, 700, 7))
    assert (one.lengths == two.lengths).all()


def test_preference_dataset_and_collate(tmp_path):
    tok = chatml_test_tokenizer()
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Probably Berlin, I think."},
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
    ]
    ds = preference_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path), num_workers=1)
    assert len(ds) == 2
    item = ds[0]
    assert _trained(tok, {"tokens": item["chosen_tokens"], "labels": item["chosen_labels"]}) == "Paris.<|im_end|>"
    assert (
        _trained(tok, {"tokens": item["rejected_tokens"], "labels": item["rejected_labels"]})
        == "Probably Berlin, I think.<|im_end|>"
    )
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["tokens"].shape[0] == 4 and batch["tokens"].shape[1] % 8 == 0
    assert batch["tokens"][0, : len(item["chosen_tokens"])].tolist() == item["chosen_tokens"]
    assert batch["tokens"][2, : len(item["rejected_tokens"])].tolist() == item["rejected_tokens"]
    assert (batch["labels"][0, len(item["chosen_tokens"]) :] == IGNORE_INDEX).all()


def test_real_corpora(tmp_path):
    pytest.importorskip("yaml")
    from tinytune.datasets import chatterbot_dataset, chitchat_dataset

    tok = chatml_test_tokenizer()
    cb = chatterbot_dataset(tok, categories=["greetings"], template="chatml", cache_dir=str(tmp_path), num_workers=1)
    assert len(cb) > 10
    text = tok.decode(cb[0]["tokens"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>")
    cc = chitchat_dataset(
        tok,
        max_conversations=20,
        max_turns=6,
        template="chatml",
        max_seq_len=256,
        cache_dir=str(tmp_path),
        num_workers=1,
    )
    assert len(cc) >= 20 and max(cc.lengths) <= 256
    assert all(any(x != IGNORE_INDEX for x in cc[i]["labels"]) for i in range(len(cc)))


def test_template_options_through_builder(tmp_path):
    from test_datasets_helpers import chatml_test_tokenizer as make

    kw = dict(cache_dir=str(tmp_path), num_workers=1)
    conv = {
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "get_weather"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ]
    }
    tok = make()
    # ShareGPT function_call / observation turns become OpenAI tool_calls / tool messages, rendered by a
    # template that takes tools (MindSpeed qwen3: Qwen's <tool_call> JSON, observations masked).
    ds = sft_dataset(tok, [conv], prompt_type="qwen3", **kw)
    text = tok.decode(ds[0]["tokens"], skip_special_tokens=False)
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert _trained(tok, ds[0]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>\nIt is sunny.<|im_end|>\n'
    )
    # MindSpeed prompt_type and a system prompt for conversations without one.
    ds = sft_dataset(tok, [CONV], prompt_type="qwen", system_prompt="Be brief.", **kw)
    assert tok.decode(ds[0]["tokens"], skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # The tokenizer's own chat template (template: hf, the default when the tokenizer has one).
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates", "smollm2.jinja")) as f:
        tok_t = make(chat_template=f.read())
    ds = sft_dataset(tok_t, [CONV], **kw)
    assert "named SmolLM" in tok.decode(ds[0]["tokens"], skip_special_tokens=False)
    assert _trained(tok, ds[0]) == "uno<|im_end|>dos<|im_end|>"
    # A template without tool support gives a clear error naming the row.
    with pytest.raises(DatasetError, match="tool"):
        sft_dataset(tok, [conv], template="mistral", **kw)


def test_packed_builder_and_pickling(tmp_path):
    import pickle

    from tinytune.datasets import PackedDataset, padded_collate

    tok = chatml_test_tokenizer()
    rows = [{"instruction": f"Question number {i}?", "output": "Answer " * (i % 5 + 1)} for i in range(40)]
    kw = dict(template="chatml", cache_dir=str(tmp_path), num_workers=1, max_seq_len=96)
    plain = sft_dataset(tok, rows, **kw)
    packed = sft_dataset(tok, rows, packed=True, **kw)
    assert isinstance(packed, PackedDataset) and packed.cache_hit  # same token cache as the unpacked build
    assert len(packed) < len(plain) and sum(len(b) for b in packed.bins) == 40
    batch = padded_collate([packed[i] for i in range(len(packed))], pad_id=tok.eos_id)
    assert batch["tokens"].shape == (len(packed), 96) and (batch["seq_lens"].sum(1) == 96).all()
    # DataLoader workers get a pickled copy that re-opens the memmaps.
    clone = pickle.loads(pickle.dumps(plain))
    assert [clone[i] for i in range(40)] == [plain[i] for i in range(40)]
    assert pickle.loads(pickle.dumps(packed))[0] == packed[0]


def test_csv_field_count_error_and_txt_pretraining(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text('instruction,output\n"Hi",Hello\nBroken,row,extra\n')
    with pytest.raises(DatasetError, match=r"rows.csv: row 2: row has 3 fields but the header has 2"):
        sft_dataset(chatml_test_tokenizer(), str(p), template="chatml", cache_dir=str(tmp_path / "c"), num_workers=1)
    ds = sft_dataset(
        chatml_test_tokenizer(),
        str(p),
        template="chatml",
        cache_dir=str(tmp_path / "c"),
        num_workers=1,
        skip_bad_samples=True,
    )
    assert len(ds) == 1 and ds.meta["skipped_bad"] == 1
    txt = tmp_path / "corpus.txt"
    txt.write_text("The first document.\nThe second one.\n")
    tok = llama3_test_tokenizer()
    ds = text_dataset(tok, str(txt), cache_dir=str(tmp_path / "c"), num_workers=1)
    assert [tok.decode(ds[i]["tokens"]) for i in range(2)] == ["The first document.", "The second one."]
    assert all(ds[i]["labels"][:-1] == ds[i]["tokens"][1:] for i in range(2))


def _build_in_child(args):
    cache_dir, rows = args
    ds = sft_dataset(chatml_test_tokenizer(), rows, template="chatml", cache_dir=cache_dir, num_workers=1)
    return ds.cache_hit, len(ds)


def test_concurrent_builders_share_one_cache_entry(tmp_path):
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs fork")
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(300)]
    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map(_build_in_child, [(str(tmp_path), rows)] * 2)
    assert sorted(hit for hit, _ in results) == [False, True]  # the lock made the second one wait and reuse
    assert all(n == 300 for _, n in results)
    entries = [e for e in os.listdir(tmp_path) if not e.startswith(".")]
    assert len(entries) == 1 and set(os.listdir(tmp_path / entries[0])) == {
        "tokens.bin",
        "labels.bin",
        "offsets.bin",
        "meta.json",
    }
