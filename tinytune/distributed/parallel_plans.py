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
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tinytune.config._errors import ConfigError
from tinytune.distributed.lora_tp import lora_parallel_style

__all__ = ["TP_PLANS", "apply_tp", "decoder_layer_plan"]

_COLWISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROWWISE = ("attn.o_proj", "mlp.down_proj")
# Attribute names the attention modules may use for head counts / widths split by TP.
_HEAD_ATTRS = ("num_heads", "n_heads", "num_kv_heads", "n_kv_heads")


def _style_for(module: nn.Module, colwise: bool, seq_parallel: bool = False) -> ParallelStyle:
    if isinstance(module, nn.Linear):
        if colwise:
            return ColwiseParallel()
        # with sequence parallelism the partial sums are reduce-scattered over the sequence instead
        return RowwiseParallel(output_layouts=Shard(1), use_local_output=False) if seq_parallel else RowwiseParallel()
    # LoRA projections need styles that also place the adapter matrices
    return lora_parallel_style(module, colwise=colwise, seq_parallel=seq_parallel)


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

        return distribute_module(
            module, device_mesh, None, input_fn=to_dtensor, output_fn=lambda mod, out, mesh: out.to_local()
        )


def decoder_layer_plan(layer: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Plan for one decoder layer (module path inside the layer -> style).

    With ``sequence_parallel`` the residual stream between blocks stays sharded on the sequence
    dim (``[b, s/tp, d]``): the norms run on sequence shards, each block all-gathers its input and
    reduce-scatters its output (same traffic as the all-reduce, 1/tp of the activation memory).
    """
    plan: dict[str, ParallelStyle] = {}
    for path in _COLWISE + _ROWWISE:
        module = layer.get_submodule(path)
        plan[path] = _style_for(module, colwise=path in _COLWISE, seq_parallel=sequence_parallel)
    for path in ("attn.q_norm", "attn.k_norm"):  # Qwen3 per-head norms
        if getattr(layer.attn, path.split(".")[1], None) is not None:
            plan[path] = HeadShardedNorm()
    if sequence_parallel:
        gather = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        plan.update({"sa_norm": SequenceParallel(), "mlp_norm": SequenceParallel(), "attn": gather, "mlp": gather})
    return plan


# Family -> plan builder. All current families share the contract's parameter names.
TP_PLANS: dict[str, Callable[[nn.Module, bool], dict[str, ParallelStyle]]] = {
    family: decoder_layer_plan for family in ("llama", "llama2", "llama3", "smollm2", "qwen2", "qwen3")
}


def _localize_heads(attn: nn.Module, tp: int, where: str) -> None:
    found = False
    for name in _HEAD_ATTRS:
        value = getattr(attn, name, None)
        if isinstance(value, int):
            if value % tp:
                raise ConfigError(
                    f"{where}.{name}={value} is not divisible by parallelism.tensor_parallel={tp}; choose a "
                    "tensor_parallel size that divides the number of attention and key/value heads."
                )
            setattr(attn, name, value // tp)
            found = True
    if not found:
        raise TypeError(f"{where} ({type(attn).__name__}) exposes none of {_HEAD_ATTRS}; cannot localise heads for TP.")


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    family: str = "llama3",
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Tensor-parallelise a ``TransformerDecoder`` in place over a 1-D mesh.

    Args:
        model: decoder with ``tok_embeddings``, ``layers``, ``norm``, ``output`` (meta or real device).
        tp_mesh: the ``"tp"`` sub-mesh.
        family: model family (key of :data:`TP_PLANS`).
        loss_parallel: also split the output head by vocabulary; ``model(tokens)`` then returns
            logits as a DTensor sharded on the last dim, for use inside ``loss_parallel()``.
        sequence_parallel: keep the residual stream sharded on the sequence dim between blocks
            (norms run on sequence shards). ``model(..., return_hidden=True)`` still returns the
            full replicated hidden states, so the fused cross-entropy works unchanged.

    Returns:
        The same model.
    """
    tp = tp_mesh.size()
    if family not in TP_PLANS:
        raise ValueError(f"No tensor-parallel plan for model family {family!r}; known: {sorted(TP_PLANS)}.")
    for i, layer in enumerate(model.layers):
        parallelize_module(layer, tp_mesh, TP_PLANS[family](layer, sequence_parallel))
        _localize_heads(layer.attn, tp, f"layers.{i}.attn")
    tied = not isinstance(model.output, nn.Linear)
    # token embeddings: vocab-split when the tied head is split, else replicated
    if loss_parallel and tied:
        # Rows split by vocab: the lookup yields partial sums, all-reduced (or reduce-scattered with SP).
        emb_out = Shard(1) if sequence_parallel else Replicate()
        parallelize_module(
            model.tok_embeddings,
            tp_mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=emb_out, use_local_output=not sequence_parallel),
        )
    elif sequence_parallel:  # replicated table; keep this rank's sequence shard
        parallelize_module(
            model.tok_embeddings,
            tp_mesh,
            PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False),
        )
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    hidden_layout = Shard(1) if sequence_parallel else Replicate()
    if loss_parallel:  # head split by vocab: logits [b, s, V/tp] as a DTensor
        if tied:
            parallelize_module(
                model.output,
                tp_mesh,
                PrepareModuleInput(
                    input_layouts=(hidden_layout,), desired_input_layouts=(Replicate(),), use_local_output=False
                ),
            )
        else:
            parallelize_module(
                model.output,
                tp_mesh,
                ColwiseParallel(input_layouts=hidden_layout, output_layouts=Shard(-1), use_local_output=False),
            )
    elif sequence_parallel:
        # The final norm's output is gathered back to full sequences for the (replicated) head / fused loss.
        model.norm.register_forward_hook(lambda mod, inputs, out: out.redistribute(placements=[Replicate()]).to_local())
    return model
