"""The operator's control channel: a unix socket in the node's data directory.

Only the operator can use it: the socket is created mode 0600 inside the 0700 data directory,
so file permissions decide who may talk to the node. One JSON request per connection
(`{"cap", "body", "peer", "timeout"}`), one JSON response (`{"ok", "body"|"error"}`); calls run
as the node itself, so local-only capabilities (`node.status`) are reachable here and nowhere
else. Blobs do not travel over this channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from hearthnet import constants as C
from hearthnet.bus.bus import CapabilityBus
from hearthnet.canonical import parse_json
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.logs import get_logger

log = get_logger("hearthnet.control")


class ControlServer:
    """The operator's unix socket: one JSON call per connection, run as the node itself, so
    local-only capabilities are reachable here and from no peer."""

    def __init__(self, path: Path, bus: CapabilityBus):
        self.path = path
        self.bus = bus
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind the socket mode 0600, replacing one a killed node left behind (not a live one)."""
        if self.path.exists():
            if _is_live(self.path):
                raise HearthnetError(
                    ErrorCode.EVENTLOG_LOCKED, f"another node is serving {self.path}"
                )
            self.path.unlink()  # left behind by a node that was killed
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=C.CONTROL_REQUEST_MAX_BYTES
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Close the socket and remove its file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), C.HANDSHAKE_TIMEOUT_S)
                response = await self._answer(line)
            except (ValueError, asyncio.LimitOverrunError):
                err = HearthnetError(ErrorCode.PAYLOAD_TOO_LARGE, "control request too large")
                response = {"ok": False, "error": err.to_dict()}
            except TimeoutError:
                return
            writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = parse_json(line.strip() or b"null", C.CONTROL_REQUEST_MAX_BYTES)
            if not isinstance(req, dict) or not isinstance(req.get("cap"), str):
                raise HearthnetError(ErrorCode.BAD_REQUEST, "control request needs a 'cap'")
            body = req.get("body") or {}
            peer = req.get("peer")
            timeout = float(req.get("timeout") or C.CALL_TIMEOUT_DEFAULT_S)
            if not isinstance(body, dict) or (peer is not None and not isinstance(peer, str)):
                raise HearthnetError(ErrorCode.BAD_REQUEST, "'body' must be an object")
            result = await self.bus.call(req["cap"], body, peer=peer, timeout=timeout)
            data = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
            return {"ok": True, "body": data}
        except HearthnetError as exc:
            return {"ok": False, "error": exc.to_dict()}
        except (TypeError, ValueError) as exc:
            err = HearthnetError(ErrorCode.BAD_REQUEST, f"bad control request: {exc}")
            return {"ok": False, "error": err.to_dict()}


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def control_call(
    path: Path,
    cap: str,
    body: dict[str, Any] | None = None,
    peer: str | None = None,
    timeout: float = C.CALL_TIMEOUT_DEFAULT_S,
) -> Any:
    """Blocking client used by the CLI: the response body, or the node's error, raised."""
    request = {"cap": cap, "body": body or {}, "peer": peer, "timeout": timeout}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout + C.HANDSHAKE_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise HearthnetError(
                ErrorCode.PEER_NOT_CONNECTED,
                f"no node is running (no control socket at {path}); start it with "
                "`hearthnet node start --config FILE`",
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks, size = [], 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > C.CONTROL_RESPONSE_MAX_BYTES:
                raise HearthnetError(ErrorCode.PAYLOAD_TOO_LARGE, "control response too large")
    response = parse_json(b"".join(chunks), C.CONTROL_RESPONSE_MAX_BYTES)
    if not isinstance(response, dict):
        raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "malformed control response")
    if not response.get("ok"):
        raise HearthnetError.from_dict(response.get("error"))
    return response.get("body")
