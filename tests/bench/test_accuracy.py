"""Scoring: HumanEval programs run isolated and must really pass; GSM8K numbers extract right."""

from __future__ import annotations

import os
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dsdnode.bench.accuracy import (
    Limits,
    evaluate,
    evaluate_gsm8k,
    evaluate_humaneval,
    extract_final_number,
    normalize_number,
)
from dsdnode.bench.datasets import Problem, load_dataset

FAST = Limits(timeout_s=2.0)


@pytest.fixture(scope="module")
def humaneval(tmp_path_factory) -> list[Problem]:
    return load_dataset("humaneval", cache_dir=tmp_path_factory.mktemp("he"))


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory) -> list[Problem]:
    return load_dataset("gsm8k", cache_dir=tmp_path_factory.mktemp("gsm"))


@pytest.fixture
def first(humaneval) -> Problem:
    return humaneval[0]


def whole(problem: Problem) -> str:
    return problem.prompt + problem.reference


# ------------------------------------------------------------------ HumanEval: passing


def test_every_canonical_solution_passes(humaneval):
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda p: evaluate_humaneval(p, p.reference), humaneval))
    failures = {p.id: v for p, v in zip(humaneval, verdicts) if not v.passed}
    assert failures == {}
    assert {v.reason for v in verdicts} == {"ok"}


def test_whole_function_in_a_chatty_fenced_answer_passes(humaneval):
    p = humaneval[2]
    answer = (
        "Sure! Here is the completed function:\n\n```python\n" + whole(p) + "```\n\n"
        "Example:\n```python\nprint(truncate_number(3.5))\n```\nIt returns the decimal part."
    )
    assert evaluate_humaneval(p, answer).passed


def test_whole_function_without_the_prompts_imports_passes(first):
    # The model dropped `from typing import List`; the prompt placed before it supplies it.
    code = whole(first).replace("from typing import List\n", "")
    assert "List[float]" in code
    assert evaluate_humaneval(first, f"```python\n{code}```").passed


def test_helper_functions_of_the_prompt_stay_available(humaneval):
    p = humaneval[10]  # make_palindrome calls is_palindrome, defined only in the prompt
    body = p.reference
    code = "def make_palindrome(string: str) -> str:\n" + body
    assert evaluate_humaneval(p, f"```py\n{code}\n```").passed


def test_unterminated_fence_and_unindented_body_pass(first):
    assert evaluate_humaneval(first, "```python\n" + whole(first)).passed  # cut by max tokens
    assert evaluate_humaneval(first, textwrap.dedent(first.reference)).passed


def test_raw_continuation_with_trailing_garbage_passes(first):
    rambling = first.reference + "\n\ndef main():\n    print(has_close_elements([1.0, 2.0], 0.5"
    assert evaluate_humaneval(first, rambling).passed


# ------------------------------------------------------------------ HumanEval: failing


def test_wrong_solution_fails(first):
    verdict = evaluate_humaneval(first, "    return True\n")
    assert not verdict.passed
    assert verdict.reason == "failed"
    assert verdict.detail.startswith("AssertionError")


def test_exception_and_stdin_read_fail(first):
    assert evaluate_humaneval(first, "    raise KeyError('x')\n").detail.startswith("KeyError")
    verdict = evaluate_humaneval(first, "    input()\n" + first.reference)
    assert (verdict.passed, verdict.reason) == (False, "failed")
    assert "EOFError" in verdict.detail


def test_syntax_error_and_empty_completion(first):
    verdict = evaluate_humaneval(first, "```python\ndef has_close_elements(a, b):\n    return (\n```")
    assert (verdict.passed, verdict.reason) == (False, "syntax_error")
    assert evaluate_humaneval(first, "  \n").reason == "no_code"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # an orphan killed here may stay a zombie: PID 1 need not reap


def _dies(pid: int, within_s: float = 10.0) -> bool:
    """SIGKILL is delivered asynchronously, so give the process a moment to go."""
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_infinite_loop_times_out_and_its_children_die(first, tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "while True:\n    pass\n"
    )
    verdict = evaluate_humaneval(first, code, FAST)
    assert (verdict.passed, verdict.reason) == (False, "timeout")
    child = int(pid_file.read_text())
    assert _dies(child)
    # The test process carries on and the evaluator still works.
    assert evaluate_humaneval(first, first.reference, FAST).passed


def test_background_processes_of_a_passing_program_are_killed(first, tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
    )
    assert evaluate_humaneval(first, first.reference + code).passed
    assert _dies(int(pid_file.read_text()))


def test_huge_allocation_fails_cleanly(first):
    # 10 GB fits in this machine's RAM, so only the address-space limit makes it fail.
    verdict = evaluate_humaneval(first, "    x = bytearray(10 * 1000**3)\n" + first.reference)
    assert (verdict.passed, verdict.reason) == (False, "memory_error")


def test_output_flood_is_capped(first):
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    verdict = evaluate_humaneval(first, flood, Limits(timeout_s=5.0, file_bytes=1024**2))
    assert (verdict.passed, verdict.reason) == (False, "output_limit")


@pytest.mark.parametrize(
    "escape",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
        # Prints what a naive harness looks for, then leaves before the tests.
        "print('passed')\nprint('ok')\nimport os\nos._exit(0)\n",
        # Copies every file it can read (its own source included) to stdout, then leaves.
        "import os, sys\nfor n in os.listdir('.'):\n    sys.stdout.write(open(n).read())\nos._exit(0)\n",
    ],
)
def test_exiting_before_the_tests_is_not_a_pass(first, escape):
    verdict = evaluate_humaneval(first, first.reference + escape)
    assert (verdict.passed, verdict.reason) == (False, "exited_early")


def test_exit_inside_the_function_under_test_is_not_a_pass(first):
    verdict = evaluate_humaneval(first, "    import sys\n    sys.exit(0)\n")
    assert (verdict.passed, verdict.reason) == (False, "exited_early")


def test_program_runs_with_a_minimal_environment_in_an_empty_dir(first, monkeypatch):
    monkeypatch.setenv("DSDNODE_TEST_SECRET", "do-not-leak")
    probe = (
        "import os\n"
        "assert 'DSDNODE_TEST_SECRET' not in os.environ\n"
        "assert os.listdir('.') == ['candidate.py'], os.listdir('.')\n"
        f"assert os.getcwd() != {os.getcwd()!r}\n"
    )
    assert evaluate_humaneval(first, first.reference + probe).passed


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        Limits(timeout_s=0)


# ------------------------------------------------------------------ GSM8K

OUTPUTS = [
    ("Janet has 16 - 3 - 4 = 9 eggs left.\n9 * $2 = $18.\nThe answer is 18.", "18"),
    ("She earns $18 per day. The answer is $18.", "18"),
    ("Total: 1,234 apples.\n\nThe answer is: **1,234**", "1234"),
    ("The final answer is $\\boxed{42}$.", "42"),
    ("So the result is \\boxed{7}", "7"),
    ("He pays 2 * 3 = 6 dollars.\n#### 6", "6"),
    ("#### 1,600", "1600"),
    ("She makes 18 dollars every day.", "18"),
    ("The answer is 18.0.", "18"),
    ("Each costs 0.50 dollars. The answer is 0.50", "0.5"),
    ("The temperature drops to -10 degrees. The answer is -10.", "-10"),
    ("The answer is 25%.", "25"),
    ("Answer: 7 apples", "7"),
    ("The answer is 18.\n\nQuestion: Tom has 3 apples and eats 1.\nThe answer is 2.", "18"),
    ("The answer is N.\nWait, let me compute: 5 + 7 = 12. So 12.", "12"),
    ("Pages 3-4 are torn, 4 pages in all.", "4"),
    ("It costs $1,250,000 in total", "1250000"),
    ("Step 1: 2+3=5\nStep 2: 5*4=20\nTHE ANSWER IS 20", "20"),
    ("I cannot determine this from the information given.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "want"), OUTPUTS)
def test_extract_final_number(text, want):
    assert extract_final_number(text) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [("18", "18"), ("18.0", "18"), ("$1,234.50", "1234.5"), ("-0", "0"), ("7.", "7"),
     ("100", "100"), ("abc", None), ("nan", None), ("", None)],
)
def test_normalize_number(raw, want):
    assert normalize_number(raw) == want


def test_every_gsm8k_reference_extracts_to_its_answer(gsm8k):
    for p in gsm8k:
        expected = str(int(p.reference.split("####")[-1].strip().replace(",", "")))
        assert extract_final_number(p.reference) == expected, p.id
        assert p.extra["answer"] == expected
        assert evaluate_gsm8k(p, p.reference).passed


def test_gsm8k_verdicts(gsm8k):
    p = gsm8k[0]  # answer 18
    assert evaluate_gsm8k(p, "so she makes $18 a day. The answer is 18.").reason == "ok"
    wrong = evaluate_gsm8k(p, "The answer is 20.")
    assert (wrong.passed, wrong.reason, wrong.detail) == (False, "wrong_answer", "got 20, want 18")
    assert evaluate_gsm8k(p, "No idea.").reason == "no_answer"


def test_evaluate_dispatches_by_dataset(first, gsm8k):
    assert evaluate(first, first.reference).passed
    assert evaluate(gsm8k[0], "The answer is 18.").passed
    with pytest.raises(ValueError, match="no evaluator"):
        evaluate(Problem("mmlu", "m/0", "q", "a", {}), "a")
