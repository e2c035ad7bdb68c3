"""Influence speed at size: ``secondorder.influence`` against kronfluence 1.0.1, one run.

    python -m benchmarks.influence_speed [--model conv|lm|both] [--dtype float32|float64]
        [--threads 1] [--lm-train 64] [--lm-queries 8]

Both sides run the same EK-FAC pipeline in one process with the same thread count
(``torch.set_num_threads``, the one policy of this script): empirical Fisher, explicit damping
``1e-3``, no example caps, batch 64 for fitting and for training examples, every query in one
query batch, the same tracked modules. Reported per model: fit and score wall times of each
side (the best of ``--repeats`` alternating runs, 3 by default: the machine is shared and
noise only adds time), the ratio of the totals, and the relative difference ``‖ours − theirs‖ / ‖theirs‖`` of
the scores (float32: expect ≲ 1e-5; float64: ≲ 1e-10).

Models:

* **conv** (76,522 parameters): ``Conv2d(1,32,3,p=1) → ReLU → Conv2d(32,32,3,p=1) → ReLU →
  MaxPool2d(2) → Linear(512,128) → ReLU → Linear(128,10)`` on scikit-learn digits (8×8),
  1,500 training × 297 query images (the whole data set), trained briefly with Adam.
* **lm**: the benchmark byte-level transformer (:class:`benchmarks.models.ByteTransformer`,
  875,520 parameters, context 128), every ``nn.Linear`` tracked (kronfluence tracks no
  embeddings), per-token scores ``(Q, N, T)``, windows of the standard-library corpus; the
  measurement is the summed cross-entropy of each query window.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.data import fixed_windows, load_digits_split, load_stdlib_corpus
from benchmarks.models import ByteTransformer, count_parameters
from secondorder import influence

DAMPING = 1e-3
BATCH = 64


def conv_model() -> nn.Sequential:
    """The 76,522-parameter conv net (module docstring), input ``(B, 1, 8, 8)``."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def conv_problem(dtype: torch.dtype, steps: int = 150):
    """``(model, train TensorDataset, query TensorDataset, task kwargs)``: digits, Adam-trained."""
    torch.manual_seed(0)
    split = load_digits_split()
    images = torch.cat([split.train_x, split.test_x]).reshape(-1, 1, 8, 8).to(dtype)
    labels = torch.cat([split.train_y, split.test_y])
    model = conv_model().to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, 1500, (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(images[pick]), labels[pick]).backward()
        optimizer.step()
    model.eval()
    train = TensorDataset(images[:1500], labels[:1500])
    query = TensorDataset(images[1500:], labels[1500:])
    return model, train, query


def lm_problem(dtype: torch.dtype, n_train: int, n_query: int):
    """``(model, train, query)``: the benchmark byte transformer on stdlib windows."""
    torch.manual_seed(0)
    corpus = load_stdlib_corpus(max_bytes=400_000)
    model = ByteTransformer().to(dtype).eval()
    train = TensorDataset(*fixed_windows(corpus.train, n_train, 128))
    query = TensorDataset(*fixed_windows(corpus.test, n_query, 128))
    return model, train, query


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def run_ours(model, task, train, query, dtype, per_token: bool):
    start = time.perf_counter()
    factors = influence.fit_factors(
        model, task, train, strategy="ekfac", batch_size=BATCH, progress=False, dtype=dtype
    )
    fitted = time.perf_counter()
    result = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query,
        train,
        damping=DAMPING,
        query_batch_size=len(query),
        train_batch_size=BATCH,
        per_token=per_token,
        progress=False,
    )
    done = time.perf_counter()
    scores = result.per_token if per_token else result.scores
    return scores, fitted - start, done - fitted


def run_kronfluence(model, train, query, dtype, language_model: bool, modules: list[str]):
    import kronfluence
    from kronfluence.arguments import FactorArguments, ScoreArguments

    class Task(kronfluence.Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

    wrapped = kronfluence.prepare_model(copy.deepcopy(model), Task())
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=DAMPING,
        query_gradient_svd_dtype=dtype,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        compute_per_token_scores=language_model,
    )
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = kronfluence.Analyzer(
            analysis_name="speed",
            model=wrapped,
            task=Task(),
            cpu=True,
            disable_tqdm=True,
            output_dir=directory,
            log_level=logging.ERROR,
        )
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=BATCH,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="ekfac",
            factors_name="ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=BATCH,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        done = time.perf_counter()
        scores = analyzer.load_pairwise_scores("ekfac")["all_modules"]
    return scores, fitted - start, done - fitted


def compare(name, model, train, query, dtype, language_model: bool, repeats: int = 1) -> dict:
    modules = linear_names(model) if language_model else None
    if language_model:
        task = influence.LanguageModelTask(modules=modules)
    else:
        task = influence.ClassificationTask()
        modules = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    our_fit = our_score = their_fit = their_score = float("inf")
    for _ in range(repeats):  # best of the repeats: the machine is shared, noise only adds
        ours, fit_s, score_s = run_ours(model, task, train, query, dtype, language_model)
        our_fit, our_score = min(our_fit, fit_s), min(our_score, score_s)
        theirs, fit_s, score_s = run_kronfluence(
            model, train, query, dtype, language_model, modules
        )
        their_fit, their_score = min(their_fit, fit_s), min(their_score, score_s)
    theirs = theirs.to(ours.dtype)
    if theirs.shape != ours.shape:  # kronfluence pads nothing; ours is (Q, N, T) as well
        raise AssertionError(f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    relative = float((ours - theirs).norm() / theirs.norm())
    row = {
        "model": name,
        "parameters": count_parameters(model),
        "train": len(train),
        "queries": len(query),
        "ours_fit_s": our_fit,
        "ours_score_s": our_score,
        "kronfluence_fit_s": their_fit,
        "kronfluence_score_s": their_score,
        "speedup": (their_fit + their_score) / (our_fit + our_score),
        "relative_difference": relative,
    }
    print(
        f"| {name} | {row['parameters']:,} | {row['train']:,} × {row['queries']} "
        f"| {our_fit:.2f} / {our_score:.2f} | {their_fit:.2f} / {their_score:.2f} "
        f"| {row['speedup']:.1f}× | {relative:.1e} |",
        flush=True,
    )
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("conv", "lm", "both"), default="both")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm-train", type=int, default=64)
    parser.add_argument("--lm-queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per side")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # one-time imports outside the timings: the capture hooks switch on torch.compile's hook
    # guards (importing torch._dynamo, ~1 s), kronfluence imports its stack
    importlib.import_module("kronfluence.analyzer")
    importlib.import_module("torch._dynamo")

    print(
        f"EK-FAC, damping {DAMPING}, batch {BATCH}, {args.dtype}, {args.threads} thread(s), "
        f"best of {args.repeats} runs per side and stage"
    )
    print(
        "| model | parameters | train × queries | ours fit / score (s) "
        "| kronfluence fit / score (s) | speed-up | relative difference |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = []
    if args.model in ("conv", "both"):
        rows.append(
            compare("conv", *conv_problem(dtype), dtype, False, repeats=args.repeats)
        )
    if args.model in ("lm", "both"):
        problem = lm_problem(dtype, args.lm_train, args.lm_queries)
        rows.append(compare("byte LM (per-token)", *problem, dtype, True, repeats=args.repeats))
    return rows


if __name__ == "__main__":
    main()
