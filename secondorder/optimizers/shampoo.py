"""Shampoo with grafting and the eigenvalue-corrected (SOAP) mode.

The algorithm and its conventions follow Meta's distributed_shampoo (Shi et al. 2023,
"A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer for
Training Neural Networks At-Scale"), so that its "classic configuration" (Adam grafting,
EMA factors) gives the same numbers: ``tests/optimizers/test_shampoo.py`` checks it against a
dense float64 oracle of that configuration, and ``tests/optimizers/test_shampoo_migration.py``
checks every row of the README's "Coming from distributed_shampoo" table.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from secondorder.distributed.blocking import BlockLayout
from secondorder.distributed.distributor import Distributor
from secondorder.distributed.fsdp_shampoo import FSDP_MODES, fsdp_step, shard_prefixes
from secondorder.optimizers.base import ParamsT, SecondOrderOptimizer, decoupled_decay_, group_lr, heavy_ball_
from secondorder.optimizers.shampoo_options import block_exponents, mode_defaults, soap_exponent, validate_shampoo_group
from secondorder.optimizers.validation import check_choice
from secondorder.precond.diagonal import diagonal_directions, needs_second_moment, update_second_moments
from secondorder.precond.grafting import smoothed_norm_ratio
from secondorder.precond.kronecker import KroneckerFactors, compute_inverses
from secondorder.precond.linalg import bias_correction, finite_or_zero, keep_where


class Shampoo(SecondOrderOptimizer):
    r"""Shampoo (Gupta et al. 2018) as a drop-in ``torch.optim`` optimizer.

    Each parameter is cut into blocks (:class:`~secondorder.distributed.blocking.BlockLayout`:
    small dims merged right to left, dims above ``max_preconditioner_dim`` split). Every
    block of order ``o`` keeps one Kronecker factor per dim (see
    :mod:`secondorder.precond.kronecker`); its search direction is ``R_0 Ĝ R_1`` with
    ``R_k = (F_k/c₂ + εI)^{-1/(2o)}`` recomputed every ``precondition_frequency`` steps, or
    Adam in the factors' eigenbasis with ``eigenvalue_correction=True`` (SOAP).

    One step, per parameter (``t`` = its step count, starting at 1):

    1. ``weight_decay_type="l2"``: ``G ← G + wd·W``.
    2. Statistics from the raw ``G``: factors ``F_k ← β₂F_k + (1−β₂)C_k(G)`` (a sum when
       ``β₂ = 1``) and the graft's second moment.
    3. If ``t == start_preconditioning_step`` or ``t > start`` and ``t % precondition_frequency
       == 0``: recompute roots (batched ``eigh`` over same-shape factors) from ``F_k/(1−β₂^t)``
       — this step's gradient included. Failure keeps the last good root, counts, warns.
    4. Eigenvalue-corrected mode: ``Λ ← β₂Λ + (1−β₂)(QᵀGQ)²`` with the current bases.
    5. First moment ``M ← β₁M + (1−β₁)G``, ``Ĝ = M/(1−β₁^t)`` (``Ĝ = G`` when ``β₁ = 0``). SOAP
       mode also keeps ``QᵀMQ`` (updated with step 4's ``QᵀGQ``, rebuilt from ``M`` when a basis
       changes), so a plain step rotates once in and once out: 6 ``d³`` products, not 8.
    6. Direction: the graft's ``D_g(Ĝ)`` alone while ``t < start``; afterwards the Shampoo
       direction ``P_s``, rescaled per block to the graft's norm
       ``P = s·P_s·N̄_g/(N̄_s + 1e-16)`` when grafting (``s = graft_scale``; ``N̄`` the norms
       ``‖D_g(Ĝ)‖_F`` and ``‖P_s‖_F`` averaged over steps at rate ``graft_norm_beta``, this
       step's norms when it is 0, as in distributed_shampoo and root mode's default).
    7. Momentum after preconditioning (``B ← μB + (1−d)P``; Nesterov ``P ← (1−d)P + μB``).
    8. ``W ← W·(1 − lr·wd)`` for decoupled decay (torch AdamW's order), then ``W ← W − lr·P``.

    Conventions (with ``relative_epsilon=0`` distributed_shampoo's classic configuration, tested
    against a dense oracle of it): ε inside the root with shift-to-ε for non-PSD factors; bias
    correction divides factors at root time only; the Adam graft is always bias-corrected
    (torch Adam's operation order); grafting norms are per block; statistics accumulate from
    step 1, also before preconditioning starts.

    Differences from distributed_shampoo, chosen for users: 1-D parameters get the graft's
    diagonal method unless ``precondition_1d=True``; grafted SOAP mode steps 3 × the graft's
    step-averaged norm with β₂ 0.99 (``graft_scale``, ``graft_norm_beta``, ``betas``);
    state of bf16 parameters is float32;
    decoupled decay is AdamW's, outside momentum (``"decoupled_before_momentum"`` is theirs);
    a block whose gradient is not finite is skipped for that step (state and weight unchanged
    but for AdamW-style decay; counted) instead of poisoning its factors: screened and masked
    on the device, so plain steps never wait for it; the warning comes at once on CPU, else at
    the next refresh step.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (≥ 0). With grafting the step has the graft's scale, so the lr you
            would give that method (e.g. AdamW's) works as it is. Default 3e-3 (AdamW's is 1e-3),
            chosen by ``benchmarks/defaults_race.py``: the whitened step tolerates larger steps;
            at ⅓/1/3 × 3e-3 both modes end at or below their result at ⅓/1/3 × 1e-3 on every race
            workload and under ``Trainer`` (e.g. SOAP mode, then at ``graft_scale=1``, on the CNN
            0.052 at 9e-3 vs 0.090).
        betas: ``(β₁, β₂)``: gradient EMA (``[0, 1)``) and factor EMA (``[0, 1]``; 1 sums).
            ``None``: (0.9, 0.999) in root mode, (0.9, 0.99) in SOAP mode, where β₂ also averages
            ``Λ``: best held-out on the race's full-size transformer (refreshes every 10 steps) 1.84
            at 0.99, 1.88 at 0.999, 1.74 at 0.95 (the digits MLP then behind AdamW, 0.142 vs 0.115).
        epsilon: ε of the root (root mode, default 1e-12) or of the denominator (SOAP mode,
            default 1e-8). ``None`` picks the mode's default.
        relative_epsilon: root mode: a ridge ``ε_rel · λ_max`` added to each factor's
            eigenvalues (Anil et al. 2020, "Scalable Second Order Optimization for Deep
            Learning"). Without it (0, distributed_shampoo's behaviour) a factor that is still
            rank deficient amplifies float rounding in its null space by up to ``ε^(−e)``.
        weight_decay: decay strength ``wd ≥ 0``.
        weight_decay_type: ``"decoupled"`` (AdamW: ``W ← W·(1 − lr·wd)`` after momentum),
            ``"decoupled_before_momentum"`` (distributed_shampoo's ``DECOUPLED``: ``wd·W`` is
            added to the grafted direction before momentum, so the momentum buffer carries
            it; identical to ``"decoupled"`` up to rounding when ``momentum = 0``) or ``"l2"``
            (added to the gradient).
        momentum, dampening, nesterov: classic momentum ``μ ∈ [0, 1)`` after preconditioning
            (0 = off), its dampening ``d ∈ [0, 1)``, and its Nesterov form.
        precondition_frequency: ``f ≥ 1``, steps between root (basis) recomputations. ``None``:
            10 in root mode, 4 in SOAP mode (cheap warm-started QR refreshes): every 2 / 3 / 4 / 5 /
            10 steps gave 1.64 / 1.64 / 1.65 / 1.71 / 1.84 held-out on the race's full-size
            transformer (train step 1.34 / — / 1.20 / 1.17 / 1.14 × AdamW's); 4 vs 10: quick
            transformer 2.15 vs 2.21, digits CNN / MLP 0.087 / 0.133 vs 0.089 / 0.124 (5 seeds).
        start_preconditioning_step: first step with a Shampoo direction (default ``f``; 1 in
            SOAP mode; root mode requires ``≥ f`` as distributed_shampoo does; ``math.inf`` never
            preconditions, which with grafting is the graft method itself). SOAP mode computes its
            first bases here, so ``Λ`` is accumulated in an eigenbasis from the start (Vyas et al.
            2024); a later start puts ``Λ`` entries gathered in the identity basis (e.g. zeros of
            unseen embedding rows) under large eigenvalues: a 14× blow-up on the race's transformer.
        max_preconditioner_dim: largest factor dimension ``b`` (int ≥ 1 or ``math.inf``).
        grafting: ``"adam"`` (default), ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
        graft_beta2: second-moment EMA rate of the rmsprop/adam graft (``None``: 0.999, 0.99 in
            SOAP mode, matching its β₂).
        graft_epsilon: ε of the graft's denominator.
        graft_scale: with grafting, each block steps ``graft_scale`` × the graft's norm (its own
            direction on diagonal-only blocks). ``None``: 3 in grafted SOAP mode, else 1, so AdamW's
            best lr carries over: at 1× SOAP mode's best lr was 3× AdamW's on the byte transformers,
            the digits CNN and tiny HF models under ``Trainer`` (1× on the digits MLP).
        graft_norm_beta: ``β ∈ [0, 1)``, the rate at which the norms that set a grafted step's
            length are averaged over steps (step 6). ``None``: 0.99 in grafted SOAP mode, else 0.
            Per-step grafting (0) replaces SOAP's own step length, which is short where the
            rotated gradient is noise (0.06-0.6 × Adam's early on the transformer, 0.8-1.0 late),
            with Adam's; averaged norms keep that variation and Adam's scale on average (full-size
            transformer, refreshes every 10 steps: 1.84 at 3e-3 vs 2.01 at 1e-3 per step).
        eigenvalue_correction: SOAP mode (Adam in the Kronecker eigenbasis). Grafting stays
            ``"adam"`` (averaged norms) so AdamW's ``lr`` carries over: ungrafted, the eigenbasis step's RMS is
            0.3-0.45× AdamW's early on (digits MLP), so it needs 3-10× AdamW's lr (3.73 vs 2.64 on
            the byte transformer at 1e-3). SOAP's paper form is ``grafting="none"``.
        inverse_exponent_override: ``{order: exponent}`` or ``{order: {dim: exponent}}``;
            exponent 0 disables the factor of that dim (a block whose exponents are all 0
            gets the identity direction, grafted, as in distributed_shampoo). SOAP mode:
            0 on a dim means no basis change on it (distributed_shampoo's
            ``ignored_basis_change_dims``) and a positive exponent ``e`` replaces the ½ of the
            denominator ``(Λ/c₂)^e + ε`` (its ``inverse_exponent_override``); the positive
            exponents of one order must then be equal (ValueError otherwise).
        precondition_1d: give 1-D parameters full Kronecker factors (distributed_shampoo's
            behaviour) instead of the graft's diagonal method.
        use_bias_correction: bias-correct factors, ``Λ`` and ``β₁``'s EMA.
        factor_dtype: dtype of factors and roots (``torch.float32`` or ``torch.float64``).
        refresh_method: how amortised steps refresh each factor's root or basis
            (:data:`~secondorder.precond.kronecker.REFRESH_METHODS`). Root mode: ``"eigh"``
            (default) or ``"newton"``, coupled Newton iterations (matmuls only, for GPUs) with
            ``eigh`` as the fallback. SOAP mode: ``"qr"`` (default), one orthogonal-iteration
            step warm-started from the previous basis with ``Λ`` permuted along (Vyas et al.
            2024; the first basis is always an ``eigh``), or ``"eigh"``. On the race's quick
            workloads QR matched eigh's loss at equal frequency for less time per refresh.
        packed_factors: store each factor (and root) as its upper triangle (``d(d+1)/2``
            numbers) when memory matters more than time; same results, slower steps
            (distributed_shampoo's ``use_symmetric_packing``, about 25–30% slower there).
        distributor: ``None`` (one process), ``True`` (every rank of the default process
            group owns a cost-balanced share of the blocks, and one all-gather per step
            shares the updates; use under ``torchrun`` with a DDP model), a
            ``ProcessGroup``, or a :class:`~secondorder.distributed.Distributor`
            (e.g. ``AllGatherDistributor(communication_dtype=torch.bfloat16)``).
        fsdp_mode: ``"lossless"`` (default) or ``"local_shard"``: how FSDP2-sharded
            parameters are preconditioned (see "FSDP2" below); ignored without DTensor
            parameters.

    FSDP2 (``fully_shard``): ``"lossless"`` preconditions each whole parameter on one owner rank
    (equal to single-process Shampoo, state reshards to any world size); ``"local_shard"`` each
    rank's shard alone (no communication; resumes at the same boundaries only). See
    :mod:`secondorder.distributed.fsdp_shampoo`.

    Example::

        optimizer = secondorder.Shampoo(model.parameters(), lr=1e-3, weight_decay=0.01)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] | None = None,
        epsilon: float | None = None,
        weight_decay: float = 0.0,
        *,
        relative_epsilon: float = 1e-6,
        weight_decay_type: str = "decoupled",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        precondition_frequency: int | None = None,
        start_preconditioning_step: int | float | None = None,
        max_preconditioner_dim: int | float = 1024,
        grafting: str | None = None,
        graft_beta2: float | None = None,
        graft_epsilon: float = 1e-8,
        graft_scale: float | None = None,
        graft_norm_beta: float | None = None,
        eigenvalue_correction: bool = False,
        inverse_exponent_override: dict[int, Any] | None = None,
        precondition_1d: bool = False,
        use_bias_correction: bool = True,
        factor_dtype: torch.dtype = torch.float32,
        refresh_method: str | None = None,
        packed_factors: bool = False,
        distributor: Distributor | bool | None = None,
        fsdp_mode: str = "lossless",
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_choice("fsdp_mode", fsdp_mode, FSDP_MODES)
        defaults = dict(
            lr=lr, relative_epsilon=relative_epsilon, weight_decay=weight_decay,
            weight_decay_type=weight_decay_type, momentum=momentum, dampening=dampening,
            nesterov=nesterov,
            max_preconditioner_dim=max_preconditioner_dim, graft_epsilon=graft_epsilon,
            eigenvalue_correction=eigenvalue_correction,
            inverse_exponent_override=inverse_exponent_override, precondition_1d=precondition_1d,
            use_bias_correction=use_bias_correction, factor_dtype=factor_dtype, packed_factors=packed_factors,
            **mode_defaults(eigenvalue_correction, dict(
                grafting=grafting, betas=betas, graft_beta2=graft_beta2, graft_scale=graft_scale,
                graft_norm_beta=graft_norm_beta, epsilon=epsilon, refresh_method=refresh_method,
                start_preconditioning_step=start_preconditioning_step,
                precondition_frequency=precondition_frequency)),
        )
        super().__init__(params, defaults, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._use_distributor(distributor)
        self.fsdp_mode = fsdp_mode
        self._block_signature: tuple | None = None
        self._owners: list[int] = []
        self._shard_prefixes: dict[int, str] = {}  # id(FSDP2 param) → its shard's state-key prefix
        self._whole_on_owner: set[int] = set()  # lossless FSDP2: ids of the whole params owned here
        self._skips_reported: dict[int, int] = {}  # id(block state) → skips already warned about

    _meaning_keys = ("eigenvalue_correction",)  # SOAP state is not Shampoo state
    _options_added_later = {"graft_scale": 1.0, "graft_norm_beta": 0.0}
    # Reading a CPU tensor waits for no device, so on CPU a skipped block is warned about at
    # once; on accelerators at the next refresh step (False: the accelerator's behaviour).
    _warn_at_once_on_cpu = True
    _runtime_attributes = ("distributor",)

    def _rebuild_runtime(self) -> None:
        super()._rebuild_runtime()
        self._block_signature = None
        self._parameter_owner_cache = None

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_shampoo_group(group)

    def _check_param_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        """Saved blocks must be this parameter's blocks (count and shapes)."""
        blocks = {key: value for key, value in saved.items() if isinstance(value, dict) and "block_" in key}
        if not blocks or any(key.startswith("shard@") for key in blocks):
            return
        shapes = self._layout(param, group).shapes
        for key, block in blocks.items():
            index = int(key.rsplit("_", 1)[1])
            buffers = [v for name, v in block.items()
                       if name in ("exp_avg", "graft_sq", "momentum_buffer", "rotated_average")]
            if index >= len(shapes) or any(tuple(v.shape) != tuple(shapes[index]) for v in buffers):
                raise ValueError(f"Invalid state_dict: Shampoo state {key!r} does not fit a parameter of "
                                 f"shape {tuple(param.shape)} (blocks {list(shapes)})")

    def describe(self) -> str:
        """How each parameter is preconditioned: Kronecker blocks (their shapes) or diagonal."""
        kronecker, diagonal = [], 0
        for group in self.param_groups:
            for param in group["params"]:
                shapes = self._layout(param, group).shapes
                if all(self._strategy(tuple(shape), param, group) is None for shape in shapes):
                    diagonal += 1
                else:
                    kronecker.append("x".join(str(d) for d in param.shape) + f"→{len(shapes)} blocks")
        mode = "eigenvalue-corrected (SOAP)" if self.param_groups[0]["eigenvalue_correction"] else "root inverse"
        return (f"Shampoo ({mode}): {len(kronecker)} parameters with Kronecker blocks "
                f"({', '.join(kronecker) or 'none'}); {diagonal} on the graft's diagonal method")

    # -- blocks and ownership ---------------------------------------------------------------
    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        return _cached_layout(tuple(param.shape), group["max_preconditioner_dim"])

    def _strategy(self, block_shape: tuple[int, ...], param: Tensor, group: dict[str, Any]) -> KroneckerFactors | None:
        """The block's Kronecker strategy, or None for a diagonal-only block (1-D params)."""
        if param.dim() <= 1 and not group["precondition_1d"]:
            return None
        exponents = block_exponents(len(block_shape), group["inverse_exponent_override"],
                                    group["eigenvalue_correction"])
        # All exponents 0 leaves a strategy without factors: the identity direction (root mode)
        # or Adam in the identity basis (SOAP mode), as in distributed_shampoo.
        correction_exponent = soap_exponent(exponents) if group["eigenvalue_correction"] else 0.5
        return KroneckerFactors(
            exponents, beta2=group["betas"][1], epsilon=group["epsilon"],
            correction_exponent=correction_exponent,
            relative_epsilon=group["relative_epsilon"],
            eigenvalue_corrected=group["eigenvalue_correction"], factor_dtype=group["factor_dtype"],
            use_bias_correction=group["use_bias_correction"], refresh_method=group["refresh_method"],
            packed=group.get("packed_factors", False),
        )

    def _ownership(self) -> list[int]:
        """Owner rank per (param, block) of the replicated params, in param_groups order; cost ~
        Σ d³ + state bytes. Also refreshes :attr:`_shard_prefixes` (FSDP2 params).

        Recomputed only when the parameters or their blocking change (one tuple compare per
        step otherwise).
        """
        signature = tuple((id(p), group["max_preconditioner_dim"]) for group in self.param_groups
                          for p in group["params"])
        if signature != self._block_signature:
            self._shard_prefixes = shard_prefixes(self)  # FSDP2: stepped here alone
            costs, sizes = [], []
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) not in self._shard_prefixes:
                        for cost, size in self._block_costs(p, group):
                            costs.append(cost)
                            sizes.append(size)
            self._block_signature = signature
            self._owners = self.distributor.assign(costs, sizes)
        return self._owners

    def _block_costs(self, param: Tensor, group: dict[str, Any]) -> list[tuple[float, float]]:
        """Per block of ``param``: its amortised cost ``Σ d³ + 4d² + 3n`` and its state elements
        (factors and roots or bases per dim, plus the moments, Λ and the rotated first moment too
        in SOAP mode; 1-D blocks keep only the moments)."""
        kronecker = param.dim() > 1 or group["precondition_1d"]
        result = []
        for shape in self._layout(param, group).shapes:
            numel = math.prod(shape)
            result.append((sum(d**3 + 4 * d * d for d in shape) + 3 * numel,
                           (sum(2 * d * d for d in shape) if kronecker else 0)
                           + (4 if kronecker and group["eigenvalue_correction"] else 2) * numel))
        return result

    # -- the step ---------------------------------------------------------------------------
    def _step(self) -> None:
        """One optimization step (see the class docstring for the exact order)."""
        fsdp_step(self, self._blocks_step)

    def _blocks_step(self) -> None:
        """The step over the param groups' blocks (plain tensors, or FSDP2 local shards)."""
        owners = self._ownership()
        # Replicated parameters: blocks in global order, owned by one rank, all-gathered.
        updates: list[Tensor | None] = []
        targets: list[tuple[Tensor, Tensor, dict[str, Any], Tensor | None]] = []
        # FSDP2 shards: every block of this rank's shard is computed and applied here.
        shard_targets: list[tuple[Tensor, Tensor, dict[str, Any], Tensor]] = []
        shard_updates: dict[int, Tensor] = {}
        global_index = 0
        for group in self.param_groups:
            block_jobs = []
            for param in group["params"]:
                prefix = self._shard_prefixes.get(id(param))
                sharded = prefix is not None  # computed and applied on this rank alone
                local = sharded and isinstance(param, DTensor)
                weight = param.to_local() if local else param
                layout = self._layout(weight, group)
                if not sharded:
                    indices = range(global_index, global_index + len(layout))
                    global_index += len(layout)
                if param.grad is None or weight.numel() == 0:
                    if not sharded:
                        updates.extend(None for _ in indices)
                        targets.extend((param, weight, group, None) for _ in indices)
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Shampoo does not support sparse gradients")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                state["step"].add_(1)
                step = int(state["step"])
                grad_blocks = layout.blocks(param.grad.to_local() if local else param.grad)
                param_blocks = layout.blocks(weight)
                for local_index, (grad_block, param_block) in enumerate(zip(grad_blocks, param_blocks)):
                    key = f"{prefix or ''}block_{local_index}"
                    if sharded:
                        job = -1 - len(shard_targets)  # negative ids: this rank's shard blocks
                        shard_targets.append((param, weight, group, param_block))
                    else:
                        job = indices[local_index]
                        targets.append((param, weight, group, param_block))
                        updates.append(None)
                        if owners[job] != self.distributor.rank:
                            continue
                    block_jobs.append((job, param, key, step, grad_block, param_block))
            for job, direction in self._group_directions(group, block_jobs):
                if job < 0:
                    shard_updates[-1 - job] = direction
                else:
                    updates[job] = direction
        updates = self.distributor.all_gather_updates(updates, owners, [target[3] for target in targets])
        self._apply(updates, targets)
        self._apply([shard_updates.get(index) for index in range(len(shard_targets))], shard_targets)

    def _block_state(self, param: Tensor, key: str, block: Tensor, group: dict[str, Any],
                     strategy: KroneckerFactors | None) -> dict[str, Any]:
        state = self.state[param]
        if key not in state:
            state_dtype = torch.float32 if block.dtype in (torch.bfloat16, torch.float16) else block.dtype
            zeros = lambda: torch.zeros(block.shape, dtype=state_dtype, device=block.device)  # noqa: E731
            block_state = strategy.init_state(block) if strategy is not None else {
                "failed": torch.zeros((), dtype=torch.int64)}
            # On the block's device: updated by masks, read back only at refresh steps.
            block_state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=block.device)
            if group["betas"][0] > 0:
                block_state["exp_avg"] = zeros()
            kind = self._diagonal_kind(group)
            if needs_second_moment(kind):
                block_state["graft_sq"] = zeros()
            if group["momentum"] > 0:
                block_state["momentum_buffer"] = zeros()
            state[key] = block_state
        return state[key]

    @staticmethod
    def _diagonal_kind(group: dict[str, Any]) -> str:
        """The diagonal method used for grafting and for diagonal-only blocks."""
        return "adam" if group["grafting"] == "none" else group["grafting"]

    def _group_directions(self, group: dict[str, Any], jobs: list) -> list[tuple[int, Tensor]]:
        """Steps 1–7 of the class docstring for the blocks this rank owns in one group.

        Elementwise work (graft second moments, the β₁ EMA, graft directions, momentum) runs
        as ``torch._foreach_*`` kernels over all blocks at once; only the Kronecker work
        (factor products, roots, preconditioning) loops over blocks.
        """
        beta1 = group["betas"][0]
        kind = self._diagonal_kind(group)
        graft_beta2 = group["betas"][1] if group["grafting"] == "none" else group["graft_beta2"]
        start, frequency = group["start_preconditioning_step"], group["precondition_frequency"]
        blocks = self._prepare_blocks(group, jobs)
        if not blocks:
            return []
        global_blocks, strategies, states, steps, grads, weights, keeps = (list(column) for column in zip(*blocks))
        keep = torch.stack(keeps)  # False: non-finite gradient, every update below is masked out
        for strategy, state, step, grad, kept in zip(strategies, states, steps, grads, keeps):
            if strategy is not None:
                strategy.update_stats(state, grad, step, keep=kept)
        if needs_second_moment(kind):
            update_second_moments(kind, [state["graft_sq"] for state in states], grads, graft_beta2, keep=keep)
        # Amortised roots, batched across the blocks whose schedule fires at this step.
        due: dict[int, list] = {}
        for index, (strategy, step) in enumerate(zip(strategies, steps)):
            if strategy is not None and (step == start or (step > start and step % frequency == 0)):
                due.setdefault(step, []).append(index)
        if due:  # refreshes synchronise anyway: skipped blocks keep their roots, skips are reported
            kept_now = keep.tolist()
            self._warn_skipped(states)
        elif keep.device.type == "cpu" and self._warn_at_once_on_cpu:  # no device to wait for: warn now
            self._warn_skipped(states)
        refreshed = set()
        for step, indices in due.items():
            refreshed.update(i for i in indices if kept_now[i])
            compute_inverses([(strategies[i], states[i]) for i in indices if kept_now[i]], step, initial=step == start)
        # SOAP blocks: the direction's numerator, Q^T M Q, already in the eigenbasis (step 5); built
        # from M at a block's first step and whenever its basis changed
        rotated = {}
        for index, (strategy, state, grad, kept) in enumerate(zip(strategies, states, grads, keeps)):
            if strategy is not None and strategy.eigenvalue_corrected:
                if beta1 > 0 and (index in refreshed or "rotated_average" not in state):
                    strategy.rotate_average(state, state["exp_avg"])
                rotated[index] = strategy.update_correction(state, grad, keep=kept)
        needs_graft = [strategy is None or group["grafting"] != "none" or step < start
                       for strategy, step in zip(strategies, steps)]
        filtered: list[Tensor | None] = list(grads)
        dtypes = [grad.dtype for grad in grads]
        if beta1 > 0:
            averages = [state["exp_avg"] for state in states]
            dtypes = [average.dtype for average in averages]
            weights_beta1 = keep_where(keep, 1 - beta1, 0.0, averages[0].dtype)
            torch._foreach_lerp_(averages, grads, list(weights_beta1.unbind()))
            corrections = [bias_correction(beta1, step) if group["use_bias_correction"] else 1.0 for step in steps]
            # m̂ = m/c₁ only where it is used (grafts, root mode, steps before `start`): an
            # ungrafted SOAP block reads its numerator in the eigenbasis (an allocation saved)
            wanted = [i for i in range(len(blocks)) if needs_graft[i] or i not in rotated]
            filtered = [None] * len(blocks)
            if wanted:
                for i, average in zip(wanted, torch._foreach_div([averages[i] for i in wanted],
                                                                 [corrections[i] for i in wanted])):
                    filtered[i] = average
            if rotated:
                moments = [states[i]["rotated_average"] for i in rotated]
                weights = weights_beta1.to(moments[0].dtype).unbind()
                torch._foreach_lerp_(moments, list(rotated.values()), [weights[i] for i in rotated])
                # Q^T m̂ Q, written over the rotated gradient (a new tensor, no longer needed)
                for (i, buffer), moment in zip(rotated.items(), moments):
                    torch.div(moment, corrections[i], out=buffer)
        graft_indices = [i for i, needed in enumerate(needs_graft) if needed]
        grafts = diagonal_directions(
            kind, [states[i]["graft_sq"] for i in graft_indices] if needs_second_moment(kind) else None,
            [filtered[i] for i in graft_indices], steps=[steps[i] for i in graft_indices], beta2=graft_beta2,
            epsilon=group["graft_epsilon"])
        graft_of = dict(zip(graft_indices, grafts))
        directions = [self._direction(group, strategies[i], states[i], steps[i], filtered[i], dtypes[i],
                                      graft_of.get(i), start, rotated.get(i), keeps[i],
                                      self._workspace(rotated[i]) if i in rotated else None)
                      for i in range(len(blocks))]
        if group["weight_decay_type"] == "decoupled_before_momentum" and group["weight_decay"] != 0:
            decayed = [weight.to(direction.dtype) for weight, direction in zip(weights, directions)]
            torch._foreach_add_(directions, decayed, alpha=group["weight_decay"])
        masks = list(keep.to(directions[0].dtype).unbind())
        torch._foreach_mul_(directions, masks)  # a skipped block moves by nothing
        if group["momentum"] > 0:
            buffers = [state["momentum_buffer"] for state in states]
            momentum = list(keep_where(keep, group["momentum"], 1.0, buffers[0].dtype).unbind())
            directions = heavy_ball_(buffers, directions, momentum, group["dampening"], group["nesterov"])
            torch._foreach_mul_(directions, masks)
        return list(zip(global_blocks, directions))

    def _warn_skipped(self, states: list[dict[str, Any]]) -> None:
        """Warn once per cause (one host read) if blocks were skipped since the last check."""
        counts = torch.stack([state["nonfinite_skips"] for state in states]).tolist()
        new = 0
        for state, count in zip(states, counts):
            new += count - self._skips_reported.get(id(state), 0)
            self._skips_reported[id(state)] = count
        if new > 0:
            self._warn_once("skipped a block whose gradient is not finite")

    def _prepare_blocks(self, group: dict[str, Any], jobs: list) -> list[tuple]:
        """State, work-dtype gradient (+ L2 decay) of each job, screened without a host sync.

        A block whose gradient is not finite gets zeros in its place and ``keep = False``:
        every state update masks it out (torch.where-style, so nothing is read back to the
        host), its direction is zero and ``nonfinite_skips`` counts it; the warning comes at once
        on CPU and at the next refresh on accelerators (which synchronises anyway). Returns
        ``(global_block, strategy, state, step, grad, weight, keep)`` per job.
        """
        if not jobs:
            return []
        work = []
        for *_, grad, weight in jobs:
            work_dtype = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else grad.dtype
            grad = grad.to(work_dtype)
            if group["weight_decay_type"] == "l2" and group["weight_decay"] != 0:
                grad = grad.add(weight.to(work_dtype), alpha=group["weight_decay"])
            work.append(grad)
        cleaned, keep = finite_or_zero(work, read_on_cpu=self._warn_at_once_on_cpu)
        prepared = []
        for (global_block, param, key, step, grad, weight), clean, kept in zip(jobs, cleaned, keep.unbind()):
            strategy = self._strategy(tuple(grad.shape), param, group)
            state = self._block_state(param, key, weight, group, strategy)
            state["nonfinite_skips"].add_(~kept)
            prepared.append((global_block, strategy, state, step, clean, weight, kept))
        return prepared

    def _workspace(self, like: Tensor) -> Tensor:
        """A flat buffer of at least ``like.numel()`` entries of its dtype and device, reused by
        every block and step (not state: never saved). SOAP's per-step denominator goes there:
        a new block-sized tensor costs about 1 ms per 4 MiB on one CPU core (measured), a
        sixth of the elementwise work of a 1024 × 1024 block's step."""
        buffers = self.__dict__.setdefault("_workspaces", {})
        key = (like.dtype, like.device)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buffer

    @staticmethod
    def _direction(group, strategy, state, step, filtered, dtype, graft, start, rotated=None, kept=None,
                   workspace=None) -> Tensor:
        """Step 6: graft alone before ``start``, else the (grafted) Shampoo direction (SOAP blocks:
        from ``rotated``, the filtered gradient already in the eigenbasis, overwritten here;
        ``filtered`` is then ``None``; the denominator goes to ``workspace``). ``dtype``: the
        direction's."""
        grafted = group["grafting"] != "none"
        if strategy is None or (step < start and grafted):
            return graft.mul_(group["graft_scale"]) if grafted and group["graft_scale"] != 1.0 else graft
        if step < start:
            return strategy.precondition(state, filtered, step) if strategy.eigenvalue_corrected else filtered.clone()
        if rotated is not None:
            shampoo = strategy.precondition_rotated(state, rotated, step, dtype, workspace)
        else:
            shampoo = strategy.precondition(state, filtered, step)
        if not grafted:
            return shampoo
        ratio = smoothed_norm_ratio(state, torch.linalg.vector_norm(graft), torch.linalg.vector_norm(shampoo),
                                    group["graft_norm_beta"], kept)
        return shampoo.mul_(ratio.to(shampoo.dtype) * group["graft_scale"])

    def _apply(self, updates: list[Tensor | None], targets: list) -> None:
        """Step 8 on every rank: decoupled decay, then ``W ← W − lr·P`` for each block."""
        decayed: set[int] = set()
        for update, (param, weight, group, block) in zip(updates, targets):
            if block is None or update is None:
                continue
            if group["weight_decay_type"] == "decoupled" and id(param) not in decayed:
                decoupled_decay_(weight, group)  # the local shard under FSDP2
                decayed.add(id(param))
            block.add_(update.to(block.dtype), alpha=-group_lr(group))


@functools.lru_cache(maxsize=1024)
def _cached_layout(shape: tuple[int, ...], max_dim: int | float) -> BlockLayout:
    return BlockLayout.for_shape(shape, max_dim)
