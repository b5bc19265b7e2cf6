"""Qwen3 ``enable_thinking``: strict true/false/null typing (datasets and recipes) and the inference
side (generation prompts equal the official Jinja's ``enable_thinking=False`` render)."""

from __future__ import annotations

import pytest
import yaml
from _recipe_fixtures import make_tiny_checkpoint
from omegaconf import OmegaConf
from template_corpus import render
from test_datasets_helpers import tinytune_test_tokenizer
from test_templates_fidelity import jinja, reference_tokenizer

from tinytune.cli.main import main as tune_main
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import LoRAFinetuneSettings
from tinytune.datasets import sft_dataset
from tinytune.datasets.encoding import SampleEncoder
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import TemplateError, get_template
from tinytune.training.prompting import encode_chat_prompt

BAD = ["false", "0", "no", "true", 0, 1, "null"]
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
    {"role": "user", "content": "3+3?"},
]


@pytest.mark.parametrize("value", BAD)
def test_non_bool_enable_thinking_is_refused_naming_the_key(value, tmp_path):
    with pytest.raises(TemplateError, match="enable_thinking must be true, false or null"):
        SampleEncoder(tinytune_test_tokenizer("chatml"), get_template("qwen3"), enable_thinking=value)
    with pytest.raises(TemplateError, match="enable_thinking"):
        sft_dataset(
            tinytune_test_tokenizer("chatml"),
            [{"messages": MSGS[1:3]}],
            template="qwen3",
            enable_thinking=value,
            cache_dir=str(tmp_path),
        )
    with pytest.raises(TemplateError, match="enable_thinking"):
        get_template("qwen3").render(MSGS, enable_thinking=value)
    cfg = OmegaConf.create(
        {
            "output_dir": str(tmp_path),
            "sample_generation": {"enable_thinking": value},
            "dataset": {"_component_": "tinytune.datasets.sft_dataset"},
        }
    )
    with pytest.raises(ConfigError, match=r"sample_generation\.enable_thinking: expected bool \| null"):
        LoRAFinetuneSettings.from_config(cfg)


@pytest.mark.parametrize("mode", [None, True, False])
@pytest.mark.parametrize("template", ["qwen3", "hf"])
def test_generation_prompt_equals_official_render(template, mode):
    tok = tinytune_test_tokenizer("chatml")
    t = get_template(template, chat_template=jinja("qwen3") if template == "hf" else None).bind(tok)
    kw = {} if mode is None else {"enable_thinking": mode}
    ref_msgs = (
        MSGS if mode is not False else [dict(m, content="4") if m["role"] == "assistant" else m for m in MSGS]
    )  # thinking off: reasoning removed first
    ref = render(reference_tokenizer("chatml"), jinja("qwen3"), ref_msgs, add_generation_prompt=True, **kw)
    ids = encode_chat_prompt(tok, t, MSGS, mode)
    assert ids == tok.encode(ref, add_bos=False, add_eos=False)
    assert ref.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (mode is False)


def test_generate_recipe_reads_enable_thinking_and_refuses_strings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(tmp_path / "home"))
    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"))
    base = {
        "checkpoint_dir": ckpt,
        "device": "cpu",
        "dtype": "fp32",
        "template": "qwen3",
        "max_new_tokens": 2,
        "seed": 0,
        "prompt": "What is ice?",
    }
    path = tmp_path / "g.yaml"
    path.write_text("# recipe: generate\n" + yaml.safe_dump({**base, "enable_thinking": "false"}))
    try:
        rc = tune_main(["run", "generate", "--config", str(path)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "enable_thinking: expected bool | null, got 'false'" in capsys.readouterr().err
    path.write_text("# recipe: generate\n" + yaml.safe_dump({**base, "enable_thinking": False}))
    try:
        rc = tune_main(["run", "generate", "--config", str(path)])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)


def test_enable_thinking_changes_nothing_for_templates_without_it():
    """Like the built-ins other than qwen3, `hf` with a Jinja that never reads enable_thinking
    renders and masks the same for every value (reasoning-looking text is plain content there)."""
    tok = tinytune_test_tokenizer("llama3")
    msgs = MSGS[:3]
    for t in (get_template("hf", chat_template=jinja("llama3_1")).bind(tok), get_template("llama3_1").bind(tok)):
        seqs = [
            SampleEncoder(tok, t, enable_thinking=m).encode_samples([ChatSample(msgs)])[0][0]
            for m in (None, True, False)
        ]
        assert all((s.tokens, s.labels) == (seqs[0].tokens, seqs[0].labels) for s in seqs)
        assert "<think>" in tok.decode(seqs[0].tokens, skip_special_tokens=False)
