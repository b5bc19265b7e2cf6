"""Process groups, device meshes and collective helpers for multi-process training.

A run is launched by ``torchrun`` (``tune run --nproc_per_node N ...``), which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Started without those
variables, :func:`init_distributed` creates a one-process group so the same recipe also runs
as a plain ``python`` script.

The device mesh has three named dimensions, ``("dp_replicate", "dp_shard", "tp")``; size-1
dimensions are kept so code can always index them by name. The two data-parallel dimensions
are also flattened into one dimension named ``"dp"`` (used for the sampler and for loss-token
reductions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tinytune.config._errors import ConfigError
from tinytune.device import get_device

__all__ = [
    "DistInfo",
    "ParallelDims",
    "ParallelMesh",
    "broadcast_object",
    "all_reduce_sum",
    "build_device_mesh",
    "get_backend",
    "get_dp_info",
    "init_distributed",
    "is_rank_zero",
    "process_group",
    "rank_zero_first",
    "shutdown_distributed",
]

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def get_backend(device_type: str, cpu_offload: bool = False) -> str:
    """Pick the collective backend for a device type.

    Args:
        device_type: ``"cuda"``, ``"npu"`` or ``"cpu"``.
        cpu_offload: if True on an accelerator, also register gloo for CPU tensors
            (FSDP's CPU offload keeps sharded parameters on the CPU).

    Returns:
        A backend string for ``torch.distributed.init_process_group``, e.g. ``"nccl"`` or
        ``"cuda:nccl,cpu:gloo"``.

    Raises:
        ConfigError: (a ValueError) if the device type has no known backend.
    """
    if device_type not in _BACKENDS:
        raise ConfigError(
            f"No distributed backend known for device type {device_type!r}; "
            f"use one of {sorted(_BACKENDS)} (config key `device`)."
        )
    backend = _BACKENDS[device_type]
    if cpu_offload and device_type != "cpu":
        return f"{device_type}:{backend},cpu:gloo"
    return backend


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str | None = "auto", cpu_offload: bool = False, timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group (once) and bind this process to its device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"npu"`` or ``"auto"`` (resolved by
            :func:`tinytune.device.get_device`; under torchrun a bare ``cuda`` / ``npu``
            means the ``LOCAL_RANK``-th device).
        cpu_offload: register gloo next to the accelerator backend (for FSDP CPU offload).
        timeout_s: collective timeout.

    Returns:
        :class:`DistInfo` with rank, world size, local rank and the ``torch.device`` to use.

    Raises:
        ValueError: for a device type without a collective backend (e.g. ``mps``).
    """
    torch_device = get_device(device or "auto")
    backend = get_backend(torch_device.type, cpu_offload)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # plain `python recipe.py`: a one-process group, no rendezvous needed
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


def shutdown_distributed() -> None:
    """Barrier, then destroy the default process group (no-op when none exists)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = "auto", cpu_offload: bool = False):
    """``with process_group(...) as info:`` :func:`init_distributed` on entry; on exit the group is
    destroyed again when this call created it (a caller's group is left alone)."""
    owns_group = not dist.is_initialized()
    info = init_distributed(device, cpu_offload=cpu_offload)
    try:
        yield info
    finally:
        if owns_group:
            shutdown_distributed()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first, the other ranks after it (e.g. building a token cache on disk
    that the others then read). Without a process group it just runs the block."""
    if not dist.is_initialized():
        yield
        return
    if not is_rank_zero():
        dist.barrier()
    yield
    if is_rank_zero():
        dist.barrier()


def is_rank_zero() -> bool:
    """True on global rank 0, or when no process group exists."""
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions; their product is the world size.

    Attributes:
        dp_replicate: replicas of the model (HSDP outer dimension); 1 = plain FSDP.
        dp_shard: ranks each replica's parameters are sharded over (FSDP).
        tp: tensor-parallel degree (ranks splitting each matmul).
    """

    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(
        cls,
        world_size: int,
        data_parallel_shard: int = -1,
        data_parallel_replicate: int = 1,
        tensor_parallel: int = 1,
    ) -> "ParallelDims":
        """Resolve the config keys, inferring at most one ``-1`` from the world size.

        Raises:
            ConfigError: (a ValueError) naming the config keys, when the sizes do not multiply to the world size.
        """
        sizes = {
            "data_parallel_replicate": int(data_parallel_replicate),
            "data_parallel_shard": int(data_parallel_shard),
            "tensor_parallel": int(tensor_parallel),
        }
        unknown = [k for k, v in sizes.items() if v == -1]
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad or len(unknown) > 1:
            raise ConfigError(
                f"Invalid `parallelism` sizes {sizes}: each must be a positive integer, and at most one may be -1 "
                "(inferred from the world size)."
            )
        known = 1
        for k, v in sizes.items():
            if v != -1:
                known *= v
        if unknown:
            if world_size % known:
                raise ConfigError(
                    f"World size {world_size} is not divisible by the product {known} of the fixed parallel sizes "
                    f"{ {k: v for k, v in sizes.items() if v != -1} }; change `parallelism.{unknown[0]}` or the number of processes."
                )
            sizes[unknown[0]] = world_size // known
        elif known != world_size:
            raise ConfigError(
                f"Parallel sizes {sizes} multiply to {known}, but {world_size} processes were started; "
                "set one of parallelism.data_parallel_shard / data_parallel_replicate / tensor_parallel to -1 or fix them."
            )
        return cls(sizes["data_parallel_replicate"], sizes["data_parallel_shard"], sizes["tensor_parallel"])

    @property
    def dp(self) -> int:
        """Total data-parallel degree (number of different micro-batches per step)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


@dataclasses.dataclass(frozen=True)
class ParallelMesh:
    """The world mesh and the sub-meshes the training code uses.

    Attributes:
        world: 3-D mesh ``("dp_replicate", "dp_shard", "tp")``.
        dp: 1-D flattened data-parallel mesh (sampler rank, loss-token reduction).
        tp: 1-D tensor-parallel mesh.
        fsdp: what FSDP shards over: 2-D ``(dp_replicate, dp_shard)`` (HSDP) or 1-D ``dp_shard``.
        dims: the sizes.
    """

    world: DeviceMesh
    dp: DeviceMesh
    tp: DeviceMesh
    fsdp: DeviceMesh
    dims: ParallelDims


def build_device_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Create the 3-D mesh ``("dp_replicate", "dp_shard", "tp")`` and its sub-meshes.

    Args:
        dims: resolved sizes (their product must equal the world size).
        device_type: ``"cpu"``, ``"cuda"`` or ``"npu"``.
    """
    world = dist.get_world_size()
    if dims.world_size != world:
        raise ValueError(f"Parallel sizes {dims} need {dims.world_size} processes but {world} were started.")
    mesh = init_device_mesh(
        device_type,
        (dims.dp_replicate, dims.dp_shard, dims.tp),
        mesh_dim_names=("dp_replicate", "dp_shard", "tp"),
    )
    dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    fsdp = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    return ParallelMesh(world=mesh, dp=dp, tp=mesh["tp"], fsdp=fsdp, dims=dims)


def get_dp_info(mesh: ParallelMesh) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process; TP peers share a dp rank."""
    return mesh.dp.get_local_rank(), mesh.dp.size()


def all_reduce_sum(value: torch.Tensor, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Sum a tensor over a 1-D mesh (or the world when ``mesh`` is None); returns a new tensor.

    Used for the loss-token count: every data-parallel rank divides its summed loss by the
    global number of label tokens, so the (summed) gradients equal those of one process
    running the global batch.
    """
    out = value.detach().clone()
    if dist.is_initialized():
        group = mesh.get_group() if mesh is not None else None
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
