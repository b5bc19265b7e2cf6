"""Training-loop details that had no test: warm-up ratio rounding, gradient clipping in the
single-device optimizer step, ``validation.max_batches``, and generation stop tokens."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tinytune.config.recipe_settings import ValidationSettings
from tinytune.generation import generate
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.evaluation import evaluate_loss
from tinytune.training.lr_schedulers import get_lr_scheduler, resolve_warmup_steps
from tinytune.training.steps import optimizer_step


@pytest.mark.parametrize(
    "steps,ratio,want", [(10, 0.05, 1), (100, 0.05, 5), (7, 0.3, 3), (40, 0.0, 0), (33, 0.1, 4), (3, 1.0, 3)]
)
def test_warmup_ratio_rounds_up_like_hf_trainer(steps, ratio, want):
    assert resolve_warmup_steps(steps, warmup_ratio=ratio) == want == math.ceil(steps * ratio)
    transformers = pytest.importorskip("transformers")
    if 0 < ratio < 1:  # transformers 5: a fractional warmup_steps is a ratio; HF Trainer's own rounding
        args = SimpleNamespace(warmup_steps=ratio)
        assert transformers.TrainingArguments.get_warmup_steps(args, steps) == want


def test_warmup_schedule_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_lr_scheduler(opt, "linear", num_training_steps=10, warmup_steps=resolve_warmup_steps(10, None, 0.25))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    w = 3  # ceil(2.5)
    want = [(s + 1) / (w + 1) for s in range(w)] + [1.0 - (s - w) / (10 - w) for s in range(w, 10)]
    assert lrs == pytest.approx(want)


def _grads_model(scale):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0)])
def test_optimizer_step_clips_the_total_grad_norm(scale, max_norm):
    m = _grads_model(scale)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    norm = optimizer_step(m, opt, None, clip_grad_norm=max_norm)
    assert norm == pytest.approx(total, rel=1e-6)  # reported before clipping
    factor = min(1.0, max_norm / (total + 1e-6))
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - factor * grads[n], atol=1e-6, rtol=1e-5)
        assert p.grad is None  # zeroed (set to None) after the step
    if scale > 1:
        clipped = math.sqrt(sum(float(((factor * g.double()) ** 2).sum()) for g in grads.values()))
        assert clipped == pytest.approx(max_norm, rel=1e-5)
    # without clip_grad_norm nothing is clipped and no norm is reported
    m2 = _grads_model(scale)
    assert optimizer_step(m2, torch.optim.SGD(m2.parameters(), lr=1.0), None, clip_grad_norm=None) is None


def _batches(n, b=2, s=10, vocab=256):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (b, s), generator=g)
        labels = torch.roll(tokens, -1, 1)
        labels[:, -1] = -100
        labels[:, :2] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out


def test_validation_max_batches_reads_only_the_first_batches():
    torch.manual_seed(0)
    model = smollm2_tiny().eval()
    batches = _batches(4)
    got = evaluate_loss(model, batches, torch.device("cpu"), max_batches=2)
    with torch.no_grad():
        logits = torch.cat([model(b["tokens"]) for b in batches[:2]])
        labels = torch.cat([b["labels"] for b in batches[:2]])
    want = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["tokens"] == int((labels != -100).sum())
    assert evaluate_loss(model, batches, torch.device("cpu"))["tokens"] == 4 * 2 * 7
    # the recipes read the key from validation.max_batches
    from omegaconf import OmegaConf

    assert ValidationSettings.from_config(OmegaConf.create({"max_batches": 2})).max_batches == 2
    assert ValidationSettings.from_config(OmegaConf.create({})).max_batches is None


def test_generation_stops_at_stop_tokens_per_row():
    torch.manual_seed(0)
    model = smollm2_tiny().eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    free = generate(model, prompts, max_new_tokens=12)
    assert all(len(r) == 12 for r in free)
    stop_a, stop_b = free[0][3], free[2][5]  # tokens the greedy rows emit
    got = generate(model, prompts, max_new_tokens=12, stop_tokens=[stop_a, stop_b])
    seen = []
    streamed = generate(
        model,
        prompts,
        max_new_tokens=12,
        stop_tokens=[stop_a, stop_b],
        on_token=lambda row, tok: seen.append((row, tok)),
    )
    for row, full in enumerate(free):
        cut = next((i for i, t in enumerate(full) if t in (stop_a, stop_b)), len(full))
        assert got[row] == full[:cut]  # stop token excluded, the row ends there, others go on
        assert [t for r, t in seen if r == row] == full[:cut]  # the stop token is not streamed
    assert streamed == got
    assert len(got[0]) <= 3 and len(got[2]) <= 5
    # without KV cache: same rule
    assert generate(model, prompts, max_new_tokens=12, stop_tokens=[stop_a, stop_b], use_cache=False) == got


def test_no_decay_groups_default_and_configured():
    from omegaconf import OmegaConf

    from tinytune.config.recipe_settings import OptimSettings
    from tinytune.training.steps import build_optimizer_and_scheduler

    torch.manual_seed(0)
    model = smollm2_tiny()
    cfg = OptimSettings.from_config(OmegaConf.create({"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}}))
    opt, _ = build_optimizer_and_scheduler(cfg, model.named_parameters(), 10)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = name.endswith("bias") or "norm" in name or name.startswith("tok_embeddings")
        assert wd[id(p)] == (0.0 if exempt else 0.1), name
    assert any(v == 0.1 for v in wd.values()) and any(v == 0.0 for v in wd.values())
    cfg = OptimSettings.from_config(
        OmegaConf.create({"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "no_decay": []}})
    )
    opt, _ = build_optimizer_and_scheduler(cfg, model.named_parameters(), 10)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}
    # plain parameters (no names): one group, the configured decay everywhere
    cfg = OptimSettings.from_config(OmegaConf.create({"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}}))
    opt, _ = build_optimizer_and_scheduler(cfg, model.parameters(), 10)
    assert len(opt.param_groups) == 1
