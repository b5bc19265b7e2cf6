"""Root-mean-square layer norm."""

import torch
from torch import nn

from tinytune.kernels.fused_ops import attach_recompute, plain_tensors, rms_norm


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, computed in fp32.

    Follows the Hugging Face order of operations (normalise in fp32, cast back to the input
    dtype, then scale by ``weight``) so bf16 outputs match HF checkpoints bit for bit.

    Args:
        dim: size of the normalised (last) dimension.
        eps: small constant added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]

    def reset_parameters(self) -> None:
        """Set the scale to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``.

        Args:
            x: input of shape ``[..., dim]``.

        Returns:
            Tensor of the same shape and dtype as ``x`` (promoted with the weight dtype).
        """
        if plain_tensors(x, self.weight):
            out = rms_norm(x, self.weight, self.eps)  # saves x and rstd only
            # consumers (attention / MLP projections) may recompute ``out`` from x instead of saving it
            return attach_recompute(out, lambda: rms_norm(x, self.weight, self.eps))
        in_dtype = x.dtype  # eager path (DTensor and other tensor subclasses)
        xf = x.float()  # [..., dim]
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., dim]
        return self.weight * xf.to(in_dtype)  # [..., dim]

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
