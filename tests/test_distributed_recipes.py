"""Distributed recipes on CPU/gloo vs the single-device recipes on the same global batches.

One torchrun launch runs several scenarios in one process group (process start-up dominates on
a small box); the references are ``full_finetune`` / ``lora_finetune`` run in this process with
the global batch size. Every run: tiny Qwen3 checkpoint (fp32), 4 AdamW steps, cosine schedule,
gradient clipping, 2 accumulation micro-steps, global batch 4.
"""

import json
import os

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.dist_workers.launch import REPO, torchrun
from tests.dist_workers.recipe_worker import base_cfg
from tests.dist_workers.tiny_checkpoint import write_tiny_checkpoint

TOL = 1e-5


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
    """Single-device recipe with batch_size = the distributed global micro-batch (2 x 2 = 4 per step)."""
    if lora:
        from recipes.lora_finetune import recipe_main
    else:
        from recipes.full_finetune import recipe_main
    out = os.path.join(tmp, "ref_lora" if lora else "ref")
    cfg = base_cfg(out, ckpt, dp=1, tp=1, lora=lora)
    for key in ("parallelism", "fsdp", "plot_loss"):  # distributed-only keys: the single-device recipes refuse them
        del cfg[key]
    recipe_main(OmegaConf.create(cfg))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_recipes"))
    ckpt = write_tiny_checkpoint(os.path.join(tmp, "ckpt"), "qwen3", tie=False)
    torchrun(
        2,
        [
            str(REPO / "tests/dist_workers/recipe_worker.py"),
            tmp,
            ckpt,
            "fsdp",
            "fsdp_offload_resume",
            "tp_sp_lossparallel",
            "lora_fsdp_ac",
            "lora_tp",
            "fsdp_epochs_resume",
        ],
        timeout=300,
    )
    refs = {"full": _reference(tmp, ckpt, lora=False), "lora": _reference(tmp, ckpt, lora=True)}
    from recipes.full_finetune import recipe_main

    cfg = base_cfg(os.path.join(tmp, "ref_epochs"), ckpt, dp=1, tp=1, lora=False)
    cfg.update(max_steps=0, epochs=2, dataset=dict(cfg["dataset"], n=23))
    for key in ("parallelism", "fsdp", "plot_loss"):
        del cfg[key]
    recipe_main(OmegaConf.create(cfg))
    refs["epochs"] = os.path.join(tmp, "ref_epochs")
    return tmp, refs


def test_fsdp_matches_single_device_and_hf_export(runs):
    tmp, refs = runs
    ref = _losses(refs["full"])
    assert list(ref) == [1, 2, 3, 4] and ref[4] != ref[1]
    got = _losses(os.path.join(tmp, "fsdp"))
    assert got == pytest.approx(ref, abs=TOL)
    ref_val = _losses(refs["full"], "val_loss")
    assert list(ref_val) == [2, 4]
    assert _losses(os.path.join(tmp, "fsdp"), "val_loss") == pytest.approx(ref_val, abs=TOL)
    _assert_same_weights(_weights(os.path.join(tmp, "fsdp"), "hf_model"), _weights(refs["full"], "hf_model"), 1e-4)
    # the export is a loadable HF directory with the tokenizer copied next to it
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(os.path.join(tmp, "fsdp", "hf_model")))


def test_dcp_resume_matches_uninterrupted(runs):
    tmp, refs = runs
    run_dir = os.path.join(tmp, "fsdp_offload_resume")  # also: FSDP CPU offload
    ckpts = sorted(os.listdir(os.path.join(run_dir, "dcp")))
    # the resumed run checkpoints its last step too (as the single-device recipes do); keep_last_checkpoints=1
    assert ckpts == ["step_4"] and os.path.isfile(os.path.join(run_dir, "dcp", "step_4", "COMPLETE"))
    got = _losses(run_dir)  # steps 1-2 from the first run, 3-4 from the resumed one
    assert got == pytest.approx(_losses(os.path.join(tmp, "fsdp")), abs=TOL)
    assert got == pytest.approx(_losses(refs["full"]), abs=TOL)
    _assert_same_weights(_weights(run_dir, "hf_model"), _weights(os.path.join(tmp, "fsdp"), "hf_model"), 1e-6)


def test_resume_at_epoch_boundary_matches_two_epoch_run(runs):
    tmp, refs = runs
    ref = _losses(refs["epochs"])
    assert list(ref) == list(range(1, 9))  # 16 samples / global batch 4 = 4 steps per epoch, 2 epochs
    got = _losses(os.path.join(tmp, "fsdp_epochs_resume"))  # stopped after step 4, resumed into epoch 1
    assert got == pytest.approx(ref, abs=TOL)
    assert _losses(os.path.join(tmp, "fsdp_epochs_resume"), "epoch") == {
        **{i: 0 for i in range(1, 5)},
        **{i: 1 for i in range(5, 9)},
    }


def test_tensor_parallel_with_sequence_and_loss_parallel_matches(runs):
    tmp, refs = runs
    assert _losses(os.path.join(tmp, "tp_sp_lossparallel")) == pytest.approx(_losses(refs["full"]), abs=TOL)
    assert _losses(os.path.join(tmp, "tp_sp_lossparallel"), "val_loss") == pytest.approx(
        _losses(refs["full"], "val_loss"), abs=TOL
    )
    _assert_same_weights(
        _weights(os.path.join(tmp, "tp_sp_lossparallel"), "hf_model"), _weights(refs["full"], "hf_model"), 1e-4
    )


@pytest.mark.parametrize("scenario", ["lora_fsdp_ac", "lora_tp"])  # _ac: activation checkpointing
def test_lora_matches_single_device(runs, scenario):
    tmp, refs = runs
    ref = _losses(refs["lora"])
    assert _losses(os.path.join(tmp, scenario)) == pytest.approx(ref, abs=TOL)
    _assert_same_weights(_weights(os.path.join(tmp, scenario), "adapter"), _weights(refs["lora"], "adapter"), 1e-4)
    _assert_same_weights(_weights(os.path.join(tmp, scenario), "hf_model"), _weights(refs["lora"], "hf_model"), 1e-4)


@pytest.mark.slow
def test_fsdp_plus_tp_four_ranks(tmp_path):
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen2", tie=True)
    torchrun(
        4,
        [str(REPO / "tests/dist_workers/recipe_worker.py"), str(tmp_path), ckpt, "fsdp_tp", "lora_fsdp_tp_sp"],
        timeout=300,
    )
    ref, ref_lora = _reference(str(tmp_path), ckpt, lora=False), _reference(str(tmp_path), ckpt, lora=True)
    assert _losses(str(tmp_path / "fsdp_tp")) == pytest.approx(_losses(ref), abs=TOL)
    assert _losses(str(tmp_path / "lora_fsdp_tp_sp")) == pytest.approx(_losses(ref_lora), abs=TOL)
    _assert_same_weights(_weights(str(tmp_path / "fsdp_tp"), "hf_model"), _weights(ref, "hf_model"), 1e-4)


def test_plain_python_single_process_run(runs, tmp_path):
    """Without torchrun the recipe makes a one-process group and trains like full_finetune."""
    import torch.distributed as dist

    from recipes.full_finetune_distributed import recipe_main

    tmp, refs = runs
    cfg = base_cfg(str(tmp_path / "single"), os.path.join(tmp, "ckpt"), dp=1, tp=1, lora=False)
    summary = recipe_main(OmegaConf.create(cfg))
    assert not dist.is_initialized()  # the recipe tears down the group it created
    assert summary["world_size"] == 1
    assert _losses(str(tmp_path / "single")) == pytest.approx(_losses(refs["full"]), abs=TOL)
    assert summary["val_loss"] == pytest.approx(_losses(refs["full"], "val_loss")[4], abs=TOL)


@pytest.mark.gpu
def test_cuda_nccl_bf16_run_tracks_fp32_reference(tmp_path):
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False)
    torchrun(
        1, [str(REPO / "tests/dist_workers/recipe_worker.py"), str(tmp_path), ckpt, "cuda_fsdp"], timeout=300, cuda=True
    )
    ref = _losses(_reference(str(tmp_path), ckpt, lora=False))
    got = _losses(str(tmp_path / "cuda_fsdp"))
    assert got == pytest.approx(ref, abs=0.05)  # bf16 compute vs fp32
