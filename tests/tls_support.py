"""Certificates made at test time (the `cryptography` package) and TLS client contexts.

`Certificates` writes, into a folder: a CA, a server certificate for 127.0.0.1
(subjectAltName IP:127.0.0.1) signed by it, a client certificate signed by it,
and a second, unrelated CA with its own server and client certificates.
"""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEY_SIZE = 2048  # RSA: what DCMTK's default BCP 195 profile negotiates with


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class _Issuer:
    def __init__(self, folder: Path, name: str):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)
        self.name = _name(name)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, folder: Path, name: str, usages: list) -> tuple[Path, Path]:
        """A leaf certificate for 127.0.0.1 with these extended key usages: (cert, key) paths."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        return cert_path, key_path


class Certificates:
    """Paths of every certificate and key the TLS tests use."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        ca = _Issuer(folder, "ca")
        self.ca = ca.path
        # The node's certificate is also its client certificate on C-MOVE sub-associations.
        self.server, self.server_key = ca.issue(folder, "server", both)
        self.client, self.client_key = ca.issue(folder, "client", [ExtendedKeyUsageOID.CLIENT_AUTH])
        other = _Issuer(folder, "other-ca")
        self.other_ca = other.path
        self.other_server, self.other_server_key = other.issue(folder, "other-server", both)
        self.other_client, self.other_client_key = other.issue(
            folder, "other-client", [ExtendedKeyUsageOID.CLIENT_AUTH])

    def tls_config(self, **extra: object) -> dict:
        """The node's `tls:` section: our server certificate, clients checked against our CA."""
        return {"certificate": str(self.server), "private_key": str(self.server_key),
                "ca_certificates": str(self.ca), **extra}

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting our CA, presenting `cert` (default: our client cert)."""
        context = self.anonymous_context()
        context.load_cert_chain(cert or self.client, key or self.client_key)
        return context

    def anonymous_context(self) -> ssl.SSLContext:
        """A client context trusting our CA that presents no certificate."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))

    def server_context(self, cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
        """For a test destination: this certificate, clients must be signed by `client_ca`."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(cert, key)
        return context
