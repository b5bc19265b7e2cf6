"""Reliability and security (issue 16): no silent corruption, no code from files, short clear errors.

Every case runs the real entry point (`tune run ...` in-process, or the library function a
recipe calls) on a tiny model and asserts the exact behaviour: exit code, the message's key
words, and that nothing was written or the previous checkpoint is intact. The fault-injection
tests kill real `tune run` processes with SIGKILL.
"""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from _recipe_fixtures import make_tiny_checkpoint, write_chat_jsonl
from safetensors.torch import load_file, save_file

from tinytune.checkpoint import TrainingCheckpointer, load_hf_model, load_peft_adapter, read_model_info
from tinytune.checkpoint.dcp import DistributedCheckpointer
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.cli.main import main as tune_main
from tinytune.errors import NonFiniteError, ResumeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False, "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(str(root / "tiny_model")),
        "chat": write_chat_jsonl(str(root / "chat.jsonl")),
        "chat2": write_chat_jsonl(str(root / "chat2.jsonl"), n=8),
    }


@pytest.fixture(autouse=True)
def _env(assets, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(assets["root"] / "home"))
    monkeypatch.delenv("TINYTUNE_TRACEBACK", raising=False)


def _cfg(assets, out, **over):
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "dataset": {
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        "model": dict(LORA),
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "shuffle": False,
        "max_steps": 4,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"name": "constant"},
        "metric_loggers": ["jsonl"],
        "resume_from_checkpoint": None,
        "save_merged": False,
    }
    cfg.update(over)
    return cfg


def _write_cfg(cfg, path, recipe="lora_finetune"):
    with open(path, "w") as f:
        f.write(f"# recipe: {recipe}\n")
        yaml.safe_dump(cfg, f)
    return str(path)


def _tune(cfg, tmp_path, capsys, recipe="lora_finetune", name="run"):
    """Runs `tune run RECIPE --config <cfg>` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = tune_main(["run", recipe, "--config", _write_cfg(cfg, tmp_path / f"{name}.yaml", recipe)])
    out, err = capsys.readouterr()
    return rc, out, err


def _short(err, max_lines=4):
    """The message lines of stderr (progress-bar redraws left out): few, and no traceback."""
    lines = [seg for seg in re.split(r"[\r\n]", err) if seg.strip() and "%|" not in seg]
    assert "Traceback" not in err and 1 <= len(lines) <= max_lines, err
    return "\n".join(lines)


def _strict_rows(path):
    def no_constants(name):
        raise AssertionError(f"{path}: bare {name} in JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f]


def _inject(monkeypatch, at_call, kind):
    """Makes the `at_call`-th loss (1-based; one call per step here) NaN, or raise KeyboardInterrupt."""
    import tinytune.training as training
    import tinytune.training.steps as steps

    real, calls = steps.sft_loss, {"n": 0}

    def loss_fn(model, batch, denom):
        calls["n"] += 1
        loss = real(model, batch, denom)
        if calls["n"] == at_call:
            if kind == "interrupt":
                raise KeyboardInterrupt
            return loss * float("nan")
        return loss

    monkeypatch.setattr(steps, "sft_loss", loss_fn)
    monkeypatch.setattr(training, "sft_loss", loss_fn)  # the SFT recipes import it from here (runpy: fresh each run)


def _checkpoints(out):
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


# ---- 1. non-finite values and corrupt checkpoints ----------------------------------------------------


def test_nan_in_base_weights_is_refused_at_load_naming_the_tensor(assets, tmp_path, capsys):
    bad = tmp_path / "nan_model"
    shutil.copytree(assets["ckpt"], bad)
    sd = load_file(bad / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight"
    sd[key][3, 5] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, _, err = _tune(_cfg(assets, out, checkpoint_dir=str(bad)), tmp_path, capsys)
    assert rc == 1
    _short(err)
    assert "layers.1.attn.k_proj.weight" in err and "NaN" in err and "model.safetensors" in err
    assert not os.path.exists(out / "adapter") and _checkpoints(str(out)) == []


def test_nan_loss_stops_the_run_before_the_optimizer_step(assets, tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, at_call=3, kind="nan")
    out = tmp_path / "out"
    rc, _, err = _tune(_cfg(assets, out, checkpoint_every_n_steps=1), tmp_path, capsys)
    assert rc == 1
    _short(err)
    assert "step 3: non-finite loss nan" in err and "nan_policy" in err and "step_2" in err
    assert _checkpoints(str(out)) == ["step_1", "step_2"]  # nothing of step 3 was saved
    assert not os.path.exists(out / "adapter")
    assert [r["step"] for r in _strict_rows(out / "metrics.jsonl")] == [1, 2]


def test_nan_policy_skip_step_counts_and_keeps_optimizer_state_clean(assets, tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, at_call=2, kind="nan")
    out = tmp_path / "out"
    rc, stdout, _ = _tune(_cfg(assets, out, nan_policy="skip_step", checkpoint_every_n_steps=1), tmp_path, capsys)
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    rows = _strict_rows(out / "metrics.jsonl")  # strict JSON: the skipped step's loss is null, not NaN
    assert [r["loss"] is None for r in rows] == [False, True, False, False]
    state = torch.load(out / "checkpoints" / "step_4" / "training_state.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {3.0}  # 4 steps, 1 skipped: Adam never saw the NaN gradients
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())
    assert state["lr_scheduler"]["last_epoch"] == 4  # the schedule advanced through the skipped step


def test_grad_norm_inf_is_caught_even_without_clipping():
    from tinytune.training.steps import NonFiniteGuard, optimizer_step

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="step 7: non-finite gradient norm inf"):
        optimizer_step(model, opt, None, None, guard=NonFiniteGuard("stop"), loss=torch.tensor(1.0), step=7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state
    with pytest.raises(Exception, match="nan_policy: 'ignore' is not one of"):
        NonFiniteGuard("ignore")


def test_metrics_jsonl_writes_null_for_nan(tmp_path):
    from tinytune.training.metric_logging import JSONLLogger

    lg = JSONLLogger(str(tmp_path / "m.jsonl"))
    lg.log_dict({"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1}, 1)
    lg.close()
    row = _strict_rows(tmp_path / "m.jsonl")[0]
    assert row["loss"] is None and row["grad_norm"] is None and row["lr"] == 0.1


def _corrupt(path, n=4000):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(min(n, size // 2)))
    assert os.path.getsize(path) == size


def test_corrupt_checkpoint_falls_back_to_previous_with_warning(assets, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    base = _cfg(assets, out, checkpoint_every_n_steps=1, keep_last_checkpoints=3)
    assert _tune(dict(base, stop_after_steps=3), tmp_path, capsys)[0] == 0
    bad = out / "checkpoints" / "step_3" / "training_state.pt"
    _corrupt(bad)
    # an explicit path to it is refused, naming the file
    rc, _, err = _tune(dict(base, resume_from_checkpoint=str(out / "checkpoints" / "step_3")), tmp_path, capsys)
    assert rc == 1 and "sha256" in _short(err) and str(bad) in err
    # auto skips it with a warning naming the file and resumes from step 2
    rc, stdout, _ = _tune(dict(base, resume_from_checkpoint="auto"), tmp_path, capsys)
    assert rc == 0 and f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in stdout
    assert any(str(bad) in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)


def test_dcp_checkpoint_records_sha256_and_falls_back(tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = DistributedCheckpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpt.save(step, model, opt, {"step": step}, fingerprint={"settings": {"seed": 0}})
    marker = json.loads((ckpt.root / "step_2" / "COMPLETE").read_text())
    assert set(marker["sha256"]) == {".metadata", "__0_0.distcp", "rng_rank0.pt", "trainer_state.json"}
    assert marker["fingerprint"] == {"settings": {"seed": 0}}
    _corrupt(ckpt.root / "step_2" / "__0_0.distcp", n=64)
    assert ckpt.latest() == ckpt.root / "step_1"
    assert any("__0_0.distcp fails its sha256 check" in r.getMessage() for r in caplog.records)
    with pytest.raises(ResumeError, match="corrupt.*__0_0.distcp"):
        ckpt.resolve(str(ckpt.root / "step_2"))
    (ckpt.root / ".step_3.tmp").mkdir()  # a crashed save
    ckpt.clean_leftovers()
    assert not (ckpt.root / ".step_3.tmp").exists()


# ---- 2. checkpoint_dir ------------------------------------------------------------------------------


def test_mistyped_checkpoint_dir_is_an_error_not_the_bundled_model(assets, tmp_path, capsys):
    typo = str(tmp_path / "out" / "hf_modle")
    cfg = {
        "checkpoint_dir": typo,
        "bundled_model": "smollm2-135m-instruct",
        "device": "cpu",
        "prompt": "Hi",
        "template": "chatml",
        "max_new_tokens": 2,
    }
    rc, out, err = _tune(cfg, tmp_path, capsys, recipe="generate")
    assert rc == 2 and f"checkpoint_dir: {typo} does not exist" in _short(err) and out == ""


def test_bundled_model_only_when_checkpoint_dir_is_unset_or_its_default(monkeypatch, tmp_path):
    import tinytune.training.setup as setup_mod
    from tinytune.checkpoint.bundled import tinytune_home
    from tinytune.config.recipe_settings import ModelSourceSettings
    from tinytune.training.setup import resolve_checkpoint_dir

    monkeypatch.setattr(setup_mod, "ensure_bundled", lambda name: f"/bundled/{name}")
    name = "smollm2-135m-instruct"

    def src(**keys):
        return ModelSourceSettings.from_config(keys)

    assert resolve_checkpoint_dir(src(bundled_model=name)) == f"/bundled/{name}"
    default = os.path.join(tinytune_home(), "models", name)  # what the shipped configs name
    assert resolve_checkpoint_dir(src(checkpoint_dir=default, bundled_model=name)) == f"/bundled/{name}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="has no config.json"):
        resolve_checkpoint_dir(src(checkpoint_dir=str(tmp_path / "empty"), bundled_model=name))
    with pytest.raises(Exception, match="does not exist"):
        resolve_checkpoint_dir(src(checkpoint_dir=str(tmp_path / "typo"), bundled_model=name))


# ---- 3. resume belongs to this run ------------------------------------------------------------------


@pytest.fixture
def stopped_run(assets, tmp_path, capsys):
    """A LoRA run stopped after step 2 (checkpoint step_2), and its config."""
    out = tmp_path / "out"
    cfg = _cfg(assets, out, checkpoint_every_n_steps=1)
    assert _tune(dict(cfg, stop_after_steps=2), tmp_path, capsys, name="first")[0] == 0
    return cfg, out


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model": dict(LORA, lora_attn_modules=["o_proj", "v_proj"])}, "only in the checkpoint"),  # same shapes
        ({"model": dict(LORA, lora_rank=8)}, "lora_rank"),
        ({"seed": 1}, "seed: checkpoint 0, this run 1"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(stopped_run, tmp_path, capsys, change, words):
    cfg, out = stopped_run
    before = sorted(os.listdir(out))
    rc, _, err = _tune(dict(cfg, resume_from_checkpoint="auto", **change), tmp_path, capsys)
    assert rc == 1 and "written by a different run" in err and words in err
    assert "resume_from_checkpoint=null" in err and "new output_dir" in err and "Traceback" not in err
    assert len(err.splitlines()) < 10
    assert sorted(os.listdir(out)) == before and _checkpoints(str(out)) == ["step_1", "step_2"]


def test_resume_refuses_other_data(stopped_run, assets, tmp_path, capsys):
    cfg, out = stopped_run
    data = dict(cfg["dataset"], source=assets["chat2"])
    rc, _, err = _tune(dict(cfg, resume_from_checkpoint="auto", dataset=data), tmp_path, capsys)
    assert rc == 1 and "dataset" in err and "different run" in err and not os.path.exists(out / "adapter")


def test_raised_max_steps_extends_the_lr_schedule(assets, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _cfg(assets, out, checkpoint_every_n_steps=2, lr_scheduler={"name": "cosine"})
    assert _tune(cfg, tmp_path, capsys)[0] == 0  # 4 steps, the cosine reaches 0 at its end
    rc, stdout, _ = _tune(dict(cfg, max_steps=8, resume_from_checkpoint="auto"), tmp_path, capsys)
    assert rc == 0 and "at step 4" in stdout
    lr = {r["step"]: r["lr"] for r in _strict_rows(out / "metrics.jsonl") if "lr" in r}
    # first new step: this run's 8-step cosine at step 4 = 0.5 * (1 + cos(pi / 2)) of the base LR
    assert lr[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr[8] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_fingerprint_settings_are_declared_keys_and_nan_policy_is_in_every_training_recipe():
    from tinytune.config.recipe_settings import RECIPE_SETTINGS, TrainSettings
    from tinytune.training.resume_check import TRAJECTORY_KEYS

    training = [cls for cls in RECIPE_SETTINGS.values() if issubclass(cls, TrainSettings)]
    assert len(training) == 7
    declared = {k for cls in training for k in cls.declared_keys()}
    assert [k for k in TRAJECTORY_KEYS if k not in declared] == []  # a fingerprint key nothing reads compares nothing
    for cls in training:
        assert "nan_policy" in cls.declared_keys(), cls.NAME
        assert (
            cls.from_config(
                {
                    "output_dir": "o",
                    "dataset": {"_component_": "tinytune.datasets.chat_dataset"},
                    "nan_policy": "skip_step",
                }
            ).loop.nan_policy
            == "skip_step"
        )
    with pytest.raises(Exception, match="nan_policy"):
        RECIPE_SETTINGS["lora_finetune"].from_config(
            {"output_dir": "o", "nan_policy": "ignore", "dataset": {"_component_": "tinytune.datasets.chat_dataset"}}
        )


def test_lowered_max_steps_below_the_checkpoint_is_refused(stopped_run, tmp_path, capsys):
    cfg, out = stopped_run
    rc, _, err = _tune(dict(cfg, max_steps=1, resume_from_checkpoint="auto"), tmp_path, capsys)
    assert rc == 1 and "is at step 2, past this run's last step 1" in _short(err)
    assert not os.path.exists(out / "adapter")


def test_adapter_weights_load_strictly_with_a_short_error():
    from tinytune.checkpoint.training_state import load_weights_strict
    from tinytune.models import llama_decoder
    from tinytune.modules.peft import get_adapter_state_dict, lora_linear_factory, set_trainable_params

    def build(rank):
        factory = lora_linear_factory({"q_proj", "v_proj"}, rank=rank, alpha=8.0)
        return llama_decoder(
            vocab_size=32,
            dim=16,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            head_dim=8,
            hidden_dim=32,
            max_seq_len=16,
            rope_base=10000.0,
            linear_factory=factory,
        )

    def build_trainable(rank):
        model = build(rank)
        set_trainable_params(model)
        return model

    sd = get_adapter_state_dict(build(4))
    with pytest.raises(
        ResumeError, match=r"4 with another shape .*lora_a.weight: checkpoint \(4, 16\), model \(8, 16\)"
    ):
        load_weights_strict(build_trainable(8), sd, "ckpt/step_2", adapter_only=True)
    with pytest.raises(ResumeError, match="1 missing"):
        load_weights_strict(build_trainable(4), dict(list(sd.items())[1:]), "ckpt/step_2", adapter_only=True)
    with pytest.raises(ResumeError, match="1 unexpected"):
        load_weights_strict(
            build_trainable(4), {**sd, "layers.0.attn.k_proj.lora_a.weight": torch.zeros(4, 16)}, "x", adapter_only=True
        )
    model = build_trainable(4)
    load_weights_strict(model, sd, "x", adapter_only=True)  # the matching adapter loads
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_distributed_resume_checks_fingerprint_and_extends_lr(tmp_path):
    """The DCP path (one-process group, no torchrun): foreign checkpoint refused; raised max_steps extends the LR."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from recipes.full_finetune_distributed import recipe_main
    from tests.dist_workers.recipe_worker import base_cfg
    from tests.dist_workers.tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False)
    out = tmp_path / "dist"
    cfg = dict(base_cfg(str(out), ckpt, dp=1, tp=1, lora=False), validation=None, stop_after_steps=2)
    try:
        recipe_main(OmegaConf.create(cfg))
        marker = json.loads((out / "dcp" / "step_2" / "COMPLETE").read_text())
        assert "trainer_state.json" in marker["sha256"] and marker["fingerprint"]["settings"]["seed"] == 7
        with pytest.raises(ResumeError, match="(?s)different run.*seed: checkpoint 7, this run 8"):
            recipe_main(OmegaConf.create(dict(cfg, seed=8, stop_after_steps=0)))
        if dist.is_initialized():
            dist.destroy_process_group()
        recipe_main(OmegaConf.create(dict(cfg, max_steps=8, stop_after_steps=0)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    lr = {r["step"]: r["lr"] for r in _strict_rows(out / "metrics.jsonl") if "lr" in r}
    # this run's 8-step cosine with 1 warmup step, at step 2 (the first new step is 3)
    assert lr[3] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * (2 - 1) / (8 - 1))))


def test_distributed_recipe_guards_non_finite_loss(tmp_path, monkeypatch):
    """The DCP recipes' loop (one-process group): a NaN loss stops before the optimizer step, or is skipped and counted."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import recipes.lora_finetune_distributed as rec
    from tests.dist_workers.recipe_worker import base_cfg
    from tests.dist_workers.tiny_checkpoint import write_tiny_checkpoint

    real, calls = rec.sft_loss_sum, {"n": 0}

    def loss_fn(model, batch):  # the 3rd micro-batch = step 2 (2 micro-batches per step)
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(rec, "sft_loss_sum", loss_fn)
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), "qwen3", tie=False)
    cfg = dict(
        base_cfg(str(tmp_path / "stop"), ckpt, dp=1, tp=1, lora=True),
        validation=None,
        checkpoint_every_n_steps=1,
        save_merged=False,
        save_adapter=False,
    )
    try:
        with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss nan.*last checkpoint: .*step_1"):
            rec.recipe_main(OmegaConf.create(cfg))
        if dist.is_initialized():
            dist.destroy_process_group()
        calls["n"] = 0
        summary = rec.recipe_main(
            OmegaConf.create(dict(cfg, output_dir=str(tmp_path / "skip"), nan_policy="skip_step"))
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert summary["step"] == 4 and summary["skipped_steps"] == 1 and math.isfinite(summary["loss"])


# ---- 4. explicit builder vs config.json ---------------------------------------------------------------


def test_builder_disagreeing_with_config_json_is_refused(assets, tmp_path, capsys):
    info = read_model_info(assets["ckpt"])
    hp = dict(
        vocab_size=info.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        max_seq_len=256,
        rope_base=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    )
    from tinytune.models import llama_decoder

    load_hf_model(assets["ckpt"], model_builder=lambda: llama_decoder(**hp))  # the matching builder loads
    with pytest.raises(CheckpointError) as e:
        load_hf_model(assets["ckpt"], model_builder=lambda: llama_decoder(**dict(hp, rope_base=500000.0, n_layers=3)))
    msg = str(e.value)
    assert "rope_theta: builder 500000.0, config.json 10000.0" in msg
    assert "num_hidden_layers: builder 3, config.json 2" in msg and "config.json" in msg
    model = {"_component_": "tinytune.models.llama_decoder", **hp, "norm_eps": 1e-6}
    out = tmp_path / "out"
    cfg = {k: v for k, v in _cfg(assets, out, model=model).items() if k != "save_merged"}  # a LoRA-only key
    rc, _, err = _tune(cfg, tmp_path, capsys, recipe="full_finetune")
    assert rc == 1 and "rms_norm_eps: builder 1e-06, config.json 1e-05" in _short(err)
    assert not os.path.exists(out / "hf_model")


# ---- 7. nothing we read runs code -----------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the file `marker` (a visible side effect, no shell)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    torch.save({"x": _Payload(str(marker))}, path)


def test_every_loader_refuses_pickled_code(assets, tmp_path):
    marker = tmp_path / "PWNED"
    # single-device training state (marker digests updated so only weights_only stands in the way)
    ckpt = TrainingCheckpointer(str(tmp_path / "single"))
    path = ckpt.save(1, {"w": torch.zeros(2)})
    _plant(os.path.join(path, "training_state.pt"), marker)
    from tinytune.checkpoint.integrity import directory_manifest

    m = json.loads(open(os.path.join(path, "COMPLETE")).read())
    m.update(directory_manifest(path))
    open(os.path.join(path, "COMPLETE"), "w").write(json.dumps(m))
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load(path)
    # DCP: the RNG file and the trainer state
    model = torch.nn.Linear(2, 2)
    dckpt = DistributedCheckpointer(tmp_path / "dist")
    dpath = dckpt.save(1, model, None, {"step": 1})
    _plant(dpath / "rng_rank0.pt", marker)
    with pytest.raises(CheckpointError, match="rng_rank0.pt: refused"):
        dckpt.load(dpath, model, None)
    (dpath / "rng_rank0.pt").unlink()
    _plant(dpath / "trainer_state.json", marker)
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        dckpt.load(dpath, model, None)
    (dpath / "trainer_state.json").unlink()  # an older checkpoint's pickled trainer_state.pt
    _plant(dpath / "trainer_state.pt", marker)
    with pytest.raises(CheckpointError, match="trainer_state.pt: refused"):
        dckpt.load(dpath, model, None)
    # HF weights as pytorch_model.bin
    hf = tmp_path / "hf_bin"
    shutil.copytree(assets["ckpt"], hf)
    os.remove(hf / "model.safetensors")
    _plant(hf / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read .* weights_only=True"):
        load_hf_model(str(hf))
    # a PEFT adapter as adapter_model.bin (only safetensors adapters are read)
    ad = tmp_path / "adapter"
    ad.mkdir()
    _plant(ad / "adapter_model.bin", marker)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not found"):
        load_peft_adapter(str(ad), read_model_info(assets["ckpt"]))
    assert not marker.exists()


def test_source_tree_has_no_code_loading_calls():
    banned = re.compile(
        r"weights_only\s*=\s*False|pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|(?<![.\w])eval\(|(?<![.\w])exec\("
        r"|trust_remote_code\s*=\s*True|shell\s*=\s*True|os\.system\(|os\.popen\(|allow_pickle\s*=\s*True"
    )
    hits = []
    for top in ("tinytune", "recipes"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    for i, line in enumerate(open(path, encoding="utf-8"), 1):
                        if banned.search(line):
                            hits.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    assert hits == []


# ---- 8. short errors, Ctrl-C, full disk, torn metrics, leftovers ----------------------------------------


def test_dataset_and_tokenizer_errors_are_short(assets, tmp_path, capsys, monkeypatch):
    data = {
        "_component_": "tinytune.datasets.chat_dataset",
        "source": str(tmp_path / "nope.jsonl"),
        "template": "chatml",
        "max_seq_len": 64,
    }
    rc, _, err = _tune(_cfg(assets, tmp_path / "a", dataset=data), tmp_path, capsys)
    assert rc == 1 and "nope.jsonl" in _short(err)
    (tmp_path / "empty").mkdir()
    rc, _, err = _tune(_cfg(assets, tmp_path / "b", tokenizer={"path": str(tmp_path / "empty")}), tmp_path, capsys)
    assert rc == 1 and "no tokenizer found in" in _short(err)
    monkeypatch.setenv("TINYTUNE_TRACEBACK", "1")  # the traceback on request
    with pytest.raises(Exception, match="no tokenizer found"):
        _tune(_cfg(assets, tmp_path / "c", tokenizer={"path": str(tmp_path / "empty")}), tmp_path, capsys)


def test_ctrl_c_prints_one_line_with_step_and_how_to_resume(assets, tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, at_call=3, kind="interrupt")
    out = tmp_path / "out"
    rc, _, err = _tune(_cfg(assets, out, checkpoint_every_n_steps=1), tmp_path, capsys)
    assert rc == 130
    line = _short(err, max_lines=1)
    assert "interrupted after step 2" in line and "step_2" in line and "resume_from_checkpoint=auto" in line
    assert _checkpoints(str(out)) == ["step_1", "step_2"]


def test_full_disk_says_so_and_keeps_the_previous_checkpoint(assets, tmp_path, capsys, monkeypatch):
    import tinytune.checkpoint.training_state as ts

    real, calls = ts.torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ts.torch, "save", save)
    out = tmp_path / "out"
    rc, _, err = _tune(_cfg(assets, out, checkpoint_every_n_steps=1), tmp_path, capsys)
    assert rc == 1 and "No space left on device" in _short(err)
    good = out / "checkpoints" / "step_1"
    assert f"Still good: {good}" in err
    assert os.listdir(out / "checkpoints") == ["step_1"]  # no partial step_2, no .tmp-* left
    assert TrainingCheckpointer(str(out / "checkpoints")).verify(str(good)) is None


def test_torn_metrics_line_is_tolerated_on_resume(stopped_run, tmp_path, capsys, caplog):
    cfg, out = stopped_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.1, "lr"')  # killed mid-write
    rc, _, _ = _tune(dict(cfg, resume_from_checkpoint="auto"), tmp_path, capsys)
    assert rc == 0 and [r["step"] for r in _strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    from tinytune.training.plotting import read_metrics

    with open(out / "metrics.jsonl", "a") as f:  # a torn line in the middle (older runs) is skipped too
        f.write('{"step": 9, "lo\n{"step": 10, "loss": 1.0}\n')
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 10]


def test_leftover_tmp_checkpoint_dirs_are_cleaned_on_start(stopped_run, tmp_path, capsys):
    cfg, out = stopped_run
    junk = out / "checkpoints" / ".tmp-step_3-deadbeef"
    junk.mkdir()
    (junk / "training_state.pt").write_bytes(b"half")
    assert _tune(dict(cfg, resume_from_checkpoint="auto"), tmp_path, capsys)[0] == 0
    assert not junk.exists() and os.path.isfile(out / "adapter" / "adapter_model.safetensors")


# ---- fault injection: SIGKILL at random points, byte-identical result ------------------------------------


def _kill_run(assets, tmp_path, kills, seed, max_steps=10):
    """Runs a checkpoint-every-step LoRA job, SIGKILLs it `kills` times at random points while it trains
    or writes checkpoints, resumes each time, and returns the final adapter's bytes."""
    rng = random.Random(seed)
    out = tmp_path / f"killed_{seed}"
    cfg = _cfg(
        assets,
        out,
        max_steps=max_steps,
        checkpoint_every_n_steps=1,
        keep_last_checkpoints=2,
        resume_from_checkpoint="auto",
        lr_scheduler={"name": "cosine", "warmup_steps": 2},
    )
    path = _write_cfg(cfg, tmp_path / f"killed_{seed}.yaml")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "tinytune.cli.main", "run", "lora_finetune", "--config", path]
    done = 0
    while done < kills:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = set(_checkpoints(str(out)))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and set(_checkpoints(str(out))) == seen:
            time.sleep(0.005)  # wait until this process has written a new checkpoint
        time.sleep(rng.uniform(0.0, 0.15))  # then somewhere in a step or a checkpoint write
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done += 1
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    return (out / "adapter" / "adapter_model.safetensors").read_bytes(), done


def _reference(assets, tmp_path, capsys, max_steps=10):
    out = tmp_path / "whole"
    cfg = _cfg(
        assets,
        out,
        max_steps=max_steps,
        checkpoint_every_n_steps=1,
        keep_last_checkpoints=2,
        lr_scheduler={"name": "cosine", "warmup_steps": 2},
    )
    assert _tune(cfg, tmp_path, capsys, name="whole")[0] == 0
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def test_sigkill_at_random_points_then_resume_is_byte_identical(assets, tmp_path, capsys):
    want = _reference(assets, tmp_path, capsys)
    got, kills = _kill_run(assets, tmp_path, kills=2, seed=1)
    assert kills >= 1 and got == want


@pytest.mark.slow
def test_sigkill_ten_times_then_resume_is_byte_identical(assets, tmp_path, capsys):
    # a kill lands up to 0.15 s after a checkpoint appears, and on a quiet machine the tiny model
    # trains several steps in that time (measured: ~5 per kill): 200 steps leave room for all ten kills
    want = _reference(assets, tmp_path, capsys, max_steps=200)
    got, kills = _kill_run(assets, tmp_path, kills=10, seed=7, max_steps=200)
    assert kills == 10 and got == want
