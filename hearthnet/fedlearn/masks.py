"""Round secrets for secure aggregation: the signed announcement and the pairwise key.

A participant's `MaskingKey` holds three secrets for one round: the X25519 key its pairwise
masks come from, a second X25519 key that encrypts the Shamir shares it sends and receives
(`shares.py`), and the 32-byte seed of its self mask. The announcement carries both public keys
and a commitment to the seed, so a secret recovered from shares can be checked. The key exchange
(X25519 + HKDF; `aggregation/secure.py` does the masking) needs only `cryptography`, so the wire
messages and the event fold that carry announcements stay light (docs/decisions.md, issue 14).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Annotated

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.submission import capped_weights
from hearthnet.identity import NodeID, NodeIdentity, verify


class MaskKeyAnnouncement(BaseModel):
    """A participant's round key for masking, bound to it by its node signature."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    manifest_sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    participant: Annotated[str, Field(max_length=128)]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    share_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    self_commitment: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    num_samples: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_NUM_SAMPLES)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    def _signed_fields(self) -> dict[str, object]:
        return self.model_dump(exclude={"signature"})

    @staticmethod
    def signing_bytes(fields: Mapping[str, object]) -> bytes:
        """The canonical bytes a participant signs to announce its keys, bound to the round,
        manifest and its weight."""
        return canonical_bytes({"purpose": C.FEDLEARN_MASK_KEY_PURPOSE, **fields})

    def verify(self) -> None:
        """`signature_invalid` unless the participant signed this announcement."""
        data = self.signing_bytes(self._signed_fields())
        if not verify(NodeID(self.participant), data, bytes.fromhex(self.signature)):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "mask key signature is invalid")


def commitment(seed: bytes) -> str:
    """The public commitment to a self-mask seed (SHA-256, domain-separated)."""
    return hashlib.sha256(b"hearthnet/fedlearn/self-mask/v1\0" + seed).hexdigest()


def x25519_public(private: bytes) -> str:
    """The public key (hex) of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw().hex()


class MaskingKey:
    """A participant's round secrets: the mask key, the share key and the self-mask seed. Never
    logged; persisted only sealed (`round_secrets.py`)."""

    __slots__ = ("_private", "_share", "public_key", "self_seed", "share_public")

    SECRET_BYTES = 96

    def __init__(
        self,
        private: X25519PrivateKey | None = None,
        share: X25519PrivateKey | None = None,
        self_seed: bytes | None = None,
    ):
        self._private = private or X25519PrivateKey.generate()
        self._share = share or X25519PrivateKey.generate()
        self.self_seed = self_seed if self_seed is not None else secrets.token_bytes(32)
        self.public_key = self._private.public_key().public_bytes_raw()
        self.share_public = self._share.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return "MaskingKey(<secret>)"

    @property
    def share_private(self) -> X25519PrivateKey:
        """The key that opens and seals this node's shares."""
        return self._share

    def mask_secret(self) -> bytes:
        """The raw mask private key (only ever Shamir-shared, never sent whole)."""
        return self._private.private_bytes_raw()

    def to_bytes(self) -> bytes:
        """The three secrets, for sealing at rest."""
        return self.mask_secret() + self._share.private_bytes_raw() + self.self_seed

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskingKey:
        """The secrets `to_bytes` gave."""
        if len(data) != cls.SECRET_BYTES:
            raise ValueError("round secrets are 96 bytes")
        return cls(
            X25519PrivateKey.from_private_bytes(data[:32]),
            X25519PrivateKey.from_private_bytes(data[32:64]),
            data[64:],
        )

    def announce(
        self, identity: NodeIdentity, round_id: str, manifest_sha: str, num_samples: int
    ) -> MaskKeyAnnouncement:
        """This key's signed announcement for a round, sent to the coordinator for the roster."""
        fields: dict[str, object] = {
            "round_id": round_id,
            "manifest_sha": manifest_sha,
            "participant": identity.node_id,
            "public_key": self.public_key.hex(),
            "share_key": self.share_public.hex(),
            "self_commitment": commitment(self.self_seed),
            "num_samples": num_samples,
        }
        sig = identity.sign(MaskKeyAnnouncement.signing_bytes(fields))
        return MaskKeyAnnouncement.model_validate({**fields, "signature": sig.hex()})

    def pairwise_key(self, me: str, peer: MaskKeyAnnouncement) -> bytes:
        """The secret this node shares with `peer`, from which both derive the same mask with
        opposite signs."""
        return pairwise_key(self._private, me, peer)


def pairwise_key(private: X25519PrivateKey, me: str, peer: MaskKeyAnnouncement) -> bytes:
    """X25519 of `me`'s mask key and `peer`'s, then HKDF bound to the round and the sorted pair;
    also how the coordinator removes a dropped participant's masks from its recovered key."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer.public_key)))
    except ValueError:  # a low-order point gives an all-zero secret
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "unusable mask public key") from None
    low, high = sorted((me, peer.participant))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=bytes.fromhex(peer.manifest_sha),
        info=b"hearthnet/fedlearn/pairwise-mask/v1\0"
        + peer.round_id.encode()
        + b"\0"
        + low.encode()
        + b"\0"
        + high.encode(),
    ).derive(shared)


def check_roster(
    announcements: Mapping[str, MaskKeyAnnouncement], manifest: RoundManifest, manifest_sha: str
) -> None:
    """Refuse a secure round's roster that is too small or holds an announcement that is unsigned
    or for another round: masks only cancel among the same, valid set."""
    if len(announcements) < C.FEDLEARN_SECURE_MIN_PARTICIPANTS:
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            f"secure aggregation needs at least {C.FEDLEARN_SECURE_MIN_PARTICIPANTS} participants",
        )
    for participant, ann in announcements.items():
        ann.verify()
        if (
            ann.participant != participant
            or ann.round_id != manifest.round_id
            or ann.manifest_sha != manifest_sha
        ):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "mask key is for another round")


def roster_weights(announcements: Mapping[str, MaskKeyAnnouncement]) -> dict[str, int]:
    """Every participant's capped weight, computable by all from the announced roster."""
    order = sorted(announcements)
    capped = capped_weights([announcements[p].num_samples for p in order])
    return dict(zip(order, capped, strict=True))
