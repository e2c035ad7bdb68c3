"""Output Jacobians of a network: Gram matrices ``J Jᵀ`` layer by layer, and explicit paths.

``J ∈ ℝ^{bc×p}`` is the Jacobian of a batch's flattened outputs ``f ∈ ℝ^{b×c}`` with respect to
the parameters, rows example-major (row ``n·c + k`` is output ``k`` of example ``n``).

Three ways to get at it:

* **Gram identity from captured layers** (:func:`capture_output_rows`, :func:`layer_gram`,
  :func:`layer_jacobian_rows`): for a layer with inputs ``a`` and output gradients ``g``
  (recorded by :class:`~secondorder.precond.capture.LayerCapture` while the cotangent
  ``e_k`` flows back from the outputs), the row of ``J`` for output ``(n, k)`` restricted to the
  layer's weight matrix is ``Σ_t g_{n,t} a_{n,t}ᵀ``. Hence (empirical-NTK / Gram-Gauss-Newton
  trick, reference/gauss_newton.md §5)

      K_layer[(n,k),(m,l)] = Σ_{t,s} (a_{n,t}·a_{m,s}) (g^k_{n,t}·g^l_{m,s}),

  i.e. ``(A Aᵀ) ⊙ (G Gᵀ)`` for ``T = 1``. The full Jacobian is never formed; memory is
  ``O((bc)² + activations)``. Layers with many positions (convolutions) use whichever of the
  position-pair Gram and the per-row layer Jacobian needs less memory.
* **Autograd on the caller's graph** (:func:`output_jacobian`): ``bc`` vector-Jacobian products
  vectorised with ``is_grads_batched``; exact for any layer (batch-coupled ones included), memory
  ``O(bc·p)``. Used for parameters outside captured layers and for the parameter-space solve.
* **torch.func** (:func:`per_sample_jacobian`): ``functional_call`` + ``vmap(jacrev)`` over
  examples, the test oracle and a path for users who hold the inputs.

``Jᵀu`` is one backward pass (:func:`jacobian_transpose_product`); ``Jv`` the double-backward
trick (:func:`jacobian_product`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from secondorder.precond.capture import CapturedLayer, LayerCapture, LayerStats

__all__ = [
    "per_sample_jacobian",
    "output_jacobian",
    "jacobian_transpose_product",
    "jacobian_product",
    "capture_output_rows",
    "layer_gram",
    "layer_jacobian_rows",
    "example_major_permutation",
]


def per_sample_jacobian(
    model: nn.Module,
    inputs: Tensor,
    params: Sequence[Tensor] | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example output Jacobians by ``torch.func`` (``functional_call`` + ``vmap(jacrev)``).

    Args:
        model: maps a batch ``(1, ...)`` to outputs ``(1, ...)`` (examples must not interact:
            BatchNorm in eval mode).
        inputs: ``(b, ...)``.
        params: parameters of ``model`` (identity-matched) giving the column order, each
            flattened row-major; default every parameter with ``requires_grad``.
        chunk_size: examples per ``vmap`` chunk (bounds memory).

    Returns:
        ``(b, c, p)`` with ``c`` the flattened output size of one example.
    """
    named = dict(model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
    else:
        missing = [p for p in params if id(p) not in by_id]
        if missing:
            raise ValueError("Invalid params: some tensors are not parameters of model")
        names = [by_id[id(p)] for p in params]
    chosen = {name: named[name].detach() for name in names}
    frozen = {name: p.detach() for name, p in named.items() if name not in chosen}
    frozen.update(dict(model.named_buffers()))

    def single(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**frozen, **values}, (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(single), in_dims=(None, 0), chunk_size=chunk_size)(chosen, inputs)
    b = inputs.shape[0]
    c = jac[names[0]].shape[1] if names else 0
    return torch.cat([jac[name].reshape(b, c, -1) for name in names], dim=2)


def output_jacobian(
    outputs: Tensor, params: Sequence[Tensor], *, chunk_size: int | None = None
) -> Tensor:
    """``J`` of ``outputs`` w.r.t. ``params`` by batched vector-Jacobian products.

    The graph behind ``outputs`` must carry no :class:`LayerCapture` tensor hooks (build it with
    recording disabled): the hooks cannot run under the batching of ``is_grads_batched``. The
    graph is retained.

    Args:
        outputs: ``(b, ...)`` attached to the graph of ``params``.
        params: ``k`` tensors; columns follow their order, each flattened row-major.
        chunk_size: rows of ``J`` per batched backward (default all ``bc`` at once).

    Returns:
        ``(bc, p)`` example-major; zero columns for parameters ``outputs`` does not depend on.
    """
    rows = outputs.numel()
    chunk = rows if chunk_size is None else max(1, int(chunk_size))
    identity = torch.eye(rows, dtype=outputs.dtype, device=outputs.device)
    blocks = []
    for start in range(0, rows, chunk):
        cotangents = identity[start : start + chunk].reshape(-1, *outputs.shape)
        grads = torch.autograd.grad(
            outputs,
            list(params),
            cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        count = cotangents.shape[0]
        blocks.append(
            torch.cat(
                [
                    (
                        g
                        if g is not None
                        else torch.zeros((count,) + p.shape, dtype=outputs.dtype, device=p.device)
                    )
                    .reshape(count, -1)
                    .to(outputs.dtype)
                    for g, p in zip(grads, params, strict=True)
                ],
                dim=1,
            )
        )
    return torch.cat(blocks, dim=0)


def jacobian_transpose_product(
    outputs: Tensor, params: Sequence[Tensor], cotangent: Tensor, *, retain_graph: bool = True
) -> list[Tensor]:
    """``Jᵀu`` (one backward pass); zeros for parameters ``outputs`` does not depend on.

    Args:
        outputs: ``(b, ...)`` attached to the graph of ``params``.
        cotangent: ``u``, any shape with ``outputs.numel()`` entries (e.g. ``(b, c)``).

    Returns:
        One tensor per parameter, shaped like it.
    """
    grads = torch.autograd.grad(
        outputs,
        list(params),
        cotangent.reshape(outputs.shape).to(outputs.dtype),
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def jacobian_product(outputs: Tensor, params: Sequence[Tensor], vector: Sequence[Tensor]) -> Tensor:
    """``Jv`` by the double-backward trick ``Jv = ∂/∂u ⟨Jᵀu, v⟩`` (graph retained).

    Args:
        outputs: ``(b, ...)`` attached to the graph of ``params``.
        vector: one tensor per parameter, shaped like it.

    Returns:
        ``(b, c)`` (outputs flattened per example).
    """
    with torch.enable_grad():
        dummy = torch.zeros_like(outputs, requires_grad=True)
        grads = torch.autograd.grad(
            outputs, list(params), dummy, create_graph=True, retain_graph=True, allow_unused=True
        )
        pairs = [
            (g, v) for g, v in zip(grads, vector, strict=True) if g is not None and g.requires_grad
        ]
        if not pairs:
            return outputs.new_zeros(outputs.shape[0], outputs[0].numel())
        inner = sum((g * v.to(g.dtype)).sum() for g, v in pairs)
        (product,) = torch.autograd.grad(inner, dummy, retain_graph=True, allow_unused=True)
    if product is None:
        return outputs.new_zeros(outputs.shape[0], outputs[0].numel())
    return product.detach().reshape(outputs.shape[0], -1)


def capture_output_rows(
    capture: LayerCapture,
    forward: Callable[[], Tensor],
    num_outputs: int,
    *,
    first_outputs: Tensor | None = None,
) -> dict[CapturedLayer, LayerStats]:
    """Record, for each output coordinate ``k``, every tracked layer's ``a`` and ``g``.

    Runs ``c`` backward passes with the one-hot cotangent ``e_k`` on all examples. Each pass
    needs its own recorded forward (the capture adds up the gradients of repeated backward
    passes through one forward), so ``forward`` is called ``c`` times, or ``c − 1`` times when
    ``first_outputs`` (a forward already recorded by ``capture``) is given; its graph is
    retained for later products.

    Args:
        capture: built with ``loss_reduction="sum"``.
        forward: runs the model on the batch and returns its outputs ``(b, ...)``.
        num_outputs: ``c``, outputs per example.

    Returns:
        ``{layer: LayerStats}`` whose rows are *Jacobian rows*: row ``k·b + n`` belongs to
        output ``k`` of example ``n`` (pass-major). Layers some pass never reached are absent
        or have fewer than ``c·b`` rows; the caller treats them separately.
    """
    if capture.loss_reduction != "sum":
        raise ValueError("Invalid capture: exact Gauss-Newton needs loss_reduction='sum'")
    weights = [layer.weight for layer in capture.layers]
    with capture.recording(True):
        for k in range(num_outputs):
            with torch.enable_grad():
                outputs = first_outputs if (k == 0 and first_outputs is not None) else forward()
                flat = outputs.reshape(outputs.shape[0], -1)
                cotangent = torch.zeros_like(flat)
                cotangent[:, k] = 1
                torch.autograd.grad(
                    outputs,
                    weights,
                    cotangent.reshape(outputs.shape),
                    retain_graph=outputs is first_outputs,
                    allow_unused=True,
                )
    return capture.pop()


def _grouped(stats: LayerStats) -> tuple[Tensor, Tensor]:
    """``(inputs (R, T, G, d_in'), output_grads (R, T, G, d_out))`` for linear / conv2d stats."""
    inputs, grads = stats.inputs, stats.output_grads
    if inputs.dim() == 3:
        inputs, grads = inputs.unsqueeze(2), grads.unsqueeze(2)
    return inputs, grads.to(inputs.dtype)


def _embedding_rows(layer: CapturedLayer, stats: LayerStats) -> Tensor:
    """Per-row embedding Jacobians ``(R, V, D)`` (scatter of ``g`` into the used rows)."""
    indices, grads = stats.inputs, stats.output_grads
    rows, positions = indices.shape
    vocab, width = layer.weight.shape
    result = grads.new_zeros(rows * vocab, width)
    valid = indices >= 0
    flat_index = (
        torch.arange(rows, device=indices.device).unsqueeze(1) * vocab + indices.clamp(min=0)
    )[valid]
    result.index_add_(0, flat_index, grads[valid])
    return result.reshape(rows, vocab, width)


def layer_jacobian_rows(layer: CapturedLayer, stats: LayerStats) -> list[Tensor]:
    """The layer's block of ``J`` per row: ``[weight (R, *weight.shape), bias (R, *bias.shape)]``.

    The bias entry is present only when ``layer.has_bias``. Memory ``O(R · p_layer)``.
    """
    if layer.family == "embedding":
        return [_embedding_rows(layer, stats)]
    if layer.family != "dense":
        raise ValueError(f"Invalid layer: kind {layer.kind!r} has no Gram identity")
    inputs, grads = _grouped(stats)
    matrix = torch.einsum("rtgo,rtgi->rgoi", grads, inputs)  # (R, G, d_out, d_in')
    weight, bias = layer.split_matrix(matrix)
    return [weight] if bias is None else [weight, bias]


def layer_gram(layer: CapturedLayer, stats: LayerStats, *, strategy: str = "auto") -> Tensor:
    """``K_layer = J_layer J_layerᵀ`` over the stats' rows, ``(R, R)``, without forming ``J``.

    Linear layers without extra positions (``T = 1``) use ``(A Aᵀ) ⊙ (G Gᵀ)``. With ``T > 1``
    positions (conv2d, sequences, embeddings) the position-pair Gram ``Σ_{t,s}`` needs
    ``O(R² T²)`` memory and the per-row layer Jacobian ``O(R · p_layer)``; ``strategy="auto"``
    takes the smaller, ``"pairs"`` / ``"rows"`` force one (tests).
    """
    if strategy not in ("auto", "pairs", "rows"):
        raise ValueError(f"Invalid strategy: {strategy!r} (expected 'auto', 'pairs' or 'rows')")
    if layer.family == "embedding":
        indices, grads = stats.inputs, stats.output_grads
        rows, positions = indices.shape
        pairs = (
            rows * positions * positions <= layer.weight.numel()
            if strategy == "auto"
            else strategy == "pairs"
        )
        if pairs:
            same = (indices.unsqueeze(-1).unsqueeze(-1) == indices) & (indices >= 0).unsqueeze(
                -1
            ).unsqueeze(-1)
            products = torch.einsum("rtd,qsd->rtqs", grads, grads)
            return (products * same.to(products.dtype)).sum(dim=(1, 3))
        block = _embedding_rows(layer, stats).reshape(rows, -1)
        return block @ block.transpose(0, 1)
    inputs, grads = _grouped(stats)
    rows, positions, groups = inputs.shape[:3]
    layer_size = layer.weight.numel() + (layer.bias.numel() if layer.has_bias else 0)
    pairs = (
        rows * positions * positions <= layer_size if strategy == "auto" else strategy == "pairs"
    )
    if positions == 1 and strategy != "rows":
        input_gram = torch.einsum("rgi,qgi->grq", inputs[:, 0], inputs[:, 0])
        grad_gram = torch.einsum("rgo,qgo->grq", grads[:, 0], grads[:, 0])
        return (input_gram * grad_gram).sum(dim=0)
    if pairs:
        total = inputs.new_zeros(rows, rows)
        for group in range(groups):
            input_gram = torch.einsum("rti,qsi->rqts", inputs[:, :, group], inputs[:, :, group])
            grad_gram = torch.einsum("rto,qso->rqts", grads[:, :, group], grads[:, :, group])
            total = total + (input_gram * grad_gram).sum(dim=(2, 3))
        return total
    blocks = torch.cat(
        [part.reshape(rows, -1) for part in layer_jacobian_rows(layer, stats)], dim=1
    )
    return blocks @ blocks.transpose(0, 1)


def example_major_permutation(
    batch_size: int, num_outputs: int, device: torch.device | None = None
) -> Tensor:
    """Indices that reorder pass-major rows ``k·b + n`` into example-major rows ``n·c + k``.

    ``example_major = pass_major[perm]`` for a ``(bc, ...)`` tensor; ``(bc,)`` long.
    """
    n = torch.arange(batch_size, device=device).unsqueeze(1)
    k = torch.arange(num_outputs, device=device).unsqueeze(0)
    return (k * batch_size + n).reshape(-1)
