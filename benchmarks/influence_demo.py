"""Which training text made the language model write this? EK-FAC influence on the race's char-LM.

    python -m benchmarks.influence_demo [--prompt TEXT] [--completion TEXT] [--steps N]
                                        [--sequences N] [--strategy ekfac] [--out DIR]

1. Trains (or reloads from ``--out``) the byte-level transformer of the benchmark race
   (``benchmarks.models.ByteTransformer``, the quick W2 configuration) on the race's training
   text (``benchmarks.data.load_stdlib_corpus``: Python's own documentation and sources).
2. Cuts the training text into non-overlapping sequences and fits EK-FAC factors on them
   (true Fisher, labels sampled with a fixed seed; saved in ``--out/factors`` and reused on the
   next run).
3. Scores every training sequence against the query ``log p(completion | prompt)`` and
   answers "which training files taught the model this completion?": the scores summed per
   source file of the corpus (pydoc prose or a standard-library module), strongest first;
   then the 10 most helpful and the 10 most harmful sequences, and the per-token influence
   inside the most helpful one.

Sign and units: the measurement is the completion's cross-entropy ``−log p``; a **positive**
score means the sequence **helped** (made the completion more likely). "score/N" divides the raw
score by the number of 64-byte sequences in the whole training text: the predicted change of
``−log p(completion)`` if that sequence were removed (Grosse et al. 2023's scale; a rough
reading for a model trained by SGD on random windows). A position's score is the part of the
sequence's gradient the tracked layers carry at that position (mostly the loss term
predicting that token), not the effect of the token's presence.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sysconfig
import time

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.data import (
    CHUNK_BYTES,
    HELD_OUT_EVERY,
    _corpus_bytes,
    fixed_windows,
    load_stdlib_corpus,
    sample_windows,
)
from benchmarks.models import ByteTransformer
from secondorder import influence

CONFIG = dict(d_model=64, n_layers=4, n_heads=4, d_ff=256, context=64)  # the race's quick W2 model


def train_model(corpus, steps: int, seed: int) -> ByteTransformer:
    """AdamW on random windows of the training text (the race's AdamW settings for W2)."""
    torch.manual_seed(seed)
    model = ByteTransformer(**CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05
    )
    for step in range(steps):
        inputs, targets = sample_windows(corpus.train, 16, CONFIG["context"], generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f"  step {step + 1}/{steps}: train loss {loss.item():.3f}")
    return model.eval()


def training_sequences(corpus, count: int) -> TensorDataset:
    """``count`` evenly spaced windows over the whole training text (prose and code):
    inputs and next bytes, ``(count, context)`` each."""
    return TensorDataset(*fixed_windows(corpus.train, count, CONFIG["context"]))


def sequence_files(corpus, count: int) -> tuple[list[str], list[int]]:
    """The source file of each of :func:`training_sequences`' windows.

    Returns:
        ``(file names, file index of every window)``. The corpus is the files joined by
        blank lines, cut in ``CHUNK_BYTES`` chunks with every ``HELD_OUT_EVERY``-th held out;
        a window is attributed to the file its first byte comes from.
    """
    from benchmarks.data import CORPUS_MODULES

    raw, names = _corpus_bytes(tuple(CORPUS_MODULES))
    if len(raw) != corpus.meta["n_bytes"]:
        raise ValueError("Invalid corpus: truncated corpora are not mapped to files")
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    starts, position = [0], len(prose) + 2
    root = sysconfig.get_paths()["stdlib"]
    for rel in names[1:]:
        starts.append(position)
        position += os.path.getsize(os.path.join(root, *rel.split("/"))) + 2
    span = len(corpus.train) - CONFIG["context"] - 1
    files = []
    for offset in torch.linspace(0, span, count).long().tolist():
        chunk = offset // CHUNK_BYTES
        raw_chunk = chunk + chunk // (HELD_OUT_EVERY - 1)  # skip the held-out chunks
        raw_offset = raw_chunk * CHUNK_BYTES + offset % CHUNK_BYTES
        files.append(bisect.bisect_right(starts, raw_offset) - 1)
    return ["pydoc topics (prose)"] + list(names[1:]), files


def query_example(prompt: str, completion: str) -> TensorDataset:
    """One query: inputs ``prompt + completion[:-1]``, targets ``-100`` on the prompt."""
    prompt_bytes, completion_bytes = list(prompt.encode()), list(completion.encode())
    sequence = prompt_bytes + completion_bytes
    if len(sequence) - 1 > CONFIG["context"]:
        raise ValueError(
            f"Invalid prompt: prompt + completion exceed the context of {CONFIG['context']} bytes"
        )
    inputs = torch.tensor(sequence[:-1])
    targets = torch.tensor([-100] * (len(prompt_bytes) - 1) + completion_bytes)
    return TensorDataset(inputs[None], targets[None])


def show(data: torch.Tensor, width: int = 64) -> str:
    """Printable excerpt of a byte sequence."""
    text = bytes(data.tolist()).decode("utf-8", errors="replace")
    return repr(text[:width])[1:-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="    def __init__(self, ")
    parser.add_argument("--completion", default="*args, **kwargs):")
    parser.add_argument(
        "--steps", type=int, default=600, help="training steps (when no saved model)"
    )
    parser.add_argument(
        "--sequences", type=int, default=2000, help="training sequences to attribute over"
    )
    parser.add_argument("--strategy", default="ekfac", choices=influence.STRATEGIES)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/influence_demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    corpus = load_stdlib_corpus()

    model_path = os.path.join(args.out, "model.pt")
    start = time.perf_counter()
    if os.path.exists(model_path):
        model = ByteTransformer(**CONFIG)
        model.load_state_dict(torch.load(model_path, weights_only=True))
        model.eval()
        print(f"loaded the trained model from {model_path}")
    else:
        print(f"training the byte-level transformer ({args.steps} AdamW steps)")
        model = train_model(corpus, args.steps, args.seed)
        torch.save(model.state_dict(), model_path)
    print(f"  {time.perf_counter() - start:.0f}s")

    train_set = training_sequences(corpus, args.sequences)
    query_set = query_example(args.prompt, args.completion)
    # every Linear plus the token embedding; the position embedding is called on arange(T)
    # without a batch dimension, so it has no per-example gradient and is left out
    modules = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or name == "tok"
    ]
    task = influence.LanguageModelTask(modules=modules)
    with torch.no_grad():
        inputs, targets = query_set.tensors
        logp = -F.cross_entropy(model(inputs)[0], targets[0], ignore_index=-100, reduction="sum")
    print(
        f"query: {args.prompt!r} -> {args.completion!r}; "
        f"log p(completion | prompt) = {logp.item():.2f}"
    )

    start = time.perf_counter()
    factors = influence.fit_factors(
        model,
        task,
        train_set,
        strategy=args.strategy,
        fisher="sampled",
        seed=args.seed,
        batch_size=32,
        output_dir=os.path.join(args.out, "factors"),
    )
    fitted = time.perf_counter()
    result = influence.compute_pairwise_scores(
        model, task, factors, query_set, train_set, damping=None, train_batch_size=32
    )
    scored = time.perf_counter()
    print(
        f"{args.strategy} factors on {len(train_set)} sequences of {CONFIG['context']} bytes: "
        f"{fitted - start:.0f}s; scoring: {scored - fitted:.0f}s "
        f"(damping 0.1 x mean eigenvalue per layer)"
    )

    names, files = sequence_files(corpus, len(train_set))
    per_file = torch.zeros(len(names), dtype=torch.float64).index_add_(
        0, torch.tensor(files), result.scores[0].double()
    )
    sizes = torch.bincount(torch.tensor(files), minlength=len(names))
    print(
        "\nwhich training files taught the model this completion? "
        "(scores summed per file; positive = helped)"
    )
    order = torch.argsort(per_file, descending=True)[: args.top].tolist()
    for rank, index in enumerate(order, 1):
        print(
            f"  {rank:2d}. {names[index]:<28s} {per_file[index].item():+10.3f} "
            f"over {int(sizes[index])} sequences"
        )
    least = int(torch.argmin(per_file))
    print(f"  most harmful file: {names[least]} {per_file[least].item():+.3f}")

    best = result.top_k(args.top)
    count = len(corpus.train) // CONFIG["context"]  # the training text in sequences
    for title, indices, values in (
        ("most helpful", best.helpful_indices[0], best.helpful_scores[0]),
        ("most harmful", best.harmful_indices[0], best.harmful_scores[0]),
    ):
        print(f"\n{args.top} {title} training sequences (score, score/N with N = {count}, text):")
        for rank, (index, value) in enumerate(
            zip(indices.tolist(), values.tolist(), strict=True), start=1
        ):
            print(
                f"  {rank:2d}. #{index:<5d} {value:+10.3f} {value / count:+.2e}  "
                f"[{names[files[index]]}] {show(train_set.tensors[0][index])}"
            )

    top = int(best.helpful_indices[0, 0])
    tokens = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query_set,
        train_set,
        damping=None,
        train_indices=[top],
        per_token=True,
        progress=False,
    )
    per_token = tokens.per_token[0, 0]
    inputs, targets = train_set.tensors[0][top], train_set.tensors[1][top]
    print(
        f"\nper-token influence in sequence #{top} (total {per_token.sum().item():+.3f}; "
        f"the token predicted at each position, strongest first):"
    )
    for position in torch.argsort(per_token.abs(), descending=True)[:10].tolist():
        context = show(inputs[max(0, position - 12) : position + 1], 16)
        print(
            f"  position {position:2d}: {per_token[position].item():+8.3f}  "
            f"...{context} -> {show(targets[position : position + 1])!r}"
        )
    line = "".join(
        "+"
        if v > 0.05 * per_token.abs().max()
        else ("-" if v < -0.05 * per_token.abs().max() else ".")
        for v in per_token.tolist()
    )
    plain = "".join(chr(b) if 32 <= b < 127 else "·" for b in targets.tolist())
    print(f"  text: {plain}\n  sign: {line}")


if __name__ == "__main__":
    main()
