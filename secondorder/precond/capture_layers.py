"""Which layers the capture understands, and how their tensors are laid out.

Every layer kind is a :class:`LayerKind` in a registry (:func:`register_layer_kind`), so a user
can teach the capture their own module. A :class:`CapturedLayer` ties one use of a weight to
its kind and knows

* how to turn a forward call into rows ``a`` whose outer products with the output gradient
  rows ``g`` give the weight gradient (:meth:`CapturedLayer.layer_inputs`), and
* how the weight (and bias) gradient is laid out as the *gradient matrix* every Kronecker
  method works on (:meth:`CapturedLayer.gradient_matrix`, :meth:`CapturedLayer.split_matrix`).

Gradient-matrix convention (used by capture, K-FAC/EK-FAC, AdaFisher, SINGD, influence)::

    M  shape (groups, d_out, d_in')     d_in' = d_in + 1 when the layer has a bias
    M[j, :, :d_in] = weight gradient of group j (rows = output units, columns = input features)
    M[j, :, d_in]  = bias gradient of group j   (the homogeneous ones column is LAST)

Each kind belongs to a *family*, which is what the algorithms branch on:

* ``"dense"``: ``M_n = Σ_t g[n, t] a[n, t]ᵀ`` with dense rows (Kronecker methods apply);
* ``"embedding"``: the same with ``a`` one-hot, stored as long indices ``(N, T)``;
* ``"elementwise"``: a weight (and bias) multiplying a normalised input channel by channel
  (LayerNorm, BatchNorm, RMSNorm): the weight gradient of example ``n`` is
  ``Σ_t g[n, t] ⊙ x̂[n, t]`` (:mod:`secondorder.precond.fisher_diagonal` for the statistic).

Built-in kinds (``groups`` is 1 unless said otherwise):

==================  =====================================  =======================================
kind                module, rows ``a`` per position        gradient matrix
==================  =====================================  =======================================
linear              ``nn.Linear``; the input's last dim     ``weight`` ``(d_out, d_in)``
conv2d / conv1d     ``nn.Conv2d`` / ``nn.Conv1d`` (zero      ``weight.flatten(1)`` split into
                    padding); unfolded patch ``C_in/g·k``   ``groups`` (grouped and depthwise
                    (channel-major); positions = outputs    convolutions); bias column per group
transposed_linear   ``Conv1D`` of GPT-2 (class name,        ``weight.T``: the weight is stored
                    ``nf``, weight ``(in, nf)``); as linear ``(d_in, d_out)``
attention           ``nn.MultiheadAttention`` projections   packed ``in_proj_weight``: 3 groups
                    (:mod:`...capture_attention`)           (q, k, v); ``out_proj``: as linear
embedding           ``nn.Embedding``; the index             ``weight.T`` ``(embedding_dim, V)``
layernorm,          raw input, normalised dims last          ``weight`` / ``bias`` per channel
batchnorm, rmsnorm  ``(N, T, C)``                           (elementwise family)
==================  =====================================  =======================================

Row-major flattening of one group's ``M`` is ``vec_r(g āᵀ) = g ⊗ ā``, so a Kronecker block in
that order is ``kron(G, A)`` (reference/ekfac.md §1 "flatten-order gotcha").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

KINDS = (
    "linear",
    "conv2d",
    "embedding",
    "layernorm",
    "batchnorm",
    "conv1d",
    "transposed_linear",
    "attention",
    "rmsnorm",
)
"""Every built-in layer kind (user kinds: :func:`register_layer_kind`)."""

DENSE_KINDS = ("linear", "conv2d", "conv1d", "transposed_linear", "attention")
"""Built-in kinds of the dense family (``Σ_t g aᵀ`` with dense ``a``)."""

KRONECKER_KINDS = DENSE_KINDS + ("embedding",)
"""Kinds whose weight gradient is ``Σ_t g aᵀ`` (the default of :class:`LayerCapture`)."""

NORM_KINDS = ("layernorm", "batchnorm", "rmsnorm")
"""Built-in kinds of the elementwise family (a weight applied after normalisation)."""

FAMILIES = ("dense", "embedding", "elementwise")


class LayerKind:
    """How the capture reads one kind of module: the protocol a user kind implements.

    Subclass, set :attr:`name` and :attr:`family`, implement :meth:`matches`,
    :meth:`in_features`, :meth:`out_features` and :meth:`inputs`; override the rest only when
    the defaults do not fit:

    * ``a`` and ``g`` of one call: :meth:`record` keeps the first positional input and asks
      for the output's gradient; at :meth:`~secondorder.precond.capture.LayerCapture.pop`,
      :meth:`rows` turns them into ``a = inputs(x)`` ``(N, T, d_in)`` and
      ``g = output_grads(∂loss/∂output)`` ``(N, T, d_out)`` (dim 0 = examples; every other
      leading dim a position), such that the weight gradient of example ``n`` is
      ``Σ_t g[n, t] a[n, t]ᵀ`` in the gradient-matrix layout. Grouped layers return
      ``(N, T, groups, ·)``. Override :meth:`rows` (and :meth:`record`) when ``a`` or ``g``
      must be recomputed (see :mod:`secondorder.precond.capture_attention`).
    * The weight layout: :meth:`weight_to_matrix` maps a weight-shaped tensor to
      ``(groups, d_out, d_in)`` (default: ``reshape``, right for weights stored
      ``(groups·d_out, d_in…)``); :meth:`matrix_to_weight` is its inverse.
    * The bias: :meth:`parameters` names it (default ``module.bias``); when tracked it is the
      ones column appended to ``a`` by the capture and the last column of the gradient matrix,
      reshaped ``(groups, d_out, 1)``: :meth:`inputs` returns rows *without* it.
    * Elementwise family (a weight multiplying a normalised input): :meth:`inputs` returns the
      raw input ``(N, T, C)`` and :meth:`normalised_input` the ``x̂`` the weight multiplies.

    Register with :func:`register_layer_kind` and list the name in ``kinds=``. Check a new kind
    as tests/precond/test_capture_kinds.py does: its per-example ``Σ_t g aᵀ``, laid out by
    :meth:`CapturedLayer.split_matrix`, must equal dense per-example gradients.
    """

    name: str = ""
    family: str = "dense"

    def matches(self, module: nn.Module) -> bool:
        """Whether this kind handles ``module`` (first registered match wins)."""
        raise NotImplementedError

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why a module of this kind's type is not handled (``describe()``), else ``None``."""
        return None

    def parameters(self, module: nn.Module) -> list[tuple[str, Tensor, Tensor | None]]:
        """``[(slot name, weight, bias or None)]``: the weights this module applies.

        One entry for ordinary layers (slot ``""``); a module applying several weights
        (attention projections) lists each, and each becomes its own :class:`CapturedLayer`.
        """
        bias = getattr(module, "bias", None)
        return [("", module.weight, bias if isinstance(bias, Tensor) else None)]

    def groups(self, layer: CapturedLayer) -> int:
        """Independent weight groups (grouped convolution; 1 by default)."""
        return 1

    def in_features(self, layer: CapturedLayer) -> int:
        """``d_in`` per group, without the ones column."""
        raise NotImplementedError

    def out_features(self, layer: CapturedLayer) -> int:
        """``d_out`` per group."""
        raise NotImplementedError

    needs_random_state: bool = False
    """Whether :meth:`random_state` must be taken before each call (a forward pre-hook)."""

    def random_state(self, module: nn.Module, args: tuple, kwargs: dict):
        """Generator state before a call, for kinds that replay random ops at :meth:`rows`."""
        return None

    def record(
        self, module: nn.Module, args: tuple, kwargs: dict, output, random_state=None
    ) -> tuple | None:
        """``(payload, tensors whose gradient to receive)`` for one call, or ``None`` to skip.

        Keep references only, detached (a tensor payload is detached for you); the work
        belongs in :meth:`rows`. Default: the first positional input, and the output.
        """
        if not args or not isinstance(output, Tensor):
            return None
        return args[0], [output]

    def rows(
        self, layer: CapturedLayer, payload, grads: list[Tensor | None], cache: dict
    ) -> tuple[Tensor, Tensor]:
        """``(a, g)`` of one recorded call (``a`` without the ones column; ``g`` unscaled).

        ``grads`` are the gradients of :meth:`record`'s tensors (``None`` if one got none);
        ``cache`` is shared by the layers of one module call (several slots).
        """
        a = self.inputs(layer, payload)
        return a, self.output_grads(layer, grads[0], a.shape[0])

    def inputs(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        """Raw input → ``(N, T, d_in)`` or ``(N, T, groups, d_in)`` (long ``(N, T)`` for the
        embedding family; ``(N, T, C)`` raw input for the elementwise family)."""
        raise NotImplementedError

    def output_grads(self, layer: CapturedLayer, grad: Tensor, batch_size: int) -> Tensor:
        """Output gradient → ``(N, T, d_out)`` or ``(N, T, groups, d_out)``."""
        return grad.reshape(batch_size, -1, self.out_features(layer) * self.groups(layer))

    def weight_to_matrix(self, layer: CapturedLayer, weight_like: Tensor) -> Tensor:
        """A weight-shaped tensor → ``(groups, d_out, d_in)`` (dense and embedding families)."""
        return weight_like.reshape(self.groups(layer), self.out_features(layer), -1)

    def matrix_to_weight(self, layer: CapturedLayer, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`weight_to_matrix`; ``matrix`` may carry leading batch dims."""
        return matrix.reshape(matrix.shape[:-3] + layer.weight.shape)

    def normalised_input(self, layer: CapturedLayer, x: Tensor) -> Tensor:
        """Elementwise family: ``x̂`` from the ``(N, T, C)`` rows (what the weight multiplies)."""
        raise NotImplementedError


_BUILTIN: dict[str, LayerKind] = {}
_USER: dict[str, LayerKind] = {}


def _registry() -> dict[str, LayerKind]:
    """Every registered kind in matching order: user kinds first, then the built-ins."""
    return {**_USER, **{k: v for k, v in _BUILTIN.items() if k not in _USER}}


def register_layer_kind(kind: LayerKind, *, replace: bool = False) -> LayerKind:
    """Add ``kind`` to the registry (user kinds are matched before the built-ins); returns it.

    Registering a built-in name with ``replace=True`` overrides the built-in.

    Raises:
        ValueError: ``Invalid kind`` for a bad name/family, or a taken name without ``replace``.
    """
    if not isinstance(kind, LayerKind) or not kind.name or kind.family not in FAMILIES:
        raise ValueError(
            f"Invalid kind: expected a LayerKind with a name and a family in {FAMILIES}"
        )
    if kind.name in _registry() and not replace:
        raise ValueError(f"Invalid kind: {kind.name!r} is registered (pass replace=True)")
    _USER[kind.name] = kind
    return kind


def unregister_layer_kind(name: str) -> None:
    """Remove a user kind (a replaced built-in comes back)."""
    _USER.pop(name, None)


def layer_kind(name: str) -> LayerKind:
    """The registered :class:`LayerKind` called ``name``."""
    kind = _USER.get(name) or _BUILTIN.get(name)
    if kind is None:
        raise ValueError(f"Invalid kind: {name!r} (registered: {registered_kinds()})")
    return kind


def registered_kinds() -> tuple[str, ...]:
    """Names of every registered kind, in matching order (user kinds first)."""
    return tuple(_registry())


def module_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (first registered match), or ``None`` if unsupported."""
    for name, kind in _registry().items():
        if kind.matches(module):
            return name
    return None


def module_parameters(module: nn.Module) -> list[Tensor]:
    """The weights and biases ``module``'s kind models (attention: every projection's), in
    slot order; ``[]`` for an unsupported module. What to pass as ``params`` to track it."""
    kind = module_kind(module)
    if kind is None:
        return []
    found = []
    for _, weight, bias in layer_kind(kind).parameters(module):
        found.extend(p for p in (weight, bias) if isinstance(p, Tensor))
    return found


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a known type is not handled (e.g. reflect padding), else ``None``."""
    for kind in _registry().values():
        reason = kind.unsupported_reason(module)
        if reason:
            return reason
    return None


@dataclass(eq=False)
class CapturedLayer:
    """One tracked weight and how it is used. Hashable by identity (use it as a dict key).

    Attributes:
        module: the ``nn.Module`` that applies the weight (first use for a tied weight).
        name: its qualified name in the model (``""`` for the root; ``name.slot`` for one
            projection of a multi-weight module).
        kind: a registered kind name (:func:`layer_kind`).
        weight: the weight parameter (identity-matched to the optimizer's params).
        bias: the bias parameter, or ``None`` (also ``None`` when the bias is not among the
            tracked params; then no ones column is appended).
        slot: which of the module's weights (:meth:`LayerKind.parameters`; ``""`` usually).
        tied_uses: further ``(module, kind name, slot, transposed)`` applying the same weight
            (tied weights; ``transposed``: an embedding use of a weight laid out as a linear
            layer's, whose rows swap roles; see :mod:`secondorder.precond.capture`).
    """

    module: nn.Module
    name: str
    kind: str
    weight: Tensor
    bias: Tensor | None
    slot: str = ""
    tied_uses: list = field(default_factory=list)

    @property
    def spec(self) -> LayerKind:
        """The registered :class:`LayerKind`."""
        return layer_kind(self.kind)

    @property
    def family(self) -> str:
        """``"dense"``, ``"embedding"`` or ``"elementwise"`` (module docstring)."""
        return self.spec.family

    @property
    def groups(self) -> int:
        """Number of independent weight groups."""
        return int(self.spec.groups(self))

    @property
    def has_bias(self) -> bool:
        """Whether rows get the appended ones column (bias tracked, dense family)."""
        return self.bias is not None and self.family == "dense"

    @property
    def in_features(self) -> int:
        """``d_in'``: input width per group including the ones column (2 for norm layers:
        AdaFisher's (γ, β) activation entries; ``V`` for an embedding)."""
        if self.family == "elementwise":
            return 2
        return int(self.spec.in_features(self)) + int(self.has_bias)

    @property
    def out_features(self) -> int:
        """``d_out`` per group (channels for norm layers)."""
        if self.family == "elementwise":
            return int(self.weight.numel())
        return int(self.spec.out_features(self))

    # ----------------------------------------------------------------- inputs
    def layer_inputs(self, x: Tensor) -> Tensor:
        """The module's raw forward input → rows (ones column last when :attr:`has_bias`).

        Shapes: dense ``(N, T, d_in')`` or ``(N, T, groups, d_in')`` for ``groups > 1``;
        embedding: long indices ``(N, T)``; elementwise: ``(N, T, C)`` raw input.
        """
        return self.with_ones(self.spec.inputs(self, x))

    def with_ones(self, rows: Tensor, value: float = 1.0) -> Tensor:
        """Append the bias column (filled with ``value``) when :attr:`has_bias`."""
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_full(rows.shape[:-1] + (1,), value)], dim=-1)

    def output_rows(self, grad_output: Tensor, batch_size: int) -> Tensor:
        """Gradient w.r.t. the module output → ``(N, T, d_out)`` (``(N, T, groups, d_out)``)."""
        return self.spec.output_grads(self, grad_output, batch_size)

    # ----------------------------------------------------------------- layout
    def gradient_matrix(
        self, weight_grad: Tensor | None, bias_grad: Tensor | None = None
    ) -> Tensor:
        """Lay a weight (and bias) gradient out as ``(groups, d_out, d_in')`` (module docstring).

        ``None`` gradients count as zeros. Dense and embedding families only.
        """
        if self.family == "elementwise":
            raise ValueError(
                f"Invalid kind: gradient_matrix needs a Kronecker layer, got {self.kind!r}"
            )
        if weight_grad is None:
            weight_grad = torch.zeros_like(self.weight)
        matrix = self.spec.weight_to_matrix(self, weight_grad)
        if self.has_bias:
            bias = torch.zeros_like(self.bias) if bias_grad is None else bias_grad
            matrix = torch.cat(
                [matrix, bias.reshape(self.groups, self.out_features, 1).to(matrix.dtype)], dim=-1
            )
        return matrix

    def split_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: ``(weight-shaped, bias-shaped or None)``.

        ``matrix`` may carry leading batch dims ``(..., groups, d_out, d_in')``.
        """
        if self.has_bias:
            weight_part = self.spec.matrix_to_weight(self, matrix[..., :-1])
            return weight_part, matrix[..., -1].reshape(matrix.shape[:-3] + self.bias.shape)
        return self.spec.matrix_to_weight(self, matrix), None


def _register_builtins() -> None:
    from secondorder.precond.capture_attention import AttentionKind
    from secondorder.precond.capture_kinds import (
        BatchNormKind,
        ConvKind,
        EmbeddingKind,
        LayerNormKind,
        LinearKind,
        RMSNormKind,
        TransposedLinearKind,
    )

    for kind in (
        AttentionKind(),
        TransposedLinearKind(),
        LinearKind(),
        ConvKind("conv2d", nn.Conv2d, 2),
        ConvKind("conv1d", nn.Conv1d, 1),
        EmbeddingKind(),
        LayerNormKind(),
        RMSNormKind(),
        BatchNormKind(),
    ):
        _BUILTIN[kind.name] = kind


_register_builtins()
