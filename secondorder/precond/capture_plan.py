"""Which weights a :class:`~secondorder.precond.capture.LayerCapture` tracks, through which
modules, and why the others are left to the fallback (``describe()``).

Built once per capture from the model, the optimizer's parameters and ``kinds``. For each
module with a registered kind (:mod:`secondorder.precond.capture_layers`) and each weight it
applies, one *use*; the uses of one weight (tied weights) are merged into one
:class:`~secondorder.precond.capture_layers.CapturedLayer` when they can be written in the
owner's layout (:class:`TiedUse`; the maths is in the capture's module docstring), otherwise the
extra use is not modelled and one warning names the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from secondorder.precond.capture_layers import CapturedLayer, module_kind, unsupported_reason

_MATRIX_DIMS = (2, 3, 4, 5)
_SHARED_INPUT = (
    "no per-example gradients: its module was applied to an input shared by all examples and "
    "broadcast (e.g. positions arange(T)); seen at pop(), left to the fallback"
)


@dataclass(eq=False)
class TiedUse:
    """One module applying a tracked weight, and how its rows enter the owner's layout.

    Attributes:
        layer: a :class:`CapturedLayer` view of this use (the owner itself for ``"own"``).
        mode: ``"own"`` / ``"same"`` (same kind and layout as the owner: rows as they are) or
            ``"transposed"`` (an embedding use of a linear owner's ``(V, D)`` weight).
        bias_value: the owner's bias-column entry for this use's rows (1 when the use adds
            the owner's bias, else 0).
    """

    layer: CapturedLayer
    mode: str = "own"
    bias_value: float = 1.0

    def rows(self, owner: CapturedLayer, record) -> tuple[Tensor, Tensor, bool]:
        """``(a, g, scale applies to a)`` of one record, in the owner's layout."""
        a, g = self.layer.spec.rows(self.layer, record.payload, record.grads, record.cache)
        if self.mode != "transposed":
            return (owner.with_ones(a, self.bias_value) if owner.family == "dense" else a), g, False
        index, grads = a, g  # embedding: indices (N, T), g (N, T, D) with padding zeroed
        onehot = grads.new_zeros(index.shape + (owner.out_features,))
        valid = index >= 0
        onehot[valid] = F.one_hot(index[valid], owner.out_features).to(grads.dtype)
        return owner.with_ones(grads, 0.0), onehot, True


class CapturePlan:
    """The tracked layers, their uses, the parameter lookup and the reasons (module docstring).

    Attributes:
        layers: tracked layers in ``model.named_modules()`` order of their owners.
        uses: ``{layer: [TiedUse]}`` (the owner's own use first).
        by_param: ``{id(weight or tracked bias): layer}``.
        warnings: messages for weights with uses that could not be modelled.
    """

    def __init__(self, model: nn.Module, params: Iterable[Tensor], kinds: tuple[str, ...],
                 transposed_ties: bool | str = True) -> None:
        params = list(params)
        if transposed_ties not in (True, False, "fallback"):
            raise ValueError(f"Invalid transposed_ties: {transposed_ties!r} (expected True, False or 'fallback')")
        # False: an embedding use of a head is not modelled; "fallback": neither use is tracked
        self.transposed_ties = transposed_ties
        param_ids = {id(p) for p in params}
        self.kinds = kinds
        self.names: dict[int, list[str]] = {}
        self.tensors: dict[int, Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(param), []).append(name)
            self.tensors[id(param)] = param
        self.reasons: dict[int, str] = {}
        self.layers: list[CapturedLayer] = []
        self.uses: dict[CapturedLayer, list[TiedUse]] = {}
        self.by_param: dict[int, CapturedLayer] = {}
        self.warnings: list[str] = []

        inside_attention = {
            id(sub)
            for module in model.modules()
            if isinstance(module, nn.MultiheadAttention)
            for sub in module.modules()
            if sub is not module
        }
        candidates: dict[int, list[CapturedLayer]] = {}
        for name, module in model.named_modules():
            if id(module) in inside_attention:
                continue  # its weights are the attention kind's slots
            kind = module_kind(module)
            if kind is None:
                why = unsupported_reason(module) or (
                    f"{type(module).__name__} is not a registered layer kind"
                )
                for param in module.parameters(recurse=False):
                    self.reasons.setdefault(id(param), why)
                continue
            view = CapturedLayer(module=module, name=name, kind=kind, weight=None, bias=None)
            for slot, weight, bias in view.spec.parameters(module):
                if weight is None:
                    continue
                use = CapturedLayer(
                    module=module,
                    name=".".join(part for part in (name, slot) if part),
                    kind=kind,
                    weight=weight,
                    bias=bias,
                    slot=slot,
                )
                candidates.setdefault(id(weight), []).append(use)
            if kind == "attention" and not module._qkv_same_embed_dim:
                if module.in_proj_bias is not None:
                    self.reasons.setdefault(
                        id(module.in_proj_bias),
                        "bias shared by separate q/k/v projection weights (not modelled)",
                    )
            for param in module.parameters(recurse=False):
                if not any(param is p for _, w, b in view.spec.parameters(module) for p in (w, b)):
                    self.reasons.setdefault(
                        id(param), f"not a projection weight or bias of {type(module).__name__}"
                    )

        for uses in candidates.values():
            self._plan_weight(uses, param_ids)
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self.layers.sort(key=lambda layer: (order.get(id(layer.module), 0), layer.name))

    def _plan_weight(self, uses: list[CapturedLayer], param_ids: set[int]) -> None:
        weight = uses[0].weight
        why = None
        enabled = [u for u in uses if u.kind in self.kinds]
        if id(weight) not in param_ids:
            why = "not among the parameters given to the capture"
        elif not weight.requires_grad:
            why = "frozen (requires_grad=False)"
        elif not enabled:
            why = f"layer kind {uses[0].kind!r} is not in kinds {self.kinds}"
        elif self.transposed_ties == "fallback" and {"linear", "embedding"} <= {u.kind for u in uses}:
            why = ("tied between an embedding and a linear head: left to the fallback by this "
                   "optimizer (transposed_ties='fallback')")
        if why is not None:
            self.reasons[id(weight)] = why
            for use in uses:  # a bias follows its weight
                if use.bias is not None:
                    self.reasons.setdefault(id(use.bias), f"its layer's weight is untracked: {why}")
            return
        owner = next((u for u in enabled if u.family == "dense"), enabled[0])
        if owner.bias is not None and (
            id(owner.bias) not in param_ids or not owner.bias.requires_grad
        ):
            owner.bias = None
        layer_uses = [TiedUse(owner)]
        dropped = []
        for use in uses:
            if use is owner:
                continue
            if use.kind == owner.kind and use.slot == owner.slot:
                value = 1.0 if use.bias is not None and use.bias is owner.bias else 0.0
                layer_uses.append(TiedUse(use, "same", value))
            elif owner.kind == "linear" and use.kind == "embedding" and self.transposed_ties is True:
                layer_uses.append(TiedUse(use, "transposed", 0.0))
            else:
                dropped.append(use)
        self.layers.append(owner)
        self.uses[owner] = layer_uses
        self.by_param[id(weight)] = owner
        if owner.bias is not None:
            self.by_param[id(owner.bias)] = owner
        if len(uses) > 1:
            listing = ", ".join(f"{u.name!r} ({u.kind})" for u in uses)
            note = f"tied weight applied by {listing}; tracked as {owner.name!r} ({owner.kind})"
            if dropped:
                skipped = ", ".join(f"{u.name!r} ({u.kind})" for u in dropped)
                note += f"; not modelled: {skipped}"
                self.warnings.append(
                    f"Parameter {self._name(id(weight))!r} is a tied weight applied by {listing}. "
                    f"Its curvature statistics come from {owner.name!r} ({owner.kind}) and the "
                    f"uses written in its layout only; {skipped} cannot be written in that "
                    "layout and is not modelled (its gradient still reaches .grad and the update)."
                )
            else:
                note += "; statistics from all uses (concatenated positions)"
            self.reasons[id(weight)] = note

    def _name(self, param_id: int) -> str:
        names = self.names.get(param_id)
        return names[0] if names else "<not a parameter of the model>"

    def describe(
        self, by_param: dict[int, CapturedLayer], shared_input: set[CapturedLayer]
    ) -> dict[str, dict]:
        """See :meth:`~secondorder.precond.capture.LayerCapture.describe`."""
        result = {}
        for param_id, names in self.names.items():
            layer = by_param.get(param_id)
            param = self.tensors[param_id]
            if layer in shared_input:
                result[names[0]] = {
                    "status": "fallback",
                    "kind": layer.kind,
                    "layer": layer.name,
                    "role": "weight" if param_id == id(layer.weight) else "bias",
                    "reason": _SHARED_INPUT,
                    "aliases": names[1:],
                }
                continue
            if layer is None:
                result[names[0]] = {
                    "status": "fallback",
                    "kind": None,
                    "layer": None,
                    "role": None,
                    "reason": self.reasons.get(
                        param_id, "not a weight or bias of any supported module"
                    ),
                    "aliases": names[1:],
                }
                continue
            role = "weight" if param is layer.weight or param_id == id(layer.weight) else "bias"
            result[names[0]] = {
                "status": "tracked",
                "kind": layer.kind,
                "layer": layer.name,
                "role": role,
                "reason": self.reasons.get(param_id, ""),
                "aliases": names[1:],
            }
        return result

    def untracked_matrices(
        self,
        by_param: dict[int, CapturedLayer],
        wanted: set[int] | None,
        shared_input: set[CapturedLayer],
    ) -> list[tuple[str, str]]:
        """See :meth:`~secondorder.precond.capture.LayerCapture.untracked_matrices`."""
        found = []
        for param_id, names in self.names.items():
            param = self.tensors[param_id]
            if wanted is not None and param_id not in wanted:
                continue
            if param.dim() not in _MATRIX_DIMS or not param.requires_grad:
                continue
            layer = by_param.get(param_id)
            if layer in shared_input:
                found.append((names[0], _SHARED_INPUT))
            elif layer is None:
                found.append((names[0], self.reasons.get(param_id, "not a weight of any module")))
        return found
