"""The library API (dsdnode.connect / connect_async) on the real SmolLM2 weights: an in-process chain, and
private layers in front of a one-server swarm."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dsdnode

MODEL = "smollm2-135m"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def client(smollm2_dir):
    with dsdnode.connect(MODEL, local=True, hops=2, draft=MODEL, dtype="float32") as c:
        yield c


def test_readme_example_runs(smollm2_dir, tmp_path):
    section = README.read_text().split("## Python library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stdout and len(done.stdout.strip().splitlines()) >= 2


def test_greedy_text_is_the_same_every_way(client):
    """Plain decoding, fixed k, adaptive k, the stream and the async client: one greedy text (float32)."""
    prompt = "def fibonacci(n):\n    "
    plain = client.generate(prompt, chat=False, max_new_tokens=20, k=0)
    assert len(plain.tokens) == 20 and plain.route == [("local", 0, 15), ("local", 15, 30)]
    assert client.generate(prompt, chat=False, max_new_tokens=20, k=3).text == plain.text
    assert "".join(client.stream(prompt, chat=False, max_new_tokens=20)) == plain.text
    options = dsdnode.GenerateOptions(max_new_tokens=20, k="auto")
    assert client.generate(client.service.models.tokenizer(prompt)["input_ids"], options).text == plain.text

    async def via_async():
        async with await dsdnode.connect_async(MODEL, local=True, hops=3, draft=MODEL, dtype="float32") as c:
            pieces = [p async for p in c.stream(prompt, chat=False, max_new_tokens=20, k=2)]
            return "".join(pieces), (await c.generate(prompt, options, chat=False)).text
    assert asyncio.run(via_async()) == (plain.text, plain.text)


def test_bad_options_are_clear_errors(client, smollm2_dir):
    for bad in (dict(max_new_tokens=0), dict(k=-1), dict(k="fast"), dict(top_p=0.0), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            client.generate("hi", **bad)
    with pytest.raises(ValueError, match="token ids"):
        client.generate([10**9])
    with pytest.raises(TypeError, match="either options"):
        client.generate("hi", dsdnode.GenerateOptions(), k=2)
    with dsdnode.connect(MODEL, local=True, hops=1, draft=False, dtype="float32") as no_draft:
        # no draft model: drafts come from prompt lookup, and the result says so; the text is the same
        assert no_draft.service.models.draft_fallback == "no draft model was loaded"
        looked_up = no_draft.generate("def f(x):", chat=False, max_new_tokens=12, k=3)
        plain = no_draft.generate("def f(x):", chat=False, max_new_tokens=12, k=0)
        assert (looked_up.drafting, plain.drafting) == ("prompt lookup", "none")
        assert looked_up.tokens == plain.tokens
    with pytest.raises(ValueError, match="bootstrap"):
        dsdnode.connect(MODEL)


def test_generations_move_the_client_metrics(client):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def sample(name, labels=()):
        text = generate_latest(client.service.metrics.registry).decode()
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}
        return values.get((name, tuple(labels)), 0.0)
    before = sample("dsdnode_client_tokens_generated_total")
    out = client.generate("def f(x):", chat=False, max_new_tokens=8, k=2)
    assert sample("dsdnode_client_tokens_generated_total") == before + len(out.tokens)
    assert sample("dsdnode_client_time_to_first_token_seconds_count") >= 1
    assert sample("dsdnode_client_drafts_total", [("verdict", "proposed")]) >= sum(r.k for r in out.result.rounds)
    assert sample("dsdnode_client_round_network_seconds_count") >= len(out.result.rounds)
    assert sample("dsdnode_client_generations_total", [("outcome", "ok")]) >= 1
    point = client.service.metrics.recent[-1]  # what the web UI's live charts plot
    assert (point.tokens, point.rounds, point.failovers) == (len(out.tokens), len(out.result.rounds), 0)
    assert point.accepted_per_round == pytest.approx(out.result.mean_accepted)
    assert point.k == pytest.approx(out.result.mean_k) and point.hop_link_ms == []  # no links in-process


def test_next_token_logits_pick_the_greedy_tokens(client):
    """The target's logits after a prefix (what `dsdnode demo` checks near-ties with) choose what
    greedy decoding chose there."""
    ids = client.service.models.tokenizer("def fibonacci(n):\n    ")["input_ids"]
    plain = client.generate(ids, max_new_tokens=6, k=0).tokens

    async def argmaxes():
        async with await dsdnode.connect_async(MODEL, local=True, hops=2, draft=False, dtype="float32") as c:
            return [int((await c.service.next_token_logits(ids + plain[:i])).argmax()) for i in (0, 3, 5)]
    assert asyncio.run(argmaxes()) == [plain[0], plain[3], plain[5]]


@pytest.mark.heavy
def test_private_layers_keep_the_greedy_text(client, tmp_path):
    """private_layers=8 (client/private.py): the client runs layers 0:8, the swarm, whose only server
    holds 8:30 (no route from layer 0 exists), the rest; greedy text in float32 equals the
    in-process chain's, plain and drafted."""
    from dsdnode.local_swarm import LocalSwarm

    prompt = "def fibonacci(n):\n    "
    expected = client.generate(prompt, chat=False, max_new_tokens=24, k=0)
    with LocalSwarm(MODEL, [(8, 30)], tmp_path, dtype="float32") as swarm, \
            dsdnode.connect(MODEL, bootstrap=swarm.bootstrap_addrs, private_layers=8, draft=MODEL,
                            dtype="float32") as private:
        plain = private.generate(prompt, chat=False, max_new_tokens=24, k=0)
        drafted = private.generate(prompt, chat=False, max_new_tokens=24, k=3)
    assert plain.route == [("local", 0, 8), (swarm.servers[0].peer_id, 8, 30)]
    assert plain.tokens == drafted.tokens == expected.tokens
    with pytest.raises(ValueError, match="private_layers must be in 0..29"):
        dsdnode.connect(MODEL, bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/x"], private_layers=30, draft=False)
