"""The task protocol: what influence needs to know about a model and its data.

A task answers three questions (the same split as kronfluence's ``Task``; Grosse et al. 2023, §2):

* the **training loss of a batch**, *summed* over its examples (and tokens) — never averaged, so
  that the captured output gradients are per-example gradients. With ``sample=True`` the labels
  are drawn from the model's own predictive distribution (the true Fisher / GGN, ekfac.md §2)
  using the ``generator`` handed in, so a seeded fit is reproducible;
* the **measurement** ``f`` of a batch of queries, summed over the batch (e.g. the query loss, or
  the summed cross-entropy of a completion's tokens);
* which modules are **tracked**, by name (``None`` = every supported layer).

Optional: :meth:`InfluenceTask.compute_train_logits` (one row of class logits per example) lets
the fit use the *exact* expectation over classes instead of a sampled label
(``fisher="exact"``), and :meth:`InfluenceTask.token_mask` excludes padded positions from the
Kronecker factors.

The model is never modified: influence only reads layer inputs and output gradients through
hooks that it removes afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["InfluenceTask", "ClassificationTask", "LanguageModelTask", "sample_labels"]

IGNORE_INDEX = -100


def sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one label per row from ``Categorical(softmax(logits))``.

    Args:
        logits: ``(..., C)``.
        generator: the source of randomness (``None`` = torch's global generator).

    Returns:
        ``(...)`` int64 labels on ``logits.device``. Sampling runs in float64 on the CPU so that
        one seed gives the same labels whatever the model's dtype or device.
    """
    probs = torch.softmax(logits.detach().to(device="cpu", dtype=torch.float64), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    labels = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return labels.to(logits.device)


class InfluenceTask:
    """Base class of a task; subclass it and implement the two loss methods.

    Sign convention of every score in :mod:`secondorder.influence`: with a *loss* measurement,
    a positive score means the training example **helped** (removing it would raise the query
    loss); see :mod:`secondorder.influence.scores`.
    """

    def compute_train_loss(
        self,
        batch: Any,
        model: nn.Module,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Scalar training loss of ``batch``, **summed** over examples and tokens.

        With ``sample=True`` use labels sampled from the model (e.g. :func:`sample_labels`
        with ``generator``) instead of the dataset labels.
        """
        raise NotImplementedError("Subclasses must implement compute_train_loss")

    def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
        """Scalar measurement ``f`` of a batch of queries, summed over the batch."""
        raise NotImplementedError("Subclasses must implement compute_measurement")

    def compute_train_logits(self, batch: Any, model: nn.Module) -> Tensor:
        """``(B, C)`` class logits of the batch, one row per example (softmax cross-entropy).

        Needed only for ``fisher="exact"``: the Fisher is then the exact expectation over the
        ``C`` classes (``C`` backward passes per batch), with no sampling noise.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement compute_train_logits, "
            "needed for fisher='exact'"
        )

    def tracked_modules(self) -> Sequence[str] | None:
        """Names (as in ``model.named_modules()``) of the modules to track; ``None`` = all."""
        return None

    def token_mask(self, batch: Any) -> Tensor | None:
        """``(B, T)`` mask (1 = real token, 0 = padding) or ``None``.

        Applied to every tracked layer whose input has ``T`` positions: masked positions count
        neither in the factors nor in the gradients.
        """
        return None


class ClassificationTask(InfluenceTask):
    """Softmax classification on ``(inputs, labels)`` batches.

    ``model(inputs)`` returns ``(B, C)`` logits; labels are ``(B,)`` int64. The training loss is
    the summed cross-entropy; the measurement is the summed cross-entropy of the queries' own
    labels (a loss: positive scores are helpful).

    Args:
        modules: names of the tracked modules, or ``None`` for all supported layers.
    """

    def __init__(self, modules: Sequence[str] | None = None) -> None:
        self._modules = None if modules is None else list(modules)

    def compute_train_logits(self, batch: Any, model: nn.Module) -> Tensor:
        inputs, _ = batch
        return model(inputs)

    def compute_train_loss(
        self,
        batch: Any,
        model: nn.Module,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        _, labels = batch
        logits = self.compute_train_logits(batch, model)
        if sample:
            labels = sample_labels(logits, generator)
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")

    def tracked_modules(self) -> Sequence[str] | None:
        return self._modules


class LanguageModelTask(InfluenceTask):
    """Next-token prediction on ``(inputs, targets)`` batches, both ``(B, T)`` int64.

    ``model(inputs)`` returns ``(B, T, V)`` logits. Targets equal to ``-100`` are ignored (e.g.
    the prompt of a prompt–completion query), so the measurement of a query is the summed
    cross-entropy of its completion tokens, i.e. ``−log p(completion | prompt)`` (a loss:
    positive scores are helpful; Grosse et al. 2023's ``I_f`` for ``f = log p`` carries the
    opposite sign twice and gives the same numbers). With ``sample=True`` one token per
    non-ignored position is drawn from the model.

    Args:
        modules: names of the tracked modules, or ``None`` for all supported layers.
    """

    def __init__(self, modules: Sequence[str] | None = None) -> None:
        self._modules = None if modules is None else list(modules)

    @staticmethod
    def _summed_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def compute_train_loss(
        self,
        batch: Any,
        model: nn.Module,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        inputs, targets = batch
        logits = model(inputs)
        if sample:
            drawn = sample_labels(logits, generator)
            targets = torch.where(targets == IGNORE_INDEX, targets, drawn)
        return self._summed_cross_entropy(logits, targets)

    def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
        inputs, targets = batch
        return self._summed_cross_entropy(model(inputs), targets)

    def tracked_modules(self) -> Sequence[str] | None:
        return self._modules
