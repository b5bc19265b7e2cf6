"""Full fine-tuning on one device: every parameter is trained.

Reads a config (see ``configs/*/*full*.yaml``), trains the whole model with token-normalised
gradient accumulation, validates and checkpoints periodically (exact resume with
``resume_from_checkpoint: auto``), and at the end writes an HF checkpoint, ``metrics.jsonl`` and
``loss.png`` into ``output_dir``. With ``sample_generation.prompts`` it answers the prompts
before and after training and prints both side by side.

    tune run full_finetune --config smollm2/135M_full max_steps=20
"""

from __future__ import annotations

import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import save_hf_checkpoint
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.data import validation_batches
from tinytune.training.evaluation import evaluate_loss
from tinytune.training.gguf_export import export_gguf, export_gguf_type
from tinytune.training.memory import reset_peak_memory
from tinytune.training.metric_logging import (
    LogWindow,
    build_metric_loggers,
    log_train_row,
    report_early_stop,
    validation_row,
    write_summary,
)
from tinytune.training.plotting import plot_loss
from tinytune.training.progress import TrainProgress
from tinytune.training.prompting import SampleGenerations
from tinytune.training.setup import (
    LoopSettings,
    cfg_get,
    load_model_and_tokenizer,
    prepare_output_dir,
    setup_device,
    train_data,
)
from tinytune.training.resume_check import config_fingerprint
from tinytune.training.steps import (
    NonFiniteGuard,
    build_optimizer_and_scheduler,
    current_lr,
    optimizer_step,
    sft_accumulate,
)
from tinytune.training.checkpointing import open_checkpointer, resume_training_state, save_training_state


def recipe_main(cfg: DictConfig) -> dict:
    """Full fine-tuning; returns a summary dict (final losses, paths, timings)."""
    t_start = time.perf_counter()
    # ---- 1. device, precision, seed, output directory -------------------------------------
    device, dtype, seed = setup_device(cfg)
    out_dir = prepare_output_dir(cfg)
    gguf_type = export_gguf_type(cfg)  # export_gguf: checked before training

    # ---- 2. model and tokenizer ---------------------------------------------------------------
    checkpoint_dir, tokenizer, model, info = load_model_and_tokenizer(cfg, device, dtype)
    model.requires_grad_(True)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {info.model_type} from {checkpoint_dir}; training all {n_total:,} parameters")
    if cfg_get(cfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)

    # ---- 3. data ---------------------------------------------------------------------------
    data = train_data(cfg, tokenizer, seed)
    stream, accum, total_steps = data.stream, data.accum, data.total_steps
    val_batch_size = int(cfg_get(cfg, "validation.batch_size", data.batch_size))
    val_loader = validation_batches(data.val_ds, val_batch_size, data.collate) if data.val_ds else None
    print(f"data: {getattr(data.train_ds, '__len__', lambda: 'streaming')()} train / {len(data.val_ds) if data.val_ds else 0} validation samples; "
          f"{total_steps} steps of {accum} x {data.batch_size} samples")

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    optimizer, lr_scheduler = build_optimizer_and_scheduler(cfg, model.parameters(), total_steps)
    ckpt = open_checkpointer(cfg, out_dir)
    fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
    step = resume_training_state(ckpt, cfg_get(cfg, "resume_from_checkpoint"), model=model, weights_key="model",
                                 optimizer=optimizer, lr_scheduler=lr_scheduler, stream=stream, fingerprint=fingerprint,
                                 total_steps=total_steps)

    # ---- 5. generation before training (optional) ------------------------------------------
    samples = SampleGenerations(cfg, tokenizer)
    if samples.prompts and step:
        print("note: resumed run; 'before' answers come from the resumed weights, not the base model")
    samples.generate_before(model)

    # ---- 6. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(cfg_get(cfg, "metric_loggers"), out_dir)
    loop = LoopSettings.from_config(cfg)  # log / validate / checkpoint cadence, stop_after, clip
    guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="full_finetune")
    window = LogWindow()  # means since the last log line, and run totals
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        loss, n_tokens = sft_accumulate(model, micro_batches, device, loop.padding_free)
        grad_norm = optimizer_step(model, optimizer, lr_scheduler, loop.clip, guard=guard, loss=loss, step=step + 1)
        step += 1
        dt = progress.tick()
        window.add(float(loss), n_tokens, dt)
        progress.update(window.last_loss, lr, n_tokens / max(dt, 1e-9))
        if step % loop.log_every == 0 or step == total_steps:  # means over the steps since the last log
            log_train_row(loggers, step, window.flush(lr, stream.epoch), device, grad_norm)
        if val_loader is not None and loop.val_every and step % loop.val_every == 0 and step != total_steps:
            val = evaluate_loss(model, val_loader, device, loop.val_max_batches, loop.padding_free)
            loggers.log_dict(validation_row(val), step)
        if (loop.ckpt_every and step % loop.ckpt_every == 0) or (loop.stop_after and step == loop.stop_after):
            save_training_state(ckpt, step, {"model": model.state_dict()},
                                optimizer=optimizer, lr_scheduler=lr_scheduler, stream=stream,
                                fingerprint=fingerprint)
        if loop.stop_after and step >= loop.stop_after and step < total_steps:
            progress.close()
            loggers.close()
            report_early_stop(step)
            return {"step": step, "loss": window.last_loss, "output_dir": out_dir}
    progress.close()

    # ---- 7. final validation, export, plot, generation after ---------------------------------
    summary = {"step": step, "loss": window.last_loss, "output_dir": out_dir, "skipped_steps": guard.skipped,
               **window.totals()}
    if val_loader is not None:
        val = validation_row(evaluate_loss(model, val_loader, device, loop.val_max_batches, loop.padding_free))
        loggers.log_dict(val, step)
        summary.update(val)
    loggers.close()
    if cfg_get(cfg, "save_hf", True):
        summary["hf_dir"] = save_hf_checkpoint(model.state_dict(), info, os.path.join(out_dir, "hf_model"),
                                               tokenizer_dir=checkpoint_dir)
    summary.update(export_gguf(gguf_type, model.state_dict(), info, checkpoint_dir, out_dir,
                               tokenizer.chat_template))
    summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                     title=f"full_finetune: {os.path.basename(out_dir)}")
    summary.update(samples.generate_after(model, out_dir))  # held-out fractions, if any
    return write_summary(out_dir, summary, t_start)


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
