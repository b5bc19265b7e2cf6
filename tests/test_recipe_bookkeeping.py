"""The shared recipe bookkeeping in tinytune/training: log windows, rows, summary, resume state."""

import json
import math

import pytest
import torch

from tinytune.config.recipe_settings import OptimSettings, SampleGenerationSettings
from tinytune.training.checkpointing import open_checkpointer, resume_training_state, save_training_state
from tinytune.training.data import BatchStream
from tinytune.training.metric_logging import (
    LogWindow,
    log_train_row,
    train_row,
    validation_row,
    write_summary,
)
from tinytune.training.prompting import SampleGenerations
from tinytune.training.steps import build_optimizer_and_scheduler


class _Recorder:
    def __init__(self):
        self.rows = []

    def log_dict(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_train_row_key_order_and_throughput():
    row = train_row(2.0, 1e-3, 300, 1.5, 2)
    assert list(row) == ["loss", "lr", "tokens_per_s", "label_tokens", "epoch"]
    assert row["tokens_per_s"] == pytest.approx(200.0)
    assert train_row(1.0, 0.1, 5, 0.0, 0)["tokens_per_s"] == pytest.approx(5 / 1e-9)


def test_log_window_means_reset_and_totals():
    w = LogWindow()
    assert math.isnan(w.last_loss)
    w.add(1.0, 10, 0.5)
    w.add(3.0, 30, 1.5)
    row = w.flush(lr=0.01, epoch=1)
    assert row == {"loss": 2.0, "lr": 0.01, "tokens_per_s": 20.0, "label_tokens": 40, "epoch": 1}
    w.add(5.0, 7, 0.25)
    assert w.flush(lr=0.02, epoch=1)["loss"] == 5.0  # the window restarted after the flush
    assert w.last_loss == 5.0
    assert w.totals() == {"train_seconds": 2.25, "train_label_tokens": 47}


def test_log_train_row_appends_memory_and_grad_norm():
    rec = _Recorder()
    log_train_row(rec, 3, train_row(1.0, 0.1, 4, 1.0, 0), "cpu", grad_norm=0.5)
    log_train_row(rec, 4, {"loss": 2.0}, "cpu")
    (s3, r3), (s4, r4) = rec.rows
    assert (s3, s4) == (3, 4)
    assert list(r3)[:5] == ["loss", "lr", "tokens_per_s", "label_tokens", "epoch"]
    assert "peak_mem_gib" in r3 and list(r3)[-1] == "grad_norm" and r3["grad_norm"] == 0.5
    assert "grad_norm" not in r4 and list(r4)[0] == "loss"


def test_validation_row_and_write_summary(tmp_path, capsys):
    assert validation_row({"loss": 1.5, "perplexity": 4.48, "tokens": 9}) == {"val_loss": 1.5, "val_perplexity": 4.48}
    summary = write_summary(str(tmp_path), {"step": 2, "loss": 0.5}, t_start=0.0)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary and on_disk["step"] == 2 and on_disk["total_seconds"] > 0
    assert capsys.readouterr().out.startswith("done: {")


def test_sample_generations_without_prompts_is_a_no_op(tmp_path):
    samples = SampleGenerations(SampleGenerationSettings(), "hf", tokenizer=None)
    assert samples.prompts == [] and samples.template is None
    samples.generate_before(None)
    samples.generate_after(None, str(tmp_path))
    assert not (tmp_path / "generations.json").exists()


def _identity_collate(items):
    return {"x": torch.stack(items)}


def test_training_state_round_trip_restores_step_weights_and_data(tmp_path):
    optim = OptimSettings(optimizer={"name": "adamw", "lr": 0.1})
    data = [torch.randn(3) for _ in range(8)]

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt, sched = build_optimizer_and_scheduler(optim, model.parameters(), total_steps=10)
        return model, opt, sched, BatchStream(data, 2, _identity_collate, seed=0)

    model, opt, sched, stream = fresh()
    ckpt = open_checkpointer(1, str(tmp_path))
    assert (
        resume_training_state(
            ckpt, "auto", model=model, weights_key="model", optimizer=opt, lr_scheduler=sched, stream=stream
        )
        == 0
    )  # nothing saved yet
    for _ in range(3):
        model(next(stream)["x"]).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    save_training_state(ckpt, 3, {"model": model.state_dict()}, optimizer=opt, lr_scheduler=sched, stream=stream)
    expected_next = next(stream)["x"]

    model2, opt2, sched2, stream2 = fresh()
    step = resume_training_state(
        ckpt, "auto", model=model2, weights_key="model", optimizer=opt2, lr_scheduler=sched2, stream=stream2
    )
    assert step == 3
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(next(stream2)["x"], expected_next)
    assert (tmp_path / "checkpoints").is_dir()


def test_write_summary_turns_nan_into_null(tmp_path):
    import json

    summary = write_summary(str(tmp_path), {"step": 40, "loss": float("nan")}, t_start=0.0)
    assert summary["loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["loss"] is None
