"""Which layers the capture understands, and how their tensors are laid out.

A :class:`CapturedLayer` ties one module to its parameters (by object identity) and knows

* how to turn the module's raw forward input into the rows ``a`` whose outer product with the
  output gradient ``g`` gives the weight gradient (:meth:`CapturedLayer.layer_inputs`), and
* how the weight (and bias) gradient is laid out as the *gradient matrix* every Kronecker
  method works on (:meth:`CapturedLayer.gradient_matrix`, :meth:`CapturedLayer.split_matrix`).

Gradient-matrix convention (used by capture, K-FAC/EK-FAC, AdaFisher, influence)::

    M  shape (groups, d_out, d_in')     d_in' = d_in + 1 when the layer has a bias
    M[j, :, :d_in] = weight gradient of group j (rows = output units, columns = input features)
    M[j, :, d_in]  = bias gradient of group j   (the homogeneous ones column is LAST)

``groups`` is 1 except for a grouped ``nn.Conv2d``. Per layer kind:

==========  ==================================  =============================================
kind        rows ``a`` (per position)           gradient matrix
==========  ==================================  =============================================
linear      the input's last dim (+1)           ``weight`` ``(d_out, d_in)`` (+ bias column)
conv2d      unfolded patch ``C_in/g·kh·kw`` (+1) ``weight.flatten(1)`` split into groups;
            (``F.unfold`` order: channel, kh,    (+ bias column per group)
            kw); positions = output locations
embedding   the index (one-hot ``a`` of length   ``weight.T`` ``(embedding_dim, num_emb)``
            ``num_embeddings``, never formed)
layernorm   the raw input, normalised dims       ``weight`` / ``bias`` (per-channel; used by
batchnorm   flattened last ``(N, T, C)``         AdaFisher's diagonal Fisher only)
==========  ==================================  =============================================

Row-major flattening of one group's ``M`` is ``vec_r(g āᵀ) = g ⊗ ā``, so a Kronecker block in
that order is ``kron(G, A)`` (reference/ekfac.md §1 "flatten-order gotcha").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("linear", "conv2d", "embedding", "layernorm", "batchnorm")
"""Every layer kind the capture can track."""

KRONECKER_KINDS = ("linear", "conv2d", "embedding")
"""Kinds whose weight gradient is ``Σ_t g aᵀ`` (the default of :class:`LayerCapture`)."""

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def module_kind(module: nn.Module) -> str | None:
    """Return the capture kind of ``module`` (one of :data:`KINDS`) or ``None`` if unsupported.

    ``nn.Linear`` subclasses are linear. Modules with no trainable-looking ``weight``
    (``affine=False`` norms) are unsupported.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and not isinstance(module, nn.LazyConv2d):
        if module.padding_mode != "zeros":  # F.unfold models zero padding only
            return None
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return "layernorm"
    if isinstance(module, _BATCHNORM_TYPES) and module.weight is not None:
        return "batchnorm"
    return None


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Symmetric padding of ``module`` as ``(pad_h, pad_w)``; resolves ``'same'``/``'valid'``.

    Raises:
        ValueError: ``'same'`` needing unequal left/right padding (even effective kernel).
    """
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        pads = []
        for kernel, dilation in zip(module.kernel_size, module.dilation, strict=True):
            total = dilation * (kernel - 1)
            if total % 2:
                raise ValueError(f"Invalid padding of {module}: 'same' needs unequal padding here")
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(module.padding[0]), int(module.padding[1]))


@dataclass(eq=False)
class CapturedLayer:
    """One tracked module. Hashable by identity (use it as a dict key).

    Attributes:
        module: the ``nn.Module``.
        name: its qualified name in the model (``""`` for the root).
        kind: one of :data:`KINDS`.
        weight: the module's weight parameter (identity-matched to the optimizer's params).
        bias: the bias parameter, or ``None`` (also ``None`` when the bias is not among the
            tracked params; then no ones column is appended).
    """

    module: nn.Module
    name: str
    kind: str
    weight: Tensor
    bias: Tensor | None

    @property
    def groups(self) -> int:
        """Number of independent weight groups (``module.groups`` for conv2d, else 1)."""
        return int(self.module.groups) if self.kind == "conv2d" else 1

    @property
    def has_bias(self) -> bool:
        """Whether rows get the appended ones column (bias tracked)."""
        return self.bias is not None and self.kind in ("linear", "conv2d")

    @property
    def in_features(self) -> int:
        """``d_in'``: input width per group including the ones column."""
        if self.kind == "embedding":
            return int(self.module.num_embeddings)
        if self.kind in ("layernorm", "batchnorm"):
            return 2  # AdaFisher's (γ, β) activation entries
        if self.kind == "conv2d":
            width = self.weight.shape[1] * math.prod(self.weight.shape[2:])
        else:
            width = self.weight.shape[1]
        return int(width) + int(self.has_bias)

    @property
    def out_features(self) -> int:
        """``d_out`` per group."""
        if self.kind == "embedding":
            return int(self.weight.shape[1])
        if self.kind in ("layernorm", "batchnorm"):
            return int(self.weight.numel())
        return int(self.weight.shape[0]) // self.groups

    # ----------------------------------------------------------------- inputs
    def layer_inputs(self, x: Tensor) -> Tensor:
        """Turn the module's raw forward input into per-position rows.

        Args:
            x: the first positional input of the module's forward.

        Returns:
            * linear: ``(N, T, d_in')`` (leading dims after the first flattened into ``T``;
              an unbatched 1-D input gives ``N = T = 1``), ones column last if ``has_bias``;
            * conv2d, groups 1: ``(N, T, C_in·kh·kw (+1))`` with ``T = out_h·out_w``;
              groups > 1: ``(N, T, groups, C_in/groups·kh·kw (+1))``;
            * embedding: the long indices ``(N, T)`` (``a`` is their one-hot);
            * layernorm: ``(N, T, D)``, ``D`` = product of ``normalized_shape``;
            * batchnorm: ``(N, T, C)`` with ``T`` the spatial positions (channels last).
        """
        kind = self.kind
        if kind == "embedding":
            return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        if kind == "linear":
            rows = x.reshape(1, 1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1, x.shape[-1])
        elif kind == "conv2d":
            rows = self._unfold(x)
        elif kind == "layernorm":
            width = math.prod(self.module.normalized_shape)
            return (
                x.reshape(1, -1, width)
                if x.dim() == len(self.module.normalized_shape)
                else x.reshape(x.shape[0], -1, width)
            )
        else:  # batchnorm: (N, C, *spatial) -> (N, T, C); BatchNorm1d on (N, C) -> (N, 1, C)
            return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def _unfold(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` → ``(N, T, C_in·kh·kw)`` or ``(N, T, groups, K)`` for groups > 1."""
        module = self.module
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=_conv_padding(module),
            stride=module.stride,
        )  # (N, C_in*kh*kw, T), channel-major columns
        patches = patches.transpose(1, 2)
        if self.groups > 1:
            patches = patches.reshape(patches.shape[0], patches.shape[1], self.groups, -1)
        return patches

    def output_rows(self, grad_output: Tensor, batch_size: int) -> Tensor:
        """Reshape the gradient w.r.t. the module output into per-position rows.

        Args:
            grad_output: gradient w.r.t. the module's output (same shape as the output).
            batch_size: ``N`` of the matching :meth:`layer_inputs` result.

        Returns:
            linear / embedding / layernorm: ``(N, T, d_out)``; conv2d: ``(N, T, C_out)`` or
            ``(N, T, groups, C_out/groups)``; batchnorm: ``(N, T, C)``.
        """
        kind = self.kind
        if kind == "conv2d":
            rows = grad_output.reshape(batch_size, grad_output.shape[-3], -1).transpose(1, 2)
            if self.groups > 1:
                rows = rows.reshape(rows.shape[0], rows.shape[1], self.groups, -1)
            return rows
        if kind == "batchnorm":
            return grad_output.reshape(
                batch_size, grad_output.shape[1 if grad_output.dim() > 1 else 0], -1
            ).transpose(1, 2)
        width = self.out_features
        return grad_output.reshape(batch_size, -1, width)

    # ----------------------------------------------------------------- layout
    def gradient_matrix(
        self, weight_grad: Tensor | None, bias_grad: Tensor | None = None
    ) -> Tensor:
        """Lay a weight (and bias) gradient out as ``(groups, d_out, d_in')`` (module docstring).

        ``None`` gradients count as zeros. Only for kinds linear, conv2d, embedding.
        """
        if self.kind not in KRONECKER_KINDS:
            raise ValueError(
                f"Invalid kind: gradient_matrix needs a Kronecker layer, got {self.kind!r}"
            )
        weight = self.weight
        if weight_grad is None:
            weight_grad = torch.zeros_like(weight)
        if self.kind == "embedding":
            return weight_grad.transpose(0, 1).unsqueeze(0)
        matrix = weight_grad.reshape(self.groups, self.out_features, -1)
        if self.has_bias:
            bias = torch.zeros_like(self.bias) if bias_grad is None else bias_grad
            matrix = torch.cat(
                [matrix, bias.reshape(self.groups, self.out_features, 1).to(matrix.dtype)], dim=-1
            )
        return matrix

    def split_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: ``(weight-shaped, bias-shaped or None)``."""
        if self.kind == "embedding":
            return matrix[0].transpose(0, 1).reshape(self.weight.shape), None
        if self.has_bias:
            weight_part = matrix[..., :-1].reshape(self.weight.shape)
            return weight_part, matrix[..., -1].reshape(self.bias.shape)
        return matrix.reshape(self.weight.shape), None
