"""LoRA / QLoRA fine-tuning on one device.

Reads a config (see ``configs/*/*lora*.yaml``), trains low-rank adapters on a frozen base model
(NF4-quantized with a ``qlora_*`` builder or ``model.quantize_base: true``), validates and
checkpoints periodically (exact resume with ``resume_from_checkpoint: auto``), and at the end
writes a PEFT adapter, a merged HF checkpoint, ``metrics.jsonl`` and ``loss.png`` into
``output_dir``. With ``sample_generation.prompts`` it answers the prompts before and after
training and prints both side by side.

    tune run lora_finetune --config smollm2/135M_lora_demo max_steps=20
"""

from __future__ import annotations

import json
import os
import time

import torch
from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import TrainingCheckpointer, save_hf_checkpoint, save_peft_adapter, set_rng_state
from tinytune.modules.peft import disable_adapters, get_adapter_state_dict, get_merged_state_dict, set_trainable_params
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import BatchStream, validation_batches
from tinytune.training.device import get_device, get_dtype, set_seed
from tinytune.training.evaluation import evaluate_loss
from tinytune.training.lr_schedulers import get_lr_scheduler
from tinytune.training.memory import memory_stats, reset_peak_memory
from tinytune.training.metric_logging import build_metric_loggers
from tinytune.training.optim import build_optimizer
from tinytune.training.plotting import plot_loss
from tinytune.training.progress import TrainProgress
from tinytune.training.prompting import generate_replies, get_bound_template, side_by_side
from tinytune.training.setup import (
    build_collate,
    cfg_get,
    load_model,
    load_tokenizer,
    lora_settings,
    prepare_output_dir,
    resolve_checkpoint_dir,
    train_val_datasets,
)
from tinytune.training.steps import current_lr, optimizer_step, sft_accumulate


def recipe_main(cfg: DictConfig) -> dict:
    """LoRA/QLoRA fine-tuning; returns a summary dict (final losses, paths, timings)."""
    t_start = time.perf_counter()
    # ---- 1. device, precision, seed, output directory -------------------------------------
    device = get_device(cfg_get(cfg, "device", "auto"))
    dtype = get_dtype(cfg_get(cfg, "dtype", "fp32"), device)
    seed = set_seed(cfg_get(cfg, "seed", 0))
    out_dir = prepare_output_dir(cfg)

    # ---- 2. model (frozen base + adapters) and tokenizer ----------------------------------
    checkpoint_dir = resolve_checkpoint_dir(cfg)
    tokenizer = load_tokenizer(cfg, checkpoint_dir)
    model, info = load_model(cfg, checkpoint_dir, device, dtype)
    lora_cfg = lora_settings(cfg, model)
    n_trainable = set_trainable_params(model)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {info.model_type} from {checkpoint_dir}; trainable {n_trainable:,} of {n_total:,} parameters")
    if cfg_get(cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)

    # ---- 3. data ---------------------------------------------------------------------------
    train_ds, val_ds = train_val_datasets(cfg, tokenizer)
    collate = build_collate(cfg, tokenizer, train_ds)
    batch_size = int(cfg_get(cfg, "batch_size", 4))
    accum = int(cfg_get(cfg, "gradient_accumulation_steps", 1))
    stream = BatchStream(train_ds, batch_size, collate, shuffle=bool(cfg_get(cfg, "shuffle", True)), seed=seed)
    steps_per_epoch = max(1, stream.batches_per_epoch // accum)
    total_steps = int(cfg_get(cfg, "max_steps", 0)) or int(cfg_get(cfg, "epochs", 1)) * steps_per_epoch
    val_loader = validation_batches(val_ds, int(cfg_get(cfg, "validation.batch_size", batch_size)), collate) if val_ds else None
    print(f"data: {len(train_ds)} train / {len(val_ds) if val_ds else 0} validation samples; "
          f"{total_steps} steps of {accum} x {batch_size} samples")

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    optimizer = build_optimizer(model.parameters(), **dict(cfg_get(cfg, "optimizer", {})))
    sched_cfg = dict(cfg_get(cfg, "lr_scheduler", {"name": "constant"}))
    lr_scheduler = get_lr_scheduler(optimizer, num_training_steps=total_steps, **sched_cfg)
    ckpt = TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=cfg_get(cfg, "keep_last_checkpoints", 2))
    step = 0
    resume_path = ckpt.resolve(cfg_get(cfg, "resume_from_checkpoint"))
    if resume_path:
        state = ckpt.load(resume_path)
        model.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        print(f"resumed from {resume_path} at step {step}")

    def save_training_state() -> None:
        ckpt.save(step, {"adapter": get_adapter_state_dict(model), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "data": stream.state_dict(), "step": step})

    # ---- 5. generation before training (optional) ------------------------------------------
    gen_cfg = cfg_get(cfg, "sample_generation")
    prompts = list(cfg_get(gen_cfg, "prompts", []) or [])
    template = get_bound_template(cfg_get(cfg, "template", "hf"), tokenizer) if prompts else None
    gen_kw = dict(max_new_tokens=int(cfg_get(gen_cfg, "max_new_tokens", 48)), system=cfg_get(gen_cfg, "system"))
    before = []
    if prompts:
        with disable_adapters(model):  # the base model, also when resuming
            before = generate_replies(model, tokenizer, template, prompts, **gen_kw)

    # ---- 6. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(cfg_get(cfg, "metric_loggers"), out_dir)
    log_every = int(cfg_get(cfg, "log_every_n_steps", 1))
    val_every = int(cfg_get(cfg, "validation.every_n_steps", 0))
    val_max_batches = cfg_get(cfg, "validation.max_batches")
    ckpt_every = int(cfg_get(cfg, "checkpoint_every_n_steps", 0))
    stop_after = int(cfg_get(cfg, "stop_after_steps", 0))  # simulate an interruption (resume tests)
    clip = cfg_get(cfg, "clip_grad_norm")
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="lora_finetune")
    train_seconds, train_tokens, loss_value = 0.0, 0, float("nan")
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}  # since the last log line
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        loss, n_tokens = sft_accumulate(model, micro_batches, device)
        grad_norm = optimizer_step(model, optimizer, lr_scheduler, clip)
        step += 1
        dt = progress.tick()
        train_seconds += dt
        train_tokens += n_tokens
        loss_value = float(loss)
        progress.update(loss_value, lr, n_tokens / max(dt, 1e-9))
        window["loss"] += loss_value
        window["steps"] += 1
        window["tokens"] += n_tokens
        window["seconds"] += dt
        if step % log_every == 0 or step == total_steps:  # means over the steps since the last log
            metrics = {"loss": window["loss"] / window["steps"], "lr": lr,
                       "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
                       "label_tokens": window["tokens"], "epoch": stream.epoch, **memory_stats(device)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            loggers.log_dict(metrics, step)
            window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
            reset_peak_memory(device)
        if val_loader is not None and val_every and step % val_every == 0 and step != total_steps:
            val = evaluate_loss(model, val_loader, device, val_max_batches)
            loggers.log_dict({"val_loss": val["loss"], "val_perplexity": val["perplexity"]}, step)
        if (ckpt_every and step % ckpt_every == 0) or (stop_after and step == stop_after):
            save_training_state()
        if stop_after and step >= stop_after and step < total_steps:
            progress.close()
            loggers.close()
            print(f"stopped after step {step} (stop_after_steps); resume with resume_from_checkpoint=auto")
            return {"step": step, "loss": loss_value, "output_dir": out_dir}
    progress.close()

    # ---- 7. final validation, export, plot, generation after ---------------------------------
    summary = {"step": step, "loss": loss_value, "output_dir": out_dir,
               "train_seconds": round(train_seconds, 2), "train_label_tokens": train_tokens}
    if val_loader is not None:
        val = evaluate_loss(model, val_loader, device, val_max_batches)
        loggers.log_dict({"val_loss": val["loss"], "val_perplexity": val["perplexity"]}, step)
        summary.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
    loggers.close()
    if cfg_get(cfg, "save_adapter", True):
        summary["adapter_dir"] = save_peft_adapter(model, info, os.path.join(out_dir, "adapter"), lora_cfg,
                                                   base_model_name_or_path=checkpoint_dir)
    if cfg_get(cfg, "save_merged", True):
        summary["hf_dir"] = save_hf_checkpoint(get_merged_state_dict(model), info, os.path.join(out_dir, "hf_model"),
                                               tokenizer_dir=checkpoint_dir)
    summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                     title=f"lora_finetune: {os.path.basename(out_dir)}")
    if prompts:
        after = generate_replies(model, tokenizer, template, prompts, **gen_kw)
        print(side_by_side(prompts, before, after))
        with open(os.path.join(out_dir, "generations.json"), "w", encoding="utf-8") as f:
            json.dump([{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)], f, indent=2)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"done: {json.dumps(summary, default=str)}")
    return summary


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
