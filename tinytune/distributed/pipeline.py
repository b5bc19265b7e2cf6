"""Pipeline parallelism on ``torch.distributed.pipelining``: the 4-D mesh, building the stages, the PP step.

The device mesh is ``[pp, dp_replicate, dp_shard, tp]`` (torchtitan's layout): FSDP2 shards each stage
over ``(dp_replicate, dp_shard)``, TP splits it over ``tp``, and stage ``k`` of a pipeline talks to
stages ``k +- 1`` over ``pp``. :func:`build_pipeline` cuts this rank's stages from the checkpoint's
model (:mod:`tinytune.distributed.pipeline_stages`), parallelises and fills them, and wraps them in a
schedule whose loss function (last stage) is the fused linear cross-entropy divided by the label-token
count of the whole optimizer step over all data-parallel ranks, so the update equals one process
running the global batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from tinytune.checkpoint.adapters import is_lora_key
from tinytune.checkpoint.hf_reader import iter_shards
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, read_model_info
from tinytune.checkpoint.model_loading import build_model
from tinytune.config._errors import ConfigError
from tinytune.datasets.encoding import IGNORE_INDEX
from tinytune.distributed.fsdp import apply_fsdp, load_full_state_dict, materialize_meta_model
from tinytune.distributed.mesh import ParallelDims, ParallelMesh
from tinytune.distributed.parallel_plans import apply_tp
from tinytune.distributed.pipeline_stages import (
    MULTI_STAGE_SCHEDULES,
    DecoderStage,
    PipelineSettings,
    RankModel,
    check_pipeline_layout,
    pack_microbatch,
    stage_layer_ranges,
)
from tinytune.distributed.sharded_model import _has_lm_head
from tinytune.kernels import linear_cross_entropy

__all__ = [
    "SCHEDULES",
    "Pipeline",
    "PipelineSettings",
    "build_pipeline",
    "build_pipeline_mesh",
    "check_pipeline_layout",
    "world_size_from_env",
]

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
}


# ---- mesh -------------------------------------------------------------------------------------
def build_pipeline_mesh(pp: int, dims: ParallelDims, device_type: str) -> tuple[ParallelMesh, DeviceMesh]:
    """The 4-D mesh ``[pp, dp_replicate, dp_shard, tp]``; returns the non-pp meshes and the pp mesh."""
    world = init_device_mesh(
        device_type,
        (pp, dims.dp_replicate, dims.dp_shard, dims.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
    )
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    fsdp = world["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else world["dp_shard"]
    return ParallelMesh(world=world, dp=dp, tp=world["tp"], fsdp=fsdp, dims=dims), world["pp"]


# ---- building the stages ----------------------------------------------------------------------
def _lora_init_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fresh adapter values for every LoRA module of the whole model, drawn in module order on CPU.

    Drawing for all modules (not only this stage's) keeps the random stream of a one-process run
    with the same seed, so every stage gets exactly the adapters that run would have.
    """
    values: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        reset = getattr(module, "reset_lora_parameters", None)
        if reset is None:
            continue
        stub = nn.Module()
        # the init the module would run (gaussian: N(0, 1/rank)); pissa / DoRA are refused with PP
        stub.init, stub.rank = getattr(module, "init", "default"), module.rank
        for sub in ("lora_a", "lora_b"):
            lin = nn.Module()
            lin.weight = nn.Parameter(torch.empty(getattr(module, sub).weight.shape, device="cpu"))
            setattr(stub, sub, lin)
        with torch.no_grad():
            type(module).reset_lora_parameters(stub)
        values.update({f"{name}.{sub}.weight": getattr(stub, sub).weight.detach() for sub in ("lora_a", "lora_b")})
    return values


@dataclasses.dataclass
class Pipeline:
    """This rank's share of a pipeline-parallel model and the schedule that runs it.

    Attributes:
        model: this rank's stages under the whole model's parameter names (optimizer, DCP, export).
        stages: the :class:`DecoderStage` modules of this rank (FSDP/TP-wrapped), by stage index.
        schedule: the ``torch.distributed.pipelining`` schedule.
        mesh: the non-pp meshes (``dp``, ``fsdp``, ``tp``).
        pp_mesh: the pp mesh.
        info: checkpoint hyperparameters.
        settings: the pipeline keys.
        layer_ranges: the layers of every stage.
        seq_len: the fixed micro-batch length (None until the first step derives it from the dataset).
        packed: whether micro-batches are packed (padding-free) rows.
    """

    model: nn.Module
    stages: dict[int, DecoderStage]
    schedule: Any
    mesh: ParallelMesh
    pp_mesh: DeviceMesh
    info: ModelInfo
    settings: PipelineSettings
    layer_ranges: list[range]
    seq_len: int | None
    packed: bool
    rows_per_microbatch: int = 1
    _num_tokens: torch.Tensor | None = None
    _eval: bool = False

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return len(self.layer_ranges) - 1 in self.stages

    def _loss_fn(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Schedule loss on the last stage: summed CE / global label tokens, times dp (FSDP averages over dp)."""
        last = self.stages[len(self.layer_ranges) - 1]
        loss = linear_cross_entropy(hidden, last.output_weight, labels, reduction="sum")  # hidden [b, s, d]
        if self._eval:  # validation: the plain sum
            return loss
        return loss / self._num_tokens * self.mesh.dp.size()

    def train_step(
        self, micro: list[dict], num_tokens: torch.Tensor, device: torch.device, dataset=None
    ) -> torch.Tensor:
        """Forward + backward of one optimizer step's loader batches through the pipeline.

        Args:
            micro: the step's CPU loader batches (``gradient_accumulation_steps`` of them); each is split
                into ``microbatches`` pipeline micro-batches and run as one schedule step.
            num_tokens: label tokens of the whole step summed over all dp ranks (fp32 scalar).
            device: this rank's device.
            dataset: the training samples; without ``pipeline_seq_len`` the first step fixes the micro-batch
                length from its longest sample.

        Returns:
            This rank's share of the step's mean loss (nonzero on the last stage's tp-rank 0 only);
            summed over the world it is the global mean loss per label token.
        """
        self._num_tokens = num_tokens
        local = torch.zeros((), device=device)
        count = self.has_last and self.mesh.tp.get_local_rank() == 0  # one rank per pipeline reports its losses
        m = self.settings.n_microbatches
        if self.seq_len is None:
            rows = 1 if not self.packed else micro[0]["labels"].shape[0] // m
            self.seq_len = _default_seq_len(dataset, rows)
        for batch in micro:
            rows = batch["labels"].shape[0]
            if rows % m:
                raise ConfigError(f"batch_size={rows} is not divisible by parallelism.microbatches={m}.")
            per = rows // m
            parts = [
                pack_microbatch({k: v[i * per : (i + 1) * per] for k, v in batch.items()}, self.seq_len, self.packed)
                for i in range(m)
            ]
            full = {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}  # [m * rows_per_mb, seq_len]
            kwargs = {k: full[k] for k in ("input_pos", "seq_lens") if k in full}
            args = (full["tokens"],) if self.has_first else ()
            target = full["labels"] if self.has_last else None
            losses: list[torch.Tensor] = []  # per micro-batch, filled (cleared first) on the last stage
            self.schedule.step(*args, target=target, losses=losses, **kwargs)
            if count:
                local = local + sum(loss.detach() for loss in losses) / self.mesh.dp.size()
        return local

    def eval_loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over a validation batch's label tokens, forward-only through the pipeline.

        The batch's rows are cut into micro-batches of the training size (missing ones fully masked) and
        packed / padded to the training shape, so the stages' buffers fit. Every rank gets the sum.

        Args:
            batch: ``tokens [b, s]``, ``labels [b, s]`` (+ ``input_pos``, ``seq_lens``), on this rank's device.

        Returns:
            fp64 scalar on the batch's device.
        """
        device = batch["labels"].device
        m, per = self.settings.n_microbatches, self.rows_per_microbatch
        if self.seq_len is None:
            raise RuntimeError("eval_loss_sum before the first training step: the micro-batch length is not fixed yet.")
        cpu = {k: v.cpu() for k, v in batch.items()}
        b = cpu["labels"].shape[0]
        groups = [range(i, min(i + per, b)) for i in range(0, b, per)]
        groups += [range(0)] * (-len(groups) % m)  # whole schedule steps
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(groups), m):
            parts = []
            for rows in groups[start : start + m]:
                idx = list(rows) + [0] * (per - len(rows)) if not self.packed else list(rows) or [0]
                sub = {k: v[idx] for k, v in cpu.items()}
                masked = [j >= len(rows) for j in range(len(idx))]  # filler rows: no labels
                sub["labels"] = torch.where(torch.tensor(masked)[:, None], IGNORE_INDEX, sub["labels"])
                parts.append(pack_microbatch(sub, self.seq_len, self.packed))
            full = {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}
            kwargs = {k: full[k] for k in ("input_pos", "seq_lens") if k in full}
            args = (full["tokens"],) if self.has_first else ()
            losses: list[torch.Tensor] = []
            self._eval = True
            try:
                self.schedule.eval(*args, target=full["labels"] if self.has_last else None, losses=losses, **kwargs)
            finally:
                self._eval = False
            if self.has_last:
                total += sum(loss.detach().double() for loss in losses)
        dist.all_reduce(total, group=self.pp_mesh.get_group())  # only the last stage computed it
        return total

    def eval_loss_fn(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """:meth:`eval_loss_sum` as the ``(model, batch) -> summed loss`` of ``evaluate_loss_distributed``
        (``model`` is this rank's share, run by the schedule)."""
        return self.eval_loss_sum(batch)

    @torch.no_grad()
    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients of ``params`` (this rank's share) by the L2 norm over every stage; returns the norm.

        Same signature as :func:`tinytune.distributed.fsdp.clip_grad_norm_` (``optimizer_step``'s ``clip_fn``).
        """
        grads = [p.grad for p in params if p.grad is not None]
        groups: dict[Any, list[torch.Tensor]] = {}
        for g in grads:
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
        total_sq = torch.zeros((), dtype=torch.float32, device=self.pp_mesh.device_type)
        for gs in groups.values():
            norm = torch.nn.utils.get_total_norm(gs, norm_type=2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total_sq += norm.float().to(total_sq.device) ** 2
        dist.all_reduce(total_sq, group=self.pp_mesh.get_group())  # the stages hold disjoint parameters
        total = total_sq.sqrt().cpu()
        scale = float(max_norm) / (float(total) + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return total

    def gather_full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's full CPU state dict on global rank 0 (``{}`` elsewhere); every rank must call it."""
        mine = {}
        for name, value in self.model.state_dict().items():  # same order on every rank of a stage
            full = value.full_tensor() if isinstance(value, DTensor) else value
            mine[name] = full.detach().cpu()
        lead = self.mesh.dp.get_local_rank() == 0 and self.mesh.tp.get_local_rank() == 0
        box = [None] * self.pp_mesh.size() if self.pp_mesh.get_local_rank() == 0 else None  # each pp group's dst
        dist.gather_object(mine if lead else None, box, group=self.pp_mesh.get_group(), group_dst=0)
        if dist.get_rank() != 0:
            return {}
        out: dict[str, torch.Tensor] = {}
        for part in box:
            out.update(part)
        return out


def _stages_of_rank(pp_rank: int, pp: int, n_stages: int) -> list[int]:
    return list(range(pp_rank, n_stages, pp))  # stage i runs on pp rank i % pp


def _default_seq_len(dataset, rows: int) -> int:
    longest = max(len(dataset[i]["tokens"]) for i in range(len(dataset)))
    return -(-longest * rows // 8) * 8


def build_pipeline(
    settings: PipelineSettings,
    path: str,
    mesh: ParallelMesh,
    pp_mesh: DeviceMesh,
    device: torch.device,
    *,
    batch_size: int,
    packed: bool,
    linear_factory: Callable | None = None,
    trainable: Callable[[nn.Module], Any] | None = None,
    fsdp: dict | None = None,
    activation_checkpointing: Callable[[nn.Module], Any] | None = None,
) -> Pipeline:
    """Cut this rank's stages from the checkpoint's model, parallelise, load them and build the schedule.

    Args:
        settings: pipeline keys.
        path: HF checkpoint directory.
        mesh: the non-pp meshes (from :func:`build_pipeline_mesh`).
        pp_mesh: the pp mesh.
        device: this rank's device.
        batch_size: loader batch size (rows split into ``microbatches``).
        packed: pack micro-batches padding-free (False with TP).
        linear_factory: LoRA factory or None.
        trainable: sets ``requires_grad`` (LoRA) after TP, before FSDP.
        fsdp: keyword arguments of ``apply_fsdp``.
        activation_checkpointing: applied to the whole (meta) model before cutting.

    Returns:
        The :class:`Pipeline`.
    """
    info = read_model_info(path)
    if not _has_lm_head(path):
        info.tie_word_embeddings = True
    m = settings.n_microbatches
    if batch_size % m:
        raise ConfigError(f"batch_size={batch_size} is not divisible by parallelism.microbatches={m}.")
    with torch.device("meta"):
        model = build_model(info, linear_factory)
    if model.is_tied:
        raise ConfigError(
            "The checkpoint ties its output head to the embeddings; pipeline parallelism cannot split "
            "it. Use parallelism.pipeline_parallel: 1."
        )
    if activation_checkpointing is not None:
        activation_checkpointing(model)
    lora_values = _lora_init_values(model)
    all_keys = set(model.state_dict())
    ranges = stage_layer_ranges(model, settings)
    n_stages = len(ranges)
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    stages: dict[int, DecoderStage] = {}
    for s in _stages_of_rank(pp_rank, pp, n_stages):
        stage = DecoderStage(model, ranges[s], first=s == 0, last=s == n_stages - 1)
        if mesh.tp.size() > 1:
            apply_tp(stage, mesh.tp, family=info.model_type)
        if trainable is not None:  # after TP: its styles re-create parameters
            trainable(stage)
        apply_fsdp(stage, mesh.fsdp, **(fsdp or {}))
        materialize_meta_model(stage, torch.device("cpu") if (fsdp or {}).get("cpu_offload") else device)
        stages[s] = stage
    del model
    rank_model = RankModel(list(stages.values()))
    wanted = set(rank_model.state_dict())
    keymap = hf_key_map(info.model_type)
    loaded: set[str] = set()
    # other stages' tensors are dropped as they are read: a rank holds at most its own stages' full tensors
    for file, shard in iter_shards(path, keymap, dtype=torch.float32, drop=all_keys - wanted):
        loaded |= load_full_state_dict(rank_model, shard, strict=False, where=file)
        del shard
    missing = sorted(k for k in wanted if k not in loaded and not is_lora_key(k))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if lora_values:
        load_full_state_dict(
            rank_model, {k: v for k, v in lora_values.items() if k in wanted}, strict=False, where="LoRA init"
        )

    pipe = Pipeline(
        model=rank_model,
        stages=stages,
        schedule=None,
        mesh=mesh,
        pp_mesh=pp_mesh,
        info=info,
        settings=settings,
        layer_ranges=ranges,
        seq_len=settings.seq_len,
        packed=packed,
        rows_per_microbatch=batch_size // m,
    )
    pp_group = pp_mesh.get_group()
    pstages = [PipelineStage(stages[s], s, n_stages, device, group=pp_group) for s in sorted(stages)]
    cls = SCHEDULES[settings.schedule]
    if settings.schedule in MULTI_STAGE_SCHEDULES:
        pipe.schedule = cls(pstages, n_microbatches=m, loss_fn=pipe._loss_fn, scale_grads=False)
    else:
        pipe.schedule = cls(pstages[0], n_microbatches=m, loss_fn=pipe._loss_fn, scale_grads=False)
    return pipe


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", 1))
