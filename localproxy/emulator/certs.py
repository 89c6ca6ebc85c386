"""A throwaway CA and a server certificate for the emulator's TLS (``--tls``).

Writes ``ca.pem``, ``capath/<subject-hash>.0`` (a directory OpenSSL and Python's
``load_verify_locations(capath=...)`` can use, like ``openssl rehash`` makes, for
the proxy's ``-c``), and the server's ``server.pem`` / ``server.key``. The subject
hash is OpenSSL's ``X509_NAME_hash`` computed here, without the openssl tool.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localproxy.errors import MissingExtraError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography (an extra: it has no wheel on some devices) is imported by generate() alone.
TLS_EXTRA_HINT = (
    "the emulator's TLS certificates (--tls without --cert/--key) need the cryptography package: "
    "pip install 'localproxy[emulator-tls]'"
)


@dataclass(frozen=True)
class GeneratedCerts:
    ca_pem: Path
    capath: Path
    cert_pem: Path
    key_pem: Path


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _canonical_value(value: str) -> str:
    # OpenSSL's canonical form: ASCII upper case folded, leading/trailing white space
    # dropped, inner runs of white space collapsed to one space.
    return " ".join(value.translate(_ASCII_LOWER).split())


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def subject_hash(name: x509.Name) -> str:
    """OpenSSL's ``X509_NAME_hash`` (``openssl x509 -hash``): 8 hex digits.

    SHA-1 of the canonical encoding (each RDN's SET with string values as lower-cased
    UTF8String, without the outer SEQUENCE), first 4 bytes read little-endian.
    """
    canonical = bytearray()
    for rdn in name.rdns:
        entries = []
        for attribute in rdn:
            value = attribute.value
            text = value if isinstance(value, str) else value.decode("utf-8")
            encoded = _der(0x0C, _canonical_value(text).encode("utf-8"))
            entries.append(_der(0x30, _der_oid(attribute.oid.dotted_string) + encoded))
        canonical += _der(0x31, b"".join(sorted(entries)))
    digest = hashlib.sha1(bytes(canonical)).digest()
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def generate(out_dir: Path, hosts: list[str]) -> GeneratedCerts:
    """Make a CA and a server certificate for ``hosts`` (IPs or DNS names) in ``out_dir``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise MissingExtraError(TLS_EXTRA_HINT) from None
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localproxy emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localproxy emulator test CA"),
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = out_dir / "ca.pem"
    ca_bytes = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_pem.write_bytes(ca_bytes)
    capath = out_dir / "capath"
    capath.mkdir(exist_ok=True)
    (capath / f"{subject_hash(ca_cert.subject)}.0").write_bytes(ca_bytes)
    cert_pem = out_dir / "server.pem"
    cert_pem.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = out_dir / "server.key"
    key_bytes = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    return GeneratedCerts(ca_pem=ca_pem, capath=capath, cert_pem=cert_pem, key_pem=key_pem)


def server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """TLS 1.2+ server context, like the real data endpoint."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
