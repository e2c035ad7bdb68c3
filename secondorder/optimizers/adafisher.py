"""AdaFisher and AdaFisherW (Gomes et al., ICLR 2025, arXiv 2405.16397).

Adam with ``√v̂`` replaced by a per-layer Kronecker-diagonal Fisher ``F̃ = H ⊗ S + λ`` (no square
root), refreshed every ``update_freq`` steps. The maths is in
:mod:`secondorder.precond.fisher_diagonal`; reference/adafisher.md has the official code's
behaviour and defects.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor
from secondorder.optimizers.base import ParamsT, split_model_argument
from secondorder.optimizers.capturing import CapturingOptimizer
from secondorder.optimizers.validation import check_choice, check_int, check_real
from secondorder.precond.capture import (
    DENSE_KINDS,
    NORM_KINDS,
    CapturedLayer,
    LayerStats,
    loss_average_scale,
)
from secondorder.precond.fisher_diagonal import (
    diagonal_statistics,
    fisher_diagonal,
    minmax_normalize,
)
from secondorder.precond.grafting import GRAFT_KINDS, adam_graft
from secondorder.precond.kfac import statistics_dtype
from secondorder.precond.linalg import bias_correction

EMA_MODES = ("paper", "reference")
UNSUPPORTED_MODES = ("adam", "identity")
NORMALIZATIONS = ("none", "mean", "minmax")
LOSS_AVERAGES = ("batch+sequence", "batch")


class AdaFisher(CapturingOptimizer):
    r"""AdaFisher: momentum divided by a Kronecker-diagonal Fisher (coupled L2 weight decay).

    Tracked layers (weight among the params, identity-matched): ``nn.Linear``, ``nn.Conv2d``,
    ``nn.LayerNorm``, ``nn.BatchNorm{1,2,3}d`` (the paper's set). With ``t`` the weight's
    step count from 1, the factor refresh runs when ``(t−1) % update_freq == 0`` (the official
    code's ``TCov``, counted from its first step); the capture records only then. Per layer,
    from the raw diagonals ``ĥ, ŝ`` (``fisher_diagonal.diagonal_statistics``),
    with ``H = S = 1`` before the first refresh and ``N(·)`` min-max normalisation:

    ``ema="paper"`` (default) — the paper's rule: an exponential moving average with decay
    ``γ`` of the raw statistics, normalised when the Fisher is assembled::

        H ← γH + (1−γ)ĥ,   S ← γS + (1−γ)ŝ,   F̃ = N(H) ⊗ N(S) + λ

    ``ema="reference"`` — the official code's arithmetic (every release;
    adafisher.md §4): normalise each window, then a non-convex average::

        H ← (γ/10)H + (γ/100)N(ĥ),   S likewise,   F̃ = H ⊗ S + λ

    With the defaults the reference rule drives ``H, S`` to ≈0.0087·N(·), so ``F̃ ≈ λ`` and the
    method becomes heavy-ball SGD with lr ``η(1−β)/λ`` (adafisher.md §10); its ``ŝ`` is that of
    the mean-reduced loss (ours divided by ``N²``), as in the official code. Where the
    official code computes statistics differently (BatchNorm raw input, LayerNorm dim-1
    reduction, conv dilation ignored) both modes use the corrected statistics of
    :mod:`~secondorder.precond.fisher_diagonal`.

    Update per parameter (``κ`` = weight decay, ``β = betas[0]``)::

        g ← g + κθ                        (AdaFisher: coupled L2)
        m ← βm + (1−β)g,   m̂ = m/(1−β^t)
        θ ← θ − η·(m̂ ⊘ F̃  [+ κθ for AdaFisherW, not divided by F̃])

    **Defaults: a documented variant** (issue 14, ``benchmarks/defaults_race.py``). The
    paper's rule is ``AdaFisher(..., lr=1e-3, betas=(0.9, 0.999), update_freq=100,
    normalization="minmax", graft="none", step_scale=1)`` (tested). The defaults keep its Fisher and its EMA but:

    * ``normalization="none"``: ``F̃ = H ⊗ S + λ`` at the scale of the loss's Kronecker-diagonal
      Gauss-Newton matrix (``S`` scaled by ``T²`` for a loss averaged over examples × ``T``
      positions, ``loss_average="batch+sequence"``; by ``T`` for ``"batch"``; a sum loss by
      the number of positions), so ``m̂ ⊘ F̃`` is a diagonal Newton step with its own length.
      Min-max normalisation maps each factor's smallest entry to 0: measured on a byte-level
      transformer, 23-94 % of a Linear layer's ``F̃`` sat under ``2λ`` and every LayerNorm
      gain at exactly ``λ`` (a 2-vector normalises to {0, 1}), so the step was SGD at ``η/λ``
      and ``lr=3e-3`` diverged. ``"mean"`` divides each factor by its mean (a scale-free
      shape, ``λ`` relative);
    * the step is ``step_scale · m̂ ⊘ F̃`` (30) capped per parameter at the norm of Adam's
      ``m̂ ⊘ (√v̂ + ε)`` (``graft="adam_cap"``, :mod:`secondorder.precond.grafting`): the
      Newton step is taken where it is short (high curvature) and Adam's length bounds it
      where the Fisher is small (late in training, rare features). ``graft="adam"`` rescales
      to Adam's norm instead (the previous default);
    * ``update_freq=5`` (paper 100), ``lr=3e-3`` and ``betas=(0.9, 0.95)``: ``β₂`` is the
      rate of Adam's second moment in the cap (and in the fallback), 0.95 as in language-model
      training.

    ``H = S = 1`` before the first refresh, as in the paper: at the loss's scale that is a
    damping that decays as ``γ^k`` over the first refreshes, which measured as a needed
    warm-up (starting from the first window's statistics instead: 2.79 against 2.37 on the
    quick transformer). Measured, best held-out over lr ⅓, 1, 3 × the default on the quick
    byte transformer / digits CNN / digits MLP, and at lr 3e-3 on the full-size (875K)
    transformer, against AdamW's best 2.543 / 0.168 / 0.115 / 2.445:

    ======================================================  ======  =====  =====  ========
    AdaFisherW                                              quick   CNN    MLP    full 3e-3
    ======================================================  ======  =====  =====  ========
    these defaults                                          2.452   0.146  0.123  2.444
    ``betas=(0.9, 0.999)``, ``update_freq=10``              2.373   0.114  0.111  2.485
    ``betas=(0.9, 0.999)``, ``update_freq=5``               2.483   0.099  0.107  2.487
    ``betas=(0.9, 0.95)``, ``update_freq=10``                                     2.459
    previous (mean normalisation, Adam-norm graft,          2.677   0.176  0.123
    ``update_freq=100``, lr 1e-3, ``β₂`` 0.999)
    ======================================================  ======  =====  =====  ========

    ``β₂ = 0.95`` is what the full-size transformer needs and costs the MLP its lead. With the
    previous defaults the Fisher's shape was worth 0.10 on the quick transformer over a
    constant ``F̃`` (``damping=1e6``: 2.777). ``step_scale`` 10 (``β₂`` 0.999) / 100 (0.95)
    gave 2.509 / 2.918 on the full-size transformer (100: the cap binds and the capped ``m̂ ⊘ F̃`` is a poor direction at
    Adam's length). ``power`` (default 1, the paper's no-root form) divides by ``F̃^p``.

    Parameters outside tracked layers: ``unsupported="adam"`` (default, an extension of the
    paper) uses ``m̂ / (√v̂ + ε)`` with ``v`` the squared-gradient EMA at rate ``betas[1]``;
    ``unsupported="identity"`` uses ``F̃ = 1`` (the official code). Unlike the official code,
    parameters are matched to layers by identity, so frozen or unsupported modules never
    shift ``F̃`` onto the wrong parameters or leave later ones untrained (adafisher.md §11.2).

    Non-finite statistics skip the refresh (factors kept), count in the layer's
    ``numerical_failures`` and warn :class:`NumericalWarning`.

    State: per tracked layer in ``self.state[weight]``: ``activation_diagonal`` ``H`` (``d_in'``, 2
    for norm layers), ``gradient_diagonal`` ``S`` (``d_out``), ``fisher_activation`` /
    ``fisher_gradient`` (the vectors whose outer product is ``F̃ − λ``: ``N(H), N(S)`` in paper
    mode, copies of ``H, S`` in reference mode; rebuilt at each refresh, so a changed
    ``minmax_eps`` takes effect at the next refresh), ``numerical_failures``; per parameter:
    ``step``, ``exp_avg`` (and ``exp_avg_sq`` for Adam-fallback parameters). Float32 for
    half-precision parameters.

    Args:
        params: parameters or param groups (or the model itself, shorthand).
        model: the module whose layers are hooked (required).
        lr: ``η``.
        betas: ``(β, β₂)``: momentum, and the Adam fallback's second-moment rate.
        damping: ``λ > 0`` (``Lambda`` of the official code).
        gamma: ``γ ∈ [0, 1)`` of the factor average.
        weight_decay: ``κ ≥ 0``.
        update_freq: refresh interval ``T_cov ≥ 1`` (``stats_every``, the name the other layer
            optimizers use, is accepted for it).
        ema: ``"paper"`` or ``"reference"`` (above).
        minmax_eps: ``ε`` of the min-max normalisation.
        unsupported: ``"adam"`` or ``"identity"`` (above).
        eps: the Adam fallback's (and the graft's) ε.
        normalization: ``"none"`` (default: the loss's scale), ``"mean"`` or ``"minmax"`` (the
            paper), in ``ema="paper"``.
        graft: ``"adam_cap"`` (default: the step's own length, at most Adam's), ``"adam"`` (Adam's
            length) or ``"none"``.
        power: ``p ∈ (0, 1]``: the step is ``m̂ ⊘ F̃^p`` (1 = the paper).
        step_scale: ``s > 0``: the step is ``s · m̂ ⊘ F̃^p`` before the graft (1 = the paper).
        loss_reduction: ``"mean"`` or ``"sum"`` (capture docs).
        loss_average: for a mean loss, ``"batch+sequence"`` (default: averaged over examples ×
            positions, as language-model losses are) or ``"batch"`` (over examples only); sets
            the Fisher's scale with ``normalization="none"``. Without positions both agree.
        distributor: ``None`` (one process), ``True`` (under torchrun: each rank owns a
            cost-balanced share of the layers, see :mod:`secondorder.distributed.ownership`),
            a ``ProcessGroup`` or a :class:`~secondorder.distributed.Distributor`. Required
            for FSDP2 (``fully_shard``) models: each owner preconditions its layers whole, on
            a full copy of their parameters and gradients gathered for the step (the same
            result as DDP; :mod:`secondorder.distributed.ownership`, "FSDP2").

    Example::

        optimizer = secondorder.AdaFisher(model, lr=1e-3)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    """

    capture_kinds = DENSE_KINDS + NORM_KINDS
    # A head tied to the input embedding keeps its own use's statistics only (warned): at the
    # loss's scale (normalization="none") adding the embedding use's token counts and gradients
    # measured worse under transformers' Trainer (tied GPT-2 / Llama: 3.253 / 3.448 held-out
    # with both uses, 2.991 / 3.068 with the head's own; AdamW 3.121 / 3.191).
    capture_transposed_ties = False
    momentum_rule = "none"  # the paper's EMA comes before the division by F̃ (``_layer_directions``)
    _meaning_keys = ("weight_decay_type",)  # AdaFisher (coupled L2) vs AdaFisherW (decoupled)
    weight_decay_types = ("l2", "decoupled")

    def __init__(
        self,
        params: ParamsT | nn.Module,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        damping: float = 1e-3,
        gamma: float = 0.8,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        weight_decay_type: str = "l2",
        update_freq: int = 5,
        stats_every: int | None = None,
        ema: str = "paper",
        minmax_eps: float = 1e-6,
        unsupported: str = "adam",
        eps: float = 1e-8,
        normalization: str = "none",
        graft: str = "adam_cap",
        power: float = 1.0,
        step_scale: float = 30.0,
        loss_reduction: str = "mean",
        loss_average: str = "batch+sequence",
        grad_scaler: torch.amp.GradScaler | None = None,
        distributor: Distributor | bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        params, model = split_model_argument(params, model, lr)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        self.loss_average = check_choice("loss_average", loss_average, LOSS_AVERAGES)
        update_freq = update_freq if stats_every is None else stats_every  # the suite's common name
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, damping=damping,
            gamma=gamma, weight_decay=weight_decay, weight_decay_type=weight_decay_type,
            update_freq=update_freq, ema=ema, minmax_eps=minmax_eps, unsupported=unsupported, eps=eps,
            normalization=normalization, graft=graft, power=power, step_scale=step_scale,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._init_capture(model, loss_reduction, distributor, grad_scaler)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        check_real("damping", group["damping"], low=0.0, low_inclusive=False)
        check_real("gamma", group["gamma"], low=0.0, high=1.0, high_inclusive=False)
        check_int("update_freq", group["update_freq"], low=1)
        check_choice("ema", group["ema"], EMA_MODES)
        check_real("minmax_eps", group["minmax_eps"], low=0.0, low_inclusive=False)
        check_choice("unsupported", group["unsupported"], UNSUPPORTED_MODES)
        check_choice("normalization", group["normalization"], NORMALIZATIONS)
        check_choice("graft", group["graft"], GRAFT_KINDS)
        check_real("power", group["power"], low=0.0, high=1.0, low_inclusive=False)
        check_real("step_scale", group["step_scale"], low=0.0, low_inclusive=False)

    def _stats_due(self, group: dict[str, Any], step: int) -> bool:
        return (step - 1) % group["update_freq"] == 0

    # ------------------------------------------------------------------ diagnostics
    def fisher(self, param: Tensor) -> Tensor | None:
        """The current ``F̃`` for ``param`` (its shape), or ``None`` outside tracked layers."""
        layer = self.capture.layer_for(param)
        if layer is None or "activation_diagonal" not in self.state.get(layer.weight, {}):
            return None
        fisher_weight, fisher_bias = self._layer_fisher(
            layer, self._groups_by_param()[id(layer.weight)]
        )
        return fisher_weight if param is layer.weight else fisher_bias

    def factor_stats(self) -> dict[str, dict[str, float]]:
        """Per tracked layer name: min / max of ``F̃`` and of ``F̃/λ`` (adafisher.md §8)."""
        report = {}
        groups = self._groups_by_param()
        for layer in self.capture.layers:
            if "activation_diagonal" not in self.state.get(layer.weight, {}):
                continue
            group = groups[id(layer.weight)]
            fisher_weight, _ = self._layer_fisher(layer, group)
            low, high = float(fisher_weight.min()), float(fisher_weight.max())
            report[layer.name] = {
                "min": low,
                "max": high,
                "min_over_damping": low / group["damping"],
                "max_over_damping": high / group["damping"],
            }
        return report

    # ------------------------------------------------------------------ the rule
    def _layer_directions(self, layers: list[CapturedLayer], stats: dict[CapturedLayer, LayerStats],
                          groups: dict[int, dict[str, Any]]) -> list[tuple[Tensor, Tensor | None]]:
        """Refresh due layers' diagonals, then ``m̂ ⊘ F̃`` per parameter (class docstring)."""
        directions = []
        for layer in layers:
            group = groups[id(layer.weight)]
            state = self._param_state(layer.weight)
            self._init_layer_state(layer, state, group)
            if layer in stats and self._stats_due(group, int(state["step"]) + 1):
                self._refresh(layer, state, stats[layer], group)
            fisher_weight, fisher_bias = self._layer_fisher(layer, group)
            for param, fisher in ((layer.weight, fisher_weight), (layer.bias, fisher_bias)):
                if param is not None and param.grad is not None:
                    directions.append((param, self._fisher_step(param, groups[id(param)], fisher)))
        return directions

    def _fisher_step(self, param: Tensor, group: dict[str, Any], fisher: Tensor) -> Tensor:
        """``s·m̂ ⊘ F̃^p``, grafted to (``"adam"``) or capped at (``"adam_cap"``) the norm of
        Adam's ``m̂ ⊘ (√v̂ + ε)``."""
        filtered, grad = self._averaged(param, group)
        update = filtered / (fisher if group["power"] == 1.0 else fisher.pow(group["power"]))
        if group["step_scale"] != 1.0:
            update = update.mul_(group["step_scale"])
        if group["graft"] != "none":
            (update,) = adam_graft([self.state[param]], [grad], [update], beta2=group["betas"][1],
                                   eps=group["eps"], numerators=[filtered], kind=group["graft"])
        return update

    def _averaged(self, param: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``m ← βm + (1−β)g``; returns ``(m̂ = m/(1−β^t), g)`` for the coming step ``t``."""
        state = self._param_state(param)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(param.shape, dtype=statistics_dtype(param.dtype), device=param.device)
        beta1 = group["betas"][0]
        grad = self.prepared_gradient(param, group)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        return state["exp_avg"] / bias_correction(beta1, int(state["step"]) + 1), grad

    def _adam_direction(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """Untracked parameters: Adam (``unsupported="adam"``) or ``F̃ = 1`` (``"identity"``)."""
        if group["unsupported"] == "adam":
            return super()._adam_direction(param, group)
        direction, _ = self._averaged(param, group)
        self.state[param]["step"].add_(1)
        return direction

    def _init_layer_state(self, layer: CapturedLayer, state: dict, group: dict) -> None:
        if "activation_diagonal" in state:
            return
        dtype = statistics_dtype(layer.weight.dtype)
        device = layer.weight.device
        state["activation_diagonal"] = torch.ones(layer.in_features, dtype=dtype, device=device)
        state["gradient_diagonal"] = torch.ones(
            layer.out_features * layer.groups, dtype=dtype, device=device
        )
        self._assemble(state, group)

    @staticmethod
    def _assemble(state: dict, group: dict) -> None:
        """Store the vectors whose outer product is ``F̃ − λ`` (normalised in paper mode).

        Done once per refresh, so steps in between cost one outer product per layer.
        """
        h, s = state["activation_diagonal"], state["gradient_diagonal"]
        if group["ema"] == "paper" and group["normalization"] == "mean":
            # Each factor divided by its mean: mean(F̃ − λ) = 1, so λ is relative damping.
            h = h / h.mean().clamp_min(1e-30)
            s = s / s.mean().clamp_min(1e-30)
        elif group["ema"] == "paper" and group["normalization"] == "minmax":
            h = minmax_normalize(h, group["minmax_eps"])
            s = minmax_normalize(s, group["minmax_eps"])
        state["fisher_activation"], state["fisher_gradient"] = h.clone(), s.clone()

    def _refresh(self, layer: CapturedLayer, state: dict, stats: LayerStats, group: dict) -> None:
        h_hat, s_hat = diagonal_statistics(layer, stats, state["activation_diagonal"].dtype)
        if not (torch.isfinite(h_hat).all() and torch.isfinite(s_hat).all()):
            self._numerical_failure(state, "non-finite layer statistics (factors kept)")
            return
        gamma = group["gamma"]
        if group["ema"] == "paper" and group["normalization"] == "none":
            s_hat = s_hat * self._loss_scale(stats)
        if group["ema"] == "paper":
            state["activation_diagonal"].mul_(gamma).add_(h_hat, alpha=1 - gamma)
            state["gradient_diagonal"].mul_(gamma).add_(s_hat, alpha=1 - gamma)
            self._assemble(state, group)
            return
        if self._loss_reduction == "mean":
            s_hat = (
                s_hat / max(stats.num_examples, 1) ** 2
            )  # the official code sees mean-loss grads
        eps = group["minmax_eps"]
        state["activation_diagonal"].mul_(gamma / 10).add_(
            minmax_normalize(h_hat, eps), alpha=gamma / 100
        )
        state["gradient_diagonal"].mul_(gamma / 10).add_(
            minmax_normalize(s_hat, eps), alpha=gamma / 100
        )
        self._assemble(state, group)

    def _loss_scale(self, stats: LayerStats) -> float:
        """``c`` with ``h ⊗ (c·ŝ)`` the Kronecker-diagonal Gauss-Newton of the loss as reduced:
        ``ŝ`` is the mean of ``g²`` over the ``P`` positions, so ``c = P`` times the row scale of
        :func:`~secondorder.precond.capture.loss_average_scale` (``T²`` for a mean over
        examples × positions, ``T`` over examples, ``P`` for a sum)."""
        positions = max(stats.num_positions, 1)
        average = None if self._loss_reduction == "sum" else self.loss_average
        return positions * loss_average_scale(average, max(stats.num_examples, 1), positions)

    def _layer_fisher(self, layer: CapturedLayer, group: dict) -> tuple[Tensor, Tensor | None]:
        """``F̃`` of the layer's weight and bias from its current diagonals (class docstring)."""
        state = self.state[layer.weight]
        return fisher_diagonal(
            layer, state["fisher_activation"], state["fisher_gradient"], group["damping"]
        )


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay (``θ ← θ − η(m̂ ⊘ F̃ + κθ)``; default ``κ = 0.01``).

    Same arguments as :class:`AdaFisher`; only the weight-decay form and its default differ.
    """

    def __init__(
        self,
        params: ParamsT | nn.Module,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        damping: float = 1e-3,
        gamma: float = 0.8,
        weight_decay: float = 1e-2,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("weight_decay_type", "decoupled") != "decoupled":
            raise ValueError("Invalid weight_decay_type: AdaFisherW's decay is decoupled; use AdaFisher for L2")
        kwargs["weight_decay_type"] = "decoupled"
        super().__init__(params, lr, betas, damping, gamma, weight_decay, **kwargs)
