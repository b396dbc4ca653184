"""The data flow is one way: client/ talks to servers only through net/, never by importing server/."""

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "dsdnode" / "client"


def test_client_imports_nothing_from_server():
    offenders = []
    for path in CLIENT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("..server", "dsdnode.server"))]
    assert offenders == []
