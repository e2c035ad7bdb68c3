"""Tiny Hugging Face models and byte-level data for the Trainer / Lightning runs (no downloads).

Models are random-init from configs (``transformers`` 5.x): :func:`tiny_model` builds
``"gpt2"`` (tied embeddings, transformers' ``Conv1D`` layers), ``"llama-tied"``,
``"llama-untied"`` (``RMSNorm``) and ``"bert"`` (sequence classification, 2 classes). The data
come from the Python standard library (:mod:`benchmarks.data`'s W2 corpus):

* :func:`lm_datasets`: windows of ``context`` bytes, ``{"input_ids", "labels"}`` with the
  labels equal to the inputs (the model shifts them), train windows at random offsets
  (seeded), held-out windows evenly spaced over W2's held-out chunks;
* :func:`classification_datasets`: is a window of bytes prose (``pydoc_data.topics``, label 0)
  or Python source (label 1)? Train and held-out windows come from disjoint halves.
"""

from __future__ import annotations

import os
import sysconfig

import torch
from torch.utils.data import Dataset

from benchmarks.data import fixed_windows, load_stdlib_corpus

__all__ = ["MODELS", "DictDataset", "classification_datasets", "lm_datasets", "tiny_model"]

MODELS = ("gpt2", "llama-tied", "llama-untied", "bert")
VOCAB = 256  # bytes


class DictDataset(Dataset):
    """Rows of a dict of equally long tensors, as the Trainer's default collator wants them."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(column) for column in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"Invalid columns: lengths differ ({sorted(lengths)})")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def tiny_model(name: str, width: int = 32, layers: int = 2, context: int = 64, seed: int = 0):
    """A random-init model from a config; ``width`` hidden units, ``layers`` blocks, 2 heads,
    no dropout (exact Gauss-Newton's closure is evaluated several times per step)."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=context, n_embd=width, n_layer=layers,
                               n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(config)
    if name in ("llama-tied", "llama-untied"):
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=context,
                                tie_word_embeddings=name == "llama-tied")
        return tf.LlamaForCausalLM(config)
    if name == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                               num_attention_heads=2, intermediate_size=2 * width,
                               max_position_embeddings=context, num_labels=2,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(config)
    raise ValueError(f"Invalid name: {name!r} (expected one of {MODELS})")


def lm_datasets(n_train: int, n_test: int, context: int = 32, seed: int = 0,
                max_bytes: int = 200_000) -> tuple[DictDataset, DictDataset]:
    """Next-byte windows ``(n, context)`` from W2's train and held-out parts."""
    corpus = load_stdlib_corpus(max_bytes=max_bytes)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.train) - context, (n_train,), generator=generator)
    train = corpus.train[starts[:, None] + torch.arange(context)[None, :]].long()
    inputs, targets = fixed_windows(corpus.test, n_test, context - 1)
    test = torch.cat([inputs, targets[:, -1:]], dim=1)  # the whole window of context bytes
    return (DictDataset(input_ids=train, labels=train.clone()),
            DictDataset(input_ids=test, labels=test.clone()))


def _prose_and_code() -> tuple[bytes, bytes]:
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    root = sysconfig.get_paths()["stdlib"]
    code = b""
    for module in ("argparse.py", "dataclasses.py", "inspect.py", "typing.py"):
        with open(os.path.join(root, module), "rb") as handle:
            code += handle.read()
    return prose, code


def classification_datasets(n_train: int, n_test: int, context: int = 32,
                            seed: int = 0) -> tuple[DictDataset, DictDataset]:
    """Prose-vs-code byte windows: ``input_ids (n, context)``, ``labels (n,)`` in {0, 1}.

    Train windows come from the first half of each source, held-out ones from the second."""
    generator = torch.Generator().manual_seed(seed)
    sources = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in _prose_and_code()]

    def windows(count: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 2, (count,), generator=generator)
        rows = []
        for label in labels.tolist():
            data = sources[label]
            lo = half * (len(data) // 2)
            start = lo + int(torch.randint(0, len(data) // 2 - context, (), generator=generator))
            rows.append(data[start:start + context].long())
        return torch.stack(rows), labels

    train_x, train_y = windows(n_train, 0)
    test_x, test_y = windows(n_test, 1)
    return DictDataset(input_ids=train_x, labels=train_y), DictDataset(input_ids=test_x, labels=test_y)
