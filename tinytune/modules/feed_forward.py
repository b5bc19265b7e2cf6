"""SwiGLU feed-forward block."""

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels.fused_ops import plain_tensors, recompute_when_saved, saved_as_recompute, swiglu


class FeedForward(nn.Module):
    """SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    The three projections are injected (plain ``nn.Linear`` or LoRA variants) by the builders.

    Args:
        gate_proj: ``dim -> hidden`` projection passed through SiLU.
        up_proj: ``dim -> hidden`` projection.
        down_proj: ``hidden -> dim`` projection.
    """

    def __init__(self, *, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: ``[b, s, dim]``.

        Returns:
            ``[b, s, dim]``.
        """
        with saved_as_recompute(x):  # a normalised x is recomputed in backward, not kept
            gate, up = self.gate_proj(x), self.up_proj(x)  # [b, s, hidden] each
        if not plain_tensors(gate, up):  # DTensor (tensor parallel): eager ops
            return self.down_proj(F.silu(gate) * up)  # [b, s, dim]
        h = swiglu(gate, up)  # [b, s, hidden]; saves gate and up only
        # down_proj would keep h for its weight gradient: keep a recipe instead (gate/up are saved anyway)
        with recompute_when_saved(h, lambda: swiglu(gate, up)):
            return self.down_proj(h)  # [b, s, dim]
