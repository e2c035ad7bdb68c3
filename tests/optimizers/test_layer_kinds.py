"""The capture optimizers on the layers real models are made of: GPT-2's Conv1D,
nn.MultiheadAttention, RMSNorm, a tied embedding/head; what they track, and that they train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder
from tests.precond.test_capture_kinds import Conv1D, LlamaRMSNorm


class TinyLM(nn.Module):
    def __init__(self, vocab=17, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = LlamaRMSNorm(width)
        self.mlp = Conv1D(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h + self.mlp(self.norm(h)))


OPTIMIZERS = {
    "EKFAC": (lambda m: secondorder.EKFAC(m, lr=1e-2), {"attention", "transposed_linear", "linear"}),
    "AdaFisherW": (
        lambda m: secondorder.AdaFisherW(m, lr=1e-3),
        {"attention", "transposed_linear", "linear", "rmsnorm"},
    ),
    # the only plain linear layer is the tied head, which SINGD leaves to its fallback
    "SINGD": (lambda m: secondorder.SINGD(m, lr=1e-2), {"attention", "transposed_linear"}),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_tracks_and_trains(name):
    make, kinds = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = make(model)
    capture = getattr(optimizer, "capture", None) or optimizer._capture
    assert {layer.kind for layer in capture.layers} == kinds
    tied = capture.layer_for(model.embed.weight)
    reason = capture.describe()["embed.weight"]["reason"]
    if name == "SINGD":  # the tied weight trains with the fallback (class comment: measured)
        assert tied is None and "tied between an embedding and a linear head" in reason
    elif name != "EKFAC":  # AdaFisher's raw-scale Fisher measured worse with the embedding
        # use's rows (class docstring): the head's use only
        assert tied.name == "head" and "not modelled: 'embed'" in reason
    else:
        assert tied.name == "head" and "all uses" in reason
    idx = torch.randint(0, 17, (6, 5))
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(idx).reshape(-1, 17), idx.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for layer in capture.layers:
        assert optimizer.state[layer.weight], layer.name  # curvature state for every kind
    assert losses[-1] < losses[0]
