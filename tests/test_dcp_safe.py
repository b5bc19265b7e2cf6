"""DCP checkpoints are read without unpickling code: ``.metadata`` and non-tensor entries."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tinytune.checkpoint.dcp_safe import UnsafeCheckpointError, safe_dcp_load


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: stands for any code a crafted file could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _load(path, state):
    safe_dcp_load(state, path)


def test_safe_reader_loads_a_real_checkpoint(tmp_path):
    saved = _state()
    dcp.save(saved, checkpoint_id=str(tmp_path))
    target = _state()
    target["optim"]["param_groups"][0]["lr"] = 0.5  # non-tensor value: comes back from the bytes entry
    _load(str(tmp_path), target)
    assert target["optim"]["param_groups"][0]["lr"] == 1e-3
    for k, v in saved["model"].items():
        assert torch.equal(target["model"][k], v)
    exp_avg = saved["optim"]["state"][0]["exp_avg"]
    assert torch.equal(target["optim"]["state"][0]["exp_avg"], exp_avg)


def test_payload_in_metadata_is_refused(tmp_path):
    dcp.save(_state(), checkpoint_id=str(tmp_path))
    marker = tmp_path / "ran"
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refers to io\.open"):
        _load(str(tmp_path), _state())
    assert not marker.exists()


def test_payload_in_a_non_tensor_entry_is_refused(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    dcp.save({"model": torch.nn.Linear(2, 2).state_dict(), "extra": _Payload(str(marker))}, checkpoint_id=str(ckpt))
    assert not marker.exists()  # saving pickles, it does not run the payload
    state = {"model": torch.nn.Linear(2, 2).state_dict(), "extra": None}
    with pytest.raises(UnsafeCheckpointError, match="'extra' holds pickled code"):
        _load(str(ckpt), state)
    assert not marker.exists()
