"""Transport cost: a 64 MiB blob between two real nodes on loopback, against raw websockets.

- `blob_s`: one call carrying a 64 MiB blob from node B to node A (TLS 1.3, authenticated
  session, SHA-256 announced and checked on receipt) until A's reply arrives;
- `raw_tls_s`: the same bytes sent with a bare `websockets` client to a bare server over the
  same TLS (the nodes' own contexts, so the same cipher), same options (no compression, same
  size limits), until a one-line reply arrives — the baseline;
- `throughput_ratio` = raw_tls_s / blob_s (target ≥ 0.8);
- `raw_plain_s` and `encryption_cost_ratio` = blob_s / raw_plain_s: what encryption and the
  protocol cost together against unencrypted bare websockets;
- `handshake_ms`: time to open a connection and complete TLS and the mutual handshake.

    .venv/bin/python -m benchmarks.bench_transport [--mib 64] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from benchmarks._common import write_result
from hearthnet import constants as C
from hearthnet.bus.bus import CallContext
from hearthnet.bus.handshake import make_hello, sign_auth, transcript, verify_auth
from hearthnet.bus.protocol import decode, encode
from hearthnet.bus.tls import client_context, listener_binding, server_context
from hearthnet.config import config_from_dict
from hearthnet.identity import NodeIdentity
from hearthnet.node import Node

WS = {
    "compression": None,
    "max_size": C.WS_MAX_MESSAGE_BYTES,
    "write_limit": C.WS_WRITE_LIMIT_BYTES,
}


class Sink(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SinkReply(BaseModel):
    size: int


async def _sink(ctx: CallContext, _req: Sink) -> SinkReply:
    return SinkReply(size=len(ctx.blob or b""))


def _config(tmp: Path, name: str, peers: list[str]):  # type: ignore[no-untyped-def]
    return config_from_dict(
        {
            "node": {"name": name, "data_dir": str(tmp / name)},
            "listen": {"host": "127.0.0.1", "port": 0},
            "peers": [{"url": u, "any_node": True} for u in peers],
            "log": {"level": "warning"},
        },
        tmp,
    )


async def raw_baseline(blob: bytes, repeats: int, tls: bool) -> list[float]:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(str(len(message)))

    times = []
    server_tls = server_context(NodeIdentity.generate())[0] if tls else None
    client_tls = {"ssl": client_context()} if tls else {}
    async with serve(handler, "127.0.0.1", 0, ssl=server_tls, **WS) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}"
        async with connect(url, proxy=None, **client_tls, **WS) as ws:
            for _ in range(repeats):
                start = time.perf_counter()
                await ws.send(blob)
                assert int(await ws.recv()) == len(blob)
                times.append(time.perf_counter() - start)
    return times


async def node_blob(blob: bytes, repeats: int, tmp: Path) -> tuple[list[float], list[float]]:
    a = Node(_config(tmp, "a", []), NodeIdentity.generate())
    a.bus.register("bench.sink", _sink, Sink, SinkReply)
    await a.start()
    b = Node(_config(tmp, "b", [a.listen_url]), NodeIdentity.generate())
    await b.start()
    try:
        await b.wait_for_peer(a.node_id)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            reply = await b.bus.call(
                "bench.sink",
                Sink(),
                peer=a.node_id,
                blob=blob,
                timeout=120,
                response_model=SinkReply,
            )
            times.append(time.perf_counter() - start)
            assert reply.size == len(blob)
        handshakes = []
        ident = NodeIdentity.generate()
        for _ in range(20):
            start = time.perf_counter()
            async with connect(a.listen_url, proxy=None, ssl=client_context(), **WS) as ws:
                mine = make_hello(ident, a.config.node.network_id, "dialer")
                await ws.send(encode(mine))
                theirs = decode(await ws.recv())
                channel = listener_binding(ws.transport.get_extra_info("ssl_object"), theirs.node)  # type: ignore[union-attr]
                data = transcript(mine, theirs, channel)  # type: ignore[arg-type]
                await ws.send(encode(sign_auth(ident, "dialer", data)))
                verify_auth(theirs, data, decode(await ws.recv()))  # type: ignore[arg-type]
                handshakes.append(time.perf_counter() - start)
        return times, handshakes
    finally:
        await b.stop()
        await a.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = min(args.mib * C.MIB, C.BLOB_MAX_BYTES)
    blob = os.urandom(size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = asyncio.run(raw_baseline(blob, args.repeats, tls=True))
        plain = asyncio.run(raw_baseline(blob, args.repeats, tls=False))
        ours, handshakes = asyncio.run(node_blob(blob, args.repeats, Path(tmp)))
    best_raw, best_plain, best_ours = min(raw), min(plain), min(ours)
    write_result(
        "transport",
        {
            "blob_bytes": size,
            "repeats": args.repeats,
            "blob_s": round(best_ours, 4),
            "blob_s_median": round(statistics.median(ours), 4),
            "raw_tls_s": round(best_raw, 4),
            "raw_tls_s_median": round(statistics.median(raw), 4),
            "raw_plain_s": round(best_plain, 4),
            "blob_mib_per_s": round(size / C.MIB / best_ours, 1),
            "raw_tls_mib_per_s": round(size / C.MIB / best_raw, 1),
            "raw_plain_mib_per_s": round(size / C.MIB / best_plain, 1),
            "throughput_ratio": round(best_raw / best_ours, 3),
            "target_throughput_ratio": 0.8,
            "encryption_cost_ratio": round(best_ours / best_plain, 3),
            "handshake_ms_median": round(statistics.median(handshakes) * 1000, 2),
            "handshake_ms_min": round(min(handshakes) * 1000, 2),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
