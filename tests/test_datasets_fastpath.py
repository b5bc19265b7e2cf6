"""The fast preprocessing path (memoized/deduplicated batch encoding, numpy labels, flat arrays for the
cache) gives exactly the tokens and labels of a straightforward reference: the whole rendered string
encoded once by HF ``tokenizers``, the loss mask derived from HF's character offsets (a token is
trained when its last character belongs to a trained segment)."""

from __future__ import annotations

import numpy as np
import pytest

from test_datasets_helpers import _extended_tokenizer_json, tinytune_test_tokenizer
from tinytune.datasets.encoding import IGNORE_INDEX, SampleEncoder, flat_labels, labels_from_mask
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import get_template

PROMPTS = [
    "What is 2+2?",
    "Count: 12",
    "Say hi",
    "Write  two  spaces",
    "héllo 你好, translate",
    "Line one\nLine two\n",
    "Tabs\tand\ttabs",
    "List 3 items:",
    "x",
    "Answer:  ",
]  # trailing spaces: BPE merges them differently once answer digits follow
ANSWERS = [
    "4",
    "42 is the answer.",
    " 42",
    "  two leading spaces",
    "\nnewline first",
    "\n\nTwo newlines",
    "345 then words",
    " leading space",
    "\tTab first",
    "Ok.\n",
    "!!! punct",
    "é accent",
    "12345678",
]


def _conversations():
    convs = []
    for i, a in enumerate(ANSWERS):
        p = PROMPTS[i % len(PROMPTS)]
        convs.append([{"role": "user", "content": p}, {"role": "assistant", "content": a}])
        # multi-turn with a system prompt; the earlier answer is trained too (no mask_history)
        convs.append(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": p},
                {"role": "assistant", "content": ANSWERS[(i + 3) % len(ANSWERS)]},
                {"role": "user", "content": PROMPTS[(i + 1) % len(PROMPTS)]},
                {"role": "assistant", "content": a},
            ]
        )
    return convs


@pytest.fixture(scope="module")
def hf():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(_extended_tokenizer_json())


def _reference(hf, tok, template, messages):
    """Whole rendered text encoded once; mask from character offsets."""
    segs = template.render(messages)
    names = {"bos": tok.bos_id, "eos": tok.eos_id}
    text, flags = [], []
    for s in segs:
        if s.special is not None:
            tid = names[s.special]
            piece = "" if tid is None else hf.id_to_token(tid)
        else:
            piece = s.text
        text.append(piece)
        flags.extend([s.train] * len(piece))
    text = "".join(text)
    enc = hf.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [flags[end - 1] for _, end in enc.offsets]
    labels = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


@pytest.mark.parametrize(
    "family,template",
    [
        ("llama3", "llama3"),
        ("chatml", "chatml"),
        ("chatml", "qwen2_5"),
        ("sp", "alpaca"),
        ("gemma", "gemma"),
        ("sp", "plain"),
    ],
)
def test_fast_path_equals_whole_string_reference(hf, family, template):
    tok = tinytune_test_tokenizer(family)
    t = get_template(template).bind(tok)
    convs = _conversations()
    enc = SampleEncoder(tok, t)
    batch = enc.encode_samples([ChatSample([dict(m) for m in c]) for c in convs])
    # second pass: short texts now come from the memo
    again = enc.encode_samples([ChatSample([dict(m) for m in c]) for c in convs])
    for conv, res, res2 in zip(convs, batch, again):
        (seq,), (seq2,) = res, res2
        ids, labels = _reference(hf, tok, t, conv)
        assert seq.tokens == ids, conv
        assert seq.labels == labels, conv
        assert (seq2.tokens, seq2.labels) == (seq.tokens, seq.labels)
    # the flat arrays written to the cache hold the same sequences back to back
    samples = [ChatSample([dict(m) for m in c]) for c in convs]
    tokens, flat, lengths, outcomes = SampleEncoder(tok, t).encode_samples_flat(samples)
    assert outcomes == [1] * len(convs) and tokens.dtype == np.int32 and flat.dtype == np.int32
    assert tokens.tolist() == [x for r in batch for x in r[0].tokens]
    assert flat.tolist() == [x for r in batch for x in r[0].labels]
    assert lengths.tolist() == [len(r[0].tokens) for r in batch]


def test_fast_encode_many_equals_encode():
    tok = tinytune_test_tokenizer("chatml")
    texts = [
        "plain text",
        "<|im_start|>user\nhi<|im_end|>",
        "a < b",
        "héllo",
        "",
        " ",
        "\n\n",
        "x" * 300,
        "<|eot_id|>",
        "emoji 😀 ok",
        "lone \ud800 surrogate",
    ]
    assert tok.encode_batch(texts, add_bos=False, add_eos=False) == [
        tok.encode(t, add_bos=False, add_eos=False) for t in texts
    ]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    llama = tinytune_test_tokenizer("llama3")
    assert llama.encode_batch(texts) == [llama.encode(t) for t in texts]


def test_labels_helpers_agree():
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 1000, n).tolist(), (rng.random(n) < 0.5).tolist()) for n in (1, 2, 5, 17, 0, 3)]
    ref = []
    for t, m in seqs:
        ref.extend([t[i + 1] if m[i + 1] else IGNORE_INDEX for i in range(len(t) - 1)] + ([IGNORE_INDEX] if t else []))
    assert [x for t, m in seqs for x in labels_from_mask(t, m)] == ref
    tokens = np.asarray([x for t, _ in seqs for x in t], dtype=np.int32)
    mask = np.asarray([x for _, m in seqs for x in m], dtype=bool)
    lengths = np.asarray([len(t) for t, _ in seqs], dtype=np.int64)
    assert flat_labels(tokens, mask, lengths).tolist() == ref


@pytest.mark.parametrize("family", ["llama3", "chatml", "sp"])
def test_border_where_bpe_merges_differently_across_it(hf, family):
    """'Answer:  ' alone ends in one double-space token, but followed by '42' it becomes two single
    spaces: the prompt's spaces must stay masked and only the answer's tokens are trained."""
    tok = tinytune_test_tokenizer(family)
    t = get_template("plain").bind(tok)
    conv = [{"role": "user", "content": "Answer:  "}, {"role": "assistant", "content": "42"}]
    ((seq,),) = SampleEncoder(tok, t).encode_samples([ChatSample([dict(m) for m in conv])])
    ids, labels = _reference(hf, tok, t, conv)
    assert (seq.tokens, seq.labels) == (ids, labels)
    assert [x for x in seq.labels if x != IGNORE_INDEX] == seq.tokens[-2:]  # '42' and the end token only
