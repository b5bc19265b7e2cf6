"""Multi-process SFT with FSDP2, optional tensor parallelism and DCP checkpoints.

Launch (one node, 2 processes)::

    tune run --nproc_per_node 2 full_finetune_distributed --config smollm2/135M_full_distributed

Flow:
 1. process group + device mesh ``(dp_replicate, dp_shard, tp)`` from ``parallelism.*``;
 2. model built on the meta device, tensor-parallelised (``tensor_parallel > 1``), sharded with
    ``fully_shard`` per layer + root, then filled from the HF checkpoint shard by shard;
 3. each data-parallel rank reads its slice of every global batch (resumable sampler);
 4. per optimizer step: ``gradient_accumulation_steps`` micro-batches, gradient sync only on the
    last; the loss is divided by the label-token count of the whole step summed over ranks, so
    the update equals one process running the global batch;
 5. every ``save_every_n_steps``: sharded DCP checkpoint (model, optimizer, scheduler, sampler
    position, RNG) for ``resume_from_checkpoint: auto``; at the end the full model is gathered
    on rank 0 and written as an HF safetensors checkpoint (plus the PEFT adapter for LoRA).

``lora_finetune_distributed`` runs the same loop with LoRA adapters (the ``lora`` config
section) and only the adapters trainable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.data import DataLoader

from tinytune import config
from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.training.dcp import DistributedCheckpointer
from tinytune.training.device import get_dtype, set_seed
from tinytune.training.dist_sampler import ResumableDistributedSampler
from tinytune.training.distributed import (
    ParallelDims,
    all_reduce_sum,
    build_device_mesh,
    get_dp_info,
    init_distributed,
    is_rank_zero,
    shutdown_distributed,
)
from tinytune.training.fsdp import clip_grad_norm_, gather_full_state_dict, set_gradient_sync
from tinytune.training.losses import IGNORE_INDEX, count_label_tokens, sft_loss_sum
from tinytune.training.lr_schedulers import get_lr_scheduler
from tinytune.training.metric_logging import build_metric_loggers
from tinytune.training.optim import build_optimizer
from tinytune.training.sharded_model import load_hf_model_sharded


def _build_data(cfg: DictConfig, dp_rank: int, dp_size: int, seed: int):
    """Dataset (instantiated from ``cfg.dataset``), sampler and loader for this dp rank."""
    from tinytune.datasets import padded_collate

    kwargs: dict[str, Any] = {}
    tokenizer = None
    if cfg.get("tokenizer") is not None:
        from tinytune.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer.path)
        kwargs["tokenizer"] = tokenizer
    dataset = config.instantiate(cfg.dataset, **kwargs)
    sampler = ResumableDistributedSampler(len(dataset), dp_size, dp_rank, shuffle=cfg.get("shuffle", True), seed=seed)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    collate = functools.partial(padded_collate, pad_id=pad_id, ignore_index=IGNORE_INDEX)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
        num_workers=cfg.get("num_workers", 0),
    )
    return sampler, loader


def _lora_setup(cfg: DictConfig):
    """(linear_factory, trainable_fn, lora settings dict) for the ``lora`` config section."""
    from tinytune.models.lora_builders import lora_target_modules
    from tinytune.modules.peft import lora_linear_factory, set_trainable_params

    lc = cfg.lora
    targets = lora_target_modules(lc.lora_attn_modules, lc.get("apply_lora_to_mlp", False),
                                  lc.get("apply_lora_to_output", False))
    factory = lora_linear_factory(targets, rank=lc.lora_rank, alpha=lc.lora_alpha, dropout=lc.get("lora_dropout", 0.0))
    settings = {"lora_rank": lc.lora_rank, "lora_alpha": lc.lora_alpha, "lora_dropout": lc.get("lora_dropout", 0.0)}
    return factory, set_trainable_params, settings


def finetune(cfg: DictConfig, lora: bool) -> None:
    """The training loop shared by the full and LoRA distributed recipes (see module docstring)."""
    fsdp_cfg = cfg.get("fsdp") or {}
    par = cfg.get("parallelism") or {}
    dist_info = init_distributed(cfg.get("device", "auto"), cpu_offload=fsdp_cfg.get("cpu_offload", False))
    device = dist_info.device
    seed = set_seed(cfg.get("seed"))
    dims = ParallelDims.from_config(
        dist_info.world_size,
        data_parallel_shard=par.get("data_parallel_shard", -1),
        data_parallel_replicate=par.get("data_parallel_replicate", 1),
        tensor_parallel=par.get("tensor_parallel", 1),
    )
    mesh = build_device_mesh(dims, device.type)
    dp_rank, dp_size = get_dp_info(mesh)
    use_loss_parallel = bool(par.get("loss_parallel", False))
    compute_dtype = get_dtype(cfg.get("dtype", "bf16"), device)

    factory, trainable, lora_settings = _lora_setup(cfg) if lora else (None, None, None)
    if use_loss_parallel and lora and cfg.lora.get("apply_lora_to_output", False):
        raise ValueError("parallelism.loss_parallel cannot be combined with lora.apply_lora_to_output.")
    ac = None
    if cfg.get("activation_checkpointing", False):
        from tinytune.training.activation_checkpointing import apply_activation_checkpointing as ac
    model, info = load_hf_model_sharded(
        cfg.model.path, mesh, device,
        linear_factory=factory, trainable=trainable, loss_parallel=use_loss_parallel, activation_checkpointing=ac,
        fsdp={
            "param_dtype": None if compute_dtype == torch.float32 else compute_dtype,
            "reduce_dtype": torch.float32,
            "cpu_offload": fsdp_cfg.get("cpu_offload", False),
            "reshard_after_forward": fsdp_cfg.get("reshard_after_forward", True),
        },
    )
    optimizer = build_optimizer(model.parameters(), **OmegaConf.to_container(cfg.optimizer, resolve=True))

    sampler, loader = _build_data(cfg, dp_rank, dp_size, seed)
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"Each data-parallel rank gets {len(loader)} batches per epoch, fewer than gradient_accumulation_steps="
            f"{accum}; lower batch_size / gradient_accumulation_steps or use more data."
        )
    epochs = int(cfg.get("epochs", 1))
    total_steps = epochs * steps_per_epoch
    if cfg.get("max_steps") is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
    sched_cfg = OmegaConf.to_container(cfg.get("lr_scheduler") or {"name": "constant"}, resolve=True)
    scheduler = get_lr_scheduler(optimizer, num_training_steps=total_steps, **sched_cfg)

    output_dir = cfg.output_dir
    checkpointer = DistributedCheckpointer(output_dir, keep_last=cfg.get("keep_last", 2))
    global_step, epoch, batches_done = 0, 0, 0
    resume = checkpointer.resolve(cfg.get("resume_from_checkpoint", "auto"))
    if resume is not None:
        state = checkpointer.load(resume, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        global_step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        if is_rank_zero():
            print(f"Resumed from {resume} at step {global_step}", flush=True)

    loggers = build_metric_loggers(cfg.get("metric_loggers"), output_dir) if is_rank_zero() else None
    stop_after = cfg.get("stop_after_steps")
    stop_at = min(total_steps, global_step + int(stop_after)) if stop_after is not None else total_steps
    save_every = cfg.get("save_every_n_steps")
    max_norm = cfg.get("clip_grad_norm")
    loss_ctx = loss_parallel if use_loss_parallel else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    while global_step < stop_at and epoch < epochs:
        sampler.set_epoch(epoch, start_index=batches_done * cfg.batch_size)
        batches = iter(loader)
        while global_step < stop_at and batches_done + accum <= steps_per_epoch * accum:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
            # Global label-token count of this step: every rank divides by the same number.
            num_tokens = all_reduce_sum(count_label_tokens(micro).to(device), mesh.dp).clamp(min=1).float()
            step_loss = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                set_gradient_sync(model, i == accum - 1)
                with loss_ctx():
                    if use_loss_parallel:  # logits stay sharded by vocabulary
                        logits = model(batch["tokens"], input_pos=batch.get("input_pos"), seq_lens=batch.get("seq_lens"))
                        loss = torch.nn.functional.cross_entropy(
                            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                        ) / num_tokens
                    else:
                        loss = sft_loss_sum(model, batch) / num_tokens
                    # FSDP averages gradients over dp ranks; undo it so they sum (token normalisation is global).
                    (loss * dp_size).backward()
                step_loss += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
            grad_norm = clip_grad_norm_(params, max_norm) if max_norm is not None else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            batches_done += accum
            step_loss = all_reduce_sum(step_loss, mesh.dp)  # sum of per-rank shares = global token mean
            if loggers is not None and global_step % cfg.get("log_every_n_steps", 1) == 0:
                metrics = {"loss": step_loss.item(), "lr": scheduler.get_last_lr()[0], "tokens": int(num_tokens.item()),
                           "step_time_s": time.perf_counter() - t0, "epoch": epoch}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                loggers.log_dict(metrics, step=global_step)
            if save_every and global_step % int(save_every) == 0 and global_step < total_steps:
                checkpointer.save(global_step, model, optimizer, {
                    "step": global_step, "epoch": epoch, "batches_done": batches_done, "seed": seed,
                    "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(batches_done * cfg.batch_size),
                })
        if batches_done + accum > steps_per_epoch * accum:
            epoch, batches_done = epoch + 1, 0

    if global_step >= total_steps:
        _save_final(model, info, cfg, lora_settings)
    elif save_every is None or global_step % int(save_every):  # stopped early: keep a resumable state
        checkpointer.save(global_step, model, optimizer, {
            "step": global_step, "epoch": epoch, "batches_done": batches_done, "seed": seed,
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(batches_done * cfg.batch_size),
        })
    if loggers is not None:
        loggers.close()


def _save_final(model, info, cfg: DictConfig, lora_settings: dict | None) -> None:
    """Gather the full model on rank 0 and write HF safetensors (and the PEFT adapter for LoRA)."""
    full = gather_full_state_dict(model)  # collective: every rank calls it
    if is_rank_zero():
        out = os.path.join(cfg.output_dir, "hf_model")
        save_hf_checkpoint(full, info, out, tokenizer_dir=cfg.model.path, lora_cfg=lora_settings)
        if lora_settings is not None:
            adapter = {k: v for k, v in full.items() if ".lora_" in k}
            save_peft_adapter(adapter, info, os.path.join(cfg.output_dir, "adapter"), lora_settings)
        print(f"Saved {out}", flush=True)


def run(cfg: DictConfig, lora: bool) -> None:
    """Run :func:`finetune`; tear the process group down afterwards if this call created it."""
    owns_group = not torch.distributed.is_initialized()
    finetune(cfg, lora=lora)
    if owns_group:
        shutdown_distributed()


def recipe_main(cfg: DictConfig) -> None:
    """Full-parameter distributed fine-tuning (FSDP2 / TP / DCP)."""
    run(cfg, lora=False)


if __name__ == "__main__":
    config.parse(recipe_main)()
