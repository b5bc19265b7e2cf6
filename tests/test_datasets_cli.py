"""``tune prepare-data`` builds the token cache once; the next run is a cache hit."""

from __future__ import annotations

import json

from test_datasets_helpers import llama3_tokenizer_json


def test_prepare_data_builds_then_hits_cache(tmp_path, capsys):
    import shutil

    from tinytune.cli.main import main

    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    shutil.copy(llama3_tokenizer_json(), tokdir / "tokenizer.json")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n" for i in range(30)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"tokenizer:\n  path: {tokdir}\n"
        f"dataset:\n  _component_: tinytune.datasets.sft_dataset\n  source: {data}\n  template: llama3\n"
        f"  max_seq_len: 64\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    assert main(["prepare-data", "--config", str(cfg), "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "dataset: 30 items (tokenized" in out and "rows 30, sequences 30" in out
    assert main(["prepare-data", "--config", str(cfg)]) == 0
    assert "dataset: 30 items (cache hit" in capsys.readouterr().out
    # A bad override gives an error naming the problem, not a traceback.
    assert main(["prepare-data", "--config", str(cfg), "+dataset.style=nope"]) == 1
    assert "unknown style 'nope'" in capsys.readouterr().err
