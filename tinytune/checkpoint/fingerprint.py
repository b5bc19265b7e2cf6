"""Run fingerprints: what a training checkpoint belongs to, so a resume can refuse a foreign one.

A fingerprint is a JSON-able dict stored in the checkpoint's ``COMPLETE`` marker:

* ``trainable``: name -> shape of every trained tensor (LoRA targets and rank, or the full model);
* ``base_model``: digest of the base checkpoint's ``config.json`` (architecture and sizes);
* ``dataset``: the training data's identity (token-cache key, sample count, a digest of the order
  of samples it exposes);
* ``settings``: the config values that change the training trajectory (seed, batch size,
  optimizer, schedule shape, LoRA alpha, data options, ...).

Values that may change between the parts of one run (``max_steps``, ``epochs``, logging,
checkpoint cadence, output paths) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from torch import nn

from tinytune.errors import ResumeError

FRESH_START_HINT = (
    "To start fresh instead, set resume_from_checkpoint=null (the checkpoints in this output_dir "
    "are then overwritten as the new run reaches their steps) or use a new output_dir."
)


def _plain(obj: Any) -> Any:
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def trainable_layout(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of every parameter with ``requires_grad`` (global shapes for DTensors)."""
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What identifies the samples a dataset yields, in their order.

    Uses the token-cache key when the dataset (or one it wraps) reads a token cache, the sample
    count, and a digest of the indices exposed (a split or a packing); any other dataset is
    identified by a digest of its first and last 16 items.
    """
    try:
        n = len(dataset)
    except TypeError:  # an iterable dataset: identified by its type only
        return {"type": type(dataset).__name__}
    out: dict[str, Any] = {"type": type(dataset).__name__, "len": n}
    node, chain = dataset, []
    for _ in range(8):  # unwrap Subset / PackedDataset / split views
        chain.append(type(node).__name__)
        for attr in ("indices", "bins"):
            val = getattr(node, attr, None)
            if val is not None:
                out[f"{type(node).__name__}.{attr}"] = _digest(val)
        cache = getattr(node, "cache", None)
        if cache is not None and getattr(cache, "path", None):
            out["token_cache"] = os.path.basename(os.path.normpath(str(cache.path)))
            break
        inner = getattr(node, "dataset", None)
        if inner is None:
            break
        node = inner
    out["chain"] = chain
    if "token_cache" not in out:
        picks = sorted(set(list(range(min(16, n))) + list(range(max(0, n - 16), n))))
        out["items"] = _digest([dataset[i] for i in picks])
    return out


def run_fingerprint(
    *, model: nn.Module, base_model_config: dict[str, Any] | None, dataset: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    """The fingerprint of a training run (see the module docstring).

    Args:
        model: the model being trained (its trainable parameters' names and shapes).
        base_model_config: the base checkpoint's ``config.json`` dict (None: unknown).
        dataset: the training dataset.
        settings: trajectory-changing config values, ``{key: plain value}``.
    """
    return {
        "trainable": trainable_layout(model),
        "base_model": _digest(base_model_config) if base_model_config is not None else None,
        "dataset": dataset_identity(dataset),
        "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
    }


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per difference between a checkpoint's fingerprint and this run's (empty: same run)."""
    lines = []
    a, b = saved.get("trainable", {}), current.get("trainable", {})
    only_ckpt, only_run = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_ckpt or only_run:
        lines.append(
            f"trained parameters (model/LoRA layout): {len(only_ckpt)} only in the checkpoint "
            f"{only_ckpt[:3]}, {len(only_run)} only in this run {only_run[:3]}"
        )
    reshaped = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if reshaped:
        k = reshaped[0]
        lines.append(
            f"trained parameter shapes (e.g. lora_rank): {len(reshaped)} differ, e.g. {k}: "
            f"checkpoint {a[k]}, this run {b[k]}"
        )
    if saved.get("base_model") != current.get("base_model"):
        lines.append("base model: its config.json differs (another model or architecture)")
    da, db = saved.get("dataset", {}), current.get("dataset", {})
    if da != db:
        keys = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        lines.append(f"dataset: differs in {keys} (other data, tokenization, split or packing)")
    sa, sb = _flatten(saved.get("settings", {})), _flatten(current.get("settings", {}))
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            lines.append(f"{key}: checkpoint {_short(sa.get(key))}, this run {_short(sb.get(key))}")
    return lines


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lora_rank": 8}}`` -> ``{"model.lora_rank": 8}`` (so a difference names the leaf key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_fingerprint(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str) -> None:
    """Refuses to resume ``checkpoint`` when it was written by a different run.

    Raises:
        ResumeError: listing every difference and how to start fresh.
    """
    if saved is None:
        return
    lines = fingerprint_differences(saved, current)
    if lines:
        listing = "\n  - ".join(lines)
        raise ResumeError(
            f"resume_from_checkpoint: {checkpoint} was written by a different run; it differs in:\n"
            f"  - {listing}\nRestore those settings to continue it. {FRESH_START_HINT}"
        )
