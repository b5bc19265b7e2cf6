"""``Linear``: ``nn.Linear`` whose fp32 CPU GEMMs follow the ``cpu_gemm`` setting."""

from __future__ import annotations

import torch
from torch import nn

from tinytune.kernels.cpu_gemm import linear


class Linear(nn.Linear):
    """``nn.Linear`` computing ``x @ W.T + b`` through :func:`tinytune.kernels.cpu_gemm.linear`
    (oneDNN for fp32 CPU GEMMs where ``cpu_gemm`` picks it, ``F.linear`` otherwise).

    Same parameters and state dict as ``nn.Linear``, and an instance of it, so checkpoints, LoRA,
    FSDP and tensor parallelism treat it as one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return linear(x, self.weight, self.bias)  # [..., out_features]
