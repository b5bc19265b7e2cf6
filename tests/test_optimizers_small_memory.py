"""torchao small-memory optimizers by name: adamw4bit trains, bitsandbytes' paged names map to the
offload optimizer (plain optimizer on CPU parameters), each with a log line."""

import logging

import pytest
import torch

from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.losses import sft_loss
from tinytune.training.optim import build_optimizer
from tinytune.training.steps import optimizer_step


def _batch(b=2, s=12, vocab=256):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return {"tokens": tokens, "labels": labels}


@pytest.mark.slow
def test_adamw4bit_on_cpu_trains():
    torch.manual_seed(0)
    model = smollm2_tiny()
    opt = build_optimizer(model.parameters(), name="adamw4bit", lr=1e-2)
    assert type(opt).__name__ == "AdamW4bit"
    batch, losses = _batch(), []
    for _ in range(4):
        loss = sft_loss(model, batch)
        loss.backward()
        optimizer_step(model, opt, clip_grad_norm=1.0)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_paged_names_on_cpu(caplog):
    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.INFO):
        opt = build_optimizer(model.parameters(), name="paged_adamw_32bit", lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    assert "paged_adamw_32bit is bitsandbytes' paged optimizer; running adamw_offload" in caplog.text
    assert "parameters are on the CPU" in caplog.text
    opt8 = build_optimizer(model.parameters(), name="paged_adamw_8bit", lr=1e-3)
    assert type(opt8).__name__ == "AdamW8bit"
    assert type(build_optimizer(model.parameters(), name="adamw4bit", lr=1e-3)).__name__ == "AdamW4bit"
    with pytest.raises(ValueError, match="paged_adamw_8bit"):
        build_optimizer(model.parameters(), name="paged_lion")


@pytest.mark.gpu
def test_offload_optimizer_on_cuda_matches_adamw():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 64).cuda()  # 4096 weights: offloaded (torchao's minimal_size)
    b = torch.nn.Linear(64, 64).cuda()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a.parameters(), name="paged_adamw_32bit", lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    assert type(opt_a).__name__ == "CPUOffloadOptimizer"
    x = torch.randn(8, 64, device="cuda")
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, atol=1e-5, rtol=1e-4)
