"""`python tests/helpers/no_torch.py ARGS...` runs `dsdnode ARGS...` with torch and transformers
unimportable (an import of either raises ImportError), for tests of what must run without them."""

from __future__ import annotations

import os
import runpy
import sys

LAUNCHER = [sys.executable, os.path.abspath(__file__)]

if __name__ == "__main__":
    for name in ("torch", "transformers"):
        sys.modules[name] = None  # the import system's "not importable" mark
    sys.argv = ["dsdnode", *sys.argv[1:]]
    runpy.run_module("dsdnode", run_name="__main__")
