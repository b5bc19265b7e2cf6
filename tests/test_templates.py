"""Prompt templates: rendered text and token ids equal the official Jinja templates (rendered by
transformers' apply_chat_template on a tokenizer built offline), and loss masks are exact."""

from __future__ import annotations

import functools
import json
import os

import pytest

from test_datasets_helpers import (
    _base_hf,
    chatml_test_tokenizer,
    gemma_test_tokenizer,
    llama3_test_tokenizer,
    sp_style_test_tokenizer,
)
from tinytune.datasets.encoding import IGNORE_INDEX, SampleEncoder
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import TemplateError, get_template, mindspeed_prompt_types, template_names

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")

SYS = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "It is 4."}
U2 = {"role": "user", "content": "And 3 times 3?\nExplain briefly."}
A2 = {"role": "assistant", "content": "9, since 3+3+3 = 9."}

CONVS = {
    "single": [U1, A1],
    "single_sys": [SYS, U1, A1],
    "multi": [U1, A1, U2, A2],
    "multi_sys": [SYS, U1, A1, U2, A2],
}
NO_SYS = ["single", "multi"]
WITH_SYS = ["single_sys", "multi_sys"]


def jinja(name: str) -> str:
    with open(os.path.join(FIX, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _transformers_tokenizer(bos: str | None, eos: str):
    from transformers import PreTrainedTokenizerFast

    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=_base_hf(), eos_token=eos, **kw)


class hf_tokenizer:
    """A transformers tokenizer (built offline from the same vocabulary) plus one chat template."""

    def __init__(self, tok, source: str):
        bos = tok.hf.id_to_token(tok.bos_id) if tok.bos_id is not None else None
        self.hf = _transformers_tokenizer(bos, tok.hf.id_to_token(tok.eos_id))
        self.source = source

    def apply_chat_template(self, messages, **kw):
        return self.hf.apply_chat_template(messages, chat_template=self.source, **kw)


def hf_render(hf, messages, **kw):
    text = hf.apply_chat_template(messages, tokenize=False, **kw)
    ids = hf.apply_chat_template(messages, tokenize=True, **kw)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return text, list(ids)


def ours(tok, template, messages, enable_thinking=None, **kw):
    t = get_template(template).bind(tok)
    text = t.render_text(
        messages,
        bos_token=tok.hf.id_to_token(tok.bos_id) if tok.bos_id is not None else "",
        eos_token=tok.hf.id_to_token(tok.eos_id),
        enable_thinking=enable_thinking,
    )
    enc = SampleEncoder(tok, t, enable_thinking=enable_thinking, **kw)
    (seq,) = enc.encode_samples([ChatSample(messages)])[0]
    return text, seq.tokens, seq.labels


CASES = (
    [("llama3", "llama3", llama3_test_tokenizer, c) for c in CONVS]
    + [("qwen2_5", "qwen2_5", chatml_test_tokenizer, c) for c in CONVS]
    + [("qwen3", "qwen3", chatml_test_tokenizer, c) for c in CONVS]
    + [("smollm2", "smollm2", chatml_test_tokenizer, c) for c in CONVS]
    + [("chatml", "smollm2", chatml_test_tokenizer, c) for c in WITH_SYS]
    + [("gemma", "gemma", gemma_test_tokenizer, c) for c in NO_SYS]
    + [("gemma", "gemma3", gemma_test_tokenizer, c) for c in CONVS]
    + [("llama2", "llama2", sp_style_test_tokenizer, c) for c in CONVS]
    + [("mistral", "mistral", sp_style_test_tokenizer, c) for c in NO_SYS]
)


@pytest.mark.parametrize("template,reference,make_tok,conv", CASES)
def test_text_and_ids_match_official_template(template, reference, make_tok, conv):
    tok = make_tok()
    msgs = CONVS[conv]
    ref_text, ref_ids = hf_render(hf_tokenizer(tok, jinja(reference)), msgs)
    text, ids, _ = ours(tok, template, msgs)
    assert text == ref_text
    assert ids == ref_ids


QWEN3_CONVS = {
    "plain": [U1, A1, U2, A2],
    "reasoning_field": [
        SYS,
        U1,
        {**A1, "reasoning_content": "Add two and two."},
        U2,
        {**A2, "reasoning_content": "Three threes.\nSum them."},
    ],
    "inline_think": [
        U1,
        {"role": "assistant", "content": "<think>\nCount.\n</think>\n\nIt is 4."},
        U2,
        {"role": "assistant", "content": "<think>\nMultiply.\n</think>\n\n9."},
    ],
    "single_inline": [SYS, U1, {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nIt is 4."}],
}


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("conv", list(QWEN3_CONVS))
def test_qwen3_thinking_modes_match_official(conv, thinking):
    tok = chatml_test_tokenizer()
    msgs = QWEN3_CONVS[conv]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    hf = hf_tokenizer(tok, jinja("qwen3"))
    # enable_thinking=False removes all reasoning first (Qwen3 SFT guide), then renders as Qwen3 does
    ref_msgs = [strip_think(m) for m in msgs] if thinking is False else msgs
    ref_text, ref_ids = hf_render(hf, ref_msgs, **kw)
    text, ids, labels = ours(tok, "qwen3", msgs, enable_thinking=thinking)
    assert text == ref_text and ids == ref_ids
    # Historical reasoning is stripped; the last turn keeps its think block (empty with thinking off).
    assert text.count("<think>") == 1
    assert ("<think>\n\n</think>" in text) == (thinking is False or conv == "plain")
    # Generation prompt: empty think block only with thinking off.
    gen = get_template("qwen3").render_text(msgs[:-1], add_generation_prompt=True, enable_thinking=thinking)
    assert gen == hf.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True, **kw)
    assert gen.endswith("<think>\n\n</think>\n\n") == (thinking is False)


def strip_think(m: dict) -> dict:
    """Test-side reasoning removal: no reasoning_content, content after the last </think>."""
    if m["role"] != "assistant":
        return m
    m = {k: v for k, v in m.items() if k != "reasoning_content"}
    m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
    return m


def trained_text(tok, tokens, labels) -> str:
    """Decodes the tokens that are targets of some label (in order)."""
    targets = [tokens[i + 1] for i in range(len(tokens) - 1) if labels[i] != IGNORE_INDEX]
    assert all(labels[i] == tokens[i + 1] for i in range(len(tokens) - 1) if labels[i] != IGNORE_INDEX)
    assert labels[-1] == IGNORE_INDEX
    return tok.decode(targets, skip_special_tokens=False)


END = {
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "qwen2_5": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "llama2": "</s>",
    "mistral": "</s>",
    "alpaca": "<|eot_id|>",
}
TOKS = {
    "llama3": llama3_test_tokenizer,
    "chatml": chatml_test_tokenizer,
    "qwen2_5": chatml_test_tokenizer,
    "gemma": gemma_test_tokenizer,
    "llama2": sp_style_test_tokenizer,
    "mistral": sp_style_test_tokenizer,
    "alpaca": llama3_test_tokenizer,
}
ANSWER = {"llama2": lambda a: f" {a} "}


@pytest.mark.parametrize("template", list(END))
def test_masks_train_exactly_the_answers(template):
    tok = TOKS[template]()
    msgs = CONVS["multi_sys"] if template not in ("mistral",) else CONVS["multi"]
    fmt = ANSWER.get(template, lambda a: a)
    _, tokens, labels = ours(tok, template, msgs)
    assert trained_text(tok, tokens, labels) == "".join(fmt(m["content"]) + END[template] for m in (A1, A2))
    _, tokens, labels = ours(tok, template, msgs, mask_history=True)
    assert trained_text(tok, tokens, labels) == fmt(A2["content"]) + END[template]
    _, tokens, labels = ours(tok, template, msgs, train_on_input=True)
    assert labels[:-1] == tokens[1:]


def test_qwen3_masks_by_thinking_mode():
    tok = chatml_test_tokenizer()
    msgs = CONVS["multi"]
    _, t, lab = ours(tok, "qwen3", msgs, enable_thinking=False, mask_history=True)
    assert trained_text(tok, t, lab) == A2["content"] + "<|im_end|>"  # empty think block is prompt
    _, t, lab = ours(tok, "qwen3", msgs, enable_thinking=True, mask_history=True)
    assert trained_text(tok, t, lab) == "<think>\n\n</think>\n\n" + A2["content"] + "<|im_end|>"
    _, t, lab = ours(tok, "qwen3", msgs, enable_thinking=None, mask_history=True)
    assert trained_text(tok, t, lab) == A2["content"] + "<|im_end|>"  # no reasoning: empty block is prompt
    msgs = QWEN3_CONVS["reasoning_field"]
    _, t, lab = ours(tok, "qwen3", msgs, enable_thinking=False)  # all reasoning removed
    assert trained_text(tok, t, lab) == "It is 4.<|im_end|>9, since 3+3+3 = 9.<|im_end|>"
    for mode in (None, True):  # reasoning kept and trained
        _, t, lab = ours(tok, "qwen3", msgs, enable_thinking=mode)
        assert trained_text(tok, t, lab) == (
            "It is 4.<|im_end|><think>\nThree threes.\nSum them.\n</think>\n\n9, since 3+3+3 = 9.<|im_end|>"
        )


def _mindspeed(name):
    with open(os.path.join(FIX, "mindspeed_subset.json"), encoding="utf-8") as f:
        return next(t for t in json.load(f) if t["name"] == name)


def _lf_render(entry, messages, bos="", eos=""):
    """Renders LLaMA-Factory/MindSpeed slot templates (string slots only) for a conversation."""
    fmt = lambda slots, c: "".join(s.replace("{{content}}", c) if isinstance(s, str) else bos for s in slots)  # noqa
    user = entry["format_user"]["slots"]
    system = entry.get("format_system", {"slots": ["{{content}}"]})["slots"]
    assistant = entry.get("format_assistant", {"slots": ["{{content}}"]})["slots"]
    sep = "".join(entry.get("format_separator", {"slots": [""]})["slots"])
    prefix = "".join(bos for s in entry.get("format_prefix", {"slots": []})["slots"])
    sys_text = messages[0]["content"] if messages[0]["role"] == "system" else entry.get("default_system", "")
    turns = [m for m in messages if m["role"] != "system"]
    out = prefix
    for k in range(0, len(turns), 2):
        if k:
            out += sep
        if k == 0 and sys_text:
            out += fmt(system, sys_text)
        out += fmt(user, turns[k]["content"]) + fmt(assistant, turns[k + 1]["content"]) + eos
    return out


@pytest.mark.parametrize("prompt_type", ["alpaca", "qwen", "chatml", "llama3"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_mindspeed_prompt_types_render_like_mindspeed(prompt_type, conv):
    msgs = CONVS[conv]
    entry = _mindspeed(prompt_type)
    eos = {"alpaca": "</s>", "llama3": "<|eot_id|>"}.get(prompt_type, "<|im_end|>")
    bos = "<s>" if prompt_type != "llama3" else "<|begin_of_text|>"
    expected = _lf_render(entry, msgs, bos=bos, eos=eos)
    # prompt types render exactly as MindSpeed (tests/test_datasets_mindspeed.py covers all 34 names)
    got = get_template(f"mindspeed:{prompt_type}").render_text(msgs, bos_token=bos, eos_token=eos)
    assert got == expected
    assert prompt_type in mindspeed_prompt_types()


HF_CASES = [
    ("llama3", llama3_test_tokenizer),
    ("qwen2_5", chatml_test_tokenizer),
    ("qwen3", chatml_test_tokenizer),
    ("gemma3", gemma_test_tokenizer),
    ("smollm2", chatml_test_tokenizer),
    ("llama3_1", llama3_test_tokenizer),
    ("llama2", sp_style_test_tokenizer),
    ("mistral", sp_style_test_tokenizer),
    ("gemma", gemma_test_tokenizer),
]


@pytest.mark.parametrize("reference,make_tok", HF_CASES)
def test_hf_template_renders_and_masks_model_template(reference, make_tok):
    tok = make_tok(chat_template=jinja(reference))
    msgs = CONVS["multi" if reference in ("mistral", "gemma") else "multi_sys"]
    hf = hf_tokenizer(tok, jinja(reference))
    ref_text, ref_ids = hf_render(hf, msgs)
    t = get_template("hf").bind(tok)
    assert t.render_text(msgs) == ref_text
    enc = SampleEncoder(tok, t)
    (seq,) = enc.encode_samples([ChatSample(msgs)])[0]
    assert seq.tokens == ref_ids
    end = tok.hf.id_to_token(tok.stop_tokens[0]) if not reference.startswith("gemma") else "<end_of_turn>"
    think = ""  # qwen3, enable_thinking null: an answer without reasoning gets its empty think block as prompt
    fmt = ANSWER.get(reference, lambda a: a)
    expected = fmt(A1["content"]) + end + think + fmt(A2["content"]) + end
    got = trained_text(tok, seq.tokens, seq.labels)
    if reference == "llama2":  # the space before an answer that starts with a digit is its own token, masked
        got, expected = got.replace(" ", ""), expected.replace(" ", "")
    assert got == expected
    if reference in ("llama3", "qwen2_5", "qwen3", "smollm2", "mistral", "gemma"):
        assert seq.labels == ours(tok, reference, msgs)[2]  # same labels as the named template


def test_hf_template_with_generation_tags_and_errors():
    src = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{{ eos_token }}"
        "{% endgeneration %}\n{% else %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "Q: {{ m.content }}\n{% endif %}{% endfor %}"
    )
    tok = chatml_test_tokenizer(chat_template=src)
    t = get_template("hf").bind(tok)
    msgs = CONVS["multi"]
    # trim_blocks drops the newline after a block tag, as in transformers
    assert (
        t.render_text(msgs) == "Q: What is 2+2?\nA: It is 4.<|im_end|>Q: And 3 times 3?\nExplain briefly.\n"
        "A: 9, since 3+3+3 = 9.<|im_end|>"
    )
    (seq,) = SampleEncoder(tok, t).encode_samples([ChatSample(msgs)])[0]
    # no generation prompt: everything after the previous turn up to the end-of-turn token is the answer
    assert trained_text(tok, seq.tokens, seq.labels) == "A: It is 4.<|im_end|>A: 9, since 3+3+3 = 9.<|im_end|>"
    with pytest.raises(TemplateError, match="no system"):
        t.render(CONVS["single_sys"])


def test_registry_names_and_errors():
    names = template_names()
    for n in ["alpaca", "llama2", "llama3", "chatml", "qwen2_5", "qwen3", "mistral", "gemma", "hf", "qwen"]:
        assert n in names
    assert get_template("qwen").default_system == "You are a helpful assistant."
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("nope")
    custom = get_template(
        {
            "name": "mine",
            "user": "Q: {content}\n",
            "assistant_prefix": "A: ",
            "assistant_end": "{eos}",
            "assistant_suffix": "\n",
        }
    )
    assert custom.render_text(CONVS["single"], eos_token="</s>") == "Q: What is 2+2?\nA: It is 4.</s>\n"
    with pytest.raises(TemplateError, match="chat template"):
        get_template("hf").bind(chatml_test_tokenizer())


@functools.lru_cache(maxsize=None)
def _transformers_from_file(bos: str | None, eos: str):
    from transformers import PreTrainedTokenizerFast

    from test_datasets_helpers import _extended_tokenizer_json

    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_file=_extended_tokenizer_json(), eos_token=eos, **kw)


TINYTUNE_CASES = [
    ("llama3", "llama3", "llama3", "multi_sys", None),
    ("qwen2_5", "qwen2_5", "chatml", "multi_sys", None),
    ("qwen2_5", "qwen2_5", "chatml", "single", None),
    ("smollm2", "smollm2", "chatml", "multi", None),
    ("qwen3", "qwen3", "chatml", "multi_sys", None),
    ("qwen3", "qwen3", "chatml", "multi", False),
    ("gemma", "gemma3", "gemma", "multi_sys", None),
    ("llama2", "llama2", "sp", "multi_sys", None),
    ("mistral", "mistral", "sp", "multi", None),
    ("hf", "llama3_1", "llama3", "multi_sys", None),
]


@pytest.mark.parametrize("template,reference,family,conv,thinking", TINYTUNE_CASES)
def test_token_ids_with_tinytune_tokenizer(template, reference, family, conv, thinking):
    """Token ids from the production tinytune tokenizer equal transformers' apply_chat_template ids."""
    from test_datasets_helpers import tinytune_test_tokenizer

    tok = tinytune_test_tokenizer(family)
    inv = {i: s for s, i in tok.special_tokens.items()}
    hf = _transformers_from_file(inv.get(tok.bos_id), inv[tok.eos_id])
    msgs = CONVS[conv]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    ref = hf.apply_chat_template(msgs, chat_template=jinja(reference), tokenize=True, **kw)
    ref = list(ref["input_ids"] if not isinstance(ref, list) else ref)
    t = get_template(template, chat_template=jinja(reference) if template == "hf" else None).bind(tok)
    (seq,) = SampleEncoder(tok, t, enable_thinking=thinking).encode_samples([ChatSample(msgs)])[0]
    assert seq.tokens == ref
    trained = tok.decode(
        [seq.tokens[i + 1] for i in range(len(seq.tokens) - 1) if seq.labels[i] != IGNORE_INDEX],
        skip_special_tokens=False,
    )
    assert msgs[-1]["content"] in trained and msgs[-2]["content"] not in trained and "user" not in trained


@pytest.mark.parametrize(
    "template,make_tok",
    [("qwen2_5", chatml_test_tokenizer), ("chatml", chatml_test_tokenizer), ("mistral", sp_style_test_tokenizer)],
)
def test_ids_equal_whole_string_tokenization_at_awkward_borders(template, make_tok):
    """Answers starting with newlines/spaces still give the ids of the whole rendered string."""
    tok = make_tok()
    msgs = [
        {"role": "user", "content": "Format this:  "},
        {"role": "assistant", "content": "\n\n  Indented answer"},
        {"role": "user", "content": "\nagain"},
        {"role": "assistant", "content": " spaced\n"},
    ]
    t = get_template(template).bind(tok)
    text = t.render_text(msgs, bos_token="<s>", eos_token=tok.hf.id_to_token(tok.eos_id))
    ref = tok.encode(text, add_bos=False, add_eos=False)
    (seq,) = SampleEncoder(tok, t).encode_samples([ChatSample(msgs)])[0]
    assert seq.tokens == ref
    trained = trained_text(tok, seq.tokens, seq.labels)
    assert "Indented answer" in trained and " spaced" in trained and "again" not in trained and "Format" not in trained
