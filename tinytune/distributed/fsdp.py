"""FSDP2 sharding of a ``TransformerDecoder`` and full <-> sharded state-dict movement.

The model is built on the meta device, tensor-parallelised (optional), sharded here with
``fully_shard`` (one group per decoder layer plus the root), materialised with
``to_empty`` and then filled from a full (HF-converted) state dict: each rank copies only
its own slice, so no rank allocates the whole model on its device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "apply_fsdp",
    "clip_grad_norm_",
    "gather_full_state_dict",
    "load_full_state_dict",
    "load_local_shards",
    "local_shards",
    "materialize_meta_model",
    "set_gradient_sync",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"Unknown dtype {value!r} in the FSDP mixed-precision settings; use one of {sorted(_DTYPES)}.")
    return _DTYPES[value]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: str | torch.dtype | None = None,
    reduce_dtype: str | torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard every decoder layer and then the root with ``fully_shard``.

    Args:
        model: a ``TransformerDecoder`` (must have a ``layers`` ModuleList), on meta or a real device.
        mesh: 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP) data-parallel mesh.
        param_dtype: dtype parameters are all-gathered and computed in (e.g. ``"bf16"``); None keeps them.
        reduce_dtype: dtype gradients are reduced in (fp32 by default).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
        reshard_after_forward: free gathered layer parameters after forward (re-gather in backward);
            the root group always stays gathered until backward.

    Returns:
        The same module, now an ``FSDPModule``.
    """
    if not hasattr(model, "layers"):
        raise TypeError(f"apply_fsdp expects a TransformerDecoder with `.layers`, got {type(model).__name__}.")
    mp = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        # pinned host memory speeds up the host<->accelerator copies; it needs an accelerator
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        # The last layer's parameters are needed first in backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < n - 1, **kwargs)
    # The root (embeddings, final norm, output head) stays gathered after forward: the loss reads
    # `model.output_weight` outside the forward (fused linear + cross-entropy), and backward needs it first.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduce-scatter on/off for the coming backward (off on non-final micro-steps)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)


def materialize_meta_model(
    model: nn.Module, device: torch.device, buffer_init: Callable[[nn.Module], None] | None = None
) -> None:
    """Allocate storage for a meta-device model and re-create its non-persistent buffers.

    ``to_empty`` leaves every buffer uninitialised; buffers that are not in the state dict
    (RoPE caches, masks) are rebuilt by calling each submodule's ``rope_init()`` /
    ``reset_buffers()`` when defined, or by ``buffer_init(module)`` when given.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if buffer_init is not None:
                buffer_init(module)
            for hook in ("rope_init", "reset_buffers"):
                fn = getattr(module, hook, None)
                if callable(fn):
                    fn()
                    break


@torch.no_grad()
def load_full_state_dict(
    model: nn.Module,
    full_sd: Mapping[str, torch.Tensor],
    *,
    broadcast_from_rank0: bool = False,
    strict: bool = True,
    where: str = "state dict",
) -> set[str]:
    """Fill a sharded (FSDP and/or TP) model from full, unsharded tensors.

    Args:
        model: a materialised model whose parameters may be DTensors.
        full_sd: full tensors keyed by the contract's parameter names. With the default
            ``broadcast_from_rank0=False`` every rank passes the (lazily read, e.g. one
            safetensors shard) full tensors and slices its own shard locally, with no
            communication and no full copy on the device. With ``broadcast_from_rank0=True``
            only rank 0 needs the tensors (others may pass ``{}``); they are broadcast.
        strict: require every model key to be present (use False when loading shard by shard).
        where: name of the source for error messages (e.g. the checkpoint file).

    Returns:
        The names that were loaded.

    Raises:
        KeyError: naming unexpected keys, or missing ones when ``strict``.
        ValueError: naming a key whose shape differs from the model's.
    """
    if broadcast_from_rank0:
        set_model_state_dict(
            model,
            dict(full_sd) if dist.get_rank() == 0 else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict),
        )
        return set(model.state_dict())
    target = model.state_dict()
    unexpected = sorted(set(full_sd) - set(target))
    missing = sorted(set(target) - set(full_sd)) if strict else []
    if missing or unexpected:
        raise KeyError(
            f"{where} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    for name, src in full_sd.items():
        dst = target[name]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(src.shape)} but the model expects {tuple(dst.shape)}.")
        if isinstance(dst, DTensor):
            # src_data_rank=None: slice locally from the full tensor every rank already has.
            shard = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
            dst.to_local().copy_(shard.to_local())
        else:
            dst.copy_(src)
    return set(full_sd)


def gather_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Collect the full (unsharded) model state dict on CPU on rank 0; other ranks get ``{}``.

    Every rank must call this (it runs all-gathers).

    Args:
        model: the sharded model.
        trainable_only: drop frozen parameters (LoRA adapters only).
    """
    sd = get_model_state_dict(
        model,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only),
    )
    return sd if dist.get_rank() == 0 else {}


def _reshard_all(model: nn.Module) -> None:
    """Register the sharded parameters everywhere (the root and the last layer stay gathered after a forward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def local_shards(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter (a DTensor's local shard, else the whole tensor), by name.

    No communication: e.g. to keep the best validation step's weights on each rank
    (``EarlyStopping(save_best=True)``) and put them back with :func:`load_local_shards`. The
    tensors are the parameters' own storage (detached); copy them to keep them.

    Args:
        model: the (sharded) model.
        trainable_only: only parameters with ``requires_grad`` (LoRA: the adapters).
    """
    _reshard_all(model)
    return {
        name: (p.to_local() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }


@torch.no_grad()
def load_local_shards(model: nn.Module, shards: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors from :func:`local_shards` (taken on this rank, same sharding) back into ``model``.

    Raises:
        KeyError: a name the model does not have.
        ValueError: a shard whose shape differs from this rank's.
    """
    _reshard_all(model)
    params = dict(model.named_parameters())
    unknown = sorted(set(shards) - set(params))
    if unknown:
        raise KeyError(f"load_local_shards: the model has no parameters {unknown[:6]}")
    for name, src in shards.items():
        dst = params[name].to_local() if isinstance(params[name], DTensor) else params[name]
        if dst.shape != src.shape:
            raise ValueError(
                f"load_local_shards: {name} has shape {tuple(src.shape)}, this rank's shard {tuple(dst.shape)}"
            )
        dst.copy_(src)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients by their global L2 norm; works when DTensor gradients live on different meshes.

    With FSDP + TP, tensor-parallel parameters are sharded over the 2-D ``(dp, tp)`` mesh while
    the others are sharded over ``dp`` only. Norms are computed per (mesh, placements) group,
    made full, and combined, so the result equals the single-process norm.

    Args:
        parameters: the model's parameters.
        max_norm: clip threshold.

    Returns:
        The total norm before clipping (plain fp32 scalar tensor).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32)
    for gs in groups.values():
        norm = torch.nn.utils.get_total_norm(gs, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float().cpu() ** 2
    total = total_sq.sqrt()
    scale = float(max_norm) / (float(total) + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total
