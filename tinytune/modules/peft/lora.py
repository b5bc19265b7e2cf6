"""LoRA linear layer (optionally with an NF4-quantized frozen base: QLoRA) and its factory."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels import cpu_gemm
from tinytune.kernels.fused_ops import frozen_linear, lora_linear, plain_tensors
from tinytune.modules.linear import Linear
from tinytune.modules.peft.nf4 import dequantize, dequantize_nf4, is_nf4, to_nf4

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
LORA_INITS = ("default", "gaussian", "pissa")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output")


class DoRAMagnitude(nn.Module):
    """DoRA's trainable magnitude vector: ``weight [out_dim]``."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_dim))


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update: ``y = W x + b + (alpha / rank) * B A dropout(x)``.

    Parameters keep the names of the plain projection (``weight``, ``bias``) so base checkpoints
    load unchanged; the adapter adds ``lora_a.weight [rank, in_dim]`` (Kaiming-uniform init) and
    ``lora_b.weight [out_dim, rank]`` (zeros, so a fresh adapter leaves the output unchanged).

    With ``quantize_base=True`` the frozen base weight is stored as a torchao ``NF4Tensor``
    (QLoRA). The forward dequantizes it into a reusable scratch buffer for one GEMM, and backward
    dequantizes it again for ``grad_x`` (the full-precision weight is never saved for backward);
    the base GEMM and the adapter are one autograd Function as in plain LoRA. ``state_dict()``
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
        use_dora: DoRA (Liu et al., 2024): a trainable per-output magnitude ``lora_magnitude.weight [out]``
            rescales the adapted weight, ``y = m / ||W + s B A||_row * (W + s B A) x`` (the norm is
            detached, as in the paper and peft); ``m`` starts at the row norms of the base.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski, 2023) instead of
            ``alpha / rank``.
        init: adapter init: ``default`` (Kaiming-uniform A, zero B), ``gaussian`` (A ~ N(0, 1/rank),
            zero B) or ``pissa`` (Meng et al., 2024: A, B from the top-``rank`` singular triplets of W,
            the base keeps the residual ``W - s B A``; not with ``quantize_base``).
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
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if init not in LORA_INITS:
            raise ValueError(f"LoRA init {init!r}: choose from {list(LORA_INITS)}")
        if init == "pissa" and quantize_base:
            raise ValueError(
                "LoRA init 'pissa' with quantize_base (QLoRA) is not supported: PiSSA rewrites the base "
                "weight to its residual, which NF4 would re-quantize; use init 'default' or 'gaussian'"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.use_bias = use_bias
        self.quantize_base = quantize_base
        self.use_dora = use_dora
        self.use_rslora = use_rslora
        self.init = init
        self.disabled = False  # True: behave as the original base layer (DPO / KTO reference passes)

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
        # DoRA magnitude [out] (a submodule like lora_a/lora_b, so the loader materialises it alone);
        # registered only with use_dora, so plain LoRA state dicts are unchanged
        self.lora_magnitude = DoRAMagnitude(out_dim) if use_dora else None
        # PiSSA's initial adapters, kept (not saved) to export the adapter as a plain LoRA delta
        self.register_buffer("pissa_a0", None, persistent=False)
        self.register_buffer("pissa_b0", None, persistent=False)
        self.reset_lora_parameters()

        if quantize_base:
            self._register_load_state_dict_pre_hook(self._quantize_on_load)
            self._register_state_dict_hook(LoRALinear._dequantize_on_save)

    @property
    def scaling(self) -> float:
        """The factor applied to the low-rank update: ``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``)."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialises the adapter from the current base weight (see ``init``); DoRA's magnitude
        becomes the row norms of the adapted weight. Nothing happens on the meta device (the loader
        calls this again once the base weight is loaded)."""
        weight = getattr(self, "weight", None)  # None: a stand-in holding only lora_a / lora_b (sharded init)
        if self.lora_a.weight.is_meta or (weight is not None and weight.is_meta):
            return
        init = getattr(self, "init", "default")
        if init == "pissa":
            if weight is None:
                raise ValueError("lora_init=pissa needs the base weight to initialise the adapter")
            w = self.weight.detach().float()  # [out, in]
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # w = u diag(sv) vh
            sr = sv[: self.rank] / self.scaling
            a = torch.diag(sr.sqrt()) @ vh[: self.rank]  # [r, in]
            b = u[:, : self.rank] @ torch.diag(sr.sqrt())  # [out, r]
            self.lora_a.weight.copy_(a)
            self.lora_b.weight.copy_(b)
            self.weight.copy_((w - self.scaling * b @ a).to(self.weight.dtype))
            self.pissa_a0 = self.lora_a.weight.detach().clone()
            self.pissa_b0 = self.lora_b.weight.detach().clone()
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_a.weight, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)
        if getattr(self, "lora_magnitude", None) is not None:
            self.lora_magnitude.weight.copy_(self._adapted_weight().norm(dim=1).to(self.lora_magnitude.weight.dtype))

    def _adapted_weight(self) -> torch.Tensor:
        """``W + s B A`` in fp32 (``[out, in]``; NF4 bases dequantized)."""
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()  # [out, in]
        return dequantize(self.weight).float() + self.scaling * delta

    def _dequantized_base(self) -> torch.Tensor:
        """The NF4 base as a plain ``[out, in]`` tensor in a scratch buffer: use it at once."""
        return dequantize_nf4(self.weight, reuse=True)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection alone: ``x @ W.T + b``."""
        if is_nf4(self.weight):
            out = frozen_linear(x, self._dequantized_base)
            if self.bias is not None:
                out = out + self.bias
            return out
        return cpu_gemm.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_dim]
        if self.lora_magnitude is not None and not self.disabled:
            return self._dora_forward(x)
        if not self.disabled and plain_tensors(x, self.bias, self.lora_a.weight, self.lora_b.weight):
            # one Function: base GEMM, then scale * B(A(x)) added by addmm_ (no extra [N, out] passes)
            x_d = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
            a, b = self.lora_a.weight, self.lora_b.weight
            if is_nf4(self.weight):  # QLoRA: dequantized in forward and again in backward, never saved
                return lora_linear(x, None, self.bias, a, b, self.scaling, x_d, weight_fn=self._dequantized_base)
            if plain_tensors(self.weight):
                return lora_linear(x, self.weight, self.bias, a, b, self.scaling, x_d)
        out = self.base_forward(x)  # [..., out_dim]
        if self.disabled:
            if self.pissa_a0 is not None:  # PiSSA: the base holds the residual; add back W's principal part
                out = out + self.scaling * F.linear(F.linear(x, self.pissa_a0.to(x.dtype)), self.pissa_b0.to(x.dtype))
            return out
        update = self.lora_b(self.lora_a(self.dropout(x)))  # [..., out_dim]
        return out + self.scaling * update

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + (m/n - 1) * W x_d + (m/n) * s * B A x_d`` with ``n = ||W + s B A||_row`` detached
        (``x_d``: the adapter's dropout of ``x``; equals ``m/n * (W + s B A) x + b`` without dropout)."""
        out = self.base_forward(x)  # [..., out]
        dropping = isinstance(self.dropout, nn.Dropout) and self.training
        x_d = self.dropout(x) if dropping else x
        lora = self.lora_b(self.lora_a(x_d))  # [..., out]
        w = dequantize(self.weight).to(x.dtype)  # [out, in]
        with torch.no_grad():
            norm = (w.float() + self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())).norm(dim=1)
        mag = self.lora_magnitude.weight  # [out]
        scale = (mag / norm.to(mag.dtype)).to(x.dtype)  # [out]
        if dropping:
            base_d = F.linear(x_d, w)
        else:
            base_d = out - self.bias if self.bias is not None else out
        return out + (scale - 1) * base_d + scale * self.scaling * lora

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` (DoRA: times ``m / ||W + s B A||_row``) as a plain tensor in the base weight's dtype."""
        base = dequantize(self.weight)
        w = self._adapted_weight()  # [out, in]
        if self.lora_magnitude is not None:
            w = (self.lora_magnitude.weight.float() / w.norm(dim=1))[:, None] * w
        return w.to(base.dtype)

    def peft_lora_delta(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(A [r', in], B [out, r'], r')`` to export: the adapter itself, or for PiSSA its plain-LoRA
        equivalent on the original base, ``s (B A - B0 A0)`` as rank ``2r`` (peft's conversion)."""
        a, b = self.lora_a.weight.detach(), self.lora_b.weight.detach()
        if self.init != "pissa":
            return a, b, self.rank
        if self.pissa_a0 is None:
            raise ValueError("PiSSA adapter without its initial factors (was reset_lora_parameters skipped?)")
        return (*pissa_as_lora(a, b, self.pissa_a0, self.pissa_b0), 2 * self.rank)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"bias={self.use_bias}, quantize_base={self.quantize_base}, use_dora={self.use_dora}, "
            f"use_rslora={self.use_rslora}, init={self.init}"
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


def pissa_as_lora(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained PiSSA adapter as plain-LoRA factors on the original base (peft's conversion).

    ``B A - B0 A0 = [B, -B0] [A; A0]``: returns ``([A; A0] [2r, in], [B, -B0] [out, 2r])``.
    """
    return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)


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
    use_dora: bool = False,
    use_rslora: bool = False,
    init: str = "default",
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
        use_dora, use_rslora, init: LoRA variants (see :class:`LoRALinear`).
    """
    targets = set(canonical_lora_modules(lora_modules))

    def factory(name: str, in_dim: int, out_dim: int, bias: bool) -> nn.Module:
        if name in targets:
            return LoRALinear(
                in_dim,
                out_dim,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                use_bias=bias,
                quantize_base=quantize_base,
                use_dora=use_dora,
                use_rslora=use_rslora,
                init=init,
            )
        return Linear(in_dim, out_dim, bias=bias)

    return factory
