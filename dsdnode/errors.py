"""One tree for every error dsdnode raises on purpose, so each front end can say whose it is.

    DsdnodeError
    ├── UserError        what the user gave or chose is wrong; the message says what to change
    │   └── BadValue     ... a value (flag, config key, name, file content); also a ValueError
    ├── PeerError        a peer, the network or a remote source failed or misbehaved; another
    │                    peer, route or a retry may do
    └── InternalError    a broken invariant: a bug in dsdnode

The classes of each module keep their names and their builtin bases (a `WireError` is still a
`ValueError`, a `PeerUnreachable` still a `ConnectionError`), so `except` clauses that predate the
tree keep working; the tree only adds the branch. The CLI (`cli_common.friendly`) shows a user or
peer error as one line, and anything else -- an `InternalError`, or an exception nobody raised on
purpose, whatever its builtin type -- as an internal error with a hint to rerun with -v; the HTTP
API maps the branches to 400, 503 and 500 (`http_status`).

`client.streaming.StopText` is not in the tree: it ends a generation at a stop string, it is not
an error, and an `except DsdnodeError` must never swallow it."""

from __future__ import annotations


class DsdnodeError(Exception):
    """Root of every error dsdnode raises on purpose."""


class UserError(DsdnodeError):
    """The user's input or choice is wrong (a name, a file, a port in use); the message says what to change."""


class BadValue(UserError, ValueError):
    """A value the user gave is invalid. Also a ValueError, where code (and pydantic) expects one."""


class PeerError(DsdnodeError):
    """A peer, the network or a remote source failed or misbehaved: not this process's fault, and
    another peer, another route or a later retry may succeed."""


class InternalError(DsdnodeError):
    """A broken invariant: a bug in dsdnode, never the user's or a peer's doing."""


# Builtin errors that nobody wrapped, judged by what they usually mean at a front end.
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
NETWORK_ERRORS = (ConnectionError, TimeoutError)  # asyncio.TimeoutError is TimeoutError since 3.11


def kind(exc: BaseException) -> str:
    """'user', 'peer' or 'internal': whose error `exc` is.

    A file error names a path the user gave (a config, a key file, a model directory); a connection
    error or timeout is the network's. Any other builtin error -- a ValueError, a KeyError, another
    OSError -- was not raised on purpose for the user, so it is internal: a bug is never shown as
    bad input."""
    if isinstance(exc, UserError) or isinstance(exc, FILE_ERRORS) and not isinstance(exc, DsdnodeError):
        return "user"
    if isinstance(exc, PeerError) or isinstance(exc, NETWORK_ERRORS) and not isinstance(exc, DsdnodeError):
        return "peer"
    return "internal"


HTTP_STATUS = {"user": 400, "peer": 503, "internal": 500}


def http_status(exc: BaseException) -> int:
    """The HTTP status of an error: 400 for the user's, 503 for the swarm's, 500 for a bug."""
    return HTTP_STATUS[kind(exc)]
