"""Content-addressed blob store: deltas and adapters, keyed by SHA-256.

Writes are atomic (temp file, fsync, rename, fsync of the directory) so a crash leaves either the
whole blob or nothing. Reads re-hash the bytes: a corrupt file is reported, never returned.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from hearthnet.constants import BLOB_MAX_BYTES, BLOB_READ_CHUNK_BYTES
from hearthnet.errors import ErrorCode, HearthnetError

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def check_sha(sha: str) -> str:
    """A SHA is exactly 64 lower-case hex digits; anything else could escape the store's root."""
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise HearthnetError(ErrorCode.BLOB_NOT_FOUND, "not a SHA-256 hex digest")
    return sha


class BlobStore:
    """Content-addressed files under the data directory: deltas, adapters and other large bytes,
    named by their SHA-256 so a name can be checked against its content."""

    def __init__(self, root: Path, max_bytes: int = BLOB_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, sha: str) -> Path:
        """Where blob `sha` lives (`<root>/<first two hex>/<sha>`); refuses anything not a SHA."""
        check_sha(sha)
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        """Whether blob `sha` is stored (False for a malformed SHA rather than an error)."""
        try:
            return self.path(sha).is_file()
        except HearthnetError:
            return False

    def put(self, data: bytes) -> str:
        """Store `data` atomically under its SHA-256 and return the SHA; bounded by `max_bytes`."""
        if len(data) > self.max_bytes:
            raise HearthnetError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"blob of {len(data)} bytes exceeds the limit of {self.max_bytes}",
            )
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.is_file() and self._digest(target) == sha:
            return sha
        target.parent.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return sha

    def get(self, sha: str) -> bytes:
        """The bytes of blob `sha`, re-hashed on read: `blob_corrupt` if the file was altered."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise HearthnetError(ErrorCode.BLOB_NOT_FOUND, f"no blob {sha}") from exc
        if hashlib.sha256(data).hexdigest() != sha:
            raise HearthnetError(
                ErrorCode.BLOB_CORRUPT, f"blob {sha} is corrupt on disk", {"sha": sha}
            )
        return data

    @staticmethod
    def _digest(path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(BLOB_READ_CHUNK_BYTES):
                h.update(chunk)
        return h.hexdigest()
