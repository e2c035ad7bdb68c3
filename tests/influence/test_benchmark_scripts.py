"""Smoke tests of the influence benchmark scripts (tiny sizes) and the demo's file mapping."""

import os
import sysconfig

from benchmarks import influence_demo, influence_scale
from benchmarks.data import load_stdlib_corpus


def test_scale_script_runs_and_resumes(tmp_path):
    arguments = ["--train", "6", "--queries", "2", "--fit", "4", "--chunk", "4", "--batch", "3"]
    first = influence_scale.main(arguments + ["--out", str(tmp_path), "--rank", "2"])
    assert first["resumed_chunks"] == 0 and first["peak_rss_gib"] > 0
    assert 0 <= first["low_rank_relative_error"] < 1.5
    os.remove(tmp_path / "chunk_000000000004.safetensors")
    second = influence_scale.main(arguments + ["--out", str(tmp_path), "--rank", "2"])
    assert second["resumed_chunks"] == 1


def test_demo_maps_sequences_to_their_source_files():
    corpus = load_stdlib_corpus()
    names, files = influence_demo.sequence_files(corpus, 200)
    windows = influence_demo.training_sequences(corpus, 200).tensors[0]
    root = sysconfig.get_paths()["stdlib"]
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    for index in range(0, 200, 9):
        text = bytes(windows[index][:16].tolist())
        if files[index] == 0:
            content = prose
        else:
            with open(os.path.join(root, *names[files[index]].split("/")), "rb") as handle:
                content = handle.read()
        assert text in content, (index, names[files[index]])
