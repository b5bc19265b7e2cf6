"""Build a tensor-parallel / FSDP-sharded model straight from an HF checkpoint directory.

The model is built on the meta device (no memory), parallelised, materialised (each rank
allocates only its shards) and filled one safetensors file at a time: every rank reads the
file lazily and copies out only its own slices.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tinytune.checkpoint.adapters import is_lora_key
from tinytune.checkpoint.hf_reader import find_weight_files, iter_shards, list_keys
from tinytune.checkpoint.keys import hf_key_map
from tinytune.checkpoint.model_info import CheckpointError, ModelInfo, read_model_info
from tinytune.checkpoint.model_loading import build_model
from tinytune.distributed.fsdp import apply_fsdp, load_full_state_dict, materialize_meta_model
from tinytune.distributed.mesh import ParallelMesh
from tinytune.distributed.parallel_plans import apply_tp
from tinytune.modules.peft import LoRALinear

__all__ = ["load_hf_model_sharded", "pissa_initial_factors"]


def _has_lm_head(path: str) -> bool:
    return any("lm_head.weight" in list_keys(f) for f in find_weight_files(path))


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter, gathered on every rank (a collective for DTensors)."""
    if not isinstance(t, DTensor):
        return t.detach()
    local = t.to_local()
    if local.device.type != t.device_mesh.device_type:  # a CPU-offloaded shard: gather on the mesh's device
        local = local.to(torch.device(t.device_mesh.device_type, torch.accelerator.current_device_index()))
        t = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.full_tensor().detach()


@torch.no_grad()
def _init_from_full_base(model: nn.Module, name: str, module: LoRALinear) -> None:
    """PiSSA / DoRA init of one sharded ``LoRALinear`` on its full base weight, as one device runs it.

    The base weight is gathered (every rank, same module order), a full-size copy of the layer on
    the CPU runs the module's own ``reset_lora_parameters`` (the same random draws and the same
    SVD as a one-process run), and the results are sliced back into the shards: ``lora_a``,
    ``lora_b``, DoRA's ``lora_magnitude`` and, for PiSSA, the residual base weight. PiSSA's initial
    factors (small: ``[r, in]``, ``[out, r]``) stay whole on every rank as the module's buffers.
    """
    base = _full_tensor(module.weight).to("cpu", torch.float32)  # [out, in]
    with torch.device("meta"):
        full = LoRALinear(
            module.in_dim,
            module.out_dim,
            module.rank,
            module.alpha,
            use_dora=module.lora_magnitude is not None,
            use_rslora=module.use_rslora,
            init=module.init,
        )
    full.to_empty(device="cpu")
    full.weight.copy_(base)
    full.reset_lora_parameters()
    values = {f"{name}.{k}": v for k, v in full.state_dict().items() if k != "weight" or module.init == "pissa"}
    load_full_state_dict(model, values, strict=False, where=f"LoRA init of {name}")
    if module.init == "pissa":
        device = module.lora_a.weight.device
        module.pissa_a0, module.pissa_b0 = full.pissa_a0.to(device), full.pissa_b0.to(device)


@torch.no_grad()
def _init_lora_adapters(model: nn.Module, tensor_parallel: bool = False) -> None:
    """Fresh adapter init with the module's own ``reset_lora_parameters``, done on full CPU tensors.

    Running the init on full tensors in module order draws the same random numbers as a
    single-process run with the same seed; the values are then sliced into the shards. PiSSA and
    DoRA also need the layer's full base weight (:func:`_init_from_full_base`).
    """
    for name, module in model.named_modules():
        reset = getattr(module, "reset_lora_parameters", None)
        if reset is None:
            continue
        init = getattr(module, "init", "default")
        if init == "pissa" or getattr(module, "lora_magnitude", None) is not None:
            if tensor_parallel and module.lora_magnitude is not None:
                raise ValueError(
                    f"{name}: use_dora with tensor_parallel > 1 is not supported (the DoRA row norms would "
                    "span tensor-parallel shards); use data parallelism (FSDP) only"
                )
            _init_from_full_base(model, name, module)
            continue
        stub = nn.Module()
        stub.init, stub.rank, stub.lora_magnitude = init, module.rank, None
        stub.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # not meta: the init runs
        full = {}
        for sub in ("lora_a", "lora_b"):
            weight = getattr(module, sub).weight
            lin = nn.Module()
            lin.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="cpu"))
            setattr(stub, sub, lin)
            full[f"{name}.{sub}.weight"] = lin.weight
        type(module).reset_lora_parameters(stub)
        load_full_state_dict(model, full, strict=False, where=f"LoRA init of {name}")


def pissa_initial_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PiSSA's initial adapter factors (``<proj>.pissa_a0 [r, in]``, ``<proj>.pissa_b0 [out, r]``), whole on
    every rank, for :func:`tinytune.checkpoint.save_peft_adapter` to convert a PiSSA adapter given as a
    gathered state dict; ``{}`` without PiSSA."""
    return {
        name: buf.detach().cpu()
        for name, buf in model.named_buffers()
        if buf is not None and name.endswith((".pissa_a0", ".pissa_b0"))
    }


def load_hf_model_sharded(
    path: str,
    mesh: ParallelMesh,
    device: torch.device,
    *,
    linear_factory: Callable | None = None,
    trainable: Callable[[nn.Module], Any] | None = None,
    fsdp: dict | None = None,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
    activation_checkpointing: Callable[[nn.Module], Any] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Load an HF checkpoint into a sharded tinytune model.

    Args:
        path: HF checkpoint directory (``config.json`` + safetensors / bin files).
        mesh: the parallel meshes (``mesh.tp`` for TP when its size > 1, ``mesh.fsdp`` for FSDP).
        device: this rank's device.
        linear_factory: e.g. a LoRA factory (passed to the family's component builder).
        trainable: called on the (meta) model after TP and before FSDP to set ``requires_grad``
            (e.g. ``set_trainable_params`` for LoRA).
        fsdp: keyword arguments of :func:`tinytune.distributed.fsdp.apply_fsdp`.
        loss_parallel: split the output head by vocabulary (needs TP > 1).
        sequence_parallel: shard the residual stream on the sequence dim between blocks (needs TP > 1).
        activation_checkpointing: called on the model before sharding to wrap its layers.

    Returns:
        ``(model, info)``; parameters are DTensors; floating parameters are fp32 (the compute
        dtype comes from FSDP's mixed-precision policy).

    Raises:
        CheckpointError: unreadable config, missing keys (named), unexpected keys.
    """
    info = read_model_info(path)
    if not _has_lm_head(path):
        info.tie_word_embeddings = True
    with torch.device("meta"):
        model = build_model(info, linear_factory)
    if activation_checkpointing is not None:
        activation_checkpointing(model)
    if mesh.tp.size() > 1:
        apply_tp(
            model, mesh.tp, family=info.model_type, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel
        )
    elif loss_parallel or sequence_parallel:
        raise ValueError("parallelism.loss_parallel / sequence_parallel need tensor_parallel > 1.")
    if trainable is not None:  # after TP: its styles re-create parameters (requires_grad resets to True)
        trainable(model)
    apply_fsdp(model, mesh.fsdp, **(fsdp or {}))
    # with CPU offload the sharded parameters live in CPU memory; FSDP copies them to `device` per use
    materialize_meta_model(model, torch.device("cpu") if (fsdp or {}).get("cpu_offload") else device)

    keymap = hf_key_map(info.model_type)
    drop = {"output.weight"} if info.tie_word_embeddings else set()
    loaded: set[str] = set()
    for file, shard in iter_shards(path, keymap, dtype=torch.float32, drop=drop):
        loaded |= load_full_state_dict(model, shard, strict=False, where=file)
        del shard
    missing = sorted(k for k in model.state_dict() if k not in loaded and not is_lora_key(k))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    _init_lora_adapters(model, tensor_parallel=mesh.tp.size() > 1)
    return model, info
