"""Streamed, resumable scoring equals in-memory scoring; low rank at full rank is exact."""

import os

import pytest
import torch
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.influence import oracle


def _setup():
    model, train, query = oracle.make_problem(n_train=23, n_query=5, tokens=3)
    task = influence.ClassificationTask()
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factors = influence.fit_factors(model, task, train_set, strategy="ekfac", progress=False)
    return model, task, factors, query_set, train_set


def test_streamed_scores_equal_pairwise_scores_and_resume(tmp_path, monkeypatch):
    model, task, factors, query_set, train_set = _setup()
    expected = influence.compute_pairwise_scores(
        model, task, factors, query_set, train_set, damping=1e-3, progress=False
    ).scores
    kwargs = dict(damping=1e-3, chunk_size=10, query_batch_size=2, train_batch_size=4)
    # a run that dies after its first chunk leaves one finished chunk and no partial file
    import secondorder.influence.streaming as streaming

    original = streaming.save_file
    calls = []

    def dying(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(tensors, path)

    monkeypatch.setattr(streaming, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        influence.stream_pairwise_scores(
            model, task, factors, query_set, train_set, tmp_path, progress=False, **kwargs
        )
    finished = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert finished == ["chunk_000000000000.safetensors"]
    assert influence.load_streamed_scores(tmp_path) is None
    monkeypatch.setattr(streaming, "save_file", original)
    written = []
    monkeypatch.setattr(
        streaming, "save_file", lambda t, p: (written.append(p), original(t, p))[1]
    )
    scores = influence.stream_pairwise_scores(
        model, task, factors, query_set, train_set, tmp_path, progress=False, **kwargs
    )
    assert len(written) == 2  # the resumed run scored only the two missing chunks
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid output_dir"):
        influence.stream_pairwise_scores(
            model, task, factors, query_set, train_set, tmp_path, progress=False,
            **{**kwargs, "chunk_size": 7},
        )


def test_streamed_low_rank_at_full_rank_is_exact(tmp_path):
    model, task, factors, query_set, train_set = _setup()
    expected = influence.compute_pairwise_scores(
        model, task, factors, query_set, train_set, damping=1e-3, progress=False
    ).scores
    scores = influence.stream_pairwise_scores(
        model, task, factors, query_set, train_set, tmp_path, damping=1e-3, low_rank=100,
        progress=False,
    )
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-6)


def _stream_on_ranks(rank, world_size, directory, model, task, factors, query_set, train_set):
    return influence.stream_pairwise_scores(
        model, task, factors, query_set, train_set, directory, damping=1e-3, chunk_size=6,
        progress=False,
    )


@pytest.mark.distributed
def test_streamed_scores_on_two_gloo_ranks(tmp_path):
    from tests.distributed.launcher import run_forked

    model, task, factors, query_set, train_set = _setup()
    expected = influence.compute_pairwise_scores(
        model, task, factors, query_set, train_set, damping=1e-3, progress=False
    ).scores
    results = run_forked(
        _stream_on_ranks,
        world_size=2,
        args=(str(tmp_path), model, task, factors, query_set, train_set),
    )
    # chunks 0, 2 on rank 0 and 1, 3 on rank 1; after the barrier both ranks see them all
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".safetensors")]) == 4
    for scores in results:
        torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-6)
