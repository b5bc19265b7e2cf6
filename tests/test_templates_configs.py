"""Shipped configs that use ``template: hf`` (SmolLM2) give the same tokens and labels as the
built-in template of that family on the bundled data (ChatterBot and Chit Chat rows)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

import tinytune.datasets as tt_datasets
from tinytune.datasets.templates import get_template
from tinytune.tokenizers import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = {"smollm2": "smollm2"}  # config family -> built-in template of that family


def hf_configs():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))):
        cfg = OmegaConf.load(path)
        if cfg.get("template") == "hf":
            out.append(path)
    return out


def items(ds):
    return [(list(np.asarray(ds[i]["tokens"])), list(np.asarray(ds[i]["labels"]))) for i in range(len(ds))]


def test_hf_configs_are_known():
    fams = {os.path.basename(os.path.dirname(p)) for p in hf_configs()}
    assert fams and fams <= set(BUILTIN), f"configs with template: hf in {fams}; add their built-in to BUILTIN"


@pytest.mark.parametrize("dataset", ["chatterbot_dataset", "chitchat_dataset"])
def test_hf_configs_equal_builtin_on_bundled_data(smollm2_dir, tmp_path, dataset):
    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template
    seen = set()
    checked = 0
    for path in hf_configs():
        cfg = OmegaConf.load(path)
        node = cfg.get("dataset")
        if (
            node is None
            or "chat" not in str(node.get("_component_", ""))
            and "chatterbot" not in str(node.get("_component_", ""))
        ):
            continue  # preference data (DPO) needs a user file; its rows are covered by the chat check
        kw = {
            k: v
            for k, v in OmegaConf.to_container(node, resolve=False).items()
            if k in ("max_seq_len", "train_on_input", "mask_history", "truncation", "packed")
        }
        key = tuple(sorted(kw.items()))
        if key in seen:
            continue
        seen.add(key)
        kw["packed"] = False
        if dataset == "chitchat_dataset":
            kw["max_conversations"] = 300
        fn = getattr(tt_datasets, dataset)
        hf_ds = fn(tok, template="hf", cache_dir=str(tmp_path), num_workers=1, **kw)
        ours = fn(tok, template=get_template(BUILTIN["smollm2"]), cache_dir=str(tmp_path), num_workers=1, **kw)
        a, b = items(hf_ds), items(ours)
        assert len(a) == len(b) > 50
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert not diff, f"{path}: {len(diff)} of {len(a)} samples differ (first: {diff[0]})"
        checked += len(a)
    assert checked > 0
