"""A node's Ed25519 identity and its self-certifying NodeID.

A NodeID is `hn` + base32(public key ‖ 4-byte SHA-256 checksum), lower case, no padding. It holds
the public key itself, so any signature can be checked from the ID alone with no directory
lookup; the checksum catches typos in rosters and on the command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hearthnet.constants import KEY_FILE_MAX_BYTES, NODE_ID_CHECKSUM_BYTES, NODE_ID_PREFIX
from hearthnet.errors import ErrorCode, HearthnetError

NodeID = NewType("NodeID", str)

_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_NODE_ID_LEN = len(NODE_ID_PREFIX) + len(
    base64.b32encode(b"\0" * (_PUBLIC_KEY_BYTES + NODE_ID_CHECKSUM_BYTES)).rstrip(b"=")
)


def _checksum(public_key: bytes) -> bytes:
    return hashlib.sha256(b"hearthnet-node-id\0" + public_key).digest()[:NODE_ID_CHECKSUM_BYTES]


def node_id_from_public_key(public_key: bytes) -> NodeID:
    """The NodeID of an Ed25519 public key: `hn` + base32 of key and checksum."""
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "an Ed25519 public key is 32 bytes")
    body = base64.b32encode(public_key + _checksum(public_key)).rstrip(b"=").decode().lower()
    return NodeID(NODE_ID_PREFIX + body)


def public_key_from_node_id(node_id: str) -> bytes:
    """The raw public key inside a NodeID; `identity_invalid` when malformed or mistyped."""
    if (
        not isinstance(node_id, str)
        or len(node_id) != _NODE_ID_LEN
        or not node_id.startswith(NODE_ID_PREFIX)
    ):
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "malformed NodeID")
    body = node_id[len(NODE_ID_PREFIX) :]
    if body != body.lower():
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "malformed NodeID")
    padded = body.upper() + "=" * (-len(body) % 8)
    try:
        raw = base64.b32decode(padded)
    except ValueError as exc:
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "malformed NodeID") from exc
    public_key, checksum = raw[:_PUBLIC_KEY_BYTES], raw[_PUBLIC_KEY_BYTES:]
    if checksum != _checksum(public_key):
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "NodeID checksum does not match")
    # base32's last character carries unused bits: only the canonical spelling is one ID.
    if node_id_from_public_key(public_key) != node_id:
        raise HearthnetError(ErrorCode.IDENTITY_INVALID, "NodeID is not in canonical form")
    return public_key


def parse_node_id(node_id: str) -> NodeID:
    """`node_id` as a NodeID once it parses; `identity_invalid` saying why otherwise."""
    public_key_from_node_id(node_id)
    return NodeID(node_id)


def is_node_id(value: object) -> bool:
    """Whether `value` is a well-formed NodeID (for validation that must not raise)."""
    try:
        public_key_from_node_id(value)  # type: ignore[arg-type]
    except HearthnetError:
        return False
    return True


def verify(node_id: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `node_id`'s Ed25519 signature over `data`; needs nothing else."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != _SIGNATURE_BYTES:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_node_id(node_id))
        key.verify(bytes(signature), data)
    except (HearthnetError, InvalidSignature, ValueError):
        return False
    return True


class NodeIdentity:
    """The node's private key. Never logged, never serialised except to its 0600 key file."""

    __slots__ = ("_key", "node_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = node_id_from_public_key(self.public_key)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random identity (`hearthnet init` saves one)."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature over `data`; every signed record in hearthnet comes through here."""
        return self._key.sign(data)

    def derive_key(self, info: bytes) -> bytes:
        """A 32-byte key for `info` derived from the private key (HKDF-SHA256): what this node
        seals at rest only it can open, and nothing derived reveals the identity key."""
        raw = self._key.private_bytes_raw()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(raw)

    def encrypted_pem(self, password: bytes) -> bytes:
        """The key as PKCS#8 PEM encrypted with `password`, for loaders (OpenSSL's) that only
        read files: what touches the disk is useless without the in-memory password."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, created 0600 and never overwriting an existing file."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise HearthnetError(
                ErrorCode.IDENTITY_INVALID, f"key file {path} already exists; not overwriting"
            ) from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        """Load a key file, refusing one that others can read or write."""
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise HearthnetError(
                ErrorCode.IDENTITY_INVALID, f"key file {path} does not exist"
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise HearthnetError(ErrorCode.IDENTITY_INVALID, f"key file {path} is not a file")
        if st.st_mode & 0o077:
            raise HearthnetError(
                ErrorCode.KEY_FILE_INSECURE,
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 600 "
                f"(run: chmod 600 {path})",
            )
        if st.st_size > KEY_FILE_MAX_BYTES:
            raise HearthnetError(ErrorCode.IDENTITY_INVALID, f"key file {path} is too large")
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise HearthnetError(
                ErrorCode.IDENTITY_INVALID, f"key file {path} is not a PEM private key"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise HearthnetError(
                ErrorCode.IDENTITY_INVALID, f"key file {path} is not an Ed25519 key"
            )
        return cls(key)
