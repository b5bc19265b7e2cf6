"""Pipeline parallelism (torch.distributed.pipelining) on CPU/gloo vs the single-device recipes.

Every run: tiny Qwen3 checkpoint with 4 layers (fp32), 4 AdamW steps on a global batch of 4
samples, cosine schedule, gradient clipping, validation at steps 2 and 4. References: ``full_finetune`` /
``lora_finetune`` in this process on the same global batches. PP runs split each step's batch into
pipeline micro-batches (packed padding-free rows; padded rows with TP).
"""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.dist_workers.launch import REPO, torchrun
from tests.dist_workers.pipeline_worker import pp_cfg
from tests.dist_workers.tiny_checkpoint import write_tiny_checkpoint
from tinytune.config import ConfigError
from tinytune.distributed.pipeline_stages import (
    PipelineSettings,
    balanced_split,
    check_pipeline_layout,
    pack_microbatch,
)

TOL = 1e-5
# Trained weights after 4 AdamW steps: Adam divides each element's gradient by its own running RMS,
# so an element whose gradient is near zero (a LoRA A row, an lm_head row of an unseen token) turns
# fp32 summation-order differences (pipeline micro-batches, TP / FSDP reductions vs one batch on one
# device) into visible update differences. Measured on the AMD EPYC VM (2026-12-03): 2.3e-5 (PP
# LoRA, the same with and without resume), 1.7e-5 (PP x FSDP x TP, lm_head); below 1e-5 on the Intel
# VM before. With lr 3e-3 a lost micro-batch changes update directions by ~1e-3, far outside this
# bound; the losses keep TOL.
WEIGHT_TOL = 1e-4
WORKER = str(REPO / "tests/dist_workers/pipeline_worker.py")


def _losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


def _weights(run_dir, sub):
    sd = {}
    folder = os.path.join(run_dir, sub)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, f)))
    return sd


def _assert_same_weights(a, b, atol):
    assert sorted(a) == sorted(b)
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] < atol, worst


def _reference(tmp, ckpt, lora):
    if lora:
        from recipes.lora_finetune import recipe_main
    else:
        from recipes.full_finetune import recipe_main
    out = os.path.join(tmp, "ref_lora" if lora else "ref")
    if not os.path.isdir(out):
        cfg = pp_cfg(out, ckpt, lora)
        for key in ("parallelism", "fsdp", "plot_loss"):  # distributed-only keys: the single-device recipes refuse them
            cfg.pop(key)
        recipe_main(OmegaConf.create(cfg))
    return out


def _check_run(tmp, scenario, ref, lora):
    got = os.path.join(tmp, scenario)
    ref_losses = _losses(ref)
    assert list(ref_losses) == [1, 2, 3, 4] and ref_losses[4] != ref_losses[1]
    assert _losses(got) == pytest.approx(ref_losses, abs=TOL)
    ref_val = _losses(ref, "val_loss")
    assert list(ref_val) == [2, 4]
    assert _losses(got, "val_loss") == pytest.approx(ref_val, abs=TOL)
    _assert_same_weights(_weights(got, "hf_model"), _weights(ref, "hf_model"), WEIGHT_TOL)
    if lora:
        _assert_same_weights(_weights(got, "adapter"), _weights(ref, "adapter"), WEIGHT_TOL)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pp"))
    return tmp, write_tiny_checkpoint(os.path.join(tmp, "ckpt"), "qwen3", tie=False, num_layers=4)


@pytest.fixture(scope="module")
def two_rank_runs(ckpt):
    tmp, path = ckpt
    scenarios = ["2x1x1-1f1b", "2x1x1-gpipe-lora-resume", "2x1x1-interleaved_1f1b-ac", "2x1x1-looped_bfs"]
    torchrun(2, [WORKER, tmp, path, *scenarios], timeout=400)
    return tmp, {"full": _reference(tmp, path, False), "lora": _reference(tmp, path, True)}


@pytest.mark.parametrize("scenario", ["2x1x1-1f1b", "2x1x1-interleaved_1f1b-ac", "2x1x1-looped_bfs"])
def test_pp2_full_matches_single_device(two_rank_runs, scenario):
    tmp, refs = two_rank_runs
    _check_run(tmp, scenario, refs["full"], lora=False)


def test_pp2_lora_gpipe_resume_matches_single_device(two_rank_runs):
    tmp, refs = two_rank_runs
    run_dir = os.path.join(tmp, "2x1x1-gpipe-lora-resume")
    # the resumed run checkpoints its last step too (keep_last_checkpoints=1); metrics.jsonl is appended to, so
    # one row per step means steps 3-4 came from the run resumed at step 2 (a fresh run would log 1-2 again)
    assert sorted(os.listdir(os.path.join(run_dir, "dcp"))) == ["step_4"]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    _check_run(tmp, "2x1x1-gpipe-lora-resume", refs["lora"], lora=True)


@pytest.mark.slow
def test_pp2_with_fsdp2_and_tp2_four_ranks(ckpt):
    tmp, path = ckpt
    scenarios = ["2x2x1-1f1b", "2x2x1-1f1b-lora", "2x1x2-1f1b", "2x1x2-gpipe-lora"]
    torchrun(4, [WORKER, tmp, path, *scenarios], timeout=600)
    for scenario in scenarios:
        lora = "lora" in scenario
        _check_run(tmp, scenario, _reference(tmp, path, lora), lora)


# ---- pieces ---------------------------------------------------------------------------------------
def test_balanced_split_minimises_the_heaviest_stage():
    # brute force over all cut points as the independent reference
    import itertools

    weights, first, last = [5, 1, 1, 1, 9, 2, 2, 3], 6, 4
    for n in (2, 3, 4):
        got = balanced_split(weights, n, first, last)
        assert [r.start for r in got] == [0, *[r.start for r in got[1:]]] and got[-1].stop == len(weights)
        assert all(len(r) >= 1 for r in got)

        def worst(cuts):
            b = [0, *cuts, len(weights)]
            return max(
                sum(weights[b[k] : b[k + 1]]) + (first if k == 0 else 0) + (last if k == n - 1 else 0) for k in range(n)
            )

        best = min(worst(c) for c in itertools.combinations(range(1, len(weights)), n - 1))
        assert worst([r.start for r in got[1:]]) == best


def test_pack_microbatch_keeps_labelled_positions_and_fixed_shape():
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = torch.tensor([[-100, 6, 7, -100], [-100, -100, 11, -100]])
    out = pack_microbatch({"tokens": tokens, "labels": labels}, 12, packed=True)
    assert out["tokens"].shape == out["seq_lens"].shape == (1, 12)
    assert out["tokens"][0, :6].tolist() == [5, 6, 7, 9, 10, 11]
    assert out["labels"][0].tolist() == [-100, 6, 7, -100, -100, 11] + [-100] * 6
    assert out["input_pos"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert out["seq_lens"][0, :4].tolist() == [3, 3, 6, 0] and int(out["seq_lens"].sum()) == 12
    padded = pack_microbatch({"tokens": tokens, "labels": labels}, 6, packed=False)
    assert padded["tokens"].shape == (2, 6) and padded["labels"][:, 4:].eq(-100).all()
    with pytest.raises(ValueError, match="pipeline_seq_len"):
        pack_microbatch({"tokens": tokens, "labels": labels}, 5, packed=True)


@pytest.mark.parametrize(
    "kwargs, world, match",
    [
        ({"degree": 8}, 8, "has 4 layers"),
        ({"degree": 2}, 6, "tensor_parallel=3 does not divide"),
        ({"degree": 2, "schedule": "interleaved_1f1b", "microbatches": 4}, 4, "needs 4 stages"),
        ({"degree": 3}, 8, "not divisible by parallelism.pipeline_parallel=3"),
        ({"degree": 2, "microbatches": 1}, 2, "microbatches >= pipeline_parallel"),
        ({"degree": 2, "layers_per_stage": 3}, 2, "does not divide"),
    ],
)
def test_bad_layouts_are_refused_before_any_process_group(ckpt, kwargs, world, match):
    import torch.distributed as dist

    tmp, path = ckpt
    tp = 3 if "tensor_parallel=3" in match else 1
    if "needs 4 stages" in match:  # 2 layers cannot make 2 x 2 interleaved stages
        path = write_tiny_checkpoint(os.path.join(tmp, "ckpt2"), "qwen3", num_layers=2)
    with pytest.raises(ConfigError, match=match):
        check_pipeline_layout(PipelineSettings(**kwargs), world, path, tensor_parallel=tp)
    assert not dist.is_initialized()


def test_tied_embeddings_get_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(str(tmp_path / "tied"), "qwen2", tie=True)
    with pytest.raises(ConfigError, match="pipeline_parallel: 1"):
        check_pipeline_layout(PipelineSettings(degree=2), 2, path)


def test_unknown_schedule_and_stray_keys_are_errors():
    with pytest.raises(ConfigError, match="pipeline_schedule"):
        PipelineSettings(degree=2, schedule="zigzag")
    with pytest.raises(ConfigError, match="only apply with"):
        PipelineSettings(degree=1, microbatches=4)
    with pytest.raises(ConfigError, match="only apply with"):
        PipelineSettings(degree=1, schedule="gpipe")
    with pytest.raises(ConfigError, match="positive integer"):
        PipelineSettings(degree="2")


def test_layers_per_stage_fixes_the_split():
    from tinytune.distributed.pipeline_stages import stage_layer_ranges

    with torch.device("meta"):
        from tinytune.checkpoint.model_info import model_info_from_hf_config
        from tinytune.checkpoint.model_loading import build_model

        model = build_model(
            model_info_from_hf_config(
                {
                    "model_type": "qwen3",
                    "vocab_size": 320,
                    "hidden_size": 32,
                    "intermediate_size": 48,
                    "num_hidden_layers": 8,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "max_position_embeddings": 64,
                    "rms_norm_eps": 1e-5,
                    "rope_theta": 1e4,
                    "tie_word_embeddings": False,
                }
            )
        )
    fixed = stage_layer_ranges(model, PipelineSettings(degree=2, schedule="interleaved_1f1b", layers_per_stage=2))
    assert fixed == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # balanced: the big embedding (320 x 32) and head weigh on the end stages, so they get fewer layers
    balanced = stage_layer_ranges(model, PipelineSettings(degree=4))
    assert [len(r) for r in balanced] == [1, 3, 3, 1]


def test_recipe_refuses_a_bad_layout_before_creating_a_process_group(ckpt, tmp_path):
    import torch.distributed as dist

    from recipes.full_finetune_distributed import recipe_main

    _, path = ckpt
    cfg = pp_cfg(str(tmp_path / "run"), path, lora=False, pp=2)  # plain python: one process
    with pytest.raises(ConfigError, match="1 processes are not divisible by parallelism.pipeline_parallel=2"):
        recipe_main(OmegaConf.create(cfg))
    assert not dist.is_initialized()


def test_stage_lora_init_follows_lora_init(tmp_path):
    """The pipeline draws every adapter of the whole model up front; lora_init: gaussian must draw N(0, 1/r),
    the same values as the module's own init in module order (as one process loads them)."""
    from tinytune.checkpoint.model_info import read_model_info
    from tinytune.checkpoint.model_loading import build_model
    from tinytune.config.recipe_settings import LoRASettings
    from tinytune.distributed.pipeline import _lora_init_values
    from tinytune.models.lora_builders import lora_factory

    info = read_model_info(write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False))
    factory = lora_factory(LoRASettings(lora_init="gaussian", lora_rank=4))
    with torch.device("meta"):
        model = build_model(info, factory)
    torch.manual_seed(0)
    got = _lora_init_values(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_lora_parameters"):
            m.reset_lora_parameters()
    want = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    a = torch.cat([v.flatten() for k, v in got.items() if k.endswith("lora_a.weight")])
    assert float(a.std()) == pytest.approx(1 / 4, rel=0.1)  # N(0, 1/r), not Kaiming-uniform
