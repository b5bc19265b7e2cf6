"""``tune plan``: per-rank memory of a parallel layout, and the layouts that fit a device.

Examples::

    tune plan qwen3-8b --devices 8 --device-memory 80GiB --seq-len 4096
    tune plan smollm2/135M_full_distributed parallelism.pipeline_parallel=2 batch_size=2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tinytune.config import registry
from tinytune.config._errors import ConfigError
from tinytune.config.recipe_settings import DeviceSettings, LoRASettings

_SPECS = Path(__file__).resolve().parents[1] / "distributed" / "model_configs"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan",
        help="estimate per-rank memory of parallel layouts",
        description=(
            "Estimate what the busiest rank holds (parameters, gradients, optimizer state, activations with and "
            "without checkpointing, CE chunk, communication buffers) for a model and a parallel layout, and list "
            f"the layouts of --devices ranks that fit --device-memory. CONFIG: a recipe config (name or YAML), an "
            f"HF checkpoint directory or config.json, or a bundled model spec ({', '.join(_spec_names())})."
        ),
    )
    p.add_argument("config", help="recipe config, HF config.json / checkpoint dir, or a model spec name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe-config overrides (parallelism.*, ...)")
    p.add_argument("--devices", type=int, help="list every layout of this many ranks")
    p.add_argument("--device-memory", help="memory per device, e.g. 80GiB or 64GB: adds a `fits` column")
    p.add_argument("--mode", choices=("full", "lora", "qlora"), help="default: from the config (full)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: dataset.max_seq_len, else 2048)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="rows per micro-batch (default: the config's batch_size / parallelism.microbatches, else 1)",
    )
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="compute dtype (default: the config's, else bf16)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run)


def _spec_names() -> list[str]:
    return sorted(f.stem for f in _SPECS.glob("*.json")) if _SPECS.is_dir() else []


def _hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(
            f"{file}: no HF config.json here; download the model or pass a config.json / model spec "
            f"({', '.join(_spec_names())})."
        )
    with open(file) as f:
        return json.load(f)


def _load(args) -> tuple[dict, dict]:
    """(HF config dict, recipe config as a plain dict or {})."""
    from omegaconf import OmegaConf

    from tinytune.config import load_config

    name = args.config
    if name in _spec_names():
        return _hf_config(str(_SPECS / f"{name}.json")), {}
    if os.path.isdir(name) or name.endswith(".json"):
        return _hf_config(name), {}
    cfg = load_config(registry.resolve_config(name), args.overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    ckpt = plain.get("checkpoint_dir")
    if not ckpt:
        raise ConfigError(f"{name}: has no checkpoint_dir to read the model's config.json from.")
    return _hf_config(os.path.expanduser(str(ckpt))), plain


def run(args: argparse.Namespace) -> int:
    """Print the per-rank memory table."""
    from tinytune.checkpoint.model_info import model_info_from_hf_config
    from tinytune.distributed.memory_plan import Layout, Workload, candidate_layouts, parse_bytes, plan_table

    hf, cfg = _load(args)
    if args.overrides and not cfg:
        raise ConfigError("key=value overrides need a recipe config, not a model spec / config.json.")
    info = model_info_from_hf_config({k: v for k, v in hf.items() if not k.startswith("_")})
    par = cfg.get("parallelism") or {}
    model = cfg.get("model") or {}
    mode = args.mode or ("qlora" if model.get("quantize_base") else "lora" if "lora_rank" in model else "full")
    lora = LoRASettings.from_node(model)  # the recipes' LoRA keys and defaults (apply_lora_to_mlp: true)
    targets = lora.target_modules()
    pp = int(par.get("pipeline_parallel", 1))
    micro = int(par.get("microbatches") or pp)
    rows = args.batch_size or max(1, int(cfg.get("batch_size", 1)) // (micro if pp > 1 else 1))
    seq = args.seq_len or int(par.get("pipeline_seq_len") or (cfg.get("dataset") or {}).get("max_seq_len") or 2048)
    # a recipe config without dtype runs the recipes' default (fp32); a model spec alone assumes bf16
    dtype = args.dtype or {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "float": "fp32"}.get(
        str(cfg.get("dtype", DeviceSettings().dtype if cfg else "bf16")), "bf16"
    )
    ac = (
        args.activation_checkpointing
        if args.activation_checkpointing is not None
        else bool(cfg.get("activation_checkpointing", False))
    )
    work = Workload(
        rows=rows,
        seq_len=seq,
        microbatches=micro,
        mode=mode,
        lora_rank=lora.lora_rank,
        lora_targets=tuple(targets),
        optimizer=str((cfg.get("optimizer") or {}).get("name", "adamw")),
        compute_dtype=dtype,
        activation_checkpointing=ac,
        schedule=str(par.get("pipeline_schedule", "1f1b")),
        fsdp=mode != "qlora",
    )
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    if args.devices:
        layouts = candidate_layouts(info, args.devices)
    else:
        tp, rep = int(par.get("tensor_parallel", 1)), int(par.get("data_parallel_replicate", 1))
        shard = int(par.get("data_parallel_shard", -1))
        if shard == -1:
            shard = 1
        layouts = [Layout(pp=pp, dp_replicate=rep, dp_shard=shard, tp=tp)]
    print(
        f"model: {info.model_type}, {info.num_layers} layers, dim {info.dim}, vocab {info.vocab_size}; {mode}, "
        f"{work.rows} x {work.seq_len} tokens per micro-batch, {work.microbatches} pipeline micro-batches (at least pp), "
        f"{dtype} compute / fp32 master weights, optimizer {work.optimizer}, activation checkpointing "
        f"{'on' if ac else 'off'} (the act column)"
    )
    print(plan_table(info, work, layouts, memory))
    return 0
