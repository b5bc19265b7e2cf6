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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tinytune import config as tt_config
from tinytune.checkpoint import ensure_bundled, load_hf_model
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import (
    DataSettings,
    DeviceSettings,
    FSDPSettings,
    LoRASettings,
    ModelSourceSettings,
)
from tinytune.datasets import padded_collate
from tinytune.device import get_device, get_dtype, set_seed
from tinytune.models.lora_builders import is_lora_builder, lora_factory
from tinytune.tokenizers import load_tokenizer as _load_tokenizer
from tinytune.training.data import BatchStream, split_dataset

log = logging.getLogger(__name__)


FP16_NAMES = ("fp16", "float16", "half")


def check_training_dtype(name: str) -> None:
    """The training recipes' precision policy (single-device and distributed alike): no fp16.

    Raises:
        ConfigError: for fp16, which needs loss scaling that no training recipe does.
    """
    if name in FP16_NAMES:
        raise ConfigError(f"dtype: {name} needs loss scaling, which the training recipes do not do; "
                          "use bf16 or fp32.")


def setup_device(hw: DeviceSettings, training: bool = True) -> tuple[torch.device, torch.dtype, int]:
    """``(device, dtype, seed)`` from the ``device``, ``dtype`` and ``seed`` settings.

    Seeds every RNG (:func:`tinytune.device.set_seed`) and returns the seed used. With
    ``training`` the dtype policy of :func:`check_training_dtype` applies.
    """
    if training:
        check_training_dtype(hw.dtype)
    device = get_device(hw.device)
    dtype = get_dtype(hw.dtype, device)
    seed = set_seed(hw.seed)
    return device, dtype, seed


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

    ``checkpoint_dir`` is used when it exists; otherwise, when ``bundled_model`` names a bundled
    model (``smollm2-135m-instruct``), it is converted on first use (``tune download``).

    Raises:
        ConfigError: neither a directory nor a bundled model is available.
    """
    path, bundled = src.checkpoint_dir, src.bundled_model
    if path:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    if bundled:
        got = ensure_bundled(str(bundled))
        if path and os.path.abspath(got) != path:
            log.warning("checkpoint_dir %s not found; using the bundled model at %s", path, got)
        return got
    raise ConfigError(
        f"checkpoint_dir: {path!r} is not an HF checkpoint directory (no config.json). "
        "Run `tune download smollm2-135m-instruct` or point checkpoint_dir at a model directory."
    )


def load_model(model_node: Any, lora: LoRASettings | None, checkpoint_dir: str, device: torch.device,
               dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Builds the model the ``model`` setting describes and loads ``checkpoint_dir`` into it.

    ``model`` is either a builder node (``_component_: tinytune.models.lora_builders.lora_smollm2_135m``
    plus its arguments), or, without ``_component_``, LoRA settings applied to whatever
    architecture the checkpoint's ``config.json`` names, or null (that architecture, no LoRA).

    Args:
        model_node: the ``model`` config node (or None).
        lora: the LoRA settings of a plain ``model`` node (None: no adapters unless the builder adds them).
        checkpoint_dir: HF checkpoint directory.
        device, dtype: where and in which dtype the weights go.

    Returns:
        ``(model, ModelInfo)``.
    """
    builder = None
    factory = None
    if model_node is not None and "_component_" in model_node:
        builder = functools.partial(tt_config.instantiate, model_node)
    elif lora is not None:
        factory = lora_factory(lora)
    model, info = load_hf_model(checkpoint_dir, dtype=dtype, device=device, model_builder=builder,
                                linear_factory=factory)
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


def load_model_and_tokenizer(s: Any, device: torch.device, dtype: torch.dtype):
    """Resolves the checkpoint directory, then loads the tokenizer and the model from it.

    Args:
        s: recipe settings with ``source`` (:class:`ModelSourceSettings`) and ``model``.

    Returns:
        ``(checkpoint_dir, tokenizer, model, ModelInfo)`` (see :func:`resolve_checkpoint_dir`,
        :func:`load_tokenizer`, :func:`load_model`).
    """
    checkpoint_dir = resolve_checkpoint_dir(s.source)
    tokenizer = load_tokenizer(s.source, checkpoint_dir)
    model, info = load_model(s.model, model_lora(s.model), checkpoint_dir, device, dtype)
    return checkpoint_dir, tokenizer, model, info


def load_tokenizer(src: ModelSourceSettings, checkpoint_dir: str):
    """Tokenizer from the ``tokenizer.path`` setting (default: the checkpoint directory)."""
    path = src.tokenizer.path or checkpoint_dir
    return _load_tokenizer(os.path.expanduser(str(path)))


def build_dataset(node: DictConfig, tokenizer, where: str = "dataset"):
    """Instantiates a dataset node, passing the tokenizer (``_component_`` + arguments)."""
    if node is None or "_component_" not in node:
        raise ConfigError(f"{where}: needs a _component_ (e.g. tinytune.datasets.chatterbot_dataset)")
    return tt_config.instantiate(node, tokenizer=tokenizer)


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
    return functools.partial(padded_collate, pad_id=pad_id,
                             pad_to_multiple_of=pad_to_multiple_of)


def train_val_datasets(data: Any, tokenizer, seed: int | None):
    """Training dataset plus an optional validation dataset.

    Validation comes from ``validation.dataset`` (a separate dataset node) or from holding out
    ``validation.split_ratio`` / ``validation.split_size`` of the training data (seeded).

    Args:
        data: settings with ``dataset`` and ``validation`` (:class:`DataSettings`, ``EvalSettings``).
        tokenizer: passed to the dataset builders.
        seed: the ``seed`` setting (the split's seed; null counts as 0).
    """
    train = build_dataset(data.dataset, tokenizer)
    val = data.validation
    if val.dataset is not None:
        return train, build_dataset(val.dataset, tokenizer, "validation.dataset")
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


def train_data(data: DataSettings, tokenizer, seed: int, split_seed: int | None, *, dp_rank: int = 0,
               dp_size: int = 1, num_workers: int = 0) -> TrainData:
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
    stream = BatchStream(train_ds, batch_size, collate, shuffle=data.shuffle, seed=seed, num_workers=num_workers,
                         dp_rank=dp_rank, dp_size=dp_size)
    steps_per_epoch = max(1, stream.batches_per_epoch // accum)
    total_steps = data.max_steps or data.epochs * steps_per_epoch
    return TrainData(train_ds, val_ds, collate, stream, batch_size, accum, total_steps)


def fsdp_policy(fsdp: FSDPSettings, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of :func:`tinytune.distributed.fsdp.apply_fsdp` from the ``fsdp`` settings:
    compute in ``dtype`` (parameters gathered in it unless fp32), reduce gradients in fp32."""
    return {"param_dtype": None if dtype == torch.float32 else dtype, "reduce_dtype": torch.float32,
            "cpu_offload": fsdp.cpu_offload, "reshard_after_forward": fsdp.reshard_after_forward}
