"""Argument checks shared by every optimizer.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong kind of value) whose message
starts with ``Invalid <name>``, so a user sees which argument was wrong. The contract suite
asserts that the argument's name appears in the message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> float:
    """Check that ``value`` is a real number inside ``[low, high]`` (bounds optional).

    Returns ``float(value)``. Booleans and tensors are refused: hyperparameters that a
    scheduler rewrites must stay Python numbers so that ``state_dict`` stays picklable.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a real number)")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"Invalid {name}: {value} (must be {bound} {low})")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"Invalid {name}: {value} (must be {bound} {high})")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, allow_inf: bool = False) -> int | float:
    """Check that ``value`` is an integer ``>= low``; ``math.inf`` is allowed when ``allow_inf``."""
    if allow_inf and isinstance(value, float) and math.isinf(value) and value > 0:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int)")
    if low is not None and value < low:
        raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
    return value


def check_betas(name: str, betas: Any, *, allow_one: Sequence[bool] = (False, False)) -> tuple[float, ...]:
    """Check a pair of decay rates, each in ``[0, 1)`` (``[0, 1]`` where ``allow_one`` says so)."""
    if not isinstance(betas, Iterable) or isinstance(betas, str):
        raise TypeError(f"Invalid {name}: {betas!r} (expected a pair of floats)")
    betas = tuple(betas)
    if len(betas) != len(allow_one):
        raise ValueError(f"Invalid {name}: {betas!r} (expected {len(allow_one)} values)")
    for index, (beta, one_ok) in enumerate(zip(betas, allow_one)):
        check_real(f"{name}[{index}]", beta, low=0.0, high=1.0, high_inclusive=one_ok)
    return tuple(float(b) for b in betas)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")
    return value
