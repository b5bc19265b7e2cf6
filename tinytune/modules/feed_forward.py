"""SwiGLU feed-forward block."""

import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels.fused_ops import plain_tensors, swiglu


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
        gate, up = self.gate_proj(x), self.up_proj(x)  # [b, s, hidden] each
        if plain_tensors(gate, up):
            h = swiglu(gate, up)  # saves gate and up only
        else:  # DTensor (tensor parallel)
            h = F.silu(gate) * up  # [b, s, hidden]
        return self.down_proj(h)  # [b, s, dim]
