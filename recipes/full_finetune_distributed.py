"""Multi-process full fine-tuning with FSDP2, optional tensor parallelism and DCP checkpoints.

Launch (one node, 2 processes)::

    tune run --nproc_per_node 2 full_finetune_distributed --config smollm2/135M_full_distributed

The keys are those of ``full_finetune`` (same meaning, same defaults) plus ``parallelism.*``,
``fsdp.*``, ``num_workers`` and ``plot_loss``; ``batch_size`` is per data-parallel rank (global
batch = batch_size x data-parallel size x gradient_accumulation_steps). The model is built on the
meta device, tensor-parallelised (``tensor_parallel > 1``), sharded with ``fully_shard`` per layer
+ root and filled from the HF checkpoint file by file. Each data-parallel rank reads its slice of
every global batch, so the run takes the same samples in the same order as ``full_finetune`` with
the global batch. Losses are divided by the label-token count of the whole global step, so the
update equals one process running the global batch. Checkpoints are sharded (DCP); at the end the
full model is gathered on rank 0 and written as HF safetensors (``hf_model/``). NEFTune and early
stopping (``save_best``: each rank keeps its own parameter shards) behave as in ``full_finetune``.

Pipeline parallelism (``parallelism.pipeline_parallel > 1``, :mod:`tinytune.distributed.pipeline`):
the mesh is ``[pp, dp_replicate, dp_shard, tp]``, each rank builds only its stages of the model, and a
``torch.distributed.pipelining`` schedule runs forward + backward of each loader batch split into
``parallelism.microbatches`` pipeline micro-batches; the layout is checked before any process group.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from omegaconf import DictConfig
from torch.distributed.tensor.parallel import loss_parallel

import tinytune.config
from tinytune.checkpoint import save_hf_checkpoint
from tinytune.config.recipe_settings import FullFinetuneDistributedSettings
from tinytune.distributed.fsdp import clip_grad_norm_, gather_full_state_dict, set_gradient_sync
from tinytune.distributed.mesh import all_reduce_sum
from tinytune.training import (
    LogWindow,
    NonFiniteGuard,
    ShardedTrainingState,
    TrainProgress,
    build_metric_loggers,
    build_optimizer_and_scheduler,
    config_fingerprint,
    count_label_tokens,
    current_lr,
    distributed_run,
    distributed_train_data,
    distributed_validator,
    drop_unlabeled_tail,
    end_after_stop,
    finish_distributed,
    load_sharded_model,
    load_tokenizer,
    log_train_row,
    open_sharded_checkpointer,
    optimizer_step,
    plot_and_write_summary,
    report_patience_stop,
    reset_peak_memory,
    resolve_checkpoint_dir,
    sft_loss_sum,
    sft_loss_sum_vocab_parallel,
    sharded_early_stopping,
    to_device,
    validation_row,
)


def recipe_main(cfg: DictConfig) -> dict:
    """Full-parameter distributed fine-tuning (FSDP2 / TP / DCP); returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. settings (every key checked here), processes, mesh, precision, seed ----------------
    s = FullFinetuneDistributedSettings.from_config(cfg)
    loop, par, val_cfg = s.loop, s.parallelism, s.data.validation
    with distributed_run(s, cfg) as run:  # pipeline layout checked before any process group
        device, mesh, dp_size, rank0, out_dir = run.device, run.mesh, run.dp_size, run.rank0, run.out_dir

        # ---- 2. sharded model (PP: this rank's stages and the schedule) and tokenizer ------------
        checkpoint_dir = resolve_checkpoint_dir(s.source)
        tokenizer = load_tokenizer(s.source, checkpoint_dir)
        model, info, pipe = load_sharded_model(s, run, checkpoint_dir)
        params = [p for p in model.parameters() if p.requires_grad]
        if rank0:
            print(
                f"model: {info.model_type} from {checkpoint_dir}; training all "
                f"{sum(p.numel() for p in params):,} parameters {run.layout()}"
            )

        # ---- 3. data: this rank's slice of every global batch ------------------------------------
        data = distributed_train_data(s, tokenizer, run)
        stream, accum, total_steps = data.stream, data.accum, data.total_steps

        # ---- 4. optimizer, LR schedule, early stopping, DCP checkpointer (resume) ----------------
        # named: optimizer.no_decay groups (biases, norms, embeddings), as in the single-device recipes
        optimizer, lr_scheduler = build_optimizer_and_scheduler(s.optim, model.named_parameters(), total_steps)
        stopper, kept, shards = sharded_early_stopping(s, data, model, pipe)  # save_best: this rank's shards
        ckpt = open_sharded_checkpointer(loop.keep_last_checkpoints, out_dir)  # (clears crashed writes)
        fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
        states = {"early_stopping": stopper.tracking_only()}  # the tracking, not the kept shards
        state = ShardedTrainingState(ckpt, model, optimizer, lr_scheduler, data, fingerprint, states)
        step = state.resume(loop.resume_from_checkpoint, total_steps)
        stopper.restore_kept_weights(step, shards)  # save_best: best step = resumed one

        # ---- 5. training loop ----------------------------------------------------------------------
        loss_sum = sft_loss_sum_vocab_parallel if par.loss_parallel else sft_loss_sum
        loss_ctx = loss_parallel if par.loss_parallel else contextlib.nullcontext
        val_loss_sum = pipe.eval_loss_fn if pipe is not None else loss_sum  # PP: forward-only through the schedule
        validate = distributed_validator(model, data, val_cfg, run, val_loss_sum, loss_ctx)
        clip_fn = pipe.clip_grad_norm_ if pipe is not None else clip_grad_norm_  # PP: norm over every stage
        loss_mesh = mesh.dp if pipe is None else None  # PP: only last stages hold losses, so sum over the world
        loggers = build_metric_loggers(loop.metric_loggers if rank0 else [], out_dir)  # rank 0 logs
        guard = NonFiniteGuard(loop.nan_policy)  # a NaN/Inf loss or grad norm stops the run (or skips the step)
        model.train()
        progress = TrainProgress(total_steps, initial_step=step, desc="full_finetune_distributed", disable=not rank0)
        window = LogWindow()  # means since the last log line, and run totals
        reset_peak_memory(device)
        while step < total_steps:
            micro_batches = [next(stream) for _ in range(accum)]
            lr = current_lr(optimizer)
            # Label tokens of the whole global step: every rank divides by the same number.
            num_tokens = all_reduce_sum(count_label_tokens(micro_batches).to(device), mesh.dp).clamp(min=1).float()
            local_loss = torch.zeros((), device=device)
            if pipe is not None:  # the schedule runs forward + backward of every pipeline micro-batch
                local_loss = pipe.train_step(micro_batches, num_tokens, device, data.train_ds)
            else:
                for i, mb in enumerate(micro_batches):
                    mb = to_device(drop_unlabeled_tail(mb) if run.padding_free else mb, device)
                    set_gradient_sync(model, i == accum - 1)  # reduce-scatter only after the last micro-batch
                    with loss_ctx():
                        loss = loss_sum(model, mb) / num_tokens  # forward + loss
                        (loss * dp_size).backward()  # FSDP averages gradients over dp ranks; scale so they add up
                    local_loss += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
            step_loss = float(all_reduce_sum(local_loss, loss_mesh))  # global mean per label token
            # loss and (global) grad norm are the same on every rank: the guard's verdict is too
            grad_norm = optimizer_step(
                model,
                optimizer,
                lr_scheduler,
                loop.clip_grad_norm,
                clip_fn=clip_fn,
                guard=guard,
                loss=step_loss,
                step=step + 1,
            )
            step += 1
            dt = progress.tick()
            window.add(step_loss, int(num_tokens), dt)
            progress.update(window.last_loss, lr, int(num_tokens) / max(dt, 1e-9))
            if loop.log_due(step, total_steps):  # means over the steps since the last log
                log_train_row(loggers, step, window.flush(lr, stream.epoch), device, grad_norm)
            if data.val_ds is not None and val_cfg.due(step, total_steps):
                val = validate()
                loggers.log_dict(validation_row(val), step)
                if stopper.update(val["loss"], step, shards):
                    if rank0:
                        report_patience_stop(step, stopper.patience)
                    break
            if loop.checkpoint_due(step):
                state.save(step)
            if loop.stops_early(step, total_steps):
                return end_after_stop(step, window.last_loss, out_dir, progress, loggers, rank0)
        progress.close()

        # ---- 6. final validation, export (gathered on rank 0), plot --------------------------------
        # final validation, early-stopping outcome (save_best: the best step's weights restored), loggers closed
        summary = finish_distributed(
            run, data, step, total_steps, window, guard, validate, loggers, stopper, kept, shards
        )
        if s.save_hf:
            full = gather_full_state_dict(model) if pipe is None else pipe.gather_full_state_dict()  # collective
            if rank0:
                summary["hf_dir"] = save_hf_checkpoint(
                    full, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir
                )
            del full
        if rank0:
            plot_and_write_summary(out_dir, summary, t_start, "full_finetune_distributed" if s.plot_loss else None)
        return summary


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
