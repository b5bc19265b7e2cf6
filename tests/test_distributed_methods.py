"""SFT training methods in the distributed recipes vs the single-device recipes (2 ranks, gloo, CPU).

One torchrun launch runs every scenario of ``tests/dist_workers/methods_worker.py`` (tiny Qwen3, fp32);
each reference is ``full_finetune`` / ``lora_finetune`` on the same config with the global batch, run
in this process. LoRA+, DoRA and PiSSA train on 2 data-parallel ranks (FSDP), NEFTune on 2
tensor-parallel ranks (the same batch on both, so the same noise as one device) and on 2
data-parallel ranks with lr 0 (noise on in training, off in validation).
"""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.dist_workers.launch import REPO, torchrun
from tests.dist_workers.methods_worker import SCENARIOS, scenario_cfg
from tests.dist_workers.tiny_checkpoint import write_tiny_checkpoint

TOL = 1e-5
DEFAULT = [
    "lora_loraplus",
    "lora_dora",
    "lora_pissa",
    "full_neftune_tp_sp",
    "lora_neftune_lr0",
    "full_early_stop",
    "full_early_stop_pp",
    "full_early_stop_resume",
]
SLOW = ["lora_save_best", "lora_dora_offload", "lora_pissa_tp", "lora_neftune_tp", "full_neftune_lr0"]


def _rows(run_dir, key):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


def _weights(run_dir, sub):
    folder = os.path.join(run_dir, sub)
    return {
        k: v
        for f in sorted(os.listdir(folder))
        if f.endswith(".safetensors")
        for k, v in load_file(os.path.join(folder, f)).items()
    }


def _assert_same_weights(a, b, atol=1e-4):
    assert sorted(a) == sorted(b)
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] < atol, worst


def _single_device(tmp, ckpt, name, **overrides):
    """The single-device recipe on scenario ``name``'s config (batch = the global micro-batch)."""
    from recipes.full_finetune import recipe_main as full_main
    from recipes.lora_finetune import recipe_main as lora_main

    out = os.path.join(tmp, "ref", name + "".join(f"_{k}" for k in overrides))
    cfg = scenario_cfg(name, out, ckpt, dp=1)
    for key in ("parallelism", "fsdp", "plot_loss"):  # distributed-only keys: the single-device recipes refuse them
        del cfg[key]
    cfg.update(overrides)
    (lora_main if SCENARIOS[name][0] else full_main)(OmegaConf.create(cfg))
    return out


def _launch(tmp, ckpt, names):
    torchrun(2, [str(REPO / "tests/dist_workers/methods_worker.py"), tmp, ckpt, *names], timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_methods"))
    ckpt = write_tiny_checkpoint(os.path.join(tmp, "ckpt"), "qwen3", tie=False)
    _launch(tmp, ckpt, DEFAULT)
    return tmp, ckpt


def _assert_matches_single_device(tmp, ckpt, name, exports=("hf_model",)):
    ref = _single_device(tmp, ckpt, name)
    got = os.path.join(tmp, name)
    assert _rows(got, "loss") == pytest.approx(_rows(ref, "loss"), abs=TOL)
    assert _rows(got, "val_loss") == pytest.approx(_rows(ref, "val_loss"), abs=TOL)
    for sub in exports:
        _assert_same_weights(_weights(got, sub), _weights(ref, sub))
    return got, ref


def test_loraplus_matches_single_device(runs):
    tmp, ckpt = runs
    got, ref = _assert_matches_single_device(tmp, ckpt, "lora_loraplus", ("adapter", "hf_model"))
    # the ratio matters: without it the run differs
    plain = _single_device(tmp, ckpt, "lora_loraplus", loraplus_lr_ratio=None)
    assert _rows(plain, "loss")[4] != pytest.approx(_rows(got, "loss")[4], abs=1e-4)


def test_loraplus_param_groups_on_sharded_params(tmp_path):
    """The optimizer groups of a sharded (DTensor) LoRA model: B matrices at lr x ratio, nothing else."""
    from torch.distributed.tensor import DTensor

    from tinytune.config.recipe_settings import LoRAFinetuneDistributedSettings, LoRASettings
    from tinytune.distributed.mesh import ParallelDims, build_device_mesh, process_group
    from tinytune.distributed.sharded_model import load_hf_model_sharded
    from tinytune.models.lora_builders import lora_factory
    from tinytune.modules.peft import set_trainable_params
    from tinytune.training import build_optimizer_and_scheduler

    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False)
    cfg = scenario_cfg("lora_loraplus", str(tmp_path / "out"), ckpt, dp=1)
    s = LoRAFinetuneDistributedSettings.from_config(OmegaConf.create(cfg))
    with process_group("cpu") as info:
        mesh = build_device_mesh(ParallelDims.from_config(info.world_size), "cpu")
        lora = LoRASettings.from_node(s.model)
        model, _ = load_hf_model_sharded(
            ckpt, mesh, torch.device("cpu"), linear_factory=lora_factory(lora), trainable=set_trainable_params
        )
        optimizer, _ = build_optimizer_and_scheduler(s.optim, model.named_parameters(), 4, s.loraplus_lr_ratio)
        names = {id(p): n for n, p in model.named_parameters()}
        by_lr = {}
        for g in optimizer.param_groups:  # initial_lr: before the warmup scales it
            by_lr.setdefault(g["initial_lr"], set()).update(names[id(p)] for p in g["params"])
        assert all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    base_lr = cfg["optimizer"]["lr"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fast = {n for n in trainable if n.endswith("lora_b.weight")}
    assert by_lr == {base_lr: trainable - fast, base_lr * 8.0: fast}
    assert fast and trainable - fast


@pytest.mark.parametrize("name", ["lora_dora", "lora_pissa"])
def test_dora_and_pissa_match_single_device(runs, name):
    tmp, ckpt = runs
    got, _ = _assert_matches_single_device(tmp, ckpt, name, ("adapter", "hf_model"))
    config = json.load(open(os.path.join(got, "adapter", "adapter_config.json")))
    if name == "lora_dora":
        assert config["use_dora"] and any(k.endswith("lora_magnitude_vector") for k in _weights(got, "adapter"))
    else:  # exported as peft's PiSSA -> LoRA conversion: rank 2r
        assert config["r"] == 2 * 4 and config["use_rslora"]


def test_neftune_tensor_parallel_matches_single_device(runs):
    """Tensor + sequence parallel: the embedding output is a sequence-sharded DTensor; same noise as one device."""
    tmp, ckpt = runs
    got, _ = _assert_matches_single_device(tmp, ckpt, "full_neftune_tp_sp")
    clean = _single_device(tmp, ckpt, "full_neftune_tp_sp", neftune_noise_alpha=None)
    assert _rows(clean, "loss")[1] != pytest.approx(_rows(got, "loss")[1], abs=1e-4)  # the noise is on


def test_neftune_noise_in_training_only(runs):
    """lr 0 on 2 data-parallel ranks: the noise moves the training loss, validation sees clean embeddings."""
    tmp, ckpt = runs
    got = os.path.join(tmp, "lora_neftune_lr0")
    clean = _single_device(tmp, ckpt, "lora_neftune_lr0", neftune_noise_alpha=None)
    noisy, plain = _rows(got, "loss"), _rows(clean, "loss")
    assert all(noisy[k] != pytest.approx(plain[k], abs=1e-4) for k in plain)
    assert _rows(got, "val_loss") == pytest.approx(_rows(clean, "val_loss"), abs=TOL)


@pytest.mark.parametrize("name", ["full_early_stop", "full_early_stop_pp"])  # FSDP on 2 ranks; 2 pipeline stages
def test_early_stopping_and_save_best(runs, name):
    tmp, ckpt = runs
    got, ref = _assert_matches_single_device(tmp, ckpt, name)
    summary = json.load(open(os.path.join(got, "summary.json")))
    assert summary["step"] == 3 and summary["stopped_early"] and summary["best_step"] == 1
    # hf_model/ is step 1: a 1-step run exports the same weights
    one = _single_device(tmp, ckpt, name, max_steps=1, early_stopping=None, save_best=False)
    _assert_same_weights(_weights(got, "hf_model"), _weights(one, "hf_model"))


def test_early_stopping_state_survives_a_dcp_resume(runs):
    """Stopped after step 1 (the best step) and resumed: same stop, best step and export as one process uninterrupted."""
    tmp, ckpt = runs
    got, _ = _assert_matches_single_device(tmp, ckpt, "full_early_stop_resume")
    rows = [json.loads(line) for line in open(os.path.join(got, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # steps 2-4 from the resumed run
    summary = json.load(open(os.path.join(got, "summary.json")))
    assert summary["step"] == 4 and summary["stopped_early"] and summary["best_step"] == 1


def test_save_best_resume_past_the_best_step_is_refused(tmp_path):
    """The kept shards are not in DCP checkpoints: resuming after the best step with save_best is an error
    (plain python: a one-process group)."""
    from recipes.full_finetune_distributed import recipe_main
    from tinytune.errors import ResumeError

    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False)
    cfg = scenario_cfg("full_early_stop_resume", str(tmp_path / "run"), ckpt, dp=1)
    recipe_main(OmegaConf.create(dict(cfg, stop_after_steps=2, checkpoint_every_n_steps=0)))
    with pytest.raises(
        ResumeError, match=r"save_best: the best validation step \(1\) lies before the resumed step \(2\)"
    ):
        recipe_main(OmegaConf.create(cfg))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_methods_slow"))
    ckpt = write_tiny_checkpoint(os.path.join(tmp, "ckpt"), "qwen3", tie=False)
    _launch(tmp, ckpt, SLOW)
    return tmp, ckpt


@pytest.mark.slow
def test_save_best_lora_exports_best_step(slow_runs):
    tmp, ckpt = slow_runs
    got, ref = _assert_matches_single_device(tmp, ckpt, "lora_save_best", ("adapter", "hf_model"))
    summary = json.load(open(os.path.join(got, "summary.json")))
    vals = _rows(got, "val_loss")
    best = min(vals, key=vals.get)
    assert summary["best_step"] == best and summary["best_val_loss"] == pytest.approx(vals[best], abs=TOL)
    assert best != max(vals) and not summary["stopped_early"]  # the export really goes back
    assert json.load(open(os.path.join(ref, "summary.json")))["best_step"] == best


@pytest.mark.slow
def test_more_parallel_layouts(slow_runs):
    """DoRA with FSDP CPU offload and activation checkpointing; PiSSA and NEFTune with tensor parallelism (both with save_best);
    full fine-tuning with NEFTune at lr 0 on 2 data-parallel ranks."""
    tmp, ckpt = slow_runs
    _assert_matches_single_device(tmp, ckpt, "lora_dora_offload", ("adapter", "hf_model"))
    _assert_matches_single_device(tmp, ckpt, "lora_pissa_tp", ("adapter", "hf_model"))
    _assert_matches_single_device(tmp, ckpt, "lora_neftune_tp", ("adapter", "hf_model"))
    clean = _single_device(tmp, ckpt, "full_neftune_lr0", neftune_noise_alpha=None)
    got = os.path.join(tmp, "full_neftune_lr0")
    assert _rows(got, "val_loss") == pytest.approx(_rows(clean, "val_loss"), abs=TOL)
    assert _rows(got, "loss")[1] != pytest.approx(_rows(clean, "loss")[1], abs=1e-4)


def test_refused_combinations():
    """DoRA with tensor parallelism, the new keys with pipeline parallelism: settings errors (also in
    ``tune validate``), before any process group or model load."""
    from recipes.full_finetune_distributed import recipe_main as full_main
    from recipes.lora_finetune_distributed import recipe_main as lora_main
    from tinytune.config import ConfigError
    from tinytune.config.recipe_settings import LoRAFinetuneDistributedSettings

    cfg = scenario_cfg("lora_dora", "/nonexistent/out", "/nonexistent/ckpt", dp=1)
    cfg["parallelism"]["tensor_parallel"] = 2
    with pytest.raises(ConfigError, match="use_dora.*tensor_parallel"):
        LoRAFinetuneDistributedSettings.from_config(OmegaConf.create(cfg))
    with pytest.raises(ConfigError, match="use_dora.*tensor_parallel"):
        lora_main(OmegaConf.create(cfg))
    cfg = scenario_cfg("lora_pissa", "/nonexistent/out", "/nonexistent/ckpt", dp=1)
    cfg["parallelism"]["pipeline_parallel"] = 2
    with pytest.raises(ConfigError, match="pissa: not supported with parallelism.pipeline_parallel"):
        lora_main(OmegaConf.create(cfg))
    cfg = scenario_cfg("full_early_stop", "/nonexistent/out", "/nonexistent/ckpt", dp=1)
    cfg.update(neftune_noise_alpha=5.0)
    cfg["parallelism"]["pipeline_parallel"] = 2
    with pytest.raises(ConfigError, match="neftune_noise_alpha: not supported with parallelism.pipeline_parallel"):
        full_main(OmegaConf.create(cfg))
