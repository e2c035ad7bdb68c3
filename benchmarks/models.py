"""Benchmark models, built only from ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``.

Capture-based optimizers (EK-FAC, AdaFisher, SINGD, exact Gauss-Newton) see a layer through
forward/backward hooks on these modules, so attention is written out with plain tensor
operations (no ``nn.MultiheadAttention``, whose projections are not ``nn.Linear`` calls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP", "CausalSelfAttention", "TransformerBlock", "ByteTransformer", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


class MLP(nn.Sequential):
    """Fully connected network ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ReLU between.

    Input ``(batch, sizes[0])``, output ``(batch, sizes[-1])`` (logits for a classifier).
    W1 uses ``MLP((64, 128, 128, 10))``; the step-time benchmark ``MLP((256, 1024, 1024, 10))``
    (1,323,018 parameters).
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"Invalid sizes: {tuple(sizes)} (need at least two positive widths)")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(int(fan_in), int(fan_out)))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit ``softmax(q kᵀ / √d_head + mask) v``.

    Input and output ``(batch, time, d_model)``. ``qkv`` is one ``nn.Linear(d_model, 3·d_model)``
    and ``proj`` an ``nn.Linear(d_model, d_model)`` (Vaswani et al. 2017, §3.2).
    """

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads} does not divide d_model={d_model}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        head = width // self.n_heads
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_heads, head).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head) + self.mask[:time, :time]
        out = torch.softmax(scores, dim=-1) @ v  # (batch, heads, time, head)
        return self.proj(out.transpose(1, 2).reshape(batch, time, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` with a GELU MLP.

    Input and output ``(batch, time, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """Byte-level causal transformer language model (GPT-2-like, pre-LN, learned positions).

    Input: byte ids ``(batch, time)`` int64 with ``time <= context``; output logits
    ``(batch, time, 256)``. Defaults (``d_model=128, n_layers=4, n_heads=4, d_ff=512,
    context=128``) give 875,520 parameters. Weights are drawn from N(0, 0.02²), residual
    output projections with std 0.02/√(2·n_layers) (Radford et al. 2019).
    """

    def __init__(
        self,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        context: int = 128,
        vocab: int = 256,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, context) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * n_layers))
            nn.init.normal_(block.out.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.context:
            raise ValueError(f"Invalid idx: sequence length {time} exceeds context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(time, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
