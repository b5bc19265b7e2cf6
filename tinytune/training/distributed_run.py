"""The plumbing the distributed SFT recipes share: processes and mesh, the sharded model, this
rank's data, validation, and the end-of-run summary.

Each piece is a plain function a recipe calls in its own order; the training loop (forward, loss,
backward, optimizer step) stays in the recipe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from tinytune.config import ConfigError
from tinytune.datasets import data_summary
from tinytune.device import get_dtype, set_seed
from tinytune.distributed.dist_evaluation import evaluate_loss_distributed
from tinytune.distributed.fsdp import load_local_shards, local_shards
from tinytune.distributed.mesh import (
    ParallelDims,
    ParallelMesh,
    build_device_mesh,
    get_dp_info,
    is_rank_zero,
    process_group,
    rank_zero_first,
)
from tinytune.distributed.pipeline import (
    Pipeline,
    PipelineSettings,
    build_pipeline,
    build_pipeline_mesh,
    check_pipeline_layout,
    world_size_from_env,
)
from tinytune.distributed.sharded_model import load_hf_model_sharded
from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.early_stopping import EarlyStopping
from tinytune.training.metric_logging import LogWindow, validation_row
from tinytune.training.neftune import activate_neftune
from tinytune.training.setup import (
    TrainData,
    apply_compile_setting,
    apply_cpu_gemm_setting,
    apply_malloc_setting,
    check_training_dtype,
    fsdp_policy,
    prepare_output_dir,
    resolve_checkpoint_dir,
    train_data,
)
from tinytune.training.steps import NonFiniteGuard


@dataclass
class DistributedRun:
    """Where one process of a distributed run stands: device, mesh, its data-parallel slice, precision.

    Attributes:
        device: this process's device.
        rank0: this process is global rank 0 (it logs, prints and exports).
        world_size: number of processes.
        dims: the parallel degrees (``dp_replicate``, ``dp_shard``, ``tp``).
        mesh: the device meshes (``mesh.dp`` sums over data-parallel ranks).
        pp_mesh: the pipeline mesh (``None`` without pipeline parallelism).
        pipe_settings: the pipeline keys (``degree`` 1: no pipeline).
        dp_rank, dp_size: this process's data-parallel rank and the data-parallel size.
        padding_free: rows stay unpadded (``padding_free`` asked and no tensor parallelism).
        dtype: the parameter dtype.
        seed: the seed in use.
        out_dir: the output directory (created and filled with the config by rank 0).
    """

    device: torch.device
    rank0: bool
    world_size: int
    dims: ParallelDims
    mesh: ParallelMesh
    pp_mesh: Any
    pipe_settings: PipelineSettings
    dp_rank: int
    dp_size: int
    padding_free: bool
    dtype: torch.dtype
    seed: int
    out_dir: str

    def layout(self) -> str:
        """``"on N processes (pp=.., dp_replicate=.., dp_shard=.., tp=..)"`` for the model line."""
        d = self.dims
        return (
            f"on {self.world_size} processes (pp={self.pipe_settings.degree}, dp_replicate={d.dp_replicate}, "
            f"dp_shard={d.dp_shard}, tp={d.tp})"
        )


@contextlib.contextmanager
def distributed_run(s: Any, cfg: DictConfig) -> Iterator[DistributedRun]:
    """Checks the dtype and the pipeline layout, starts the process group, builds the mesh, seeds.

    The pipeline layout (world size, layers, heads) is checked before any process group exists.

    Args:
        s: the recipe's settings (``hardware``, ``parallelism``, ``fsdp``, ``loop``, ``source``,
            ``output_dir``).
        cfg: the run's config (rank 0 writes it into the output directory).

    Yields:
        The :class:`DistributedRun`; the process group ends with the ``with`` block.
    """
    par = s.parallelism
    check_training_dtype(s.hardware.dtype)
    pipe_settings = PipelineSettings.from_parallelism(par)
    if pipe_settings.degree > 1:  # world size, layers, heads checked before any process group
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
        device, rank0, pp_mesh = dist_info.device, is_rank_zero(), None
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
        dtype = get_dtype(s.hardware.dtype, device)
        seed = set_seed(s.hardware.seed)
        apply_compile_setting(s.hardware)
        apply_malloc_setting(s.hardware, memory_saving=s.loop.activation_checkpointing)
        apply_cpu_gemm_setting(s.hardware)
        out_dir = prepare_output_dir(s.output_dir, cfg) if rank0 else os.path.abspath(os.path.expanduser(s.output_dir))
        yield DistributedRun(
            device=device,
            rank0=rank0,
            world_size=dist_info.world_size,
            dims=dims,
            mesh=mesh,
            pp_mesh=pp_mesh,
            pipe_settings=pipe_settings,
            dp_rank=dp_rank,
            dp_size=dp_size,
            # padding-free rows have any length; tensor/sequence parallelism needs the collated [b, s] shape
            padding_free=s.loop.padding_free and dims.tp == 1,
            dtype=dtype,
            seed=seed,
            out_dir=out_dir,
        )


def load_sharded_model(
    s: Any,
    run: DistributedRun,
    checkpoint_dir: str,
    *,
    linear_factory: Callable | None = None,
    trainable: Callable[[nn.Module], Any] | None = None,
) -> tuple[nn.Module, Any, Pipeline | None]:
    """This rank's sharded model filled from the HF checkpoint, with NEFTune when asked.

    With pipeline parallelism: this rank's stages (sharded, filled) and the schedule.

    Args:
        s: the recipe's settings (``loop``, ``fsdp``, ``parallelism``, ``data``, ``neftune_noise_alpha``).
        run: from :func:`distributed_run`.
        checkpoint_dir: HF checkpoint directory.
        linear_factory, trainable: LoRA: the adapter factory and what trains (full: ``None``).

    Returns:
        ``(model, info, pipe)``; ``pipe`` is ``None`` without pipeline parallelism.
    """
    ac = apply_activation_checkpointing if s.loop.activation_checkpointing else None
    pipe = None
    if run.pipe_settings.degree > 1:
        pipe = build_pipeline(
            run.pipe_settings,
            checkpoint_dir,
            run.mesh,
            run.pp_mesh,
            run.device,
            batch_size=s.data.batch_size,
            packed=run.padding_free,
            linear_factory=linear_factory,
            trainable=trainable,
            fsdp=fsdp_policy(s.fsdp, run.dtype),
            activation_checkpointing=ac,
        )
        model, info = pipe.model, pipe.info
    else:
        model, info = load_hf_model_sharded(
            checkpoint_dir,
            run.mesh,
            run.device,
            linear_factory=linear_factory,
            trainable=trainable,
            loss_parallel=s.parallelism.loss_parallel,
            sequence_parallel=s.parallelism.sequence_parallel,
            activation_checkpointing=ac,
            fsdp=fsdp_policy(s.fsdp, run.dtype),
        )
    if s.neftune_noise_alpha is not None:  # NEFTune noise on the input embeddings, training only
        activate_neftune(model, s.neftune_noise_alpha)
    return model, info, pipe


def distributed_train_data(s: Any, tokenizer, run: DistributedRun) -> TrainData:
    """This rank's slice of every global batch (rank 0 tokenises first; the others read its cache)."""
    with rank_zero_first():
        data = train_data(
            s.data,
            tokenizer,
            run.seed,
            s.hardware.seed,
            dp_rank=run.dp_rank,
            dp_size=run.dp_size,
            num_workers=s.num_workers,
        )
    if run.rank0:
        print(
            f"data: {len(data.train_ds)} train / {len(data.val_ds) if data.val_ds else 0} validation samples; "
            f"{data.total_steps} steps of {data.accum} x {data.batch_size} samples x {run.dp_size} data-parallel ranks"
        )
    return data


def sharded_early_stopping(
    s: Any, data: TrainData, model: nn.Module, pipe: Pipeline | None, trainable_only: bool = False
) -> tuple[EarlyStopping, nn.Module, Callable[[], dict]]:
    """Early stopping for a distributed run: the stopper, the module whose shards it keeps, their getter.

    The validation loss is the same on every rank, so every rank stops at the same step; ``save_best``
    keeps each rank's own shards (no communication). Checkpoints hold the tracking (best loss and step,
    patience count) but not the kept shards.

    Raises:
        ConfigError: early stopping or ``save_best`` without validation data.
    """
    stopper = EarlyStopping(s.early_stopping.patience, s.early_stopping.min_delta, s.save_best)
    kept = model if pipe is None else nn.ModuleList(pipe.stages.values())  # PP: this rank's stages
    if stopper.active and data.val_ds is None:
        raise ConfigError("early_stopping / save_best: need validation data (validation.dataset or split_ratio)")
    return stopper, kept, lambda: local_shards(kept, trainable_only=trainable_only)


def distributed_validator(
    model: nn.Module, data: TrainData, val_cfg: Any, run: DistributedRun, loss_sum: Callable, loss_ctx: Callable
) -> Callable[[], dict]:
    """A callable returning the validation loss over ``data.val_ds`` (collective, same on every rank)."""
    batch_size = val_cfg.batch_size or data.batch_size
    return lambda: evaluate_loss_distributed(
        model,
        data.val_ds,
        data.collate,
        batch_size,
        run.mesh.dp,
        run.device,
        loss_sum,
        val_cfg.max_batches,
        loss_ctx,
    )


def finish_distributed(
    run: DistributedRun,
    data: TrainData,
    step: int,
    total_steps: int,
    window: LogWindow,
    guard: NonFiniteGuard,
    validate: Callable[[], dict],
    loggers,
    stopper: EarlyStopping,
    kept: nn.Module,
    shards: Callable[[], dict],
) -> dict:
    """After the loop: final validation, early-stopping outcome (restoring the best kept shards),
    the loggers closed; returns the summary so far (the recipe adds its exports)."""
    summary = {
        "step": step,
        "loss": window.last_loss,
        "output_dir": run.out_dir,
        "world_size": run.world_size,
        "skipped_steps": guard.skipped,
        **window.totals(),
        "data": data_summary(data.train_ds),
    }
    if data.val_ds is not None:
        val = validation_row(validate())
        loggers.log_dict(val, step)
        summary.update(val)
        if stopper.active and step != stopper.best_step:
            stopper.update(val["val_loss"], step, shards)
    if stopper.active:
        summary.update(stopper.summary(), stopped_early=step < total_steps)
        stopper.restore_best(kept, load_local_shards)  # save_best: the exports hold the best step's weights
    loggers.close()
    return summary
