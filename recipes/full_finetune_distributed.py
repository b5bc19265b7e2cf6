"""Multi-process SFT with FSDP2, optional tensor parallelism and DCP checkpoints.

Launch (one node, 2 processes)::

    tune run --nproc_per_node 2 full_finetune_distributed --config smollm2/135M_full_distributed

The config keys are those of ``full_finetune`` plus ``parallelism.*`` and ``fsdp.*``;
``batch_size`` is per data-parallel rank (global batch = batch_size x data-parallel size x
gradient_accumulation_steps). Flow:

 1. process group + device mesh ``(dp_replicate, dp_shard, tp)`` from ``parallelism.*``;
 2. model built on the meta device, tensor-parallelised (``tensor_parallel > 1``), sharded with
    ``fully_shard`` per layer + root, then filled from the HF checkpoint file by file, each rank
    copying only its slices;
 3. each data-parallel rank reads its slice of every global batch (resumable sampler; the same
    sample order as the single-device recipe with the global batch size);
 4. per optimizer step: ``gradient_accumulation_steps`` micro-batches (padding-free, as in the
    single-device recipes, unless ``tensor_parallel > 1`` or ``padding_free: false``), gradient sync
    only on the last; losses are divided by the label-token count of the whole step summed over
    ranks, so the update equals one process running the global batch;
 5. every ``checkpoint_every_n_steps``: sharded DCP checkpoint (model, optimizer, scheduler, data
    position, RNG) for ``resume_from_checkpoint: auto``; at the end the full model is gathered on
    rank 0 and written as HF safetensors (``hf_model/``; LoRA: merged, plus ``adapter/``).

``lora_finetune_distributed`` runs this loop with LoRA adapters (LoRA keys in the ``model``
section) and only the adapters trainable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.data import DataLoader

from tinytune import config
from tinytune.checkpoint import save_hf_checkpoint, save_peft_adapter
from tinytune.config import ConfigError
from tinytune.distributed.pipeline import (  # pipeline parallelism (issue 17)
    PipelineSettings,
    build_pipeline,
    build_pipeline_mesh,
    check_pipeline_layout,
    world_size_from_env,
)
from tinytune.training.dcp import DistributedCheckpointer
from tinytune.training.device import get_dtype, set_seed
from tinytune.training.dist_sampler import ResumableDistributedSampler
from tinytune.training.dist_evaluation import evaluate_loss_distributed
from tinytune.training.distributed import (
    ParallelDims,
    all_reduce_sum,
    build_device_mesh,
    get_dp_info,
    init_distributed,
    is_rank_zero,
    shutdown_distributed,
)
from tinytune.training.fsdp import clip_grad_norm_, gather_full_state_dict, set_gradient_sync
from tinytune.training.losses import IGNORE_INDEX, count_label_tokens, sft_loss_sum
from tinytune.training.padding_free import drop_unlabeled_tail
from tinytune.training.steps import build_optimizer_and_scheduler
from tinytune.training.memory import reset_peak_memory
from tinytune.training.metric_logging import (
    build_metric_loggers,
    log_train_row,
    report_early_stop,
    train_row,
    validation_row,
    write_summary,
)
from tinytune.training.setup import (
    LORA_KEYS,
    LoopSettings,
    build_collate,
    cfg_get,
    load_tokenizer,
    prepare_output_dir,
    resolve_checkpoint_dir,
    train_val_datasets,
)
from tinytune.training.sharded_model import load_hf_model_sharded


def _lora_setup(cfg: DictConfig):
    """(linear_factory, trainable_fn, export settings) from the LoRA keys of ``cfg.model``."""
    from tinytune.models.lora_builders import lora_target_modules
    from tinytune.modules.peft import lora_linear_factory, set_trainable_params

    kw = {k: cfg.model[k] for k in LORA_KEYS if cfg_get(cfg, "model") is not None and k in cfg.model}
    if kw.get("quantize_base", False):
        raise ConfigError("model.quantize_base: QLoRA (NF4 base) is not supported by the distributed recipe; "
                          "use lora_finetune for QLoRA, or LoRA with quantize_base: false here.")
    targets = lora_target_modules(kw.get("lora_attn_modules", ["q_proj", "v_proj"]), kw.get("apply_lora_to_mlp", False),
                                  kw.get("apply_lora_to_output", False))
    settings = {"lora_rank": int(kw.get("lora_rank", 8)), "lora_alpha": float(kw.get("lora_alpha", 16)),
                "lora_dropout": float(kw.get("lora_dropout", 0.0))}
    factory = lora_linear_factory(targets, rank=settings["lora_rank"], alpha=settings["lora_alpha"],
                                  dropout=settings["lora_dropout"])
    return factory, set_trainable_params, settings


def _build_data(cfg: DictConfig, tokenizer, dp_rank: int, dp_size: int, seed: int):
    """Training/validation datasets (as in the single-device recipes), this rank's sampler and loader."""
    # Rank 0 builds first (tokenisation / token cache on disk), the others then read what it wrote.
    if not is_rank_zero():
        dist.barrier()
    train_ds, val_ds = train_val_datasets(cfg, tokenizer)
    if is_rank_zero():
        dist.barrier()
    collate = build_collate(cfg, tokenizer, train_ds)
    sampler = ResumableDistributedSampler(len(train_ds), dp_size, dp_rank, shuffle=bool(cfg_get(cfg, "shuffle", True)),
                                          seed=seed)
    loader = DataLoader(train_ds, batch_size=int(cfg_get(cfg, "batch_size", 4)), sampler=sampler, collate_fn=collate,
                        drop_last=True, num_workers=int(cfg_get(cfg, "num_workers", 0)))
    return train_ds, val_ds, collate, sampler, loader


def _loss_sum(model, batch: dict, use_loss_parallel: bool) -> torch.Tensor:
    """Summed cross-entropy over the batch's label tokens (call inside ``loss_parallel()`` when used)."""
    if use_loss_parallel:  # logits stay sharded by vocabulary across TP ranks
        logits = model(batch["tokens"], input_pos=batch.get("input_pos"), seq_lens=batch.get("seq_lens"))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    return sft_loss_sum(model, batch)


def finetune(cfg: DictConfig, lora: bool) -> dict:
    """The training loop shared by the full and LoRA distributed recipes (see the module docstring)."""
    t_start = time.perf_counter()
    # ---- pipeline parallelism (issue 17): keys read here, layout checked before any process group --
    pipe, pipe_dims = None, None
    pipe_settings = PipelineSettings(  # settings key: parallelism.pipeline_parallel / pipeline_schedule / microbatches / layers_per_stage / pipeline_seq_len
        degree=cfg_get(cfg, "parallelism.pipeline_parallel", 1), schedule=cfg_get(cfg, "parallelism.pipeline_schedule", "1f1b"),
        microbatches=cfg_get(cfg, "parallelism.microbatches"), layers_per_stage=cfg_get(cfg, "parallelism.layers_per_stage"),
        seq_len=cfg_get(cfg, "parallelism.pipeline_seq_len"))
    if pipe_settings.degree > 1:
        pipe_dims = check_pipeline_layout(
            pipe_settings, world_size_from_env(), resolve_checkpoint_dir(cfg),
            data_parallel_shard=cfg_get(cfg, "parallelism.data_parallel_shard", -1),
            data_parallel_replicate=cfg_get(cfg, "parallelism.data_parallel_replicate", 1),
            tensor_parallel=cfg_get(cfg, "parallelism.tensor_parallel", 1),
            loss_parallel=bool(cfg_get(cfg, "parallelism.loss_parallel", False)),
            sequence_parallel=bool(cfg_get(cfg, "parallelism.sequence_parallel", False)))
    # ---- end pipeline hook ------------------------------------------------------------------------
    # ---- 1. processes, mesh, precision, seed ---------------------------------------------------
    cpu_offload = bool(cfg_get(cfg, "fsdp.cpu_offload", False))
    dist_info = init_distributed(cfg_get(cfg, "device", "auto"), cpu_offload=cpu_offload)
    device = dist_info.device
    if pipe_dims is not None:  # pipeline hook: 4-D mesh [pp, dp_replicate, dp_shard, tp]
        dims = pipe_dims
        mesh, pp_mesh = build_pipeline_mesh(pipe_settings.degree, dims, device.type)
    else:
        dims = ParallelDims.from_config(
            dist_info.world_size,
            data_parallel_shard=cfg_get(cfg, "parallelism.data_parallel_shard", -1),
            data_parallel_replicate=cfg_get(cfg, "parallelism.data_parallel_replicate", 1),
            tensor_parallel=cfg_get(cfg, "parallelism.tensor_parallel", 1),
        )
        mesh = build_device_mesh(dims, device.type)
    dp_rank, dp_size = get_dp_info(mesh)
    use_loss_parallel = bool(cfg_get(cfg, "parallelism.loss_parallel", False))
    # padding-free rows have any length; tensor/sequence parallelism needs the collated [b, s] shape
    padding_free = bool(cfg_get(cfg, "padding_free", True)) and dims.tp == 1
    dtype = get_dtype(cfg_get(cfg, "dtype", "fp32"), device)
    if dtype == torch.float16:
        raise ConfigError("dtype: fp16 needs loss scaling, which the distributed recipe does not do; use bf16 or fp32.")
    seed = set_seed(cfg_get(cfg, "seed", 0))
    out_dir = prepare_output_dir(cfg) if is_rank_zero() else os.path.abspath(os.path.expanduser(str(cfg.output_dir)))

    # ---- 2. sharded model and tokenizer -------------------------------------------------------
    checkpoint_dir = resolve_checkpoint_dir(cfg)
    tokenizer = load_tokenizer(cfg, checkpoint_dir)
    factory, trainable, lora_cfg = _lora_setup(cfg) if lora else (None, None, None)
    if lora and use_loss_parallel and cfg_get(cfg, "model.apply_lora_to_output", False):
        raise ConfigError("parallelism.loss_parallel cannot be combined with model.apply_lora_to_output.")
    ac = None
    if cfg_get(cfg, "activation_checkpointing", False):
        from tinytune.training.activation_checkpointing import apply_activation_checkpointing as ac
    fsdp_kw = {"param_dtype": None if dtype == torch.float32 else dtype, "reduce_dtype": torch.float32,
               "cpu_offload": cpu_offload, "reshard_after_forward": bool(cfg_get(cfg, "fsdp.reshard_after_forward", True))}
    if pipe_dims is not None:  # pipeline hook: this rank's stages + the schedule
        pipe = build_pipeline(pipe_settings, checkpoint_dir, mesh, pp_mesh, device,
                              batch_size=int(cfg_get(cfg, "batch_size", 4)), packed=padding_free, linear_factory=factory,
                              trainable=trainable, fsdp=fsdp_kw, activation_checkpointing=ac)
        model, info = pipe.model, pipe.info
    else:
        model, info = load_hf_model_sharded(
            checkpoint_dir, mesh, device, linear_factory=factory, trainable=trainable,
            loss_parallel=use_loss_parallel, sequence_parallel=bool(cfg_get(cfg, "parallelism.sequence_parallel", False)),
            activation_checkpointing=ac, fsdp=fsdp_kw,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if lora:
        stray = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
        if stray:
            raise RuntimeError(f"LoRA run would also train non-adapter parameters {stray[:4]}; this is a bug.")
    if is_rank_zero():
        n_total = sum(p.numel() for p in model.parameters())
        print(f"model: {info.model_type} from {checkpoint_dir}; training {sum(p.numel() for p in params):,} of "
              f"{n_total:,} parameters on {dist_info.world_size} processes (dp_replicate={dims.dp_replicate}, "
              f"dp_shard={dims.dp_shard}, tp={dims.tp})")

    # ---- 3. data: this rank's slice of every global batch --------------------------------------
    dataset, val_ds, collate, sampler, loader = _build_data(cfg, tokenizer, dp_rank, dp_size, seed)
    batch_size = loader.batch_size
    accum = int(cfg_get(cfg, "gradient_accumulation_steps", 1))
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={batch_size} x gradient_accumulation_steps={accum} x {dp_size} data-parallel ranks needs more "
            f"than the {len(dataset)} training samples; lower them or add data."
        )
    total_steps = int(cfg_get(cfg, "max_steps", 0)) or int(cfg_get(cfg, "epochs", 1)) * steps_per_epoch
    if is_rank_zero():
        print(f"data: {len(dataset)} train / {len(val_ds) if val_ds else 0} validation samples; {total_steps} steps "
              f"of {accum} x {batch_size} samples x {dp_size} data-parallel ranks")

    # ---- 4. optimizer, schedule, DCP resume ------------------------------------------------------
    optimizer, lr_scheduler = build_optimizer_and_scheduler(cfg, params, total_steps)
    ckpt = DistributedCheckpointer(out_dir, keep_last=cfg_get(cfg, "keep_last_checkpoints", 2))
    step, epoch, batches_done = 0, 0, 0  # batches_done: this rank's micro-batches used in `epoch`
    resume_path = ckpt.resolve(cfg_get(cfg, "resume_from_checkpoint"))
    if resume_path is not None:
        state = ckpt.load(resume_path, model, optimizer)
        if (state.get("batch_size"), state.get("accum")) != (batch_size, accum):
            raise ConfigError(
                f"resume_from_checkpoint: {resume_path} was written with batch_size={state.get('batch_size')}, "
                f"gradient_accumulation_steps={state.get('accum')}; this run has {batch_size}, {accum}. Resume with "
                "the same values (or start a new output_dir)."
            )
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        sampler.load_state_dict(state["sampler"])
        step, epoch, batches_done = int(state["step"]), int(state["epoch"]), int(state["batches_done"])
        if is_rank_zero():
            print(f"resumed from {resume_path} at step {step}")

    def save_training_state() -> None:
        ckpt.save(step, model, optimizer, {
            "step": step, "epoch": epoch, "batches_done": batches_done, "batch_size": batch_size, "accum": accum,
            "lr_scheduler": lr_scheduler.state_dict(),
            "sampler": sampler.state_dict(batches_done * batch_size),
        })

    # ---- 5. training loop ------------------------------------------------------------------------
    loggers = build_metric_loggers(cfg_get(cfg, "metric_loggers"), out_dir) if is_rank_zero() else None
    loop = LoopSettings.from_config(cfg)  # log / validate / checkpoint cadence, stop_after, clip
    loss_ctx = loss_parallel if use_loss_parallel else contextlib.nullcontext

    def validate() -> None:
        def loss_fn(m, b):
            if pipe is not None:  # pipeline hook: forward-only through the schedule
                return pipe.eval_loss_sum(b)
            with loss_ctx():
                return _loss_sum(m, b, use_loss_parallel)

        val = evaluate_loss_distributed(model, val_ds, collate, int(cfg_get(cfg, "validation.batch_size", batch_size)),
                                        mesh.dp, device, loss_fn, loop.val_max_batches)
        if loggers is not None:
            loggers.log_dict(validation_row(val), step)
        summary_val.update(validation_row(val))

    summary_val: dict = {}
    model.train()
    reset_peak_memory(device)
    loss_value, train_tokens, train_seconds = float("nan"), 0, 0.0
    batches = None
    while step < total_steps:
        if batches_done + accum > steps_per_epoch * accum:  # epoch used up (also right after a resume)
            epoch, batches_done, batches = epoch + 1, 0, None
        if batches is None:
            sampler.set_epoch(epoch, start_index=batches_done * batch_size)
            batches = iter(loader)
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        if padding_free and pipe is None:  # drop what no label depends on, one packed row per micro-batch (as single-device)
            micro = [drop_unlabeled_tail(b) for b in micro]
        micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
        lr = float(optimizer.param_groups[0]["lr"])
        # Label tokens of the whole global step: every rank divides by the same number.
        num_tokens = all_reduce_sum(count_label_tokens(micro).to(device), mesh.dp).clamp(min=1).float()
        local_loss = torch.zeros((), device=device)
        if pipe is not None:  # pipeline hook: the schedule runs forward + backward of every micro-batch
            local_loss = pipe.train_step(micro, num_tokens, device, dataset)
        else:
            for i, batch in enumerate(micro):
                set_gradient_sync(model, i == accum - 1)  # reduce-scatter only after the last micro-batch
                with loss_ctx():
                    loss = _loss_sum(model, batch, use_loss_parallel) / num_tokens
                    # FSDP averages gradients over dp ranks; scale so they add up instead.
                    (loss * dp_size).backward()
                local_loss += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
        clip = pipe.clip_grad_norm_ if pipe is not None else functools.partial(clip_grad_norm_, params)  # pipeline hook
        grad_norm = float(clip(float(loop.clip))) if loop.clip else None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        batches_done += accum
        loss_value = float(all_reduce_sum(local_loss, mesh.dp if pipe is None else None))  # global mean loss per label token
        dt = time.perf_counter() - t0
        train_seconds += dt
        train_tokens += int(num_tokens)
        if loggers is not None and (step % loop.log_every == 0 or step == total_steps):  # this step's numbers
            log_train_row(loggers, step, train_row(loss_value, lr, int(num_tokens), dt, epoch), device, grad_norm)
        if val_ds is not None and loop.val_every and step % loop.val_every == 0 and step != total_steps:
            validate()
        checkpoint_due = (loop.ckpt_every and step % loop.ckpt_every == 0) or (loop.stop_after and step == loop.stop_after)
        if step < total_steps and checkpoint_due:
            save_training_state()  # (the last step is exported as HF below instead)
        if loop.stop_after and loop.stop_after <= step < total_steps:
            if is_rank_zero():
                report_early_stop(step)
                loggers.close()
            return {"step": step, "loss": loss_value, "output_dir": out_dir}

    # ---- 6. export: gather the full model on rank 0 -----------------------------------------------
    if val_ds is not None:
        validate()
    summary = {"step": step, "loss": loss_value, "output_dir": out_dir, "world_size": dist_info.world_size,
               "train_seconds": round(train_seconds, 2), "train_label_tokens": train_tokens, **summary_val}
    if cfg_get(cfg, "save_hf", True) or (lora and cfg_get(cfg, "save_adapter", True)):
        full = gather_full_state_dict(model) if pipe is None else pipe.gather_full_state_dict()  # collective
        if is_rank_zero():
            if lora and cfg_get(cfg, "save_adapter", True):
                summary["adapter_dir"] = save_peft_adapter({k: v for k, v in full.items() if ".lora_" in k}, info,
                                                           os.path.join(out_dir, "adapter"), lora_cfg,
                                                           base_model_name_or_path=checkpoint_dir)
            if cfg_get(cfg, "save_hf", True) and cfg_get(cfg, "save_merged", True):  # LoRA: merged W + s * B A
                summary["hf_dir"] = save_hf_checkpoint(full, info, os.path.join(out_dir, "hf_model"),
                                                       tokenizer_dir=checkpoint_dir, lora_cfg=lora_cfg)
        del full
    if is_rank_zero():
        loggers.close()
        if cfg_get(cfg, "plot_loss", True):
            from tinytune.training.plotting import plot_loss

            summary["loss_plot"] = plot_loss(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"),
                                             title=f"{'lora' if lora else 'full'}_finetune_distributed")
        write_summary(out_dir, summary, t_start)
    return summary


def run(cfg: DictConfig, lora: bool) -> dict:
    """Run :func:`finetune`; tear the process group down afterwards when this call created it."""
    owns_group = not dist.is_initialized()
    summary = finetune(cfg, lora=lora)
    if owns_group:
        shutdown_distributed()
    return summary


def recipe_main(cfg: DictConfig) -> dict:
    """Full-parameter distributed fine-tuning (FSDP2 / TP / DCP)."""
    return run(cfg, lora=False)


if __name__ == "__main__":
    config.parse(recipe_main)()
