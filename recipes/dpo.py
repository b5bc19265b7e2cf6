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

import copy
import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.datasets import data_summary
from tinytune.modules.peft import get_adapter_params, get_adapter_state_dict, get_merged_state_dict, set_trainable_params
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import validation_batches
from tinytune.training.dpo import dpo_accumulate, dpo_eval, make_reference
from tinytune.training.memory import reset_peak_memory
from tinytune.training.metric_logging import build_metric_loggers, log_train_row, report_early_stop, write_summary
from tinytune.training.plotting import plot_loss
from tinytune.training.preference_losses import PreferenceLoss
from tinytune.training.progress import TrainProgress
from tinytune.training.setup import (
    LoopSettings,
    cfg_get,
    load_model_and_tokenizer,
    lora_settings,
    prepare_output_dir,
    setup_device,
    train_data,
)
from tinytune.training.resume_check import config_fingerprint
from tinytune.training.steps import NonFiniteGuard, build_optimizer_and_scheduler, current_lr, optimizer_step
from tinytune.training.checkpointing import open_checkpointer, resume_training_state, save_training_state


def recipe_main(cfg: DictConfig) -> dict:
    """DPO training; returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. device, precision, seed, output directory -------------------------------------
    device, dtype, seed = setup_device(cfg)
    out_dir = prepare_output_dir(cfg)

    # ---- 2. policy, reference, tokenizer -----------------------------------------------------
    checkpoint_dir, tokenizer, model, info = load_model_and_tokenizer(cfg, device, dtype)
    # settings key: loss (str, "sigmoid"); beta (float, 0.1); label_smoothing (float, 0.0); gamma (float, 0.0)
    loss_fn = PreferenceLoss(str(cfg_get(cfg, "loss", "sigmoid")), float(cfg_get(cfg, "beta", 0.1)),
                             float(cfg_get(cfg, "label_smoothing", 0.0)), float(cfg_get(cfg, "gamma", 0.0)))
    use_lora = bool(get_adapter_params(model))
    frozen = None  # LoRA: reference = this model with adapters disabled; reference-free losses: none
    if use_lora:
        lora_cfg = lora_settings(cfg, model)
        set_trainable_params(model)
    else:
        model.requires_grad_(True)
        if loss_fn.needs_reference:
            frozen = copy.deepcopy(model).requires_grad_(False).eval()  # reference = frozen copy
    reference = make_reference(model, frozen)
    if cfg_get(cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    ref_text = ("base with adapters disabled" if use_lora else "frozen copy") if loss_fn.needs_reference else "none"
    print(f"dpo: {'LoRA' if use_lora else 'full'} policy from {checkpoint_dir}, loss={loss_fn.kind}, "
          f"beta={loss_fn.beta}, reference: {ref_text}")

    # ---- 3. data (pairs; the preference dataset brings its pair collate) -----------------------
    data = train_data(cfg, tokenizer, seed, default_batch_size=2)
    stream, accum, total_steps = data.stream, data.accum, data.total_steps
    val_loader = validation_batches(data.val_ds, data.batch_size, data.collate) if data.val_ds else None

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    optimizer, lr_scheduler = build_optimizer_and_scheduler(cfg, model.parameters(), total_steps)
    ckpt = open_checkpointer(cfg, out_dir)
    fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
    weights_key = "adapter" if use_lora else "model"
    step = resume_training_state(ckpt, cfg_get(cfg, "resume_from_checkpoint"), model=model, weights_key=weights_key,
                                 optimizer=optimizer, lr_scheduler=lr_scheduler, stream=stream, fingerprint=fingerprint,
                                 total_steps=total_steps)

    # ---- 5. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(cfg_get(cfg, "metric_loggers"), out_dir)
    loop = LoopSettings.from_config(cfg)  # log / validate / checkpoint cadence, stop_after, clip
    guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="dpo")
    metrics = {"loss": float("nan")}
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        metrics = dpo_accumulate(model, reference, micro_batches, device, loss_fn)
        grad_norm = optimizer_step(model, optimizer, lr_scheduler, loop.clip, guard=guard, loss=metrics["loss"],
                                   step=step + 1)
        step += 1
        dt = progress.tick()
        progress.update(metrics["loss"], lr, metrics["label_tokens"] / max(dt, 1e-9))
        if step % loop.log_every == 0 or step == total_steps:
            row = {**metrics, "lr": lr, "tokens_per_s": metrics["label_tokens"] / max(dt, 1e-9)}
            log_train_row(loggers, step, row, device, grad_norm)
        if val_loader is not None and loop.val_every and (step % loop.val_every == 0 or step == total_steps):
            val = dpo_eval(model, reference, val_loader, device, loss_fn, loop.val_max_batches)
            loggers.log_dict({f"val_{k}": v for k, v in val.items() if k != "pairs"}, step)
        if (loop.ckpt_every and step % loop.ckpt_every == 0) or (loop.stop_after and step == loop.stop_after):
            weights = get_adapter_state_dict(model) if use_lora else model.state_dict()
            save_training_state(ckpt, step, {weights_key: weights},
                                optimizer=optimizer, lr_scheduler=lr_scheduler, stream=stream,
                                fingerprint=fingerprint)
        if loop.stop_after and step >= loop.stop_after and step < total_steps:
            progress.close()
            loggers.close()
            report_early_stop(step)
            return {"step": step, "loss": metrics["loss"], "output_dir": out_dir}
    progress.close()
    loggers.close()

    # ---- 6. export and plot -----------------------------------------------------------------
    summary = {"step": step, "loss": metrics["loss"], "output_dir": out_dir, "skipped_steps": guard.skipped,
               "data": data_summary(data.train_ds)}
    if use_lora:
        summary["adapter_dir"] = save_peft_adapter(model, info, os.path.join(out_dir, "adapter"), lora_cfg,
                                                   base_model_name_or_path=checkpoint_dir)
        sd = get_merged_state_dict(model)
    else:
        sd = model.state_dict()
    summary["hf_dir"] = save_hf_checkpoint(sd, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir)
    summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                     title=f"dpo: {os.path.basename(out_dir)}")
    return write_summary(out_dir, summary, t_start)


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
