import os
import stat

import pytest

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import (
    NodeIdentity,
    is_node_id,
    node_id_from_public_key,
    parse_node_id,
    public_key_from_node_id,
    verify,
)
from tests.helpers import raises_code


def test_sign_verify_roundtrip(identity):
    sig = identity.sign(b"hello")
    assert verify(identity.node_id, b"hello", sig)
    assert not verify(identity.node_id, b"hellO", sig)
    assert not verify(identity.node_id, b"hello", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify(NodeIdentity.generate().node_id, b"hello", sig)


def test_node_id_is_self_certifying_and_printable(identity):
    nid = identity.node_id
    assert nid.startswith("hn") and nid.isalnum() and nid == nid.lower()
    assert public_key_from_node_id(nid) == identity.public_key
    assert node_id_from_public_key(identity.public_key) == nid
    assert parse_node_id(nid) == nid


def test_distinct_identities_have_distinct_ids():
    assert len({NodeIdentity.generate().node_id for _ in range(20)}) == 20


@pytest.mark.parametrize("mangle", ["flip", "upper", "short", "prefix", "garbage"])
def test_malformed_node_ids_are_rejected(identity, mangle):
    nid = identity.node_id
    bad = {
        "flip": nid[:-1] + ("a" if nid[-1] != "a" else "b"),
        "upper": nid.upper(),
        "short": nid[:-2],
        "prefix": "xx" + nid[2:],
        "garbage": "hn" + "1" * (len(nid) - 2),
    }[mangle]
    assert not is_node_id(bad)
    with pytest.raises(HearthnetError) as exc:
        public_key_from_node_id(bad)
    assert exc.value.code is ErrorCode.IDENTITY_INVALID
    assert not verify(bad, b"x", identity.sign(b"x"))


def test_verify_never_raises_on_junk(identity):
    assert not verify(identity.node_id, b"x", b"")
    assert not verify(identity.node_id, b"x", "not bytes")  # type: ignore[arg-type]
    assert not verify(None, b"x", b"\0" * 64)  # type: ignore[arg-type]


def test_save_load_roundtrip_with_mode_0600(tmp_path, identity):
    path = tmp_path / "node.key"
    identity.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = NodeIdentity.load(path)
    assert loaded.node_id == identity.node_id
    assert verify(identity.node_id, b"m", loaded.sign(b"m"))


def test_save_refuses_to_overwrite(tmp_path, identity):
    path = tmp_path / "node.key"
    identity.save(path)
    before = path.read_bytes()
    with raises_code(ErrorCode.IDENTITY_INVALID):
        NodeIdentity.generate().save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_key_readable_by_others(tmp_path, identity, mode):
    path = tmp_path / "node.key"
    identity.save(path)
    os.chmod(path, mode)
    with pytest.raises(HearthnetError) as exc:
        NodeIdentity.load(path)
    assert exc.value.code is ErrorCode.KEY_FILE_INSECURE
    assert "chmod 600" in exc.value.message
    assert stat.S_IMODE(os.stat(path).st_mode) == mode  # nothing changed on disk


def test_load_rejects_missing_garbage_and_non_ed25519(tmp_path):
    with raises_code(ErrorCode.IDENTITY_INVALID):
        NodeIdentity.load(tmp_path / "missing")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(HearthnetError) as exc:
        NodeIdentity.load(junk)
    assert exc.value.code is ErrorCode.IDENTITY_INVALID
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    other = tmp_path / "ec.key"
    other.write_bytes(pem)
    os.chmod(other, 0o600)
    with raises_code(ErrorCode.IDENTITY_INVALID) as exc:
        NodeIdentity.load(other)
    assert "Ed25519" in exc.value.message


def test_repr_does_not_leak_key(identity):
    assert "PRIVATE" not in repr(identity)
    assert identity.node_id in repr(identity)
