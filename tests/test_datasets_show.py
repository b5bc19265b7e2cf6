"""``show_dataset`` / ``tune prepare-data --show``: trained tokens marked exactly as the encoded labels say."""

from __future__ import annotations

import io
import json
import re
import shutil

from test_datasets_helpers import chatml_test_tokenizer, llama3_test_tokenizer, llama3_tokenizer_json

from tinytune.datasets import IGNORE_INDEX, dataset_stats, preference_dataset, sft_dataset, show_dataset
from tinytune.datasets.show import GREEN, format_sample

ROWS = [
    {"instruction": "Answer yes or no: is 7 prime?", "output": "yes", "id": 1},
    {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "uno"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "dos"},
        ]
    },
    {"instruction": " ".join(["long"] * 100), "output": "short"},
]


def _trained_runs(tokens, labels):
    """Decoded runs of trained tokens straight from the labels (the reference)."""
    runs, cur = [], []
    for i in range(1, len(tokens)):
        if labels[i - 1] != IGNORE_INDEX:
            cur.append(tokens[i])
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_show_marks_exactly_the_trained_tokens(tmp_path):
    tok = chatml_test_tokenizer()
    ds = sft_dataset(tok, ROWS, template="chatml", max_seq_len=48, cache_dir=str(tmp_path), num_workers=1)
    buf = io.StringIO()
    stats = show_dataset(ds, tok, 3, file=buf)
    out = buf.getvalue()
    assert GREEN not in out  # not a terminal: brackets
    shown = re.findall(r"\[\[(.*?)\]\]", out, flags=re.S)
    want = [
        tok.decode(r, skip_special_tokens=False)
        for k in range(3)
        for r in _trained_runs(ds[k]["tokens"], ds[k]["labels"])
    ]
    assert shown == want == ["yes<|im_end|>", "uno<|im_end|>", "dos<|im_end|>", "short<|im_end|>"]
    # everything outside the brackets is the prompt, and the whole text is the decoded sample
    first = out.split("--- dataset sample 0")[1].split("\n", 1)[1].split("\n--- ")[0]
    assert first.replace("[[", "").replace("]]", "") == tok.decode(ds[0]["tokens"], skip_special_tokens=False)
    assert stats["rows"] == 3 and stats["sequences"] == 3 and stats["truncated"] == {"truncated_prompt": 1}
    assert stats["unused_columns"] == {"id": 1} and "columns not used: id" in out
    assert sum(c for _, _, c in stats["length_histogram"]) == 3 and "length histogram" in out
    total_trained = sum(sum(x != IGNORE_INDEX for x in ds[k]["labels"]) for k in range(3))
    assert stats["trained_tokens"] == total_trained
    assert abs(stats["trained_fraction"] - total_trained / stats["tokens"]) < 1e-3


def test_colour_and_token_boundaries():
    tok = llama3_test_tokenizer()
    tokens = tok.encode("Hello world", add_bos=False, add_eos=False) + [tok.eos_id]
    labels = tokens[1:] + [IGNORE_INDEX]  # pre-shifted: trains " world" and EOS
    coloured = format_sample(tok, tokens, labels, color=True)
    assert coloured == "Hello" + GREEN + " world<|eot_id|>" + "\x1b[0m"
    assert format_sample(tok, tokens, labels, show_tokens=True) == "Hello|[[ world|<|eot_id|>]]"


def test_preference_pairs_are_shown_both_sides(tmp_path):
    tok = chatml_test_tokenizer()
    ds = preference_dataset(
        tok,
        [{"prompt": "q", "chosen": "good", "rejected": "bad"}],
        template="chatml",
        cache_dir=str(tmp_path),
        num_workers=1,
    )
    buf = io.StringIO()
    show_dataset(ds, tok, 1, file=buf)
    out = buf.getvalue()
    assert "sample 0 chosen" in out and "sample 0 rejected" in out
    assert re.findall(r"\[\[(.*?)\]\]", out) == ["good<|im_end|>", "bad<|im_end|>"]
    assert dataset_stats(ds)["sequences"] == 2


def test_prepare_data_show_cli(tmp_path, capsys):
    from tinytune.cli.main import main

    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    shutil.copy(llama3_tokenizer_json(), tokdir / "tokenizer.json")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"tokenizer:\n  path: {tokdir}\ndataset:\n  _component_: tinytune.datasets.sft_dataset\n"
        f"  source: {data}\n  template: llama3\n  max_seq_len: 48\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    assert main(["prepare-data", "--config", str(cfg), "--show", "2", "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[yes<|eot_id|>]]" in out and "[[uno<|eot_id|>]]" in out and "sample 2" not in out
    assert "truncated truncated_prompt 1" in out and "length histogram" in out and "columns not used: id" in out
    assert main(["prepare-data", "--config", str(cfg), "--show", "1", "--tokens", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert GREEN + "yes|<|eot_id|>" in out


def test_show_uses_the_split(tmp_path):
    tok = chatml_test_tokenizer()
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    kw = dict(template="chatml", cache_dir=str(tmp_path), num_workers=1, val_fraction=0.2, seed=1)
    val = sft_dataset(tok, rows, split="validation", **kw)
    buf = io.StringIO()
    show_dataset(val, tok, 10, file=buf)
    out = buf.getvalue()
    shown = re.findall(r"\[\[(a\d+)<\|im_end\|>\]\]", out)
    assert shown == [
        _trained_text
        for _trained_text in (
            tok.decode(r, skip_special_tokens=False).removesuffix("<|im_end|>")
            for k in range(len(val))
            for r in _trained_runs(val[k]["tokens"], val[k]["labels"])
        )
    ]
    assert len(shown) == 4 and "this split: 4 of 20 items" in out
