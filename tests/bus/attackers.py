"""Hostile clients for the transport tests, runnable as their own process
(`python -m tests.bus.attackers KIND PORT ARG SOURCE...`) so that a test can measure what an
attack costs the node's process alone."""

import asyncio
import base64
import json
import os
import struct
import sys

from hearthnet import constants as C
from hearthnet.bus.tls import client_context

TLS = client_context()


async def upgrade(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A bare WebSocket upgrade by hand, so a test can then write any bytes (partial frames)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), ssl=TLS
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, int(head.split(b" ", 2)[1])


def frame_header(opcode: int, length: int) -> bytes:
    """A masked client frame header declaring `length` payload bytes."""
    return bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length) + os.urandom(4)


async def partial_frame_attack(port: int, push: int, source: str = "127.0.0.1") -> str:
    """Upgrade, declare a 60 MiB frame without authenticating, and push `push` bytes of it."""
    try:
        reader, writer, status = await upgrade(port, source)
    except (OSError, asyncio.IncompleteReadError):
        return "reset"
    if status != 101:
        writer.close()
        return f"http {status}"
    chunk = b"\0" * (256 * C.KIB)
    try:
        writer.write(frame_header(0x2, 60 * C.MIB))
        for _ in range(push // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        # Still open after everything was pushed: the node kept reading the frame.
        rest = await asyncio.wait_for(reader.read(), 5)
        return "cut" if not rest or rest[:1] == b"\x88" else "open"
    except TimeoutError:  # before OSError, of which it is a subclass
        return "open"
    except (OSError, asyncio.IncompleteReadError):
        return "cut"  # the node closed the socket while we were still writing
    finally:
        writer.close()


async def pre_tls(port: int, count: int, source: str) -> str:
    """Open `count` TCP connections from `source` that start a TLS handshake (half a
    ClientHello) and stall; report how many the node cut at once."""
    hello_start = bytes.fromhex("160301") + (512).to_bytes(2, "big") + b"\x01" + b"\0" * 40
    cut, held = 0, []
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            writer.write(hello_start)
            await writer.drain()
            held.append((reader, writer))
        except OSError:
            cut += 1
    await asyncio.sleep(0.5)
    for reader, _ in held:
        try:
            if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                cut += 1
        except TimeoutError:
            pass
        except OSError:
            cut += 1
    print("holding", flush=True)
    await asyncio.sleep(float(os.environ.get("HOLD_S", "2")))
    for _, writer in held:
        writer.close()
    return f"cut {cut}"


async def run_attackers(kind: str, port: int, *args: str) -> list[str]:
    """Run attackers of `kind` in a child process; their outcomes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bus.attackers",
        kind,
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return list(json.loads(out.decode().splitlines()[-1]))


async def _main(kind: str, port: int, arg: str, sources: list[str]) -> list[str]:
    if kind == "partial":
        return list(
            await asyncio.gather(*(partial_frame_attack(port, int(arg), s) for s in sources))
        )
    return list(await asyncio.gather(*(pre_tls(port, int(arg), s) for s in sources)))


if __name__ == "__main__":
    kind, port, arg, *sources = sys.argv[1:]
    print(json.dumps(asyncio.run(_main(kind, int(port), arg, sources))))
