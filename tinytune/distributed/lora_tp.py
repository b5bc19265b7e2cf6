"""Tensor-parallel styles for ``LoRALinear`` projections.

A LoRA projection computes ``W x + b + s * B (A x)``. Split like its plain counterpart:

* column-wise (q/k/v/gate/up): ``W``, ``b`` and ``B`` are split by output rows; ``A`` is
  replicated. Input replicated, output sharded on the last dim (local heads).
* row-wise (o/down): ``W`` and ``A`` are split by input columns; ``B`` and ``b`` are
  replicated. Input sharded on the last dim; ``W x`` and ``B (A x)`` are partial sums that
  are all-reduced once, after they are added.

The forward is the module's own code running on DTensors; only the placements are chosen here.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from tinytune.modules.peft import LoRALinear

__all__ = ["LoRAParallel", "lora_parallel_style"]


class LoRAParallel(ParallelStyle):
    """Column- or row-wise split of a ``LoRALinear`` (see the module docstring).

    Args:
        colwise: True for a column-wise (output) split, False for row-wise (input).
        seq_parallel: row-wise only: reduce-scatter the output over the sequence dim and return it
            as a DTensor (sequence parallelism) instead of all-reducing it.
    """

    def __init__(self, colwise: bool, seq_parallel: bool = False) -> None:
        super().__init__()
        self.colwise = colwise
        self.seq_parallel = seq_parallel

    def _placements(self) -> dict[str, list]:
        if self.colwise:
            return {
                "weight": [Shard(0)],
                "bias": [Shard(0)],
                "lora_a.weight": [Replicate()],
                "lora_b.weight": [Shard(0)],
            }
        return {
            "weight": [Shard(1)],
            "bias": [Replicate()],
            "lora_a.weight": [Shard(1)],
            "lora_b.weight": [Replicate()],
        }

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name != "":
            return  # all parameters are placed from the LoRALinear itself
        for pname, placements in self._placements().items():
            owner_name, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            param = getattr(owner, leaf, None)
            if param is None:
                continue
            dparam = nn.Parameter(
                distribute_tensor(param, mesh, placements, src_data_rank=None), requires_grad=param.requires_grad
            )
            owner.register_parameter(leaf, dparam)

    def _input(self, mod, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()] if self.colwise else [Shard(-1)], run_check=False)
        return (x, *inputs[1:])

    def _output(self, mod, output, mesh):
        if self.colwise:
            return output.to_local()  # [..., out / tp]: this rank's heads / hidden units
        if self.seq_parallel:
            return output.redistribute(mesh, [Shard(1)])  # reduce-scatter: [b, s/tp, out]
        return output.redistribute(mesh, [Replicate()]).to_local()  # all-reduce the partial sums

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            self._partition,
            input_fn=lambda mod, inputs, mesh: self._input(mod, inputs, mesh),
            output_fn=lambda mod, output, mesh: self._output(mod, output, mesh),
        )


def lora_parallel_style(module: nn.Module, colwise: bool, seq_parallel: bool = False) -> ParallelStyle:
    """The style for a LoRA projection.

    Raises:
        TypeError: for modules that are not ``LoRALinear`` or have an NF4 (QLoRA) base, which
            cannot be split by DTensor.
    """
    if not isinstance(module, LoRALinear):
        raise TypeError(f"No tensor-parallel style for {type(module).__name__}; expected nn.Linear or LoRALinear.")
    if module.quantize_base:
        raise TypeError(
            "Tensor parallelism does not support QLoRA (NF4 base weights); set tensor_parallel=1 "
            "and shard with FSDP instead, or use LoRA without quantize_base."
        )
    return LoRAParallel(colwise, seq_parallel)
