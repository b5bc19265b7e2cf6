"""Per-rank memory model of a parallel training layout, and the layouts that fit a device.

For one model (its HF hyperparameters), one workload (micro-batch, sequence length, dtypes, full /
LoRA / QLoRA, optimizer, activation checkpointing, pipeline schedule) and one layout
``[pp, dp_replicate, dp_shard, tp]`` this estimates what the busiest rank holds:

The peak is taken at the end of the forward and at the end of the backward (see :func:`rank_memory`).

* parameters: its stage's parameters, TP-split matrices divided by ``tp``, all divided by ``dp_shard``
  (FSDP2), in the storage dtype (fp32 master weights in the distributed recipes; NF4 for QLoRA bases);
* gradients and optimizer state: the trainable share of the above (fp32; AdamW keeps two moments);
* activations: what one micro-batch saves for backward per layer, times the stage's layers, times the
  micro-batches in flight (GPipe / looped BFS: all; 1F1B / interleaved: ``pp - stage``); with activation
  checkpointing only each layer's input plus one layer's full set;
* CE chunk: the fused linear cross-entropy's per-chunk logits/gradient buffers plus its fp32 ``[V, d]``
  weight-gradient accumulator (last stage);
* communication buffers: FSDP's gathered copies (the root group of embeddings / norm / head stays
  gathered, plus the current and the prefetched layer), the layer-gradient reduce-scatter buffer and
  the pipeline's send/receive activation buffers.

The model is an estimate from shapes, not a measurement; ``benchmarks/bench_plan.py`` compares it
with measured peaks (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses

from tinytune.checkpoint.model_info import ModelInfo
from tinytune.config._errors import ConfigError
from tinytune.distributed.pipeline_stages import balanced_split

__all__ = ["Layout", "Workload", "candidate_layouts", "format_bytes", "parse_bytes", "plan_table", "rank_memory"]

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, an int8 scale per 64 values, an fp32 scale per 256 scales
_MLP = ("gate_proj", "up_proj", "down_proj")


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"64GB"``, ``"512MiB"`` or a plain number of bytes -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit) and s[: -len(unit)]:
            try:
                return int(float(s[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ConfigError(f"device memory {text!r}: use a size like 80GiB, 64GB or 512MiB.") from None


def format_bytes(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB) with two decimals."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Parallel sizes; their product is the number of ranks."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    def __str__(self) -> str:
        return f"pp{self.pp} x dp{self.dp_replicate}x{self.dp_shard} x tp{self.tp}"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is trained and how.

    Attributes:
        rows: sequences per micro-batch (a packed micro-batch is one row of ``seq_len`` tokens).
        seq_len: tokens per row.
        microbatches: pipeline micro-batches per schedule step (ignored without PP).
        mode: ``full``, ``lora`` or ``qlora``.
        lora_rank: adapter rank.
        lora_targets: adapted projections (``q_proj`` ... ``down_proj``, ``output``).
        optimizer: ``adamw`` / ``adam`` (two fp32 moments) or ``sgd`` (none).
        compute_dtype: ``bf16`` or ``fp32`` (activations, gathered parameters).
        master_dtype: storage dtype of the parameters (fp32 in the distributed recipes).
        activation_checkpointing: recompute each layer in backward.
        schedule: pipeline schedule (``1f1b``, ``gpipe``, ``interleaved_1f1b``, ``looped_bfs``).
        ce_chunk_bytes: the fused cross-entropy's chunk budget (256 MiB on CPU, 1 GiB on CUDA).
        ce_chunk_rows: the most tokens per chunk whatever the budget (CPU runs: 256,
            ``tinytune.kernels.linear_ce.CPU_MAX_CHUNK_ROWS``), or None (CUDA).
        attention_scores: the attention kernel keeps ``[b, h, s, s]`` probabilities (plain SDPA math);
            False for flash-style kernels.
        fsdp: parameters are sharded/gathered by FSDP2 (the distributed recipes).
        accum_steps: gradient-accumulation micro-batches per optimizer step outside the pipeline.
        load_on_device: the checkpoint is read into the same memory (CPU runs).
    """

    rows: int = 1
    seq_len: int = 2048
    microbatches: int = 1
    mode: str = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    optimizer: str = "adamw"
    compute_dtype: str = "bf16"
    master_dtype: str = "fp32"
    activation_checkpointing: bool = False
    schedule: str = "1f1b"
    ce_chunk_bytes: int = 2**30
    ce_chunk_rows: int | None = None
    attention_scores: bool = False
    fsdp: bool = True
    accum_steps: int = 1
    load_on_device: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora", "qlora"):
            raise ConfigError(f"mode {self.mode!r}: use full, lora or qlora.")
        for name in ("compute_dtype", "master_dtype"):
            if getattr(self, name) not in _DTYPE_BYTES:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {sorted(_DTYPE_BYTES)}.")


def _linears(info: ModelInfo) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one layer."""
    q, kv = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    return {
        "q_proj": (info.dim, q),
        "k_proj": (info.dim, kv),
        "v_proj": (info.dim, kv),
        "o_proj": (q, info.dim),
        "gate_proj": (info.dim, info.hidden_dim),
        "up_proj": (info.dim, info.hidden_dim),
        "down_proj": (info.hidden_dim, info.dim),
    }


def _layer_params(info: ModelInfo, work: Workload) -> tuple[float, float, float]:
    """(TP-split base weights, replicated weights, trainable adapters) of one layer, in elements."""
    lin = _linears(info)
    split = sum(i * o for i, o in lin.values())
    if info.qkv_bias:
        split += lin["q_proj"][1] + 2 * lin["k_proj"][1]
    replicated = 2 * info.dim + (2 * info.head_dim if info.qk_norm else 0)  # norms
    adapters = sum(work.lora_rank * (i + o) for name, (i, o) in lin.items() if name in work.lora_targets)
    return split, replicated, adapters if work.mode != "full" else 0


def _activation_elems_per_token(info: ModelInfo, tp: int) -> float:
    """Elements one layer saves for backward per token (no checkpointing)."""
    q, kv, h, d = (
        info.num_heads * info.head_dim / tp,
        info.num_kv_heads * info.head_dim / tp,
        info.hidden_dim / tp,
        info.dim,
    )
    # two RMSNorms: input, normalised input, output (3d each); q/k/v projections' outputs, the same after
    # RoPE (and Qwen3's q/k norms), attention output and the o_proj input copy (4q + 3kv);
    # MLP: gate, up, silu(gate), their product (4h)
    return 6 * d + 4 * q + 3 * kv + 4 * h


def rank_memory(info: ModelInfo, layout: Layout, work: Workload, pp_rank: int | None = None) -> dict[str, float]:
    """Estimated peak bytes on the busiest rank of ``layout`` (or on pipeline rank ``pp_rank``).

    The peak is the larger of two moments: the end of the forward (parameters, optimizer state, the
    activations of every micro-batch in flight, the CE chunk, the gathered root group; gradients too
    when earlier micro-batches of the step already ran backward) and the end of the backward
    (parameters, optimizer state, gradients, gathered layers and the reduce-scatter buffer). With
    ``work.load_on_device`` (CPU runs) a third moment counts: loading, when the rank holds its shards
    plus its stages' full fp32 tensors read from the checkpoint.

    Returns:
        ``{"params", "grads", "optimizer", "activations", "activations_no_ac", "activations_ac", "ce_chunk",
        "comm", "total", "phase", "stage_layers", "pp_rank"}`` (``activations`` is the one ``work`` selects).

    Raises:
        ConfigError: layouts the recipes refuse (TP not dividing the heads, PP deeper than the model,
            QLoRA with parallelism).
    """
    pp, tp, shard = layout.pp, layout.tp, layout.dp_shard
    if info.num_heads % tp or info.num_kv_heads % tp:
        raise ConfigError(f"tp={tp} does not divide {info.num_heads} query / {info.num_kv_heads} key-value heads.")
    stages_per_rank = 2 if work.schedule in ("interleaved_1f1b", "looped_bfs") and pp > 1 else 1
    n_stages = pp * stages_per_rank
    if n_stages > info.num_layers:
        raise ConfigError(f"pp={pp} ({n_stages} stages) is deeper than the model's {info.num_layers} layers.")
    if work.mode == "qlora" and layout.world > 1:
        raise ConfigError("QLoRA runs on one device (lora_finetune); use LoRA for parallel layouts.")
    cb, mb = _DTYPE_BYTES[work.compute_dtype], _DTYPE_BYTES[work.master_dtype]
    split, repl, adapters = _layer_params(info, work)
    embed = info.vocab_size * info.dim
    head = 0 if info.tie_word_embeddings else info.vocab_size * info.dim
    head_adapters = (
        work.lora_rank * (info.dim + info.vocab_size) if work.mode != "full" and "output" in work.lora_targets else 0
    )
    ranges = balanced_split([int(split + repl)] * info.num_layers, n_stages, embed, head + info.dim)
    tokens = work.rows * work.seq_len  # per micro-batch
    m = max(work.microbatches, pp) if pp > 1 else 1  # 1F1B needs at least pp micro-batches
    best: dict[str, float] | None = None
    for rank in range(pp) if pp_rank is None else [pp_rank]:
        stages = list(range(rank, n_stages, pp))
        n_layers = sum(len(ranges[s]) for s in stages)
        first, last = 0 in stages, n_stages - 1 in stages
        base = n_layers * (split / tp + repl) + (embed if first else 0) + ((head + info.dim) if last else 0)
        trainable = n_layers * adapters / tp + (head_adapters if last else 0)
        if work.mode == "full":
            trainable = base
        if work.mode == "qlora":  # NF4 linears; embeddings, norms, head in the compute dtype
            lin = n_layers * split
            params = lin * _NF4_BYTES + (base - lin) * cb + trainable * mb
        else:
            params = (base + (trainable if work.mode == "lora" else 0)) * mb / shard
        grads = trainable * 4 / shard
        optim = trainable * (8 if work.optimizer in ("adamw", "adam") else 0) / shard
        # micro-batches whose activations are alive at once on this rank
        if pp == 1:
            in_flight = 1
        elif work.schedule in ("gpipe", "looped_bfs"):
            in_flight = m
        else:
            in_flight = min(m, pp - rank)
        per_layer = _activation_elems_per_token(info, tp) * tokens * cb
        if work.attention_scores:
            per_layer += 2 * (info.num_heads / tp) * work.rows * work.seq_len**2 * 4  # scores + probabilities, fp32
        no_ac = per_layer * n_layers * in_flight
        ac = info.dim * tokens * cb * n_layers * in_flight + per_layer
        acts = ac if work.activation_checkpointing else no_ac
        ce = 0.0
        if last:
            chunk = min(tokens, max(1, work.ce_chunk_bytes // (info.vocab_size * (4 + 2 * cb))))
            if work.ce_chunk_rows is not None:
                chunk = min(chunk, work.ce_chunk_rows)
            ce = chunk * info.vocab_size * (4 + (cb if cb < 4 else 0)) + tokens * info.dim * (cb + 4)  # logits, grad_h
            if work.mode == "full" or head_adapters:
                ce += info.vocab_size * info.dim * 4  # fp32 [V, d] weight-gradient accumulator
        root = (embed if first else 0) + ((head + info.dim) if last else 0)
        layer_full = split / tp + repl
        gathered_root = root * cb if work.fsdp else 0.0  # the root group stays gathered forward to backward
        gathered_layers = 2 * layer_full * cb if work.fsdp else 0.0  # current + prefetched layer
        reduce_buf = ((layer_full if work.mode == "full" else adapters / tp) * 4) if work.fsdp else 0.0
        pp_buf = 2 * tokens * info.dim * cb * min(m, 2) if pp > 1 else 0.0  # send / receive buffers
        comm = gathered_root + gathered_layers + reduce_buf + pp_buf
        grads_in_fwd = grads if (pp > 1 or work.accum_steps > 1) else 0.0
        at_fwd = params + optim + acts + ce + gathered_root + gathered_layers + pp_buf + grads_in_fwd
        at_bwd = params + optim + grads + gathered_root + gathered_layers + reduce_buf + pp_buf + per_layer
        at_load = params + base * 4 if work.load_on_device else 0.0
        total, phase = max((at_fwd, "forward"), (at_bwd, "backward"), (at_load, "load"))
        row = {
            "params": params,
            "grads": grads,
            "optimizer": optim,
            "activations": acts,
            "activations_no_ac": no_ac,
            "activations_ac": ac,
            "ce_chunk": ce,
            "comm": comm,
            "total": total,
            "phase": phase,
            "stage_layers": n_layers,
            "pp_rank": rank,
        }
        if best is None or total > best["total"]:
            best = row
    return best


def candidate_layouts(info: ModelInfo, devices: int, max_tp: int = 8) -> list[Layout]:
    """Layouts of ``devices`` ranks: pp up to the layer count, tp dividing both head counts (at most ``max_tp``,
    one node), the rest FSDP (``dp_shard``)."""
    out = []
    for pp in range(1, devices + 1):
        if devices % pp or pp > info.num_layers:
            continue
        for tp in range(1, min(max_tp, devices // pp) + 1):
            if (devices // pp) % tp or info.num_heads % tp or info.num_kv_heads % tp:
                continue
            out.append(Layout(pp=pp, dp_shard=devices // (pp * tp), tp=tp))
    return out


def plan_table(
    info: ModelInfo, work: Workload, layouts: list[Layout], device_memory: int | None = None, headroom: float = 0.9
) -> str:
    """A text table of per-rank memory for ``layouts``; with ``device_memory``, a ``fits`` column.

    A layout fits when its estimated total is at most ``headroom`` (90%) of the device memory: the
    rest is left to the CUDA context, the allocator's fragmentation and temporaries not modelled.
    """
    cols = ["layout", "params", "grads", "optim", "act", "act(AC)", "act(no AC)", "CE chunk", "comm", "total"]
    if device_memory:
        cols.append("fits")
    rows = []
    for layout in layouts:
        try:
            r = rank_memory(info, layout, work)
        except ConfigError as e:
            rows.append([str(layout), f"refused: {e}"])
            continue
        g = lambda v: f"{v / 2**30:.2f}"  # noqa: E731 - GiB column
        row = [
            str(layout),
            g(r["params"]),
            g(r["grads"]),
            g(r["optimizer"]),
            g(r["activations"]),
            g(r["activations_ac"]),
            g(r["activations_no_ac"]),
            g(r["ce_chunk"]),
            g(r["comm"]),
            g(r["total"]),
        ]
        if device_memory:
            row.append("yes" if r["total"] <= headroom * device_memory else "no")
        rows.append(row)
    widths = [max([len(c)] + [len(r[i]) for r in rows if len(r) > i]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for r in rows:
        if len(r) == 2:
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines) + "\n(GiB per rank, busiest rank)"
