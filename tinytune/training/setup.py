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

from tinytune import config as tt_config
from tinytune.config import ConfigError

log = logging.getLogger(__name__)

LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
             "lora_dropout", "quantize_base", "use_dora", "use_rslora", "lora_init")


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` with a default for missing or null keys (dotted keys allowed)."""
    node = cfg
    for part in key.split("."):
        if node is None or not isinstance(node, (DictConfig, dict)) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def setup_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype, int]:
    """``(device, dtype, seed)`` from ``device`` (auto), ``dtype`` (fp32) and ``seed`` (0).

    Seeds every RNG (:func:`tinytune.device.set_seed`) and returns the seed used.
    """
    from tinytune.device import get_device, get_dtype, set_seed  # noqa: PLC0415

    device = get_device(cfg_get(cfg, "device", "auto"))
    dtype = get_dtype(cfg_get(cfg, "dtype", "fp32"), device)
    seed = set_seed(cfg_get(cfg, "seed", 0))
    return device, dtype, seed


def prepare_output_dir(cfg: DictConfig) -> str:
    """Creates ``cfg.output_dir`` and writes the resolved config there as ``config.yaml``."""
    out = cfg_get(cfg, "output_dir")
    if not out:
        raise ConfigError("output_dir: required (where checkpoints, metrics and loss.png go)")
    out = os.path.abspath(os.path.expanduser(str(out)))
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "config.yaml"), resolve=True)
    return out


def resolve_checkpoint_dir(cfg: DictConfig) -> str:
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
    from tinytune.checkpoint.bundled import tinytune_home  # noqa: PLC0415

    path = cfg_get(cfg, "checkpoint_dir")
    bundled = cfg_get(cfg, "bundled_model")
    if path and str(path).startswith("hf://"):  # a hub model: the hub cache, downloaded on first use
        from tinytune.hub import HubError, resolve_hf_checkpoint  # noqa: PLC0415

        try:
            return resolve_hf_checkpoint(str(path))
        except HubError as e:
            raise ConfigError(f"checkpoint_dir: {path}: {e}") from None
    if path:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        bundled_homes = {os.path.join(home, "models", str(bundled)) for home in
                         (tinytune_home(), os.path.abspath(os.path.expanduser("~/.cache/tinytune")))}
        if not bundled or path not in bundled_homes:
            what = "does not exist" if not os.path.exists(path) else "has no config.json (not an HF checkpoint)"
            raise ConfigError(
                f"checkpoint_dir: {path} {what}. Fix the path (e.g. OUTPUT_DIR/hf_model of a finished run)"
                + (f", or drop checkpoint_dir to use the bundled model {bundled}" if bundled else "")
            )
    if bundled:
        from tinytune.checkpoint import ensure_bundled  # noqa: PLC0415

        got = ensure_bundled(str(bundled))
        if path and os.path.abspath(got) != path:
            log.warning("checkpoint_dir %s is the bundled model's default place; using it from %s", path, got)
        return got
    raise ConfigError(
        "checkpoint_dir: not set. Point it at an HF checkpoint directory, or set "
        "bundled_model: smollm2-135m-instruct (`tune download smollm2-135m-instruct`)."
    )


def _lora_kwargs(model_cfg: Any) -> dict[str, Any]:
    return {k: model_cfg[k] for k in LORA_KEYS if model_cfg is not None and k in model_cfg}


def load_model(cfg: DictConfig, checkpoint_dir: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Builds the model described by ``cfg.model`` and loads ``checkpoint_dir`` into it.

    ``cfg.model`` is either a builder node (``_component_: tinytune.models.lora_builders.lora_smollm2_135m``
    plus its arguments) or, without ``_component_``, just LoRA settings (``lora_attn_modules``,
    ``lora_rank``, ...) applied to whatever architecture the checkpoint's ``config.json`` names.

    Args:
        cfg: recipe config.
        checkpoint_dir: HF checkpoint directory.
        device, dtype: where and in which dtype the weights go.

    Returns:
        ``(model, ModelInfo)``.
    """
    from tinytune.checkpoint import load_hf_model  # noqa: PLC0415

    model_cfg = cfg_get(cfg, "model")
    builder = None
    factory = None
    if model_cfg is not None and "_component_" in model_cfg:
        builder = functools.partial(tt_config.instantiate, model_cfg)
    elif model_cfg is not None and _lora_kwargs(model_cfg):
        from tinytune.models.lora_builders import lora_target_modules  # noqa: PLC0415
        from tinytune.modules.peft import lora_linear_factory  # noqa: PLC0415

        kw = _lora_kwargs(model_cfg)
        targets = lora_target_modules(kw.get("lora_attn_modules", ["q_proj", "v_proj"]),
                                      kw.get("apply_lora_to_mlp", True), kw.get("apply_lora_to_output", False))
        factory = lora_linear_factory(targets, rank=int(kw.get("lora_rank", 8)),
                                      alpha=float(kw.get("lora_alpha", 16)),
                                      dropout=float(kw.get("lora_dropout", 0.0)),
                                      quantize_base=bool(kw.get("quantize_base", False)),
                                      # settings key: model.use_dora (bool, False); model.use_rslora (bool, False);
                                      # model.lora_init (str, "default": default | gaussian | pissa)
                                      use_dora=bool(kw.get("use_dora", False)),
                                      use_rslora=bool(kw.get("use_rslora", False)),
                                      init=str(kw.get("lora_init", "default")))
    model, info = load_hf_model(checkpoint_dir, dtype=dtype, device=device, model_builder=builder,
                                linear_factory=factory)
    return model, info


def load_model_and_tokenizer(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """Resolves the checkpoint directory, then loads the tokenizer and the model from it.

    Returns:
        ``(checkpoint_dir, tokenizer, model, ModelInfo)`` (see :func:`resolve_checkpoint_dir`,
        :func:`load_tokenizer`, :func:`load_model`).
    """
    checkpoint_dir = resolve_checkpoint_dir(cfg)
    tokenizer = load_tokenizer(cfg, checkpoint_dir)
    model, info = load_model(cfg, checkpoint_dir, device, dtype)
    return checkpoint_dir, tokenizer, model, info


def lora_settings(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """``{"lora_rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init"}`` for the adapter
    export (read from the model)."""
    from tinytune.modules.peft import lora_modules  # noqa: PLC0415

    for _, m in lora_modules(model):
        p = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
        return {"lora_rank": m.rank, "lora_alpha": m.alpha, "lora_dropout": p, "use_rslora": m.use_rslora,
                "use_dora": m.use_dora, "init": m.init}
    raise ConfigError("model: no LoRA layers; use a lora_* / qlora_* builder or set model.lora_attn_modules")


def load_tokenizer(cfg: DictConfig, checkpoint_dir: str):
    """Tokenizer from ``cfg.tokenizer.path`` (default: the checkpoint directory)."""
    from tinytune.tokenizers import load_tokenizer as _load  # noqa: PLC0415

    path = cfg_get(cfg, "tokenizer.path") or checkpoint_dir
    return _load(os.path.expanduser(str(path)))


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
    """``dataset: [{_component_: ..., weight: 0.7}, ...]`` (or ``epochs:``) -> a :class:`MixedDataset`."""
    from torch.utils.data import IterableDataset  # noqa: PLC0415

    from tinytune.datasets import DatasetError  # noqa: PLC0415
    from tinytune.datasets.mixing import MixedDataset  # noqa: PLC0415

    parts, names, weights, epochs = [], [], [], []
    for i, item in enumerate(nodes):
        key = f"{where}[{i}]"
        if not isinstance(item, DictConfig):
            raise ConfigError(f"{key}: expected a dataset node with _component_ and weight: or epochs:")
        # settings key: dataset[i].weight / dataset[i].epochs (a dataset mix: sampling weight or passes per source)
        weight, n_epochs = item.get("weight"), item.get("epochs")
        inner = OmegaConf.create({k: v for k, v in item.items() if k not in ("weight", "epochs")})
        if n_epochs is not None and item.get("streaming"):
            raise ConfigError(f"{key}.epochs: {n_epochs!r} is meaningless for a streaming dataset (no length); "
                              "use weight:, or streaming: false")
        ds = build_dataset(inner, tokenizer, key)
        if isinstance(ds, IterableDataset) and n_epochs is not None:
            raise ConfigError(f"{key}.epochs: {n_epochs!r} is meaningless for a streaming dataset (no length); "
                              "use weight:, or streaming: false")
        parts.append(ds)
        names.append(key)
        weights.append(weight)
        epochs.append(n_epochs)
    use_w = any(w is not None for w in weights)
    try:
        mix = MixedDataset(parts, names, weights=weights if use_w else None,
                           epochs=epochs if any(e is not None for e in epochs) else None, seed=seed)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    print(mix.describe())
    return mix


def build_collate(cfg: DictConfig, tokenizer, dataset=None):
    """The collate function: the dataset's own ``collate_fn`` if it has one, else padded collate."""
    while isinstance(dataset, torch.utils.data.Subset):  # a held-out split wraps the dataset
        dataset = dataset.dataset
    own = getattr(dataset, "collate_fn", None)
    if callable(own):
        return own
    from tinytune.datasets import padded_collate  # noqa: PLC0415

    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_id", None) or 0
    return functools.partial(padded_collate, pad_id=pad_id,
                             pad_to_multiple_of=int(cfg_get(cfg, "pad_to_multiple_of", 8)))


def train_val_datasets(cfg: DictConfig, tokenizer):
    """Training dataset plus an optional validation dataset.

    Validation comes from ``validation.dataset`` (a separate dataset node) or from holding out
    ``validation.split_ratio`` / ``validation.split_size`` of the training data (seeded).
    """
    from tinytune.training.data import split_dataset  # noqa: PLC0415

    train = build_dataset(cfg_get(cfg, "dataset"), tokenizer, seed=int(cfg_get(cfg, "seed", 0)))
    val_node = cfg_get(cfg, "validation.dataset")
    if val_node is not None:
        return train, build_dataset(val_node, tokenizer, "validation.dataset")
    if isinstance(train, torch.utils.data.IterableDataset):  # streaming: no length to split
        if cfg_get(cfg, "validation.split_ratio") or cfg_get(cfg, "validation.split_size"):
            raise ConfigError("validation.split_ratio / split_size: a streaming dataset cannot be split; use "
                              "validation.dataset (e.g. the same source with split: 'validation')")
        return train, None
    return split_dataset(train, val_ratio=cfg_get(cfg, "validation.split_ratio"),
                         val_size=cfg_get(cfg, "validation.split_size"), seed=int(cfg_get(cfg, "seed", 0)))


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


def train_data(cfg: DictConfig, tokenizer, seed: int, default_batch_size: int = 4) -> TrainData:
    """Datasets, collate and batch stream from ``dataset``, ``validation.*``, ``batch_size``,
    ``gradient_accumulation_steps``, ``shuffle``, ``max_steps`` and ``epochs``.

    Args:
        cfg: recipe config.
        tokenizer: passed to the dataset builders.
        seed: shuffling seed of the batch stream.
        default_batch_size: ``batch_size`` when the config has none.
    """
    from tinytune.training.data import BatchStream  # noqa: PLC0415

    train_ds, val_ds = train_val_datasets(cfg, tokenizer)
    collate = build_collate(cfg, tokenizer, train_ds)
    batch_size = int(cfg_get(cfg, "batch_size", default_batch_size))
    accum = int(cfg_get(cfg, "gradient_accumulation_steps", 1))
    if isinstance(train_ds, torch.utils.data.IterableDataset):  # streaming: no length, so max_steps, no epochs
        from tinytune.training.stream_data import IterableBatchStream  # noqa: PLC0415

        if cfg_get(cfg, "epochs") is not None:
            raise ConfigError(f"epochs: {cfg_get(cfg, 'epochs')!r} is meaningless with a streaming dataset "
                              "(no length); set max_steps instead")
        if not int(cfg_get(cfg, "max_steps", 0)):
            raise ConfigError("max_steps: required with a streaming dataset (it has no length to count epochs)")
        stream = IterableBatchStream(train_ds, batch_size, collate)
        return TrainData(train_ds, val_ds, collate, stream, batch_size, accum, int(cfg_get(cfg, "max_steps")))
    stream = BatchStream(train_ds, batch_size, collate, shuffle=bool(cfg_get(cfg, "shuffle", True)), seed=seed)
    steps_per_epoch = max(1, stream.batches_per_epoch // accum)
    total_steps = int(cfg_get(cfg, "max_steps", 0)) or int(cfg_get(cfg, "epochs", 1)) * steps_per_epoch
    return TrainData(train_ds, val_ds, collate, stream, batch_size, accum, total_steps)


@dataclass(frozen=True)
class LoopSettings:
    """The training-loop cadence keys of a recipe config (the loop itself stays in the recipe).

    Attributes:
        log_every: ``log_every_n_steps`` (1).
        val_every: ``validation.every_n_steps`` (0: only at the end).
        val_max_batches: ``validation.max_batches`` (None: all).
        ckpt_every: ``checkpoint_every_n_steps`` (0: never during training).
        stop_after: ``stop_after_steps`` (0: off): end the run early after a checkpoint, to resume
            later (time-sliced jobs, resume tests).
        clip: ``clip_grad_norm`` (None: no clipping).
        padding_free: ``padding_free`` (True): drop what no label depends on from every training and
            validation micro-batch (:mod:`tinytune.training.padding_free`).
        nan_policy: ``nan_policy`` (``stop``): what a non-finite loss or gradient norm does
            (``stop`` | ``skip_step``; :class:`tinytune.training.steps.NonFiniteGuard`).
    """

    log_every: int
    val_every: int
    val_max_batches: int | None
    ckpt_every: int
    stop_after: int
    clip: float | None
    padding_free: bool = True
    nan_policy: str = "stop"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "LoopSettings":
        """Reads the keys above with their defaults."""
        return cls(log_every=int(cfg_get(cfg, "log_every_n_steps", 1)),
                   val_every=int(cfg_get(cfg, "validation.every_n_steps", 0)),
                   val_max_batches=cfg_get(cfg, "validation.max_batches"),
                   ckpt_every=int(cfg_get(cfg, "checkpoint_every_n_steps", 0)),
                   stop_after=int(cfg_get(cfg, "stop_after_steps", 0)),
                   clip=cfg_get(cfg, "clip_grad_norm"),
                   padding_free=bool(cfg_get(cfg, "padding_free", True)),
                   # settings key: nan_policy (stop|skip_step, default stop)
                   nan_policy=str(cfg_get(cfg, "nan_policy", "stop")))
