"""A participant's round secrets sealed at rest, so a node restarted after the mask roster
closed rejoins its secure round instead of sinking it.

The three secrets (`masks.MaskingKey.to_bytes`) are sealed with ChaCha20-Poly1305 under a key
derived from the node's identity key for that round (`NodeIdentity.derive_key`), bound to the
round and manifest as associated data, and written 0600 through a temp file
(`files.replace_file`). The file is removed when the round ends here. A copied or altered
file does not open on another node or round.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.files import replace_file
from hearthnet.identity import NodeIdentity

DIR_NAME = "round-secrets"
_INFO = b"hearthnet/fedlearn/round-secrets/v1\0"


def _path(data_dir: Path, round_id: str) -> Path:
    if not round_id.isalnum():
        raise HearthnetError(ErrorCode.BAD_REQUEST, "invalid round id")
    return data_dir / DIR_NAME / f"{round_id}.sealed"


def _aead(identity: NodeIdentity, round_id: str) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(identity.derive_key(_INFO + round_id.encode()))


def seal(
    data_dir: Path, identity: NodeIdentity, round_id: str, manifest_sha: str, key: MaskingKey
) -> None:
    """Write the round's secrets sealed (0600, atomically)."""
    path = _path(data_dir, round_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = os.lstat(path.parent)
    if not stat.S_ISDIR(folder.st_mode) or folder.st_mode & 0o077:
        raise HearthnetError(
            ErrorCode.KEY_FILE_INSECURE,
            f"{path.parent} must be a directory only this user can read (chmod 700)",
        )
    nonce = secrets.token_bytes(12)
    sealed = nonce + _aead(identity, round_id).encrypt(
        nonce, key.to_bytes(), (round_id + manifest_sha).encode()
    )
    replace_file(path, sealed)


def unseal(
    data_dir: Path, identity: NodeIdentity, round_id: str, manifest_sha: str
) -> MaskingKey | None:
    """The round's secrets, or None if none were sealed here; `eventlog_invalid` if the file
    does not open (altered, or another node's)."""
    path = _path(data_dir, round_id)
    broken = HearthnetError(
        ErrorCode.EVENTLOG_INVALID,
        f"the sealed secrets of round {round_id} do not open; remove {path} to leave the round",
    )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink, a directory, …: not a file this node wrote
        raise broken from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise broken  # a directory, FIFO or device: would fail, block or lie
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(12 + MaskingKey.SECRET_BYTES + 16 + 1)
    try:
        plain = _aead(identity, round_id).decrypt(
            data[:12], data[12:], (round_id + manifest_sha).encode()
        )
    except (InvalidTag, ValueError):
        raise broken from None
    return MaskingKey.from_bytes(plain)


def discard(data_dir: Path, round_id: str) -> None:
    """Remove the round's sealed secrets (the round ended here)."""
    with contextlib.suppress(FileNotFoundError):
        _path(data_dir, round_id).unlink()
