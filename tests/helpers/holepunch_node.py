"""A bare libp2p host for the hole-punch test: py-libp2p's DCUtR over dsdnode's relay (net/relay.py).

Run as `python holepunch_node.py ROLE IP DIR` inside a network namespace. ROLE relay: offers the
relay and writes DIR/relay (its id and address). ROLE dest: reserves a slot there and writes
DIR/dest (its id). ROLE src: dials dest through the relay, asks DCUtR to upgrade, and prints one
JSON line: whether the punch succeeded and the transport addresses of its connections to dest.
Every host listens on port 4001 (a hole punch dials from the listen port), with identify's
observed-address discovery on (DCUtR predicts the peer's public address from it) and up to two
connections per peer (the relayed one and the direct one). Each role ends by itself within 60 s.
"""

from __future__ import annotations

import json
import os
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from dsdnode.net import relay

PORT = 4001
LIFETIME_S = 60.0


async def wait_file(path: str) -> str:
    with trio.fail_after(LIFETIME_S):
        while not os.path.exists(path):
            await trio.sleep(0.1)
    await trio.sleep(0.1)  # written in one call; let it land
    with open(path) as f:
        return f.read()


async def main(role: str, ip: str, folder: str) -> None:
    keys = create_new_key_pair()
    host = new_host(key_pair=keys,
                    sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(keys, noise_privkey=new_x25519_key_pair().private_key)},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                    connection_config=ConnectionConfig(max_connections_per_peer=2))
    with trio.move_on_after(LIFETIME_S):
        async with host.run([multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{PORT}")]), trio.open_nursery() as nursery:
            if role == "relay":
                relay.RelayService(host, relay.RelayLimits(), lambda _peer: 0.0).register()
                with open(os.path.join(folder, "relay"), "w") as f:
                    f.write(json.dumps([host.get_id().to_base58(), f"/ip4/{ip}/tcp/{PORT}"]))
                await trio.sleep_forever()
            relay_id, relay_addr = json.loads(await wait_file(os.path.join(folder, "relay")))
            relay_info = PeerInfo(ID.from_base58(relay_id), [multiaddr.Multiaddr(relay_addr)])
            dcutr = DCUtRProtocol(host)
            async with background_trio_service(dcutr):
                host.set_stream_handler(relay.STOP_PROTOCOL, relay.stop_handler(host, lambda _relay: True))
                await host.connect(relay_info)
                if role == "dest":
                    await relay.reserve(host, relay_info, nursery, lambda _res: None)
                    with open(os.path.join(folder, "dest"), "w") as f:
                        f.write(host.get_id().to_base58())
                    await trio.sleep_forever()
                dest = ID.from_base58(await wait_file(os.path.join(folder, "dest")))
                await relay.dial_relayed(host, dest, relay.circuit_addr(relay_addr, relay_id))
                began = time.monotonic()
                punched = await dcutr.initiate_hole_punch(dest)
                conns = [str(a) for c in host.get_network().connections.get(dest, [])
                         for a in c.get_transport_addresses()]
                print(json.dumps({"punched": punched, "seconds": round(time.monotonic() - began, 2),
                                  "connections": conns}), flush=True)
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:4])
