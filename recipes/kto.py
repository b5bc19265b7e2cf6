"""KTO (Kahneman-Tversky Optimisation) on one device, on unpaired examples.

Rows are ``{prompt, completion, label}`` (label true: desirable). The loss (Ethayarajh et al., 2024,
eq. 7) pushes desirable completions' log-ratio ``log pi - log ref`` above a reference point and
undesirable ones below it; the reference point is the KL estimate from mismatched (prompt,
completion) pairs of the same optimizer step (each example's prompt with the previous example's
completion), detached and clamped at 0. ``desirable_weight`` / ``undesirable_weight`` balance
the two kinds. The reference model is the frozen start (LoRA: adapters disabled; full: a copy).

    tune run kto --config smollm2/135M_kto max_steps=20
"""

from __future__ import annotations

import copy
import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.config import ConfigError
from tinytune.modules.peft import get_adapter_params, get_adapter_state_dict, get_merged_state_dict, set_trainable_params
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import validation_batches
from tinytune.training.dpo import make_reference
from tinytune.training.kto import kto_accumulate, kto_eval
from tinytune.training.memory import reset_peak_memory
from tinytune.training.metric_logging import build_metric_loggers, log_train_row, report_early_stop, write_summary
from tinytune.training.plotting import plot_loss
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
    """KTO training; returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. device, precision, seed, output directory -------------------------------------
    device, dtype, seed = setup_device(cfg)
    out_dir = prepare_output_dir(cfg)

    # ---- 2. policy, reference, tokenizer, loss parameters --------------------------------------
    checkpoint_dir, tokenizer, model, info = load_model_and_tokenizer(cfg, device, dtype)
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
    # settings key: beta (float, 0.1); desirable_weight (float, 1.0); undesirable_weight (float, 1.0)
    kto = dict(beta=float(cfg_get(cfg, "beta", 0.1)), desirable_weight=float(cfg_get(cfg, "desirable_weight", 1.0)),
               undesirable_weight=float(cfg_get(cfg, "undesirable_weight", 1.0)))
    if kto["beta"] <= 0 or kto["desirable_weight"] < 0 or kto["undesirable_weight"] < 0:
        raise ConfigError(f"beta must be > 0 and the weights >= 0 (got {kto})")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    print(f"kto: {'LoRA' if use_lora else 'full'} policy from {checkpoint_dir}, {kto}")

    # ---- 3. data (unpaired rows; kto_dataset brings its collate) --------------------------------
    data = train_data(cfg, tokenizer, seed, default_batch_size=4)
    stream, accum, total_steps = data.stream, data.accum, data.total_steps
    if data.batch_size * accum < 2:
        raise ConfigError("batch_size x gradient_accumulation_steps: KTO's KL estimate needs >= 2 examples a step")
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
    progress = TrainProgress(total_steps, initial_step=step, desc="kto")
    metrics = {"loss": float("nan")}
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        metrics = kto_accumulate(model, reference, micro_batches, device, pad_id=pad_id, **kto)
        grad_norm = optimizer_step(model, optimizer, lr_scheduler, loop.clip, guard=guard, loss=metrics["loss"],
                                   step=step + 1)
        step += 1
        dt = progress.tick()
        progress.update(metrics["loss"], lr, metrics["label_tokens"] / max(dt, 1e-9))
        if step % loop.log_every == 0 or step == total_steps:
            row = {**metrics, "lr": lr, "tokens_per_s": metrics["label_tokens"] / max(dt, 1e-9)}
            log_train_row(loggers, step, row, device, grad_norm)
        if val_loader is not None and loop.val_every and (step % loop.val_every == 0 or step == total_steps):
            val = kto_eval(model, reference, val_loader, device, pad_id=pad_id, max_batches=loop.val_max_batches,
                           **kto)
            loggers.log_dict({f"val_{k}": v for k, v in val.items() if k != "examples"}, step)
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
    summary = {"step": step, "loss": metrics["loss"], "output_dir": out_dir, "skipped_steps": guard.skipped}
    if use_lora:
        summary["adapter_dir"] = save_peft_adapter(model, info, os.path.join(out_dir, "adapter"), lora_cfg,
                                                   base_model_name_or_path=checkpoint_dir)
        sd = get_merged_state_dict(model)
    else:
        sd = model.state_dict()
    summary["hf_dir"] = save_hf_checkpoint(sd, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir)
    summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                     title=f"kto: {os.path.basename(out_dir)}")
    return write_summary(out_dir, summary, t_start)


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
