"""Preference optimisation (DPO and its relatives) on one device.

Trains on pairs (``chosen`` / ``rejected`` answers to the same prompt) with ``loss``: ``sigmoid``
(DPO: ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``), ``ipo``, ``hinge``, ``robust``,
or the reference-free ``simpo`` and ``orpo`` (:mod:`tinytune.training.preference_losses`). The
reference model is the frozen starting point: for a LoRA policy (a ``lora_*`` builder or LoRA keys
under ``model``) it is the same model with adapters disabled (no extra memory); for full
fine-tuning it is a frozen copy. Reference-free losses build no reference.

    tune run dpo --config smollm2/135M_dpo max_steps=20
"""

from __future__ import annotations

import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.config.recipe_settings import DPOSettings
from tinytune.modules.peft import get_adapter_state_dict
from tinytune.training import (
    NonFiniteGuard,
    PreferenceLoss,
    TrainingState,
    TrainProgress,
    apply_activation_checkpointing,
    build_metric_loggers,
    build_optimizer_and_scheduler,
    config_fingerprint,
    current_lr,
    dpo_accumulate,
    dpo_eval,
    end_after_stop,
    export_hf_model,
    load_model_and_tokenizer,
    log_train_row,
    model_lora,
    open_checkpointer,
    optimizer_step,
    plot_and_write_summary,
    policy_and_reference,
    prepare_output_dir,
    reset_peak_memory,
    run_summary,
    setup_device,
    train_data,
    validation_batches,
)


def recipe_main(cfg: DictConfig) -> dict:
    """DPO training; returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. settings (every key checked here), device, precision, seed, output directory -------
    s = DPOSettings.from_config(cfg)
    loss_fn = PreferenceLoss(s.loss, s.beta, s.label_smoothing, s.gamma)  # rules across loss keys checked here
    loop = s.loop  # log / checkpoint cadence, stop_after, clip
    device, dtype, seed = setup_device(s.hardware, memory_saving=loop.activation_checkpointing)
    out_dir = prepare_output_dir(s.output_dir, cfg)

    # ---- 2. policy, reference, tokenizer -----------------------------------------------------
    checkpoint_dir, tokenizer, model, info = load_model_and_tokenizer(s, device, dtype)
    # LoRA: only adapters train, reference = this model with adapters disabled; full: a frozen copy
    # (reference-free losses: none)
    use_lora, reference = policy_and_reference(model, loss_fn.needs_reference)
    lora = model_lora(s.model) if use_lora else None
    if loop.activation_checkpointing:
        apply_activation_checkpointing(model)
    ref_text = ("base with adapters disabled" if use_lora else "frozen copy") if loss_fn.needs_reference else "none"
    print(
        f"dpo: {'LoRA' if use_lora else 'full'} policy from {checkpoint_dir}, loss={loss_fn.kind}, "
        f"beta={loss_fn.beta}, reference: {ref_text}"
    )

    # ---- 3. data (pairs; the preference dataset brings its pair collate) -----------------------
    data = train_data(s.data, tokenizer, seed, s.hardware.seed)
    stream, accum, total_steps = data.stream, data.accum, data.total_steps
    val_cfg = s.data.validation
    val_loader = validation_batches(data.val_ds, data.batch_size, data.collate) if data.val_ds else None

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    optimizer, lr_scheduler = build_optimizer_and_scheduler(s.optim, model.named_parameters(), total_steps)
    ckpt = open_checkpointer(loop.keep_last_checkpoints, out_dir)
    fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
    state = TrainingState(ckpt, "adapter" if use_lora else "model", optimizer, lr_scheduler, data, fingerprint)
    step = state.resume(loop.resume_from_checkpoint, model, total_steps)

    # ---- 5. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(loop.metric_loggers, out_dir)
    guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="dpo")
    metrics = {"loss": float("nan")}
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        metrics = dpo_accumulate(model, reference, micro_batches, device, loss_fn)
        grad_norm = optimizer_step(
            model, optimizer, lr_scheduler, loop.clip_grad_norm, guard=guard, loss=metrics["loss"], step=step + 1
        )
        step += 1
        dt = progress.tick()
        progress.update(metrics["loss"], lr, metrics["label_tokens"] / max(dt, 1e-9))
        if loop.log_due(step, total_steps):
            row = {**metrics, "lr": lr, "tokens_per_s": metrics["label_tokens"] / max(dt, 1e-9)}
            log_train_row(loggers, step, row, device, grad_norm)
        if val_loader is not None and val_cfg.due(step, total_steps, include_last=True):
            val = dpo_eval(model, reference, val_loader, device, loss_fn, val_cfg.max_batches)
            loggers.log_dict({f"val_{k}": v for k, v in val.items() if k != "pairs"}, step)
        if loop.checkpoint_due(step):
            state.save(step, get_adapter_state_dict(model) if use_lora else model.state_dict())
        if loop.stops_early(step, total_steps):
            return end_after_stop(step, metrics["loss"], out_dir, progress, loggers)
    progress.close()
    loggers.close()

    # ---- 6. export and plot -----------------------------------------------------------------
    summary = run_summary(step, metrics["loss"], out_dir, guard.skipped, data.train_ds)
    summary.update(export_hf_model(model, info, out_dir, checkpoint_dir, lora))  # LoRA: adapter/ + merged
    return plot_and_write_summary(out_dir, summary, t_start, f"dpo: {os.path.basename(out_dir)}")


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
