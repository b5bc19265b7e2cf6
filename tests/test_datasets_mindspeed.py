"""MindSpeed prompt types: every name of the slot table, text- and mask-exact against a small
independent renderer of the slot format written here (from MindSpeed's documented ``_encode``)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import zlib
from functools import lru_cache

import pytest
from test_datasets_helpers import HFTestTokenizer, chatml_test_tokenizer, llama3_tokenizer_json

from tinytune.datasets import IGNORE_INDEX, sft_dataset
from tinytune.datasets.encoding import SampleEncoder
from tinytune.datasets.styles import ChatSample
from tinytune.datasets.templates import TemplateError, get_template, segments_to_text

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mindspeed_templates.json")
TABLE = {e["name"]: e for e in json.load(open(FIXTURE, encoding="utf-8"))}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


# -- the reference: MindSpeed's slot format, written independently ---------------------------------
def ref_render(entry: dict, system: str | None, turns: list[tuple[str, str]], thinking=None) -> list[tuple[str, bool]]:
    """Pieces ``(text, trained)`` of a MindSpeed-rendered conversation.

    ``turns``: ``(role, content)`` with roles user / observation / assistant, alternating.
    """

    def slots(key, default):
        return (entry.get(key) or {}).get("slots") or default

    eff = entry.get("efficient_eos", False)
    eos = entry["stop_words"][0] if entry.get("replace_eos") else EOS
    user = slots("format_user", ["{{content}}"])
    assistant = slots("format_assistant", ["{{content}}"] + ([] if eff else [["eos_token"]]))
    sysfmt = slots("format_system", ["{{content}}"])
    obs = slots("format_observation", user)
    sep, prefix = slots("format_separator", []), slots("format_prefix", [])
    reasoning = entry.get("template_class") == "ReasoningTemplate"
    t0, t1 = (entry.get("thought_words") or ["<think>", "</think>"])[:2]

    def text(slot, content="", idx=None):
        if isinstance(slot, dict):
            return slot["token"]
        if isinstance(slot, list):
            return BOS if slot == ["bos_token"] else eos
        marker = "\x00CONTENT\x00"
        slot = slot.replace("{{content}}", marker, 1)
        if idx is not None:  # MindSpeed passes idx to user turns only
            slot = slot.replace("{{idx}}", idx, 1)
        return slot.replace(marker, content)

    system = system or entry.get("default_system", "")
    out: list[tuple[str, bool]] = []
    for i, (role, content) in enumerate(turns):
        sys_text = ""
        if i == 0:
            out += [(text(s), False) for s in prefix]
            if system:
                if entry.get("template_class") == "Llama2Template":
                    sys_text = sysfmt[0].replace("{{content}}", system)
                else:
                    out += [(text(s, system), False) for s in sysfmt]
        elif i % 2 == 0:
            out += [(text(s), False) for s in sep]
        if role == "user":
            out += [(text(s, sys_text + content, str(i // 2)), False) for s in user]
        elif role == "observation":
            out += [(text(s, content), False) for s in obs]
        else:
            if reasoning:
                if thinking is False:
                    content = re.sub(re.escape(t0) + ".*?" + re.escape(t1), "", content, flags=re.S).lstrip("\n")
                if t0 not in content and t1 not in content:
                    empty = f"{t0}\n\n{t1}\n\n"
                    if thinking:
                        out.append((empty, True))
                    else:
                        out.append((empty, False))
            out += [(text(s, content), True) for s in assistant]
    if eff:
        out.append((eos, True))
    return out


POOL = [
    "Hello",
    "yes",
    "d",
    "4",
    "The answer is yes.",
    "assistant",
    "user",
    "中文回答：你好",
    "naïve café ☕",
    "line one\nline two",
    "  padded  ",
    "{{idx}} literal",
    "Round 0",
    "Human: hi",
    "<think>\nstep\n</think>\n\nok",
    "Assistant:",
    "### Response:",
    "x" * 40,
]


def conversations(n: int, seed: int, tools: bool):
    rng = random.Random(seed)
    for _ in range(n):
        system = rng.choice([None, "", "Be brief.", "yes"])
        turns = []
        for k in range(rng.randint(1, 3)):
            prompt_role = "observation" if tools and k and rng.random() < 0.4 else "user"
            turns.append((prompt_role, rng.choice(POOL)))
            answer = rng.choice(POOL)
            if rng.random() < 0.3:  # answers that repeat the prompt
                answer = turns[-1][1]
            turns.append(("assistant", answer))
        yield system, turns


def as_messages(system, turns):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": {"observation": "tool"}.get(r, r), "content": c} for r, c in turns]


def check_text(name: str) -> tuple[int, int, int, list]:
    """(conversations, text-exact, trained-text-exact, first failures) for one prompt type."""
    entry = TABLE[name]
    t = get_template(f"mindspeed:{name}")
    n = text_ok = mask_ok = 0
    bad = []
    for thinking in [None, True, False] if entry.get("template_class") == "ReasoningTemplate" else [None]:
        for system, turns in conversations(30, seed=zlib.crc32(name.encode()), tools=True):
            ref = ref_render(entry, system, turns, thinking)
            segs = t.render(as_messages(system, turns), enable_thinking=thinking)
            n += 1
            if segments_to_text(segs, BOS, EOS) == "".join(x for x, _ in ref):
                text_ok += 1
            else:
                bad.append(("text", turns))
            if "".join(segments_to_text([s], BOS, EOS) for s in segs if s.train) == "".join(x for x, tr in ref if tr):
                mask_ok += 1
            else:
                bad.append(("mask", turns))
    return n, text_ok, mask_ok, bad[:2]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_prompt_type_text_and_mask_exact(name):
    n, text_ok, mask_ok, bad = check_text(name)
    assert n >= 30 and text_ok == mask_ok == n, (name, bad)


def test_all_34_names_and_alpaca_has_no_bos():
    assert len(TABLE) == 34
    from tinytune.datasets.templates.mindspeed import mindspeed_names

    assert mindspeed_names() == sorted(TABLE)
    segs = get_template("mindspeed:alpaca").render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    )
    assert not any(s.special == "bos" for s in segs)
    # Names only MindSpeed has resolve without the prefix; built-in names keep the built-in template.
    assert get_template("baichuan2").name == "baichuan2" and type(get_template("chatml")).__name__ == "ChatTemplate"


# -- token level: the encoder's mask equals the reference's trained characters ----------------------
@lru_cache(maxsize=1)
def _tokenizer() -> HFTestTokenizer:
    from tokenizers import AddedToken, Tokenizer

    from tinytune.datasets.templates.mindspeed import mindspeed_template

    tok = Tokenizer.from_file(llama3_tokenizer_json())
    need = {x for n in TABLE for x in mindspeed_template(n).required_tokens()}
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(need)])
    return HFTestTokenizer(tok, BOS, EOS, [EOS])


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_bytes(tok: HFTestTokenizer, tid: int, dec) -> bytes:
    s = tok.hf.id_to_token(tid)
    if s in tok.special_tokens:
        return s.encode()
    return bytes(dec[c] for c in s)


def check_tokens(name: str, count: int = 30) -> tuple[int, int, int]:
    """(conversations, token-exact, mask-exact) through the SampleEncoder: the tokens' bytes are the
    reference text, and a token is trained exactly when its last byte lies in a trained slot."""
    tok = _tokenizer()
    entry = TABLE[name]
    enc = SampleEncoder(tok, get_template(f"mindspeed:{name}").bind(tok))
    dec = _byte_decoder()
    n = tok_ok = mask_ok = 0
    for system, turns in conversations(count, seed=7, tools=True):
        ref = ref_render(entry, system, turns)
        spans, pos = [], 0
        for x, tr in ref:
            b = len(x.encode())
            if tr:
                spans.append((pos, pos + b))
            pos += b
        [[item]] = enc.encode_samples([ChatSample(as_messages(system, turns))])
        pieces = [_token_bytes(tok, i, dec) for i in item.tokens]
        n += 1
        tok_ok += b"".join(pieces) == "".join(x for x, _ in ref).encode()
        ends = list(itertools.accumulate(len(p) for p in pieces))
        want = [any(a < e <= b for a, b in spans) for e in ends[1:]]  # token k>0 trained iff its last byte is
        got = [lab != IGNORE_INDEX for lab in item.labels[:-1]]
        mask_ok += want == got
    return n, tok_ok, mask_ok


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_prompt_type_token_mask(name):
    n, tok_ok, mask_ok = check_tokens(name)
    assert tok_ok == mask_ok == n, name


def test_prompt_type_table_report(capsys):
    """Prints, per prompt type, conversations checked / text-exact / mask-exact / token-exact (run with -s)."""
    rows = []
    for name in sorted(TABLE):
        n, text_ok, mask_ok, _ = check_text(name)
        tn, tok_ok, tmask_ok = check_tokens(name, 10)
        rows.append((name, n, text_ok, mask_ok, tn, tok_ok, tmask_ok))
    with capsys.disabled():
        print(f"\n{'prompt type':<16}{'convs':>6}{'text':>6}{'mask':>6}{'tok convs':>10}{'tokens':>7}{'tok mask':>9}")
        for r in rows:
            print(f"{r[0]:<16}{r[1]:>6}{r[2]:>6}{r[3]:>6}{r[4]:>10}{r[5]:>7}{r[6]:>9}")
    assert all(r[1] == r[2] == r[3] and r[4] == r[5] == r[6] for r in rows)


def test_missing_special_token_is_named(tmp_path):
    with pytest.raises(TemplateError, match=r"'<\|user\|>'"):
        sft_dataset(
            chatml_test_tokenizer(), [{"instruction": "q", "output": "a"}], prompt_type="glm4", cache_dir=str(tmp_path)
        )
    with pytest.raises(TemplateError, match=r"'\[gMASK\]'"):
        get_template("chatglm2").bind(chatml_test_tokenizer())
    with pytest.raises(TemplateError, match="unknown MindSpeed prompt type 'nope'"):
        get_template("mindspeed:nope")


def test_prompt_type_through_builder_trains_answers(tmp_path):
    tok = chatml_test_tokenizer()
    ds = sft_dataset(tok, [{"instruction": "q", "output": "yes"}], prompt_type="qwen", cache_dir=str(tmp_path))
    item = ds[0]
    text = tok.decode(item["tokens"], skip_special_tokens=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>"
    )
    trained = [item["tokens"][i + 1] for i, x in enumerate(item["labels"]) if x != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == "yes<|im_end|>"
