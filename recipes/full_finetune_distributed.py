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
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import FullFinetuneDistributedSettings
from tinytune.datasets import data_summary
from tinytune.device import get_dtype, set_seed
from tinytune.distributed.dist_evaluation import evaluate_loss_distributed
from tinytune.distributed.fsdp import (
    clip_grad_norm_,
    gather_full_state_dict,
    load_local_shards,
    local_shards,
    set_gradient_sync,
)
from tinytune.distributed.mesh import (
    ParallelDims,
    all_reduce_sum,
    build_device_mesh,
    get_dp_info,
    is_rank_zero,
    process_group,
    rank_zero_first,
)
from tinytune.distributed.pipeline import (
    PipelineSettings,
    build_pipeline,
    build_pipeline_mesh,
    check_pipeline_layout,
    world_size_from_env,
)
from tinytune.distributed.sharded_model import load_hf_model_sharded
from tinytune.training import (
    EarlyStopping,
    LogWindow,
    NonFiniteGuard,
    TrainProgress,
    activate_neftune,
    apply_activation_checkpointing,
    build_metric_loggers,
    build_optimizer_and_scheduler,
    check_training_dtype,
    config_fingerprint,
    count_label_tokens,
    current_lr,
    drop_unlabeled_tail,
    fsdp_policy,
    load_tokenizer,
    log_train_row,
    open_sharded_checkpointer,
    optimizer_step,
    plot_loss,
    prepare_output_dir,
    report_early_stop,
    reset_peak_memory,
    resolve_checkpoint_dir,
    resume_sharded_state,
    save_sharded_state,
    sft_loss_sum,
    sft_loss_sum_vocab_parallel,
    to_device,
    train_data,
    validation_row,
    write_summary,
)


def recipe_main(cfg: DictConfig) -> dict:
    """Full-parameter distributed fine-tuning (FSDP2 / TP / DCP); returns a summary dict."""
    t_start = time.perf_counter()
    # ---- 1. settings (every key checked here), processes, mesh, precision, seed ----------------
    s = FullFinetuneDistributedSettings.from_config(cfg)
    loop, par, val_cfg = s.loop, s.parallelism, s.data.validation
    check_training_dtype(s.hardware.dtype)
    pipe_settings, pipe = PipelineSettings.from_parallelism(par), None
    if pipe_settings.degree > 1:  # pipeline parallelism: world size, layers, heads checked before any process group
        pipe_dims = check_pipeline_layout(
            pipe_settings,
            world_size_from_env(),
            resolve_checkpoint_dir(s.source),
            data_parallel_shard=par.data_parallel_shard,
            data_parallel_replicate=par.data_parallel_replicate,
            tensor_parallel=par.tensor_parallel,
            loss_parallel=par.loss_parallel,
            sequence_parallel=par.sequence_parallel,
        )
    with process_group(s.hardware.device, cpu_offload=s.fsdp.cpu_offload) as dist_info:
        device, rank0 = dist_info.device, is_rank_zero()
        if pipe_settings.degree > 1:  # 4-D mesh [pp, dp_replicate, dp_shard, tp]
            dims = pipe_dims
            mesh, pp_mesh = build_pipeline_mesh(pipe_settings.degree, dims, device.type)
        else:
            dims = ParallelDims.from_config(
                dist_info.world_size,
                data_parallel_shard=par.data_parallel_shard,
                data_parallel_replicate=par.data_parallel_replicate,
                tensor_parallel=par.tensor_parallel,
            )
            mesh = build_device_mesh(dims, device.type)
        dp_rank, dp_size = get_dp_info(mesh)
        # padding-free rows have any length; tensor/sequence parallelism needs the collated [b, s] shape
        padding_free = loop.padding_free and dims.tp == 1
        dtype = get_dtype(s.hardware.dtype, device)
        seed = set_seed(s.hardware.seed)
        out_dir = prepare_output_dir(s.output_dir, cfg) if rank0 else os.path.abspath(os.path.expanduser(s.output_dir))

        # ---- 2. sharded model and tokenizer ------------------------------------------------------
        checkpoint_dir = resolve_checkpoint_dir(s.source)
        tokenizer = load_tokenizer(s.source, checkpoint_dir)
        ac = apply_activation_checkpointing if loop.activation_checkpointing else None
        if pipe_settings.degree > 1:  # this rank's pipeline stages (sharded, filled) and the schedule
            pipe = build_pipeline(
                pipe_settings,
                checkpoint_dir,
                mesh,
                pp_mesh,
                device,
                batch_size=s.data.batch_size,
                packed=padding_free,
                fsdp=fsdp_policy(s.fsdp, dtype),
                activation_checkpointing=ac,
            )
            model, info = pipe.model, pipe.info
        else:
            model, info = load_hf_model_sharded(
                checkpoint_dir,
                mesh,
                device,
                loss_parallel=par.loss_parallel,
                sequence_parallel=par.sequence_parallel,
                activation_checkpointing=ac,
                fsdp=fsdp_policy(s.fsdp, dtype),
            )
        if s.neftune_noise_alpha is not None:  # NEFTune noise on the input embeddings, training only
            activate_neftune(model, s.neftune_noise_alpha)
        params = [p for p in model.parameters() if p.requires_grad]
        if rank0:
            print(
                f"model: {info.model_type} from {checkpoint_dir}; training all "
                f"{sum(p.numel() for p in params):,} parameters on {dist_info.world_size} processes "
                f"(pp={pipe_settings.degree}, dp_replicate={dims.dp_replicate}, dp_shard={dims.dp_shard}, "
                f"tp={dims.tp})"
            )

        # ---- 3. data: this rank's slice of every global batch ------------------------------------
        with rank_zero_first():  # rank 0 tokenises (token cache on disk), the others read it
            data = train_data(
                s.data, tokenizer, seed, s.hardware.seed, dp_rank=dp_rank, dp_size=dp_size, num_workers=s.num_workers
            )
        stream, accum, total_steps = data.stream, data.accum, data.total_steps
        val_batch_size = val_cfg.batch_size or data.batch_size
        if rank0:
            print(
                f"data: {len(data.train_ds)} train / {len(data.val_ds) if data.val_ds else 0} validation samples; "
                f"{total_steps} steps of {accum} x {data.batch_size} samples x {dp_size} data-parallel ranks"
            )

        # ---- 4. optimizer, LR schedule, DCP checkpointer (resume) --------------------------------
        # named: optimizer.no_decay groups (biases, norms, embeddings), as in the single-device recipes
        optimizer, lr_scheduler = build_optimizer_and_scheduler(s.optim, model.named_parameters(), total_steps)
        # early stopping: the validation loss is the same on every rank, so every rank stops at the same
        # step; save_best keeps each rank's own shards (no communication). Checkpoints hold the tracking
        # (best loss and step, patience count) but not the kept shards.
        stopper = EarlyStopping(s.early_stopping.patience, s.early_stopping.min_delta, s.save_best)
        kept = model if pipe is None else torch.nn.ModuleList(pipe.stages.values())  # PP: this rank's stages
        if stopper.active and data.val_ds is None:
            raise ConfigError("early_stopping / save_best: need validation data (validation.dataset or split_ratio)")
        states = {"early_stopping": stopper.tracking_only()}
        ckpt = open_sharded_checkpointer(loop.keep_last_checkpoints, out_dir)  # (clears crashed writes)
        fingerprint = config_fingerprint(cfg, model, data.train_ds, info)  # checked on resume
        step = resume_sharded_state(
            ckpt,
            loop.resume_from_checkpoint,
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            stream=stream,
            accum=accum,
            fingerprint=fingerprint,
            total_steps=total_steps,
            stateful=states,
        )
        stopper.restore_kept_weights(step, lambda: local_shards(kept))  # save_best: best step = resumed one

        # ---- 5. training loop ----------------------------------------------------------------------
        loss_sum = sft_loss_sum_vocab_parallel if par.loss_parallel else sft_loss_sum
        loss_ctx = loss_parallel if par.loss_parallel else contextlib.nullcontext
        val_loss_sum = pipe.eval_loss_fn if pipe is not None else loss_sum  # PP: forward-only through the schedule
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
                    mb = to_device(drop_unlabeled_tail(mb) if padding_free else mb, device)
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
                val = evaluate_loss_distributed(
                    model,
                    data.val_ds,
                    data.collate,
                    val_batch_size,
                    mesh.dp,
                    device,
                    val_loss_sum,
                    val_cfg.max_batches,
                    loss_ctx,
                )
                loggers.log_dict(validation_row(val), step)
                if stopper.update(val["loss"], step, lambda: local_shards(kept)):
                    if rank0:
                        print(
                            f"early stopping at step {step}: no validation improvement in {stopper.patience} evaluations"
                        )
                    break
            if loop.checkpoint_due(step):
                save_sharded_state(
                    ckpt,
                    step,
                    model=model,
                    optimizer=optimizer,
                    lr_scheduler=lr_scheduler,
                    stream=stream,
                    accum=accum,
                    fingerprint=fingerprint,
                    stateful=states,
                )
            if loop.stops_early(step, total_steps):
                progress.close()
                loggers.close()
                if rank0:
                    report_early_stop(step)
                return {"step": step, "loss": window.last_loss, "output_dir": out_dir}
        progress.close()

        # ---- 6. final validation, export (gathered on rank 0), plot --------------------------------
        summary = {
            "step": step,
            "loss": window.last_loss,
            "output_dir": out_dir,
            "world_size": dist_info.world_size,
            "skipped_steps": guard.skipped,
            **window.totals(),
            "data": data_summary(data.train_ds),
        }
        if data.val_ds is not None:
            val = validation_row(
                evaluate_loss_distributed(
                    model,
                    data.val_ds,
                    data.collate,
                    val_batch_size,
                    mesh.dp,
                    device,
                    val_loss_sum,
                    val_cfg.max_batches,
                    loss_ctx,
                )
            )
            loggers.log_dict(val, step)
            summary.update(val)
            if stopper.active and step != stopper.best_step:
                stopper.update(val["val_loss"], step, lambda: local_shards(kept))
        if stopper.active:
            summary.update(stopper.summary(), stopped_early=step < total_steps)
            stopper.restore_best(kept, load_local_shards)  # save_best: hf_model/ holds the best step's weights
        loggers.close()
        if s.save_hf:
            full = gather_full_state_dict(model) if pipe is None else pipe.gather_full_state_dict()  # collective
            if rank0:
                summary["hf_dir"] = save_hf_checkpoint(
                    full, info, os.path.join(out_dir, "hf_model"), tokenizer_dir=checkpoint_dir
                )
            del full
        if rank0:
            if s.plot_loss:
                summary["loss_plot"] = plot_loss(
                    os.path.join(out_dir, "metrics.jsonl"),
                    os.path.join(out_dir, "loss.png"),
                    title="full_finetune_distributed",
                )
            write_summary(out_dir, summary, t_start)
        return summary


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
