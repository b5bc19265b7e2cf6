"""Recipe setup from a config: output dir, checkpoint dir, model, tokenizer, datasets, collate.

These helpers turn config nodes into objects in the same way for every single-device recipe,
so the recipes themselves stay short and read top to bottom.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import IterableDataset

from tinytune import config as tt_config
from tinytune.checkpoint import ensure_bundled, load_hf_model
from tinytune.checkpoint.bundled import tinytune_home
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import (
    MIX_KEYS,
    DataSettings,
    DeviceSettings,
    FSDPSettings,
    LoRASettings,
    ModelSourceSettings,
)
from tinytune.datasets import DatasetError, padded_collate
from tinytune.datasets.mixing import MixedDataset
from tinytune.device import get_device, get_dtype, set_seed
from tinytune.hub import HubError, resolve_hf_checkpoint
from tinytune.kernels.compiled_ops import set_compiled
from tinytune.kernels.cpu_gemm import set_cpu_gemm
from tinytune.models.lora_builders import is_lora_builder, lora_factory
from tinytune.tokenizers import load_tokenizer as _load_tokenizer
from tinytune.training.data import BatchStream, split_dataset
from tinytune.training.host_malloc import apply_malloc_policy, resolve_malloc_policy
from tinytune.training.loss_scaling import FP16_NAMES
from tinytune.training.stream_data import IterableBatchStream

log = logging.getLogger(__name__)


def check_training_dtype(name: str, device: torch.device | None = None, loss_scaling: bool = False) -> None:
    """The training recipes' precision policy: fp16 only with loss scaling, and only on CUDA.

    ``full_finetune`` and ``lora_finetune`` train fp16 with dynamic loss scaling
    (:mod:`tinytune.training.loss_scaling`: fp32 weights, fp16 autocast, ``torch.amp.GradScaler``);
    the other training recipes (preference, reward, distributed) do no loss scaling.

    Args:
        name: the ``dtype`` setting.
        device: the training device (None: not known yet, only the recipe rule is checked).
        loss_scaling: whether the recipe does loss scaling.

    Raises:
        ConfigError: fp16 in a recipe without loss scaling, or on a device other than CUDA.
    """
    if name not in FP16_NAMES:
        return
    if not loss_scaling:
        raise ConfigError(
            f"dtype: {name} needs loss scaling, which only the single-device SFT recipes (full_finetune, "
            "lora_finetune) do; use bf16 or fp32."
        )
    if device is not None and device.type != "cuda":
        raise ConfigError(
            f"dtype: {name} trains with dynamic loss scaling (torch.amp.GradScaler), which tinytune runs on CUDA "
            f"only; on {device.type} use bf16 or fp32."
        )


def setup_device(
    hw: DeviceSettings, training: bool = True, loss_scaling: bool = False, memory_saving: bool = False
) -> tuple[torch.device, torch.dtype, int]:
    """``(device, dtype, seed)`` from the ``device``, ``dtype`` and ``seed`` settings.

    Seeds every RNG (:func:`tinytune.device.set_seed`) and returns the seed used. With
    ``training`` the dtype policy of :func:`check_training_dtype` applies; with ``loss_scaling``
    (fp16 accepted on CUDA) an fp16 run gets fp32 weights (the master copy; the compute is fp16
    under autocast, see :func:`tinytune.training.loss_scaling.fp16_loss_scaler`). ``memory_saving``
    (activation checkpointing or offloading on) makes ``malloc: auto`` mean ``release``.
    """
    if training:
        check_training_dtype(hw.dtype, loss_scaling=loss_scaling)
    device = get_device(hw.device)
    if training:
        check_training_dtype(hw.dtype, device, loss_scaling=loss_scaling)
    if training and hw.dtype in FP16_NAMES:
        dtype = torch.float32  # fp32 master weights; fp16 autocast in the forward
    else:
        dtype = get_dtype(hw.dtype, device)
    seed = set_seed(hw.seed)
    apply_compile_setting(hw)
    apply_malloc_setting(hw, memory_saving)
    apply_cpu_gemm_setting(hw)
    return device, dtype, seed


def apply_compile_setting(hw: DeviceSettings) -> None:
    """``compile``: compiled elementwise bodies for this process (:mod:`tinytune.kernels.compiled_ops`).

    Raises:
        ConfigError: ``compile: true`` where ``torch.compile`` does not work (names the key and the cause).
    """
    try:
        set_compiled(hw.compile)
    except RuntimeError as e:
        raise ConfigError(f"compile: {e}; set compile: false to run without it") from e


def apply_cpu_gemm_setting(hw: DeviceSettings) -> str:
    """``cpu_gemm``: the fp32 CPU GEMM back end of this process (:mod:`tinytune.kernels.cpu_gemm`).

    Returns:
        The back end and why, in words (also logged).

    Raises:
        ConfigError: ``cpu_gemm: onednn`` / ``onednn_fast`` where this PyTorch build has no usable oneDNN
            matmul (``auto`` falls back to ``torch`` there, and says so in the log).
    """
    try:
        result = set_cpu_gemm(hw.cpu_gemm)
    except RuntimeError as e:
        raise ConfigError(f"cpu_gemm: {hw.cpu_gemm}: {e}; set cpu_gemm: torch or auto") from e
    log.info("cpu_gemm: %s", result)
    return result


def apply_malloc_setting(hw: DeviceSettings, memory_saving: bool = False) -> str:
    """``malloc``: the host allocator policy of this process (:mod:`tinytune.training.host_malloc`).

    Args:
        hw: the device settings.
        memory_saving: activation checkpointing or offloading is on (``auto`` then means ``release``).

    Returns:
        What holds now; anything other than what was asked for is also logged as a warning.
    """
    want = resolve_malloc_policy(hw.malloc, memory_saving)
    result = apply_malloc_policy(hw.malloc, memory_saving)
    if result != want:
        log.warning("malloc: %s", result)
    return result


def prepare_output_dir(output_dir: str | None, cfg: DictConfig) -> str:
    """Creates ``output_dir`` and writes the resolved config there as ``config.yaml``."""
    out = output_dir
    if not out:
        raise ConfigError("output_dir: required (where checkpoints, metrics and loss.png go)")
    out = os.path.abspath(os.path.expanduser(str(out)))
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "config.yaml"), resolve=True)
    return out


def resolve_checkpoint_dir(src: ModelSourceSettings) -> str:
    """The HF checkpoint directory to start from.

    ``checkpoint_dir`` must be an HF checkpoint directory (with ``config.json``) or ``hf://ORG/NAME[@REV]``
    (a Hugging Face Hub model, see :func:`tinytune.hub.resolve_hf_checkpoint`). The one exception is
    the bundled model's own location (``$TINYTUNE_HOME/models/<bundled_model>``, default
    ``~/.cache/tinytune/models/...``, which the shipped configs name): when ``bundled_model`` is set
    and that directory is missing, the bundled model is converted there on first use (``tune
    download``). Without ``checkpoint_dir`` the bundled model is used.

    Raises:
        ConfigError: ``checkpoint_dir`` names a directory that does not exist or has no
            ``config.json`` (a typo never falls back to the bundled model), or neither is set.
    """
    path, bundled = src.checkpoint_dir, src.bundled_model
    if path and str(path).startswith("hf://"):  # a hub model: the hub cache, downloaded on first use
        try:
            return resolve_hf_checkpoint(str(path))
        except HubError as e:
            raise ConfigError(f"checkpoint_dir: {path}: {e}") from None
    if path:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        bundled_homes = {
            os.path.join(home, "models", str(bundled))
            for home in (tinytune_home(), os.path.abspath(os.path.expanduser("~/.cache/tinytune")))
        }
        if not bundled or path not in bundled_homes:
            what = "does not exist" if not os.path.exists(path) else "has no config.json (not an HF checkpoint)"
            raise ConfigError(
                f"checkpoint_dir: {path} {what}. Fix the path (e.g. OUTPUT_DIR/hf_model of a finished run)"
                + (f", or drop checkpoint_dir to use the bundled model {bundled}" if bundled else "")
            )
    if bundled:
        got = ensure_bundled(str(bundled))
        if path and os.path.abspath(got) != path:
            log.warning("checkpoint_dir %s is the bundled model's default place; using it from %s", path, got)
        return got
    raise ConfigError(
        "checkpoint_dir: not set. Point it at an HF checkpoint directory, or set "
        "bundled_model: smollm2-135m-instruct (`tune download smollm2-135m-instruct`)."
    )


def load_model(
    model_node: Any,
    lora: LoRASettings | None,
    checkpoint_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    frozen_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Builds the model the ``model`` setting describes and loads ``checkpoint_dir`` into it.

    ``model`` is either a builder node (``_component_: tinytune.models.lora_builders.lora_smollm2_135m``
    plus its arguments), or, without ``_component_``, LoRA settings applied to whatever
    architecture the checkpoint's ``config.json`` names, or null (that architecture, no LoRA).

    Args:
        model_node: the ``model`` config node (or None).
        lora: the LoRA settings of a plain ``model`` node (None: no adapters unless the builder adds them).
        checkpoint_dir: HF checkpoint directory.
        device, dtype: where and in which dtype the weights go.
        frozen_dtype: a LoRA run under mixed precision: the checkpoint's (frozen) weights are read
            straight into this dtype (:func:`tinytune.checkpoint.load_hf_model`).

    Returns:
        ``(model, ModelInfo)``.
    """
    builder = None
    factory = None
    if model_node is not None and "_component_" in model_node:
        builder = functools.partial(tt_config.instantiate, model_node)
    elif lora is not None:
        factory = lora_factory(lora)
    model, info = load_hf_model(
        checkpoint_dir,
        dtype=dtype,
        device=device,
        model_builder=builder,
        linear_factory=factory,
        frozen_dtype=frozen_dtype,
    )
    return model, info


def model_lora(model_node: Any) -> LoRASettings | None:
    """The LoRA settings of a ``model`` node: its LoRA keys (plain node or beside a ``lora_*`` /
    ``qlora_*`` builder), None for a node without them (or no node)."""
    if model_node is None:
        return None
    if "_component_" in model_node and not is_lora_builder(str(model_node["_component_"])):
        return None
    if "_component_" not in model_node and not len(model_node):
        return None
    return LoRASettings.from_node(model_node)


def load_model_and_tokenizer(s: Any, device: torch.device, dtype: torch.dtype, frozen_dtype: torch.dtype | None = None):
    """Resolves the checkpoint directory, then loads the tokenizer and the model from it.

    Args:
        s: recipe settings with ``source`` (:class:`ModelSourceSettings`) and ``model``.
        device, dtype, frozen_dtype: as in :func:`load_model`.

    Returns:
        ``(checkpoint_dir, tokenizer, model, ModelInfo)`` (see :func:`resolve_checkpoint_dir`,
        :func:`load_tokenizer`, :func:`load_model`).
    """
    checkpoint_dir = resolve_checkpoint_dir(s.source)
    tokenizer = load_tokenizer(s.source, checkpoint_dir)
    model, info = load_model(s.model, model_lora(s.model), checkpoint_dir, device, dtype, frozen_dtype)
    return checkpoint_dir, tokenizer, model, info


def load_tokenizer(src: ModelSourceSettings, checkpoint_dir: str):
    """Tokenizer from the ``tokenizer.path`` setting (default: the checkpoint directory)."""
    path = src.tokenizer.path or checkpoint_dir
    return _load_tokenizer(os.path.expanduser(str(path)))


def build_dataset(node: DictConfig, tokenizer, where: str = "dataset", seed: int = 0):
    """Instantiates a dataset node, passing the tokenizer (``_component_`` + arguments).

    A list of nodes, each with ``weight:`` or ``epochs:``, is a dataset mix (seeded with ``seed``):
    :class:`tinytune.datasets.mixing.MixedDataset`.
    """
    if isinstance(node, ListConfig):
        return _build_mix(node, tokenizer, where, seed)
    if node is None or "_component_" not in node:
        raise ConfigError(f"{where}: needs a _component_ (e.g. tinytune.datasets.chatterbot_dataset)")
    return tt_config.instantiate(node, tokenizer=tokenizer)


def _build_mix(nodes: ListConfig, tokenizer, where: str, seed: int):
    """``dataset: [{_component_: ..., weight: 0.7}, ...]`` (or ``epochs:``) -> a :class:`MixedDataset`.

    The items' ``weight`` / ``epochs`` keys are declared and type-checked by the settings layer
    (:class:`tinytune.config.recipe_settings.DataSettings`); the rules across items are here.
    """
    parts, names, weights, epochs = [], [], [], []
    for i, item in enumerate(nodes):
        key = f"{where}[{i}]"
        if not isinstance(item, DictConfig):
            raise ConfigError(f"{key}: expected a dataset node with _component_ and weight: or epochs:")
        weight, n_epochs = item.get("weight"), item.get("epochs")
        inner = OmegaConf.create({k: v for k, v in item.items() if k not in MIX_KEYS})
        if n_epochs is not None and item.get("streaming"):
            raise ConfigError(
                f"{key}.epochs: {n_epochs!r} is meaningless for a streaming dataset (no length); "
                "use weight:, or streaming: false"
            )
        ds = build_dataset(inner, tokenizer, key)
        if isinstance(ds, IterableDataset) and n_epochs is not None:
            raise ConfigError(
                f"{key}.epochs: {n_epochs!r} is meaningless for a streaming dataset (no length); "
                "use weight:, or streaming: false"
            )
        parts.append(ds)
        names.append(key)
        weights.append(weight)
        epochs.append(n_epochs)
    use_w = any(w is not None for w in weights)
    try:
        mix = MixedDataset(
            parts,
            names,
            weights=weights if use_w else None,
            epochs=epochs if any(e is not None for e in epochs) else None,
            seed=seed,
        )
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    print(mix.describe())
    return mix


def build_collate(pad_to_multiple_of: int, tokenizer, dataset=None):
    """The collate function: the dataset's own ``collate_fn`` if it has one, else padded collate."""
    while isinstance(dataset, torch.utils.data.Subset):  # a held-out split wraps the dataset
        dataset = dataset.dataset
    own = getattr(dataset, "collate_fn", None)
    if callable(own):
        return own
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_id", None) or 0
    return functools.partial(padded_collate, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def train_val_datasets(data: Any, tokenizer, seed: int | None):
    """Training dataset plus an optional validation dataset.

    Validation comes from ``validation.dataset`` (a separate dataset node) or from holding out
    ``validation.split_ratio`` / ``validation.split_size`` of the training data (seeded).

    Args:
        data: settings with ``dataset`` and ``validation`` (:class:`DataSettings`, ``EvalSettings``).
        tokenizer: passed to the dataset builders.
        seed: the ``seed`` setting (the split's and a dataset mix's seed; null counts as 0).
    """
    train = build_dataset(data.dataset, tokenizer, seed=int(seed or 0))
    val = data.validation
    if val.dataset is not None:
        return train, build_dataset(val.dataset, tokenizer, "validation.dataset")
    if isinstance(train, IterableDataset):  # streaming: no length to split
        if val.split_ratio or val.split_size:
            raise ConfigError(
                "validation.split_ratio / split_size: a streaming dataset cannot be split; use "
                "validation.dataset (e.g. the same source with split: 'validation')"
            )
        return train, None
    return split_dataset(train, val_ratio=val.split_ratio, val_size=val.split_size, seed=int(seed or 0))


@dataclass
class TrainData:
    """What a single-device training recipe reads: datasets, collate, the resumable batch stream.

    Attributes:
        train_ds, val_ds: training dataset and the optional validation dataset (None).
        collate: the collate function (:func:`build_collate`).
        stream: :class:`tinytune.training.data.BatchStream` over ``train_ds``.
        batch_size: micro-batch size; accum: micro-batches per optimizer step.
        total_steps: ``max_steps``, or ``epochs`` x optimizer steps per epoch.
    """

    train_ds: Any
    val_ds: Any
    collate: Any
    stream: Any
    batch_size: int
    accum: int
    total_steps: int


def train_data(
    data: DataSettings,
    tokenizer,
    seed: int,
    split_seed: int | None,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
) -> TrainData:
    """Datasets, collate and batch stream from the data settings (``dataset``, ``validation.*``,
    ``batch_size``, ``gradient_accumulation_steps``, ``shuffle``, ``max_steps``, ``epochs``).

    Args:
        data: the recipe's data settings.
        tokenizer: passed to the dataset builders.
        seed: shuffling seed of the batch stream (the seed in use).
        split_seed: the ``seed`` setting, for a held-out validation split.
        dp_rank, dp_size: this process's data-parallel rank and size (the stream yields this rank's
            slice of every global batch; ``batch_size`` is per rank).
        num_workers: DataLoader worker processes.
    """
    train_ds, val_ds = train_val_datasets(data, tokenizer, split_seed)
    collate = build_collate(data.pad_to_multiple_of, tokenizer, train_ds)
    batch_size, accum = data.batch_size, data.gradient_accumulation_steps
    if isinstance(train_ds, IterableDataset):  # streaming: no length, so max_steps, no epochs
        if data.epochs is not None:
            raise ConfigError(
                f"epochs: {data.epochs!r} is meaningless with a streaming dataset (no length); set max_steps instead"
            )
        if not data.max_steps:
            raise ConfigError("max_steps: required with a streaming dataset (it has no length to count epochs)")
        if dp_size > 1:
            raise ConfigError(
                "dataset: a streaming dataset is read by the single-device recipes only; "
                "use streaming: false with the distributed recipes"
            )
        stream = IterableBatchStream(train_ds, batch_size, collate)
        return TrainData(train_ds, val_ds, collate, stream, batch_size, accum, data.max_steps)
    stream = BatchStream(
        train_ds,
        batch_size,
        collate,
        shuffle=data.shuffle,
        seed=seed,
        num_workers=num_workers,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    steps_per_epoch = max(1, stream.batches_per_epoch // accum)
    total_steps = data.max_steps or (data.epochs or 1) * steps_per_epoch
    return TrainData(train_ds, val_ds, collate, stream, batch_size, accum, total_steps)


def fsdp_policy(fsdp: FSDPSettings, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of :func:`tinytune.distributed.fsdp.apply_fsdp` from the ``fsdp`` settings:
    compute in ``dtype`` (parameters gathered in it unless fp32), reduce gradients in fp32."""
    return {
        "param_dtype": None if dtype == torch.float32 else dtype,
        "reduce_dtype": torch.float32,
        "cpu_offload": fsdp.cpu_offload,
        "reshard_after_forward": fsdp.reshard_after_forward,
    }
