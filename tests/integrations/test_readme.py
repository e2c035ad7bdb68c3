"""The README's "Use with Hugging Face Trainer / Lightning" section runs as written."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lightning")

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use with Hugging Face Trainer / Lightning"


def readme_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_snippets_run(tmp_path, monkeypatch):
    """Every python block of the section, in order, in one namespace (as a reader pastes them)."""
    snippets = readme_snippets()
    assert len(snippets) == 4
    monkeypatch.chdir(tmp_path)  # output_dir="out" and Lightning's files land here
    namespace: dict = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, code in enumerate(snippets):
            exec(compile(code, f"README.md[{SECTION} block {index}]", "exec"), namespace)
    trainer = namespace["trainer"]  # the last one: Lightning with the SANIA recipe
    assert trainer.global_step == 4
    assert trainer.optimizers[0].last_tau is not None
