"""What the layer capture costs per layer kind: recording, and ``pop()`` (where the work is).

    python -m benchmarks.capture_cost [--batch 32] [--length 128] [--width 128] [--layers 2]
                                      [--repeats 5] [--threads 1]

Byte-level causal LMs of the same size (pre-LN blocks, 4 heads, MLP 4×) written four ways:
``nn.TransformerEncoderLayer`` (attention through ``nn.MultiheadAttention``: ``pop`` recomputes
each call's attention forward and backward), the same block with explicit ``nn.Linear``
projections and ``F.scaled_dot_product_attention``, and each with the input embedding tied to
the head (``pop`` forms the one-hot rows of the embedding use densely). Per model: forward +
backward without a capture, with a recording capture, and ``pop()`` alone (median ms over
``--repeats``). Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from secondorder.precond.capture import KINDS, LayerCapture

VOCAB = 256


class ExplicitBlock(nn.Module):
    """Pre-LN block with explicit q/k/v/out nn.Linear projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, -1).unbind(2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(o.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, width: int, layers: int, length: int, explicit: bool, tied: bool) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(VOCAB, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(
            ExplicitBlock(width, 4)
            if explicit
            else nn.TransformerEncoderLayer(
                width, 4, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(width, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.explicit = explicit
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x) if self.explicit else block(x, src_mask=self.mask, is_causal=True)
        return self.head(x)


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    idx = torch.randint(0, VOCAB, (args.batch, args.length))
    print(f"batch {args.batch} x {args.length} tokens, width {args.width}, {args.layers} blocks, "
          f"{args.threads} thread(s); median of {args.repeats}")
    print("| model | tracked / params | fwd+bwd ms | fwd+bwd recording ms | pop ms |")
    print("|---|---|---|---|---|")
    for explicit in (False, True):
        for tied in (False, True):
            print(_row(args, idx, explicit, tied))


def _row(args: argparse.Namespace, idx: torch.Tensor, explicit: bool, tied: bool) -> str:
    """One table row: time one model without, with a capture, and its ``pop``."""
    torch.manual_seed(0)
    model = LM(args.width, args.layers, args.length, explicit, tied)

    def train_step():
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        F.cross_entropy(logits.reshape(-1, VOCAB), idx.reshape(-1)).backward()

    train_step()
    bare = _median_ms(train_step, args.repeats)
    capture = LayerCapture(model, kinds=KINDS)
    described = capture.describe()
    tracked = sum(d["status"] == "tracked" for d in described.values())
    recording = _median_ms(lambda: (capture.clear(), train_step()), args.repeats)
    pops = []
    for _ in range(args.repeats):
        capture.clear()
        train_step()
        start = time.perf_counter()
        capture.pop()
        pops.append(1e3 * (time.perf_counter() - start))
    capture.remove()
    name = "explicit Linear + SDPA" if explicit else "TransformerEncoderLayer (MHA)"
    name += ", tied head" if tied else ""
    return (
        f"| {name} | {tracked} / {len(described)} | {bare:.1f} | {recording:.1f} | "
        f"{statistics.median(pops):.1f} |"
    )


if __name__ == "__main__":
    main()
