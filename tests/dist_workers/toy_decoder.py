"""A small decoder with the contract's parameter names, for testing the distributed helpers
without depending on tinytune.models (GQA, tied or untied head, fp32)."""

import torch
import torch.nn.functional as F
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=True)
        # no k bias: its exact gradient is 0 and Adam would amplify rounding noise
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class ToyMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.sa_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = ToyAttention(dim, num_heads, num_kv_heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = ToyMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ToyTied(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.tied_module = [emb]  # not registered: no duplicate parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tied_module[0].weight)


class ToyDecoder(nn.Module):
    def __init__(self, vocab=64, dim=32, layers=2, num_heads=4, num_kv_heads=2, hidden=48, tied=False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        nn.init.normal_(self.tok_embeddings.weight, std=0.1)
        self.layers = nn.ModuleList(ToyLayer(dim, num_heads, num_kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.output = ToyTied(self.tok_embeddings) if tied else nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))
