"""``nn.MultiheadAttention`` in the layer capture: ``a`` and ``g`` of each projection.

``nn.MultiheadAttention`` applies its weights inside ``F.multi_head_attention_forward``: no
submodule is called (hooks on ``out_proj`` never fire) and the projected ``q, k, v`` are never
visible. The capture therefore hooks the attention module itself and keeps, per call, its
inputs ``query, key, value``, its keyword arguments (masks, ``need_weights``…) and, when
dropout is active, the random-number state before the call. Only at
:meth:`~secondorder.precond.capture.LayerCapture.pop` (statistics steps, after the user's
backward) are the projections recomputed from those inputs with the module's current weights:

* ``q = query W_qᵀ + b_q`` (likewise ``k``, ``v``) as leaves that require grad;
* the attention core is replayed by ``F.multi_head_attention_forward`` itself, with identity
  projection matrices and no biases (multiplying by ``I`` is exact), the same masks, flags and
  random state, so dropout draws the same mask: this gives the head outputs ``o`` (the input of
  ``out_proj``) exactly as in the user's forward;
* one ``torch.autograd.grad`` of ``o`` (and of the returned attention weights, when the loss
  used them) with cotangent ``g_out W_out`` (``g_out`` = ``∂loss/∂output``, received by a tensor
  hook during the user's backward) gives ``∂loss/∂q``, ``∂loss/∂k``, ``∂loss/∂v``.

So the user's training graph is untouched, and a recorded call costs references only; a
statistics step costs one extra attention forward and backward per call.

Layers (one :class:`~secondorder.precond.capture_layers.CapturedLayer` per weight):

* ``<name>.in_proj`` (packed ``in_proj_weight`` ``(3E, E)`` and ``in_proj_bias``): three groups
  ``q, k, v`` of ``(E, E (+1))``, rows ``(N, T, 3, E (+1))``. For cross-attention with source
  length ``S`` ≠ target length ``L`` the shorter side is zero-padded to ``T = max(L, S)``: the
  per-example gradients stay exact; the ones column of padded rows adds to ``A``'s bias entry.
* ``<name>.q_proj`` / ``.k_proj`` / ``.v_proj`` (separate weights, ``kdim``/``vdim`` ≠ ``E``):
  three ordinary linear layers without bias; the shared ``in_proj_bias`` is left to the
  fallback (:meth:`~secondorder.precond.capture.LayerCapture.describe` says so).
* ``<name>.out_proj``: a linear layer with input ``o``.

Each group's statistics equal those of a model written with explicit ``nn.Linear``
projections (tests/precond/test_capture_attention.py). ``bias_k`` / ``bias_v`` (``add_bias_kv``)
go to the fallback. The random state replayed is the CPU generator's and, for CUDA inputs, the
input device's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.precond.capture_layers import CapturedLayer, LayerKind

_FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "average_attn_weights": True, "is_causal": False}


class AttentionKind(LayerKind):
    """``nn.MultiheadAttention`` projections (module docstring)."""

    name, family = "attention", "dense"
    needs_random_state = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def parameters(self, module: nn.Module) -> list[tuple[str, Tensor, Tensor | None]]:
        if module._qkv_same_embed_dim:
            slots = [("in_proj", module.in_proj_weight, module.in_proj_bias)]
        else:
            slots = [(f"{p}_proj", getattr(module, f"{p}_proj_weight"), None) for p in "qkv"]
        return slots + [("out_proj", module.out_proj.weight, module.out_proj.bias)]

    def groups(self, layer: CapturedLayer) -> int:
        return 3 if layer.slot == "in_proj" else 1

    def in_features(self, layer: CapturedLayer) -> int:
        return int(layer.weight.shape[1])

    def out_features(self, layer: CapturedLayer) -> int:
        return int(layer.module.embed_dim)

    def random_state(self, module: nn.Module, args: tuple, kwargs: dict):
        """Generator states before a call whose dropout is active (else ``None``)."""
        if not (module.training and module.dropout > 0):
            return None
        query = args[0] if args else kwargs.get("query")
        cuda = (
            torch.cuda.get_rng_state(query.device)
            if isinstance(query, Tensor) and query.is_cuda
            else None
        )
        return torch.get_rng_state(), cuda

    def record(self, module, args, kwargs, output, random_state=None):
        call = dict(_DEFAULTS)
        call.update(zip(_FORWARD_ARGS, args))
        call.update(kwargs)
        if not isinstance(output, tuple) or not isinstance(output[0], Tensor):
            return None
        tensors = [output[0]]
        weights = output[1]
        if isinstance(weights, Tensor) and weights.requires_grad:
            tensors.append(weights)
        call = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in call.items()}
        call["training"] = module.training
        call["random_state"] = random_state
        return call, tensors

    def rows(self, layer, payload, grads, cache):
        if "rows" not in cache:
            cache["rows"] = _projection_rows(layer.module, payload, grads)
        return cache["rows"][layer.slot]


def _to_sequence_first(module: nn.MultiheadAttention, tensor: Tensor, batched: bool) -> Tensor:
    """User layout → ``(L, N, E)`` as ``F.multi_head_attention_forward`` sees it."""
    if not batched:
        return tensor.unsqueeze(1)
    return tensor.transpose(0, 1) if module.batch_first else tensor


def _example_major(tensor: Tensor) -> Tensor:
    """``(L, N, E)`` → ``(N, L, E)``."""
    return tensor.transpose(0, 1)


def _projection_rows(
    module: nn.MultiheadAttention, call: dict, grads: list[Tensor | None]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Recompute one call's projections; ``{slot: (a, g)}`` (module docstring)."""
    batched = call["query"].dim() == 3
    inputs = [_to_sequence_first(module, call[n], batched) for n in ("query", "key", "value")]
    embed = module.embed_dim
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.detach().chunk(3)
    else:
        weights = [getattr(module, f"{p}_proj_weight").detach() for p in "qkv"]
    biases = (
        module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    )
    dtype = inputs[0].dtype
    with torch.no_grad():
        projected = [
            F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
            for x, w, b in zip(inputs, weights, biases, strict=True)
        ]
    projected = [p.requires_grad_() for p in projected]
    eye = torch.eye(embed, dtype=dtype, device=inputs[0].device)

    def detached(param: Tensor | None) -> Tensor | None:
        return None if param is None else param.detach().to(dtype)

    with torch.enable_grad(), torch.random.fork_rng(
        devices=[inputs[0].device] if inputs[0].is_cuda else [],
        enabled=call["random_state"] is not None,
    ):
        if call["random_state"] is not None:
            cpu_state, cuda_state = call["random_state"]
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, inputs[0].device)
        heads, attention = F.multi_head_attention_forward(
            projected[0], projected[1], projected[2], embed, module.num_heads,
            None, None, detached(module.bias_k), detached(module.bias_v), module.add_zero_attn,
            module.dropout, eye, None,
            training=call["training"], key_padding_mask=call["key_padding_mask"],
            need_weights=call["need_weights"], attn_mask=call["attn_mask"],
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=call["average_attn_weights"],
            is_causal=call["is_causal"],
        )  # heads: (L, N, E), the input of out_proj
    out_grad = torch.zeros_like(heads) if grads[0] is None else _to_sequence_first(
        module, grads[0].to(dtype), batched
    )
    outputs, cotangents = [heads], [out_grad @ module.out_proj.weight.detach().to(dtype)]
    if len(grads) > 1 and grads[1] is not None and attention is not None:
        weight_grad = grads[1] if batched else grads[1].unsqueeze(0)
        outputs.append(attention)
        cotangents.append(weight_grad.to(attention.dtype))
    projection_grads = torch.autograd.grad(
        outputs, projected, cotangents, allow_unused=True, materialize_grads=True
    )
    heads = heads.detach()
    rows = {"out_proj": (_example_major(heads), _example_major(out_grad))}
    a = [_example_major(x) for x in inputs]
    g = [_example_major(x) for x in projection_grads]
    if module._qkv_same_embed_dim:
        longest = max(x.shape[1] for x in a)
        a = [_pad_positions(x, longest) for x in a]
        g = [_pad_positions(x, longest) for x in g]
        rows["in_proj"] = (torch.stack(a, dim=2), torch.stack(g, dim=2))
    else:
        for slot, x, grad in zip(("q_proj", "k_proj", "v_proj"), a, g, strict=True):
            rows[slot] = (x, grad)
    return rows


def _pad_positions(rows: Tensor, length: int) -> Tensor:
    """Zero-pad ``(N, T, d)`` rows to ``T = length``."""
    missing = length - rows.shape[1]
    if not missing:
        return rows
    return torch.cat([rows, rows.new_zeros((rows.shape[0], missing, rows.shape[2]))], dim=1)
