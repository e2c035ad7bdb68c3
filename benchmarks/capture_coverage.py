"""How many parameter tensors each capture optimizer preconditions on tiny Hugging Face models.

    python -m benchmarks.capture_coverage          # needs transformers (models from configs)

Tiny random-init GPT-2 (its ``Conv1D`` layers, tied ``wte``/``lm_head``), Llama with untied
and tied embeddings (``LlamaRMSNorm``), and BERT for sequence classification; no downloads.
Per model and optimizer (EKFAC, AdaFisherW, SINGD at their defaults): parameter tensors in
tracked layers and in the Adam fallback, as the capture sees them at construction (a layer
found at the first ``pop()`` to have no per-example rows, GPT-2's positional ``wpe``, falls
back from then on). Prints a markdown table.
"""

from __future__ import annotations

import warnings

import torch

import secondorder


def _models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    yield "GPT-2", lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )
    for tied in (False, True):
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
        )
        yield f"Llama ({'tied' if tied else 'untied'})", lambda c=config: LlamaForCausalLM(c)
    yield "BERT classifier", lambda: BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=32, num_labels=3)
    )


def main() -> None:
    warnings.simplefilter("ignore")
    print("| model | optimizer | tracked tensors | fallback tensors |")
    print("|---|---|---|---|")
    for name, make in _models():
        for optimizer_name in ("EKFAC", "AdaFisherW", "SINGD"):
            torch.manual_seed(0)
            model = make()
            optimizer = getattr(secondorder, optimizer_name)(model, lr=1e-3)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            fallback = optimizer.capture.fallback_params(params)
            print(f"| {name} | {optimizer_name} | {len(params) - len(fallback)} | {len(fallback)} |")


if __name__ == "__main__":
    main()
