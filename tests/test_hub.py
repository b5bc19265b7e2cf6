"""Hugging Face Hub models offline: the library's own cache layout, its offline errors, our patterns."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _ckpt_helpers import hf_logits, our_logits, tiny_hf_model, tokens

hub = pytest.importorskip("huggingface_hub")
import httpx2  # noqa: E402  (huggingface_hub's HTTP client)
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from tinytune.checkpoint import load_hf_model  # noqa: E402
from tinytune.cli.main import main as tune_main  # noqa: E402
from tinytune.config import ConfigError  # noqa: E402
from tinytune.config.recipe_settings import ModelSourceSettings  # noqa: E402
from tinytune.hub import (  # noqa: E402
    BIN_PATTERNS,
    CHECKPOINT_PATTERNS,
    HubError,
    download_model,
    explain_hub_error,
    parse_hf_uri,
    resolve_hf_checkpoint,
)
from tinytune.training.setup import resolve_checkpoint_dir  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache_dir, repo_id: str, src_dir: str, commit: str = COMMIT, ref: str = "main") -> str:
    """Lays files out the way huggingface_hub's cache stores a snapshot:
    ``models--ORG--NAME/snapshots/<commit>/...`` and ``refs/<ref>`` holding the commit."""
    repo = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    shutil.copytree(src_dir, snap)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", ref), "w") as f:
        f.write(commit)
    return snap


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = tiny_hf_model("qwen2", seed=3)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(str(path))
    return model, str(path)


def test_hf_uri_resolves_through_the_hub_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    hf_model, src = tiny_checkpoint
    cache = tmp_path / "hub"
    snap = populate_hub_cache(cache, "acme/tiny-qwen2", src)
    # the library itself finds it (local_files_only: no network)
    assert hub.snapshot_download("acme/tiny-qwen2", cache_dir=str(cache), local_files_only=True) == snap
    got = resolve_hf_checkpoint("hf://acme/tiny-qwen2", cache_dir=str(cache), home=str(tmp_path / "home"))
    assert got == snap
    model, info = load_hf_model(got)
    assert info.model_type == "qwen2"
    t = tokens(1)
    torch.testing.assert_close(our_logits(model, t), hf_logits(hf_model, t), atol=1e-4, rtol=1e-4)
    # a revision that is a cached ref
    populate_hub_cache(tmp_path / "hub2", "acme/tiny-qwen2", src, ref="v1")
    assert resolve_hf_checkpoint(
        "hf://acme/tiny-qwen2@v1", cache_dir=str(tmp_path / "hub2"), home=str(tmp_path / "home")
    ).endswith(COMMIT)


def test_checkpoint_dir_hf_uri_in_a_config(tiny_checkpoint, tmp_path, monkeypatch):
    _, src = tiny_checkpoint
    cache = tmp_path / "hub"
    snap = populate_hub_cache(cache, "acme/tiny-qwen2", src)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE=... sets at import
    cfg = ModelSourceSettings.from_config(OmegaConf.create({"checkpoint_dir": "hf://acme/tiny-qwen2"}))
    assert resolve_checkpoint_dir(cfg) == snap
    # not cached, offline (conftest sets HF_HUB_OFFLINE=1): one clear error naming the key
    cfg = ModelSourceSettings.from_config(OmegaConf.create({"checkpoint_dir": "hf://acme/not-cached"}))
    with pytest.raises(
        ConfigError,
        match=r"checkpoint_dir: hf://acme/not-cached: .*not in the local hub cache.*"
        r"no network",
    ):
        resolve_checkpoint_dir(cfg)


def test_tune_download_directory_is_preferred(tiny_checkpoint, tmp_path):
    _, src = tiny_checkpoint
    home = tmp_path / "home"
    shutil.copytree(src, home / "models" / "acme" / "tiny-qwen2")
    got = resolve_hf_checkpoint("hf://acme/tiny-qwen2", cache_dir=str(tmp_path / "empty"), home=str(home))
    assert got == str(home / "models" / "acme" / "tiny-qwen2")


@pytest.mark.parametrize("uri", ["hf://acme", "hf://a/b/c", "hf:///x", "acme/x"])
def test_bad_hf_uri(uri):
    with pytest.raises(HubError, match="hf://ORG/NAME"):
        parse_hf_uri(uri)


def test_download_offline_errors_name_the_repo_and_the_fix(tmp_path):
    with pytest.raises(HubError, match=r"'acme/missing' is not in the local hub cache .*HF_HUB_OFFLINE"):
        download_model("acme/missing", str(tmp_path / "out"), cache_dir=str(tmp_path / "hub"))
    with pytest.raises(HubError, match="not a valid Hugging Face repo id"):
        download_model("acme/bad name!", str(tmp_path / "out"), cache_dir=str(tmp_path / "hub"))


def test_tune_download_cli_offline(tiny_checkpoint, tmp_path, capsys):
    assert tune_main(["download", "acme/missing", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tune download: error: model 'acme/missing' is not in the local hub cache")
    assert err.count("\n") == 1  # one line, no traceback
    assert tune_main(["download", "not-a-model"]) == 1
    assert "not a bundled model (smollm2-135m-instruct) and not a hub repo id ORG/NAME" in capsys.readouterr().err
    assert tune_main(["download", "smollm2-135m-instruct", "--revision", "v1"]) == 1
    assert "--revision: only for hub repos" in capsys.readouterr().err


def _hub_response_error(status: int, code: str, repo_id: str) -> Exception:
    """The exception huggingface_hub raises for a hub response with this status and error code."""
    url = f"https://huggingface.co/api/models/{repo_id}/revision/main"
    resp = httpx2.Response(
        status, headers={"X-Error-Code": code, "X-Error-Message": "from the hub"}, request=httpx2.Request("GET", url)
    )
    with pytest.raises(hub.errors.HfHubHTTPError) as info:
        hf_raise_for_status(resp)
    return info.value


def test_hub_errors_are_explained():
    gated = _hub_response_error(403, "GatedRepo", "meta-llama/Llama-3.2-1B")
    assert isinstance(gated, hub.errors.GatedRepoError)
    msg = explain_hub_error(gated, "meta-llama/Llama-3.2-1B")
    assert "is gated" in msg and "HF_TOKEN" in msg and "--hf-token" in msg
    missing = _hub_response_error(404, "RepoNotFound", "acme/nope")
    assert isinstance(missing, hub.errors.RepositoryNotFoundError)
    assert "'acme/nope' does not exist on the Hugging Face Hub" in explain_hub_error(missing, "acme/nope")
    rev = _hub_response_error(404, "RevisionNotFound", "acme/x")
    assert "has no revision 'v9'" in explain_hub_error(rev, "acme/x", "v9")
    assert explain_hub_error(KeyError("x"), "acme/x") is None


# A real repo listing (Qwen/Qwen3-0.6B) and an older one with both weight formats.
QWEN3_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]
MIXED_FILES = [
    "config.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/consolidated.00.pth",
    "README.md",
]


def test_default_patterns_fetch_only_checkpoint_files():
    pick = lambda files, allow: sorted(filter_repo_objects(files, allow_patterns=list(allow)))  # noqa: E731
    assert pick(QWEN3_FILES, CHECKPOINT_PATTERNS) == sorted(
        set(QWEN3_FILES) - {".gitattributes", "LICENSE", "README.md"}
    )
    got = pick(MIXED_FILES, CHECKPOINT_PATTERNS)
    assert not any(f.endswith((".bin", ".pth")) for f in got)
    assert "model-00002-of-00002.safetensors" in got and "model.safetensors.index.json" in got
    assert "tokenizer.model" in got and "README.md" not in got
    assert "pytorch_model-00001-of-00002.bin" in pick(MIXED_FILES, CHECKPOINT_PATTERNS + BIN_PATTERNS)
