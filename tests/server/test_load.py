"""Load spread over replicas (server/load.py): the pass time a server announces follows the passes it
serves, and a server refuses a session to a replica that holds fewer, never beyond what it sent there.
The admission tests run real libp2p hosts on loopback (the replica answers the load question over the
wire); the last one runs real server processes and concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsdnode.net.p2p import P2PNode
from dsdnode.net.records import SpanRecord
from dsdnode.server.load import DECODE_MAX_POSITIONS, Admission, PassClock
from dsdnode.server.sessions import SessionError

MODEL = "m"
ROOT = Path(__file__).resolve().parents[2]


def test_the_pass_time_follows_served_decoding_passes_not_prefill():
    clock = PassClock(0.010)
    for _ in range(40):
        clock.served(0.030, 1, 10, 10)  # a loaded machine: every pass takes 3x the start-up measure
    assert clock.s == pytest.approx(0.030, rel=0.01)
    clock.served(5.0, DECODE_MAX_POSITIONS + 1, 10, 10)  # a long prefill block says nothing per token
    assert clock.s == pytest.approx(0.030, rel=0.01)
    for _ in range(40):
        clock.served(0.005, 1, 5, 10)  # half the span in 5 ms: 10 ms for the whole
    assert clock.s == pytest.approx(0.010, rel=0.01) and clock.throughput == pytest.approx(100, rel=0.01)
    clock.remeasured(0.020)  # idle: measured afresh
    assert clock.s == 0.020 and not clock.idle()


@contextlib.asynccontextmanager
async def _admission(replica_sessions: int):
    """The Admission of a server host whose one replica (a real host on loopback) answers that it holds
    `replica_sessions` open sessions; yields it, the server's open-session count (held[0]) and the replica."""
    replica = await P2PNode.start(relay_service=False)
    replica.load_status = lambda: {MODEL: (replica_sessions, 0.01)}
    server = await P2PNode.start(relay_service=False)
    rec = SpanRecord(MODEL, 0, 4, replica.peer_id, list(replica.addrs), 100.0, 1000, "v", time.time() + 120, weights="w")

    async def discover():
        return [rec]

    held = [0]
    admission = Admission(server, MODEL, "w", lambda: held[0], discover)
    try:
        await admission.lookup()
        yield admission, held, replica
    finally:
        admission.stop()
        await asyncio.gather(replica.stop(), server.stop())


def test_a_server_refuses_sessions_a_less_loaded_replica_can_take():
    async def body() -> None:
        async with _admission(replica_sessions=1) as (admission, held, replica):
            for _ in range(2):
                await admission.check(0, 4)  # we hold 0, then 1: as loaded as the replica at most
                held[0] += 1
            with pytest.raises(SessionError) as e:
                await admission.check(0, 4)  # we hold 2, the replica 1
            assert e.value.code == "busy" and e.value.retry_after_s and replica.peer_id in e.value.message
            await admission.check(0, 8)  # the replica does not serve layers 4:8: nowhere else to go
            held[0] = 1
            await admission.check(0, 4)  # as loaded as the replica: admitted
            assert admission.refused == 1

    asyncio.run(body())


def test_a_replica_that_claims_no_load_gets_no_more_than_every_other_session():
    """A hostile replica that always says it holds nothing would be sent every client if its claim were
    believed; a server refuses at most as many sessions as it admits, so the liar gets half at most."""
    async def body() -> None:
        async with _admission(replica_sessions=0) as (admission, held, _):
            for _ in range(20):
                try:
                    await admission.check(0, 4)
                    held[0] += 1
                except SessionError:
                    pass
            assert admission.refused <= 10 and held[0] >= 10, (held[0], admission.refused)

    asyncio.run(body())


def test_sessions_that_arrive_together_are_not_all_admitted_on_one_count():
    """Opens that arrive together all wait for the same load answer; each must then see those admitted
    before it (seen: a server read 1 session for each of 6 concurrent opens and took all 6)."""
    async def body() -> None:
        async with _admission(replica_sessions=0) as (admission, held, _):
            refused = []

            async def open_one() -> None:
                try:
                    async with admission.admit(0, 4):
                        await asyncio.sleep(0.05)  # the server looks up the next hop, then tables the session
                        held[0] += 1
                except SessionError:
                    refused.append(1)

            await asyncio.gather(*(open_one() for _ in range(6)))
            assert held[0] <= 4 and len(refused) >= 2, (held[0], len(refused))

    asyncio.run(body())


@pytest.mark.skipif(not (Path.home() / ".cache/dsdnode/models/smollm2-135m").exists(), reason="needs smollm2-135m")
def test_concurrent_clients_spread_over_two_real_replicas(tmp_path):
    """Two server processes serve every layer; 6 client nodes start a generation in the same moment, so
    none sees the others' sessions when it routes. The busiest replica holds at most 4 of the 6
    (independent coins put 5 or 6 on one in 22 % of waves; a refusal by load moves the excess)."""
    out = tmp_path / "spread.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/load_spread.py"), "--spans", "1", "--replicas", "2",
                    "--clients", "6", "--waves", "1", "--tokens", "4", "--out", str(out)],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=900)
    result = json.loads(out.read_text())
    [per_replica] = result["waves"][0]["sessions_per_replica"].values()  # a route may use both (two hops)
    assert sum(per_replica) >= 6 and max(per_replica) / sum(per_replica) <= 4 / 6, result["waves"]
