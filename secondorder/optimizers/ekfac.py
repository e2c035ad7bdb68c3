"""EK-FAC: eigenvalue-corrected Kronecker-factored natural gradient (George et al. 2018).

"Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis" (George,
Laurent, Bouthillier, Ballas, Vincent; NeurIPS 2018). The maths lives in
:mod:`secondorder.precond.kfac`; the statistics come from
:class:`~secondorder.precond.capture.LayerCapture` (empirical Fisher: the training labels'
gradients, free from the user's own backward pass; reference/ekfac.md §2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor
from secondorder.optimizers.base import ParamsT, group_lr, split_model_argument
from secondorder.optimizers.capturing import CapturingOptimizer
from secondorder.optimizers.validation import check_choice, check_int, check_real
from secondorder.precond.blocked_factor import (
    BlockedEigenbasis,
    blocked_activation_factors,
    factor_blocks,
    rotate_columns,
)
from secondorder.precond.capture import KRONECKER_KINDS, CapturedLayer, LayerStats
from secondorder.precond.eigen_step import (
    CORRECTION_ESTIMATORS,
    DAMPING_RULES,
    eigenbasis_direction,
    fold_batch_correction,
    rescale_restart,
)
from secondorder.precond.grafting import GRAFT_KINDS, adam_graft
from secondorder.precond.kfac import (
    KroneckerEigenbasis,
    eigenvalue_correction,
    kronecker_factors,
    statistics_dtype,
)
from secondorder.precond.linalg import batched_eigh

_BASIS_KEYS = (
    "gradient_basis",
    "gradient_eigenvalues",
    "activation_basis",
    "activation_eigenvalues",
)
_BLOCK = "_block_"  # state keys of a blocked input factor: activation_{factor,basis}_block_<j>


class EKFAC(CapturingOptimizer):
    r"""EK-FAC as a drop-in ``torch.optim`` optimizer.

    Per tracked layer (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` whose weight is among the
    params; bias as the last column of the gradient matrix ``Ḡ``, see
    :mod:`secondorder.precond.capture_layers`), with ``t`` the weight's step count from 1:

    1. Statistics steps (``(t−1) % stats_every == 0``): ``A ← ρA + (1−ρ)A_batch``,
       ``G ← ρG + (1−ρ)G_batch`` (the first fold copies). Factors are means over positions of
       the *per-example* quantities (the capture undoes a mean reduction).
    2. Eigenbasis steps (``(t−1) % precondition_frequency == 0``, or the first step with
       factors): ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ`` with one batched
       ``eigh`` per shape over all due layers; the correction restarts from K-FAC's
       ``λ_G λ_Aᵀ`` (values in the old basis are meaningless in the new one).
    3. Correction steps (``(t−1) % correction_every == 0``): ``Λ ← ρΛ + (1−ρ)Λ_batch`` with
       ``Λ_batch = mean_n (Q_Gᵀ G_n Q_A)^{⊙2}`` rebuilt from the captured ``a, g``. Since ``Λ``
       restarts from K-FAC's eigenvalues at every basis refresh, it moves toward the measured
       correction over about ``correction_every/(1−ρ)`` steps (the batch correction below: every
       step): keep that at most ``precondition_frequency`` or the method stays close to K-FAC
       (the defaults: 20 = 20; the paper's correction every 2 steps: 40).
    4. Direction ``P = Q_G [(Q_Gᵀ Ḡ Q_A) ⊘ (Λ + λ)^p] Q_Aᵀ`` (``λ`` from ``damping``, below), with
       ``Ḡ ← Ḡ + wd·W`` first for ``weight_decay_type="l2"``.
    5. Optional KL clipping (alecwangcq/gpauloski form): ``ν = min(1, √(κ / Σ lr²⟨P, Ḡ⟩))``
       over all tracked layers, ``P ← νP``.
    6. Momentum ``m ← β₁m + (1−β₁)P``, ``W ← W − lr·m/(1−β₁^t)`` (decoupled decay first:
       ``W ← W(1 − lr·wd)``).

    **Defaults: a documented variant, not the paper** (issue 14; measured with
    ``benchmarks/defaults_race.py``). The paper's algorithm is
    ``EKFAC(..., damping=1e-3, damping_rule="absolute", power=1.0, correction="per_example",
    correction_every=2, graft="none")`` and stays tested. At those settings on a byte-level
    transformer (loss a mean over examples × tokens) ``Λ`` spans more than seven decades and
    > 99 % of it sits under ``λ = 1e-3``, so the step was ``Ḡ/λ`` (heavy-ball SGD; lr hardly
    mattered) and the per-example correction made ``step()`` ~44× AdamW's. The defaults:

    * ``damping_rule="relative"``, ``damping=0.1``: ``λ = 0.1 · mean(Λ)`` per layer (Grosse
      et al. 2023's heuristic; :mod:`secondorder.precond.eigen_step`), independent of how the
      loss is reduced;
    * ``power=0.5``: ``(Λ + λ)^{-1/2}`` (the eigenvalue-corrected basis with Adam's root, as in
      SOAP); measured, power 1 with ``damping=1`` also beats AdamW on the transformer and the
      CNN but not on the digits MLP;
    * ``correction="batch"``: ``Λ ← ρΛ + (1−ρ)·N·(Q_Gᵀ Ḡ Q_A)^{⊙2}`` every step from the
      batch gradient (George et al.'s running-average estimator; free, since the projection
      is computed for the step anyway), so statistics are captured only every
      ``stats_every`` steps; after a basis refresh ``Λ`` restarts from K-FAC's eigenvalues
      rescaled to the previous ``Λ``'s mean (they omit the sequence length);
    * ``graft="adam"``: the direction is rescaled per layer to Adam's norm
      (:mod:`secondorder.precond.grafting`), so ``lr`` means Adam's lr.

    Parameters outside tracked layers (norm gains, custom ``nn.Parameter``s, attention
    in-projections, frozen-weight layers' biases) and tracked layers that have not yet seen
    statistics use the Adam fallback ``m̂/(√v̂ + ε)`` with the same ``betas``.
    A failed ``eigh`` or non-finite statistics keep the last good basis / factors, add to the
    layer's ``numerical_failures`` counter and warn :class:`NumericalWarning`.

    State per tracked layer, in ``self.state[weight]`` (float32 for half-precision params):
    ``activation_factor`` ``(groups, d_in', d_in')`` (embedding: the diagonal ``(1, V)``),
    ``gradient_factor`` ``(groups, d_out, d_out)``, the eigenbasis entries of
    :class:`~secondorder.precond.kfac.KroneckerEigenbasis` and ``correction``
    ``(groups, d_out, d_in')``; :meth:`eigenbasis` returns them as a saveable object (what
    influence queries reuse).

    **Wide layers** (``max_factor_dim``, off by default): a dense one-group layer whose input
    width ``d_in'`` exceeds it keeps ``A`` block-diagonal over ``⌈d_in'/max_factor_dim⌉``
    contiguous column ranges, ``A ≈ blockdiag(A_1, …, A_k)``, with ``Q_A = blockdiag(Q_{A_j})``
    and the rest of the algorithm unchanged (:mod:`secondorder.precond.blocked_factor`; the
    approximation of Shampoo's ``max_preconditioner_dim``). ``A``'s state and ``eigh`` work fall
    about ``k``× and ``k²``×: on the digits CNN (``Linear(512, 10)`` classifier, 90 % of the
    state) ``max_factor_dim=64`` cuts that layer's state 7.3× and the optimizer's 5.7×, so
    each rank of a distributed run holds less (``benchmarks/step_time_distributed.py
    --max-factor-dim``). Off by default: it drops ``A``'s cross-block covariances (on that CNN
    the 300-step held-out loss rose from 0.101 to 0.113). State: ``activation_factor_block_<j>``
    / ``activation_basis_block_<j>`` ``(1, |c_j|, |c_j|)`` instead of ``activation_factor`` / ``activation_basis``;
    :meth:`eigenbasis` assembles the dense ``Q_A`` (``d_in'²``) for influence queries.

    Args:
        params: parameters or param groups (or the model itself, shorthand).
        model: the module whose layers are hooked (required).
        lr: learning rate (default 3e-3: the best of lr 1e-3 / 3e-3 / 9e-3 or of 3.3e-4 /
            1e-3 / 3e-3 in every race measured — the quick and full-size byte transformers,
            the digits CNN and MLP, three Trainer models and two tied-head transformers; the
            previous default 1e-3 was the bottom of that range).
        betas: ``(β₁, β₂)``: momentum of the direction, and the fallback's second-moment rate.
        damping: ``λ > 0`` added to the corrected eigenvalues (schedulable); relative to
            ``mean(Λ)`` under ``damping_rule="relative"``.
        weight_decay: ``wd ≥ 0``; ``weight_decay_type``: ``"decoupled"`` or ``"l2"``.
        stat_decay: ``ρ ∈ [0, 1)``, EMA rate of factors and correction.
        eps: the fallback's denominator ε.
        kl_clip: ``κ > 0`` or ``None`` (off).
        stats_every, correction_every, precondition_frequency: schedules (steps ≥ 1; defaults
            10, 2, 20). Bases every 20 steps (was 100): held-out 2.302 vs 2.341 on the race's
            full-size transformer (every 10: 2.293 at 1.29× AdamW's train step; every 20: 1.23×),
            quick transformer 2.325 vs 2.368, digits CNN 0.097 vs 0.101, MLP 0.105 vs 0.099.
        loss_reduction: how the loss reduces examples, ``"mean"`` or ``"sum"`` (capture docs).
        damping_rule: ``"relative"`` (default) or ``"absolute"`` (the paper).
        power: ``p ∈ (0, 1]`` of ``(Λ + λ)^{-p}``; 0.5 default, 1 the paper.
        correction: ``"batch"`` (default) or ``"per_example"`` (the paper, every
            ``correction_every`` steps).
        graft: ``"adam"`` (default), ``"adam_cap"`` (its own step length, at most Adam's) or
            ``"none"`` (the method's own step length).
        max_factor_dim: ``None`` (default: every ``A`` whole) or the widest input-side factor
            kept whole; wider ones are block-diagonal ("Wide layers" above).
        distributor: ``None`` (one process), ``True`` (under torchrun: each rank owns a
            cost-balanced share of the layers, see :mod:`secondorder.distributed.ownership`),
            a ``ProcessGroup`` or a :class:`~secondorder.distributed.Distributor`. Required
            for FSDP2 (``fully_shard``) models: each owner preconditions its layers whole, on
            a full copy of their parameters and gradients gathered for the step (the same
            result as DDP; :mod:`secondorder.distributed.ownership`, "FSDP2").

    Example::

        optimizer = secondorder.EKFAC(model, lr=3e-3)   # == EKFAC(model.parameters(), model=model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    """

    capture_kinds = KRONECKER_KINDS
    momentum_rule = "ema"

    def __init__(
        self,
        params: ParamsT | nn.Module,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        damping: float = 0.1,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        weight_decay_type: str = "decoupled",
        stat_decay: float = 0.95,
        eps: float = 1e-8,
        kl_clip: float | None = None,
        stats_every: int = 10,
        correction_every: int = 2,
        precondition_frequency: int = 20,
        loss_reduction: str = "mean",
        damping_rule: str = "relative",
        power: float = 0.5,
        correction: str = "batch",
        graft: str = "adam",
        max_factor_dim: int | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributor: Distributor | bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        params, model = split_model_argument(params, model, lr)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, damping=damping,
            weight_decay=weight_decay, weight_decay_type=weight_decay_type, stat_decay=stat_decay,
            eps=eps, kl_clip=kl_clip, stats_every=stats_every, correction_every=correction_every,
            precondition_frequency=precondition_frequency, damping_rule=damping_rule, power=power,
            correction=correction, graft=graft, max_factor_dim=max_factor_dim,
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._init_capture(model, loss_reduction, distributor, grad_scaler)
        if kl_clip is not None and self.distributor.world_size > 1:
            raise ValueError("Invalid kl_clip: KL clipping couples all layers and is not "
                             "supported with a multi-rank distributor")

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        check_real("damping", group["damping"], low=0.0, low_inclusive=False)
        check_real("stat_decay", group["stat_decay"], low=0.0, high=1.0, high_inclusive=False)
        if group["kl_clip"] is not None:
            check_real("kl_clip", group["kl_clip"], low=0.0, low_inclusive=False)
        for name in ("stats_every", "correction_every", "precondition_frequency"):
            check_int(name, group[name], low=1)
        check_choice("damping_rule", group["damping_rule"], DAMPING_RULES)
        check_real("power", group["power"], low=0.0, high=1.0, low_inclusive=False)
        check_choice("correction", group["correction"], CORRECTION_ESTIMATORS)
        check_choice("graft", group["graft"], GRAFT_KINDS)
        group.setdefault("max_factor_dim", None)  # state dicts saved before the option
        if group["max_factor_dim"] is not None:
            check_int("max_factor_dim", group["max_factor_dim"], low=1)

    # ------------------------------------------------------------------ schedules
    def _stats_due(self, group: dict[str, Any], step: int) -> bool:
        if group["correction"] == "batch":  # the correction comes from .grad, not the capture
            return (step - 1) % group["stats_every"] == 0
        return (step - 1) % group["stats_every"] == 0 or (step - 1) % group["correction_every"] == 0

    # ------------------------------------------------------------------ public helpers
    def eigenbasis(self, weight: Tensor) -> KroneckerEigenbasis | None:
        """The layer's current eigenbasis and correction (``None`` before the first one).

        ``weight`` is the tracked layer's weight parameter. The returned tensors are the
        optimizer's own (not copies), except a blocked input factor's ``Q_A``, assembled
        dense from its blocks.
        """
        basis = self._eigenbasis(weight)
        return basis.dense() if isinstance(basis, BlockedEigenbasis) else basis

    @staticmethod
    def _blocks_in_state(state: dict) -> list[tuple[int, int]] | None:
        """The column ranges of a blocked input factor kept in ``state`` (``None``: not blocked)."""
        sizes = [state[f"activation_factor{_BLOCK}{j}"].shape[-1] for j in range(len(state))
                 if f"activation_factor{_BLOCK}{j}" in state]
        if not sizes:
            return None
        stops = list(torch.tensor(sizes).cumsum(0).tolist())
        return list(zip([0] + stops[:-1], stops, strict=True))

    def _input_blocks(self, layer: CapturedLayer, group: dict) -> list[tuple[int, int]] | None:
        """``max_factor_dim``'s column ranges for ``layer`` (``None``: ``A`` kept whole)."""
        if layer.family != "dense" or layer.groups != 1:
            return None
        return factor_blocks(layer.in_features, group.get("max_factor_dim"))

    def _layer_footprint(self, layer: CapturedLayer) -> tuple[float, float] | None:
        """``(eigh cost, factor state size)`` of a blocked layer, for the layer's owner assignment
        (:mod:`secondorder.distributed.ownership`); ``None``: ``A`` kept whole."""
        blocks = self._input_blocks(layer, self._groups_by_param()[id(layer.weight)])
        if blocks is None:
            return None
        widths, d_out = [stop - start for start, stop in blocks], layer.out_features
        return (float(d_out**3 + sum(w**3 for w in widths)),
                float(2 * sum(w * w for w in widths) + 2 * d_out * d_out + d_out * layer.in_features))

    def _eigenbasis(self, weight: Tensor) -> KroneckerEigenbasis | None:
        """:meth:`eigenbasis` with a blocked ``Q_A`` left in blocks (the step's form)."""
        state = self.state.get(weight, {})
        if "gradient_basis" not in state:
            return None
        blocks = self._blocks_in_state(state)
        if blocks is not None:
            return BlockedEigenbasis(
                gradient_basis=state["gradient_basis"], gradient_eigenvalues=state["gradient_eigenvalues"],
                activation_basis=None, activation_eigenvalues=state["activation_eigenvalues"],
                correction=state.get("correction"),
                activation_blocks=tuple(state[f"activation_basis{_BLOCK}{j}"] for j in range(len(blocks))),
                blocks=tuple(blocks))
        return KroneckerEigenbasis(
            gradient_basis=state["gradient_basis"],
            gradient_eigenvalues=state["gradient_eigenvalues"],
            activation_basis=state.get("activation_basis"),
            activation_eigenvalues=state["activation_eigenvalues"],
            correction=state.get("correction"),
        )

    def eigenbasis_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{layer name: KroneckerEigenbasis.state_dict()}`` (cloned) for layers that have one.

        Save it with ``torch.save`` / safetensors and rebuild each entry with
        :meth:`KroneckerEigenbasis.from_state_dict` (e.g. for influence queries).
        """
        result = {}
        for layer in self.capture.layers:
            basis = self.eigenbasis(layer.weight)
            if basis is not None:
                result[layer.name] = {k: v.clone() for k, v in basis.state_dict().items()}
        return result

    def precondition(self, weight: Tensor, matrix: Tensor) -> Tensor:
        """Apply the layer's ``(F̂ + λI)⁻¹`` to a gradient matrix ``(groups, d_out, d_in')``."""
        basis = self.eigenbasis(weight)
        if basis is None:
            raise ValueError("Invalid weight: its layer has no eigenbasis yet")
        group = self._groups_by_param()[id(weight)]
        return basis.precondition(matrix.to(basis.gradient_basis.dtype), group["damping"])

    def to_dense(self, weight: Tensor) -> Tensor:
        """The layer's preconditioner as a dense ``(P, P)`` matrix (kfac.py ordering)."""
        basis = self.eigenbasis(weight)
        if basis is None:
            raise ValueError("Invalid weight: its layer has no eigenbasis yet")
        return basis.to_dense(self._groups_by_param()[id(weight)]["damping"])

    # ------------------------------------------------------------------ the rule
    def _layer_directions(self, layers: list[CapturedLayer], stats: dict[CapturedLayer, LayerStats],
                          groups: dict[int, dict[str, Any]]) -> list[tuple[Tensor, Tensor | None]]:
        """Steps 1–5 of the class docstring for the layers that take part in this step."""
        jobs = []  # (layer, group, step of the layer's weight)
        for layer in layers:
            group = groups[id(layer.weight)]
            state = self._param_state(layer.weight)
            step = int(state["step"]) + 1
            if layer in stats:
                self._fold_factors(layer, state, stats[layer], group, step)
            jobs.append((layer, group, step))
        self._refresh_bases(jobs)
        directions: list[tuple[Tensor, Tensor | None]] = []
        kl_terms = []
        for layer, group, step in jobs:
            state = self.state[layer.weight]
            members = [p for p in (layer.weight, layer.bias) if p is not None and p.grad is not None]
            if layer in stats:  # N of the batch estimator's N·X² (the examples of a statistics step)
                state["correction_examples"] = torch.tensor(stats[layer].num_examples, dtype=torch.int64)
            if ("correction" in state and layer in stats and group["correction"] == "per_example"
                    and (step - 1) % group["correction_every"] == 0):
                self._fold_correction(layer, state, stats[layer], group)
            if "correction" not in state:  # no statistics yet: Adam fallback for this layer
                directions.extend((param, None) for param in members)
                continue
            matrix = self.gradient_matrix(layer, groups, statistics_dtype(layer.weight.dtype))
            preconditioned = self._direction(layer.weight, matrix, group)
            weight_part, bias_part = layer.split_matrix(preconditioned)
            if group["graft"] != "none":
                weight_part, bias_part = self._graft(layer, group, weight_part, bias_part)
            if group["kl_clip"] is not None:
                kl_terms.append((group, (preconditioned * matrix).sum() * group_lr(group) ** 2))
            if layer.weight.grad is not None:
                directions.append((layer.weight, weight_part))
            if bias_part is not None and layer.bias.grad is not None:
                directions.append((layer.bias, bias_part))
        scale = self._kl_scale(kl_terms)
        if scale != 1.0:
            directions = [(p, None if d is None else d * scale) for p, d in directions]
        return directions

    def _direction(self, weight: Tensor, matrix: Tensor, group: dict) -> Tensor:
        """``Q_G [X ⊘ (Λ + λ_eff)^p] Q_Aᵀ`` with ``X = Q_Gᵀ Ḡ Q_A`` (:mod:`~secondorder.precond.
        eigen_step`); the ``batch`` correction folds ``N·X²`` into ``Λ`` first."""
        state, basis = self.state[weight], self._eigenbasis(weight)
        projected = basis.project(matrix)
        if group["correction"] == "batch":
            examples = int(state["correction_examples"]) if "correction_examples" in state else 1
            fold_batch_correction(state["correction"], projected, examples, group["stat_decay"])
        return basis.unproject(eigenbasis_direction(
            projected, state["correction"], group["damping"], group["damping_rule"], group["power"]))

    def _graft(self, layer: CapturedLayer, group: dict, weight_part: Tensor,
               bias_part: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Rescale the layer's direction to Adam's norm (:mod:`secondorder.precond.grafting`)."""
        params, parts = [], []
        for param, part in ((layer.weight, weight_part), (layer.bias, bias_part)):
            if param is not None and param.grad is not None and part is not None:
                params.append(param)
                parts.append(part)
        grafted = adam_graft([self.state[p] for p in params], [p.grad for p in params], parts,
                             beta2=group["betas"][1], eps=group["eps"], kind=group["graft"])
        by_param = {id(p): d for p, d in zip(params, grafted, strict=True)}
        return by_param.get(id(layer.weight), weight_part), (
            None if layer.bias is None else by_param.get(id(layer.bias), bias_part))

    def _fold_factors(
        self, layer: CapturedLayer, state: dict, stats: LayerStats, group: dict, step: int
    ) -> None:
        if (step - 1) % group["stats_every"] != 0:
            return
        dtype = statistics_dtype(layer.weight.dtype)
        blocks = self._input_blocks(layer, group) if "gradient_factor" not in state else self._blocks_in_state(state)
        if blocks is None:
            a_batch, g_batch = kronecker_factors(layer, stats, dtype)
            factors = {"activation_factor": a_batch}
        else:  # G alone from kronecker_factors' formula; A block by block (blocked_factor)
            count = max(stats.num_positions, 1)
            g_rows = stats.output_grads.to(dtype).reshape(-1, stats.output_grads.shape[-1])
            g_batch = (g_rows.transpose(0, 1) @ g_rows / count).unsqueeze(0)
            factors = {f"activation_factor{_BLOCK}{j}": a for j, a in
                       enumerate(blocked_activation_factors(layer, stats, blocks, dtype))}
        factors["gradient_factor"] = g_batch
        if not all(torch.isfinite(f).all() for f in factors.values()):
            self._numerical_failure(state, "non-finite layer statistics (factors kept)")
            return
        if "gradient_factor" not in state:
            state.update(factors)
            state["factor_updates"] = torch.zeros((), dtype=torch.int64, device=g_batch.device)
        else:
            rho = group["stat_decay"]
            for key, value in factors.items():
                state[key].mul_(rho).add_(value, alpha=1 - rho)
        state["factor_updates"].add_(1)

    def _refresh_bases(self, jobs: list) -> None:
        """Step 2 for every due layer: one batched ``eigh`` per factor shape."""
        due = []
        for layer, group, step in jobs:
            state = self.state[layer.weight]
            if "gradient_factor" not in state:
                continue
            if "gradient_basis" not in state or (step - 1) % group["precondition_frequency"] == 0:
                due.append((layer, state))
        if not due:
            return
        matrices = []
        for _, state in due:
            matrices.extend(state["gradient_factor"].unbind(0))
            blocks = self._blocks_in_state(state)
            if blocks is not None:
                matrices.extend(state[f"activation_factor{_BLOCK}{j}"][0] for j in range(len(blocks)))
            elif state["activation_factor"].dim() == 3:
                matrices.extend(state["activation_factor"].unbind(0))
        results = batched_eigh(matrices)
        position = 0
        for layer, state in due:
            groups = state["gradient_factor"].shape[0]
            blocks = self._blocks_in_state(state)
            diagonal = blocks is None and state["activation_factor"].dim() == 2
            count = groups if diagonal else groups + len(blocks) if blocks is not None else 2 * groups
            pieces, position = results[position : position + count], position + count
            if any(piece is None for piece in pieces):
                self._numerical_failure(state, "eigendecomposition failed (basis kept)")
                continue
            state["gradient_eigenvalues"] = torch.stack([p[0] for p in pieces[:groups]])
            state["gradient_basis"] = torch.stack([p[1] for p in pieces[:groups]])
            if blocks is not None:
                state["activation_eigenvalues"] = torch.cat([p[0] for p in pieces[groups:]]).unsqueeze(0)
                for j, piece in enumerate(pieces[groups:]):
                    state[f"activation_basis{_BLOCK}{j}"] = piece[1].unsqueeze(0).clone()  # own storage
            elif diagonal:
                state["activation_eigenvalues"] = state["activation_factor"].clone()
            else:
                state["activation_eigenvalues"] = torch.stack([p[0] for p in pieces[groups:]])
                state["activation_basis"] = torch.stack([p[1] for p in pieces[groups:]])
            state["correction"] = rescale_restart(self._eigenbasis(layer.weight).kfac_eigenvalues(),
                                                  state.get("correction"))

    def _fold_correction(
        self, layer: CapturedLayer, state: dict, stats: LayerStats, group: dict
    ) -> None:
        basis = self._eigenbasis(layer.weight)
        if isinstance(basis, BlockedEigenbasis):  # rows rotated by blockdiag(Q_A_j) here
            stats = LayerStats(rotate_columns(stats.inputs.to(basis.gradient_basis.dtype),
                                              list(basis.activation_blocks), list(basis.blocks)),
                               stats.output_grads, stats.num_examples, stats.num_positions)
        batch = eigenvalue_correction(layer, stats, basis.gradient_basis, basis.activation_basis)
        if not torch.isfinite(batch).all():
            self._numerical_failure(state, "non-finite eigenvalue correction (kept)")
            return
        rho = group["stat_decay"]
        state["correction"].mul_(rho).add_(batch, alpha=1 - rho)

    @staticmethod
    def _kl_scale(terms: list) -> float:
        """KL clipping factor ``ν`` (1 when off or when the quadratic form is not positive)."""
        if not terms:
            return 1.0
        clip = terms[0][0]["kl_clip"]
        total = float(torch.stack([t for _, t in terms]).sum())
        if not math.isfinite(total) or total <= 0:
            return 1.0
        return min(1.0, math.sqrt(clip / total))
