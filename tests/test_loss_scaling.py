"""fp16 dynamic loss scaling (torch.amp.GradScaler) in the shared optimizer step, driven on CPU with
``torch.amp.GradScaler("cpu")``: every check is against a plain fp32 loop written here (no scaler,
``torch.nn.utils.clip_grad_norm_``, ``optimizer.step()``). The recipes' fp16 policy (CPU refused, the
preference and distributed recipes refused) and a CUDA end-to-end run (``gpu``) are at the end."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from _recipe_fixtures import tiny_recipe_assets, tiny_sft_config
from omegaconf import OmegaConf

from tinytune.checkpoint import TrainingCheckpointer
from tinytune.config import ConfigError
from tinytune.models import llama_decoder
from tinytune.training import (
    LossScaler,
    NonFiniteGuard,
    optimizer_step,
    resume_training_state,
    save_training_state,
    sft_accumulate,
    sft_loss,
)

CPU = torch.device("cpu")
INIT_SCALE = 2.0**12


def _model(seed=0):
    torch.manual_seed(seed)
    return llama_decoder(
        vocab_size=96,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        hidden_dim=64,
        max_seq_len=64,
        rope_base=1e4,
        norm_eps=1e-5,
        tie_embeddings=False,
    )


def _windows(n_steps, accum, seed=1):
    """``n_steps`` accumulation windows of ``accum`` micro-batches [2, 12] (a few masked labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        window = []
        for _ in range(accum):
            tokens = torch.randint(0, 96, (2, 12), generator=g)
            labels = torch.randint(0, 96, (2, 12), generator=g)
            labels[:, :3] = -100
            window.append({"tokens": tokens, "labels": labels})
        out.append(window)
    return out


def _opt_sched(model, kind="adamw"):
    """AdamW, or SGD: Adam's update hardly depends on the gradients' scale (m / sqrt(v)), SGD's is
    proportional to it, so a scale left in (or applied twice) shows with SGD."""
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # a visible LR per step
    return opt, sched


def _reference(windows, clip=None, kind="adamw"):
    """Plain fp32: window-normalised loss, backward, clip_grad_norm_, step. Returns (model, norms)."""
    model = _model()
    opt, sched = _opt_sched(model, kind)
    norms = []
    for window in windows:
        n = sum(int((mb["labels"] != -100).sum()) for mb in window)
        for mb in window:
            sft_loss(model, mb, torch.tensor(n)).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, norms


def _scaler(autocast=None, **kw):
    return LossScaler(torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, **kw), "cpu", autocast_dtype=autocast)


def _scaled_run(windows, scaler, clip=None, guard=None, kind="adamw"):
    model = _model()
    opt, sched = _opt_sched(model, kind)
    norms = []
    for i, window in enumerate(windows):
        loss, _ = sft_accumulate(model, window, CPU, padding_free=False, scaler=scaler)
        norms.append(optimizer_step(model, opt, sched, clip, guard=guard, loss=loss, step=i + 1, scaler=scaler))
    return model, opt, sched, norms


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _assert_same_params(a, b, **tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("accum", [1, 3])
def test_scaled_steps_equal_the_unscaled_reference(accum, kind):
    """(a) finite gradients: k scaled steps (loss x 2**12 per micro-batch, unscaled once per optimizer
    step) give the fp32 reference's parameters; a power-of-two scale is exact in fp32."""
    windows = _windows(4, accum)
    ref, _ = _reference(windows, kind=kind)
    scaler = _scaler()
    got, opt, sched, _ = _scaled_run(windows, scaler, kind=kind)
    _assert_same_params(got, ref, atol=1e-6, rtol=1e-5)
    assert scaler.skipped == 0 and scaler.scale == INIT_SCALE
    assert sched.last_epoch == 4


def test_the_scale_grows_after_growth_interval_good_steps():
    scaler = _scaler(growth_interval=2)
    _scaled_run(_windows(4, 1), scaler)
    assert scaler.scale == INIT_SCALE * 4 and scaler.skipped == 0


def test_fp16_autocast_steps_track_the_fp32_reference():
    """The recipes' configuration (fp16 autocast forward, fp32 weights) on CPU: the updates follow the
    fp32 reference's up to fp16 rounding (Adam turns a few near-zero gradients' rounding into full
    steps, so the bound is on the mean difference relative to the mean update)."""
    windows = _windows(3, 2)
    ref, _ = _reference(windows)
    scaler = _scaler(autocast=torch.float16)
    got, *_ = _scaled_run(windows, scaler)
    init, want, have = _flat(_model()), _flat(ref), _flat(got)
    assert (have - want).abs().mean() < 0.02 * (want - init).abs().mean()
    assert all(p.dtype == torch.float32 for p in got.parameters())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_overflow_skips_the_step_halves_the_scale_and_holds_the_schedule(bad, caplog):
    """(b) an inf/NaN gradient: no parameter or optimizer-state change, scale halved, LR schedule
    not advanced, the skip counted and logged; nan_policy: stop does not fire (an fp16 overflow is
    the scaler's business, not an error)."""
    windows = _windows(3, 2)
    model = _model()
    opt, sched = _opt_sched(model)
    scaler = _scaler()
    guard = NonFiniteGuard("stop")
    loss, _ = sft_accumulate(model, windows[0], CPU, padding_free=False, scaler=scaler)
    optimizer_step(model, opt, sched, 1.0, guard=guard, loss=loss, step=1, scaler=scaler)
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    lr_before = sched.get_last_lr()
    loss, _ = sft_accumulate(model, windows[1], CPU, padding_free=False, scaler=scaler)
    model.layers[0].attn.q_proj.weight.grad[0, 0] = bad  # one overflowed element
    with caplog.at_level(logging.WARNING):
        optimizer_step(model, opt, sched, 1.0, guard=guard, loss=loss, step=2, scaler=scaler)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    state = opt.state_dict()["state"]
    assert all(float(state[i]["step"]) == float(opt_before["state"][i]["step"]) == 1.0 for i in state)
    assert sched.last_epoch == 1 and sched.get_last_lr() == lr_before
    assert scaler.scale == INIT_SCALE / 2 and scaler.skipped == 1 and guard.skipped == 0
    assert "step 2: fp16 gradient overflow" in caplog.text and "1 skipped so far" in caplog.text
    assert all(p.grad is None for p in model.parameters())
    # the next finite step goes through with the halved scale
    loss, _ = sft_accumulate(model, windows[2], CPU, padding_free=False, scaler=scaler)
    optimizer_step(model, opt, sched, 1.0, guard=guard, loss=loss, step=3, scaler=scaler)
    assert sched.last_epoch == 2 and scaler.skipped == 1 and scaler.scale == INIT_SCALE / 2
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_loss_still_goes_to_the_guard():
    """A NaN loss is not an overflow of the scaled gradients: nan_policy decides (skip_step here: the
    LR schedule advances, as without a scaler), and the scaler's state stays consistent."""
    windows = _windows(2, 1)
    model = _model()
    opt, sched = _opt_sched(model)
    scaler = _scaler()
    guard = NonFiniteGuard("skip_step")
    loss, _ = sft_accumulate(model, windows[0], CPU, padding_free=False, scaler=scaler)
    optimizer_step(model, opt, sched, None, guard=guard, loss=float("nan"), step=1, scaler=scaler)
    assert guard.skipped == 1 and scaler.skipped == 0 and sched.last_epoch == 1
    loss, _ = sft_accumulate(model, windows[1], CPU, padding_free=False, scaler=scaler)
    optimizer_step(model, opt, sched, None, guard=guard, loss=loss, step=2, scaler=scaler)  # no "already unscaled"
    assert sched.last_epoch == 2


@pytest.mark.parametrize("accum", [1, 2])
def test_clipping_sees_unscaled_gradients(accum):
    """(c) with an active clip (max norm far below the gradient norm) the returned norm and the
    parameters equal the reference's: clipping saw the unscaled gradients (scaled ones would have a
    norm 4096x larger and a 4096x smaller clip factor)."""
    windows = _windows(3, accum)
    ref, ref_norms = _reference(windows, clip=0.05, kind="sgd")
    got, _, _, norms = _scaled_run(windows, _scaler(), clip=0.05, kind="sgd")
    assert min(ref_norms) > 0.05
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    _assert_same_params(got, ref, atol=1e-6, rtol=1e-5)


class _Stream:
    def state_dict(self):
        return {"pos": 0}

    def load_state_dict(self, state):
        pass


def test_checkpoint_round_trip_restores_the_scale(tmp_path):
    """(d) the scaler's state (scale, growth tracker, skip count) goes into the training checkpoint and
    comes back on resume; a checkpoint without it is refused for an fp16 run."""
    model = _model()
    opt, sched = _opt_sched(model)
    scaler = _scaler(growth_interval=3)
    windows = _windows(3, 1)
    for i, window in enumerate(windows):
        loss, _ = sft_accumulate(model, window, CPU, padding_free=False, scaler=scaler)
        if i == 0:
            model.norm.weight.grad[0] = float("inf")
        optimizer_step(model, opt, sched, None, loss=loss, step=i + 1, scaler=scaler)
    assert scaler.skipped == 1 and scaler.scale == INIT_SCALE / 2
    ckpt = TrainingCheckpointer(str(tmp_path / "ckpt"), keep_last=2)
    kw = dict(optimizer=opt, lr_scheduler=sched, stream=_Stream())
    save_training_state(ckpt, 3, {"model": model.state_dict()}, stateful={"loss_scaler": scaler}, **kw)

    fresh = _scaler(growth_interval=3)
    model2 = _model(seed=5)
    opt2, sched2 = _opt_sched(model2)
    kw2 = dict(model=model2, weights_key="model", optimizer=opt2, lr_scheduler=sched2, stream=_Stream())
    step = resume_training_state(ckpt, "auto", stateful={"loss_scaler": fresh}, **kw2)
    assert step == 3 and fresh.scale == INIT_SCALE / 2 and fresh.skipped == 1
    assert fresh.scaler.state_dict() == scaler.scaler.state_dict()  # growth tracker included
    # one more good step grows both the same way (tracker restored: 2 good steps so far + 1 = interval)
    for s_, m_, o_, sc_ in ((scaler, model, opt, sched), (fresh, model2, opt2, sched2)):
        loss, _ = sft_accumulate(m_, windows[0], CPU, padding_free=False, scaler=s_)
        optimizer_step(m_, o_, sc_, None, loss=loss, step=4, scaler=s_)
    assert fresh.scale == scaler.scale == INIT_SCALE

    save_training_state(ckpt, 4, {"model": model.state_dict()}, **kw)  # a run without fp16
    with pytest.raises(Exception, match="holds no loss_scaler state"):
        resume_training_state(ckpt, "auto", stateful={"loss_scaler": _scaler()}, **kw2)


# ---- the recipes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_recipe_assets(tmp_path_factory.mktemp("fp16"))


def _cfg(assets, out, **over):
    cfg = tiny_sft_config(
        assets,
        out,
        dtype="fp16",
        model={"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0},
        batch_size=2,
        gradient_accumulation_steps=2,
        shuffle=False,
        max_steps=6,
        optimizer={"name": "adamw", "lr": 3e-3},
        clip_grad_norm=1.0,
        metric_loggers=["jsonl"],
        log_every_n_steps=1,
    )
    cfg.update(over)
    return OmegaConf.create(cfg)


@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_fp16_on_cpu_is_a_clear_config_error(assets, tmp_path, recipe):
    import importlib

    main = importlib.import_module(f"recipes.{recipe}").recipe_main
    over = {"model": None} if recipe == "full_finetune" else {}
    with pytest.raises(ConfigError, match=r"dtype: fp16 trains with dynamic loss scaling .* on cpu use bf16 or fp32"):
        main(_cfg(assets, tmp_path / "out", **over))
    assert not (tmp_path / "out").exists()


def test_fp16_in_a_recipe_without_loss_scaling_is_refused(assets, tmp_path):
    from recipes.dpo import recipe_main

    cfg = _cfg(assets, tmp_path / "out", dataset={"_component_": "tinytune.datasets.preference_dataset"})
    with pytest.raises(ConfigError, match="dtype: fp16 needs loss scaling, which only the single-device SFT recipes"):
        recipe_main(cfg)


def _fp16_recipe_runs(assets, tmp_path, recipe, device):
    """An fp16 run of 6 steps (accumulation 2, clipping), and the same run stopped after 3 and
    resumed; returns both summaries and the first run's logged losses."""
    import importlib
    import json

    main = importlib.import_module(f"recipes.{recipe}").recipe_main
    over = {"device": device, "checkpoint_every_n_steps": 3}
    if recipe == "full_finetune":
        over.update(model=None, optimizer={"name": "adamw", "lr": 3e-4})
    summary = main(_cfg(assets, tmp_path / "a", **over))
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    state = TrainingCheckpointer(str(tmp_path / "a" / "checkpoints")).load_latest()
    assert state["step"] == 6 and state["loss_scaler"]["skipped"] == summary["fp16_overflow_skipped_steps"]
    main(_cfg(assets, tmp_path / "b", stop_after_steps=3, **over))
    resumed = main(_cfg(assets, tmp_path / "b", resume_from_checkpoint="auto", **over))
    assert resumed["fp16_overflow_skipped_steps"] == summary["fp16_overflow_skipped_steps"]
    return summary, resumed, losses, state


@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_fp16_recipe_wiring_on_cpu(assets, tmp_path, monkeypatch, recipe):
    """The recipes' fp16 path on CPU with the CUDA-only policy lifted: fp32 weights, fp16 autocast,
    a CPU GradScaler whose first scale (2**24) overflows, so the run skips steps (counted, in the
    checkpoint), recovers and trains; a resumed run ends exactly like the uninterrupted one."""
    import importlib

    from tinytune.device import set_seed

    mod = importlib.import_module(f"recipes.{recipe}")
    monkeypatch.setattr(mod, "setup_device", lambda hw, **kw: (CPU, torch.float32, set_seed(hw.seed)))
    monkeypatch.setattr(
        mod, "fp16_loss_scaler", lambda name, device: LossScaler(torch.amp.GradScaler("cpu", init_scale=2.0**24), "cpu")
    )
    summary, resumed, losses, state = _fp16_recipe_runs(assets, tmp_path, recipe, "cpu")
    assert summary["fp16_overflow_skipped_steps"] >= 1
    assert state["loss_scaler"]["scaler"]["scale"] == 2.0 ** (24 - summary["fp16_overflow_skipped_steps"])
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert resumed["loss"] == summary["loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_fp16_recipe_on_cuda_trains_and_checkpoints_the_scale(assets, tmp_path, recipe):
    """dtype: fp16 on CUDA: fp32 weights, finite and falling loss, the scale in the checkpoint, and a
    resumed run restores it (same final loss as the uninterrupted run)."""
    summary, resumed, losses, state = _fp16_recipe_runs(assets, tmp_path, recipe, "cuda")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    assert state["loss_scaler"]["scaler"]["scale"] > 0
    assert resumed["loss"] == pytest.approx(summary["loss"], rel=1e-3)


def test_fused_lora_linear_under_fp16_autocast():
    """The fused LoRA Function under autocast computes in fp16 like F.linear would, and its gradients
    reach the fp32 adapter weights (fp32 dtype, close to the fp32 eager reference)."""
    from tinytune.kernels.fused_ops import lora_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g)
    w, a, b = (torch.randn(*shape, generator=g) * 0.2 for shape in ((48, 32), (8, 32), (48, 8)))
    a.requires_grad_(True)
    b.requires_grad_(True)
    ref = F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b)
    ref_ga, ref_gb = torch.autograd.grad(ref.square().sum(), (a, b))
    with torch.autocast("cpu", dtype=torch.float16):
        out = lora_linear(x, w, None, a, b, 2.0)
    assert out.dtype == torch.float16
    ga, gb = torch.autograd.grad(out.float().square().sum(), (a, b))
    assert ga.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ga, ref_ga, atol=0.5, rtol=2e-2)
    torch.testing.assert_close(gb, ref_gb, atol=0.5, rtol=2e-2)
