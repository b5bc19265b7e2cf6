"""Training plumbing: schedulers, loggers, loss plot, SFT/DPO losses, accumulation, AC, data stream."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import BatchStream, split_dataset
from tinytune.training.evaluation import evaluate_loss
from tinytune.training.losses import dpo_loss, sequence_logps, sft_loss
from tinytune.training.lr_schedulers import build_lr_scheduler, get_lr_scheduler
from tinytune.training.metric_logging import build_metric_loggers
from tinytune.training.optim import build_optimizer
from tinytune.training.plotting import loss_curves, plot_loss, read_metrics
from tinytune.training.steps import optimizer_step, sft_accumulate

# ---- LR schedulers -----------------------------------------------------------------------------


def _lrs(name, steps=10, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_lr_scheduler(opt, name, num_training_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules():
    assert _lrs("constant") == [1.0] * 10
    warm = _lrs("constant", warmup_steps=3)
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and warm[4:] == [1.0] * 6
    lin = _lrs("linear", steps=10, warmup_steps=2)
    assert lin[2] == pytest.approx(1.0) and lin[6] == pytest.approx(1 - 4 / 8)
    cos = _lrs("cosine", steps=10, warmup_ratio=0.2)  # 2 warmup steps
    for s in range(2, 10):
        assert cos[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
    floor = _lrs("cosine", steps=10, min_lr_ratio=0.1)
    assert min(floor) >= 0.1 - 1e-9
    with pytest.raises(ValueError, match="not both"):
        _lrs("cosine", warmup_steps=1, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="Unknown lr scheduler 'cosin'"):
        _lrs("cosin")


# ---- loggers and plot ---------------------------------------------------------------------------


def test_loggers_and_loss_plot(tmp_path, capsys):
    loggers = build_metric_loggers(["stdout", "jsonl", "tensorboard"], str(tmp_path))
    for step in range(1, 6):
        loggers.log_dict({"loss": 3.0 - 0.3 * step, "lr": torch.tensor(1e-3)}, step)
    loggers.log_dict({"val_loss": 2.0}, 5)
    loggers.close()
    assert "step 5 | loss: 1.5" in capsys.readouterr().out
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert rows[0]["step"] == 1 and rows[0]["lr"] == pytest.approx(1e-3)
    train, val = loss_curves(rows)
    assert [s for s, _ in train] == [1, 2, 3, 4, 5] and val == [(5, 2.0)]
    assert os.listdir(tmp_path / "tensorboard")
    png = plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown logger 'csv'"):
        build_metric_loggers(["csv"], str(tmp_path))


# ---- losses -------------------------------------------------------------------------------------


def _batch(b=2, s=12, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[:, :3] = -100  # masked prompt
    return {"tokens": tokens, "labels": labels}


def _model(seed=0):
    torch.manual_seed(seed)
    return smollm2_tiny()


def test_sft_loss_matches_plain_cross_entropy():
    model, batch = _model(), _batch()
    logits = model(batch["tokens"])  # [b, s, V]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(model, batch), ref, atol=1e-5, rtol=1e-5)


def test_grad_accumulation_4x1_equals_bs4():
    batch = _batch(b=4, s=10)
    batch["labels"][1, 3:8] = -100  # unequal label counts per row
    m1, m2 = _model(), _model()
    loss_full, n_full = sft_accumulate(m1, [batch], torch.device("cpu"))
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    loss_acc, n_acc = sft_accumulate(m2, micro, torch.device("cpu"))
    assert n_full == n_acc
    torch.testing.assert_close(loss_acc, loss_full, atol=1e-5, rtol=1e-5)
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    beta = 0.2
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta)
    want = torch.stack(
        [-torch.log(1 / (1 + torch.exp(-beta * ((pc[i] - pr[i]) - (rc[i] - rr[i]))))) for i in range(5)]
    ).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    ls, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    z = beta * ((pc - pr) - (rc - rr))
    torch.testing.assert_close(ls, (-0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).mean())


def test_sequence_logps_matches_log_softmax_gather():
    model, batch = _model(), _batch(b=3)
    logp = torch.log_softmax(model(batch["tokens"]).float(), -1)  # [b, s, V]
    mask = batch["labels"] != -100
    gathered = logp.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1)
    want = (gathered * mask).sum(-1)
    torch.testing.assert_close(sequence_logps(model, batch["tokens"], batch["labels"]), want, atol=1e-4, rtol=1e-5)


def test_activation_checkpointing_same_grads_and_deepcopy():
    batch = _batch()
    m1, m2 = _model(), _model()
    assert apply_activation_checkpointing(m2) == len(m2.layers)
    sft_loss(m1, batch).backward()
    sft_loss(m2, batch).backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert list(m1.state_dict()) == list(m2.state_dict())
    m3 = copy.deepcopy(m2)  # the copy's layers must run their own weights
    with torch.no_grad():
        for p in m3.parameters():
            p.zero_()
    assert not torch.allclose(m3(batch["tokens"]), m2(batch["tokens"]))


def test_evaluate_loss_is_token_mean():
    model = _model()
    b1, b2 = _batch(b=1, seed=1), _batch(b=2, seed=2)
    res = evaluate_loss(model, [b1, b2], torch.device("cpu"))
    n1, n2 = int((b1["labels"] != -100).sum()), int((b2["labels"] != -100).sum())
    with torch.no_grad():
        want = (sft_loss(model, b1) * n1 + sft_loss(model, b2) * n2) / (n1 + n2)
    assert res["loss"] == pytest.approx(float(want), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-6)
    assert model.training


def test_optimizer_builder():
    model = _model()
    opt = build_optimizer(model.parameters(), name="adamw", lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'adam9'"):
        build_optimizer(model.parameters(), name="adam9")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.parameters())


def test_optimizer_and_scheduler_by_component():
    """torchtune-style `_component_` blocks: the class gets exactly the configured keys."""
    from tinytune.config import ConfigError

    model = _model()
    opt = build_optimizer(model.parameters(), _component_="torch.optim.SGD", lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.1
    with pytest.raises(ConfigError, match=r"optimizer.*did you mean 'lr'"):
        build_optimizer(model.parameters(), _component_="torch.optim.SGD", lrr=0.1)
    with pytest.raises(ValueError, match="either name"):
        build_optimizer(model.parameters(), name="adamw", _component_="torch.optim.SGD")
    # num_training_steps is passed when the factory takes it (same signature as torchtune's schedules)
    sched = build_lr_scheduler(
        opt, 10, {"_component_": "transformers.get_linear_schedule_with_warmup", "num_warmup_steps": 0}
    )
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    step_lr = build_lr_scheduler(opt, 10, {"_component_": "torch.optim.lr_scheduler.StepLR", "step_size": 2})
    assert isinstance(step_lr, torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ValueError, match="unknown key"):
        build_lr_scheduler(opt, 10, {"step_size": 2})
    with pytest.raises(ValueError, match="either name"):
        build_lr_scheduler(opt, 10, {"name": "linear", "_component_": "torch.optim.lr_scheduler.StepLR"})


@pytest.mark.slow
def test_adamw8bit_on_cpu_trains():
    model = _model()
    opt = build_optimizer(model.parameters(), name="adamw8bit", lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(4):
        loss = sft_loss(model, batch)
        loss.backward()
        optimizer_step(model, opt, clip_grad_norm=1.0)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


# ---- data stream --------------------------------------------------------------------------------


def _collate(rows):
    return {"x": torch.tensor(rows)}


def test_batch_stream_resume_and_epochs():
    data = list(range(10))
    ref = BatchStream(data, 3, _collate, seed=5)
    seq = [next(ref)["x"].tolist() for _ in range(7)]  # 3 batches/epoch: crosses two epochs
    assert len(set(sum(seq[:3], []))) == 9  # no repeats within an epoch
    assert seq[:3] != seq[3:6]  # reshuffled per epoch
    s = BatchStream(data, 3, _collate, seed=5)
    for _ in range(4):
        next(s)
    state = s.state_dict()
    r = BatchStream(data, 3, _collate, seed=5)
    r.load_state_dict(json.loads(json.dumps(state)))
    assert [next(r)["x"].tolist() for _ in range(3)] == seq[4:7]
    with pytest.raises(ValueError, match="seed=5"):
        BatchStream(data, 3, _collate, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than batch_size=20"):
        BatchStream(data, 20, _collate)


def test_split_dataset_deterministic():
    tr, va = split_dataset(list(range(20)), val_ratio=0.25, seed=3)
    tr2, va2 = split_dataset(list(range(20)), val_ratio=0.25, seed=3)
    assert list(va) == list(va2) and len(va) == 5 and len(tr) == 15
    assert sorted(list(tr) + list(va)) == list(range(20))
    assert split_dataset(list(range(5)))[1] is None
    with pytest.raises(ValueError, match="empty side"):
        split_dataset(list(range(5)), val_size=5)
