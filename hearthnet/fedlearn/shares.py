"""Shamir shares of a participant's round secrets and their encrypted delivery (SecAgg+).

A participant splits its 32-byte self-mask seed and its 32-byte X25519 mask private key t-of-k
among its k neighbours (`secagg_graph.py`) with pycryptodome's Shamir over GF(2^128), one split
per 16-byte half, at the x-coordinates 1..k given by the neighbours' sorted order. Each
neighbour's pair of shares is encrypted for it with ChaCha20-Poly1305 under a key only the two
know (X25519 of their share keys, HKDF bound to the round and the ordered pair) and routed
through the coordinator in one `ShareBundle` signed by the sender. Later a neighbour reveals to
the coordinator, for each sender, exactly one of the two shares (`Reveal`): the self-mask share
of a survivor, the mask-key share of a participant that dropped.

Shares travel as fixed-size canonical bytes (hex in canonical JSON), never pickled.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeID, NodeIdentity, verify

SHARE_PURPOSE = "hearthnet.fedlearn.shares/1"
_SHARE = struct.Struct(">H16s16s")  # x-coordinate, the secret's two halves at it
SHARE_BYTES = _SHARE.size  # 34
_PAIR_BYTES = 2 * SHARE_BYTES
_CIPHER_HEX = 2 * (_PAIR_BYTES + 16)  # + the Poly1305 tag
_MAX_TRIES = 64  # share subsets tried before a secret counts as unrecoverable

_NodeName = Annotated[str, Field(max_length=128)]
_CipherHex = Annotated[str, Field(pattern=rf"^[0-9a-f]{{{_CIPHER_HEX}}}$")]
_ShareHex = Annotated[str, Field(pattern=rf"^[0-9a-f]{{{2 * SHARE_BYTES}}}$")]
_CommitHex = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` shares of a 32-byte secret, any `threshold` of which recover it; share i (from 0)
    sits at x = i + 1."""
    if len(secret) != 32:
        raise ValueError("a shared secret is 32 bytes")
    lo = Shamir.split(threshold, count, secret[:16])
    hi = Shamir.split(threshold, count, secret[16:])
    return [_SHARE.pack(x, a, b) for (x, a), (_, b) in zip(lo, hi, strict=True)]


def combine(shares: Iterable[bytes]) -> bytes:
    """The 32-byte secret from shares at distinct x-coordinates (exactly the threshold's count:
    Shamir interpolates whatever it is given)."""
    parts = [_SHARE.unpack(s) for s in shares]
    lo = Shamir.combine([(x, a) for x, a, _ in parts])
    hi = Shamir.combine([(x, b) for x, _, b in parts])
    return lo + hi


def recover(shares: Sequence[bytes], threshold: int, check: Callable[[bytes], bool]) -> bytes:
    """The secret that `check` accepts (its public key or commitment matches), from `threshold`
    of `shares`; subsets are tried so a few bad shares are outvoted. `fedlearn_aggregation_failed`
    if too few shares or no subset passes."""
    if len(shares) < threshold:
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            f"{len(shares)} shares revealed, {threshold} needed to recover a secret",
        )
    by_x = {s[:2]: s for s in sorted(shares)}  # one share per x-coordinate
    for subset in itertools.islice(itertools.combinations(by_x.values(), threshold), _MAX_TRIES):
        secret = combine(subset)
        if check(secret):
            return secret
    raise HearthnetError(
        ErrorCode.FEDLEARN_AGGREGATION_FAILED, "revealed shares do not recover the secret"
    )


def _pair_key(
    mine: X25519PrivateKey, theirs: str, round_id: str, sender: str, recipient: str
) -> bytes:
    try:
        shared = mine.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(theirs)))
    except ValueError:  # a low-order point
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "unusable share public key") from None
    info = (
        b"hearthnet/fedlearn/share-encryption/v1\0"
        + "\0".join((round_id, sender, recipient)).encode()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _aad(round_id: str, sender: str, recipient: str) -> bytes:
    return canonical_bytes({"round_id": round_id, "sender": sender, "recipient": recipient})


def seal(
    key: X25519PrivateKey,
    recipient_share_key: str,
    round_id: str,
    sender: str,
    recipient: str,
    self_share: bytes,
    key_share: bytes,
) -> str:
    """One neighbour's two shares, encrypted for it (hex). The key is used for this one message
    only (it is bound to the round and the ordered pair), so a zero nonce is safe."""
    k = _pair_key(key, recipient_share_key, round_id, sender, recipient)
    ct = ChaCha20Poly1305(k).encrypt(
        bytes(12), self_share + key_share, _aad(round_id, sender, recipient)
    )
    return ct.hex()


def open_sealed(
    key: X25519PrivateKey,
    sender_share_key: str,
    round_id: str,
    sender: str,
    recipient: str,
    sealed: str,
) -> tuple[bytes, bytes]:
    """The (self-mask share, mask-key share) a neighbour sealed for this node; `delta_invalid`
    if they do not decrypt."""
    k = _pair_key(key, sender_share_key, round_id, sender, recipient)
    try:
        plain = ChaCha20Poly1305(k).decrypt(
            bytes(12), bytes.fromhex(sealed), _aad(round_id, sender, recipient)
        )
    except InvalidTag:
        raise HearthnetError(
            ErrorCode.DELTA_INVALID, f"the shares from {sender[:16]}… do not decrypt"
        ) from None
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]


def commit(round_id: str, owner: str, holder: str, kind: str, share: bytes) -> str:
    """The public commitment to one share (SHA-256, bound to the round, owner, holder and kind):
    in the signed bundle, so the coordinator can check a revealed share without learning it."""
    h = hashlib.sha256(b"hearthnet/fedlearn/share-commit/v1\0")
    h.update("\0".join((round_id, owner, holder, kind)).encode() + b"\0" + share)
    return h.hexdigest()


class ShareBundle(BaseModel):
    """A participant's encrypted shares, one per neighbour, signed by it so the coordinator that
    routes them cannot swap or forge one; `commitments[holder]` is the hex SHA-256 commitment
    to that neighbour's self-mask share, then to its mask-key share (`commit`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    manifest_sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sender: _NodeName
    shares: Annotated[dict[_NodeName, _CipherHex], Field(max_length=C.FEDLEARN_MAX_PARTICIPANTS)]
    commitments: Annotated[
        dict[_NodeName, _CommitHex], Field(max_length=C.FEDLEARN_MAX_PARTICIPANTS)
    ]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    @staticmethod
    def signing_bytes(
        round_id: str,
        manifest_sha: str,
        sender: str,
        shares: Mapping[str, str],
        commitments: Mapping[str, str],
    ) -> bytes:
        """The canonical bytes the sender signs."""
        return canonical_bytes(
            {
                "purpose": SHARE_PURPOSE,
                "round_id": round_id,
                "manifest_sha": manifest_sha,
                "sender": sender,
                "shares": dict(shares),
                "commitments": dict(commitments),
            }
        )

    @classmethod
    def create(
        cls,
        identity: NodeIdentity,
        round_id: str,
        manifest_sha: str,
        shares: Mapping[str, str],
        commitments: Mapping[str, str],
    ) -> ShareBundle:
        """Sign `shares` (recipient → sealed hex) and their commitments as this node's bundle."""
        data = cls.signing_bytes(round_id, manifest_sha, identity.node_id, shares, commitments)
        return cls(
            round_id=round_id,
            manifest_sha=manifest_sha,
            sender=identity.node_id,
            shares=dict(shares),
            commitments=dict(commitments),
            signature=identity.sign(data).hex(),
        )

    def committed(self, holder: str, kind: str) -> str:
        """The commitment to `holder`'s share of `kind` ("self" or "key")."""
        both = self.commitments[holder]
        return both[:64] if kind == "self" else both[64:]

    def verify(self) -> None:
        """`signature_invalid` unless the sender signed this bundle."""
        data = self.signing_bytes(
            self.round_id, self.manifest_sha, self.sender, self.shares, self.commitments
        )
        if not verify(NodeID(self.sender), data, bytes.fromhex(self.signature)):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "share bundle signature is invalid")


class Reveal(BaseModel):
    """A participant's answer to the coordinator's unmask request: for each neighbour that sent
    it shares, the self-mask share (neighbour survived) or the mask-key share (it dropped),
    never both. Sent over the authenticated bus; `unmask_sha` names the request it answers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    unmask_sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sender: _NodeName
    self_shares: Annotated[
        dict[_NodeName, _ShareHex], Field(max_length=C.FEDLEARN_MAX_PARTICIPANTS)
    ]
    key_shares: Annotated[dict[_NodeName, _ShareHex], Field(max_length=C.FEDLEARN_MAX_PARTICIPANTS)]
