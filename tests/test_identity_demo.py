"""The identity demo's data and the held-out scoring used by `make demo`."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tinytune.config import ConfigError
from tinytune.datasets import DatasetError
from tinytune.datasets.identity import identity_rows
from tinytune.training.held_out import HeldOutQuestion, fraction_correct, parse_held_out


def test_identity_rows_fill_name_and_maker_and_mix_in_general_chat():
    rows = identity_rows("Ada", "ACME")
    ident, general = rows[:50], rows[50:]
    assert len(ident) == 50 and len(general) == 20
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    answers = [r["messages"][1]["content"] for r in ident]
    assert all("{" not in a for a in answers)
    assert sum("Ada" in a for a in answers) >= 45 and sum("ACME" in a for a in answers) >= 30
    assert not any("Ada" in r["messages"][1]["content"] for r in general)
    assert len(identity_rows("Ada", "ACME", general=False)) == 50
    with pytest.raises(DatasetError, match="identity_dataset: maker must be a non-empty string"):
        identity_rows("Ada", "")


def test_demo_held_out_questions_are_not_training_questions():
    cfg = OmegaConf.load("configs/smollm2/135M_identity_demo.yaml")
    held = parse_held_out(cfg.sample_generation.held_out)
    train_q = {r["messages"][0]["content"].lower() for r in identity_rows("Tilly", "Tinytune Labs")}
    assert len(held) == 8 and not {q.prompt.lower() for q in held} & train_q
    assert cfg.dataset.name == "Tilly" and all(set(q.expect) <= {"Tilly", "Tinytune Labs"} for q in held)


def test_held_out_scoring_and_bad_items():
    qs = parse_held_out(
        [
            {"prompt": "Who are you?", "expect": "Tilly"},
            {"prompt": "Who made you?", "expect": ["Tilly", "Tinytune Labs"]},
        ]
    )
    assert qs[1] == HeldOutQuestion("Who made you?", ("Tilly", "Tinytune Labs"))
    assert fraction_correct(qs, ["I'm TILLY.", "Tilly, by Tinytune labs"]) == 1.0
    assert fraction_correct(qs, ["I'm SmolLM.", "Tilly, by Hugging Face"]) == 0.0
    with pytest.raises(ConfigError, match=r"held_out\[0\].expect: a non-empty string or list"):
        parse_held_out([{"prompt": "x", "expect": []}])
    with pytest.raises(ConfigError, match=r"held_out\[0\]: unknown key\(s\) \['answer'\]"):
        parse_held_out([{"prompt": "x", "answer": "y"}])
    with pytest.raises(ConfigError, match=r"held_out\[0\].prompt: a non-empty string is required"):
        parse_held_out([{"expect": "y"}])
