"""The settings of every shipped recipe: each key it reads, its type, default, range and help.

One class per group of keys, composed into one class per recipe (bottom of the file). A recipe
starts with ``s = LoRAFinetuneSettings.from_config(cfg)`` and reads ``s``, never the raw config,
so a key nothing reads, a wrong type or an out-of-range value is an error before any heavy work;
``tune validate`` runs the same check for the recipe a config's header names
(:data:`RECIPE_SETTINGS`). The README key table is tested against :meth:`Settings.describe`.

To add a key: one :func:`setting` line in the group that owns it (every recipe composed from that
group then accepts it), or in the recipe's own class. See docs/ARCHITECTURE.md ("Settings").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tinytune.config.settings import Settings, component, group, section, setting

LOGGER_NAMES = ("stdout", "jsonl", "tensorboard", "wandb")
DTYPE_NAMES = ("bf16", "bfloat16", "fp32", "float32", "float", "fp16", "float16", "half")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q", "k", "v", "o")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_INITS = ("default", "gaussian", "pissa")  # as tinytune.modules.peft.LORA_INITS (tested equal)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # as tinytune.checkpoint.gguf_writer.GGUF_TYPES (tested equal)
# as tinytune.kernels.cpu_gemm.CPU_GEMM_CHOICES (tested equal)
CPU_GEMM_CHOICES = ("auto", "torch", "onednn", "onednn_fast")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")  # as training.preference_losses
TRUNCATION_POLICIES = ("balanced", "prompt_first", "right", "drop")  # as datasets.encoding (tested equal)
PACKING_STRATEGIES = ("ffd", "greedy")  # as datasets.packing.pack_bins (tested)
#: ShareGPT tag names a dataset's ``tags:`` may set (as ``tinytune.datasets.styles.DEFAULT_TAGS``, tested equal).
SHAREGPT_TAGS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "observation_tag",
    "function_tag",
)
NAN_POLICIES = ("stop", "skip_step")  # tinytune.training.steps.NonFiniteGuard
#: Keys of one source in a dataset mix (``dataset: [{_component_: ..., weight: 0.7}, ...]``), beside its node.
MIX_KEYS = ("weight", "epochs")
#: as tinytune.training.optim.OPTIMIZERS + PAGED_ALIASES (tested equal)
OPTIMIZER_NAMES = (
    "adamw",
    "adamw8bit",
    "adamw4bit",
    "adamw_offload",
    "adamw8bit_offload",
    "sgd",
    "paged_adamw",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
)
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "looped_bfs")  # torch.distributed.pipelining schedules


def pipeline_keys_problem(
    degree: int, schedule: str, microbatches: int | None, layers_per_stage: int | None, seq_len: int | None
) -> str | None:
    """The cross-key rule of the pipeline keys: they only apply with ``pipeline_parallel > 1``."""
    if degree == 1 and (microbatches or layers_per_stage or seq_len or schedule != "1f1b"):
        return (
            "parallelism.microbatches / layers_per_stage / pipeline_seq_len / pipeline_schedule only apply with "
            "parallelism.pipeline_parallel > 1; remove them or set pipeline_parallel."
        )
    return None


def _loggers(value: Any) -> str | None:
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    bad = [n for n in names if n and n not in LOGGER_NAMES]
    return f"unknown logger(s) {bad}; choose from {list(LOGGER_NAMES)}" if bad else None


def _gguf_type(value: str) -> str | None:
    if str(value).lower() in GGUF_TYPES:
        return None
    return f"{value!r} is not a GGUF type tinytune writes; choose {', '.join(GGUF_TYPES)}"


def _held_out(value: list[Any]) -> str | None:
    """``sample_generation.held_out``: a list of ``{prompt: str, expect: str | list[str]}``."""
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return f"item {i}: expected {{prompt: ..., expect: ...}}, got {item!r}"
        unknown = sorted(set(item) - {"prompt", "expect"})
        if unknown:
            return f"item {i}: unknown key(s) {unknown}; items take prompt and expect"
        prompt, expect = item.get("prompt"), item.get("expect")
        if not isinstance(prompt, str) or not prompt.strip():
            return f"item {i}: prompt: a non-empty string is required, got {prompt!r}"
        expect = [expect] if isinstance(expect, str) else expect
        if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e for e in expect):
            return f"item {i}: expect: a non-empty string or list of strings is required, got {expect!r}"
    return None


def _tags(value: dict[str, Any]) -> str | None:
    bad = sorted(set(value) - set(SHAREGPT_TAGS))
    if bad:
        return f"unknown tag name(s) {bad}; tags take {', '.join(SHAREGPT_TAGS)}"
    empty = [k for k, v in value.items() if not isinstance(v, str) or not v]
    return f"{', '.join(empty)}: a non-empty string is required" if empty else None


def _attn_modules(value: list[str]) -> str | None:
    bad = [m for m in value if m not in ATTN_MODULES]
    return f"unknown attention projection(s) {bad}; choose from {list(ATTN_MODULES[:4])}" if bad else None


# ---- LoRA: the one definition (builders, recipes and the PEFT export read this) ----------------------
@dataclass(frozen=True)
class LoRASettings(Settings):
    """LoRA adapters: where they go and their hyperparameters (scaling ``lora_alpha / lora_rank``).

    The same keys (and defaults) whether they sit in a plain ``model:`` block (applied to the
    checkpoint's architecture) or next to a ``lora_*`` / ``qlora_*`` builder's ``_component_``.
    """

    NAME = "LoRA"
    lora_attn_modules: list[str] = setting(["q_proj", "v_proj"], "attention projections to adapt", check=_attn_modules)
    apply_lora_to_mlp: bool = setting(True, "also adapt gate_proj, up_proj, down_proj")
    apply_lora_to_output: bool = setting(False, "also adapt the output projection (untied models)")
    lora_rank: int = setting(8, "adapter rank r", ge=1)
    lora_alpha: float = setting(16.0, "adapter scaling numerator (scaling = alpha / rank)", gt=0)
    lora_dropout: float = setting(0.0, "dropout on the adapter input", ge=0, le=0.99)
    quantize_base: bool = setting(False, "QLoRA: frozen base weights of adapted layers in NF4")
    use_dora: bool = setting(False, "DoRA: a trainable per-row magnitude on every adapted layer")
    use_rslora: bool = setting(False, "rsLoRA: scaling alpha / sqrt(rank) instead of alpha / rank")
    lora_init: str = setting(
        "default", "adapter init (pissa: principal singular vectors; not with quantize_base)", choices=LORA_INITS
    )

    def __post_init__(self) -> None:
        if self.lora_init == "pissa" and self.quantize_base:
            raise ValueError(
                "lora_init: pissa with quantize_base (QLoRA) is not supported (NF4 would re-quantize "
                "the residual base weight); use lora_init default or gaussian"
            )

    def target_modules(self) -> list[str]:
        """Projection names to adapt: the attention list, the MLP projections, ``output``."""
        short = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
        names = [short.get(m, m) for m in self.lora_attn_modules]
        if self.apply_lora_to_mlp:
            names += list(MLP_MODULES)
        if self.apply_lora_to_output:
            names.append("output")
        return names

    def peft_config(self) -> dict[str, Any]:
        """``{"lora_rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init"}`` for the PEFT
        adapter export."""
        return {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init": self.lora_init,
        }

    @classmethod
    def from_node(cls, node: Any) -> "LoRASettings":
        """The LoRA keys of a ``model`` node (plain, or beside a builder's ``_component_``)."""
        if node is None:
            return cls()
        keys = {f.name for f in dataclasses.fields(cls)}
        picked = {k: node[k] for k in node.keys() if k in keys}
        return cls.from_config(picked)


# ---- groups of keys -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSettings(Settings):
    device: str = setting("auto", "auto | cpu | cuda[:N] | npu[:N] | mps")
    dtype: str = setting(
        "fp32",
        "parameter / compute dtype; fp16 in training: fp32 weights, fp16 autocast, dynamic loss scaling "
        "(CUDA; full_finetune, lora_finetune)",
        choices=DTYPE_NAMES,
    )
    seed: int | None = setting(0, "seed of every RNG (null: a random seed, printed)")
    compile: bool = setting(
        False,
        "torch.compile the fused RMSNorm / SwiGLU / RoPE bodies (inductor; on CPU needs a C++ compiler; "
        "seconds of compiling on the first step)",
    )
    malloc: str = setting(
        "auto",
        "host allocator (Linux glibc): keep = freed memory stays in the process (no re-faulting every step; "
        "0.3-0.7 s/step on the test VM); release = large blocks returned on free (lowest RSS); auto = release "
        "when activation checkpointing or offloading is on, else keep; default = the C library as it is",
        choices=("auto", "keep", "release", "default"),
    )
    cpu_gemm: str = setting(
        "auto",
        "fp32 GEMMs on the CPU: torch = torch.mm / F.linear as PyTorch dispatches them (MKL on x86 wheels); "
        "onednn = the oneDNN matmul bundled with PyTorch, summed in MKL's k-blocks (MKL's rounding: bitwise "
        "equal products on the AMD test VM's training shapes) at 1.4-1.8x its speed there; onednn_fast = oneDNN "
        "in one pass, faster still at 1.4-2x MKL's rounding error; auto = onednn on AMD CPUs, else torch",
        choices=CPU_GEMM_CHOICES,
    )


BF16_NAMES = ("bf16", "bfloat16")


@dataclass(frozen=True)
class SFTDeviceSettings(DeviceSettings):
    """The device keys of the single-device SFT recipes: also ``mixed_precision``."""

    mixed_precision: bool = setting(
        False, "with dtype bf16: bf16 compute (autocast), fp32 trainable weights and optimizer state"
    )

    def __post_init__(self) -> None:
        if self.mixed_precision is True and self.dtype not in BF16_NAMES:
            raise ValueError(
                f"mixed_precision: true needs dtype: bf16 (got dtype: {self.dtype}); fp32 is already full "
                "precision, and fp16 training is always mixed (fp32 weights, fp16 autocast, loss scaling)"
            )


@dataclass(frozen=True)
class DistDeviceSettings(DeviceSettings):
    """The device keys of the FSDP2 recipes: ``mixed_precision`` only states what ``dtype: bf16`` does there."""

    mixed_precision: bool | None = setting(
        None,
        "FSDP2 keeps fp32 sharded weights and optimizer state; dtype bf16 computes in bf16 (MixedPrecisionPolicy), "
        "so true = bf16 and false with bf16 is refused (null: follow dtype)",
    )

    def __post_init__(self) -> None:
        if self.mixed_precision is True and self.dtype not in BF16_NAMES:
            raise ValueError(f"mixed_precision: true needs dtype: bf16 (got dtype: {self.dtype})")
        if self.mixed_precision is False and self.dtype in BF16_NAMES:
            raise ValueError(
                "mixed_precision: false with dtype: bf16: the distributed recipes have no pure-bf16 mode (FSDP2 "
                "keeps fp32 shards and computes in bf16, which is mixed precision); drop mixed_precision or use fp32"
            )


@dataclass(frozen=True)
class TokenizerSettings(Settings):
    path: str | None = setting(None, "tokenizer file or directory (default: checkpoint_dir)")


@dataclass(frozen=True)
class ModelSourceSettings(Settings):
    checkpoint_dir: str | None = setting(None, "HF checkpoint directory to start from")
    bundled_model: str | None = setting(None, "bundled model used when checkpoint_dir has no config.json")
    tokenizer: TokenizerSettings = section(TokenizerSettings)
    template: str = setting("hf", "chat template name (hf = the tokenizer's own)")


@dataclass(frozen=True)
class DatasetOptionSettings(Settings):
    """Value keys of a dataset node (``sft_dataset``, ``preference_dataset``, ...), typed before any build.

    Only the keys present are read (a key the builder does not take is refused by its signature);
    a missing key keeps the builder's own default.
    """

    max_seq_len: int | None = setting(None, "cut or drop samples longer than this (null: no limit)", ge=1)
    truncation: str | None = setting(
        None,
        "a sample longer than max_seq_len: balanced (cut prompt and answer "
        "in proportion), prompt_first, right, drop; counted by reason in the "
        "summary (null: the builder's, balanced for sft_dataset)",
        choices=TRUNCATION_POLICIES,
    )
    train_on_input: bool | None = setting(None, "also train the prompt tokens")
    mask_history: bool | None = setting(None, "train only the last assistant turn")
    enable_thinking: bool | None = setting(None, "Qwen3 think blocks: true, false or null (mixed data)")
    packed: bool | None = setting(None, "pack samples into max_seq_len rows")
    packing_strategy: str | None = setting(None, "bin filling when packed (null: ffd)", choices=PACKING_STRATEGIES)
    val_fraction: float | None = setting(None, "split: validation takes this fraction of the rows", ge=0, le=0.99)
    skip_bad_samples: bool | None = setting(None, "skip (and count) malformed rows instead of stopping")
    tags: dict[str, Any] | None = setting(
        None,
        "ShareGPT tag names (MindSpeed map-keys tags): role_tag, "
        "content_tag, user_tag, assistant_tag, system_tag, observation_tag, "
        "function_tag",
        check=_tags,
    )


@dataclass(frozen=True)
class ValidationSettings(Settings):
    dataset: Any = component(
        "validation dataset node (else a split of dataset)", runtime_args=("tokenizer",), typed=DatasetOptionSettings
    )
    split_ratio: float | None = setting(None, "hold out this fraction of dataset", gt=0, le=0.99)
    split_size: int | None = setting(None, "hold out this many samples of dataset", ge=1)
    every_n_steps: int = setting(0, "validate every N steps (0: only at the end)", ge=0)
    max_batches: int | None = setting(None, "cap on validation batches (null: all)", ge=1)
    batch_size: int | None = setting(None, "validation batch size (null: batch_size)", ge=1)

    def due(self, step: int, total_steps: int, include_last: bool = False) -> bool:
        """Validation runs at this step during training: every ``every_n_steps`` (0: never). The last
        step counts only with ``include_last`` (recipes with no final validation of their own); else
        the final one is the recipe's own."""
        if not self.every_n_steps:
            return False
        if step == total_steps:
            return include_last
        return step % self.every_n_steps == 0


@dataclass(frozen=True)
class GenerationMetricsSettings(Settings):
    """Greedy answers to the prompts of the first samples, scored against their references."""

    num_samples: int = setting(0, "samples answered and scored: exact match, ROUGE-L, BLEU (0: off)", ge=0)
    max_new_tokens: int = setting(64, "tokens per answer", ge=1)


@dataclass(frozen=True)
class SFTValidationSettings(ValidationSettings):
    generation: GenerationMetricsSettings = section(GenerationMetricsSettings)


@dataclass(frozen=True)
class EarlyStoppingSettings(Settings):
    patience: int | None = setting(None, "validations without improvement before stopping (null: never)", ge=1)
    min_delta: float = setting(0.0, "smallest validation-loss decrease that counts as an improvement", ge=0)


@dataclass(frozen=True)
class DataSettings(Settings):
    dataset: Any = component(
        "training dataset node, or a mix: a list of nodes each with weight: (sampling "
        "weight) or epochs: (passes over that source)",
        required=True,
        runtime_args=("tokenizer",),
        mix_keys=MIX_KEYS,
        typed=DatasetOptionSettings,
    )
    validation: ValidationSettings = section(ValidationSettings)
    shuffle: bool = setting(True, "shuffle the training samples every epoch")
    batch_size: int = setting(4, "micro-batch size", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    epochs: int | None = setting(
        None, "passes over the data when max_steps is 0 (null: 1; refused with a streaming dataset)", ge=1
    )
    max_steps: int = setting(0, "optimizer steps (0: epochs x steps per epoch)", ge=0)
    pad_to_multiple_of: int = setting(8, "pad batch length to a multiple of this", ge=1)


@dataclass(frozen=True)
class SFTDataSettings(DataSettings):
    validation: SFTValidationSettings = section(SFTValidationSettings)


@dataclass(frozen=True)
class PreferenceDataSettings(DataSettings):
    batch_size: int = setting(2, "micro-batch size (pairs)", ge=1)


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """``optimizer:`` without ``_component_`` (keys of ``tinytune.training.optim.build_optimizer``)."""

    name: str = setting(
        "adamw", "optimizer (paged_*: bitsandbytes names, run as the torchao offload variants)", choices=OPTIMIZER_NAMES
    )
    lr: float = setting(2e-5, "learning rate (0: the weights stay put, e.g. to measure noise)", ge=0)
    weight_decay: float = setting(0.0, "decoupled weight decay", ge=0)
    betas: list[float] | None = setting(None, "Adam betas (default [0.9, 0.999])")
    eps: float | None = setting(None, "Adam epsilon (default 1e-8)", gt=0)
    momentum: float | None = setting(None, "SGD momentum", ge=0)
    nesterov: bool | None = setting(None, "SGD Nesterov momentum")
    dampening: float | None = setting(None, "SGD dampening", ge=0)
    amsgrad: bool | None = setting(None, "AdamW AMSGrad")
    fused: bool | None = setting(None, "fused AdamW kernel (default: on where it applies)")
    foreach: bool | None = setting(None, "multi-tensor optimizer step")
    no_decay: list[str] = setting(
        ["bias", "norm", "tok_embeddings"], "parameter-name substrings trained without weight decay"
    )


@dataclass(frozen=True)
class LRSchedulerSettings(Settings):
    """``lr_scheduler:`` without ``_component_`` (keys of ``get_lr_scheduler``)."""

    name: str = setting("cosine", "schedule after warmup", choices=("constant", "cosine", "linear"))
    warmup_steps: int | None = setting(None, "linear warmup steps", ge=0)
    warmup_ratio: float | None = setting(None, "warmup as a fraction of all steps", ge=0, le=1)
    min_lr_ratio: float | None = setting(None, "final LR / base LR (cosine, linear)", ge=0, le=1)


@dataclass(frozen=True)
class OptimSettings(Settings):
    optimizer: Any = component(
        "optimizer: name + keys, or a _component_ (gets the parameters)",
        plain=OptimizerSettings,
        runtime_args=("params",),
    )
    lr_scheduler: Any = component(
        "LR schedule: name + keys, or a _component_ (gets the optimizer); default constant",
        plain=LRSchedulerSettings,
        runtime_args=("optimizer",),
    )


@dataclass(frozen=True)
class LoopSettings(Settings):
    """The cadence of the training loop (the loop itself stays in the recipe)."""

    log_every_n_steps: int = setting(1, "log a train row every N steps", ge=1)
    checkpoint_every_n_steps: int = setting(0, "training-state checkpoint every N steps (0: never)", ge=0)
    stop_after_steps: int = setting(0, "end early after this step, with a checkpoint, to resume later (0: off)", ge=0)
    clip_grad_norm: float | None = setting(None, "clip the total gradient norm (null: no clipping)", gt=0)
    padding_free: bool = setting(True, "drop positions no label depends on from every micro-batch")
    activation_checkpointing: bool = setting(False, "recompute layer activations in backward")
    metric_loggers: list[str] | str | None = setting(
        None, "stdout, jsonl, tensorboard, wandb (null: stdout+jsonl)", check=_loggers
    )
    keep_last_checkpoints: int = setting(2, "complete checkpoints to keep", ge=1)
    resume_from_checkpoint: str | None = setting(None, "auto (newest in output_dir) | a step dir | null")
    nan_policy: str = setting(
        "stop",
        "a NaN/Inf loss or gradient norm: stop the run before the optimizer step, "
        "or skip_step (drop the step, count it)",
        choices=NAN_POLICIES,
    )

    def log_due(self, step: int, total_steps: int) -> bool:
        """A train row is logged at this step (every ``log_every_n_steps`` and the last step)."""
        return step % self.log_every_n_steps == 0 or step == total_steps

    def checkpoint_due(self, step: int) -> bool:
        """A training-state checkpoint is written at this step (cadence, or the early stop)."""
        every, stop = self.checkpoint_every_n_steps, self.stop_after_steps
        return bool((every and step % every == 0) or (stop and step == stop))

    def stops_early(self, step: int, total_steps: int) -> bool:
        """The run ends here, before ``total_steps`` (``stop_after_steps``)."""
        return bool(self.stop_after_steps) and self.stop_after_steps <= step < total_steps


@dataclass(frozen=True)
class SampleGenerationSettings(Settings):
    prompts: list[Any] = setting([], "prompts answered before and after training (a list; a string is refused)")
    max_new_tokens: int = setting(48, "tokens per answer", ge=1)
    system: str | None = setting(None, "system message for the prompts")
    held_out: list[Any] = setting(
        [],
        "questions [{prompt, expect}] answered before and after training; the fraction correct goes into the summary",
        check=_held_out,
    )
    enable_thinking: bool | None = setting(None, "Qwen3 thinking switch for the prompts (null: the template's default)")


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Keys every training recipe reads."""

    output_dir: str = setting(None, "where checkpoints, metrics, exports go", required=True)
    hardware: DeviceSettings = group(DeviceSettings)
    source: ModelSourceSettings = group(ModelSourceSettings)
    data: DataSettings = group(DataSettings)
    optim: OptimSettings = group(OptimSettings)
    loop: LoopSettings = group(LoopSettings)


@dataclass(frozen=True)
class ParallelismSettings(Settings):
    data_parallel_shard: int = setting(-1, "FSDP shard degree (-1: the rest of the world size)", ge=-1)
    data_parallel_replicate: int = setting(1, "HSDP replica groups", ge=1)
    tensor_parallel: int = setting(1, "tensor-parallel degree", ge=1)
    loss_parallel: bool = setting(False, "keep logits vocab-sharded across TP ranks in the loss")
    sequence_parallel: bool = setting(False, "shard norms/activations along the sequence in TP regions")
    pipeline_parallel: int = setting(1, "pipeline-parallel degree: stages of layers over ranks (1: off)", ge=1)
    pipeline_schedule: str = setting(
        "1f1b", "pipeline schedule (interleaved_1f1b / looped_bfs: 2 stages per rank)", choices=PIPELINE_SCHEDULES
    )
    microbatches: int | None = setting(
        None, "pipeline micro-batches per loader batch; must divide batch_size (null: pipeline_parallel)", ge=1
    )
    layers_per_stage: int | None = setting(
        None, "layers per pipeline stage (null: balance parameters, embedding and head counted)", ge=1
    )
    pipeline_seq_len: int | None = setting(
        None,
        "tokens every pipeline micro-batch is padded/packed to (null: "
        "longest training sample x rows per micro-batch, rounded up to 8)",
        ge=1,
    )

    def __post_init__(self) -> None:
        problem = pipeline_keys_problem(
            self.pipeline_parallel,
            self.pipeline_schedule,
            self.microbatches,
            self.layers_per_stage,
            self.pipeline_seq_len,
        )
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class FSDPSettings(Settings):
    reshard_after_forward: bool = setting(True, "free gathered parameters after each layer's forward")
    cpu_offload: bool = setting(False, "keep sharded parameters and optimizer state on CPU")


@dataclass(frozen=True)
class SFTMethodSettings(TrainSettings):
    """Training-method keys of every SFT recipe, single-device and distributed."""

    neftune_noise_alpha: float | None = setting(
        None, "NEFTune noise on the input embeddings, training only (null: off)", gt=0
    )
    early_stopping: EarlyStoppingSettings = section(EarlyStoppingSettings)
    save_best: bool = setting(False, "export the weights of the best validation step (needs validation data)")


@dataclass(frozen=True)
class SFTSettings(SFTMethodSettings):
    """Keys of the single-device SFT recipes (full_finetune, lora_finetune)."""

    hardware: SFTDeviceSettings = group(SFTDeviceSettings)
    data: SFTDataSettings = group(SFTDataSettings)
    sample_generation: SampleGenerationSettings = section(SampleGenerationSettings)
    # single-device only: under FSDP the saved tensors include gathered parameters (not handled yet)
    activation_offloading: bool | str = setting(
        False,
        "move tensors saved for backward out of compute memory: true = pinned host memory via a CUDA side "
        "stream; disk = unlinked temporary files in output_dir (CPU)",
        choices=(False, True, "disk"),
    )


def _loraplus_setting() -> Any:
    """``loraplus_lr_ratio`` (one definition, read by both LoRA SFT recipes)."""
    return setting(None, "LoRA+: the B matrices train at optimizer.lr x this (null: off)", gt=0)


# ---- one class per recipe -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FullFinetuneSettings(SFTSettings):
    NAME = "full_finetune"
    model: Any = component("model builder node (null: the architecture config.json names)")
    save_hf: bool = setting(True, "write hf_model/ at the end")
    export_gguf: str | None = setting(None, "also write output_dir/model-TYPE.gguf (null: no GGUF)", check=_gguf_type)


@dataclass(frozen=True)
class LoRAFinetuneSettings(SFTSettings):
    NAME = "lora_finetune"
    model: Any = component(
        "a lora_*/qlora_* builder node, or LoRA keys only (applied to config.json's architecture)", plain=LoRASettings
    )
    save_adapter: bool = setting(True, "write adapter/ (PEFT) at the end")
    save_merged: bool = setting(True, "write hf_model/ (adapters merged) at the end")
    export_gguf: str | None = setting(
        None, "also write output_dir/model-TYPE.gguf, adapters merged (null: no GGUF)", check=_gguf_type
    )
    loraplus_lr_ratio: float | None = _loraplus_setting()


@dataclass(frozen=True)
class DPOSettings(TrainSettings):
    NAME = "dpo"
    data: PreferenceDataSettings = group(PreferenceDataSettings)
    model: Any = component(
        "policy: a builder node, or LoRA keys (LoRA policy, reference = adapters off)", plain=LoRASettings
    )
    loss: str = setting("sigmoid", "preference loss (simpo, orpo: no reference model)", choices=PREFERENCE_LOSSES)
    beta: float = setting(0.1, "inverse temperature (ipo: tau; orpo: weight of the odds-ratio term)", gt=0)
    label_smoothing: float = setting(
        0.0, "cDPO flip probability (sigmoid, simpo; robust: noise rate < 0.5)", ge=0, le=0.99
    )
    gamma: float = setting(0.0, "SimPO target reward margin (simpo only)", ge=0)

    def __post_init__(self) -> None:
        # the rules across keys of tinytune.training.preference_losses.PreferenceLoss, so that
        # `tune validate` refuses what the recipe would refuse (a key the chosen loss does not read)
        if self.label_smoothing and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"label_smoothing: not used by loss={self.loss}; remove it or set it to 0")
        if self.loss == "robust" and self.label_smoothing >= 0.5:
            raise ValueError(f"label_smoothing: must be < 0.5 for loss=robust (got {self.label_smoothing})")
        if self.gamma and self.loss != "simpo":
            raise ValueError(f"gamma: only loss=simpo uses it (loss={self.loss}); remove it")


@dataclass(frozen=True)
class KTOSettings(TrainSettings):
    NAME = "kto"
    model: Any = component(
        "policy: a builder node, or LoRA keys (LoRA policy, reference = adapters off)", plain=LoRASettings
    )
    beta: float = setting(0.1, "KTO temperature", gt=0)
    desirable_weight: float = setting(1.0, "weight of desirable (label true) examples", ge=0)
    undesirable_weight: float = setting(1.0, "weight of undesirable (label false) examples", ge=0)


@dataclass(frozen=True)
class RewardModelSettings(TrainSettings):
    NAME = "reward_model"
    model: Any = component(
        "decoder: a builder node, or LoRA keys (the score head always trains in full)", plain=LoRASettings
    )


def distributed_methods_problem(
    s: SFTMethodSettings, par: ParallelismSettings, lora: LoRASettings | None = None
) -> str | None:
    """The training methods a distributed layout does not run, as an error message (None: all fine).

    DoRA's row norms would span tensor-parallel shards. With pipeline parallelism the stages are built
    and initialised apart (no whole base weight for DoRA / PiSSA), and micro-batches have a fixed
    padded length (it would change NEFTune's noise scale from the single-device run's).
    """
    if lora is not None and lora.use_dora and par.tensor_parallel > 1:
        return (
            "model.use_dora: not supported with parallelism.tensor_parallel > 1 (DoRA's row norms would span "
            "tensor-parallel shards); use data parallelism (FSDP) only"
        )
    if par.pipeline_parallel == 1:
        return None
    used = [
        key
        for key, on in (
            ("neftune_noise_alpha", s.neftune_noise_alpha is not None),
            ("model.use_dora", lora is not None and lora.use_dora),
            ("model.lora_init=pissa", lora is not None and lora.lora_init == "pissa"),
        )
        if on
    ]
    if used:
        return (
            f"{', '.join(used)}: not supported with parallelism.pipeline_parallel > 1; remove them or use "
            "pipeline_parallel: 1 (FSDP / tensor parallelism)"
        )
    return None


@dataclass(frozen=True)
class FullFinetuneDistributedSettings(SFTMethodSettings):
    NAME = "full_finetune_distributed"
    hardware: DistDeviceSettings = group(DistDeviceSettings)
    parallelism: ParallelismSettings = section(ParallelismSettings)
    fsdp: FSDPSettings = section(FSDPSettings)
    num_workers: int = setting(0, "DataLoader worker processes per rank", ge=0)
    save_hf: bool = setting(True, "write hf_model/ at the end (gathered on rank 0)")
    plot_loss: bool = setting(True, "write loss.png at the end")

    def __post_init__(self) -> None:
        problem = distributed_methods_problem(self, self.parallelism)
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class LoRAFinetuneDistributedSettings(SFTMethodSettings):
    NAME = "lora_finetune_distributed"
    model: Any = component("LoRA keys only (applied to config.json's architecture)", plain=LoRASettings)
    hardware: DistDeviceSettings = group(DistDeviceSettings)
    parallelism: ParallelismSettings = section(ParallelismSettings)
    fsdp: FSDPSettings = section(FSDPSettings)
    num_workers: int = setting(0, "DataLoader worker processes per rank", ge=0)
    save_adapter: bool = setting(True, "write adapter/ (PEFT) at the end")
    save_merged: bool = setting(True, "write hf_model/ (adapters merged) at the end")
    plot_loss: bool = setting(True, "write loss.png at the end")
    loraplus_lr_ratio: float | None = _loraplus_setting()

    def __post_init__(self) -> None:
        problem = distributed_methods_problem(self, self.parallelism, LoRASettings.from_node(self.model))
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class InferenceSettings(Settings):
    hardware: DeviceSettings = group(DeviceSettings)
    source: ModelSourceSettings = group(ModelSourceSettings)
    model: Any = component("model builder node, or LoRA keys (null: config.json's architecture)", plain=LoRASettings)
    max_new_tokens: int = setting(128, "tokens per answer", ge=1)
    temperature: float = setting(0.0, "sampling temperature (0: greedy)", ge=0)
    top_k: int | None = setting(None, "sample from the k most likely tokens", ge=1)
    top_p: float | None = setting(None, "nucleus sampling mass", gt=0, le=1)
    system: str | None = setting(None, "system message")
    enable_thinking: bool | None = setting(None, "Qwen3 thinking switch (null: the template's default)")


@dataclass(frozen=True)
class GenerateSettings(InferenceSettings):
    NAME = "generate"
    prompt: str | None = setting(None, "one prompt")
    prompts: list[str] = setting([], "prompts (a list; a string is refused)")
    prompt_file: str | None = setting(None, "text file (one prompt per line) or JSONL (prompt | messages)")
    output_file: str | None = setting(None, "write {prompt, reply} JSONL here")
    decode_plan: bool | str = setting(
        "auto",
        "decode inside tinytune.generation.decode_layout (fused weights, lean decode step; a copy of the "
        "weights): auto = when prompts x max_new_tokens >= 256 (below that its one-time cost is not paid back)",
        choices=("auto", True, False),
    )


@dataclass(frozen=True)
class ChatSettings(InferenceSettings):
    NAME = "chat"
    max_new_tokens: int = setting(256, "tokens per answer", ge=1)
    max_seq_len: int | None = setting(None, "context budget; older turns are dropped (null: min(model, 2048))", ge=1)
    decode_plan: bool | str = setting(
        "auto",
        "chat inside tinytune.generation.decode_layout (fused weights, lean decode step; a copy of the "
        "weights, built once for the session): auto = when max_new_tokens >= 256",
        choices=("auto", True, False),
    )


@dataclass(frozen=True)
class EvalSettings(Settings):
    NAME = "eval"
    hardware: DeviceSettings = group(DeviceSettings)
    source: ModelSourceSettings = group(ModelSourceSettings)
    model: Any = component("model builder node, or LoRA keys (null: config.json's architecture)", plain=LoRASettings)
    dataset: Any = component(
        "dataset node to evaluate", required=True, runtime_args=("tokenizer",), typed=DatasetOptionSettings
    )
    validation: ValidationSettings = section(ValidationSettings)
    batch_size: int = setting(8, "batch size", ge=1)
    max_batches: int | None = setting(None, "cap on batches (null: all)", ge=1)
    padding_free: bool = setting(True, "drop positions no label depends on (same loss)")
    pad_to_multiple_of: int = setting(8, "pad batch length to a multiple of this", ge=1)
    output_dir: str | None = setting(None, "write eval.json here")
    generation: GenerationMetricsSettings = section(GenerationMetricsSettings)


#: Recipe name -> its settings class (``tune validate`` and ``tune run`` look configs up here).
RECIPE_SETTINGS: dict[str, type[Settings]] = {
    cls.NAME: cls
    for cls in (
        FullFinetuneSettings,
        LoRAFinetuneSettings,
        DPOSettings,
        KTOSettings,
        RewardModelSettings,
        FullFinetuneDistributedSettings,
        LoRAFinetuneDistributedSettings,
        GenerateSettings,
        ChatSettings,
        EvalSettings,
    )
}


def settings_table() -> str:
    """The README's table of keys: one row per key and default, with the recipes that read it."""
    short = {
        "full_finetune": "full",
        "lora_finetune": "lora",
        "dpo": "dpo",
        "kto": "kto",
        "reward_model": "reward",
        "full_finetune_distributed": "full-dist",
        "lora_finetune_distributed": "lora-dist",
        "generate": "generate",
        "chat": "chat",
        "eval": "eval",
    }
    rows: dict[tuple[str, str, str, str], list[str]] = {}
    for name, cls in RECIPE_SETTINGS.items():
        for row in cls.describe():
            rows.setdefault(row, []).append(short[name])
    lines = ["| key | type | default | recipes | meaning |", "| --- | --- | --- | --- | --- |"]
    for (key, tp, default, help_), recipes in sorted(rows.items()):
        used = "all" if len(recipes) == len(RECIPE_SETTINGS) else ", ".join(recipes)
        lines.append(
            f"| `{key}` | {tp.replace('|', '&#124;')} | `{default}` | {used} | {help_.replace('|', '&#124;')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
