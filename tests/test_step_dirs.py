"""The step-directory checkpoint protocol (tinytune.checkpoint.step_dirs), on its own and through both
checkpointers (single-device TrainingCheckpointer, sharded DistributedCheckpointer), so they cannot drift."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from tinytune.checkpoint import TrainingCheckpointer
from tinytune.checkpoint.dcp import DistributedCheckpointer
from tinytune.checkpoint.integrity import sha256_file
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.checkpoint.step_dirs import STALE_LEFTOVER_SECONDS, StepDirectories, is_leftover, step_dir_name
from tinytune.config import ConfigError
from tinytune.errors import ResumeError


def _write(dirs: StepDirectories, step: int, text: str = "payload", fingerprint=None) -> str:
    with dirs.writing(step, fingerprint) as tmp:
        with open(os.path.join(tmp, "payload.txt"), "w") as f:
            f.write(text)
    return dirs.path_for(step)


def _flip_byte(path) -> None:
    """Changes one byte in the middle of a file, keeping its size (only the sha256 check sees it)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ---- the protocol on its own ------------------------------------------------------------------------


def test_naming_marker_and_no_temp_left(tmp_path):
    dirs = StepDirectories(tmp_path / "ck")
    assert step_dir_name(12) == "step_12" and dirs.path_for(12) == str(tmp_path / "ck" / "step_12")
    path = _write(dirs, 12, "hello", fingerprint={"settings": {"seed": 3}})
    assert os.listdir(tmp_path / "ck") == ["step_12"]
    marker = json.loads(open(os.path.join(path, "COMPLETE")).read())
    assert marker["step"] == 12 and marker["files"] == {"payload.txt": 5}
    assert marker["sha256"] == {"payload.txt": sha256_file(os.path.join(path, "payload.txt"))}
    assert dirs.fingerprint(path) == {"settings": {"seed": 3}}
    assert [s for s, _ in dirs.step_dirs()] == [12]
    for name in (".tmp-step_3", ".tmp-step_3-deadbeef", ".old-step_3-0a1b2c3d", ".step_3.tmp"):
        assert is_leftover(name), name
    for name in ("step_3", "step_3.tmp", "notes", ".tmp"):
        assert not is_leftover(name), name


def test_resolve_auto_path_null_and_missing(tmp_path):
    dirs = StepDirectories(tmp_path)
    assert dirs.resolve("auto") is None and dirs.latest() is None  # nothing written yet
    for step in (1, 2, 10):  # numeric order, not string order
        _write(dirs, step, str(step))
    for null in (None, "", False, "null", "none", "None"):
        assert dirs.resolve(null) is None
    assert dirs.resolve("auto") == str(tmp_path / "step_10")
    assert dirs.resolve(str(tmp_path / "step_2")) == str(tmp_path / "step_2")
    with pytest.raises(CheckpointError, match=r"step_7 does not exist.*\['step_1', 'step_2', 'step_10'\]"):
        dirs.resolve(str(tmp_path / "step_7"))
    os.remove(tmp_path / "step_2" / "COMPLETE")
    with pytest.raises(CheckpointError, match="step_2 is incomplete: no COMPLETE marker"):
        dirs.resolve(str(tmp_path / "step_2"))


def test_keep_last_prunes_oldest_complete(tmp_path):
    dirs = StepDirectories(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _write(dirs, step)
    assert sorted(os.listdir(tmp_path)) == ["step_3", "step_4"]
    assert dirs.complete_checkpoints() == [str(tmp_path / "step_3"), str(tmp_path / "step_4")]
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match="keep_last_checkpoints must be >= 1"):
            StepDirectories(tmp_path, keep_last=bad)


def test_leftovers_are_cleaned_at_start_and_stale_ones_after_a_save(tmp_path, caplog):
    dirs = StepDirectories(tmp_path)
    _write(dirs, 1)
    junk = [".tmp-step_2", ".tmp-step_3-deadbeef", ".old-step_1-0a1b2c3d", ".step_4.tmp"]
    for name in [*junk, "notes"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_state.pt").write_bytes(b"half")
    assert dirs.resolve("auto") == str(tmp_path / "step_1")  # never picked up
    with caplog.at_level(logging.WARNING):
        assert dirs.clean_leftovers() == sorted(junk)
    assert sorted(os.listdir(tmp_path)) == ["notes", "step_1"]
    assert "earlier crash" in _messages(caplog)
    # after each save, only leftovers older than an hour go (another writer's fresh temp dir stays)
    (tmp_path / ".tmp-step_8").mkdir()
    (tmp_path / ".tmp-step_9").mkdir()
    old = time.time() - STALE_LEFTOVER_SECONDS - 60
    os.utime(tmp_path / ".tmp-step_8", (old, old))
    _write(dirs, 2)
    assert sorted(os.listdir(tmp_path)) == [".tmp-step_9", "notes", "step_1", "step_2"]


def test_torn_directories_are_ignored_with_a_warning(tmp_path, caplog):
    dirs = StepDirectories(tmp_path)
    for step in (1, 2, 3, 4):
        _write(dirs, step, "x" * 100)
    os.remove(tmp_path / "step_4" / "COMPLETE")  # cut short before the marker
    with open(tmp_path / "step_3" / "payload.txt", "r+b") as f:  # a file cut short
        f.truncate(10)
    os.remove(tmp_path / "step_2" / "payload.txt")  # a file missing
    (tmp_path / "step_5").mkdir()  # an empty one
    assert dirs.complete_checkpoints() == [str(tmp_path / "step_1")]
    with caplog.at_level(logging.WARNING):
        assert dirs.resolve("auto") == str(tmp_path / "step_1")
    text = _messages(caplog)
    assert "step_5: no COMPLETE marker" in text and "step_4: no COMPLETE marker" in text
    assert "payload.txt has 10 bytes, COMPLETE says 100" in text and "payload.txt listed in COMPLETE is missing" in text
    (tmp_path / "step_4" / "COMPLETE").write_text("done")  # a plain-text marker is not a manifest
    assert dirs.is_complete(tmp_path / "step_4") == (False, "unreadable COMPLETE marker")


def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    dirs = StepDirectories(tmp_path)
    for step in (1, 2, 3):
        _write(dirs, step, f"weights of step {step}")
    _flip_byte(tmp_path / "step_3" / "payload.txt")
    _flip_byte(tmp_path / "step_2" / "payload.txt")
    with caplog.at_level(logging.WARNING):
        assert dirs.resolve("auto") == str(tmp_path / "step_1")
    bad = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(bad) == 2 and all("fails its sha256 check" in m and "falling back" in m for m in bad)
    assert str(tmp_path / "step_3" / "payload.txt") in bad[0]
    with pytest.raises(ResumeError, match=r"step_2 is corrupt: .*step_2/payload.txt fails its sha256 check"):
        dirs.resolve(str(tmp_path / "step_2"))
    assert dirs.latest(verify=False) == str(tmp_path / "step_3")  # sizes only (a cheap listing)


def test_resave_replaces_and_is_verified_again(tmp_path):
    dirs = StepDirectories(tmp_path)
    _write(dirs, 1, "first")
    assert dirs.verify(tmp_path / "step_1") is None  # remembered as sound ...
    _write(dirs, 1, "second")
    assert open(tmp_path / "step_1" / "payload.txt").read() == "second"
    _flip_byte(tmp_path / "step_1" / "payload.txt")
    assert "sha256" in dirs.verify(tmp_path / "step_1")  # ... but not across a re-save
    assert os.listdir(tmp_path) == ["step_1"]


def test_failed_write_leaves_the_previous_checkpoints(tmp_path):
    dirs = StepDirectories(tmp_path)
    _write(dirs, 1, "good")
    with pytest.raises(RuntimeError, match="boom"):
        with dirs.writing(1) as tmp:
            open(os.path.join(tmp, "payload.txt"), "w").write("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["step_1"]
    assert open(tmp_path / "step_1" / "payload.txt").read() == "good"


def test_legacy_plain_text_markers_only_where_declared(tmp_path, caplog):
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / "COMPLETE").write_text("")

    class Legacy(StepDirectories):
        legacy_markers = True

    assert StepDirectories(tmp_path).resolve("auto") is None
    with caplog.at_level(logging.WARNING):
        assert Legacy(tmp_path).resolve("auto") == str(tmp_path / "step_3")
    assert "without sha256 digests; not verified" in _messages(caplog)


def test_only_the_main_process_writes_and_cleans(tmp_path):
    """A non-main rank neither creates the temp dir nor removes leftovers, and takes the main rank's verdict."""

    class OtherRank(StepDirectories):
        def _is_main(self):
            return False

        def _share(self, fn):
            return "what rank 0 said"

    (tmp_path / ".tmp-step_1").mkdir()
    rank1 = OtherRank(tmp_path)
    assert rank1.clean_leftovers() == [] and (tmp_path / ".tmp-step_1").is_dir()
    assert rank1._begin(2) == str(tmp_path / ".tmp-step_2") and not (tmp_path / ".tmp-step_2").exists()
    assert rank1.verify(tmp_path / "step_1") == "what rank 0 said"


# ---- the same protocol through both checkpointers ---------------------------------------------------


class _Single:
    name = "single"

    def make(self, out: Path, keep_last=None):
        return TrainingCheckpointer(str(out / "checkpoints"), keep_last=keep_last)

    def save(self, ckpt, step: int):
        return ckpt.save(step, {"w": torch.full((4,), float(step))})

    def value(self, ckpt, path) -> float:
        return ckpt.load(path)["w"][0].item()

    def payload(self, path) -> Path:
        return Path(path) / "training_state.pt"


class _Sharded:
    name = "dcp"

    def make(self, out: Path, keep_last=None):
        return DistributedCheckpointer(out, keep_last=keep_last)

    def save(self, ckpt, step: int):
        model = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            model.weight.fill_(float(step))
        return ckpt.save(step, model, None, {"step": step})

    def value(self, ckpt, path) -> float:
        model = torch.nn.Linear(4, 4, bias=False)
        ckpt.load(path, model, None)
        return model.weight[0, 0].item()

    def payload(self, path) -> Path:
        return Path(path) / "__0_0.distcp"


@pytest.mark.parametrize("kind", [_Single(), _Sharded()], ids=lambda k: k.name)
def test_both_checkpointers_follow_the_protocol(kind, tmp_path, caplog):
    ckpt = kind.make(tmp_path, keep_last=3)
    root = Path(ckpt.root)
    assert type(ckpt.path_for(1)) is type(ckpt.root)
    assert ckpt.resolve("auto") is None
    # naming, marker, atomic write, keep_last
    for step in (1, 2, 3, 4):
        path = kind.save(ckpt, step)
        assert Path(path) == root / f"step_{step}"
    assert sorted(os.listdir(root)) == ["step_2", "step_3", "step_4"]  # pruned, no temp dirs
    marker = json.loads((root / "step_4" / "COMPLETE").read_text())
    files = sorted(p.name for p in (root / "step_4").iterdir() if p.name != "COMPLETE")
    assert marker["step"] == 4 and sorted(marker["sha256"]) == files == sorted(marker["files"])
    # resolve: null / auto / a path / a missing path
    assert ckpt.resolve(None) is None and ckpt.resolve("null") is None
    assert ckpt.resolve("auto") == ckpt.path_for(4)
    assert kind.value(ckpt, ckpt.resolve(str(root / "step_2"))) == 2.0
    with pytest.raises(CheckpointError, match="step_9 does not exist"):
        ckpt.resolve(str(root / "step_9"))
    # a re-save of a step replaces it
    kind.save(ckpt, 4)
    assert sorted(os.listdir(root)) == ["step_2", "step_3", "step_4"]
    # a crash's temp dir is ignored, then cleaned at the start of the next run
    (root / ".tmp-step_5").mkdir()
    (root / ".tmp-step_5" / "half").write_bytes(b"x")
    fresh = kind.make(tmp_path, keep_last=3)
    assert fresh.resolve("auto") == ckpt.path_for(4)
    assert fresh.clean_leftovers() == [".tmp-step_5"] and not (root / ".tmp-step_5").exists()
    # torn step_4 and corrupt step_3: auto falls back to step_2 with a warning naming each
    os.remove(root / "step_4" / "COMPLETE")
    _flip_byte(kind.payload(root / "step_3"))
    fresh = kind.make(tmp_path, keep_last=3)
    with caplog.at_level(logging.WARNING):
        got = fresh.resolve("auto")
    assert got == ckpt.path_for(2) and kind.value(fresh, got) == 2.0
    text = _messages(caplog)
    assert f"Skipping incomplete checkpoint {root / 'step_4'}: no COMPLETE marker" in text
    assert f"{kind.payload(root / 'step_3')} fails its sha256 check" in text and "falling back" in text
    with pytest.raises(CheckpointError, match="step_4 is incomplete"):
        fresh.resolve(str(root / "step_4"))
    with pytest.raises(ResumeError, match="step_3 is corrupt"):
        fresh.resolve(str(root / "step_3"))
