"""Reward model training on one device: a scalar head on the decoder, Bradley-Terry loss on pairs.

Each sequence's score is ``score(h_last)``: a ``Linear(dim, 1)`` on the final hidden state at its
last non-padding token (:class:`tinytune.modules.reward_head.RewardModel`). The loss is
``-log sigmoid(r_chosen - r_rejected)`` averaged over the pairs of an optimizer step; validation
reports the loss and the accuracy (chosen scored above rejected). The result is exported as an HF
``<Arch>ForSequenceClassification`` checkpoint (``hf_model/``) that transformers loads with the
same scores. Full fine-tuning or LoRA (the head is always trained in full; the export is merged).

    tune run reward_model --config smollm2/135M_reward max_steps=20
"""

from __future__ import annotations

import os
import time

import torch
from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import save_reward_checkpoint
from tinytune.config.recipe_settings import RewardModelSettings
from tinytune.modules.peft import get_adapter_params, get_merged_state_dict, set_trainable_params
from tinytune.modules.reward_head import RewardModel
from tinytune.training import (
    NonFiniteGuard,
    TrainingState,
    TrainProgress,
    apply_activation_checkpointing,
    build_metric_loggers,
    build_optimizer_and_scheduler,
    config_fingerprint,
    current_lr,
    end_after_stop,
    load_model_and_tokenizer,
    log_train_row,
    open_checkpointer,
    optimizer_step,
    plot_and_write_summary,
    prepare_output_dir,
    reset_peak_memory,
    reward_accumulate,
    reward_eval,
    run_summary,
    setup_device,
    train_data,
    validation_batches,
)


def recipe_main(cfg: DictConfig) -> dict:
    """Reward-model training; returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. settings (every key checked here), device, precision, seed, output directory -------
    s = RewardModelSettings.from_config(cfg)
    loop = s.loop  # log / checkpoint cadence, stop_after, clip
    device, dtype, seed = setup_device(s.hardware, memory_saving=loop.activation_checkpointing)
    out_dir = prepare_output_dir(s.output_dir, cfg)

    # ---- 2. decoder + score head, tokenizer --------------------------------------------------
    checkpoint_dir, tokenizer, decoder, info = load_model_and_tokenizer(s, device, dtype)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    model = RewardModel(decoder, info.dim, pad_id).to(device)
    torch.nn.init.normal_(model.score.weight, std=0.02)  # as HF initialises a fresh score head
    model.score.to(dtype)
    use_lora = bool(get_adapter_params(model))
    if use_lora:
        set_trainable_params(model)  # adapters only ...
        model.score.requires_grad_(True)  # ... plus the head
    else:
        model.requires_grad_(True)
    if loop.activation_checkpointing:
        apply_activation_checkpointing(decoder)
    print(
        f"reward_model: {'LoRA' if use_lora else 'full'} decoder from {checkpoint_dir}, score at the last "
        f"non-pad token (pad id {pad_id})"
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

    def weights():  # LoRA: adapters + head (what trains); full: everything
        return (
            {n: p.detach() for n, p in model.named_parameters() if p.requires_grad} if use_lora else model.state_dict()
        )

    step = state.resume(loop.resume_from_checkpoint, model, total_steps)

    # ---- 5. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(loop.metric_loggers, out_dir)
    guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="reward_model")
    metrics, val = {"loss": float("nan")}, None
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        metrics = reward_accumulate(model, micro_batches, device)
        grad_norm = optimizer_step(
            model, optimizer, lr_scheduler, loop.clip_grad_norm, guard=guard, loss=metrics["loss"], step=step + 1
        )
        step += 1
        dt = progress.tick()
        progress.update(metrics["loss"], lr, metrics["pairs"] / max(dt, 1e-9))
        if loop.log_due(step, total_steps):
            log_train_row(loggers, step, {**metrics, "lr": lr}, device, grad_norm)
        if val_loader is not None and val_cfg.due(step, total_steps, include_last=True):
            val = reward_eval(model, val_loader, device, val_cfg.max_batches)
            loggers.log_dict({f"val_{k}": v for k, v in val.items() if k != "pairs"}, step)
        if loop.checkpoint_due(step):
            state.save(step, weights())
        if loop.stops_early(step, total_steps):
            return end_after_stop(step, metrics["loss"], out_dir, progress, loggers)
    progress.close()
    loggers.close()

    # ---- 6. export (HF sequence classification) and plot --------------------------------------
    summary = run_summary(step, metrics["loss"], out_dir, guard.skipped, data.train_ds)
    if val is not None:
        summary["val_accuracy"] = val["accuracy"]
    sd = get_merged_state_dict(decoder) if use_lora else decoder.state_dict()
    summary["hf_dir"] = save_reward_checkpoint(
        sd,
        model.score.weight,
        info,
        os.path.join(out_dir, "hf_model"),
        pad_token_id=pad_id,
        tokenizer_dir=checkpoint_dir,
    )
    return plot_and_write_summary(out_dir, summary, t_start, f"reward_model: {os.path.basename(out_dir)}")


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
