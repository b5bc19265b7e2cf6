"""Training-state checkpoints: exact resume, atomic layout, keep-last-K, incomplete dirs skipped."""

import logging
import os
import random

import numpy as np
import pytest
import torch

from tinytune.checkpoint import TrainingCheckpointer, apply_training_state


def _make(seed_init: int):
    from tinytune.models.smollm2 import smollm2_tiny

    torch.manual_seed(seed_init)
    model = smollm2_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def _step(model, opt, sched):
    # every source of randomness a recipe might touch: torch, numpy, python
    toks = torch.randint(0, 256, (2, 16))
    toks[:, 0] = int(np.random.randint(0, 256))
    toks[:, 1] = random.randrange(256)
    logits = model(toks[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def _seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def test_resume_is_bit_identical(tmp_path):
    n_steps, stop = 6, 3
    _seed_all(123)
    model, opt, sched = _make(0)
    straight = [_step(model, opt, sched) for _ in range(n_steps)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(123)
    model, opt, sched = _make(0)
    first = [_step(model, opt, sched) for _ in range(stop)]
    ckpt = TrainingCheckpointer(str(tmp_path), keep_last=2)
    ckpt.save(
        stop,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "epoch": 0,
            "dataloader": {"batch_in_epoch": stop},
        },
    )
    for _ in range(2):  # disturb the RNGs; the resume must restore them
        torch.rand(5), np.random.rand(), random.random()

    model2, opt2, sched2 = _make(99)  # different init: everything must come from the checkpoint
    state = ckpt.load_latest()
    assert state["step"] == stop and state["dataloader"] == {"batch_in_epoch": stop}
    apply_training_state(state, model=model2, optimizer=opt2, lr_scheduler=sched2)
    rest = [_step(model2, opt2, sched2) for _ in range(n_steps - stop)]

    for a, b in zip(straight, first + rest):
        assert torch.equal(a, b)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_layout_keep_last_and_resolve(tmp_path):
    ckpt = TrainingCheckpointer(str(tmp_path / "run"), keep_last=2)
    assert ckpt.load_latest() is None and ckpt.resolve("auto") is None
    for step in (1, 2, 3):
        path = ckpt.save(step, {"w": torch.full((3,), float(step))})
        assert os.path.basename(path) == f"step_{step}"
        assert os.path.isfile(os.path.join(path, "COMPLETE"))
    assert sorted(os.listdir(tmp_path / "run")) == ["step_2", "step_3"]  # no temp dirs left
    assert torch.equal(ckpt.load_latest()["w"], torch.full((3,), 3.0))
    assert ckpt.resolve("auto").endswith("step_3")
    assert ckpt.resolve(None) is None and ckpt.resolve("null") is None
    assert torch.equal(ckpt.load(ckpt.resolve(str(tmp_path / "run" / "step_2")))["w"], torch.full((3,), 2.0))
    ckpt.save(3, {"w": torch.zeros(3)})  # re-saving a step replaces it atomically
    assert torch.equal(ckpt.load_latest()["w"], torch.zeros(3))


def test_incomplete_checkpoints_are_skipped(tmp_path, caplog):
    ckpt = TrainingCheckpointer(str(tmp_path))
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"w": torch.tensor([float(step)])})
    os.remove(tmp_path / "step_4" / "COMPLETE")  # cut short before the marker
    os.remove(tmp_path / "step_3" / "training_state.pt")  # a file missing
    with open(tmp_path / "step_2" / "training_state.pt", "r+b") as f:  # truncated file
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        state = ckpt.load_latest()
    assert state["w"].item() == 1.0
    text = caplog.text
    for step in (2, 3, 4):
        assert f"step_{step}" in text
    assert "COMPLETE" in text
    with pytest.raises(ValueError, match="step_4.*incomplete"):
        ckpt.load(str(tmp_path / "step_4"))
    with pytest.raises(ValueError, match="step_9 does not exist"):
        ckpt.load(str(tmp_path / "step_9"))


def test_failed_save_leaves_nothing(tmp_path):
    ckpt = TrainingCheckpointer(str(tmp_path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        ckpt.save(5, {"bad": Boom()})
    assert os.listdir(tmp_path) == []
