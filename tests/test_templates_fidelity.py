"""Every shipped official chat template, on an adversarial corpus: tokens AND labels of the ``hf``
template and of the built-in template of that family equal the HF-only reference rule
(``template_corpus.reference_encoding``). Prints, per template, conversations checked /
token-exact / mask-exact."""

from __future__ import annotations

import functools
import os

import pytest
from template_corpus import corpus, reference_encoding
from test_datasets_helpers import _extended_tokenizer_json, tinytune_test_tokenizer

from tinytune.datasets.encoding import SampleEncoder
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import TemplateError, get_template

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
N = 200  # conversations per template (the minimum)

# reference Jinja -> (tokenizer family, end-of-turn token, conversations may have a system prompt,
#                     built-in templates claimed to match it)
OFFICIAL = {
    "qwen2_5": ("chatml", "<|im_end|>", True, ["qwen2_5"]),
    "qwen3": ("chatml", "<|im_end|>", True, ["qwen3"]),
    "smollm2": ("chatml", "<|im_end|>", True, ["smollm2"]),
    "llama3": ("llama3", "<|eot_id|>", True, ["llama3"]),
    "llama3_1": ("llama3", "<|eot_id|>", True, ["llama3_1"]),
    "gemma": ("gemma", "<end_of_turn>", False, ["gemma"]),
    "gemma3": ("gemma", "<end_of_turn>", True, ["gemma"]),
    "llama2": ("sp", "</s>", True, ["llama2"]),
    "mistral": ("sp", "</s>", False, ["mistral"]),
}


def jinja(name: str) -> str:
    with open(os.path.join(FIX, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def reference_tokenizer(family: str):
    """transformers' tokenizer over the same vocabulary (independent of tinytune's tokenizer code)."""
    from transformers import PreTrainedTokenizerFast

    tok = tinytune_test_tokenizer(family)
    inv = {i: s for s, i in tok.special_tokens.items()}
    kw = {"bos_token": inv[tok.bos_id]} if tok.bos_id is not None else {}
    return PreTrainedTokenizerFast(tokenizer_file=_extended_tokenizer_json(), eos_token=inv[tok.eos_id], **kw)


class WithTools:
    """A bound template that renders every conversation with one tool list (the dataset side passes a
    row's ``tools`` column the same way: ``render(messages, tools=...)``)."""

    def __init__(self, template, tools):
        self.template, self.tools, self.name = template, tools, template.name
        self.stop_strings = template.stop_strings

    def render(self, messages, **kw):
        return self.template.render(messages, **{"tools": self.tools, **kw})


def encode(tok, template, messages, *, tools=None, enable_thinking=None):
    if tools is not None:
        template = WithTools(template, tools)
    (seq,) = SampleEncoder(tok, template, enable_thinking=enable_thinking).encode_samples([ChatSample(messages)])[0]
    return seq.tokens, seq.labels


def check(tok, hf_tok, source, end, template, convs, **kw):
    """Returns (checked, token-exact, mask-exact) counts and the first mismatching conversation."""
    checked = tokens_ok = labels_ok = 0
    first_bad = None
    for msgs in convs:
        ref = reference_encoding(hf_tok, source, msgs, end, **kw)
        assert ref is not None, f"reference rule undefined (not prefix-consistent) for {msgs}"
        tokens, labels = encode(tok, template, msgs, **kw)
        checked += 1
        tokens_ok += tokens == ref[0]
        labels_ok += tokens == ref[0] and labels == ref[1]
        if first_bad is None and (tokens, labels) != ref:
            first_bad = msgs
    return checked, tokens_ok, labels_ok, first_bad


def test_every_official_template_is_token_and_mask_exact(capsys):
    rows = []
    bad = []
    for ref_name, (family, end, has_system, builtins) in OFFICIAL.items():
        tok = tinytune_test_tokenizer(family)
        hf_tok = reference_tokenizer(family)
        source = jinja(ref_name)
        convs = corpus(N, seed=len(rows), system=has_system, think=True, reasoning=ref_name == "qwen3")
        # Qwen3's enable_thinking=True is the official template's own default for the trained span
        kw = {"enable_thinking": True} if ref_name == "qwen3" else {}
        candidates = [("hf", get_template("hf", chat_template=source, end_of_turn=[end]).bind(tok))]
        candidates += [(b, get_template(b).bind(tok)) for b in builtins]
        if ref_name == "smollm2":  # chatml = SmolLM2's format without its default system prompt
            candidates.append(("chatml", get_template("chatml").bind(tok)))
        for name, template in candidates:
            if name == "chatml":
                convs = corpus(N, seed=99, system="always", think=True)
            n, t_ok, m_ok, first_bad = check(tok, hf_tok, source, end, template, convs, **kw)
            rows.append((name, ref_name, n, t_ok, m_ok))
            if first_bad is not None:
                bad.append((name, ref_name, first_bad))
    with capsys.disabled():
        print("\ntemplate   reference   checked  token-exact  mask-exact")
        for name, ref_name, n, t_ok, m_ok in rows:
            print(f"{name:<10} {ref_name:<10} {n:>8} {t_ok:>12} {m_ok:>11}")
    assert not bad, f"{len(bad)} template(s) differ; first: {bad[0]}"
    assert all(n >= N for _, _, n, _, _ in rows)


def strip_think(m: dict) -> dict:
    """Reasoning removal as the Qwen3 SFT guide describes enable_thinking=false (test-side)."""
    if m["role"] != "assistant":
        return m
    m = {k: v for k, v in m.items() if k != "reasoning_content"}
    m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
    return m


def has_think(m: dict) -> bool:
    r = m.get("reasoning_content")
    return (isinstance(r, str) and bool(r.strip())) or "</think>" in m["content"]


@pytest.mark.parametrize("mode", [None, False, True])
def test_qwen3_enable_thinking_modes_against_reference(mode):
    """Qwen3 SFT guide semantics expressed with HF renders only: where the answer should not train
    an empty think block, the prefix is the official enable_thinking=False generation prompt."""
    tok = tinytune_test_tokenizer("chatml")
    hf_tok = reference_tokenizer("chatml")
    source = jinja("qwen3")
    convs = corpus(N, seed=7, think=True, reasoning=True)

    def prompt_kws(msgs):
        def kws(k):
            if mode is True or (mode is None and has_think(msgs[k])):
                return [{"enable_thinking": True}]
            return [{"enable_thinking": False}, {"enable_thinking": True}]

        return kws

    hf_t = get_template("hf", chat_template=source, end_of_turn=["<|im_end|>"]).bind(tok)
    q3 = get_template("qwen3").bind(tok)
    for msgs in convs:
        ref_msgs = [strip_think(m) for m in msgs] if mode is False else msgs
        ref = reference_encoding(hf_tok, source, ref_msgs, "<|im_end|>", prompt_kws=prompt_kws(ref_msgs))
        assert ref is not None
        assert encode(tok, hf_t, msgs, enable_thinking=mode) == ref, msgs
        assert encode(tok, q3, msgs, enable_thinking=mode) == ref, msgs
        text = tok.decode(ref[0], skip_special_tokens=False)
        if mode is False:
            assert text.count("<|im_start|>assistant\n<think>\n\n</think>") == 1
            assert text.count("<|im_start|>assistant\n<think>") == 1


def test_hf_template_errors_name_the_turn_when_not_prefix_consistent():
    """A template that rewrites earlier turns once a later one exists cannot be located by structure."""
    src = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = tinytune_test_tokenizer("chatml")
    t = get_template("hf", chat_template=src, end_of_turn=["<|im_end|>"]).bind(tok)
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TemplateError, match=r"message 1 \(assistant\).*not a prefix"):
        t.render(msgs)


def test_hf_answer_is_located_by_structure_not_by_content():
    """The issue's repros: the answer also occurs earlier (user text, special-token text, date header,
    think block); only the real answer and its end-of-turn token are trained."""
    cases = [
        (
            "smollm2",
            "chatml",
            "<|im_end|>",
            [{"role": "user", "content": "Answer yes or no: is 7 prime?"}, {"role": "assistant", "content": "yes"}],
            "yes<|im_end|>",
        ),
        (
            "smollm2",
            "chatml",
            "<|im_end|>",
            [{"role": "user", "content": "Say d"}, {"role": "assistant", "content": "d"}],
            "d<|im_end|>",
        ),
        (
            "llama3_1",
            "llama3",
            "<|eot_id|>",
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "4<|eot_id|>",
        ),
        (
            "qwen3",
            "chatml",
            "<|im_end|>",
            [
                {"role": "user", "content": "Capital of Japan?"},
                {"role": "assistant", "content": "<think>Japan's capital is Tokyo.</think>Tokyo."},
            ],
            "<think>\nJapan's capital is Tokyo.\n</think>\n\nTokyo.<|im_end|>",
        ),
    ]
    for ref_name, family, end, msgs, want in cases:
        tok = tinytune_test_tokenizer(family)
        t = get_template("hf", chat_template=jinja(ref_name), end_of_turn=[end]).bind(tok)
        tokens, labels = encode(tok, t, msgs)
        trained = [tokens[i + 1] for i in range(len(tokens) - 1) if labels[i] != -100]
        assert tok.decode(trained, skip_special_tokens=False) == want, ref_name


def test_qwen3_multi_step_reasoning_located_where_the_template_drops_it():
    """Qwen3 drops the reasoning of a tool-calling turn once a later user query exists, so the plain
    prefix render of the turn after the tool result differs from the full render; hf renders that
    prefix with the earlier reasoning removed, as the full render shows it, and equals qwen3."""
    tok = tinytune_test_tokenizer("chatml")
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "reasoning_content": "think first", "tool_calls": [call]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    from template_corpus import render

    hf_tok = reference_tokenizer("chatml")
    assert not render(hf_tok, jinja("qwen3"), msgs).startswith(
        render(hf_tok, jinja("qwen3"), msgs[:3], add_generation_prompt=True)
    )  # not prefix-consistent
    hf_t = get_template("hf", chat_template=jinja("qwen3"), end_of_turn=["<|im_end|>"]).bind(tok)
    q3 = get_template("qwen3").bind(tok)
    assert q3.render_text(msgs) == render(hf_tok, jinja("qwen3"), msgs)
    for mode in (None, True, False):
        tokens, labels = encode(tok, hf_t, msgs, enable_thinking=mode)
        assert (tokens, labels) == encode(tok, q3, msgs, enable_thinking=mode)
        trained = tok.decode(
            [tokens[i + 1] for i in range(len(tokens) - 1) if labels[i] != -100], skip_special_tokens=False
        )
        call_text = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>'
        think = "<think>\n\n</think>\n\n" if mode is True else ""
        assert trained == call_text + "a1<|im_end|>" + think + "a2<|im_end|>"


def test_hf_template_failures_are_template_errors():
    """A Jinja error (here: Qwen2.5 reads messages[0] when an answer opens the conversation) is a
    TemplateError, which the dataset reports per row, not a bare traceback."""
    tok = tinytune_test_tokenizer("chatml")
    t = get_template("hf", chat_template=jinja("qwen2_5"), end_of_turn=["<|im_end|>"]).bind(tok)
    msgs = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
    with pytest.raises(TemplateError, match=r"the chat template failed on 0 message\(s\) \+ generation prompt"):
        t.render(msgs)
    res = SampleEncoder(tok, t).encode_samples([ChatSample(msgs)])
    assert isinstance(res[0], str) and "chat template failed" in res[0]
