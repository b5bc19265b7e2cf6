"""Activation offloading (``tinytune.training.activation_offloading``).

Gradients with offloading must equal gradients without, bit for bit in fp32 on CPU (the offloaded
bytes come back unchanged, the ops run in the same order), with and without activation
checkpointing, full and LoRA, packed documents included; and the memory must really leave: the
bytes held by the autograd graph after forward (measured with the PyTorch CPU allocator's own
accounting through the profiler) drop by what went to disk.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _recipe_fixtures import tiny_recipe_assets, tiny_sft_config

from tinytune.config import ConfigError
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.modules.peft import lora_linear_factory, set_trainable_params
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.activation_offloading import (
    ActivationOffloader,
    OffloadStats,
    apply_activation_offloading,
    offload_mode,
)
from tinytune.training.losses import sft_loss

CPU = torch.device("cpu")


def _model(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    factory = lora_linear_factory(["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, dropout=0.0)
    model = smollm2_tiny(linear_factory=factory if lora else None)
    if lora:
        for n, p in model.named_parameters():  # non-zero B so adapter gradients flow everywhere
            if "lora_b" in n:
                torch.nn.init.normal_(p, std=0.02)
        set_trainable_params(model)
    return model.train()


def _batch(packed: bool, s: int = 96) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, s), generator=g)
    labels = tokens.clone()
    labels[:, :8] = -100
    batch = {"tokens": tokens, "labels": labels}
    if packed:  # three documents per row, positions restarting at 0 in each
        lens = [40, 30, 26]
        batch["input_pos"] = torch.cat([torch.arange(n) for n in lens]).repeat(2, 1)
        batch["seq_lens"] = torch.tensor([lens, lens])
    return batch


def _grads(model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    sft_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ac", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_disk_offloading_gradients_bit_identical(tmp_path, lora, ac, packed):
    batch = _batch(packed)
    ref_model = _model(lora)
    if ac:
        apply_activation_checkpointing(ref_model)
    model = copy.deepcopy(ref_model)
    assert apply_activation_offloading(model, "disk", CPU, str(tmp_path / "off"), min_bytes=1024) == "disk"
    want, got = _grads(ref_model, batch), _grads(model, batch)
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert os.listdir(tmp_path / "off") == []  # unlinked files: nothing left behind


def _allocations(prof) -> tuple[list[tuple[int, int]], int]:
    """Every CPU allocation (+bytes) and free (-bytes) the profiler saw, in time order, and the
    start time of the ``after_forward`` marker."""
    allocs, marks, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.name == "[memory]":
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        elif ev.name == "after_forward":
            marks.append(ev.start_time_ns)
    return sorted(allocs), marks[0]


def _traced(model, batch, stats: OffloadStats | None, tmp_path):
    """Bytes the CPU allocator holds after forward, and its peak during forward + backward, both
    relative to before the forward (the allocator's own accounting, through the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if stats is not None:
            with ActivationOffloader("disk", keep=[model], offload_dir=str(tmp_path), min_bytes=4096, stats=stats):
                hidden = model(batch["tokens"], return_hidden=True)
        else:
            hidden = model(batch["tokens"], return_hidden=True)
        with torch.profiler.record_function("after_forward"):
            pass
        hidden.float().pow(2).mean().backward()
        del hidden
    allocs, mark = _allocations(prof)
    live, held, peak = 0, None, 0
    for t, n in allocs:
        if held is None and t > mark:
            held = live
        live += n
        peak = max(peak, live)
    return held, peak


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "ckpt"])
def test_disk_offloading_releases_saved_memory(tmp_path, ac):
    model = _model(lora=True)
    if ac:
        apply_activation_checkpointing(model)
    batch = {"tokens": torch.randint(0, 256, (1, 512))}
    held_plain, peak_plain = _traced(model, batch, None, tmp_path)
    stats = OffloadStats()
    held_off, peak_off = _traced(model, batch, stats, tmp_path)
    assert stats.total > 0 and stats.live == 0  # everything written was freed after backward
    assert stats.restored >= stats.total  # and every offloaded storage came back in backward
    # After forward only the returned hidden state stays, with the final norm's input that it pins
    # (its recompute recipe, ``fused_ops.attach_recompute``), plus tensors under the threshold.
    one_hidden = 512 * model.tok_embeddings.weight.shape[1] * 4  # [1, 512, d] fp32
    print(
        f"held after forward {held_plain} -> {held_off} B, peak {peak_plain} -> {peak_off} B, offloaded {stats.total} B"
    )
    assert held_off < 2.5 * one_hidden < held_plain, (held_plain, held_off, one_hidden)
    assert peak_off < peak_plain


def test_small_tensors_and_parameters_stay(tmp_path):
    lin = torch.nn.Linear(512, 512)
    x = torch.randn(4, 512, requires_grad=True)
    stats = OffloadStats()
    with ActivationOffloader("disk", keep=[lin], offload_dir=str(tmp_path), min_bytes=4 * 4 * 512, stats=stats):
        y = lin(x)  # saves x (8 KiB, offloaded) and the weight (a parameter: kept)
        # a view of a parameter (kept); views of x again (deduplicated)
        z = (lin.weight.t() * lin.weight.t()).sum() + (x[:1] * x[:1]).sum()
        small = torch.randn(3, requires_grad=True)
        w = (small * small).sum()  # 12 bytes: below the threshold
    assert stats.total == 4 * 512 * 4  # x once, nothing else
    (y.sum() + z + w).backward()
    assert stats.live == 0
    torch.testing.assert_close(small.grad, 2 * small.detach())


def test_inplace_after_save_is_offloaded_again(tmp_path):
    a = torch.randn(64, 64, requires_grad=True)
    stats = OffloadStats()
    with ActivationOffloader("disk", offload_dir=str(tmp_path), min_bytes=0, stats=stats):
        b = a * 2
        c = b.sin()  # saves b (version 0): copied to disk now
        b.detach().add_(1)  # bumps b's version (shared with the detached alias)
        e = b.cos()  # saves b (version 1): a new copy, not the stale bytes of version 0
    assert stats.total == 2 * b.nbytes
    (c + e).sum().backward()
    want = 2 * (torch.cos(2 * a.detach()) - torch.sin(2 * a.detach() + 1))
    torch.testing.assert_close(a.grad, want)


def test_eval_and_no_grad_forward_untouched(tmp_path):
    model = _model(lora=False)
    apply_activation_offloading(model, "disk", CPU, str(tmp_path), min_bytes=0)
    tokens = torch.randint(0, 256, (1, 32))
    model.eval()
    ref = model(tokens)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, atol=0, rtol=0)
    assert offload_mode(False, CPU) is None and apply_activation_offloading(model, False, CPU) is None


def test_setting_values():
    with pytest.raises(ConfigError, match="use activation_offloading: disk"):
        offload_mode(True, CPU)
    with pytest.raises(ConfigError, match="not one of false, true, disk"):
        offload_mode("host", CPU)
    assert offload_mode("disk", CPU) == "disk"
    assert offload_mode(True, torch.device("cuda")) == "pinned"


def test_settings_declared_for_sft_recipes():
    from omegaconf import OmegaConf

    from tinytune.config.recipe_settings import LoRAFinetuneSettings

    base = {
        "output_dir": "/tmp/x",
        "model": {"lora_attn_modules": ["q_proj"]},
        "dataset": {"_component_": "tinytune.datasets.sft_dataset", "source": "x.jsonl"},
    }
    s = LoRAFinetuneSettings.from_config(OmegaConf.create({**base, "activation_offloading": "disk"}))
    assert s.activation_offloading == "disk"
    for bad in ("host", 1):
        with pytest.raises(ConfigError, match="activation_offloading"):
            LoRAFinetuneSettings.from_config(OmegaConf.create({**base, "activation_offloading": bad}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ac", [False, True], ids=["plain", "ckpt"])
def test_pinned_offloading_cuda_streams(ac):
    dev = torch.device("cuda")
    ref_model = _model(lora=True).to(dev)
    if ac:
        apply_activation_checkpointing(ref_model)
    model = copy.deepcopy(ref_model)
    batch = {k: v.to(dev) for k, v in _batch(packed=False, s=2048).items()}
    want = _grads(ref_model, batch)
    torch.cuda.synchronize()
    stats = OffloadStats()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with ActivationOffloader("pinned", keep=[model], min_bytes=1024, stats=stats):
        hidden = model(batch["tokens"], return_hidden=True)
    held = torch.cuda.memory_allocated() - base
    from tinytune.kernels import linear_cross_entropy

    model.zero_grad(set_to_none=True)
    ntok = (batch["labels"] != -100).sum()
    (linear_cross_entropy(hidden, model.output_weight, batch["labels"], reduction="sum") / ntok).backward()
    torch.cuda.synchronize()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    assert stats.total > 0 and stats.live == 0 and stats.restored >= stats.total
    assert held < stats.total  # the graph kept less on the GPU than was moved off it


# ---- the recipes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_assets(tmp_path_factory):
    return tiny_recipe_assets(tmp_path_factory.mktemp("offload_recipes"))


def _recipe(recipe_assets, tmp_path, recipe, name, rc=(0, None), **over):
    import json

    import yaml

    from tinytune.cli.main import main as tune_main

    out = tmp_path / name
    cfg = tiny_sft_config(
        recipe_assets,
        out,
        **{
            "template": "chatml",
            "batch_size": 4,
            "shuffle": False,
            "max_steps": 2,
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "lr_scheduler": {"name": "constant"},
            "metric_loggers": ["jsonl"],
            "activation_checkpointing": True,
            **over,
        },
    )
    if recipe == "lora_finetune":
        cfg["model"] = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0}
        cfg["save_merged"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# recipe: {recipe}\n" + yaml.safe_dump(cfg))
    assert tune_main(["run", recipe, "--config", str(path)]) in rc
    if rc == (2,):
        return None
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_recipes_offload_to_disk_same_losses(recipe_assets, tmp_path, monkeypatch, recipe):
    from tinytune.training import activation_offloading as ao

    stored = []
    original = ao.ActivationOffloader._store
    monkeypatch.setattr(ao, "DEFAULT_MIN_BYTES", 0)  # the tiny model's tensors are all below 1 MiB
    monkeypatch.setattr(ao.ActivationOffloader, "_store", lambda self, flat: stored.append(1) or original(self, flat))
    want = _recipe(recipe_assets, tmp_path, recipe, "plain")
    assert not stored
    got = _recipe(recipe_assets, tmp_path, recipe, "disk", activation_offloading="disk")
    assert stored  # the recipe's forward offloaded the checkpoint inputs
    assert got == want and len(want) == 2


def test_recipe_refuses_pinned_offloading_on_cpu(recipe_assets, tmp_path, capsys):
    _recipe(recipe_assets, tmp_path, "lora_finetune", "pinned", rc=(2,), activation_offloading=True)
    err = capsys.readouterr().err
    assert "config error: activation_offloading: true" in err and "use activation_offloading: disk" in err
