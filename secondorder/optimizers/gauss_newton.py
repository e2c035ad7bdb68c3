"""Exact Gauss-Newton (EGN): a damped Gauss-Newton step solved in the batch dimension.

Korbit, Adeoye, Bemporad & Zanon (2024), "Exact Gauss-Newton Optimization for Training Deep
Neural Networks", arXiv:2405.14402. Maths in reference/gauss_newton.md; the solves live in
:mod:`secondorder.precond.lowrank`, the Jacobian machinery in :mod:`secondorder.precond.jacobian`,
the losses in :mod:`secondorder.precond.output_loss`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.optimizers.base import ParamsT, SecondOrderOptimizer, check_lr, group_lr, split_model_argument
from secondorder.optimizers.step_rules import adapt_damping, armijo_backtracking
from secondorder.optimizers.validation import check_choice, check_int, check_real
from secondorder.precond.capture import LayerCapture, LayerStats
from secondorder.precond.jacobian import (
    capture_output_rows,
    example_major_permutation,
    jacobian_product,
    jacobian_transpose_product,
    layer_gram,
    layer_jacobian_rows,
    output_jacobian,
)
from secondorder.precond.linalg import EigenFailure
from secondorder.precond.lowrank import (
    apply_output_blocks,
    damped_batch_solve,
    damped_parameter_solve,
    output_hessian_root,
)
from secondorder.precond.output_loss import make_output_loss

__all__ = ["ExactGaussNewton", "armijo_backtracking", "adapt_damping"]

SOLVES = ("auto", "batch", "parameter")


def _state_dtype(param: Tensor) -> torch.dtype:
    """float32 for half-precision parameters (the momentum buffer), else the parameter dtype."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


def _in_dtype(stats: LayerStats, dtype: torch.dtype) -> LayerStats:
    """``stats`` with floating tensors in ``dtype`` (embedding indices stay integer)."""
    inputs = stats.inputs.to(dtype) if stats.inputs.is_floating_point() else stats.inputs
    return LayerStats(inputs, stats.output_grads.to(dtype), stats.num_examples, stats.num_positions)


class _Linearisation:
    """What one step knows about the batch: outputs and their graph, loss derivatives, J or K."""

    def __init__(self) -> None:
        self.outputs: Tensor | None = None  # (b, ...) with graph
        self.loss = torch.tensor(math.nan)
        self.output_grad: Tensor | None = None  # g_f (b, c)
        self.hessian: Tensor | None = None  # Q (b, c) or (b, c, c)
        self.gram: Tensor | None = None  # K (bc, bc), batch mode
        self.jacobian: Tensor | None = None  # J (bc, p), parameter mode


class ExactGaussNewton(SecondOrderOptimizer):
    r"""Exact Gauss-Newton / Levenberg-Marquardt steps solved in the batch dimension (EGN).

    Korbit et al. (2024), arXiv:2405.14402. On a batch of ``b`` examples with ``c`` outputs each,
    mean loss ``L = (1/b) Σ ℓ_n(f_n)``, output gradients ``g_f``, output Hessian blocks ``Q`` and
    output Jacobian ``J`` (``bc × p``), the direction

    .. math::
        d = -(J^\top Q J / b + \lambda I)^{-1} \nabla L
          = -J^\top (Q J J^\top + b\lambda I)^{-1} g_f

    costs a ``bc × bc`` solve (Duncan-Guttman identity), or a ``p × p`` one when ``p < bc``
    (``solve="auto"``; same answer). ``J Jᵀ`` is assembled layer by layer from captured inputs
    and output gradients of ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` layers (the full
    Jacobian is never formed: memory grows with ``(bc)²`` and the activations); other parameters
    get their Jacobian columns from batched autograd. The update is

    .. math::  w \leftarrow w + s \cdot lr \cdot d + \mu (w - w_{prev})

    with ``s = 1`` or the Armijo backtracking scale (``line_search=True``; the trial points are
    ``w + s·lr·d``, the momentum term is added afterwards) and heavy-ball momentum ``μ``.
    With ``adaptive_damping=True``, ``λ`` follows the Levenberg-Marquardt ratio ``ρ`` of actual
    to predicted decrease (the model ``∇Lᵀ Δw + ½ Δwᵀ JᵀQJ Δw / b``, no ``λ``).

    **Usage.** The optimizer owns the forward passes: the closure runs the model on the batch
    and returns ``(outputs, targets)``; the optimizer computes the loss, the Jacobian products
    and every line-search evaluation itself. Never call ``backward()``::

        model.eval()  # only needed for BatchNorm / Dropout; see below
        opt = ExactGaussNewton(
            model.parameters(), model=model, loss="cross_entropy", lr=1.0, damping=1e-2
        )
        for x, y in loader:
            loss = opt.step(lambda: (model(x), y))  # F.cross_entropy(model(x), y) before the step

    The closure is called several times per step (once, plus ``c − 1`` recorded forwards for
    ``c > 1`` outputs, plus line-search / damping evaluations under ``torch.no_grad()``): it must
    be deterministic and must not call ``backward`` or ``zero_grad``. ``step()`` without a
    closure only initialises the state (what ``torch.distributed.checkpoint`` needs) and
    returns ``None``. ``.grad`` is neither read nor written.

    Args:
        params: parameters or parameter groups (a module is shorthand for ``module.parameters()``
            with ``model=module``).
        model: the module the closure runs. Needed for the memory-lean layer-wise Gram path and
            the BatchNorm check; without it every Jacobian column comes from batched autograd
            (``O(bc·p)`` memory).
        loss: ``"mse"`` (``F.mse_loss``), ``"bce"`` (``F.binary_cross_entropy_with_logits``),
            ``"cross_entropy"`` (``F.cross_entropy``; targets are class indices or
            probabilities), or a callable ``(outputs (b, c), targets) -> per-example losses (b,)``
            (:mod:`secondorder.precond.output_loss`).
        loss_hessian: for a callable loss, ``(outputs, targets) -> Q`` as ``(b, c)`` diagonals or
            ``(b, c, c)`` PSD blocks; default ``torch.func.hessian`` per example.
        lr: step size ``α`` (the largest scale with ``line_search``). Per group.
        damping: ``λ > 0``. Joint: the first group's value is used; adaptive damping writes the
            new ``λ`` into every group (so schedulers and checkpoints see it).
        momentum: heavy-ball ``μ ∈ [0, 1)``, per group.
        line_search: Armijo backtracking on the same batch (:func:`armijo_backtracking`),
            starting from ``min(increase_factor · s_prev, 1)``.
        armijo_c, backtrack_factor, increase_factor, max_backtracks: its constants (0.1, 0.8,
            1.5, 15 as in the reference solvers).
        adaptive_damping: Levenberg-Marquardt ``λ`` updates (:func:`adapt_damping`), with
            ``rho_low``, ``rho_high``, ``damping_increase``, ``damping_decrease``,
            ``min_damping``, ``max_damping``.
        solve: ``"auto"`` (parameter space when ``p < bc``), ``"batch"`` or ``"parameter"``.
        jacobian_chunk_size: rows per batched-autograd Jacobian chunk (bounds memory).

    BatchNorm layers couple the examples of a batch: in training mode the per-example Jacobian
    structure is gone, so ``step`` raises ``ValueError`` unless they are in eval mode.

    State: per parameter ``step`` (int64) and, when ``momentum > 0``, ``momentum_buffer``
    (``buf ← μ·buf + s·d``, float32 for half-precision parameters; the update is ``lr·buf``,
    which equals the heavy-ball form above for a constant ``lr`` and freezes at ``lr = 0``); on
    the first parameter also ``step_scale`` (last accepted line-search scale) and
    ``numerical_failures`` (int64: steps skipped because the solve failed, each also warned as
    ``NumericalWarning``). Diagnostics of the last step (plain floats: ``loss``, ``scale``,
    ``trials``, ``ratio`` = ``ρ`` or NaN when undefined) are in :attr:`last_step`.
    """

    closure_required = True
    supports_maximize = False
    _closure_contract = "runs the model on the batch and returns (outputs, targets)"
    _runtime_attributes = ("_capture",)

    def __init__(
        self,
        params: ParamsT | nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        momentum: float = 0.0,
        *,
        model: nn.Module | None = None,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
        loss_hessian: Callable[[Tensor, Tensor], Tensor] | None = None,
        line_search: bool = False,
        armijo_c: float = 0.1,
        backtrack_factor: float = 0.8,
        increase_factor: float = 1.5,
        max_backtracks: int = 15,
        adaptive_damping: bool = False,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_increase: float = 1.01,
        damping_decrease: float = 0.99,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
        solve: str = "auto",
        jacobian_chunk_size: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        params, model = split_model_argument(params, model, lr)
        self.loss_function = make_output_loss(loss, loss_hessian)
        self.model = model
        self._capture: LayerCapture | None = None
        self.last_step: dict[str, float] = {}
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            line_search=line_search,
            armijo_c=armijo_c,
            backtrack_factor=backtrack_factor,
            increase_factor=increase_factor,
            max_backtracks=max_backtracks,
            adaptive_damping=adaptive_damping,
            rho_low=rho_low,
            rho_high=rho_high,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            min_damping=min_damping,
            max_damping=max_damping,
            solve=solve,
            jacobian_chunk_size=jacobian_chunk_size,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._rebuild_capture()
        if model is not None and self._capture is None:
            own = {id(p) for p in model.parameters()}
            if not any(id(p) in own for p in self._trainable()):
                raise ValueError("Invalid model: none of ExactGaussNewton's parameters belongs to model= "
                                 "(was the model copied after the parameters were taken?)")

    # ------------------------------------------------------------------ set-up
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_real("damping", group["damping"], low=0.0, low_inclusive=False)
        check_real("momentum", group["momentum"], low=0.0, high=1.0, high_inclusive=False)
        for name in ("line_search", "adaptive_damping"):
            if not isinstance(group[name], bool):
                raise TypeError(f"Invalid {name}: {group[name]!r} (expected a bool)")
        check_real("armijo_c", group["armijo_c"], low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_real("backtrack_factor", group["backtrack_factor"], low=0.0, high=1.0, low_inclusive=False,
                   high_inclusive=False)
        check_real("increase_factor", group["increase_factor"], low=1.0)
        check_int("max_backtracks", group["max_backtracks"], low=1)
        check_real("rho_low", group["rho_low"])
        check_real("rho_high", group["rho_high"], low=group["rho_low"])
        check_real("damping_increase", group["damping_increase"], low=1.0)
        check_real("damping_decrease", group["damping_decrease"], low=0.0, high=1.0, low_inclusive=False)
        check_real("min_damping", group["min_damping"], low=0.0, low_inclusive=False)
        check_real("max_damping", group["max_damping"], low=group["min_damping"])
        check_choice("solve", group["solve"], SOLVES)
        if group["jacobian_chunk_size"] is not None:
            check_int("jacobian_chunk_size", group["jacobian_chunk_size"], low=1)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated, torch.optim API); the layer capture is rebuilt to cover it."""
        super().add_param_group(param_group)
        if hasattr(self, "_capture"):
            self._rebuild_capture()

    def _rebuild_runtime(self) -> None:
        self._capture = None
        self._rebuild_capture()

    def _prepare_state_without_step(self) -> None:
        self._init_state()

    def _rebuild_capture(self) -> None:
        """(Re)build the layer capture over the current trainable parameters."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._captured_ids = tuple(id(p) for p in self._trainable())
        if self.model is not None:
            capture = LayerCapture(self.model, self._trainable(), loss_reduction="sum")
            capture.enabled = False  # record only inside step()
            self._capture = capture if capture.layers else None
            if self._capture is None:
                capture.remove()

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _init_state(self) -> None:
        params = self._trainable()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if p.requires_grad and "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
        if params:
            anchor = self.state[params[0]]
            anchor.setdefault("step_scale", torch.ones((), dtype=torch.float64))
            anchor.setdefault("numerical_failures", torch.zeros((), dtype=torch.int64))

    def _check_model(self) -> None:
        if self.model is None:
            return
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"Invalid model: BatchNorm layer {name!r} is in training mode; it couples the "
                    "examples of a batch, which exact Gauss-Newton cannot model. Put it in eval "
                    "mode (module.eval())."
                )

    # ------------------------------------------------------------------ closure
    @staticmethod
    def _unpack(result: Any) -> tuple[Tensor, Any]:
        if not (
            isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], Tensor)
        ):
            raise TypeError(
                "Invalid closure: ExactGaussNewton's closure must return (outputs, targets) "
                "computed by the "
                f"model's forward, got {type(result).__name__}"
            )
        return result[0], result[1]

    def _loss_at_current(self, closure: Callable[[], Any]) -> float:
        with torch.no_grad():
            outputs, targets = self._unpack(closure())
            return float(self.loss_function.value(outputs, targets))

    # ------------------------------------------------------------------ maths
    def _linearise(
        self, closure: Callable[[], Any], params: list[Tensor], group: dict[str, Any]
    ) -> _Linearisation:
        """Evaluate the batch and build ``K`` (batch mode) or ``J`` (parameter mode)."""
        lin = _Linearisation()
        capture = self._capture
        rest_static = params if capture is None else capture.fallback_params(params)
        record_main = capture is not None and not rest_static
        with (
            torch.enable_grad(),
            capture.recording(record_main) if capture else contextlib.nullcontext(),
        ):
            outputs, targets = self._unpack(closure())
        lin.outputs = outputs
        work = torch.float32 if outputs.dtype in (torch.bfloat16, torch.float16) else outputs.dtype
        lin.loss, lin.output_grad, lin.hessian = self.loss_function.derivatives(
            outputs.detach().to(work), targets
        )
        b, c = lin.output_grad.shape
        size = sum(p.numel() for p in params)
        mode = (
            group["solve"]
            if group["solve"] != "auto"
            else ("parameter" if size < b * c else "batch")
        )
        stats = {}
        if capture is not None:
            stats = capture_output_rows(
                capture,
                lambda: self._unpack(closure())[0],
                c,
                first_outputs=outputs if record_main else None,
            )
            stats = {
                layer: _in_dtype(s, work)
                for layer, s in stats.items()
                if s.inputs.shape[0] == b * c
            }
        covered = {id(layer.weight) for layer in stats} | {
            id(layer.bias) for layer in stats if layer.has_bias
        }
        rest = [p for p in params if id(p) not in covered]
        rest_jacobian = None
        if rest:
            graph_outputs = outputs
            if record_main:
                with torch.enable_grad(), capture.recording(False):
                    graph_outputs = self._unpack(closure())[0]
            rest_jacobian = output_jacobian(
                graph_outputs, rest, chunk_size=group["jacobian_chunk_size"]
            ).to(work)
        perm = example_major_permutation(b, c, device=outputs.device)
        if mode == "batch":
            gram = outputs.new_zeros(b * c, b * c, dtype=work)
            for layer, layer_stats in stats.items():  # pass-major rows k·b + n
                gram = gram + layer_gram(layer, layer_stats).to(gram.dtype)
            gram = gram[perm][:, perm]  # example-major rows n·c + k
            if rest_jacobian is not None:
                gram = gram + rest_jacobian @ rest_jacobian.transpose(0, 1)
            lin.gram = gram
        else:
            columns: dict[int, Tensor] = {}
            for layer, layer_stats in stats.items():
                parts = layer_jacobian_rows(layer, layer_stats)
                for tensor, part in zip((layer.weight, layer.bias), parts, strict=False):
                    columns[id(tensor)] = part.reshape(b * c, -1)[perm]
            if rest_jacobian is not None:
                for p, block in zip(
                    rest, rest_jacobian.split([p.numel() for p in rest], dim=1), strict=True
                ):
                    columns[id(p)] = block
            lin.jacobian = torch.cat([columns[id(p)].to(work) for p in params], dim=1)
        return lin

    def _direction(
        self, lin: _Linearisation, params: list[Tensor], damping: float, need_grad: bool
    ):
        """``(d, ∇L or None, J d (b, c))`` as per-parameter lists (module maths)."""
        b, c = lin.output_grad.shape
        root = output_hessian_root(lin.hessian)
        if lin.gram is not None:
            x = damped_batch_solve(lin.gram, root, lin.output_grad, b * damping)
            direction = jacobian_transpose_product(lin.outputs, params, -x)
            gradient = (
                jacobian_transpose_product(lin.outputs, params, lin.output_grad / b)
                if need_grad
                else None
            )
            jd = -(lin.gram.to(x.dtype) @ x.reshape(-1)).reshape(b, c)
            return direction, gradient, jd
        jac = lin.jacobian
        grad_flat = jac.transpose(0, 1) @ lin.output_grad.reshape(-1).to(jac.dtype) / b
        d_flat = -damped_parameter_solve(jac, root, grad_flat, damping, b)
        sizes = [p.numel() for p in params]
        direction = [t.reshape(p.shape) for t, p in zip(d_flat.split(sizes), params, strict=True)]
        gradient = (
            [t.reshape(p.shape) for t, p in zip(grad_flat.split(sizes), params, strict=True)]
            if need_grad
            else None
        )
        return direction, gradient, (jac @ d_flat).reshape(b, c)

    def _jacobian_times(
        self,
        lin: _Linearisation,
        params: list[Tensor],
        vector: list[Tensor],
        jd: Tensor | None = None,
        groups: list | None = None,
    ) -> Tensor:
        """``J v`` as ``(b, c)``; ``v = lr·d`` with one ``lr`` for all groups is ``lr·jd``."""
        if jd is not None and len({group_lr(group) for group, _ in groups}) == 1:
            return group_lr(groups[0][0]) * jd
        if lin.jacobian is not None:
            flat = torch.cat([v.reshape(-1).to(lin.jacobian.dtype) for v in vector])
            return (lin.jacobian @ flat).reshape(lin.output_grad.shape)
        return jacobian_product(lin.outputs, params, vector)

    # ------------------------------------------------------------------ step
    def _closure_step(self, closure: Callable[[], Any]) -> Tensor | None:
        """One EGN step under ``torch.compile``-d models too (class docstring).

        Compiled graphs support neither double backward (Jacobian products) nor backward
        through donated buffers twice, so the closure's forwards run eagerly inside the step.
        """
        with torch.compiler.set_stance("force_eager"):
            return self._gauss_newton_step(closure)

    def _gauss_newton_step(self, closure: Callable[[], Any]) -> Tensor | None:  # noqa: C901 - one algorithm
        """One EGN step; returns the loss at the parameters before the step (class docstring)."""
        self._init_state()
        self._check_model()
        params = self._trainable()
        if not params:
            return None
        if (
            tuple(id(p) for p in params) != self._captured_ids
        ):  # requires_grad changed since the last step
            self._rebuild_capture()
        groups = [
            (group, p) for group in self.param_groups for p in group["params"] if p.requires_grad
        ]
        first = self.param_groups[0]
        damping = float(first["damping"])
        if not damping > 0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        anchor = self.state[params[0]]
        for p in params:
            self.state[p]["step"] += 1
        lin = self._linearise(closure, params, first)
        loss0 = float(lin.loss)
        need_grad = first["line_search"] or first["adaptive_damping"]
        if not (math.isfinite(loss0) and torch.isfinite(lin.output_grad).all()):
            self._skip_unit(anchor, "skipped a step whose loss or output gradient is not finite")
            return lin.loss
        try:
            direction, gradient, jd = self._direction(lin, params, damping, need_grad)
            if not all(torch.isfinite(d).all() for d in direction):
                raise EigenFailure("non-finite direction")
        except (EigenFailure, torch.linalg.LinAlgError) as error:
            self._numerical_failure(anchor, f"skipped a step whose solve failed ({type(error).__name__})")
            return lin.loss
        # Displacement per unit line-search scale, Δ_dir = lr_g·d_g, and the momentum part
        # lr_g·μ_g·buf_g of the update (SGD-style buffer buf ← μ·buf + s·d: lr = 0 freezes).
        displacement = [
            group_lr(group) * d.to(p.dtype) for (group, p), d in zip(groups, direction, strict=True)
        ]
        momentum_terms = []
        for group, p in groups:
            buffer = self.state[p].get("momentum_buffer") if group["momentum"] > 0 else None
            momentum_terms.append(
                None if buffer is None else group_lr(group) * group["momentum"] * buffer
            )
        if first["adaptive_damping"]:  # J·Δ parts, before the graph's parameters change in place
            j_direction = self._jacobian_times(lin, params, displacement, jd, groups)
            j_momentum = None
            if any(t is not None for t in momentum_terms):
                j_momentum = self._jacobian_times(
                    lin,
                    params,
                    [
                        torch.zeros_like(p) if t is None else t
                        for p, t in zip(params, momentum_terms, strict=True)
                    ],
                )
        scale, loss_at_scale, trials = 1.0, math.nan, 0
        originals: list[Tensor | None] = [None] * len(params)  # w before the step, for trials
        if first["line_search"]:
            originals = [p.detach().clone() for p in params]
            slope = float(
                sum(
                    (group_lr(group) * (g.double() * d.double()).sum())
                    for (group, _), g, d in zip(groups, gradient, direction, strict=True)
                )
            )

            def evaluate(s: float) -> float:
                for p, w, delta in zip(params, originals, displacement, strict=True):
                    p.copy_(w + s * delta)
                return self._loss_at_current(closure)

            start = min(first["increase_factor"] * float(anchor["step_scale"]), 1.0)
            tolerance = torch.finfo(lin.output_grad.dtype).eps * max(1.0, abs(loss0))
            scale, loss_at_scale, _, trials = armijo_backtracking(
                evaluate,
                loss0,
                slope,
                start,
                armijo_c=first["armijo_c"],
                factor=first["backtrack_factor"],
                max_trials=first["max_backtracks"],
                tolerance=tolerance,
            )
            if not math.isfinite(loss_at_scale):
                scale = 0.0
            anchor["step_scale"].fill_(scale if scale > 0 else 1.0)
        updates = []
        for (group, p), w, d, delta, term in zip(
            groups, originals, direction, displacement, momentum_terms, strict=True
        ):
            update = (scale * delta).to(_state_dtype(p))
            update = update if term is None else update + term
            if group["momentum"] > 0:
                buffer = self.state[p].get("momentum_buffer")
                velocity = scale * d.to(_state_dtype(p))
                self.state[p]["momentum_buffer"] = (
                    velocity if buffer is None else group["momentum"] * buffer + velocity
                )
            else:
                self.state[p].pop("momentum_buffer", None)
            if w is None:
                p.add_(update)
            else:
                p.copy_(w + update)
            if first["adaptive_damping"]:
                updates.append(update)
        self.last_step = {"loss": loss0, "scale": scale, "trials": float(trials), "ratio": math.nan}
        if first["adaptive_damping"]:
            j_update = scale * j_direction + (j_momentum if j_momentum is not None else 0)
            reuse = (
                loss_at_scale if j_momentum is None else math.nan
            )  # L(w⁺) known from the line search
            self._adapt(lin, closure, gradient, updates, j_update, loss0, reuse)
        return lin.loss

    def _adapt(self, lin, closure, gradient, updates, j_update, loss0, new_loss) -> None:
        """Levenberg-Marquardt λ update from ``ρ`` (class docstring); ``j_update = J Δw``."""
        first = self.param_groups[0]
        if not math.isfinite(new_loss):
            new_loss = self._loss_at_current(closure)
        j_update = j_update.to(lin.output_grad.dtype)
        b = lin.output_grad.shape[0]
        linear = float(
            sum((g.double() * u.double()).sum() for g, u in zip(gradient, updates, strict=True))
        )
        quadratic = float((apply_output_blocks(lin.hessian, j_update) * j_update).sum()) / (2 * b)
        predicted = linear + quadratic
        ratio = (new_loss - loss0) / predicted if predicted < 0 else math.nan
        self.last_step["ratio"] = ratio
        new_damping = adapt_damping(
            float(first["damping"]),
            None if math.isnan(ratio) else ratio,
            rho_low=first["rho_low"],
            rho_high=first["rho_high"],
            increase=first["damping_increase"],
            decrease=first["damping_decrease"],
            min_damping=first["min_damping"],
            max_damping=first["max_damping"],
        )
        for group in self.param_groups:
            group["damping"] = new_damping
