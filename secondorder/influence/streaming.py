"""Scoring a large training set against many queries: streamed, resumable, bounded memory.

:func:`stream_pairwise_scores` prepares every query's preconditioned gradient **once**
(optionally compressed to rank ``k`` per layer, Grosse et al. 2023 §3.2), then streams the
training set in chunks of ``chunk_size`` examples: one forward/backward per training batch
serves every query, and each finished chunk's ``(Q, chunk)`` scores are written to
``output_dir`` (``chunk_<start>.safetensors``, written to a temporary name and renamed, so a
killed run never leaves half a chunk). Running again with the same arguments skips finished
chunks; other arguments raise. Memory is the model, the prepared queries
(``Q · Σ_layers k·(d_out + d_in')`` numbers with rank ``k``, ``Q · P`` without) and one
training batch's rows, independent of the training-set size.

Under ``torch.distributed`` (``distributor=``) the chunks are dealt round-robin over ranks
(chunk ``c`` on rank ``c mod world_size``); every rank writes its own chunks into the shared
directory and :func:`load_streamed_scores` assembles them once all exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from secondorder.distributed.distributor import Distributor
from secondorder.influence.collect import LayerRecorder, iterate_batches, resolve_indices
from secondorder.influence.contraction import PreparedQuery
from secondorder.influence.factors import InfluenceFactors
from secondorder.influence.sharding import influence_distributor
from secondorder.influence.storage import dataset_fingerprint, model_fingerprint
from secondorder.influence.task import InfluenceTask
from secondorder.optimizers.validation import check_int

__all__ = ["load_streamed_scores", "stream_pairwise_scores"]

_MANIFEST = "manifest.json"


def _chunk_path(directory: str, start: int) -> str:
    return os.path.join(directory, f"chunk_{start:012d}.safetensors")


def _check_manifest(directory: str, manifest: dict, rank: int) -> None:
    path = os.path.join(directory, _MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved != manifest:
            keys = set(saved) | set(manifest)
            differing = sorted(k for k in keys if saved.get(k) != manifest.get(k))
            raise ValueError(
                f"Invalid output_dir: {directory} holds scores computed with other arguments "
                f"({differing}); use another directory or delete it"
            )
    elif rank == 0:
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)


def stream_pairwise_scores(
    model: nn.Module,
    task: InfluenceTask,
    factors: InfluenceFactors,
    query_dataset: Any,
    train_dataset: Any,
    output_dir: str | os.PathLike,
    *,
    damping: float | None = None,
    chunk_size: int = 4096,
    query_batch_size: int = 64,
    train_batch_size: int = 32,
    query_indices: Sequence[int] | None = None,
    train_indices: Sequence[int] | None = None,
    low_rank: int | None = None,
    full_svd: bool = False,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributor: Distributor | torch.distributed.ProcessGroup | bool | None = None,
) -> Tensor | None:
    """Score every query against a streamed training set, resumably (module docstring).

    Args:
        output_dir: where chunks and ``manifest.json`` go.
        chunk_size: training examples per saved chunk.
        query_batch_size: queries measured per backward pass while preparing them.
        Others: as for :func:`~secondorder.influence.scores.compute_pairwise_scores`.

    Returns:
        The ``(Q, N)`` scores (float32 on the CPU) when every chunk is finished (on every rank
        when all ranks are done), else ``None``.
    """
    check_int("chunk_size", chunk_size, low=1)
    check_int("query_batch_size", query_batch_size, low=1)
    check_int("train_batch_size", train_batch_size, low=1)
    if low_rank is not None:
        check_int("low_rank", low_rank, low=1)
    directory = os.fspath(output_dir)
    os.makedirs(directory, exist_ok=True)
    queries = resolve_indices(query_dataset, query_indices, "query_indices")
    trains = resolve_indices(train_dataset, train_indices, "train_indices")
    distributor = influence_distributor(distributor)
    rank, world_size = distributor.rank, distributor.world_size
    device = None if device is None else torch.device(device)
    manifest = {
        "num_queries": len(queries),
        "num_train": len(trains),
        "chunk_size": chunk_size,
        "low_rank": low_rank,
        "full_svd": full_svd,
        "seed": seed,
        "damping": damping,
        "strategy": factors.strategy,
        "queries": dataset_fingerprint(query_dataset, queries),
        "train": dataset_fingerprint(train_dataset, trains),
        "model": model_fingerprint(model),
    }
    _check_manifest(directory, manifest, rank)
    starts = list(range(0, len(trains), chunk_size))
    mine = [s for number, s in enumerate(starts) if number % world_size == rank]
    todo = [s for s in mine if not os.path.exists(_chunk_path(directory, s))]
    if todo:
        _score_chunks(
            model, task, factors, query_dataset, train_dataset, directory, queries, trains,
            todo, damping=damping, chunk_size=chunk_size, query_batch_size=query_batch_size,
            train_batch_size=train_batch_size, low_rank=low_rank, full_svd=full_svd, seed=seed,
            collate_fn=collate_fn, device=device, progress=progress,
        )
    if world_size > 1:
        distributor.any(False)  # a collective: every rank's chunks are written
    return load_streamed_scores(directory)


def _score_chunks(
    model, task, factors, query_dataset, train_dataset, directory, queries, trains, todo, *,
    damping, chunk_size, query_batch_size, train_batch_size, low_rank, full_svd, seed,
    collate_fn, device, progress,
) -> None:
    preconditioners = factors.preconditioners(damping)
    generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(min(chunk_size, len(trains) - s) for s in todo), desc="scoring")
        except ImportError:  # tqdm is optional
            bar = None
    with LayerRecorder(model, task) as recorder:
        missing = [name for name in recorder.names if name not in factors.layers]
        if missing:
            raise ValueError(f"Invalid factors: no factors for tracked modules {missing}")
        batches = []  # one dict per query batch, prepared once for the whole stream
        for _, batch in iterate_batches(
            query_dataset, queries, query_batch_size, collate_fn, device=device
        ):
            measured = recorder.measurement_pass(batch)
            batches.append(
                {
                    name: PreparedQuery(
                        preconditioners[name], rows, len(trains), low_rank, full_svd, generator
                    )
                    for name, rows in measured.items()
                }
            )
        # every query of a layer in one operand: one product per layer and training batch
        # (popping each layer's parts as it is stacked keeps the peak at one layer's copy)
        prepared = {
            name: PreparedQuery.stack([batch.pop(name) for batch in batches])
            for name in list(batches[0])
        }
        try:
            for start in todo:
                chunk = trains[start : start + chunk_size]
                columns = []
                for positions, batch in iterate_batches(
                    train_dataset, chunk, train_batch_size, collate_fn, device=device
                ):
                    rows_by_layer = recorder.loss_pass(batch)
                    block = sum(
                        query.scores(rows_by_layer[name], False)[0]
                        for name, query in prepared.items()
                    )
                    columns.append(block.detach().to(device="cpu", dtype=torch.float32))
                    if bar is not None:
                        bar.update(len(positions))
                path = _chunk_path(directory, start)
                save_file({"scores": torch.cat(columns, dim=1).contiguous()}, path + ".tmp")
                os.replace(path + ".tmp", path)
        finally:
            if bar is not None:
                bar.close()


def load_streamed_scores(output_dir: str | os.PathLike) -> Tensor | None:
    """The ``(Q, N)`` scores of a finished :func:`stream_pairwise_scores` run, else ``None``."""
    directory = os.fspath(output_dir)
    path = os.path.join(directory, _MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"Invalid output_dir: {directory} has no {_MANIFEST}")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    starts = range(0, manifest["num_train"], manifest["chunk_size"])
    paths = [_chunk_path(directory, s) for s in starts]
    if not all(os.path.exists(p) for p in paths):
        return None
    return torch.cat([load_file(p)["scores"] for p in paths], dim=1)
