"""TLS 1.3 on every connection, keyed with the node's own Ed25519 identity.

Without it a relay placed between two nodes (a peer URL that points at it) forwards the
handshake and then reads every delta and injects frames of its own. The listener presents a
self-signed certificate whose key *is* its identity key. There is no CA: the dialer instead
checks that the key in the certificate is the NodeID the listener's hello claims, and both
handshake signatures cover the certificate's SHA-256 (the `tls-server-end-point` channel
binding of RFC 5929). A relay that terminates TLS must show a certificate of its own key, so the
signatures it forwards never verify; one that forwards bytes sees only ciphertext and cannot
inject. The dialer presents no certificate: its handshake signature over the same binding is
what authenticates it, and nothing is processed before it verifies. No session tickets: every
connection does a fresh key exchange.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import secrets
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeIdentity, node_id_from_public_key

# Nobody validates the dates (the key is pinned, not the certificate), so one fixed, wide
# validity keeps the certificate of a given key the same on every start.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate(identity: NodeIdentity, password: bytes) -> tuple[bytes, bytes]:
    """A self-signed certificate for the identity key (DER) and the key as encrypted PEM."""
    pem = identity.encrypted_pem(password)
    key = serialization.load_pem_private_key(pem, password=password)
    assert isinstance(key, Ed25519PrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(identity.public_key).digest()[:16]) >> 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER), pem


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    side = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    return ctx


def server_context(identity: NodeIdentity) -> tuple[ssl.SSLContext, str]:
    """The listener's TLS context and its channel binding (hex SHA-256 of its certificate).

    OpenSSL loads keys only from files: the key goes to a 0600 temporary file encrypted with a
    random password that never leaves memory, and is removed as soon as it is loaded."""
    password = secrets.token_bytes(32)
    der, pem = certificate(identity, password)
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    cert_pem = ssl.DER_cert_to_PEM_cert(der).encode()
    fd, path = tempfile.mkstemp(prefix="hearthnet-tls-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert_pem + pem)
        ctx.load_cert_chain(path, password=password)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return ctx, binding(der)


def client_context() -> ssl.SSLContext:
    """The dialer's TLS context: no CA to validate against; `listener_binding` pins the key."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def binding(cert_der: bytes) -> str:
    """The channel binding of a certificate: hex SHA-256 of its DER bytes."""
    return hashlib.sha256(cert_der).hexdigest()


def listener_identity(ssl_object: ssl.SSLObject | None) -> tuple[str, str]:
    """The NodeID whose key the listener's certificate holds, and the certificate's binding.
    Known right after TLS, so a dialer that pins a NodeID can hang up before saying anything."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "the listener presented no certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "unreadable TLS certificate") from None
    if not isinstance(key, Ed25519PublicKey):
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "the listener's TLS key is not Ed25519")
    return node_id_from_public_key(_raw(key)), binding(der)


def listener_binding(ssl_object: ssl.SSLObject | None, claimed: str) -> str:
    """The binding of the listener's certificate, once its key is the NodeID it claims."""
    node, channel = listener_identity(ssl_object)
    if node != claimed:
        raise HearthnetError(
            ErrorCode.HANDSHAKE_FAILED,
            "the listener's TLS key is not the NodeID it claims (a relay in between?)",
        )
    return channel
