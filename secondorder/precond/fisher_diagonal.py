"""AdaFisher's Kronecker-diagonal Fisher: ``F̃ = diag(H) ⊗ diag(S) + λ`` per layer.

Gomes et al., "AdaFisher: Adaptive Second Order Optimization via Fisher Information" (ICLR
2025, arXiv 2405.16397); conventions and the official code's quirks in reference/adafisher.md.
K-FAC's factors ``H = E[ā āᵀ]`` and ``S = E[g gᵀ]`` are reduced to their diagonals; the Fisher
entry of weight ``W[o, i]`` is ``H[i]·S[o]``.

Raw statistics per window (:func:`diagonal_statistics`; ``M`` = number of real positions, ``g``
scaled to per-example losses by the capture):

==============  ===============================================  ===========================
kind            ``ĥ``                                            ``ŝ``
==============  ===============================================  ===========================
linear, conv2d  ``Σ_{n,t} ā²/M`` (length ``d_in'``; grouped conv  ``Σ_{n,t} g²/M`` (``d_out``)
                averages over groups, so ``d_in'`` per group)
embedding       token frequencies ``count_v / M`` (length ``V``)   ``Σ g²/M`` (``dim``)
layernorm,      ``[Σ x̂²/(M·C), 1]``: a 2-vector (γ entry, β entry),  ``Σ_{n,t} g²/M`` (``C``)
batchnorm,      ``x̂`` the normalised input (RMSNorm has no β)
rmsnorm
==============  ===============================================  ===========================

``x̂`` is recomputed from the captured input (LayerNorm over its normalised dims; RMSNorm
``x / sqrt(mean(x²) + ε)``; BatchNorm with batch statistics in training mode, running
statistics in eval mode). Any kind of the elementwise family (a weight ``γ`` applied channel by
channel after normalisation, ``y = γ ⊙ x̂ (+ β)``) gets the same statistic: the per-example
gradient of ``γ_c`` is ``Σ_t g_{t,c} x̂_{t,c}``, and ``h[0]·ŝ_c`` is its Kronecker-diagonal
(K-FAC with the channels as outputs and ``x̂`` pooled over channels as the input) estimate of
``E[(∂ℓ/∂γ_c)²]``. The official code uses
the BatchNorm *input* and reduces LayerNorm over every dim but dim 1 (adafisher.md §11.5); we
model the normalised input the affine parameters actually multiply. It also ignores conv
dilation; we do not.

Layout (:func:`fisher_diagonal`): ``F̃_W`` has the weight's shape (``F̃_W[o, i] = H[i]S[o] + λ``
in the gradient-matrix layout, mapped back by the layer kind: conv weight flattened as
``(C_out, C_in/groups·kh·kw)``, embedding ``F̃[v, d] = H[v]S[d]``, GPT-2's transposed ``Conv1D``
``F̃[i, o] = H[i]S[o]``), the
bias uses the last ``H`` entry (the ones column), norm layers use ``H[0]`` for γ and ``H[1]``
for β.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.precond.capture import LayerStats
from secondorder.precond.capture_layers import CapturedLayer


def minmax_normalize(values: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x − min x) / (max x − min x + ε)`` after mapping ``+inf → 1`` and ``−inf → 0``.

    Shape kept. Output in ``[0, 1)``; because of ``ε`` tiny-range inputs are *not* stretched
    to ``[0, 1)`` (adafisher.md §4).
    """
    values = torch.where(values == float("inf"), torch.ones_like(values), values)
    values = torch.where(values == float("-inf"), torch.zeros_like(values), values)
    low, high = values.min(), values.max()
    return (values - low) / (high - low + eps)


def _normalised_input(layer: CapturedLayer, x: Tensor) -> Tensor:
    """``x̂`` from a captured ``(N, T, C)`` norm-layer input (the layer kind's
    :meth:`~secondorder.precond.capture_layers.LayerKind.normalised_input`)."""
    return layer.spec.normalised_input(layer, x)


def diagonal_statistics(
    layer: CapturedLayer, stats: LayerStats, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The raw diagonals ``(ĥ, ŝ)`` of one window (module docstring table).

    Returns:
        ``ĥ`` of length ``d_in'`` (``V`` for embedding, 2 for norm layers) and ``ŝ`` of length
        ``d_out`` (all output channels), both in ``dtype``.
    """
    count = max(stats.num_positions, 1)
    g = stats.output_grads.to(dtype)
    s_hat = (g * g).reshape(g.shape[0] * g.shape[1], -1).sum(0) / count
    if layer.family == "embedding":
        index = stats.inputs.reshape(-1)
        valid = index >= 0
        h_hat = torch.zeros(layer.in_features, dtype=dtype, device=g.device)
        h_hat.index_add_(0, index[valid], torch.ones_like(index[valid], dtype=dtype))
        return h_hat / count, s_hat
    a = stats.inputs.to(dtype)
    if layer.family == "elementwise":
        x_hat = _normalised_input(layer, a)
        gamma_entry = (x_hat * x_hat).sum() / (count * x_hat.shape[-1])
        return torch.stack([gamma_entry, torch.ones_like(gamma_entry)]), s_hat
    width = a.shape[-1]
    h_hat = (a * a).reshape(-1, width).sum(0) / (count * layer.groups)
    return h_hat, s_hat


def elementwise_per_example_gradients(
    layer: CapturedLayer, stats: LayerStats, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Exact per-example gradients of a norm layer's ``γ`` and ``β``: ``Σ_t g ⊙ x̂`` and ``Σ_t g``.

    For the elementwise family (LayerNorm, RMSNorm, BatchNorm in eval mode; in training mode
    BatchNorm mixes examples, so these are the gradients with the batch statistics held fixed).
    Their squares averaged over examples are the exact diagonal empirical Fisher of the layer.

    Returns:
        ``(N, C)`` each, in ``dtype`` (default: the gradients' dtype).
    """
    if layer.family != "elementwise":
        raise ValueError(f"Invalid layer: kind {layer.kind!r} is not elementwise")
    dtype = dtype or stats.output_grads.dtype
    g = stats.output_grads.to(dtype)
    x_hat = _normalised_input(layer, stats.inputs.to(dtype))
    return (g * x_hat).sum(1), g.sum(1)


def fisher_diagonal(
    layer: CapturedLayer, h: Tensor, s: Tensor, damping: float
) -> tuple[Tensor, Tensor | None]:
    """``F̃`` laid out like the layer's parameters (module docstring "Layout").

    Args:
        h: activation diagonal (length as :func:`diagonal_statistics`'s ``ĥ``).
        s: gradient diagonal (length ``d_out``).
        damping: ``λ`` added to every entry.

    Returns:
        ``(F̃ for the weight (weight.shape), F̃ for the bias (bias.shape) or None)``.
    """
    weight = layer.weight
    if layer.family == "elementwise":
        fisher_weight = (h[0] * s + damping).reshape(weight.shape)
        fisher_bias = None if layer.bias is None else (h[1] * s + damping).reshape(layer.bias.shape)
        return fisher_weight, fisher_bias
    columns = h[:-1] if layer.has_bias else h
    # (groups·d_out, d_in) → the gradient-matrix layout → the weight's own layout (a transposed
    # weight such as GPT-2's Conv1D, an embedding's (V, D), grouped convolutions)
    matrix = (torch.outer(s, columns) + damping).reshape(layer.groups, layer.out_features, -1)
    fisher_weight = layer.spec.matrix_to_weight(layer, matrix)
    fisher_bias = (h[-1] * s + damping).reshape(layer.bias.shape) if layer.has_bias else None
    return fisher_weight, fisher_bias
