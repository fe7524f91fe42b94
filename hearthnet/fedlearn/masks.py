"""Masking keys for secure aggregation: the signed announcement and the pairwise key.

The key exchange (X25519 + HKDF, see `aggregation/secure.py` for the masking itself) needs only
`cryptography`, so the wire messages and the event fold that carry announcements stay light
(docs/decisions.md, issue 14).
"""

from __future__ import annotations

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
    num_samples: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_NUM_SAMPLES)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    @staticmethod
    def signing_bytes(
        round_id: str, manifest_sha: str, participant: str, public_key: str, num_samples: int
    ) -> bytes:
        """The canonical bytes a participant signs to announce its mask key, bound to the round,
        manifest and its weight."""
        return canonical_bytes(
            {
                "purpose": C.FEDLEARN_MASK_KEY_PURPOSE,
                "round_id": round_id,
                "manifest_sha": manifest_sha,
                "participant": participant,
                "public_key": public_key,
                "num_samples": num_samples,
            }
        )

    def verify(self) -> None:
        """`signature_invalid` unless the participant signed this announcement."""
        data = self.signing_bytes(
            self.round_id, self.manifest_sha, self.participant, self.public_key, self.num_samples
        )
        if not verify(NodeID(self.participant), data, bytes.fromhex(self.signature)):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "mask key signature is invalid")


class MaskingKey:
    """A participant's X25519 key for one round. Never logged or persisted."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private: X25519PrivateKey | None = None):
        self._private = private or X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return "MaskingKey(<secret>)"

    def announce(
        self, identity: NodeIdentity, round_id: str, manifest_sha: str, num_samples: int
    ) -> MaskKeyAnnouncement:
        """This key's signed announcement for a round, sent to the coordinator for the roster."""
        pub = self.public_key.hex()
        sig = identity.sign(
            MaskKeyAnnouncement.signing_bytes(
                round_id, manifest_sha, identity.node_id, pub, num_samples
            )
        )
        return MaskKeyAnnouncement(
            round_id=round_id,
            manifest_sha=manifest_sha,
            participant=identity.node_id,
            public_key=pub,
            num_samples=num_samples,
            signature=sig.hex(),
        )

    def pairwise_key(self, me: str, peer: MaskKeyAnnouncement) -> bytes:
        """The secret this node shares with `peer` (X25519, then HKDF bound to the round and the
        sorted pair), from which both derive the same mask with opposite signs."""
        try:
            shared = self._private.exchange(
                X25519PublicKey.from_public_bytes(bytes.fromhex(peer.public_key))
            )
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
