"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel et al. 2024).

Per tracked layer (``nn.Linear`` with any leading dims, ``nn.Conv2d``) two structured factors
``K`` (input side, bias as last column) and ``C`` (output side) hold the preconditioner
``(C Cᵀ) ⊗ (K Kᵀ)``; every ``T`` steps they move multiplicatively, ``K ← K(I − β₁ m_K)``,
from a Riemannian momentum built only from matrix products (the default INGD update, Lin et al.
2023) or from the IKFAC rule (``kfac_like=True``: ``K Kᵀ`` tracks K-FAC's damped inverse
``(EMA(U) + λI)⁻¹`` to first order in β₁). The maths lives in
:mod:`secondorder.precond.structured.ingd`; the structures in
:mod:`secondorder.precond.structured`; layer inputs and output gradients come from the shared
:class:`~secondorder.precond.capture.LayerCapture`. See reference/singd.md.

Every step, per layer (singd 0.0.5's order, reference/singd.md §9):

1. on update steps (``step % T == 0``): ``H_K = Π̂(Kᵀ U K)``, ``H_C = Π̂(Cᵀ G C)`` from this
   step's captured statistics, then ``K``, ``C``, ``m_K``, ``m_C`` as in ``ingd.update_factors``;
2. natural gradient ``C Cᵀ ∇W̃ K Kᵀ`` with the updated factors (``∇W̃ = [∇W | ∇b]``);
3. ``d = nat + γ·p``; ``buf ← α₂·buf + d`` (``buf`` starts at 0); ``p ← p − β₂·buf``.

Differences from singd 0.0.5 (reference/singd.md §17), each pinned by a test:

* all state is plain tensors in ``optimizer.state[weight]`` (``K``, ``C``, ``m_K``, ``m_C``,
  ``step``, ``numerical_skips``) and ``state[p]["momentum_buffer"]``: ``state_dict`` loads with
  ``torch.load(weights_only=True)`` and round-trips through DCP;
* every structure works in float64, float32 and bf16;
* gradient accumulation is exact in both modes (the capture sums a window's micro-batches into
  the statistics of one big batch);
* ``GradScaler``: ``scaler.step`` hands the scale to ``step``; with ``scaler.unscale_`` (for
  gradient clipping) pass ``grad_scaler=scaler`` so the captured statistics can be un-scaled;
* parameters outside tracked layers (``nn.MultiheadAttention``'s projections, embeddings,
  norms, free tensors) are trained by an Adam-style diagonal fallback, with a warning naming
  them, never silently frozen;
* ``step(closure)`` is supported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor, resolve_distributor
from secondorder.distributed.ownership import LayerOwnership
from secondorder.optimizers.base import ParamsT, SecondOrderOptimizer, split_model_argument
from secondorder.optimizers.validation import check_betas, check_choice, check_int, check_real
from secondorder.precond.capture import CapturedLayer, LayerCapture, LayerStats
from secondorder.precond.grafting import GRAFT_KINDS, adam_graft
from secondorder.precond.linalg import NumericalWarning
from secondorder.precond.structured import StructuredMatrix, get_structure
from secondorder.precond.structured.ingd import (
    FactorUpdate,
    all_finite,
    factor_steps,
    natural_gradient,
    scaled_rows,
)
from secondorder.precond.structured.initial_scale import scale_to_statistics

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_LOSS_AVERAGES = ("batch", "batch+sequence", None)


def _dtype_name(value: Any) -> str | None:
    """``None`` or a dtype (or its name) -> the name stored in param_groups."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dtype in _DTYPES.items():
            if dtype == value:
                return name
    if isinstance(value, str) and value in _DTYPES:
        return value
    raise ValueError(
        f"Invalid preconditioner_dtype: {value!r} (expected None or one of {sorted(_DTYPES)})"
    )


class SINGD(SecondOrderOptimizer):
    """Structured inverse-free natural gradient descent (INGD / IKFAC with structured factors).

    Args:
        params: parameters or param groups, or the model itself (shorthand for
            ``model.parameters()``, ``model=model``).
        model: the ``nn.Module`` whose layers are hooked (required unless ``params`` is it).
        lr: β₂, the parameter step size.
        momentum: α₂, heavy-ball momentum on the parameter step.
        damping: λ, damping inside the ``m_K``/``m_C`` updates.
        alpha1: α₁, Riemannian momentum; default 0.5 (INGD) or 0 (``kfac_like``). A non-zero
            value with ``kfac_like=True`` is set to 0 with a warning (IKFAC has none).
        weight_decay: γ, added to the *preconditioned* gradient before momentum (singd's
            convention, not AdamW's).
        T: update interval: statistics are recorded and ``K``, ``C`` updated on steps
            ``0, T, 2T, …``.
        lr_cov: β₁, the factor step size (a float in param_groups; schedule it by writing
            ``group["lr_cov"]``).
        structures: ``(structure of K, structure of C)`` or one name for both; see
            :func:`secondorder.precond.structured.get_structure` (``"dense"``, ``"diagonal"``,
            ``"block30diagonal"``, ``"tril"``, ``"triu"``, ``"hierarchical15_15"``,
            ``"triltoeplitz"``, ``"triutoeplitz"``, any ``"block<b>diagonal"`` /
            ``"hierarchical<k1>_<k2>"``).
        kfac_like: IKFAC update (no Riemannian momentum, no trace coupling).
        init_scale: ``K₀ = C₀ = init_scale · I`` (1 matches singd), or ``"auto"`` (default):
            ``K₀ = (tr̄(U) + √λ)^{-1/2} I``, ``C₀`` likewise from ``G``, at the first update
            (:mod:`secondorder.precond.structured.initial_scale`).
        normalize_lr_cov: normalised factor steps, ``β₁ / max(1, max|m|)`` and ``½(1 − α₁)``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Eschenhagen et al.
            2023).
        loss_average: how the loss was reduced: ``"batch"`` (mean over examples),
            ``"batch+sequence"`` (mean over examples × positions) or ``None`` (sum). Same for
            all groups (it sets the capture's scaling).
        preconditioner_dtype: dtype of ``K``, ``C``, ``m_K``, ``m_C``; ``None`` = the weight's
            dtype, but float32 for half-precision weights. bf16 factors are supported.
        fallback_betas, fallback_eps: Adam moments and epsilon of the diagonal fallback that
            trains parameters outside tracked layers (at the group's ``lr`` and decoupled
            ``weight_decay``).
        grad_scaler: the ``torch.amp.GradScaler`` in use, needed only if you call
            ``scaler.unscale_(optimizer)`` (e.g. to clip gradients) before ``scaler.step``.
        warn_unsupported: warn once about parameters that go to the fallback.
        distributor: ``None`` (one process), ``True`` (under torchrun: each rank owns a
            cost-balanced share of the layers, see :mod:`secondorder.distributed.ownership`),
            a ``ProcessGroup`` or a :class:`~secondorder.distributed.Distributor`. Required
            for FSDP2 (``fully_shard``) models: each owner preconditions its layers whole, on
            a full copy of their parameters and gradients gathered for the step (the same
            result as DDP; :mod:`secondorder.distributed.ownership`, "FSDP2").
        graft: ``"adam"`` (default) rescales each layer's natural gradient to Adam's norm
            times ``1 − momentum`` before the heavy-ball sum, so ``lr`` means Adam's lr
            (:mod:`secondorder.precond.grafting`); ``"none"``: singd's step.

    **Defaults: a documented variant** (issue 14, ``benchmarks/defaults_race.py``). singd
    0.0.5's algorithm is ``SINGD(..., init_scale=1.0, graft="none")`` and is what the
    agreement tests pin. At those settings a transformer whose loss is a mean over examples ×
    tokens, read with ``loss_average="batch"``, has ``G`` ~10⁴× under the identity, so at
    ``lr_cov=1e-2``, ``T=10`` the factors stay ≈ I for hundreds of steps and the method runs
    as SGD at ``lr``, with the Adam fallback at the same ``lr`` for everything else. The
    defaults start the factors at the statistics' scale (``init_scale="auto"``) and graft
    the step to Adam's norm (``graft="adam"``). For a loss averaged over tokens pass
    ``loss_average="batch+sequence"`` (measured better on the transformer).

    State per tracked layer, in ``state[layer.weight]``: ``K``, ``C`` (and ``m_K``, ``m_C`` when
    α₁ ≠ 0) as flat tensors of the structures' ``numel``; ``step`` and ``numerical_skips``
    (int64, 0-d). ``state[p]["momentum_buffer"]`` per parameter when ``momentum != 0`` (float32
    for half-precision parameters).
    Fallback parameters: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT | nn.Module,
        model: nn.Module | None = None,
        *,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float | None = None,
        weight_decay: float = 0.0,
        T: int = 10,
        lr_cov: float = 1e-2,
        structures: tuple[str, str] | str = ("dense", "dense"),
        kfac_like: bool = False,
        init_scale: float | str = "auto",
        normalize_lr_cov: bool = False,
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        preconditioner_dtype: torch.dtype | str | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        grad_scaler: torch.amp.GradScaler | None = None,
        warn_unsupported: bool = True,
        distributor: Distributor | bool | None = None,
        graft: str = "adam",
    ) -> None:
        params, model = split_model_argument(params, model)
        if model is None:
            raise ValueError(
                "Invalid model: SINGD reads layer inputs and needs model= (or the model as params)"
            )
        self.loss_average = check_choice("loss_average", loss_average, _LOSS_AVERAGES)
        self.grad_scaler = grad_scaler
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=alpha1,
            weight_decay=weight_decay,
            T=T,
            lr_cov=lr_cov,
            structures=structures,
            kfac_like=kfac_like,
            init_scale=init_scale,
            normalize_lr_cov=normalize_lr_cov,
            kfac_approx=kfac_approx,
            preconditioner_dtype=preconditioner_dtype,
            fallback_betas=fallback_betas,
            fallback_eps=fallback_eps,
            graft=graft,
        )
        self._model = model
        super().__init__(params, defaults)
        # Block = layer: each rank owns some layers (secondorder.distributed.ownership).
        self.distributor = resolve_distributor(distributor)
        self._ownership = LayerOwnership(
            self, self.distributor, lambda: self._capture.layers, capture=lambda: self._capture
        )
        self._capture = self._make_capture()
        if warn_unsupported:
            self._warn_fallback()
        self._update_recording()

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim semantics), validate its hyperparameters, re-hook the model."""
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        if hasattr(self, "_capture"):
            self._capture.remove()
            self._capture = self._make_capture()
            self._update_recording()

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        check_real("lr", group["lr"], low=0.0)
        check_real("momentum", group["momentum"], low=0.0, high=1.0, high_inclusive=False)
        check_real("damping", group["damping"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_int("T", group["T"], low=1)
        check_real("lr_cov", group["lr_cov"], low=0.0)
        if group["init_scale"] != "auto":
            check_real("init_scale", group["init_scale"], low=0.0, low_inclusive=False)
        check_real("fallback_eps", group["fallback_eps"], low=0.0)
        group["fallback_betas"] = check_betas("fallback_betas", group["fallback_betas"])
        for flag in ("kfac_like", "normalize_lr_cov"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"Invalid {flag}: {group[flag]!r} (expected a bool)")
        check_choice("kfac_approx", group["kfac_approx"], ("expand", "reduce"))
        check_choice("graft", group["graft"], GRAFT_KINDS)
        structures = group["structures"]
        if isinstance(structures, str):
            structures = (structures, structures)
        if not isinstance(structures, (tuple, list)) or len(structures) != 2:
            raise ValueError(
                f"Invalid structures: {structures!r} (expected a name or a pair of names)"
            )
        for name in structures:
            get_structure(name)
        group["structures"] = tuple(structures)
        group["preconditioner_dtype"] = _dtype_name(group["preconditioner_dtype"])
        alpha1 = group["alpha1"]
        if alpha1 is None:
            alpha1 = 0.0 if group["kfac_like"] else 0.5
        check_real("alpha1", alpha1, low=0.0, high=1.0, high_inclusive=False)
        if group["kfac_like"] and alpha1 != 0.0:
            warnings.warn(
                f"SINGD: kfac_like=True has no Riemannian momentum; alpha1={alpha1} is set to 0",
                UserWarning,
                stacklevel=4,
            )
            alpha1 = 0.0
        group["alpha1"] = float(alpha1)

    def _make_capture(self) -> LayerCapture:
        params = [p for group in self.param_groups for p in group["params"]]
        capture = LayerCapture(
            self._model,
            params,
            loss_reduction="sum" if self.loss_average is None else "mean",
            kinds=("linear", "conv2d"),
        )
        group_of = {
            id(p): index for index, group in enumerate(self.param_groups) for p in group["params"]
        }
        for layer in capture.layers:
            if layer.bias is not None and group_of[id(layer.bias)] != group_of[id(layer.weight)]:
                capture.remove()
                raise ValueError(
                    f"Invalid params: weight and bias of layer {layer.name!r} are in "
                    "different param groups"
                )
        return capture

    def _warn_fallback(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        fallback = {id(p) for p in self._capture.fallback_params(params)}
        if not fallback:
            return
        names = [name for name, p in self._model.named_parameters() if id(p) in fallback]
        unnamed = len(fallback) - len(names)
        listed = (
            ", ".join(names[:8])
            + (" …" if len(names) > 8 else "")
            + (f" (+{unnamed} unnamed)" if unnamed else "")
        )
        warnings.warn(
            f"SINGD: {len(fallback)} parameter(s) are outside Linear/Conv2d layers it can "
            "precondition "
            f"and are trained with the Adam-style diagonal fallback: {listed}",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ state helpers
    def _structures(
        self, group: dict[str, Any]
    ) -> tuple[type[StructuredMatrix], type[StructuredMatrix]]:
        names = group["structures"]
        if isinstance(names, str):
            names = (names, names)
        return get_structure(names[0]), get_structure(names[1])

    @staticmethod
    def _factor_dtype(group: dict[str, Any], weight: Tensor) -> torch.dtype:
        name = group["preconditioner_dtype"]
        if name is not None:
            return _DTYPES[name]
        return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype

    @staticmethod
    def _dims(layer: CapturedLayer) -> tuple[int, int]:
        """``(dim K, dim C)``: ``d_in'`` per group (+1 with bias) and all output channels."""
        return layer.in_features, int(layer.weight.shape[0])

    def _layer_state(self, layer: CapturedLayer, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[layer.weight]
        if "K" not in state:
            K_cls, C_cls = self._structures(group)
            dim_K, dim_C = self._dims(layer)
            dtype, device = self._factor_dtype(group, layer.weight), layer.weight.device
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["numerical_skips"] = torch.zeros((), dtype=torch.int64)
            scale = 1.0 if group["init_scale"] == "auto" else group["init_scale"]
            state["K"] = K_cls.eye(dim_K, dtype=dtype, device=device, scale=scale).data
            state["C"] = C_cls.eye(dim_C, dtype=dtype, device=device, scale=scale).data
        return state

    def factors(self, weight: Tensor) -> tuple[StructuredMatrix, StructuredMatrix]:
        """``(K, C)`` of the layer owning ``weight``, wrapping (not copying) the state tensors."""
        layer = self._capture.layer_for(weight)
        if layer is None or "K" not in self.state[layer.weight]:
            raise KeyError(
                "no SINGD factors for this parameter (not a tracked layer, or no step yet)"
            )
        group = next(g for g in self.param_groups if any(p is layer.weight for p in g["params"]))
        K_cls, C_cls = self._structures(group)
        dim_K, dim_C = self._dims(layer)
        state = self.state[layer.weight]
        return K_cls(state["K"], dim_K), C_cls(state["C"], dim_C)

    def _update_recording(self) -> None:
        """Record layer statistics during the next forward/backward iff some layer updates then."""
        needed = False
        for group in self.param_groups:
            for p in group["params"]:
                layer = self._capture.layer_for(p)
                if layer is None or p is not layer.weight or not self._ownership.is_owned(p):
                    continue
                step = self.state[p].get("step")
                if step is None or int(step) % group["T"] == 0:
                    needed = True
                    break
            if needed:
                break
        self._capture.enabled = self._ownership.agree(needed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` (dtypes kept, see the base class); resync when to record."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if isinstance(group.get("structures"), list):
                group["structures"] = tuple(group["structures"])
            if isinstance(group.get("fallback_betas"), list):
                group["fallback_betas"] = tuple(group["fallback_betas"])
        self._capture.clear()
        self._update_recording()

    # ------------------------------------------------------------------ step
    def _scales(self, stats: dict[CapturedLayer, LayerStats]) -> tuple[float, float]:
        """``(scale to divide .grad by, scale to divide the captured g by)``.

        ``GradScaler.step`` sets ``self.grad_scale`` (``None`` once ``unscale_`` ran) and
        ``self.found_inf`` for the duration of ``step`` (``_step_supports_amp_scaling``).
        """
        if not hasattr(self, "found_inf"):
            return 1.0, 1.0
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            scale = float(grad_scale)
            return scale, scale
        if not stats:
            return 1.0, 1.0
        if self.grad_scaler is not None:
            return 1.0, float(self.grad_scaler.get_scale())
        return 1.0, self._detect_scale(stats)

    def _detect_scale(self, stats: dict[CapturedLayer, LayerStats]) -> float:
        """The loss scale after ``GradScaler.unscale_`` when no ``grad_scaler`` was given.

        The cheapest tracked layer's gradient is rebuilt from the (still scaled) captured
        statistics, ``Σ_n Σ_t g aᵀ`` (÷ N for a mean loss), and compared with its (unscaled,
        possibly clipped) ``.grad``: the ratio is ``S / c`` with ``c ≤ 1`` the clipping factor.
        GradScaler's scales are powers of two, so ``S = 2^⌊log₂ ratio + 0.05⌋``: exact whenever
        clipping shrinks the gradient by less than half. ``grad_scaler=`` makes it exact always.
        """
        candidates = [layer for layer in stats if layer.weight.grad is not None]
        if not candidates:
            return 1.0
        layer = min(candidates, key=lambda item: item.weight.numel())
        a, g = stats[layer].inputs.double(), stats[layer].output_grads.double()
        if layer.groups == 1:
            a, g = a.unsqueeze(2), g.unsqueeze(2)
        total = torch.einsum("ntgo,ntgi->goi", g, a)
        reference = layer.gradient_matrix(layer.weight.grad.double(), None)
        if layer.has_bias:
            total, reference = total[..., :-1], reference[..., :-1]
        denominator = float((reference * reference).sum())
        ratio = float((total * reference).sum()) / denominator if denominator > 0 else math.nan
        if self.loss_average is not None:
            ratio /= stats[layer].num_examples
        if not math.isfinite(ratio) or ratio <= 0:
            return 1.0
        return 2.0 ** math.floor(math.log2(ratio) + 0.05)  # 0.05: low-precision statistics

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SINGD step (module docstring); returns the closure's loss (or None).

        Under a ``GradScaler`` a step with inf/NaN gradients changes nothing and drops the
        recorded statistics.
        """
        loss = self._evaluate_closure(closure)
        if hasattr(self, "found_inf") and float(self.found_inf) > 0:
            self._capture.clear()
            return loss
        with self._ownership.owned_step():  # hide other ranks' layers; share owners' results
            recorded = self._capture.has_records()
            stats = self._ownership.gather_stats(self._capture.pop()) if recorded else {}
            self._capture.clear()
            grad_scale, capture_scale = self._scales(stats)
            inv_scale = 1.0 / grad_scale
            for group in self.param_groups:
                done: set[int] = set()
                for p in group["params"]:
                    layer = self._capture.layer_for(p)
                    if layer is None:
                        if p.grad is not None:
                            self._fallback_step(p, group, inv_scale)
                    elif id(layer.weight) not in done:
                        done.add(id(layer.weight))
                        self._layer_step(layer, group, stats.get(layer), inv_scale, capture_scale)
        self._update_recording()
        return loss

    def _layer_step(
        self,
        layer: CapturedLayer,
        group: dict[str, Any],
        stats: LayerStats | None,
        inv_scale: float,
        capture_scale: float,
    ) -> None:
        weight_grad = layer.weight.grad
        bias_grad = layer.bias.grad if layer.bias is not None else None
        if weight_grad is None and bias_grad is None:
            return
        state = self._layer_state(layer, group)
        K_cls, C_cls = self._structures(group)
        dim_K, dim_C = self._dims(layer)
        K, C = K_cls(state["K"], dim_K), C_cls(state["C"], dim_C)
        if int(state["step"]) % group["T"] == 0 and stats is not None:
            self._update_factors(layer, group, state, K, C, stats, capture_scale)
        matrix = layer.gradient_matrix(weight_grad, bias_grad).reshape(dim_C, dim_K)
        if inv_scale != 1.0:
            matrix = matrix * inv_scale
        weight_nat, bias_nat = layer.split_matrix(
            natural_gradient(K, C, matrix).reshape(layer.groups, -1, dim_K)
        )
        if group["graft"] == "adam":
            weight_nat, bias_nat = self._graft(layer, group, weight_nat, bias_nat, inv_scale)
        for param, direction in ((layer.weight, weight_nat), (layer.bias, bias_nat)):
            if param is None or param.grad is None:
                continue
            work_dtype = (
                torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
            )
            direction = direction.to(work_dtype)
            if group["weight_decay"] != 0.0:
                direction = direction.add(param.to(work_dtype), alpha=group["weight_decay"])
            if group["momentum"] != 0.0:
                param_state = self.state[param]
                if "momentum_buffer" not in param_state:
                    param_state["momentum_buffer"] = torch.zeros_like(param, dtype=work_dtype)
                buffer = param_state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(direction)
                direction = buffer
            param.add_(direction.to(param.dtype), alpha=-group["lr"])
        state["step"] += 1

    def _graft(self, layer: CapturedLayer, group: dict[str, Any], weight_nat: Tensor,
               bias_nat: Tensor | None, inv_scale: float) -> tuple[Tensor, Tensor | None]:
        """Adam's per-layer norm (:mod:`secondorder.precond.grafting`), times ``1 − α₂`` so
        that the heavy-ball sum ``buf ← α₂·buf + d`` takes Adam-sized steps."""
        params, parts = [], []
        for param, part in ((layer.weight, weight_nat), (layer.bias, bias_nat)):
            if param is not None and param.grad is not None and part is not None:
                params.append(param)
                parts.append(part.reshape(param.shape))
        grads = [p.grad * inv_scale if inv_scale != 1.0 else p.grad for p in params]
        beta2 = group["fallback_betas"][1]
        grafted = adam_graft([self.state[p] for p in params], grads, parts, beta2=beta2,
                             eps=group["fallback_eps"] or 1e-8)
        factor = 1.0 - group["momentum"]
        by_param = {id(p): d * factor for p, d in zip(params, grafted, strict=True)}
        bias = None if bias_nat is None else by_param.get(id(layer.bias), bias_nat)
        return by_param.get(id(layer.weight), weight_nat), bias

    def _update_factors(
        self,
        layer: CapturedLayer,
        group: dict[str, Any],
        state: dict[str, Tensor],
        K: StructuredMatrix,
        C: StructuredMatrix,
        stats: LayerStats,
        capture_scale: float,
    ) -> None:
        inputs, grads = stats.inputs, stats.output_grads
        if layer.groups > 1:  # grouped conv: channel groups share K (averaged), C spans all outputs
            inputs, grads = inputs.mean(2), grads.flatten(2)
        rows_K, rows_C = scaled_rows(
            inputs.to(K.dtype),
            grads.to(C.dtype),
            num_examples=stats.num_examples,
            num_positions=stats.num_positions,
            approx=group["kfac_approx"],
            loss_average=self.loss_average,
        )
        if capture_scale != 1.0:
            rows_C = rows_C / capture_scale
        if group["init_scale"] == "auto" and "scaled_to_statistics" not in state:
            scale_to_statistics(K, C, rows_K, rows_C, group["damping"])
            state["scaled_to_statistics"] = torch.ones((), dtype=torch.int64)
        alpha1 = group["alpha1"]
        hyper = FactorUpdate(
            damping=group["damping"],
            alpha1=alpha1,
            lr_cov=group["lr_cov"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
        )
        with_momentum = alpha1 != 0.0 and not group["kfac_like"]
        m_K = type(K)(state["m_K"], K.dim) if with_momentum and "m_K" in state else None
        m_C = type(C)(state["m_C"], C.dim) if with_momentum and "m_C" in state else None
        H_K, H_C = K.inner(rows_K.T), C.inner(rows_C.T)
        new_m_K, new_m_C, step_K, step_C = factor_steps(K, C, H_K, H_C, hyper, m_K, m_C)
        if not all_finite(new_m_K, new_m_C, step_K, step_C):
            state["numerical_skips"] += 1
            warnings.warn(
                f"SINGD: non-finite factor update for layer {layer.name!r}; "
                "kept the last good K, C "
                f"({int(state['numerical_skips'])} skipped so far)",
                NumericalWarning,
                stacklevel=3,
            )
            return
        K.data.sub_(step_K.data)
        C.data.sub_(step_C.data)
        if with_momentum:
            state["m_K"] = new_m_K.data
            state["m_C"] = new_m_C.data

    def _fallback_step(self, param: Tensor, group: dict[str, Any], inv_scale: float) -> None:
        """Adam-style diagonal step for a parameter outside tracked layers (decoupled decay)."""
        state = self.state[param]
        work_dtype = (
            torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
        )
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["exp_avg"] = torch.zeros_like(param, dtype=work_dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=work_dtype)
        beta1, beta2 = group["fallback_betas"]
        grad = param.grad.to(work_dtype)
        if inv_scale != 1.0:
            grad = grad * inv_scale
        state["step"] += 1
        step = int(state["step"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = (
            (state["exp_avg_sq"] / (1.0 - beta2**step)).sqrt_().add_(group["fallback_eps"])
        )
        update = state["exp_avg"] / denominator / (1.0 - beta1**step)
        if group["weight_decay"] != 0.0:
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"])
