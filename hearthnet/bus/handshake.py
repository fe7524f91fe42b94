"""The mutual handshake, with no I/O.

Each side sends a `hello` with a fresh 32-byte nonce; both then sign the same transcript — JCS of
(protocol version, network id, the dialer's and the listener's NodeIDs and nonces, and the TLS
channel binding: the SHA-256 of the listener's certificate, see `tls.py`) — together with their
own role. Nothing else is processed before both signatures verify. A recorded
handshake cannot be replayed: the verifier's own fresh nonce is inside what must be signed, and
a signature made as one role never verifies as the other.
"""

from __future__ import annotations

import secrets

from hearthnet import constants as C
from hearthnet.bus.protocol import Auth, Hello
from hearthnet.canonical import canonical_bytes
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeIdentity, is_node_id, verify


def make_hello(identity: NodeIdentity, network_id: str, role: str) -> Hello:
    """This node's hello for `role`, with a fresh nonce that makes the transcript unique."""
    return Hello(
        t="hello",
        v=C.PROTOCOL_VERSION,
        net=network_id,
        role=role,  # type: ignore[arg-type]
        node=identity.node_id,
        nonce=secrets.token_hex(C.HANDSHAKE_NONCE_BYTES),
    )


def check_hello(hello: Hello, network_id: str, expected_role: str) -> None:
    """Refuse a hello for another protocol version, network or role, or with a malformed NodeID."""
    if hello.v != C.PROTOCOL_VERSION:
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, f"unsupported protocol {hello.v[:32]!r}")
    if hello.net != network_id:
        raise HearthnetError(
            ErrorCode.HANDSHAKE_FAILED, "different network id (peers must share [node] network_id)"
        )
    if hello.role != expected_role:
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "unexpected handshake role")
    if not is_node_id(hello.node):
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "malformed NodeID")


def transcript(dialer: Hello, listener: Hello, channel: str) -> bytes:
    """What both sides sign; `channel` binds it to the TLS session both are in (a relay that
    terminates TLS sees another certificate, so the two sides' transcripts differ)."""
    if dialer.nonce == listener.nonce:
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "nonce reuse")
    return canonical_bytes(
        {
            "purpose": "hearthnet.handshake/1",
            "v": C.PROTOCOL_VERSION,
            "net": dialer.net,
            "dialer": {"node": dialer.node, "nonce": dialer.nonce},
            "listener": {"node": listener.node, "nonce": listener.nonce},
            "channel": {"type": "tls-server-end-point", "sha256": channel},
        }
    )


def _signed_part(role: str, data: bytes) -> bytes:
    return canonical_bytes({"role": role}) + b"\n" + data


def sign_auth(identity: NodeIdentity, role: str, data: bytes) -> Auth:
    """Sign the transcript as `role`; the role inside stops a signature being reflected back."""
    return Auth(t="auth", sig=identity.sign(_signed_part(role, data)).hex())


def verify_auth(peer: Hello, data: bytes, auth: Auth) -> None:
    """Check the peer's signature over the transcript as the role it claimed in its hello."""
    if not verify(peer.node, _signed_part(peer.role, data), bytes.fromhex(auth.sig)):
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "handshake signature does not verify")
