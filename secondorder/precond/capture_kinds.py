"""The built-in layer kinds of the capture (the table in :mod:`secondorder.precond.capture_layers`).

Each class implements the :class:`~secondorder.precond.capture_layers.LayerKind` protocol;
``nn.MultiheadAttention`` lives in :mod:`secondorder.precond.capture_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.precond.capture_layers import CapturedLayer, LayerKind


class LinearKind(LayerKind):
    """``nn.Linear`` (and subclasses): any leading dims, tokens are positions."""

    name, family = "linear", "dense"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def in_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[1])

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[0])

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        return x.reshape(1, 1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1, x.shape[-1])


class TransposedLinearKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2, GPT): ``y = x W + b`` with ``W`` stored ``(in, out)``.

    Detected structurally (class name ``Conv1D``, an ``nf`` attribute and a 2-D weight of
    shape ``(·, nf)``), so transformers need not be importable.
    """

    name = "transposed_linear"

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D"
            and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and weight.shape[1] == module.nf
        )

    def in_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[0])

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[1])

    def weight_to_matrix(self, layer: CapturedLayer, weight_like: Tensor) -> Tensor:
        return weight_like.transpose(0, 1).unsqueeze(0)

    def matrix_to_weight(self, layer: CapturedLayer, matrix: Tensor) -> Tensor:
        return matrix.squeeze(-3).transpose(-1, -2)


def _same_padding(kernel_size, dilation) -> list[int] | None:
    """Symmetric ``'same'`` padding per dim, ``None`` if it would be unequal (even kernel)."""
    pads = []
    for kernel, dil in zip(kernel_size, dilation, strict=True):
        total = dil * (kernel - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return pads


class ConvKind(LayerKind):
    """``nn.Conv2d`` / ``nn.Conv1d`` by unfolding (Grosse & Martens 2016): stride, padding
    (incl. ``'same'``/``'valid'``), dilation, groups (grouped and depthwise); zero padding."""

    family = "dense"

    def __init__(self, name: str, module_type: type, spatial_dims: int) -> None:
        self.name, self.module_type, self.spatial_dims = name, module_type, spatial_dims

    def matches(self, module: nn.Module) -> bool:
        return (
            isinstance(module, self.module_type)
            and not isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and self.unsupported_reason(module) is None
        )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not isinstance(module, self.module_type):
            return None
        if module.padding_mode != "zeros":  # F.unfold models zero padding only
            return f"padding_mode={module.padding_mode!r} (only zero padding is modelled)"
        if module.padding == "same" and _same_padding(module.kernel_size, module.dilation) is None:
            return "padding='same' with unequal left/right padding"
        return None

    def _padding(self, module: nn.Module) -> list[int]:
        if module.padding == "valid":
            return [0] * self.spatial_dims
        if module.padding == "same":
            return _same_padding(module.kernel_size, module.dilation)
        return [int(p) for p in module.padding]

    def groups(self, layer: CapturedLayer) -> int:
        return int(layer.module.groups)

    def in_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[1] * math.prod(layer.weight.shape[2:]))

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[0]) // self.groups(layer)

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        """``(N, C_in, *spatial)`` → ``(N, T, C_in·k)`` or ``(N, T, groups, C_in/groups·k)``."""
        module = layer.module
        if x.dim() == self.spatial_dims + 1:  # unbatched
            x = x.unsqueeze(0)
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = self._padding(module), module.stride
        if self.spatial_dims == 1:  # a 1-D convolution is a 2-D one with a height-1 kernel
            x = x.unsqueeze(2)
            kernel, dilation = (1, kernel[0]), (1, dilation[0])
            padding, stride = (0, padding[0]), (1, stride[0])
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        patches = patches.transpose(1, 2)  # (N, T, C_in*k), channel-major columns
        groups = self.groups(layer)
        if groups > 1:
            patches = patches.reshape(patches.shape[0], patches.shape[1], groups, -1)
        return patches

    def output_grads(self, layer: CapturedLayer, grad: Tensor, batch_size: int) -> Tensor:
        channels = grad.shape[-self.spatial_dims - 1]
        rows = grad.reshape(batch_size, channels, -1).transpose(1, 2)
        groups = self.groups(layer)
        if groups > 1:
            rows = rows.reshape(rows.shape[0], rows.shape[1], groups, -1)
        return rows


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: ``a`` is the one-hot index (never formed); ``padding_idx`` rows get
    ``g = 0`` (PyTorch never updates that row)."""

    name, family = "embedding", "embedding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def parameters(self, module: nn.Module) -> list[tuple[str, Tensor, Tensor | None]]:
        return [("", module.weight, None)]

    def in_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[0])

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[1])

    def rows(self, layer, payload, grads, cache):
        index = self.inputs(layer, payload)
        g = self.output_grads(layer, grads[0], index.shape[0])
        padding_idx = getattr(layer.module, "padding_idx", None)
        if padding_idx is not None:
            g = g * (index != padding_idx).unsqueeze(-1).to(g.dtype)
        return index, g

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)

    def weight_to_matrix(self, layer: CapturedLayer, weight_like: Tensor) -> Tensor:
        return weight_like.transpose(0, 1).unsqueeze(0)

    def matrix_to_weight(self, layer: CapturedLayer, matrix: Tensor) -> Tensor:
        return matrix.squeeze(-3).transpose(-1, -2)


class NormKind(LayerKind):
    """A weight (and bias) applied channel-wise after normalisation: ``y = γ ⊙ x̂ (+ β)``.

    Rows are the raw input with the normalised channels last, ``(N, T, C)``;
    :meth:`normalised_input` recomputes ``x̂``. Subclasses set how ``x̂`` is formed.
    """

    family = "elementwise"

    def record(self, module, args, kwargs, output, random_state=None):
        # x̂ is recomputed from the one input: a call with more (a gated RMSNorm's gate) is
        # not what this kind models, so it is not recorded (the layer then falls back)
        if len(args) != 1 or kwargs:
            return None
        return super().record(module, args, kwargs, output, random_state)

    def in_features(self, layer: CapturedLayer) -> int:
        return 2

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.numel())

    def _width(self, layer: CapturedLayer) -> int:
        return int(layer.weight.numel())

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        width = self._width(layer)
        return x.reshape(1, -1, width) if x.dim() == layer.weight.dim() else x.reshape(
            x.shape[0], -1, width
        )

    def output_grads(self, layer: CapturedLayer, grad: Tensor, batch_size: int) -> Tensor:
        return grad.reshape(batch_size, -1, self._width(layer))


class LayerNormKind(NormKind):
    name = "layernorm"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.LayerNorm) and module.weight is not None

    def normalised_input(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + layer.module.eps)


class RMSNormKind(NormKind):
    """``torch.nn.RMSNorm`` and RMSNorm-like modules (``LlamaRMSNorm``, ``T5LayerNorm``…):
    class name containing ``RMSNorm`` (or ``T5LayerNorm``), a 1-D ``weight`` and an epsilon in
    ``eps`` or ``variance_epsilon``; ``x̂ = x / sqrt(mean(x²) + ε)`` over the last dim.

    A Gemma-style ``(1 + weight)`` scale has the same weight gradient ``Σ g ⊙ x̂``.
    """

    name = "rmsnorm"

    def matches(self, module: nn.Module) -> bool:
        if isinstance(module, nn.RMSNorm):
            return module.weight is not None
        class_name = type(module).__name__
        weight = getattr(module, "weight", None)
        return (
            ("RMSNorm" in class_name or class_name == "T5LayerNorm")
            and isinstance(weight, Tensor)
            and weight.dim() == 1
            and (hasattr(module, "eps") or hasattr(module, "variance_epsilon"))
        )

    def normalised_input(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        module = layer.module
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class BatchNormKind(NormKind):
    """``nn.BatchNorm{1,2,3}d`` with affine parameters: channels last, positions spatial."""

    name = "batchnorm"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)

    def output_grads(self, layer: CapturedLayer, grad: Tensor, batch_size: int) -> Tensor:
        return grad.reshape(batch_size, grad.shape[1 if grad.dim() > 1 else 0], -1).transpose(1, 2)

    def normalised_input(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        module = layer.module
        if module.training or module.running_mean is None:
            mean = x.mean(dim=(0, 1))
            var = x.var(dim=(0, 1), unbiased=False)
        else:
            mean, var = module.running_mean.to(x.dtype), module.running_var.to(x.dtype)
        return (x - mean) / torch.sqrt(var + module.eps)
