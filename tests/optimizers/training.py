"""The data, loss and training loops the contract tests share (one step as a user writes it)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tests.optimizers.registry import OptimizerSpec


def toy_data(n: int = 32, dtype=torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.sin(x[:, :3]) + 0.1 * torch.randn(n, 3, generator=generator)
    return x.to(dtype), y.to(dtype)


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target)


def take_step(spec: OptimizerSpec, optimizer, model, x, y):
    """One training step the way a user of ``spec`` writes it; returns the loss."""
    if spec.closure_driven:
        return optimizer.step(spec.make_closure(model, x, y, loss_fn))
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def flat(model_or_params):
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return torch.cat([p.detach().flatten() for p in params])


def batches(count, n=16):
    return [toy_data(n, seed=seed) for seed in range(count)]


def state_tensors(optimizer):
    """Every tensor in optimizer.state, keyed by (param position, key path)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    found = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(prefix + (key,), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(prefix + (index,), item)

    for index, param in enumerate(params):
        walk((index,), optimizer.state.get(param, {}))
    return found


def param_position(optimizer, param) -> int:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


def floating_state(optimizer, params=None) -> dict[tuple, torch.Tensor]:
    """Clones of the floating state tensors with more than one entry (statistics, buffers),
    optionally only those of ``params``; scalar counters are left out."""
    positions = None if params is None else {param_position(optimizer, p) for p in params}
    return {key: value.detach().clone() for key, value in state_tensors(optimizer).items()
            if value.is_floating_point() and value.numel() > 1
            and (positions is None or key[0] in positions)}


def assert_all_finite(model, optimizer):
    assert torch.isfinite(flat(model)).all(), "a parameter is not finite"
    for key, value in state_tensors(optimizer).items():
        if value.is_floating_point() or value.is_complex():
            assert torch.isfinite(value).all(), f"state {key} is not finite"


def assert_same_tensors(before: dict, after: dict, what: str = "state"):
    assert before.keys() == after.keys(), (what, set(before) ^ set(after))
    for key in before:
        assert before[key].dtype == after[key].dtype, (what, key)
        assert torch.equal(before[key], after[key]), f"{what} {key} changed"


def snapshot(optimizer) -> tuple[list[dict[str, Any]], dict[tuple, torch.Tensor], int]:
    """(param_groups with parameter identities, clones of every state tensor, state size)."""
    groups = []
    for group in optimizer.param_groups:
        copied = {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}
        copied["params"] = [id(p) for p in group["params"]]
        groups.append(copied)
    tensors = {key: value.detach().clone() for key, value in state_tensors(optimizer).items()}
    return groups, tensors, len(optimizer.state)


def assert_unmodified(optimizer, saved) -> None:
    groups, tensors, size = snapshot(optimizer)
    assert len(groups) == len(saved[0]), "param_groups were changed (a group was added or removed)"
    for now, before in zip(groups, saved[0]):
        assert now.keys() == before.keys(), "param group keys were changed"
        for key in now:
            if isinstance(now[key], torch.Tensor):
                assert torch.equal(now[key], before[key]), f"param group value {key!r} was changed"
            else:
                assert now[key] == before[key], f"param group value {key!r} was changed"
    assert size == saved[2], "optimizer.state gained or lost entries"
    assert_same_tensors(saved[1], tensors)


def over_specs(where=lambda spec: True):
    """Parametrize a test over the registry entries for which ``where(spec)`` holds."""
    import pytest

    from tests.optimizers.registry import REGISTRY

    return pytest.mark.parametrize("spec", [s for s in REGISTRY if where(s)], ids=lambda s: s.name)


def refresh_steps(optimizer: torch.optim.Optimizer, model: nn.Module, key: str, steps: int) -> list[int]:
    """The steps (from 1) after which ``state[key]`` of ``model``'s first weight differs from
    its value after the previous step (Shampoo: in its first block; the first value counts
    unless it is the identity, the state a root or basis starts from)."""
    weight = next(model.parameters())
    x, y = toy_data()
    changed, previous = [], None
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss_fn(model(x + 0.1 * step), y).backward()
        optimizer.step()
        state = optimizer.state[weight]
        current = state.get("block_0", state).get(key)
        if current is None:
            continue
        is_identity = current.dim() == 2 and current.shape[0] == current.shape[1] and torch.equal(
            current, torch.eye(len(current), dtype=current.dtype))
        if (not is_identity) if previous is None else not torch.equal(current, previous):
            changed.append(step)
        previous = current.clone()
    return changed
