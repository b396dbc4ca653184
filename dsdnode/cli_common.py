"""Helpers every `dsdnode` command shares: the event loop and turning user errors into one line."""

from __future__ import annotations

import functools

import click
import uvloop

from .config import ConfigError
from .models.registry import RegistryError


class UserError(click.ClickException):
    """Shown as one line without a traceback."""


def run_async(coro):
    return uvloop.run(coro)


def friendly(fn):
    """Turn the errors a user can fix (bad names, configs, inputs) into one clear line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RegistryError, ConfigError, ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
    return wrapper
