"""Influence at language-model scale on one CPU machine: throughput, peak memory, resume.

    python -m benchmarks.influence_scale [--train 2048] [--queries 100] [--rank 32]
        [--chunk 512] [--fit 512] [--batch 32] [--train-batch 128] [--threads 1]
        [--compare-queries 100] [--out DIR]

The benchmark byte transformer (:class:`benchmarks.models.ByteTransformer`, 875,520
parameters, every ``nn.Linear`` tracked), EK-FAC factors fitted on ``--fit`` windows, then
``--queries`` query windows against ``--train`` training windows of 128 bytes of the
standard-library corpus, streamed by :func:`secondorder.influence.stream_pairwise_scores`:
queries preconditioned once and compressed to rank ``--rank`` per layer, training windows
cut on the fly (never materialised), chunks of ``--chunk`` scores written to ``--out`` (a
rerun resumes; delete the directory to start over), a tqdm bar.

Reported: fit time, scoring throughput (training sequences per second, and per thread), peak
resident memory (``ru_maxrss``), the projected time for 100,000 and 1,000,000 sequences at
the measured throughput, and the error of the rank-``k`` compression: relative Frobenius
error and mean per-query Spearman of the compressed scores of the first chunk against
uncompressed ones.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
from torch.utils.data import Dataset

from benchmarks.data import load_stdlib_corpus
from benchmarks.models import ByteTransformer
from secondorder import influence
from secondorder.influence.evaluation import spearman_columns

CONTEXT = 128


class Windows(Dataset):
    """``count`` evenly spaced ``(inputs, next-byte targets)`` windows of ``data``, cut lazily."""

    def __init__(self, data: torch.Tensor, count: int, context: int = CONTEXT) -> None:
        self.data, self.count, self.context = data, count, context
        self.span = len(data) - context - 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        start = index * self.span // max(self.count - 1, 1)
        window = self.data[start : start + self.context + 1].long()
        return window[:-1], window[1:]


def peak_memory_gib() -> float:
    """Peak resident memory of this process (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--fit", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="query and fitting batch")
    parser.add_argument(
        "--train-batch",
        type=int,
        default=128,
        help="training sequences per contraction (the rank-k queries are decompressed once "
        "per layer and batch, so larger batches amortise it; memory grows with it)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compare-queries", type=int, default=100, help="queries checked uncompressed"
    )
    parser.add_argument("--out", default=None, help="score directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    corpus = load_stdlib_corpus()
    model = ByteTransformer().eval()
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    task = influence.LanguageModelTask(modules=modules)
    train = Windows(corpus.train, args.train)
    query = Windows(corpus.test, args.queries)
    fit_set = Windows(corpus.train, args.fit)

    start = time.perf_counter()
    factors = influence.fit_factors(model, task, fit_set, strategy="ekfac", batch_size=args.batch)
    fit_seconds = time.perf_counter() - start
    directory = args.out or tempfile.mkdtemp(prefix="influence_scale_")
    os.makedirs(directory, exist_ok=True)
    finished_before = len([p for p in os.listdir(directory) if p.endswith(".safetensors")])
    start = time.perf_counter()
    scores = influence.stream_pairwise_scores(
        model,
        task,
        factors,
        query,
        train,
        directory,
        damping=None,
        chunk_size=args.chunk,
        query_batch_size=args.batch,
        train_batch_size=args.train_batch,
        low_rank=args.rank,
    )
    score_seconds = time.perf_counter() - start
    scored = args.train - min(finished_before * args.chunk, args.train)
    throughput = scored / score_seconds if scored else float("nan")
    peak = peak_memory_gib()

    # compression error on the first chunk: uncompressed scores of the same pairs (the first
    # --compare-queries queries: uncompressed queries take Q·P numbers of memory)
    first = list(range(min(args.chunk, args.train)))
    checked = list(range(min(args.compare_queries, args.queries)))
    exact = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query,
        train,
        damping=None,
        query_batch_size=len(checked),  # one training pass
        train_batch_size=args.batch,
        query_indices=checked,
        train_indices=first,
        progress=False,
    ).scores.float()
    compressed = scores[checked][:, first]
    relative = float((compressed - exact).norm() / exact.norm())
    spearman = float(spearman_columns(compressed.T, exact.T).nanmean())

    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": args.train,
        "queries": args.queries,
        "rank": args.rank,
        "threads": args.threads,
        "fit_examples": args.fit,
        "fit_s": fit_seconds,
        "score_s": score_seconds,
        "resumed_chunks": finished_before,
        "sequences_per_s": throughput,
        "sequences_per_s_per_thread": throughput / args.threads,
        "peak_rss_gib": peak,
        "projected_hours_100k": 100_000 / throughput / 3600 if scored else None,
        "projected_hours_1m": 1_000_000 / throughput / 3600 if scored else None,
        "low_rank_relative_error": relative,
        "low_rank_spearman": spearman,
        "output_dir": directory,
    }
    print(
        f"byte LM ({result['parameters']:,} parameters), {args.queries} queries × {args.train:,} "
        f"training sequences of {CONTEXT} bytes, rank {args.rank}, {args.threads} thread(s)\n"
        f"fit ({args.fit} sequences): {fit_seconds:.1f}s; scoring: {score_seconds:.1f}s "
        f"({finished_before} chunks resumed from disk)\n"
        f"throughput: {throughput:.2f} sequences/s ({throughput / args.threads:.2f} per thread); "
        f"peak resident memory {peak:.2f} GiB\n"
        f"projected at this throughput: 100k sequences {result['projected_hours_100k']:.1f} h, "
        f"1M sequences {result['projected_hours_1m']:.1f} h (one process; ranks divide it)\n"
        f"rank-{args.rank} compression vs uncompressed ({len(checked)} queries × {len(first)} "
        f"sequences): relative error "
        f"{relative:.2e}, mean per-query Spearman {spearman:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
