"""Pipeline parallelism on ``torch.distributed.pipelining``: stage cutting, mesh, schedules, the PP step.

A ``TransformerDecoder`` is cut by its ``layers``: stage 0 also holds the token embeddings, the
last stage the final norm and the output head (the fused linear cross-entropy runs there as the
schedule's loss function). Stages are :class:`DecoderStage` views over the model's own modules,
so parameter names stay those of the whole model (``layers.7.attn.q_proj.weight``) and DCP
checkpoints and the gathered HF export look like a one-process run's.

The device mesh is ``[pp, dp_replicate, dp_shard, tp]`` (torchtitan's layout): FSDP2 shards each
stage over ``(dp_replicate, dp_shard)``, TP splits it over ``tp``, and stage ``k`` of a pipeline
talks to stages ``k +- 1`` over ``pp``. Schedules: ``gpipe`` and ``1f1b`` put one stage on each
pp rank; ``interleaved_1f1b`` and ``looped_bfs`` put ``stages_per_rank`` (2 unless
``layers_per_stage`` says otherwise) on each, stage ``i`` on pp rank ``i % pp``.

Micro-batches must have one fixed shape (the stages' receive buffers are sized on the first
step): each is packed into one row of ``seq_len`` tokens (padding-free, documents marked by
``seq_lens``), or with TP kept as padded rows of ``seq_len`` tokens. Losses are summed label-token
cross-entropies divided by the label-token count of the whole optimizer step over all
data-parallel ranks, so the update equals one process running the global batch.
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

from tinytune.checkpoint.hf_reader import iter_shards
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.loader import build_model
from tinytune.checkpoint.lora import is_lora_key
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, read_model_info
from tinytune.config._errors import ConfigError
from tinytune.kernels import linear_cross_entropy
from tinytune.modules.attention import seq_lens_to_document_ids
from tinytune.training.distributed import ParallelDims, ParallelMesh
from tinytune.training.fsdp import apply_fsdp, load_full_state_dict, materialize_meta_model
from tinytune.training.losses import IGNORE_INDEX
from tinytune.training.parallel_plans import apply_tp
from tinytune.training.sharded_model import _has_lm_head

__all__ = [
    "SCHEDULES",
    "DecoderStage",
    "Pipeline",
    "PipelineSettings",
    "balanced_split",
    "build_pipeline",
    "build_pipeline_mesh",
    "check_pipeline_layout",
    "pack_microbatch",
    "stage_layer_ranges",
]

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "looped_bfs": ScheduleLoopedBFS}
_MULTI_STAGE = ("interleaved_1f1b", "looped_bfs")


# ---- settings and layout checks (no process group needed) ------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """The ``parallelism.*`` pipeline keys.

    Attributes:
        degree: ``pipeline_parallel``: pipeline ranks (1 = off).
        schedule: ``pipeline_schedule``: one of :data:`SCHEDULES`.
        microbatches: ``microbatches``: pipeline micro-batches each loader batch is split into
            (None: the pipeline degree). Must divide ``batch_size``.
        layers_per_stage: ``layers_per_stage``: fixed layers per stage (None: balance parameters).
        seq_len: ``pipeline_seq_len``: tokens every micro-batch is padded to (None: the longest
            training sample times the rows of a micro-batch, rounded up to a multiple of 8).
    """

    degree: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None
    layers_per_stage: int | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        for key, value in (("pipeline_parallel", self.degree), ("microbatches", self.microbatches),
                           ("layers_per_stage", self.layers_per_stage), ("pipeline_seq_len", self.seq_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"parallelism.{key}={value!r}: must be a positive integer.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"parallelism.pipeline_schedule={self.schedule!r}: use one of {sorted(SCHEDULES)}.")
        if self.degree == 1 and (self.microbatches or self.layers_per_stage or self.seq_len):
            raise ConfigError("parallelism.microbatches / layers_per_stage / pipeline_seq_len only apply with "
                              "parallelism.pipeline_parallel > 1; remove them or set pipeline_parallel.")

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.degree

    def num_stages(self, num_layers: int) -> int:
        """Total stages: ``degree`` (single-stage schedules) or ``degree x stages_per_rank``."""
        if self.layers_per_stage is not None:
            if num_layers % self.layers_per_stage:
                raise ConfigError(f"parallelism.layers_per_stage={self.layers_per_stage} does not divide the model's "
                                  f"{num_layers} layers.")
            n = num_layers // self.layers_per_stage
            if self.schedule not in _MULTI_STAGE and n != self.degree:
                raise ConfigError(
                    f"parallelism.layers_per_stage={self.layers_per_stage} makes {n} stages, but "
                    f"pipeline_schedule={self.schedule} runs one stage per rank ({self.degree}); use "
                    f"layers_per_stage={num_layers // self.degree} or interleaved_1f1b / looped_bfs.")
            if n % self.degree:
                raise ConfigError(f"parallelism.layers_per_stage={self.layers_per_stage} makes {n} stages, not a "
                                  f"multiple of pipeline_parallel={self.degree}.")
            return n
        return self.degree * (2 if self.schedule in _MULTI_STAGE else 1)


def check_pipeline_layout(settings: PipelineSettings, world_size: int, checkpoint_dir: str, *,
                          data_parallel_shard: int = -1, data_parallel_replicate: int = 1, tensor_parallel: int = 1,
                          loss_parallel: bool = False, sequence_parallel: bool = False,
                          validation: bool = False) -> ParallelDims:
    """Check a PP layout against the world size and the model before any process-group work.

    Args:
        settings: pipeline keys.
        world_size: processes started (``WORLD_SIZE``).
        checkpoint_dir: HF checkpoint directory (its ``config.json``: layers, heads, tied head).
        data_parallel_shard, data_parallel_replicate, tensor_parallel: the other ``parallelism.*`` sizes.
        loss_parallel, sequence_parallel: the TP options (not supported with PP).
        validation: whether the config asks for a validation set (not supported with PP yet).

    Returns:
        The non-pipeline dims (their world size is ``world_size / pipeline_parallel``).

    Raises:
        ConfigError: naming the key and what to do.
    """
    pp = settings.degree
    info = read_model_info(checkpoint_dir)
    tied = info.tie_word_embeddings or not _has_lm_head(checkpoint_dir)
    if world_size % pp:
        raise ConfigError(f"{world_size} processes are not divisible by parallelism.pipeline_parallel={pp}; start a "
                          "multiple of it (world = pp x dp_replicate x dp_shard x tp).")
    dims = ParallelDims.from_config(world_size // pp, data_parallel_shard=data_parallel_shard,
                                    data_parallel_replicate=data_parallel_replicate, tensor_parallel=tensor_parallel)
    for name, heads in (("num_heads", info.num_heads), ("num_kv_heads", info.num_kv_heads)):
        if heads % dims.tp:
            raise ConfigError(f"parallelism.tensor_parallel={dims.tp} does not divide the model's {name}={heads}; "
                              "choose a tensor_parallel size that divides both head counts.")
    n_stages = settings.num_stages(info.num_layers)
    if n_stages > info.num_layers:
        raise ConfigError(
            f"parallelism.pipeline_parallel={pp} with pipeline_schedule={settings.schedule} needs {n_stages} stages "
            f"of at least one layer, but the model has {info.num_layers} layers; lower pipeline_parallel or use 1f1b.")
    if tied:
        raise ConfigError(
            "This model ties its output head to the token embeddings (tie_word_embeddings, e.g. SmolLM2), which "
            "would live on the first and the last pipeline stage; pipeline parallelism does not keep two copies in "
            "sync. Train it with parallelism.pipeline_parallel: 1 (FSDP / tensor_parallel scale it fine: it is small).")
    if loss_parallel or sequence_parallel:
        raise ConfigError("parallelism.loss_parallel / sequence_parallel are not supported with pipeline_parallel > 1; "
                          "set them to false.")
    if validation:
        raise ConfigError("validation (validation.dataset / split_size / split_ratio) is not supported with "
                          "parallelism.pipeline_parallel > 1 yet; remove the validation section, or evaluate the "
                          "exported hf_model/ with the eval recipe.")
    m = settings.n_microbatches
    if settings.schedule == "1f1b" and m < pp:
        raise ConfigError(f"pipeline_schedule=1f1b needs parallelism.microbatches >= pipeline_parallel={pp}; got {m}.")
    if settings.schedule in _MULTI_STAGE and m % pp:
        raise ConfigError(f"pipeline_schedule={settings.schedule} needs parallelism.microbatches to be a multiple of "
                          f"pipeline_parallel={pp}; got {m}.")
    return dims


# ---- where the layers go ---------------------------------------------------------------------
def balanced_split(weights: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous split of layers into ``n_stages`` non-empty stages minimising the heaviest stage.

    Args:
        weights: parameter count of each layer.
        n_stages: number of stages.
        first_extra: parameters the first stage holds besides its layers (token embeddings).
        last_extra: the same for the last stage (final norm, output head).

    Returns:
        One ``range`` of layer indices per stage.
    """
    n = len(weights)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(k: int, i: int, j: int) -> int:  # stage k holds layers [i, j)
        return prefix[j] - prefix[i] + (first_extra if k == 0 else 0) + (last_extra if k == n_stages - 1 else 0)

    inf = float("inf")
    # best[k][j]: smallest max-stage cost putting layers [0, j) into stages 0..k; cut[k][j]: where stage k starts
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, n_stages):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                c = max(best[k - 1][i], cost(k, i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    bounds, j = [n], n
    for k in range(n_stages - 1, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[k], bounds[k + 1]) for k in range(n_stages)]


def stage_layer_ranges(model: nn.Module, settings: PipelineSettings) -> list[range]:
    """Layer ranges of all stages of ``model`` (meta is fine): fixed ``layers_per_stage`` or balanced."""
    n_layers = len(model.layers)
    n_stages = settings.num_stages(n_layers)
    if settings.layers_per_stage is not None:
        k = settings.layers_per_stage
        return [range(s * k, (s + 1) * k) for s in range(n_stages)]
    weights = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    first = sum(p.numel() for p in model.tok_embeddings.parameters())
    last = sum(p.numel() for p in model.norm.parameters()) + (0 if model.is_tied else model.output.weight.numel())
    return balanced_split(weights, n_stages, first, last)


# ---- stages as views over the model's own modules -------------------------------------------
class _LayerDict(nn.ModuleDict):
    """Layers keyed by their index in the whole model (names stay ``layers.{i}``); iterates modules."""

    def __iter__(self):
        return iter(self._modules.values())


class DecoderStage(nn.Module):
    """One pipeline stage of a ``TransformerDecoder``: some of its layers, plus embeddings / norm + head.

    Holds the model's own modules under the model's attribute names, so ``state_dict`` keys equal
    the whole model's.

    Args:
        model: the decoder (usually on the meta device).
        layer_ids: indices of the layers this stage runs.
        first: whether it is stage 0 (holds ``tok_embeddings``).
        last: whether it is the last stage (holds ``norm`` and ``output``).
    """

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = _LayerDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None

    @property
    def output_weight(self) -> torch.Tensor:
        """``[vocab, dim]`` weight of the output head (last stage only)."""
        return self.output.weight

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage.

        Args:
            x: ``[b, s]`` token ids on the first stage, else ``[b, s, d]`` hidden states.
            input_pos: ``[b, s]`` positions.
            seq_lens: ``[b, max_docs]`` packed document lengths, or None.

        Returns:
            ``[b, s, d]`` hidden states (final-normed on the last stage).
        """
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)  # [b, s, d]
        b, s = x.shape[:2]
        if input_pos is None:
            input_pos = torch.arange(s, device=x.device).expand(b, s)  # [b, s]
        document_ids = seq_lens_to_document_ids(seq_lens, s) if seq_lens is not None else None  # [b, s]
        for layer in self.layers:
            x = layer(x, input_pos=input_pos, seq_lens=seq_lens, document_ids=document_ids)  # [b, s, d]
        if self.norm is not None:
            x = self.norm(x)
        return x


class _RankModel(nn.Module):
    """All stages of one pp rank under the whole model's names (what optimizer, DCP and export see)."""

    def __init__(self, stages: list[DecoderStage]) -> None:
        super().__init__()
        self.tok_embeddings = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
        self.layers = _LayerDict({k: v for s in stages for k, v in s.layers._modules.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.output = next((s.output for s in stages if s.output is not None), None)


# ---- mesh -------------------------------------------------------------------------------------
def build_pipeline_mesh(pp: int, dims: ParallelDims, device_type: str) -> tuple[ParallelMesh, DeviceMesh]:
    """The 4-D mesh ``[pp, dp_replicate, dp_shard, tp]``; returns the non-pp meshes and the pp mesh."""
    world = init_device_mesh(device_type, (pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                             mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    fsdp = world["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else world["dp_shard"]
    return ParallelMesh(world=world, dp=dp, tp=world["tp"], fsdp=fsdp, dims=dims), world["pp"]


# ---- micro-batches of one fixed shape ---------------------------------------------------------
def pack_microbatch(batch: dict, seq_len: int, packed: bool, ignore_index: int = IGNORE_INDEX) -> dict:
    """Pad (and with ``packed``, pack) one CPU micro-batch to a fixed shape.

    Args:
        batch: ``tokens [b, s]``, ``labels [b, s]``, optionally ``input_pos`` and ``seq_lens``.
        seq_len: the fixed length.
        packed: lay the rows end to end in one row, each cut after its last label token
            (positions after it change no loss); documents are marked by ``seq_lens``.
        ignore_index: label of unsupervised positions.

    Returns:
        packed: ``tokens/labels/input_pos [1, seq_len]`` and ``seq_lens [1, seq_len]`` (zero-padded);
        else ``tokens/labels/input_pos [b, seq_len]`` (+ ``seq_lens`` padded the same way when given).

    Raises:
        ValueError: when the micro-batch does not fit ``seq_len`` (names ``parallelism.pipeline_seq_len``).
    """
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = labels.shape
    input_pos = batch.get("input_pos")
    if input_pos is None:
        input_pos = torch.arange(s).expand(b, s)
    seq_lens = batch.get("seq_lens")
    if seq_lens is None:
        seq_lens = torch.full((b, 1), s, dtype=torch.long)
    if not packed:
        if s > seq_len:
            raise ValueError(f"a micro-batch has rows of {s} tokens, more than parallelism.pipeline_seq_len={seq_len}; "
                             "raise it.")
        pad = seq_len - s
        out = {"tokens": torch.nn.functional.pad(tokens, (0, pad)),
               "labels": torch.nn.functional.pad(labels, (0, pad), value=ignore_index),
               "input_pos": torch.cat([input_pos, torch.arange(s, seq_len).expand(b, pad)], dim=1)}
        if "seq_lens" in batch:  # the padding becomes one more document per row
            lens = torch.cat([seq_lens, torch.full((b, 1), pad, dtype=seq_lens.dtype)], dim=1)
            out["seq_lens"] = torch.nn.functional.pad(lens, (0, seq_len - lens.shape[1]))
        return out
    positions = torch.arange(1, s + 1).expand(b, s)  # [b, s]
    keep = ((labels != ignore_index) * positions).amax(dim=1).tolist()  # [b] last label position + 1
    toks, labs, pos, docs = [], [], [], []
    for r, n in enumerate(keep):
        if n == 0:
            continue
        toks.append(tokens[r, :n])
        labs.append(labels[r, :n])
        pos.append(input_pos[r, :n])
        start = 0
        for length in seq_lens[r].tolist():  # the row's documents, the last one cut at n
            if length <= 0 or start >= n:
                continue
            docs.append(min(length, n - start))
            start += docs[-1]
    kept = sum(keep)
    if kept > seq_len:
        raise ValueError(f"a micro-batch packs into {kept} tokens, more than parallelism.pipeline_seq_len={seq_len}; "
                         "raise it or lower batch_size / raise parallelism.microbatches.")
    if kept < seq_len:  # tail document: never labelled, attends only to itself
        toks.append(torch.zeros(seq_len - kept, dtype=tokens.dtype))
        labs.append(torch.full((seq_len - kept,), ignore_index, dtype=labels.dtype))
        pos.append(torch.arange(seq_len - kept))
        docs.append(seq_len - kept)
    return {"tokens": torch.cat(toks)[None],  # [1, seq_len]
            "labels": torch.cat(labs)[None],  # [1, seq_len]
            "input_pos": torch.cat(pos)[None].to(torch.long),  # [1, seq_len]
            "seq_lens": torch.tensor([docs + [0] * (seq_len - len(docs))], dtype=torch.long)}  # [1, seq_len]


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
    _num_tokens: torch.Tensor | None = None

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
        return loss / self._num_tokens * self.mesh.dp.size()

    def train_step(self, micro: list[dict], num_tokens: torch.Tensor, device: torch.device, dataset=None) -> torch.Tensor:
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
            parts = [pack_microbatch({k: v[i * per:(i + 1) * per] for k, v in batch.items()}, self.seq_len, self.packed)
                     for i in range(m)]
            full = {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}  # [m * rows_per_mb, seq_len]
            kwargs = {k: full[k] for k in ("input_pos", "seq_lens") if k in full}
            args = (full["tokens"],) if self.has_first else ()
            target = full["labels"] if self.has_last else None
            losses: list[torch.Tensor] = []  # per micro-batch, filled (cleared first) on the last stage
            self.schedule.step(*args, target=target, losses=losses, **kwargs)
            if count:
                local = local + sum(loss.detach() for loss in losses) / self.mesh.dp.size()
        return local

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients of the model (every stage) by their global L2 norm; returns the norm."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
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
        raise ConfigError("The checkpoint ties its output head to the embeddings; pipeline parallelism cannot split "
                          "it. Use parallelism.pipeline_parallel: 1.")
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
    rank_model = _RankModel(list(stages.values()))
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
        load_full_state_dict(rank_model, {k: v for k, v in lora_values.items() if k in wanted}, strict=False,
                             where="LoRA init")

    pipe = Pipeline(model=rank_model, stages=stages, schedule=None, mesh=mesh, pp_mesh=pp_mesh, info=info,
                    settings=settings, layer_ranges=ranges, seq_len=settings.seq_len, packed=packed)
    pp_group = pp_mesh.get_group()
    pstages = [PipelineStage(stages[s], s, n_stages, device, group=pp_group) for s in sorted(stages)]
    cls = SCHEDULES[settings.schedule]
    if settings.schedule in _MULTI_STAGE:
        pipe.schedule = cls(pstages, n_microbatches=m, loss_fn=pipe._loss_fn, scale_grads=False)
    else:
        pipe.schedule = cls(pstages[0], n_microbatches=m, loss_fn=pipe._loss_fn, scale_grads=False)
    return pipe


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", 1))
