"""Direct Preference Optimization (DPO, sigmoid loss) on one device.

Trains on pairs (``chosen`` / ``rejected`` answers to the same prompt). The reference model is
the frozen starting point: for a LoRA policy (a ``lora_*`` builder or LoRA keys under ``model``)
it is the same model with adapters disabled (no extra memory); for full fine-tuning it is a
frozen copy. Loss: ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``.

    tune run dpo --config smollm2/135M_dpo max_steps=20
"""

from __future__ import annotations

import copy
import json
import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import TrainingCheckpointer, save_hf_checkpoint, save_peft_adapter, set_rng_state
from tinytune.modules.peft import get_adapter_params, get_adapter_state_dict, get_merged_state_dict, set_trainable_params
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import BatchStream, validation_batches
from tinytune.training.device import get_device, get_dtype, set_seed
from tinytune.training.dpo import dpo_accumulate, dpo_eval, make_reference
from tinytune.training.lr_schedulers import get_lr_scheduler
from tinytune.training.memory import memory_stats, reset_peak_memory
from tinytune.training.metric_logging import build_metric_loggers
from tinytune.training.optim import build_optimizer
from tinytune.training.plotting import plot_loss
from tinytune.training.progress import TrainProgress
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
from tinytune.training.steps import current_lr, optimizer_step


def recipe_main(cfg: DictConfig) -> dict:
    """DPO training; returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. device, precision, seed, output directory -------------------------------------
    device = get_device(cfg_get(cfg, "device", "auto"))
    dtype = get_dtype(cfg_get(cfg, "dtype", "fp32"), device)
    seed = set_seed(cfg_get(cfg, "seed", 0))
    out_dir = prepare_output_dir(cfg)

    # ---- 2. policy, reference, tokenizer -----------------------------------------------------
    checkpoint_dir = resolve_checkpoint_dir(cfg)
    tokenizer = load_tokenizer(cfg, checkpoint_dir)
    model, info = load_model(cfg, checkpoint_dir, device, dtype)
    use_lora = bool(get_adapter_params(model))
    if use_lora:
        lora_cfg = lora_settings(cfg, model)
        set_trainable_params(model)
        frozen = None  # reference = this model with adapters disabled
    else:
        model.requires_grad_(True)
        frozen = copy.deepcopy(model).requires_grad_(False).eval()  # reference = frozen copy
    reference = make_reference(model, frozen)
    if cfg_get(cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    beta = float(cfg_get(cfg, "beta", 0.1))
    label_smoothing = float(cfg_get(cfg, "label_smoothing", 0.0))
    print(f"dpo: {'LoRA' if use_lora else 'full'} policy from {checkpoint_dir}, beta={beta}")

    # ---- 3. data (pairs) ---------------------------------------------------------------------
    train_ds, val_ds = train_val_datasets(cfg, tokenizer)
    collate = build_collate(cfg, tokenizer, train_ds)  # the preference dataset's pair collate
    batch_size = int(cfg_get(cfg, "batch_size", 2))
    accum = int(cfg_get(cfg, "gradient_accumulation_steps", 1))
    stream = BatchStream(train_ds, batch_size, collate, shuffle=bool(cfg_get(cfg, "shuffle", True)), seed=seed)
    steps_per_epoch = max(1, stream.batches_per_epoch // accum)
    total_steps = int(cfg_get(cfg, "max_steps", 0)) or int(cfg_get(cfg, "epochs", 1)) * steps_per_epoch
    val_loader = validation_batches(val_ds, batch_size, collate) if val_ds else None

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    optimizer = build_optimizer(model.parameters(), **dict(cfg_get(cfg, "optimizer", {})))
    lr_scheduler = get_lr_scheduler(optimizer, num_training_steps=total_steps,
                                    **dict(cfg_get(cfg, "lr_scheduler", {"name": "constant"})))
    ckpt = TrainingCheckpointer(os.path.join(out_dir, "checkpoints"), keep_last=cfg_get(cfg, "keep_last_checkpoints", 2))
    weights_key = "adapter" if use_lora else "model"
    step = 0
    resume_path = ckpt.resolve(cfg_get(cfg, "resume_from_checkpoint"))
    if resume_path:
        state = ckpt.load(resume_path)
        model.load_state_dict(state[weights_key], strict=not use_lora)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        print(f"resumed from {resume_path} at step {step}")

    def save_training_state() -> None:
        weights = get_adapter_state_dict(model) if use_lora else model.state_dict()
        ckpt.save(step, {weights_key: weights, "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(), "data": stream.state_dict(), "step": step})

    # ---- 5. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(cfg_get(cfg, "metric_loggers"), out_dir)
    log_every = int(cfg_get(cfg, "log_every_n_steps", 1))
    val_every = int(cfg_get(cfg, "validation.every_n_steps", 0))
    ckpt_every = int(cfg_get(cfg, "checkpoint_every_n_steps", 0))
    stop_after = int(cfg_get(cfg, "stop_after_steps", 0))
    clip = cfg_get(cfg, "clip_grad_norm")
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="dpo")
    metrics = {"loss": float("nan")}
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        metrics = dpo_accumulate(model, reference, micro_batches, device, beta, label_smoothing)
        grad_norm = optimizer_step(model, optimizer, lr_scheduler, clip)
        step += 1
        dt = progress.tick()
        progress.update(metrics["loss"], lr, metrics["label_tokens"] / max(dt, 1e-9))
        if step % log_every == 0 or step == total_steps:
            row = {**metrics, "lr": lr, "tokens_per_s": metrics["label_tokens"] / max(dt, 1e-9), **memory_stats(device)}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            loggers.log_dict(row, step)
            reset_peak_memory(device)
        if val_loader is not None and val_every and (step % val_every == 0 or step == total_steps):
            val = dpo_eval(model, reference, val_loader, device, beta, cfg_get(cfg, "validation.max_batches"))
            loggers.log_dict({"val_loss": val["loss"], "val_rewards_accuracy": val["rewards_accuracy"]}, step)
        if (ckpt_every and step % ckpt_every == 0) or (stop_after and step == stop_after):
            save_training_state()
        if stop_after and step >= stop_after and step < total_steps:
            progress.close()
            loggers.close()
            print(f"stopped after step {step} (stop_after_steps); resume with resume_from_checkpoint=auto")
            return {"step": step, "loss": metrics["loss"], "output_dir": out_dir}
    progress.close()
    loggers.close()

    # ---- 6. export and plot -----------------------------------------------------------------
    summary = {"step": step, "loss": metrics["loss"], "output_dir": out_dir}
    if use_lora:
        summary["adapter_dir"] = save_peft_adapter(model, info, os.path.join(out_dir, "adapter"), lora_cfg,
                                                   base_model_name_or_path=checkpoint_dir)
        sd = get_merged_state_dict(model)
    else:
        sd = model.state_dict()
    summary["hf_dir"] = save_hf_checkpoint(sd, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir)
    summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                     title=f"dpo: {os.path.basename(out_dir)}")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"done: {json.dumps(summary, default=str)}")
    return summary


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
