"""Tensor-parallel (DTensor) plans for the decoder families.

Every family uses the contract's parameter names, so one Megatron-style plan fits all:
``q/k/v_proj`` and ``gate/up_proj`` are split by output features (column-wise), ``o_proj``
and ``down_proj`` by input features (row-wise), so each attention block and each MLP needs
one all-reduce in forward and one in backward. After the split every rank holds
``n_heads / tp`` query heads and ``n_kv_heads / tp`` key/value heads; the attention
modules' head counts are rewritten to these local values (Qwen3's per-head ``q_norm`` /
``k_norm`` stay replicated). Embeddings, norms and the output head stay replicated unless
``loss_parallel`` is requested, which splits the vocabulary of the output head (and of the
embedding table when it is tied) and returns vocab-sharded logits for
``torch.distributed.tensor.parallel.loss_parallel``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

__all__ = ["TP_PLANS", "apply_tp", "decoder_layer_plan"]

_COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("attn.o_proj", "mlp.down_proj")
# Attribute names the attention modules may use for head counts / widths split by TP.
_HEAD_ATTRS = ("num_heads", "n_heads", "num_kv_heads", "n_kv_heads")


def _style_for(module: nn.Module, colwise: bool) -> ParallelStyle:
    if isinstance(module, nn.Linear):
        return ColwiseParallel() if colwise else RowwiseParallel()
    try:  # LoRA projections need styles that also place the adapter matrices
        from tinytune.training.lora_tp import lora_parallel_style
    except ImportError as err:  # pragma: no cover - only without the LoRA module
        raise TypeError(f"No tensor-parallel style for {type(module).__name__}") from err
    return lora_parallel_style(module, colwise=colwise)


class HeadShardedNorm(ParallelStyle):
    """A norm over ``head_dim`` applied to ``[b, s, h_local, head_dim]`` (Qwen3's q_norm / k_norm).

    Its weight is shared by all heads, but after the TP split each rank only sees its own heads,
    so the weight gradient is a partial sum. Running the norm on DTensors (input sharded on the
    head dim, weight replicated) lets DTensor sum those partial gradients over the TP ranks.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(2)], run_check=False)
            return (x, *inputs[1:])

        return distribute_module(module, device_mesh, None, input_fn=to_dtensor,
                                 output_fn=lambda mod, out, mesh: out.to_local())


def decoder_layer_plan(layer: nn.Module) -> dict[str, ParallelStyle]:
    """Plan for one decoder layer (module path inside the layer -> style)."""
    plan: dict[str, ParallelStyle] = {}
    for path in _COLWISE + _ROWWISE:
        module = layer.get_submodule(path)
        plan[path] = _style_for(module, colwise=path in _COLWISE)
    for path in ("attn.q_norm", "attn.k_norm"):  # Qwen3 per-head norms
        if getattr(layer.attn, path.split(".")[1], None) is not None:
            plan[path] = HeadShardedNorm()
    return plan


# Family -> plan builder. All current families share the contract's parameter names.
TP_PLANS: dict[str, Callable[[nn.Module], dict[str, ParallelStyle]]] = {
    family: decoder_layer_plan for family in ("llama", "llama2", "llama3", "smollm2", "qwen2", "qwen3")
}


def _localize_heads(attn: nn.Module, tp: int, where: str) -> None:
    found = False
    for name in _HEAD_ATTRS:
        value = getattr(attn, name, None)
        if isinstance(value, int):
            if value % tp:
                raise ValueError(
                    f"{where}.{name}={value} is not divisible by tensor_parallel={tp}; choose a tensor_parallel "
                    "size that divides the number of attention and key/value heads."
                )
            setattr(attn, name, value // tp)
            found = True
    if not found:
        raise TypeError(f"{where} ({type(attn).__name__}) exposes none of {_HEAD_ATTRS}; cannot localise heads for TP.")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, family: str = "llama3", loss_parallel: bool = False) -> nn.Module:
    """Tensor-parallelise a ``TransformerDecoder`` in place over a 1-D mesh.

    Args:
        model: decoder with ``tok_embeddings``, ``layers``, ``norm``, ``output`` (meta or real device).
        tp_mesh: the ``"tp"`` sub-mesh.
        family: model family (key of :data:`TP_PLANS`).
        loss_parallel: also split the output head by vocabulary; ``model(tokens)`` then returns
            logits as a DTensor sharded on the last dim, for use inside ``loss_parallel()``.

    Returns:
        The same model.
    """
    tp = tp_mesh.size()
    if family not in TP_PLANS:
        raise ValueError(f"No tensor-parallel plan for model family {family!r}; known: {sorted(TP_PLANS)}.")
    for i, layer in enumerate(model.layers):
        parallelize_module(layer, tp_mesh, TP_PLANS[family](layer))
        _localize_heads(layer.attn, tp, f"layers.{i}.attn")
    if loss_parallel:
        _shard_vocab(model, tp_mesh)
    return model


def _shard_vocab(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    output = model.output
    if isinstance(output, nn.Linear):
        parallelize_module(output, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
        return
    # Tied head: split the shared table by vocab rows. The embedding lookup then yields partial sums
    # (all-reduced to a replicated tensor); the head sees a replicated input and a row-sharded weight,
    # so its logits come out sharded on the vocab dim.
    parallelize_module(model.tok_embeddings, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(
        output, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False)
    )
