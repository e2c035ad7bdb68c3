"""On-disk stages: tensors as safetensors, their arguments as JSON; skip, load or refuse.

Each fitted stage (covariance, eigendecomposition, eigenvalue correction, or one data partition
of a stage) is two files in the factors directory::

    <stage>.safetensors   tensors keyed "<module name>/<tensor name>"
    <stage>.json          {"stage": ..., "format": 1, "arguments": {...}}

The JSON is written last, so its presence means the stage finished. Loading uses
``safetensors.torch.load_file`` (no pickle). Asking for a stage that exists with the **same**
arguments loads it (the work is skipped); with **different** arguments (another strategy,
Fisher mode, dataset or model) raises a ``ValueError`` that names what differs, unless
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StageStore", "dataset_fingerprint", "model_fingerprint"]

FORMAT_VERSION = 1


def model_fingerprint(model: nn.Module, modules: Iterable[str] | None = None) -> str:
    """sha256 of the model's parameters (names, shapes, dtypes and values), in name order.

    Args:
        model: the model.
        modules: restrict to the parameters of these module names (``None`` = all).

    Returns:
        A hex digest; equal models (same weights) give the same string.
    """
    digest = hashlib.sha256()
    prefixes = None if modules is None else tuple(sorted(modules))
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if prefixes is not None and not any(
            name.rsplit(".", 1)[0] == prefix for prefix in prefixes
        ):
            continue
        data = parameter.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _hash_value(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _hash_value(digest, item)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _hash_value(digest, value[key])
    else:
        digest.update(repr(value).encode())


def dataset_fingerprint(dataset: Any, indices: list[int]) -> str:
    """Short sha256 of the dataset's type, the chosen indices and three of their examples
    (first, middle, last): cheap, and enough to notice that other data is being fitted."""
    digest = hashlib.sha256(type(dataset).__name__.encode())
    digest.update(",".join(str(int(i)) for i in indices).encode())
    if indices:
        for position in sorted({0, len(indices) // 2, len(indices) - 1}):
            _hash_value(digest, dataset[indices[position]])
    return digest.hexdigest()[:16]


def _describe_difference(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    keys = sorted(set(saved) | set(wanted))
    parts = []
    for key in keys:
        if saved.get(key) != wanted.get(key):
            if key == "model":
                parts.append("the model's weights differ from those the stage was fitted on")
            else:
                parts.append(f"{key}: saved {saved.get(key)!r}, now {wanted.get(key)!r}")
    return "; ".join(parts)


class StageStore:
    """A directory of finished stages (or an in-memory stand-in when ``directory`` is None).

    Args:
        directory: where the stage files live (created on first save); ``None`` keeps nothing.
        overwrite: recompute and replace stages whose arguments differ instead of refusing.
    """

    def __init__(self, directory: str | os.PathLike | None, overwrite: bool = False) -> None:
        self.directory = None if directory is None else Path(directory)
        self.overwrite = bool(overwrite)

    def _paths(self, stage: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{stage}.safetensors", self.directory / f"{stage}.json"

    def saved_arguments(self, stage: str) -> dict[str, Any] | None:
        """The JSON arguments of a finished stage, or ``None`` when it is not on disk."""
        if self.directory is None:
            return None
        _, json_path = self._paths(stage)
        if not json_path.is_file():
            return None
        with open(json_path, encoding="utf-8") as handle:
            record = json.load(handle)
        return record["arguments"]

    def load(self, stage: str, arguments: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """Return the stage's tensors when it finished with ``arguments``; ``None`` when absent.

        Raises:
            ValueError: the stage exists with other arguments (and ``overwrite`` is off).
        """
        saved = self.saved_arguments(stage)
        if saved is None:
            return None
        wanted = json.loads(json.dumps(dict(arguments)))  # normalise tuples -> lists
        if saved != wanted:
            if self.overwrite:
                return None
            raise ValueError(
                f"Invalid arguments: stage '{stage}' in {self.directory} was fitted with "
                "other arguments "
                f"({_describe_difference(saved, wanted)}); pass overwrite=True or use another name"
            )
        from safetensors.torch import load_file

        tensor_path, _ = self._paths(stage)
        return load_file(str(tensor_path))

    def save(self, stage: str, tensors: Mapping[str, Tensor], arguments: Mapping[str, Any]) -> None:
        """Write the stage's tensors, then its JSON (atomically, via temporary files)."""
        if self.directory is None:
            return
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensor_path, json_path = self._paths(stage)
        record = {"stage": stage, "format": FORMAT_VERSION, "arguments": dict(arguments)}
        text = json.dumps(record, indent=2, sort_keys=True)
        if json_path.exists():
            json_path.unlink()  # the stage is unfinished until the new JSON lands
        temporary = tensor_path.with_suffix(".safetensors.tmp")
        contiguous = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
        save_file(
            contiguous,
            str(temporary),
            metadata={"arguments": json.dumps(record["arguments"], sort_keys=True)},
        )
        os.replace(temporary, tensor_path)
        temporary_json = json_path.with_suffix(".json.tmp")
        with open(temporary_json, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary_json, json_path)
