"""FSDP2-sharded parameters: recognising them and naming their per-shard state.

``torch.distributed.fsdp.fully_shard`` turns each parameter into a
:class:`~torch.distributed.tensor.DTensor` whose local tensor is this rank's shard (by default
``Shard(0)``: a contiguous range of rows). Optimizers that precondition *blocks of the local
shard* (Shampoo) keep one state dict per block under a key that names the shard
(:func:`shard_key_prefix`), so that

* DCP never mistakes two ranks' different state for replicated copies of one tensor (DCP
  keeps one copy of a plain tensor saved under the same key by several ranks,
  pytorch/pytorch#120356), while replicas of the same shard (HSDP) do share a key, and
* a checkpoint loaded where the shard boundaries differ (another world size) is detected
  instead of silently starting the preconditioners afresh
  (:func:`check_shard_layout`, called by :func:`~secondorder.distributed.load_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

__all__ = ["is_sharded", "shard_key_prefix", "check_shard_layout"]

_SHARD_KEY = re.compile(r"^shard@[0-9,]+:[0-9x]+_")
_WHOLE_BLOCK_KEY = re.compile(r"^block_[0-9]+$")


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is a DTensor split over ranks (some ``Shard`` placement), e.g. FSDP2's."""
    return isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements)


def shard_key_prefix(param: Tensor) -> str:
    """``"shard@<offsets>:<shape>_"``: the global offset and shape of this rank's shard.

    Args:
        param: a sharded DTensor (:func:`is_sharded`), e.g. global ``(16, 6)`` with
            ``Shard(0)`` on 2 ranks → ``"shard@8,0:8x6_"`` on rank 1.

    Returns:
        A prefix for state keys (no dots, so DCP's dotted paths stay unambiguous).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return f"shard@{','.join(map(str, offset))}:{'x'.join(map(str, shape))}_"


def check_shard_layout(
    saved_keys: Iterable[str], template_keys: Iterable[str], whole_parameters: bool = False
) -> None:
    """Refuse a checkpoint whose per-shard state was cut at other shard boundaries, or whose
    blocks are cut otherwise than the optimizer's (whole parameters vs local shards).

    Args:
        saved_keys: the checkpoint's flattened state paths (``"optim.state.<fqn>.<key>..."``).
        template_keys: the same paths of the state about to be loaded on this rank.
        whole_parameters: the optimizer preconditions whole parameters (every optimizer but
            Shampoo with ``fsdp_mode="local_shard"`` on FSDP2 parameters); decided from the
            optimizer, so every rank raises alike.

    Raises:
        ValueError: the checkpoint holds per-shard state but the optimizer preconditions whole
            parameters; or some parameter has per-shard state in the checkpoint but none of this
            rank's shard keys for it (other shard boundaries: another world size or mesh); or
            this rank preconditions shards of a parameter saved as whole-parameter blocks.
    """
    saved_keys = list(saved_keys)
    saved_by_param = _shard_keys_by_param(saved_keys)
    if whole_parameters and saved_by_param:
        raise ValueError(
            f"Invalid checkpoint: it holds per-shard preconditioners (Shampoo with fsdp_mode='local_shard') "
            f"for {sorted(saved_by_param)[:3]}, but this optimizer preconditions whole parameters "
            "(fsdp_mode='lossless', the default); resume it with fsdp_mode='local_shard' at the same world size"
        )
    saved_whole = _whole_block_params(saved_keys)
    for param, keys in _shard_keys_by_param(template_keys).items():
        saved = saved_by_param.get(param)
        if not saved and param in saved_whole:
            raise ValueError(
                f"Invalid checkpoint: the sharded parameter {param!r} was saved with whole-parameter "
                "blocks (fsdp_mode='lossless', DDP or one process), but this optimizer preconditions "
                "local shards (fsdp_mode='local_shard'); resume it with fsdp_mode='lossless'"
            )
        if saved and not keys & saved:
            raise ValueError(
                f"Invalid checkpoint: optimizer state of the sharded parameter {param!r} was saved for shards "
                f"{sorted(saved)} but this rank holds {sorted(keys)}; per-shard preconditioners "
                "(Shampoo on FSDP2 parameters) resume only with the same shard boundaries (same world size "
                "and mesh)"
            )


def _whole_block_params(paths: Iterable[str]) -> set[str]:
    """The param paths with whole-parameter block state (``"<param>.block_3..."``)."""
    found = set()
    for path in paths:
        parts = path.split(".")
        for index, part in enumerate(parts):
            if _WHOLE_BLOCK_KEY.match(part):
                found.add(".".join(parts[:index]))
                break
    return found


def _shard_keys_by_param(paths: Iterable[str]) -> dict[str, set[str]]:
    """``{param path: {shard prefixes}}`` for the state paths that name a shard."""
    found: dict[str, set[str]] = {}
    for path in paths:
        parts = path.split(".")
        for index, part in enumerate(parts):
            match = _SHARD_KEY.match(part)
            if match:
                found.setdefault(".".join(parts[:index]), set()).add(match.group(0))
                break
    return found
