"""`datasets` sources: real Dataset objects, save_to_disk folders and hub-style folders built locally."""

from __future__ import annotations

import os

import pytest
from test_datasets_helpers import chatml_test_tokenizer

datasets = pytest.importorskip("datasets")

from tinytune.datasets import DatasetError, sft_dataset  # noqa: E402
from tinytune.datasets.hf_source import StreamingSFTDataset, hf_dataset, is_hf_source  # noqa: E402

ROWS = [
    {
        "instruction": f"Question {i}: what is {i} plus {i}?",
        "input": "" if i % 3 else f"context {i}",
        "output": f"{i} plus {i} is {2 * i}.",
    }
    for i in range(12)
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def tok():
    return chatml_test_tokenizer()


def items(ds):
    return [ds[i] for i in range(len(ds))]


def reference(tok, rows, tmp_path, **kw):
    """The same rows through the plain list reader (no `datasets` involved)."""
    return items(sft_dataset(tok, rows, template="chatml", cache_dir=str(tmp_path / "ref_cache"), num_workers=1, **kw))


def hub_style_folder(path, splits: dict[str, list[dict]]):
    os.makedirs(path / "data")
    (path / "README.md").write_text("# a dataset laid out like a hub repo\n")
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return str(path)


def test_dataset_object_save_to_disk_and_hub_folder_match_the_list_reader(tok, tmp_path):
    ref = reference(tok, ROWS, tmp_path)
    assert len(ref) == 12 and any(x != -100 for x in ref[0]["labels"])
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"), num_workers=1)
    obj = datasets.Dataset.from_list(ROWS)
    assert items(sft_dataset(tok, obj, **kw)) == ref
    obj.save_to_disk(str(tmp_path / "disk"))
    assert is_hf_source(str(tmp_path / "disk"))
    assert items(sft_dataset(tok, str(tmp_path / "disk"), **kw)) == ref
    datasets.DatasetDict({"train": obj}).save_to_disk(str(tmp_path / "disk_dict"))
    assert items(hf_dataset(tok, str(tmp_path / "disk_dict"), **kw)) == ref
    folder = hub_style_folder(tmp_path / "hubstyle", {"train": ROWS, "test": ROWS[:3]})
    assert items(sft_dataset(tok, folder, **kw)) == ref
    assert items(hf_dataset(tok, folder, split="test", **kw)) == ref[:3]
    # split expressions hold out a slice; max_samples keeps the first N rows
    assert items(hf_dataset(tok, folder, split="train[:75%]", **kw)) == ref[:9]
    assert items(hf_dataset(tok, folder, split="train[75%:]", **kw)) == ref[9:]
    assert items(hf_dataset(tok, obj, max_samples=5, **kw)) == ref[:5]


def test_second_build_hits_the_token_cache_and_packing_applies(tok, tmp_path):
    obj = datasets.Dataset.from_list(ROWS)
    obj.save_to_disk(str(tmp_path / "disk"))
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = hf_dataset(tok, str(tmp_path / "disk"), **kw)
    again = hf_dataset(tok, str(tmp_path / "disk"), **kw)
    assert not first.cache_hit and again.cache_hit
    packed = hf_dataset(tok, str(tmp_path / "disk"), packed=True, max_seq_len=128, **kw)
    ref = sft_dataset(
        tok, ROWS, template="chatml", packed=True, max_seq_len=128, cache_dir=str(tmp_path / "c2"), num_workers=1
    )
    assert items(packed) == items(ref)


def test_column_map_and_styles_apply(tok, tmp_path):
    renamed = [{"prompt": r["instruction"], "answer": r["output"]} for r in ROWS]
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"), num_workers=1)
    got = hf_dataset(
        tok, datasets.Dataset.from_list(renamed), column_map={"instruction": "prompt", "output": "answer"}, **kw
    )
    ref = reference(tok, [{"instruction": r["instruction"], "output": r["output"]} for r in ROWS], tmp_path)
    assert items(got) == ref


def test_streaming_matches_and_resumes(tok, tmp_path):
    folder = hub_style_folder(tmp_path / "hubstyle", {"train": ROWS})
    ref = reference(tok, ROWS, tmp_path)
    stream = hf_dataset(tok, folder, streaming=True, template="chatml")
    assert isinstance(stream, StreamingSFTDataset)
    assert list(stream) == ref and stream.epoch == 1
    # stop after 5 items, save the position, continue in a fresh object
    s1 = hf_dataset(tok, folder, streaming=True, template="chatml")
    it = iter(s1)
    head = [next(it) for _ in range(5)]
    state = s1.state_dict()
    s2 = hf_dataset(tok, folder, streaming=True, template="chatml")
    s2.load_state_dict(state)
    assert head + list(s2) == ref
    assert list(hf_dataset(tok, folder, streaming=True, template="chatml", max_samples=4)) == ref[:4]


def test_bad_inputs_are_one_line_errors_naming_key_and_value(tok, tmp_path):
    folder = hub_style_folder(tmp_path / "hubstyle", {"train": ROWS})
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"), num_workers=1)
    with pytest.raises(DatasetError, match=r"split: 'validation' is not a split of .*available: \['train'\]"):
        hf_dataset(tok, folder, split="validation", **kw)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"split: 'test' is not a split of .*available: \['train'\]"):
        hf_dataset(tok, str(tmp_path / "dd"), split="test", **kw)
    with pytest.raises(
        DatasetError,
        match=r"column_map.output: column 'answer' is not in .*columns: \['input', "
        r"'instruction', 'output'\]",
    ):
        hf_dataset(tok, folder, column_map={"output": "answer"}, **kw)
    # a hub id that is not cached, offline (conftest sets HF_HUB_OFFLINE=1)
    with pytest.raises(
        DatasetError,
        match=r"source: dataset 'acme/no-such-dataset' is not in the local datasets "
        r"cache and the hub cannot be reached",
    ) as e:
        sft_dataset(tok, "acme/no-such-dataset", **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match=r"max_samples: expected a positive integer, got 0"):
        hf_dataset(tok, folder, max_samples=0, **kw)
    with pytest.raises(DatasetError, match=r"split='validation' / val_fraction=0.1 hold-outs do not apply"):
        sft_dataset(tok, folder, split="validation", val_fraction=0.1, **kw)
    with pytest.raises(DatasetError, match="packed: true does not apply to streaming: true"):
        hf_dataset(tok, folder, streaming=True, packed=True, max_seq_len=64, **kw)


def test_local_files_are_not_taken_for_hub_ids(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n')
    assert not is_hf_source(str(p)) and not is_hf_source("data/train.jsonl") and not is_hf_source(ROWS)
    assert is_hf_source("tatsu-lab/alpaca") and is_hf_source("hf://tatsu-lab/alpaca")
