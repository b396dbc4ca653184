"""Helpers every `dsdnode` command shares: the event loop, option types, and errors as one line."""

from __future__ import annotations

import dataclasses
import functools
import math
import traceback
import typing

import click
import uvloop

from . import errors
from .config import Bounds
from .errors import DsdnodeError, kind

K_LIMIT = 64  # longest draft block a command accepts (a block of k+1 fits a default server's max_block)


class UserError(click.ClickException, errors.UserError):
    """A command's error as click shows it: one line ("Error: ..."), exit status 1, no traceback."""


def run_async(coro):
    return uvloop.run(coro)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its comparisons)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def number_range(kind: type, bounds: Bounds) -> click.ParamType:
    """The click type for `bounds` on an int or float option."""
    if kind is int:
        return click.IntRange(min=bounds.low, max=bounds.high, min_open=bounds.low_open)
    return FiniteFloatRange(min=bounds.low, max=bounds.high, min_open=bounds.low_open)


def setting_type(cls: type, name: str) -> click.ParamType:
    """The click type of the option that overrides setting `name` of `cls` (same bounds as its config key)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = typing.get_type_hints(cls)[name]
    if "choices" in f.metadata:
        return click.Choice(f.metadata["choices"])
    return number_range(kind, f.metadata["bounds"])


class DraftLength(click.ParamType):
    """--k: 'auto' (the controller picks k each round) or a fixed draft length 0..K_LIMIT (0: no drafting)."""

    name = "auto|0..64"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= K_LIMIT:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            k = int(text)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a whole number.", param, ctx)
        if not 0 <= k <= K_LIMIT:
            self.fail(f"{k} is not in the range 0<=x<={K_LIMIT}.", param, ctx)
        return k


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name if it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def _verbosity() -> int:
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().params.get("verbose", 0) if ctx is not None else 0


def friendly(fn):
    """Every error a command ends with becomes one line and a non-zero exit.

    Whose error it is decides the line (`errors.kind`): the user's and a peer's (or the network's)
    are shown as they are; anything else -- a bug, whatever its builtin type -- is an internal
    error, never presented as bad input, with a hint to rerun with -v, which prints its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as e:
            raise click.ClickException(error_line(e, _verbosity())) from None  # "Error: ...", exit 1
    return wrapper


def error_line(e: BaseException, verbosity: int = 0) -> str:
    """The one line a command prints for `e` (after click's "Error: "); at verbosity >= 1 an
    internal error's traceback goes to stderr first."""
    whose = kind(e)
    if whose == "user":
        return one_line(e)
    if whose == "peer":
        return one_line(e) if isinstance(e, DsdnodeError) else f"network error: {one_line(e)}"
    if verbosity >= 1:
        traceback.print_exception(e)
        return f"internal error: {type(e).__name__}: {one_line(e)}"
    return (f"internal error: {type(e).__name__}: {one_line(e)}; "
            "rerun with -v (dsdnode -v COMMAND ...) for the traceback")


def lookup_notice(reason: str) -> str:
    """The one line that tells a user the drafts come from prompt lookup, not a draft model."""
    return f"note: {reason}: drafting by prompt lookup (n-gram matches in the text so far)"
