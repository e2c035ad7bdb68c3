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
    capture.describe()                   # per parameter: tracked as which kind, or why not
    capture.remove()                     # detach the hooks

Mechanics
    A forward hook on each tracked module stores the (detached) input and registers a *tensor*
    hook on the module output; that tensor hook receives ``∂loss/∂output`` during backward.
    This is safe with in-place activations (``nn.ReLU(inplace=True)``): a tensor hook registered
    before the in-place op receives the gradient of the pre-activation value.
    ``register_full_backward_hook`` is never used (pytorch/pytorch#61519). Raw inputs are kept
    until :meth:`LayerCapture.pop`; unfolding (conv), reshaping and the attention
    recomputation (:mod:`secondorder.precond.capture_attention`) happen there, so the hooks
    cost a reference and nothing else. Nothing is recorded while recording is disabled, under
    ``torch.no_grad()``, inside ``torch.func`` transforms (``vmap``/``grad``), when the output
    does not require grad, or by a copy of the model: the hooks are small picklable objects
    whose reference to the capture is dropped when they are deep-copied or pickled (with the
    model or an optimizer holding it), so a copy carries inert hooks. A forward whose backward
    never came (an evaluation forward with grad enabled) is dropped at ``pop``.

Tracked layers (:mod:`secondorder.precond.capture_layers`, a registry users can extend)
    Dense kinds ``linear``, ``conv2d``, ``conv1d`` (grouped and depthwise too),
    ``transposed_linear`` (GPT-2's ``Conv1D``), ``attention`` (``nn.MultiheadAttention``'s
    projections), ``embedding``, and the elementwise kinds ``layernorm``, ``batchnorm``,
    ``rmsnorm``. ``kinds=`` chooses which. A weight is tracked only if it is one of ``params``
    (object identity, never position) and requires grad. Everything else (see
    :meth:`LayerCapture.describe`, :meth:`LayerCapture.fallback_params`) is left to the
    optimizer's Adam-style diagonal fallback. A tracked module whose batch dim differs from
    the rest of its pass (a positional ``nn.Embedding`` called on ``arange(T)`` and broadcast)
    has no per-example gradients; it is left out of :meth:`LayerCapture.pop`'s result, so
    optimizers treat it like a fallback layer.

Tied weights (one parameter applied by several modules)
    The weight gets one :class:`CapturedLayer` (owned by its first dense use, else its first
    use) and the calls of every use are concatenated along ``T``, as for a module called
    twice: ``Σ_t g aᵀ`` is then the gradient of each example's loss w.r.t. the shared
    parameter, summed over uses (exact), and Kronecker factors average over the positions of
    all uses (the "expand" approximation of weight sharing, reference/ekfac.md §3.4). An
    ``nn.Embedding`` sharing its ``(V, D)`` weight with an ``nn.Linear`` head (GPT-2, Llama)
    is written in the head's layout: its gradient ``Σ_t onehot(i_t) g_tᵀ`` is a dense row pair
    with ``a = g_t`` (length ``D``) and ``g = onehot(i_t)`` (length ``V``, formed densely) and
    ``0`` in a bias column. A use that cannot be written in the owner's layout is not
    modelled, with one ``UserWarning`` naming the parameter; :meth:`LayerCapture.describe`
    lists every use.

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


Precision: recorded gradients are scaled (by ``N_total`` for a mean loss, by ``1/grad_scale``)
in float32 when the model produced float16/bfloat16 (scaling in half precision overflows), and
:meth:`LayerCapture.pop` returns float32 rows for half-precision inputs.

AMP: a ``GradScaler`` scales the recorded ``g`` by its loss scale; pass ``grad_scale=`` to
:meth:`LayerCapture.pop` when you know it (the optimizers instead detect an exact power-of-two
mismatch with ``.grad``, see :mod:`secondorder.optimizers.capturing`). Embedding positions
equal to ``padding_idx`` get ``g = 0`` (their row is never updated).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secondorder.precond.capture_layers import (
    DENSE_KINDS,
    KINDS,
    KRONECKER_KINDS,
    NORM_KINDS,
    CapturedLayer,
    LayerKind,
    module_kind,
    register_layer_kind,
    registered_kinds,
)
from secondorder.precond.capture_plan import CapturePlan, TiedUse

__all__ = [
    "CapturedLayer",
    "LayerCapture",
    "LayerKind",
    "LayerStats",
    "KINDS",
    "DENSE_KINDS",
    "KRONECKER_KINDS",
    "NORM_KINDS",
    "loss_average_scale",
    "module_kind",
    "register_layer_kind",
]

_HALF = (torch.float16, torch.bfloat16)


def loss_average_scale(loss_average: str | None, num_examples: int, num_positions: int) -> float:
    """``c`` with ``c · Σ_rows g gᵀ`` the output-side Gauss-Newton factor of the loss as reduced.

    ``g`` are :class:`LayerStats` rows (per-example scaling), ``num_positions = N·T``:
    ``"batch"`` (a mean over the ``N`` examples, each summed over its positions) ``1/N``;
    ``"batch+sequence"`` (a mean over the ``N·T`` positions: each position's own loss
    gradient is ``T·g``) ``N·T/N²``; ``None`` (a sum) 1. SINGD's ``G`` (singd 0.0.5's
    scaling) and AdaFisher's loss-scale Fisher both use it.
    """
    if loss_average == "batch":
        return 1.0 / num_examples
    if loss_average == "batch+sequence":
        return num_positions / num_examples**2
    if loss_average is None:
        return 1.0
    raise ValueError(f"Invalid loss_average: {loss_average!r}")


@dataclass
class LayerStats:
    """What one tracked layer saw during one window (module docstring, "Scaling").

    Attributes:
        inputs: ``a``. ``(N, T, d_in')`` for dense kinds with one group (ones column last when
            the layer has a bias); ``(N, T, groups, d_in')`` for grouped ones (grouped
            convolutions, packed attention ``in_proj``); long indices ``(N, T)`` for
            embedding; raw ``(N, T, C)`` inputs for norm layers. Float32 for half inputs.
        output_grads: ``g`` scaled to per-example losses: ``(N, T, d_out)``, or
            ``(N, T, groups, d_out)`` for grouped layers. The gradient of example
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
    """One forward call of a hooked module: what its kind kept, the pass, the gradients."""

    payload: object
    pass_id: int
    grads: list
    cache: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return any(g is not None for g in self.grads)


class _PassHook:
    """Forward pre-hook on the model: counts passes. Inert once copied or unpickled."""

    def __init__(self, capture: LayerCapture) -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple) -> None:
        capture = self.capture
        if capture is not None and module is capture._model:
            capture._pass_id += 1

    def __getstate__(self) -> dict:
        return {"capture": None}


class _CallHook:
    """Forward hook (and pre-hook, for kinds needing the random state) on one hooked module.

    Holds the capture by reference; deep copies and unpickled copies drop it (inert).
    """

    def __init__(self, capture: LayerCapture, module: nn.Module, kind: LayerKind) -> None:
        self.capture, self.module, self.kind = capture, module, kind
        self.random_state = None

    def __getstate__(self) -> dict:
        return {"capture": None, "module": None, "kind": None, "random_state": None}

    def _active(self, module: nn.Module, args: tuple) -> bool:
        capture = self.capture
        return (
            capture is not None
            and module is self.module
            and capture.enabled
            and torch.is_grad_enabled()
            and not any(_inside_transform(x) for x in args[:1])
        )

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active(module, args):
            self.random_state = self.kind.random_state(module, args, kwargs)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self._active(module, args):
            return
        random_state, self.random_state = self.random_state, None
        recorded = self.kind.record(module, args, kwargs, output, random_state)
        if recorded is None:
            return
        payload, tensors = recorded
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            return
        if not tensors[0].requires_grad or _inside_transform(tensors[0]):
            return
        if isinstance(payload, Tensor):
            payload = payload.detach()
        record = _Record(payload=payload, pass_id=self.capture._pass_id, grads=[None] * len(tensors))
        for target in self.capture._targets[id(module)]:
            target.append(record)
        for index, tensor in enumerate(tensors):
            if tensor.requires_grad:
                tensor.register_hook(_gradient_sink(record, index))


def _gradient_sink(record: _Record, index: int):
    def tensor_hook(grad: Tensor) -> None:
        grad = grad.detach()
        previous = record.grads[index]
        record.grads[index] = grad if previous is None else previous + grad

    return tensor_hook


class LayerCapture:
    """Record inputs and output gradients of supported layers (module docstring).

    Args:
        model: the module whose submodules are searched (hooks are registered at once).
        params: the parameters to track; a weight is tracked iff it is one of them
            (identity) and requires grad (frozen weights are never captured; a trainable bias
            of a frozen layer is then a fallback parameter). ``None`` = ``model.parameters()``.
            A bias outside ``params`` is not modelled (no ones column).
        loss_reduction: ``"mean"`` or ``"sum"`` (module docstring).
        kinds: which layer kinds to track, registered kind names
            (:func:`~secondorder.precond.capture_layers.registered_kinds`); default
            :data:`KRONECKER_KINDS` (dense kinds and embedding).
        transposed_ties: model the input-embedding use of a weight tied to a linear head in
            the head's statistics (``True``, default). ``False`` keeps the head's own use only
            (a warning names the weight); ``"fallback"`` tracks neither use, so the optimizer's
            diagonal fallback trains that weight (SINGD: its inverse-free updates diverge on the
            embedding use's one-hot rows, and the head's factors measured worse than the
            fallback for the embedding's gradient rows).

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
        transposed_ties: bool | str = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"Invalid loss_reduction: {loss_reduction!r} (expected 'mean' or 'sum')"
            )
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in registered_kinds():
                raise ValueError(
                    f"Invalid kinds: {kind!r} (expected members of {registered_kinds()})"
                )
        self.loss_reduction = loss_reduction
        _make_compile_see_hooks()
        plan = CapturePlan(model, list(model.parameters()) if params is None else params, kinds,
                           transposed_ties=transposed_ties)
        for message in plan.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        self._plan = plan
        self.layers: list[CapturedLayer] = plan.layers
        self._by_param: dict[int, CapturedLayer] = plan.by_param
        self.enabled = True
        self._model = model
        self._pass_id = 0
        self._shared_input: set[CapturedLayer] = set()  # seen without per-example rows
        # per layer: (use, record) pairs; per hooked module: the lists its calls go to
        self._records: dict[CapturedLayer, list[tuple[TiedUse, _Record]]] = {
            layer: [] for layer in self.layers
        }
        self._targets: dict[int, list] = {}
        self._handles = [model.register_forward_pre_hook(_PassHook(self))]
        hooked: dict[int, _CallHook] = {}
        for layer in self.layers:
            for use in plan.uses[layer]:
                module = use.layer.module
                if id(module) not in hooked:
                    hook = _CallHook(self, module, use.layer.spec)
                    hooked[id(module)] = hook
                    self._targets[id(module)] = []
                    if use.layer.spec.needs_random_state:
                        self._handles.append(
                            module.register_forward_pre_hook(hook.before, with_kwargs=True)
                        )
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
                self._targets[id(module)].append(_UseList(self._records[layer], use))

    # ------------------------------------------------------------------ lookup
    def layer_for(self, param: Tensor) -> CapturedLayer | None:
        """The tracked layer owning ``param`` (weight or bias, by identity), else ``None``."""
        return self._by_param.get(id(param))

    def fallback_params(self, params: Iterable[Tensor]) -> list[Tensor]:
        """The members of ``params`` that belong to no tracked layer (they need a fallback)."""
        return [p for p in params if id(p) not in self._by_param]

    def describe(self) -> dict[str, dict]:
        """Per parameter of the model (by its first qualified name), how it is handled.

        Returns:
            ``{name: {"status": "tracked" | "fallback", "kind": kind or None, "layer": the
            tracked layer's name or None, "role": "weight" | "bias" | None, "reason": why
            (for fallback parameters and tied weights), "aliases": other names of the same
            tensor}}`` in ``model.named_parameters()`` order. A layer seen at :meth:`pop`
            without per-example rows (a positional embedding broadcast over the batch) is
            reported as fallback from then on (the optimizers give it the fallback too).
        """
        return self._plan.describe(self._by_param, self._shared_input)

    def untracked_matrices(self, params: Iterable[Tensor] | None = None) -> list[tuple[str, str]]:
        """``[(name, reason)]`` for weight matrices (2-D to 5-D parameters among ``params``,
        default all of the model's) that fall back although Kronecker methods handle such
        tensors; what an optimizer warns about once."""
        wanted = None if params is None else {id(p) for p in params}
        return self._plan.untracked_matrices(self._by_param, wanted, self._shared_input)

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
        return any(record.complete for records in self._records.values() for _, record in records)

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
            fallback. Tensors are in the dtype the model produced, float32 for half types.
        """
        grouped: dict[CapturedLayer, list] = {}
        pass_sizes: dict[int, int] = {}  # examples per pass: the largest batch dim seen in it
        for layer, records in self._records.items():
            by_pass: dict[int, list[tuple[Tensor, Tensor, bool]]] = {}
            for use, record in records:
                if record.complete:
                    by_pass.setdefault(record.pass_id, []).append(use.rows(layer, record))
            records.clear()
            merged = []
            for pass_id, calls in by_pass.items():
                if len({c[0].shape[0] for c in calls}) > 1:
                    merged = None  # calls with different batch sizes in one pass: not per-example
                    break
                merged.append((pass_id, calls))
                pass_sizes[pass_id] = max(pass_sizes.get(pass_id, 0), calls[0][0].shape[0])
            if merged:
                grouped[layer] = merged
            elif merged is None:
                self._shared_input.add(layer)
        total = sum(pass_sizes.values())
        scale = (total if self.loss_reduction == "mean" else 1) / grad_scale
        result: dict[CapturedLayer, LayerStats] = {}
        for layer, merged in grouped.items():
            if any(calls[0][0].shape[0] != pass_sizes[pass_id] for pass_id, calls in merged):
                self._shared_input.add(layer)
                continue  # broadcast use (positional embedding on arange(T)): not per-example
            parts = []
            for _, calls in merged:
                scaled = [_scaled(a, g, scale, scale_inputs) for a, g, scale_inputs in calls]
                parts.append(
                    (torch.cat([c[0] for c in scaled], 1), torch.cat([c[1] for c in scaled], 1))
                    if len(scaled) > 1
                    else scaled[0]
                )
            rows, grads, real = _stack_passes(parts)
            result[layer] = LayerStats(
                inputs=rows, output_grads=grads, num_examples=rows.shape[0], num_positions=real
            )
        return result


class _UseList:
    """Where one hooked module's calls go for one layer: that layer's records, tagged by use."""

    def __init__(self, records: list, use: TiedUse) -> None:
        self.records, self.use = records, use

    def append(self, record: _Record) -> None:
        self.records.append((self.use, record))


def _scaled(a: Tensor, g: Tensor, scale: float, scale_inputs: bool) -> tuple[Tensor, Tensor]:
    """Apply the per-example scale (to ``g``, or to ``a`` for a transposed tied use) in at
    least float32 for half tensors; half rows come back as float32."""
    if a.is_floating_point() and a.dtype in _HALF:
        a = a.float()
    if g.dtype in _HALF:
        g = g.float()
    if scale != 1:
        if scale_inputs:
            a = a * scale
        else:
            g = g * scale
    return a, g


def _inside_transform(x) -> bool:
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
