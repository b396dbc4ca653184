"""WAN emulation: jitter, uplink bucket and profile math, and a profile's delays and uplink cap
observed between two real processes."""

import asyncio
import random
import statistics
import time

import pytest
from libp2p.peer.id import ID
from tests.helpers.p2p_node import BLOB, ECHO, NodeProcess

from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.latency import JitterSettings, LinkEmulator, LinkLatency, TokenBucket
from dsdnode.net.p2p import P2PNode
from dsdnode.net.wan import PROFILES, WanProfile, load_profile, rtt_matrix


@pytest.mark.parametrize("kind,scale,shape", [("exponential", 4.0, 3.0), ("normal", 4.0, 3.0), ("pareto", 4.0, 3.5)])
def test_jitter_draws_match_their_mean(kind, scale, shape):
    jitter = JitterSettings(kind, scale, shape)
    rng = random.Random(7)
    draws = [jitter.sample_ms(rng) for _ in range(40_000)]
    assert min(draws) >= 0
    assert statistics.fmean(draws) == pytest.approx(jitter.mean_ms, rel=0.05)
    assert statistics.pstdev(draws) > 0.3 * jitter.mean_ms  # a spread, not a constant


def test_jitter_validation_and_none():
    assert JitterSettings().sample_ms(random.Random(1)) == 0.0
    with pytest.raises(ValueError):
        JitterSettings("uniform", 1.0)
    with pytest.raises(ValueError):
        JitterSettings("pareto", 1.0, 1.0)  # no finite mean
    with pytest.raises(ValueError):
        JitterSettings("normal", -1.0)


def test_token_bucket_rate_burst_and_queueing():
    bucket = TokenBucket(1000.0, 100)  # 1000 B/s, 100 B burst
    assert bucket.reserve(100, 0.0) == 0.0  # the burst goes at once
    assert bucket.reserve(500, 0.0) == pytest.approx(0.5)  # then the rate
    assert bucket.reserve(500, 0.0) == pytest.approx(1.0)  # a second sender queues behind the first
    assert bucket.reserve(10, 10.0) == 0.0  # idle long enough: full burst again, never more
    assert bucket.tokens == pytest.approx(90)
    with pytest.raises(ValueError):
        TokenBucket(0.0, 10)


def test_emulator_delay_is_base_plus_jitter_and_seeded():
    settings = LinkLatency(10.0, {"near": 2.0}, JitterSettings("exponential", 5.0), uplink_mbit=8.0, seed=3)
    a, b = LinkEmulator(settings), LinkEmulator(settings)
    draws = [a.delay_s("far") for _ in range(2000)]
    assert draws == [b.delay_s("far") for _ in range(2000)]  # the seed fixes the draws
    assert min(draws) >= 0.010 and statistics.fmean(draws) == pytest.approx(0.015, rel=0.1)
    assert min(a.delay_s("near") for _ in range(100)) >= 0.002
    assert a.uplink_wait_s(1_000_000 + settings.burst_bytes, 0.0) == pytest.approx(1.0)  # 8 Mbit/s = 1 MB/s
    assert LinkEmulator(LinkLatency()).uplink_wait_s(10**9, 0.0) == 0.0


def test_link_config_round_trips_through_toml(tmp_path):
    settings = LinkLatency(12.5, {"peerA": 3.0}, JitterSettings("pareto", 4.0, 2.5), 20.0, 4096, seed=9)
    path = tmp_path / "links.toml"
    path.write_text(settings.to_toml())
    assert LinkLatency.load(path) == settings
    path.write_text("[links]\ndefualt_ms = 5\n")
    with pytest.raises(ValueError, match="links.toml"):
        LinkLatency.load(path)


def test_matrix_is_symmetric_and_sourced():
    source, rtt = rtt_matrix()
    assert "wonderproxy.com" in source
    paris_milan = rtt[frozenset(("paris", "milan"))]
    assert paris_milan == pytest.approx((21.29 + 21.61) / 2)  # measured both ways: the mean
    assert rtt[frozenset(("brisbane", "zurich"))] == pytest.approx(346.92)  # measured one way only: as measured


def test_profiles_place_nodes_and_give_per_pair_delays():
    assert set(PROFILES) == {"lan", "metro", "continental", "intercontinental", "home-uplink"}
    inter = PROFILES["intercontinental"]
    assert inter.mean_one_way_ms * 2 >= 150 and inter.jitter.kind != "none"
    assert PROFILES["home-uplink"].uplink_mbit == 20.0
    links = inter.node_links(["c", "s1", "s2"], seed=1)
    # client at new_york, s1 at paris, s2 at fremont: each pair half its RTT, both ways alike
    assert links[0].base_ms("s1") == pytest.approx(inter.rtt_ms("new_york", "paris") / 2)
    assert links[1].base_ms("c") == links[0].base_ms("s1")
    assert links[1].base_ms("s2") == pytest.approx(inter.rtt_ms("paris", "fremont") / 2)
    assert links[2].base_ms("unknown") == pytest.approx(inter.mean_one_way_ms)
    assert PROFILES["lan"].node_links(["a", "b"])[0].base_ms("b") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no RTT"):
        WanProfile("x", sites=("paris", "atlantis"))


def test_custom_profile_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[wan]\nbase = "continental"\nsites = ["paris", "lab"]\nuplink_mbit = 5.0\n'
                    '[wan.rtt_ms.lab]\nparis = 30.0\n[wan.jitter]\nkind = "normal"\nscale_ms = 1.0\n')
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.uplink_mbit == 5.0 and profile.jitter.kind == "normal"
    assert profile.rtt_ms("lab", "paris") == 30.0
    for bad in ('[wan]\nsites = ["paris"]\nspeed = 3\n', "[node]\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="mine.toml"):
            load_profile(str(path))
    with pytest.raises(ValueError, match="unknown WAN profile"):
        load_profile("moon")


@pytest.mark.heavy
def test_profile_delays_and_uplink_cap_are_observed_between_processes(tmp_path):
    """This process sits in Paris, a child process in Moscow (the matrix: about 56 ms RTT), both with
    8 Mbit/s uplinks, as their --link-config files say: an echo takes the RTT, a 400 kB answer the
    child's uplink time on top."""
    profile = WanProfile("two-cities", sites=("paris", "moscow"), uplink_mbit=8.0)
    keys = [load_or_create_identity(tmp_path / f"{name}.key") for name in ("me", "child")]
    ids = [ID.from_pubkey(k.public_key).to_base58() for k in keys]
    mine, theirs = profile.node_links(ids)
    (tmp_path / "child.toml").write_text(theirs.to_toml())
    rtt = profile.rtt_ms("paris", "moscow") / 1000
    blob = 400_000
    with NodeProcess.start(identity=str(tmp_path / "child.key"), link_config=str(tmp_path / "child.toml")) as child:
        async def main():
            node = await P2PNode.start(identity=keys[0], latency=mine)
            try:
                echo = await node.open_stream(child.peer_info, ECHO)
                rtts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    await echo.send(b"x" * 8)
                    await echo.recv(timeout=10)
                    rtts.append(time.perf_counter() - t0)
                stream = await node.open_stream(child.peer_info, BLOB)
                t0 = time.perf_counter()
                await stream.send(str(blob).encode())
                got = await stream.recv(timeout=30)
                return rtts, time.perf_counter() - t0, len(got)
            finally:
                await node.stop()

        rtts, blob_s, size = asyncio.run(main())
    assert size == blob
    assert min(rtts) >= rtt * 0.98, rtts
    assert statistics.median(rtts) < rtt + 0.15, rtts  # generous: a shared, loaded machine
    uplink_s = (blob - theirs.burst_bytes) / 1e6  # 8 Mbit/s = 1 MB/s
    assert blob_s >= rtt + uplink_s * 0.98, blob_s
    assert blob_s < rtt + uplink_s + 0.6, blob_s
