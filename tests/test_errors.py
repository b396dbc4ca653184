"""The error tree: every class dsdnode raises on purpose is on one branch, keeps its builtin base,
and the front ends map the branch (not the builtin type) to a line or an HTTP status."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil

import pytest

import dsdnode
from dsdnode import errors
from dsdnode.errors import BadValue, DsdnodeError, InternalError, PeerError, UserError, http_status, kind

BRANCHES = (UserError, PeerError, InternalError)
NOT_ERRORS = {"dsdnode.client.streaming.StopText"}  # ends a generation at a stop string: control flow


def dsdnode_exceptions() -> dict[str, type]:
    """Every exception class defined in a dsdnode module (heavy modules included: they are imported)."""
    found = {}
    for info in pkgutil.walk_packages(dsdnode.__path__, "dsdnode."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_is_on_one_branch():
    classes = dsdnode_exceptions()
    assert len(classes) >= 25  # the 24 of before plus the tree itself
    for name, cls in classes.items():
        if name in NOT_ERRORS:
            assert not issubclass(cls, DsdnodeError), name
            continue
        if cls.__module__ == "dsdnode.errors" and cls in (DsdnodeError, *BRANCHES):
            continue
        assert sum(issubclass(cls, b) for b in BRANCHES) == 1 or cls.__name__ == "ApiError", name


def test_builtin_bases_are_kept():
    """`except ValueError` / `except ConnectionError` written before the tree still catch them."""
    from dsdnode.config import ConfigError
    from dsdnode.net.p2p import BootstrapUnreachable, ListenError, PeerUnreachable
    from dsdnode.net.wire import WireError

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(WireError, ValueError) and issubclass(WireError, PeerError)
    assert issubclass(BootstrapUnreachable, ConnectionError) and issubclass(PeerUnreachable, PeerError)
    assert issubclass(ListenError, OSError) and issubclass(ListenError, UserError)
    assert str(ListenError("port 5 on 127.0.0.1 is already in use")) == "port 5 on 127.0.0.1 is already in use"


@pytest.mark.parametrize("exc, whose, status", [
    (BadValue("--layers 3:99: this model has layers 0:30"), "user", 400),
    (FileNotFoundError(2, "No such file or directory", "x.toml"), "user", 400),
    (PeerError("no live servers"), "peer", 503),
    (ConnectionResetError("reset"), "peer", 503),
    (asyncio.TimeoutError(), "peer", 503),
    (InternalError("broken"), "internal", 500),
    (ValueError("not enough values to unpack"), "internal", 500),  # a bug's ValueError is no bad input
    (OSError(22, "Invalid argument"), "internal", 500),
    (KeyError("x"), "internal", 500),
])
def test_whose_error(exc, whose, status):
    assert kind(exc) == whose
    assert http_status(exc) == status


def test_the_cli_error_is_in_the_tree():
    from dsdnode.cli_common import UserError as CommandError

    e = CommandError("no such model")
    assert isinstance(e, errors.UserError) and e.format_message() == "no such model"
