"""Layer capture: record each layer's input ``a`` and output gradient ``g`` during training.

One mechanism serves EK-FAC, AdaFisher, SINGD, exact Gauss-Newton's per-layer Gram matrices and
influence queries. It adds no forward or backward pass: it watches the user's own
``loss.backward()``.

Usage::

    capture = LayerCapture(model, optimizer_params, loss_reduction="mean")
    with capture.recording():            # or capture.enabled = True / False
        loss = loss_fn(model(x), y)
        loss.backward()
    stats = capture.pop()                # {CapturedLayer: LayerStats}, then cleared
    capture.remove()                     # detach the hooks

Mechanics
    A forward hook on each tracked module stores the (detached) input and registers a *tensor*
    hook on the module output; that tensor hook receives ``∂loss/∂output`` during backward.
    This is safe with in-place activations (``nn.ReLU(inplace=True)``): a tensor hook registered
    before the in-place op receives the gradient of the pre-activation value.
    ``register_full_backward_hook`` is never used (pytorch/pytorch#61519). Raw inputs are kept
    until :meth:`LayerCapture.pop`; unfolding (conv) and reshaping happen there, so the hooks
    cost a reference and nothing else. Nothing is recorded while recording is disabled, under
    ``torch.no_grad()``, inside ``torch.func`` transforms (``vmap``/``grad``), when the output
    does not require grad, or by a deep copy of the model (which carries the hooks along). A
    forward whose backward never came (an evaluation forward with grad enabled) is dropped at
    ``pop``.

Tracked layers (:mod:`secondorder.precond.capture_layers`)
    ``nn.Linear`` (any leading dims; tokens are positions), ``nn.Conv2d`` (unfold: stride,
    padding incl. ``'same'``/``'valid'``, dilation, groups; zero padding mode only),
    ``nn.Embedding`` (indices; the input factor is diagonal), and on request (``kinds=``)
    ``nn.LayerNorm`` / ``nn.BatchNorm{1,2,3}d`` with affine parameters. A module is tracked
    only if its ``weight`` is one of ``params`` (object identity, never position) and requires
    grad. Modules inside ``nn.MultiheadAttention`` are never tracked: it calls
    ``F.multi_head_attention_forward`` with its weights directly, so hooks on ``out_proj``
    would never fire; its parameters (and every other parameter outside tracked layers, see
    :meth:`LayerCapture.fallback_params`) are left to the optimizer's Adam-style diagonal
    fallback. A tracked module whose batch dim differs from the rest of its pass (a positional
    ``nn.Embedding`` called on ``arange(T)`` and broadcast) has no per-example gradients; it is
    left out of :meth:`LayerCapture.pop`'s result, so optimizers treat it like a fallback layer.

Layout of the results: :class:`LayerStats` (shapes per kind) and
:mod:`secondorder.precond.capture_layers` (the gradient-matrix convention
``(groups, d_out, d_in')``, bias as the last column, shared by every consumer).

Scaling and accumulation (``loss_reduction``)
    Let one *window* be everything recorded between two :meth:`~LayerCapture.pop` calls: any
    number of forward/backward passes (micro-batches of a gradient-accumulation step), with
    ``N_total`` examples in all (dim 0 of the layer input is the example dimension).

    * ``"mean"``: the gradient accumulated in ``.grad`` over the window is assumed to be the
      gradient of the mean loss over all ``N_total`` examples (the usual accumulation recipe:
      each micro-batch's mean loss scaled by ``N_i / N_total``, i.e. ``1/k`` for ``k`` equal
      micro-batches). Recorded output gradients are multiplied by ``N_total``.
    * ``"sum"``: the window's gradient is the sum of per-example losses; no rescaling.

    Either way ``sum_t g[n, t] a[n, t]ᵀ`` is the gradient of example ``n``'s own loss, and
    ``k`` micro-batches give exactly the statistics of one batch of ``N_total`` examples. With a
    different convention (e.g. micro-batch means summed without the ``1/k``) the statistics are
    off by a constant factor only.

    A module called several times in one forward pass (weight sharing) gets its calls
    concatenated along ``T`` (the per-example gradient sums over calls before squaring,
    reference/ekfac.md §3.4). Passes are told apart by a forward pre-hook on ``model``.
    Calls with different ``T`` across passes are zero-padded along ``T`` (embedding indices with
    ``-1``): zero rows add nothing to ``Σ g aᵀ`` or ``Σ a aᵀ``, and
    :attr:`LayerStats.num_positions` counts real positions only. Call ``model`` itself for each
    forward pass (calling only its submodules merges passes).

AMP: a ``GradScaler`` scales the recorded ``g`` by its loss scale; pass ``grad_scale=`` to
:meth:`LayerCapture.pop` when you know it (the optimizers instead detect an exact power-of-two
mismatch with ``.grad``, see :mod:`secondorder.optimizers.capturing`). Embedding positions
equal to ``padding_idx`` get ``g = 0`` (their row is never updated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secondorder.precond.capture_layers import KINDS, KRONECKER_KINDS, CapturedLayer, module_kind

__all__ = ["CapturedLayer", "LayerCapture", "LayerStats", "KINDS", "KRONECKER_KINDS"]


@dataclass
class LayerStats:
    """What one tracked layer saw during one window (module docstring, "Scaling").

    Attributes:
        inputs: ``a``. ``(N, T, d_in')`` for linear and conv2d with groups 1 (ones column last
            when the layer has a bias); ``(N, T, groups, d_in'/group)`` for grouped conv2d;
            long indices ``(N, T)`` for embedding; raw ``(N, T, C)`` inputs for norm layers.
        output_grads: ``g`` scaled to per-example losses: ``(N, T, d_out)``, or
            ``(N, T, groups, d_out/groups)`` for grouped conv2d. The gradient of example
            ``n``'s loss w.r.t. the gradient matrix is ``Σ_t g[n, t] a[n, t]ᵀ``.
        num_examples: ``N`` (all micro-batches of the window).
        num_positions: real ``(n, t)`` pairs (``N·T`` minus zero padding).
    """

    inputs: Tensor
    output_grads: Tensor
    num_examples: int
    num_positions: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.num_positions < 0:
            self.num_positions = int(self.inputs.shape[0] * self.inputs.shape[1])


@dataclass
class _Record:
    """One forward call of a tracked module: its raw input, the pass it belongs to, its grad."""

    x: Tensor
    pass_id: int
    grad: Tensor | None = None


class LayerCapture:
    """Record inputs and output gradients of supported layers (module docstring).

    Args:
        model: the module whose submodules are searched (hooks are registered at once).
        params: the parameters to track; a module is tracked iff its weight is one of them
            (identity) and requires grad (frozen weights are never captured; a trainable bias
            of a frozen layer is then a fallback parameter). ``None`` = ``model.parameters()``.
            A bias outside ``params`` is not modelled (no ones column).
        loss_reduction: ``"mean"`` or ``"sum"`` (module docstring).
        kinds: which layer kinds to track, a subset of :data:`KINDS`; default
            :data:`KRONECKER_KINDS` (linear, conv2d, embedding).

    Attributes:
        layers: the tracked :class:`CapturedLayer` objects, in ``model.named_modules()`` order.
        enabled: whether hooks record (default ``True``; see :meth:`recording`).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | None = None,
        *,
        loss_reduction: str = "mean",
        kinds: Iterable[str] = KRONECKER_KINDS,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"Invalid loss_reduction: {loss_reduction!r} (expected 'mean' or 'sum')"
            )
        self.loss_reduction = loss_reduction
        _make_compile_see_hooks()
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"Invalid kinds: {kind!r} (expected members of {KINDS})")
        param_ids = {id(p) for p in (model.parameters() if params is None else params)}
        inside_attention = {
            id(sub)
            for module in model.modules()
            if isinstance(module, nn.MultiheadAttention)
            for sub in module.modules()
        }
        self.layers: list[CapturedLayer] = []
        self._by_param: dict[int, CapturedLayer] = {}
        seen_weights: set[int] = set()
        for name, module in model.named_modules():
            kind = module_kind(module)
            if kind not in kinds or id(module) in inside_attention:
                continue
            weight = module.weight
            if (
                id(weight) not in param_ids
                or not weight.requires_grad
                or id(weight) in seen_weights
            ):
                continue  # frozen / not ours / a tied weight already owned by another module
            bias = getattr(module, "bias", None)
            bias = bias if isinstance(bias, Tensor) and id(bias) in param_ids else None
            layer = CapturedLayer(module=module, name=name, kind=kind, weight=weight, bias=bias)
            seen_weights.add(id(weight))
            self.layers.append(layer)
            self._by_param[id(weight)] = layer
            if bias is not None:
                self._by_param[id(bias)] = layer
        self.enabled = True
        self._model = model
        self._pass_id = 0
        self._records: dict[CapturedLayer, list[_Record]] = {layer: [] for layer in self.layers}
        self._handles = [model.register_forward_pre_hook(self._new_pass)]
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._make_hook(layer)))

    # ------------------------------------------------------------------ lookup
    def layer_for(self, param: Tensor) -> CapturedLayer | None:
        """The tracked layer owning ``param`` (weight or bias, by identity), else ``None``."""
        return self._by_param.get(id(param))

    def fallback_params(self, params: Iterable[Tensor]) -> list[Tensor]:
        """The members of ``params`` that belong to no tracked layer (they need a fallback)."""
        return [p for p in params if id(p) not in self._by_param]

    def swap_params(self, mapping: Mapping[int, Tensor]) -> None:
        """Replace tracked parameters: each ``p`` with ``id(p)`` in ``mapping`` by ``mapping[id(p)]``.

        Layers' ``weight`` / ``bias`` and the lookups (:meth:`layer_for`,
        :meth:`fallback_params`) follow; the reverse mapping undoes it. Used while an optimizer
        step works on full tensors in place of sharded DTensor parameters
        (:mod:`secondorder.distributed.full_view`).
        """
        for layer in self.layers:
            layer.weight = mapping.get(id(layer.weight), layer.weight)
            if layer.bias is not None:
                layer.bias = mapping.get(id(layer.bias), layer.bias)
        self._by_param = {
            (id(mapping[key]) if key in mapping else key): layer
            for key, layer in self._by_param.items()
        }

    # ------------------------------------------------------------------ control
    @contextlib.contextmanager
    def recording(self, enabled: bool = True) -> Iterator[LayerCapture]:
        """Context manager: set :attr:`enabled` inside the block, restore it afterwards."""
        previous, self.enabled = self.enabled, bool(enabled)
        try:
            yield self
        finally:
            self.enabled = previous

    def clear(self) -> None:
        """Drop everything recorded since the last :meth:`pop`."""
        for records in self._records.values():
            records.clear()

    def remove(self) -> None:
        """Detach every hook and drop recorded data (the capture is then inert)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def has_records(self) -> bool:
        """Whether any layer has a completed (forward + backward) record in the window."""
        return any(r.grad is not None for records in self._records.values() for r in records)

    # ------------------------------------------------------------------ hooks
    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        if module is self._model:  # a deep copy of the model carries this hook too: ignore it
            self._pass_id += 1

    def _make_hook(self, layer: CapturedLayer):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if (
                module is not layer.module
                or not self.enabled
                or not torch.is_grad_enabled()
                or not args
            ):
                return  # (a deep copy of the model carries this hook too: ignore its calls)
            if (
                not isinstance(output, Tensor)
                or not output.requires_grad
                or _inside_transform(args[0])
            ):
                return
            record = _Record(x=args[0].detach(), pass_id=self._pass_id)
            self._records[layer].append(record)

            def tensor_hook(grad: Tensor) -> None:
                grad = grad.detach()
                record.grad = grad if record.grad is None else record.grad + grad

            output.register_hook(tensor_hook)

        return forward_hook

    # ------------------------------------------------------------------ results
    def pop(self, *, grad_scale: float = 1.0) -> dict[CapturedLayer, LayerStats]:
        """Return the window's statistics per layer and clear them.

        Args:
            grad_scale: divide recorded gradients by this (a ``GradScaler``'s scale).

        Returns:
            ``{layer: LayerStats}`` for every layer with at least one completed record; layers
            without one are absent, and so are layers whose batch dim differs from the rest of
            the pass (a module applied to a shared input and broadcast, e.g. a positional
            ``nn.Embedding`` called on ``arange(T)``): their output gradient sums over examples
            and carries no per-example information, so optimizers give their parameters the
            fallback. Tensors are in the dtype the model produced.
        """
        grouped: dict[CapturedLayer, list[tuple[Tensor, Tensor]]] = {}
        pass_sizes: dict[int, int] = {}  # examples per pass: the largest batch dim seen in it
        for layer, records in self._records.items():
            by_pass: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for record in records:
                if record.grad is None:
                    continue
                rows = layer.layer_inputs(record.x)
                grads = layer.output_rows(record.grad, rows.shape[0])
                by_pass.setdefault(record.pass_id, []).append((rows, grads))
            records.clear()
            merged = []
            for pass_id, calls in by_pass.items():
                if len({c[0].shape[0] for c in calls}) > 1:
                    merged = None  # calls with different batch sizes in one pass: not per-example
                    break
                rows = torch.cat([c[0] for c in calls], dim=1) if len(calls) > 1 else calls[0][0]
                grads = torch.cat([c[1] for c in calls], dim=1) if len(calls) > 1 else calls[0][1]
                merged.append((pass_id, rows, grads))
                pass_sizes[pass_id] = max(pass_sizes.get(pass_id, 0), rows.shape[0])
            if merged:
                grouped[layer] = merged
        total = sum(pass_sizes.values())
        result: dict[CapturedLayer, LayerStats] = {}
        for layer, merged in grouped.items():
            if any(rows.shape[0] != pass_sizes[pass_id] for pass_id, rows, _ in merged):
                continue  # broadcast use (positional embedding on arange(T)): not per-example
            rows, grads, real = _stack_passes([(r, g) for _, r, g in merged])
            num_examples = rows.shape[0]
            scale = (total if self.loss_reduction == "mean" else 1) / grad_scale
            if scale != 1:
                grads = grads * scale
            if layer.kind == "embedding" and layer.module.padding_idx is not None:
                grads = grads * (rows != layer.module.padding_idx).unsqueeze(-1).to(grads.dtype)
            result[layer] = LayerStats(
                inputs=rows, output_grads=grads, num_examples=num_examples, num_positions=real
            )
        return result


def _inside_transform(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` (vmap/grad) wrapper: such calls are not recorded."""
    return isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)


def _stack_passes(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, int]:
    """Concatenate passes along the example dim, zero-padding ``T`` where it differs.

    Returns ``(inputs, output_grads, number of real positions)``.
    """
    real = sum(rows.shape[0] * rows.shape[1] for rows, _ in parts)
    if len(parts) == 1:
        return parts[0][0], parts[0][1], real
    longest = max(rows.shape[1] for rows, _ in parts)
    padded_rows, padded_grads = [], []
    for rows, grads in parts:
        missing = longest - rows.shape[1]
        if missing:
            filler = -1 if not rows.is_floating_point() else 0  # embedding indices pad with -1
            rows = torch.cat(
                [rows, rows.new_full((rows.shape[0], missing) + rows.shape[2:], filler)], dim=1
            )
            grads = torch.cat(
                [grads, grads.new_zeros((grads.shape[0], missing) + grads.shape[2:])], dim=1
            )
        padded_rows.append(rows)
        padded_grads.append(grads)
    return torch.cat(padded_rows, dim=0), torch.cat(padded_grads, dim=0), real


def _make_compile_see_hooks() -> None:
    """Make ``torch.compile`` guard on module hooks, so it never runs a graph without ours.

    By default Dynamo skips guards on ``nn.Module`` hooks (``skip_nnmodule_hook_guards``): a
    graph compiled for a model without capture hooks (or for another instance of the same
    architecture) is then reused for a hooked model, and no statistics are ever recorded —
    a capture-based optimizer would silently degrade to its diagonal fallback. With the guard,
    adding or removing our hooks triggers a recompile instead. Graphs compiled before the
    guard existed carry no hook guards, so Dynamo's cache is reset once, when the guard is
    first switched on (those graphs recompile on their next call).
    """
    try:
        import torch._dynamo
        import torch._dynamo.config as dynamo_config
    except ImportError:  # a torch without Dynamo: nothing to guard
        return
    if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        dynamo_config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
