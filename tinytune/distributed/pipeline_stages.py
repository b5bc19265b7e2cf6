"""Pipeline stages cut from a ``TransformerDecoder``: settings, layout checks, the split, fixed-shape micro-batches.

A decoder is cut by its ``layers``: stage 0 also holds the token embeddings, the last stage the final
norm and the output head. Stages are :class:`DecoderStage` views over the model's own modules, so
parameter names stay those of the whole model (``layers.7.attn.q_proj.weight``) and DCP checkpoints
and the gathered HF export look like a one-process run's. ``gpipe`` and ``1f1b`` put one stage on
each pp rank; ``interleaved_1f1b`` and ``looped_bfs`` put two (or ``layers / layers_per_stage / pp``)
on each, stage ``i`` on pp rank ``i % pp``.

Micro-batches must have one fixed shape (the stages' receive buffers are sized on the first step):
:func:`pack_microbatch` packs each into one row of ``seq_len`` tokens (padding-free, documents marked
by ``seq_lens``), or keeps padded rows of ``seq_len`` tokens (with TP).

Nothing here needs a process group: the checks run before one exists.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tinytune.checkpoint.model_info import read_model_info
from tinytune.config._errors import ConfigError
from tinytune.config.recipe_settings import PIPELINE_SCHEDULES, ParallelismSettings, pipeline_keys_problem
from tinytune.datasets.encoding import IGNORE_INDEX
from tinytune.distributed.mesh import ParallelDims
from tinytune.distributed.sharded_model import _has_lm_head
from tinytune.modules.attention import seq_lens_to_document_ids

__all__ = [
    "MULTI_STAGE_SCHEDULES",
    "SCHEDULE_NAMES",
    "DecoderStage",
    "PipelineSettings",
    "RankModel",
    "balanced_split",
    "check_pipeline_layout",
    "pack_microbatch",
    "stage_layer_ranges",
]

SCHEDULE_NAMES = PIPELINE_SCHEDULES
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "looped_bfs")  # several stages per pp rank


# ---- settings and layout checks (no process group needed) ------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """The ``parallelism.*`` pipeline keys.

    Attributes:
        degree: ``pipeline_parallel``: pipeline ranks (1 = off).
        schedule: ``pipeline_schedule``: one of :data:`SCHEDULE_NAMES`.
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
        for key, value in (
            ("pipeline_parallel", self.degree),
            ("microbatches", self.microbatches),
            ("layers_per_stage", self.layers_per_stage),
            ("pipeline_seq_len", self.seq_len),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"parallelism.{key}={value!r}: must be a positive integer.")
        if self.schedule not in SCHEDULE_NAMES:
            raise ConfigError(f"parallelism.pipeline_schedule={self.schedule!r}: use one of {list(SCHEDULE_NAMES)}.")
        problem = pipeline_keys_problem(
            self.degree, self.schedule, self.microbatches, self.layers_per_stage, self.seq_len
        )
        if problem:
            raise ConfigError(problem)

    @classmethod
    def from_parallelism(cls, par: ParallelismSettings) -> PipelineSettings:
        """The pipeline keys of a recipe's declared ``parallelism`` section (already type- and range-checked)."""
        return cls(
            degree=par.pipeline_parallel,
            schedule=par.pipeline_schedule,
            microbatches=par.microbatches,
            layers_per_stage=par.layers_per_stage,
            seq_len=par.pipeline_seq_len,
        )

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.degree

    def num_stages(self, num_layers: int) -> int:
        """Total stages: ``degree`` (single-stage schedules) or ``degree x stages_per_rank``."""
        if self.layers_per_stage is not None:
            if num_layers % self.layers_per_stage:
                raise ConfigError(
                    f"parallelism.layers_per_stage={self.layers_per_stage} does not divide the model's "
                    f"{num_layers} layers."
                )
            n = num_layers // self.layers_per_stage
            if self.schedule not in MULTI_STAGE_SCHEDULES and n != self.degree:
                raise ConfigError(
                    f"parallelism.layers_per_stage={self.layers_per_stage} makes {n} stages, but "
                    f"pipeline_schedule={self.schedule} runs one stage per rank ({self.degree}); use "
                    f"layers_per_stage={num_layers // self.degree} or interleaved_1f1b / looped_bfs."
                )
            if n % self.degree:
                raise ConfigError(
                    f"parallelism.layers_per_stage={self.layers_per_stage} makes {n} stages, not a "
                    f"multiple of pipeline_parallel={self.degree}."
                )
            return n
        return self.degree * (2 if self.schedule in MULTI_STAGE_SCHEDULES else 1)


def check_pipeline_layout(
    settings: PipelineSettings,
    world_size: int,
    checkpoint_dir: str,
    *,
    data_parallel_shard: int = -1,
    data_parallel_replicate: int = 1,
    tensor_parallel: int = 1,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
) -> ParallelDims:
    """Check a PP layout against the world size and the model before any process-group work.

    Args:
        settings: pipeline keys.
        world_size: processes started (``WORLD_SIZE``).
        checkpoint_dir: HF checkpoint directory (its ``config.json``: layers, heads, tied head).
        data_parallel_shard, data_parallel_replicate, tensor_parallel: the other ``parallelism.*`` sizes.
        loss_parallel, sequence_parallel: the TP options (not supported with PP).

    Returns:
        The non-pipeline dims (their world size is ``world_size / pipeline_parallel``).

    Raises:
        ConfigError: naming the key and what to do.
    """
    pp = settings.degree
    info = read_model_info(checkpoint_dir)
    tied = info.tie_word_embeddings or not _has_lm_head(checkpoint_dir)
    if world_size % pp:
        raise ConfigError(
            f"{world_size} processes are not divisible by parallelism.pipeline_parallel={pp}; start a "
            "multiple of it (world = pp x dp_replicate x dp_shard x tp)."
        )
    dims = ParallelDims.from_config(
        world_size // pp,
        data_parallel_shard=data_parallel_shard,
        data_parallel_replicate=data_parallel_replicate,
        tensor_parallel=tensor_parallel,
    )
    for name, heads in (("num_heads", info.num_heads), ("num_kv_heads", info.num_kv_heads)):
        if heads % dims.tp:
            raise ConfigError(
                f"parallelism.tensor_parallel={dims.tp} does not divide the model's {name}={heads}; "
                "choose a tensor_parallel size that divides both head counts."
            )
    n_stages = settings.num_stages(info.num_layers)
    if n_stages > info.num_layers:
        raise ConfigError(
            f"parallelism.pipeline_parallel={pp} with pipeline_schedule={settings.schedule} needs {n_stages} stages "
            f"of at least one layer, but the model has {info.num_layers} layers; lower pipeline_parallel or use 1f1b."
        )
    if tied:
        raise ConfigError(
            "This model ties its output head to the token embeddings (tie_word_embeddings, e.g. SmolLM2), which "
            "would live on the first and the last pipeline stage; pipeline parallelism does not keep two copies in "
            "sync. Train it with parallelism.pipeline_parallel: 1 (FSDP / tensor_parallel scale it fine: it is small)."
        )
    if loss_parallel or sequence_parallel:
        raise ConfigError(
            "parallelism.loss_parallel / sequence_parallel are not supported with pipeline_parallel > 1; "
            "set them to false."
        )
    m = settings.n_microbatches
    if settings.schedule == "1f1b" and m < pp:
        raise ConfigError(f"pipeline_schedule=1f1b needs parallelism.microbatches >= pipeline_parallel={pp}; got {m}.")
    if settings.schedule in MULTI_STAGE_SCHEDULES and m % pp:
        raise ConfigError(
            f"pipeline_schedule={settings.schedule} needs parallelism.microbatches to be a multiple of "
            f"pipeline_parallel={pp}; got {m}."
        )
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

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
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


class RankModel(nn.Module):
    """All stages of one pp rank under the whole model's names (what optimizer, DCP and export see)."""

    def __init__(self, stages: list[DecoderStage]) -> None:
        super().__init__()
        self.tok_embeddings = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
        self.layers = _LayerDict({k: v for s in stages for k, v in s.layers._modules.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.output = next((s.output for s in stages if s.output is not None), None)


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
            raise ValueError(
                f"a micro-batch has rows of {s} tokens, more than parallelism.pipeline_seq_len={seq_len}; raise it."
            )
        pad = seq_len - s
        out = {
            "tokens": torch.nn.functional.pad(tokens, (0, pad)),
            "labels": torch.nn.functional.pad(labels, (0, pad), value=ignore_index),
            "input_pos": torch.cat([input_pos, torch.arange(s, seq_len).expand(b, pad)], dim=1),
        }
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
        raise ValueError(
            f"a micro-batch packs into {kept} tokens, more than parallelism.pipeline_seq_len={seq_len}; "
            "raise it or lower batch_size / raise parallelism.microbatches."
        )
    if kept < seq_len:  # tail document: never labelled, attends only to itself
        toks.append(torch.zeros(seq_len - kept, dtype=tokens.dtype))
        labs.append(torch.full((seq_len - kept,), ignore_index, dtype=labels.dtype))
        pos.append(torch.arange(seq_len - kept))
        docs.append(seq_len - kept)
    return {
        "tokens": torch.cat(toks)[None],  # [1, seq_len]
        "labels": torch.cat(labs)[None],  # [1, seq_len]
        "input_pos": torch.cat(pos)[None].to(torch.long),  # [1, seq_len]
        "seq_lens": torch.tensor([docs + [0] * (seq_len - len(docs))], dtype=torch.long),
    }  # [1, seq_len]
