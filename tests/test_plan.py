"""``tune plan``'s memory model: parameter counts against real (meta-device) models, layouts, the CLI."""

import json

import pytest
import torch

from tinytune.checkpoint.model_info import model_info_from_hf_config
from tinytune.checkpoint.model_loading import build_model
from tinytune.cli.main import main as tune
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import LoRASettings
from tinytune.distributed.memory_plan import Layout, Workload, candidate_layouts, parse_bytes, rank_memory
from tinytune.modules.peft import lora_linear_factory

HF = {
    "model_type": "qwen3",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e4,
    "tie_word_embeddings": False,
}


def _count(model, lora_only=False):
    return sum(p.numel() for n, p in model.named_parameters() if not lora_only or ".lora_" in n)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("64GB") == 64 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(ConfigError, match="80GiB"):
        parse_bytes("lots")


def test_full_finetune_state_matches_the_real_parameter_count():
    info = model_info_from_hf_config(HF)
    with torch.device("meta"):
        n = _count(build_model(info))
    work = Workload(rows=1, seq_len=32, compute_dtype="fp32")
    one = rank_memory(info, Layout(), work)
    assert one["params"] == n * 4 and one["grads"] == n * 4 and one["optimizer"] == n * 8  # fp32 + AdamW moments
    eight = rank_memory(info, Layout(dp_shard=8), work)
    assert eight["params"] == pytest.approx(n * 4 / 8)
    # pipeline stages hold disjoint parameters that add up to the model
    assert sum(rank_memory(info, Layout(pp=3), work, pp_rank=r)["params"] for r in range(3)) == n * 4


def test_lora_trainable_count_matches_the_lora_model():
    info = model_info_from_hf_config(HF)
    targets = LoRASettings(lora_attn_modules=["q_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True).target_modules()
    with torch.device("meta"):
        model = build_model(info, lora_linear_factory(targets, rank=4, alpha=8.0, dropout=0.0))
    n_lora, n_all = _count(model, lora_only=True), _count(model)
    r = rank_memory(info, Layout(), Workload(rows=1, seq_len=32, mode="lora", lora_rank=4, lora_targets=tuple(targets)))
    assert r["grads"] == n_lora * 4 and r["optimizer"] == n_lora * 8
    assert r["params"] == n_all * 4


def test_checkpointing_pipeline_and_tp_shrink_activations():
    info = model_info_from_hf_config(HF)
    work = Workload(rows=2, seq_len=512, microbatches=4)
    base = rank_memory(info, Layout(), work)
    assert base["activations_ac"] < base["activations_no_ac"]
    assert rank_memory(info, Layout(tp=2), work)["activations_no_ac"] < base["activations_no_ac"]
    gpipe = rank_memory(info, Layout(pp=2), Workload(rows=2, seq_len=512, microbatches=4, schedule="gpipe"))
    one_f = rank_memory(info, Layout(pp=2), work)
    assert gpipe["activations_no_ac"] > one_f["activations_no_ac"]  # GPipe keeps every micro-batch alive


def test_ce_chunk_rows_caps_the_cross_entropy_scratch():
    """A CPU run's fused CE takes at most CPU_MAX_CHUNK_ROWS tokens per chunk: the plan counts the same."""
    from tinytune.kernels.linear_ce import CPU_MAX_CHUNK_ROWS, default_chunk_size

    info = model_info_from_hf_config(HF)
    kw = dict(rows=1, seq_len=1024, compute_dtype="fp32", ce_chunk_bytes=256 * 2**20)
    free, capped = (rank_memory(info, Layout(), Workload(**kw, ce_chunk_rows=c))["ce_chunk"] for c in (None, 256))
    v = info.vocab_size
    assert free - capped == (1024 - CPU_MAX_CHUNK_ROWS) * v * 4  # the fp32 [chunk, V] logits buffer
    assert default_chunk_size(1024, v, torch.float32, cpu=True) == CPU_MAX_CHUNK_ROWS == 256


def test_refused_layouts():
    info = model_info_from_hf_config(HF)
    with pytest.raises(ConfigError, match="does not divide"):
        rank_memory(info, Layout(tp=3), Workload())
    with pytest.raises(ConfigError, match="deeper"):
        rank_memory(info, Layout(pp=8), Workload())
    with pytest.raises(ConfigError, match="QLoRA"):
        rank_memory(info, Layout(dp_shard=2), Workload(mode="qlora"))
    assert all(lay.world == 8 and 4 % lay.tp == 0 for lay in candidate_layouts(info, 8))


def test_tune_plan_cli_lists_layouts_that_fit(capsys, tmp_path):
    assert tune(["plan", "qwen3-8b", "--devices", "8", "--device-memory", "80GiB", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "qwen3, 36 layers" in out and "pp2 x dp1x4 x tp1" in out and "fits" in out
    (tmp_path / "config.json").write_text(json.dumps(HF))
    assert tune(["plan", str(tmp_path), "--mode", "lora"]) == 0
    assert "lora" in capsys.readouterr().out
    assert tune(["plan", str(tmp_path), "--device-memory", "lots"]) == 2


def test_tune_plan_reads_a_recipe_config_and_its_overrides(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(HF))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"checkpoint_dir: {tmp_path / 'ckpt'}\nbatch_size: 4\ndtype: fp32\n"
        "model:\n  lora_rank: 4\n  apply_lora_to_mlp: true\n"
        "parallelism:\n  tensor_parallel: 2\n  data_parallel_shard: 2\n"
    )
    assert tune(["plan", str(cfg), "+parallelism.pipeline_parallel=3", "+parallelism.microbatches=2"]) == 0
    out = capsys.readouterr().out
    assert "lora, 2 x 2048 tokens" in out and "pp3 x dp1x2 x tp2" in out
    assert tune(["plan", str(cfg), "parallelism.tensor_parallel=3"]) == 0  # a refused layout is a table row
    assert "refused: tp=3 does not divide" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_plan_smoke():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_plan.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| single")]
    assert len(rows) == 1 and "failed" not in rows[0]
