import hashlib
import os

import pytest

from hearthnet.blobs import BlobStore
from hearthnet.errors import ErrorCode, HearthnetError
from tests.helpers import raises_code


def test_put_get_has_path(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(100_000)
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.has(sha)
    assert store.get(sha) == data
    assert store.path(sha).read_bytes() == data
    assert store.put(data) == sha  # idempotent


def test_missing_and_invalid_shas(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(HearthnetError) as exc:
        store.get("0" * 64)
    assert exc.value.code is ErrorCode.BLOB_NOT_FOUND
    for bad in ["../../etc/passwd", "A" * 64, "0" * 63, "", "g" * 64]:
        assert not store.has(bad)
        with raises_code(ErrorCode.BLOB_NOT_FOUND):
            store.get(bad)


def test_corrupt_blob_is_reported_never_returned(tmp_path):
    store = BlobStore(tmp_path)
    sha = store.put(b"honest bytes")
    store.path(sha).write_bytes(b"tampered bytes")
    with pytest.raises(HearthnetError) as exc:
        store.get(sha)
    assert exc.value.code is ErrorCode.BLOB_CORRUPT
    assert store.path(sha).read_bytes() == b"tampered bytes"  # nothing changed by the read
    assert store.put(b"honest bytes") == sha  # a re-put repairs it
    assert store.get(sha) == b"honest bytes"


def test_size_limit_and_no_temp_files_left(tmp_path):
    store = BlobStore(tmp_path, max_bytes=10)
    with pytest.raises(HearthnetError) as exc:
        store.put(b"x" * 11)
    assert exc.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    store.put(b"x" * 10)
    assert not [p for p in tmp_path.rglob(".tmp-*")]
