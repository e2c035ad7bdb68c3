"""Benchmark data that ships with installed packages (no download at run time).

Workloads (see ``benchmarks/workloads.py``):

* **W1** — scikit-learn's ``load_digits`` (1,797 real 8×8 digit images, 10 classes),
  standardised with the *training* mean/std, fixed train/held-out split:
  :func:`load_digits_split`.
* **W2** — a byte-level language-model corpus built from the Python standard library's own
  files: the prose of ``pydoc_data.topics`` (the language-reference topics, in sorted key
  order) followed by a sorted, fixed list of pure-Python stdlib modules. The text is
  cut into 4 KiB chunks and every 10th chunk is held out, so both splits mix prose and
  code. :func:`load_stdlib_corpus` returns it with its sha256 (which depends on the Python
  version; the race records it).
* **W3** / **W3s** — ``load_diabetes`` regression and badly-scaled ``load_breast_cancer``:
  their loaders are in ``benchmarks/workload_regression.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CORPUS_MODULES",
    "ByteCorpus",
    "TensorSplit",
    "load_digits_split",
    "load_stdlib_corpus",
    "sample_windows",
    "fixed_windows",
]


@dataclass(frozen=True)
class TensorSplit:
    """A supervised dataset with a fixed train / held-out split.

    ``train_x``: ``(n_train, d)`` float32, ``train_y``: ``(n_train,)`` int64 class labels (or
    ``(n_train, k)`` float32 targets for regression); ``test_x`` / ``test_y`` likewise for
    the held-out part. ``meta`` holds what the race records (sizes, split seed, source).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    meta: dict


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> TensorSplit:
    """W1: ``sklearn.datasets.load_digits``, standardised, with a fixed held-out split.

    The permutation comes from ``numpy.random.RandomState(seed)`` (stable across numpy
    versions). Features are standardised with the training mean and standard deviation
    (constant pixels get std 1). Returns ``train_x (1438, 64)``, ``train_y (1438,)`` and
    ``test_x (359, 64)``, ``test_y (359,)`` at the default fraction.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction} (expected 0 < test_fraction < 1)")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.RandomState(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    as_x = lambda idx: torch.from_numpy(x[idx]).to(torch.float32)  # noqa: E731
    as_y = lambda idx: torch.from_numpy(y[idx])  # noqa: E731
    meta = {
        "source": "sklearn.datasets.load_digits",
        "n_train": len(train_idx),
        "n_test": n_test,
        "n_features": x.shape[1],
        "n_classes": 10,
        "split_seed": seed,
    }
    return TensorSplit(as_x(train_idx), as_y(train_idx), as_x(test_idx), as_y(test_idx), meta)


# Pure-Python standard-library modules present from Python 3.10 to 3.13, in sorted order.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "inspect.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
)
CHUNK_BYTES = 4096
HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class ByteCorpus:
    """W2's corpus as bytes, split into train and held-out parts.

    ``train`` / ``test``: 1-D uint8 tensors of byte values (vocabulary 256). ``sha256`` is
    the hex digest of the whole corpus before the split; ``meta`` lists its sources.
    """

    train: torch.Tensor
    test: torch.Tensor
    sha256: str
    meta: dict


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _corpus_bytes(modules: tuple[str, ...]) -> tuple[bytes, list[str]]:
    """The raw corpus: pydoc topics prose (sorted keys) then each module's source, sorted."""
    from pydoc_data.topics import topics

    parts = ["\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")]
    used = ["pydoc_data.topics (prose, sorted keys)"]
    root = _stdlib_dir()
    for rel in sorted(modules):
        path = os.path.join(root, *rel.split("/"))
        if os.path.isfile(path):  # a module a Python version lacks is left out (and not listed)
            with open(path, "rb") as handle:
                parts.append(handle.read())
            used.append(rel)
    return b"\n\n".join(parts), used


def load_stdlib_corpus(
    modules: tuple[str, ...] = CORPUS_MODULES, max_bytes: int | None = None
) -> ByteCorpus:
    """W2: the standard-library byte corpus with a deterministic interleaved held-out split.

    The corpus (``max_bytes`` truncates it, for quick runs) is cut into ``CHUNK_BYTES``
    chunks; chunk ``i`` is held out when ``i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1``. The
    train and held-out tensors are the concatenations of their chunks, so a few training
    windows straddle chunk borders (harmless for a benchmark). Roughly 1.3 MB on Python
    3.11, split 90/10.
    """
    if max_bytes is not None and max_bytes < HELD_OUT_EVERY * CHUNK_BYTES:
        raise ValueError(
            f"Invalid max_bytes: {max_bytes} (need at least {HELD_OUT_EVERY * CHUNK_BYTES})"
        )
    raw, used = _corpus_bytes(tuple(modules))
    if max_bytes is not None:
        raw = raw[:max_bytes]
    digest = hashlib.sha256(raw).hexdigest()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    chunks = torch.split(data, CHUNK_BYTES)
    held = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    meta = {
        "sources": used,
        "n_bytes": len(raw),
        "n_train": sum(len(c) for c in kept),
        "n_test": sum(len(c) for c in held),
        "chunk_bytes": CHUNK_BYTES,
        "held_out_every": HELD_OUT_EVERY,
        "python": sys.version.split()[0],
        "sha256": digest,
    }
    return ByteCorpus(torch.cat(kept), torch.cat(held), digest, meta)


def sample_windows(
    data: torch.Tensor, batch: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: inputs ``(batch, context)`` and next-byte targets, both int64.

    Start offsets are drawn uniformly from ``generator``, so one seed gives one data order.
    """
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


def fixed_windows(
    data: torch.Tensor, count: int, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced windows (deterministic) for evaluation, ``(count, context)`` each."""
    span = len(data) - context - 1
    if span <= 0:
        raise ValueError(f"Invalid context: {context} (data has only {len(data)} bytes)")
    starts = torch.linspace(0, span, count).long()
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]
