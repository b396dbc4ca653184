"""Accuracy of model completions: HumanEval pass@1 and GSM8K exact match.

Speculative decoding must not change what the model answers, so every benchmark also scores
its outputs. HumanEval completions are untrusted code: they run in a separate Python process
(never in the benchmark's own), in an empty temporary directory, with a minimal environment,
stdin closed, a wall-clock timeout that kills the whole process group, and resource limits
(address space, CPU seconds, file size, no core files). The limits are set by the child's own
runner prologue before any candidate code is compiled, instead of in a `preexec_fn`, because
`preexec_fn` is unsafe in a parent with threads (the benchmark runs libp2p and torch threads).

A pass requires proof that `check(entry_point)` returned: after it does, the runner reads a
random token from an inherited pipe and prints it. A program that exits early with status 0
(`sys.exit(0)`, `os._exit(0)`) never prints the token, and the token is not in any file the
program can read. This stops accidental fake passes; it is not a sandbox against code written
to attack this harness (which could, for instance, read the pipe itself).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Literal
from ..errors import BadValue

if TYPE_CHECKING:
    from dsdnode.bench.datasets import Problem

Reason = Literal[
    "ok", "failed", "syntax_error", "timeout", "memory_error", "exited_early",
    "output_limit", "crashed", "no_code", "wrong_answer", "no_answer",
]


@dataclass(frozen=True)
class Verdict:
    """Outcome of scoring one completion; `detail` says why, for the benchmark JSON."""

    passed: bool
    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one HumanEval program run."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_bytes: int = 16 * 1024**2  # also caps stdout/stderr, which go to files

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or self.memory_bytes <= 0 or self.file_bytes <= 0:
            raise BadValue(f"limits must be positive: {self}")


# ---------------------------------------------------------------- GSM8K

_NUMBER = r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer(?:\s+is|\s*:)[^\d\n-]{0,12}?(" + _NUMBER + ")", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{[^\d}-]{0,8}(" + _NUMBER + ")")
_HASHES = re.compile(r"####[^\d\n-]{0,4}(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(r"(?<![\d.])" + _NUMBER)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number as written ('$1,234.50' -> '1234.5', '18.0' -> '18')."""
    s = text.strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".").strip()
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The answer a model gave, normalized; None if it gave no number.

    Preference: the first 'The answer is N' (the instructed form; the first, because a model
    that keeps going after answering tends to invent a new question), else the first
    \\boxed{N}, else the last '#### N', else the last number anywhere.
    """
    for pattern in (_ANSWER_IS, _BOXED):
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    hashes = _HASHES.findall(text)
    if hashes:
        return normalize_number(hashes[-1])
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def evaluate_gsm8k(problem: Problem, completion: str) -> Verdict:
    """Exact match of the completion's final number against the reference number."""
    want = problem.extra["answer"]
    got = extract_final_number(completion)
    if got is None:
        return Verdict(False, "no_answer", f"want {want}")
    if got == want:
        return Verdict(True, "ok", got)
    return Verdict(False, "wrong_answer", f"got {got}, want {want}")


# ---------------------------------------------------------------- HumanEval: code extraction

_FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py"}
# Where a raw (unfenced) continuation of a base model usually stops being the function body.
_STOP = re.compile(r"\n(?:def |class |if |print\(|#|```)")


def extract_code(completion: str, entry_point: str) -> tuple[str, bool]:
    """(code, fenced): the ```python block that defines `entry_point` (else the first
    Python block, unterminated ones included), or the raw completion if there is no fence."""
    blocks = [m.group(2) for m in _FENCE.finditer(completion) if m.group(1).lower() in _PYTHON_TAGS]
    if not blocks:
        return completion, False
    for block in blocks:
        if _defines(block, entry_point):
            return block, True
    return blocks[0], True


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^[ \t]*def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.M) is not None


def _compiles(source: str) -> str | None:
    """None if `source` compiles (it is not run), else the error message."""
    try:
        compile(source, "candidate.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def build_solution(problem: Problem, completion: str) -> tuple[str | None, str]:
    """(solution source, error): the candidate's code placed in the problem's context.

    A whole function goes after the prompt, so the prompt's imports and helper functions stay
    available and the model's definition replaces the docstring-only stub. A continuation
    (only the body) is appended to the prompt, re-indented if the model dropped the indent.
    The first variant that compiles wins.
    """
    entry_point = problem.extra["entry_point"]
    code, fenced = extract_code(completion, entry_point)
    if not code.strip():
        return None, "empty completion"
    if _defines(code, entry_point):
        variants = [problem.prompt + "\n\n" + code, code]
    else:
        body = textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"
        variants = [problem.prompt + code, problem.prompt + body]
        if not fenced:
            cut = _STOP.search(code)
            if cut:
                variants.append(problem.prompt + code[: cut.start()] + "\n")
    first_error = ""
    for source in variants:
        error = _compiles(source)
        if error is None:
            return source, ""
        first_error = first_error or error
    return None, first_error


# ---------------------------------------------------------------- HumanEval: execution

# Runs in the child: limits first, then the program as module `candidate`; only if that returns
# (check() passed) does it read the token the parent left in the pipe and print it.
_RUNNER = """\
import os, resource, sys, types
fd, path = int(sys.argv[1]), sys.argv[2]
mem, cpu, fsize = (int(a) for a in sys.argv[3:6])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
module = types.ModuleType("candidate")
module.__file__ = path
sys.modules["candidate"] = module
exec(code, module.__dict__)
token = os.read(fd, 64)
sys.stdout.flush()
os.write(1, b"\\n" + token + b"\\n")
"""

_TAIL_BYTES = 4096


def _minimal_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(f) -> bytes:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    return f.read()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, limits: Limits = Limits()) -> Verdict:
    """Run a complete program (solution + test + check call) in a limited child process."""
    token = secrets.token_hex(16).encode()
    cpu_s = int(limits.timeout_s) + 1
    with (
        tempfile.TemporaryDirectory(prefix="dsdnode-eval-") as workdir,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, token)
            os.close(write_fd)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _RUNNER, str(read_fd), path,
                 str(limits.memory_bytes), str(cpu_s), str(limits.file_bytes)],
                cwd=workdir, env=_minimal_env(workdir), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, pass_fds=(read_fd,), start_new_session=True,
            )
        finally:
            os.close(read_fd)
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        finally:
            _kill_group(proc.pid)  # anything the program left running in its group
        stdout, stderr = _tail(out), _tail(err)
    return _verdict(proc.returncode, timed_out, token, stdout, stderr, limits)


def _verdict(
    rc: int, timed_out: bool, token: bytes, stdout: bytes, stderr: bytes, limits: Limits
) -> Verdict:
    last_err = stderr.decode("utf-8", "replace").strip().splitlines()
    detail = last_err[-1][:300] if last_err else ""
    if timed_out:
        return Verdict(False, "timeout", f"wall clock > {limits.timeout_s} s")
    if rc < 0:
        if -rc in (signal.SIGXCPU, signal.SIGKILL):
            return Verdict(False, "timeout", f"killed by signal {-rc} (CPU limit)")
        if -rc == signal.SIGXFSZ:
            return Verdict(False, "output_limit", f"wrote more than {limits.file_bytes} bytes")
        return Verdict(False, "crashed", f"killed by signal {-rc}")
    if rc == 0:
        if b"\n" + token + b"\n" in stdout:
            return Verdict(True, "ok")
        return Verdict(False, "exited_early", "exit 0 before check() finished")
    if "[Errno 27]" in detail:  # EFBIG: Python ignores SIGXFSZ, so the write raises instead
        return Verdict(False, "output_limit", detail)
    if detail.startswith("MemoryError"):
        return Verdict(False, "memory_error", detail)
    if detail.startswith("SyntaxError") or detail.startswith("IndentationError"):
        return Verdict(False, "syntax_error", detail)
    return Verdict(False, "failed", detail or f"exit {rc}")


def evaluate_humaneval(problem: Problem, completion: str, limits: Limits = Limits()) -> Verdict:
    """pass@1 of one completion: its code plus the problem's tests must run and pass."""
    solution, error = build_solution(problem, completion)
    if solution is None:
        reason: Reason = "no_code" if error == "empty completion" else "syntax_error"
        return Verdict(False, reason, error)
    entry_point = problem.extra["entry_point"]
    program = f"{solution}\n\n{problem.extra['test']}\n\ncheck({entry_point})\n"
    return run_program(program, limits)


def evaluate(problem: Problem, completion: str, limits: Limits = Limits()) -> Verdict:
    """Score a completion by the problem's dataset."""
    if problem.dataset == "humaneval":
        return evaluate_humaneval(problem, completion, limits)
    if problem.dataset == "gsm8k":
        return evaluate_gsm8k(problem, completion)
    raise ValueError(f"no evaluator for dataset {problem.dataset!r}")
