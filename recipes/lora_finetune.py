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

import os
import time

import torch
from omegaconf import DictConfig

import tinytune.config
from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import LoRAFinetuneSettings
from tinytune.datasets import data_summary
from tinytune.modules.peft import disable_adapters, get_adapter_state_dict, get_merged_state_dict, set_trainable_params
from tinytune.training import (
    EarlyStopping,
    LogWindow,
    NonFiniteGuard,
    Precision,
    SampleGenerations,
    TrainProgress,
    activate_neftune,
    apply_activation_checkpointing,
    apply_activation_offloading,
    autocast_fp16,
    build_metric_loggers,
    build_optimizer_and_scheduler,
    config_fingerprint,
    count_label_tokens,
    current_lr,
    drop_unlabeled_tail,
    end_after_stop,
    evaluate_loss,
    export_gguf,
    fp16_loss_scaler,
    load_model_and_tokenizer,
    log_train_row,
    model_lora,
    open_checkpointer,
    optimizer_step,
    plot_and_write_summary,
    prepare_output_dir,
    report_patience_stop,
    reset_peak_memory,
    resume_training_state,
    save_training_state,
    scaled,
    setup_device,
    sft_loss,
    to_device,
    train_data,
    validation_batches,
    validation_generation_row,
    validation_row,
)


def recipe_main(cfg: DictConfig) -> dict:
    """LoRA/QLoRA fine-tuning; returns a summary dict (final losses, paths, timings)."""
    t_start = time.perf_counter()
    # ---- 1. settings (every key checked here), device, precision, seed, output directory -------
    s = LoRAFinetuneSettings.from_config(cfg)
    lora = model_lora(s.model)
    if lora is None:
        raise ConfigError("model: no LoRA settings; use a lora_* / qlora_* builder or set model.lora_attn_modules")
    loop = s.loop  # log / checkpoint cadence, stop_after, clip, padding-free
    device, dtype, seed = setup_device(
        s.hardware, loss_scaling=True, memory_saving=loop.activation_checkpointing or bool(s.activation_offloading)
    )
    scaler = fp16_loss_scaler(s.hardware.dtype, device)  # dtype: fp16 (CUDA): fp32 weights, fp16 autocast, GradScaler
    precision = Precision.from_settings(s.hardware.mixed_precision, dtype, device)  # bf16 mixed: fp32 trainables
    out_dir = prepare_output_dir(s.output_dir, cfg)

    # ---- 2. model (frozen base + adapters) and tokenizer ----------------------------------
    # mixed precision: the frozen base is read straight into bf16, the fresh adapters are fp32
    checkpoint_dir, tokenizer, model, info = load_model_and_tokenizer(
        s, device, precision.load_dtype, frozen_dtype=precision.frozen_dtype
    )
    n_trainable = set_trainable_params(model)
    precision.cast_frozen(model)  # what is still fp32 and frozen (DoRA / PiSSA / NF4 bases load in fp32) to bf16
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {info.model_type} from {checkpoint_dir}; trainable {n_trainable:,} of {n_total:,} parameters")
    print(precision.describe(model))
    if loop.activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_activation_offloading(model, s.activation_offloading, device, out_dir)  # saved tensors: host / disk
    if s.neftune_noise_alpha is not None:  # NEFTune noise on the input embeddings, training only
        activate_neftune(model, s.neftune_noise_alpha)

    # ---- 3. data ---------------------------------------------------------------------------
    data = train_data(s.data, tokenizer, seed, s.hardware.seed)
    stream, accum, total_steps = data.stream, data.accum, data.total_steps
    val_cfg = s.data.validation
    val_batch_size = val_cfg.batch_size or data.batch_size
    val_loader = validation_batches(data.val_ds, val_batch_size, data.collate) if data.val_ds else None
    print(
        f"data: {getattr(data.train_ds, '__len__', lambda: 'streaming')()} train / {len(data.val_ds) if data.val_ds else 0} validation samples; "
        f"{total_steps} steps of {accum} x {data.batch_size} samples"
    )

    # ---- 4. optimizer, LR schedule, checkpointer (resume) ----------------------------------
    # loraplus_lr_ratio (LoRA+): the B matrices train at the optimizer's lr x this; no_decay groups by name
    optimizer, lr_scheduler = build_optimizer_and_scheduler(
        s.optim, model.named_parameters(), total_steps, s.loraplus_lr_ratio
    )
    ckpt = open_checkpointer(loop.keep_last_checkpoints, out_dir)
    stopper = EarlyStopping(s.early_stopping.patience, s.early_stopping.min_delta, s.save_best)
    if stopper.active and val_loader is None:
        raise ConfigError("early_stopping / save_best: need validation data (validation.dataset or split_ratio)")
    # saved with every checkpoint and restored on resume: early stopping's best step and patience count, the fp16 scale
    states = {"early_stopping": stopper, **({"loss_scaler": scaler} if scaler is not None else {})}
    fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
    step = resume_training_state(
        ckpt,
        loop.resume_from_checkpoint,
        model=model,
        weights_key="adapter",
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        stream=stream,
        accum=accum,
        fingerprint=fingerprint,
        total_steps=total_steps,
        stateful=states,
    )

    # ---- 5. generation before training (optional) ------------------------------------------
    samples = SampleGenerations(s.sample_generation, s.source.template, tokenizer)
    if samples.prompts:
        with disable_adapters(model), precision.autocast():  # the base model, also when resuming
            samples.generate_before(model)

    # ---- 6. training loop -------------------------------------------------------------------
    loggers = build_metric_loggers(loop.metric_loggers, out_dir)
    guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
    gen_n, gen_tokens = val_cfg.generation.num_samples, val_cfg.generation.max_new_tokens
    model.train()
    progress = TrainProgress(total_steps, initial_step=step, desc="lora_finetune")
    window = LogWindow()  # means since the last log line, and run totals
    reset_peak_memory(device)
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(accum)]
        lr = current_lr(optimizer)
        # Forward, loss, backward per micro-batch. Each summed loss is divided by the label tokens of
        # the whole window, so k micro-batches of 1 give the same update as one batch of k.
        num_tokens = count_label_tokens(micro_batches)
        window_tokens = torch.as_tensor(num_tokens, device=device)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        for mb in micro_batches:
            if loop.padding_free:  # drop positions no label depends on; rows laid end to end: [1, n]
                mb = drop_unlabeled_tail(mb)
            # fp16 compute under dtype: fp16, bf16 under mixed_precision, else a no-op; backward outside it
            with autocast_fp16(scaler), precision.autocast():
                mb_loss = sft_loss(model, to_device(mb, device), window_tokens)
            scaled(mb_loss, scaler).backward()  # fp16: times the loss scale (unscaled once per step)
            loss += mb_loss.detach()
        n_tokens = int(num_tokens)
        grad_norm = optimizer_step(
            model, optimizer, lr_scheduler, loop.clip_grad_norm, guard=guard, loss=loss, step=step + 1, scaler=scaler
        )
        step += 1
        dt = progress.tick()
        window.add(float(loss), n_tokens, dt)
        progress.update(window.last_loss, lr, n_tokens / max(dt, 1e-9))
        if loop.log_due(step, total_steps):  # means over the steps since the last log
            log_train_row(loggers, step, window.flush(lr, stream.epoch), device, grad_norm)
        if val_loader is not None and val_cfg.due(step, total_steps):
            with precision.autocast():
                val = evaluate_loss(model, val_loader, device, val_cfg.max_batches, loop.padding_free)
            loggers.log_dict(validation_row(val), step)
            if gen_n:  # exact match / ROUGE-L / BLEU of greedy answers to validation prompts
                with precision.autocast():
                    gen = validation_generation_row(model, tokenizer, data.val_ds, gen_n, gen_tokens)
                loggers.log_dict(gen, step)
            if stopper.update(val["loss"], step, lambda: get_adapter_state_dict(model)):
                report_patience_stop(step, stopper.patience)
                break
        if loop.checkpoint_due(step):
            save_training_state(
                ckpt,
                step,
                {"adapter": get_adapter_state_dict(model)},
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                stream=stream,
                accum=accum,
                fingerprint=fingerprint,
                stateful=states,
            )
        if loop.stops_early(step, total_steps):
            return end_after_stop(step, window.last_loss, out_dir, progress, loggers)
    progress.close()

    # ---- 7. final validation, export, plot, generation after ---------------------------------
    summary = {
        "step": step,
        "loss": window.last_loss,
        "output_dir": out_dir,
        "skipped_steps": guard.skipped,
        **({"fp16_overflow_skipped_steps": scaler.skipped} if scaler is not None else {}),
        **window.totals(),
        "data": data_summary(data.train_ds),
    }
    if val_loader is not None:
        with precision.autocast():
            val = validation_row(evaluate_loss(model, val_loader, device, val_cfg.max_batches, loop.padding_free))
        loggers.log_dict(val, step)
        summary.update(val)
        if gen_n:
            with precision.autocast():
                gen = validation_generation_row(model, tokenizer, data.val_ds, gen_n, gen_tokens)
            loggers.log_dict(gen, step)
            summary.update(gen)
        if stopper.active and step != stopper.best_step:
            stopper.update(val["val_loss"], step, lambda: get_adapter_state_dict(model))
    if stopper.active:
        summary.update(stopper.summary(), stopped_early=step < total_steps)
        stopper.restore_best(model)  # save_best: the exports below hold the best step's weights
    loggers.close()
    if s.save_adapter:
        summary["adapter_dir"] = save_peft_adapter(
            model, info, os.path.join(out_dir, "adapter"), lora, base_model_name_or_path=checkpoint_dir
        )
    if s.save_merged:
        summary["hf_dir"] = save_hf_checkpoint(
            get_merged_state_dict(model), info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir
        )
    summary.update(
        export_gguf(s.export_gguf, get_merged_state_dict(model), info, checkpoint_dir, out_dir, tokenizer.chat_template)
    )
    with precision.autocast():
        after = samples.generate_after(model, out_dir)
    summary.update(after)  # held-out fractions, if any
    return plot_and_write_summary(out_dir, summary, t_start, f"lora_finetune: {os.path.basename(out_dir)}")


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
