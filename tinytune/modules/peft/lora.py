"""LoRA linear layer (optionally with an NF4-quantized frozen base: QLoRA) and its factory."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels.fused_ops import lora_linear, plain_tensors
from tinytune.modules.peft.nf4 import dequantize, is_nf4, linear_nf4, to_nf4

# Short names accepted in configs, mapped to the projection names of docs/ARCHITECTURE.md.
LORA_MODULE_ALIASES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "output_proj": "o_proj",
    "gate": "gate_proj",
    "w1": "gate_proj",
    "up": "up_proj",
    "w3": "up_proj",
    "down": "down_proj",
    "w2": "down_proj",
}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output")


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update: ``y = W x + b + (alpha / rank) * B A dropout(x)``.

    Parameters keep the names of the plain projection (``weight``, ``bias``) so base checkpoints
    load unchanged; the adapter adds ``lora_a.weight [rank, in_dim]`` (Kaiming-uniform init) and
    ``lora_b.weight [out_dim, rank]`` (zeros, so a fresh adapter leaves the output unchanged).

    With ``quantize_base=True`` the frozen base weight is stored as a torchao ``NF4Tensor``
    (QLoRA); the forward dequantizes it block by block inside ``linear_nf4``. ``state_dict()``
    returns the base weight dequantized and loading a plain weight re-quantizes it, so
    checkpoints stay in the ordinary format.

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout probability applied to the adapter's input.
        use_bias: whether the base projection has a bias (frozen like the weight in LoRA training).
        quantize_base: store the base weight in NF4 (QLoRA).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.use_bias = use_bias
        self.quantize_base = quantize_base
        self.disabled = False  # True: behave as the base layer (used for DPO reference passes)

        base = nn.Linear(in_dim, out_dim, bias=use_bias)  # default nn.Linear init for the base
        weight = base.weight.detach()
        if quantize_base and weight.device.type != "meta":
            weight = to_nf4(weight)
        self.weight = nn.Parameter(weight, requires_grad=not quantize_base)
        if use_bias:
            self.bias = nn.Parameter(base.bias.detach(), requires_grad=True)
        else:
            self.register_parameter("bias", None)

        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.reset_lora_parameters()

        if quantize_base:
            self._register_load_state_dict_pre_hook(self._quantize_on_load)
            self._register_state_dict_hook(LoRALinear._dequantize_on_save)

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to the low-rank update."""
        return self.alpha / self.rank

    def reset_lora_parameters(self) -> None:
        """Kaiming-uniform ``lora_a`` (as ``nn.Linear``) and zero ``lora_b``."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection alone: ``x @ W.T + b``."""
        if is_nf4(self.weight):
            out = linear_nf4(x, self.weight)
            if self.bias is not None:
                out = out + self.bias
            return out
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_dim]
        if not self.disabled and plain_tensors(x, self.weight, self.bias, self.lora_a.weight, self.lora_b.weight):
            # one Function: base GEMM, then scale * B(A(x)) added by addmm_ (no extra [N, out] passes)
            x_d = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
            return lora_linear(x, self.weight, self.bias, self.lora_a.weight, self.lora_b.weight, self.scaling, x_d)
        out = self.base_forward(x)  # [..., out_dim]
        if self.disabled:
            return out
        update = self.lora_b(self.lora_a(self.dropout(x)))  # [..., out_dim]
        return out + self.scaling * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / rank) * B @ A`` as a plain tensor in the base weight's dtype."""
        base = dequantize(self.weight)
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()  # [out, in]
        return (base.float() + self.scaling * delta).to(base.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"bias={self.use_bias}, quantize_base={self.quantize_base}"
        )

    # --- NF4 plumbing -------------------------------------------------------------------------
    def _quantize_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None and not is_nf4(w) and w.device.type != "meta":
            dtype = self.weight.dtype if self.weight.device.type != "meta" else w.dtype
            state_dict[key] = to_nf4(w.to(dtype))

    @staticmethod
    def _dequantize_on_save(module, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and is_nf4(state_dict[key]):
            state_dict[key] = dequantize(state_dict[key])
        return state_dict

    def _apply(self, fn, recurse=True):
        # ``.to(dtype/device)`` would silently dequantize an NF4 weight (torchao's ``_to_copy``
        # returns a plain tensor); apply the move to the full-precision values and re-quantize.
        w = self._parameters.get("weight")
        if w is None or not is_nf4(w):
            return super()._apply(fn, recurse)
        del self._parameters["weight"]
        try:
            super()._apply(fn, recurse)
            moved = fn(dequantize(w.data))
        finally:
            self._parameters["weight"] = w
        self._parameters["weight"] = nn.Parameter(to_nf4(moved), requires_grad=False)
        return self


def canonical_lora_modules(names: Iterable[str]) -> list[str]:
    """Maps short names (``q``, ``gate``, ...) to projection names and validates them.

    Raises:
        ValueError: naming the unknown entry and the accepted names.
    """
    out = []
    for n in names:
        name = LORA_MODULE_ALIASES.get(str(n), str(n))
        if name not in LORA_MODULES:
            raise ValueError(
                f"Unknown LoRA module {n!r}; choose from {list(LORA_MODULES)} "
                f"(or the short names {sorted(LORA_MODULE_ALIASES)})"
            )
        if name not in out:
            out.append(name)
    return out


def lora_linear_factory(
    lora_modules: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    quantize_base: bool = False,
) -> Callable[[str, int, int, bool], nn.Module]:
    """Builds a ``linear_factory`` for the component builders.

    The factory is called as ``factory(name, in_dim, out_dim, bias)`` and returns a
    :class:`LoRALinear` for the names in ``lora_modules`` and a plain ``nn.Linear`` otherwise.

    Args:
        lora_modules: projection names (``q_proj`` ... ``down_proj``, ``output``) or short aliases.
        rank: LoRA rank.
        alpha: LoRA alpha.
        dropout: adapter-input dropout.
        quantize_base: store the LoRA layers' base weights in NF4 (QLoRA).
    """
    targets = set(canonical_lora_modules(lora_modules))

    def factory(name: str, in_dim: int, out_dim: int, bias: bool) -> nn.Module:
        if name in targets:
            return LoRALinear(
                in_dim, out_dim, rank=rank, alpha=alpha, dropout=dropout, use_bias=bias,
                quantize_base=quantize_base,
            )
        return nn.Linear(in_dim, out_dim, bias=bias)

    return factory
