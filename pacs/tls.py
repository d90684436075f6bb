"""DICOM over TLS (PS3.15 B.1, BCP 195): SSL contexts from `tls:` and the server-side handshake.

TLS 1.2 or newer with Python's secure defaults. With `tls.ca_certificates` a
client must present a certificate that CA signed (the DICOM TLS profiles
authenticate both ends); only that CA is trusted then, not the system's. Our
certificate is also our client certificate on C-MOVE sub-associations, as in
dcm4chee and Orthanc, so with an extended key usage it needs clientAuth too.

The server handshake runs in each connection's own thread, bounded by the ACSE
timeout: pynetdicom's server wraps accepted sockets in its accept loop, where a
peer that connects and stays silent would block every other connection.
"""
from __future__ import annotations

import logging
import ssl
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from pacs.config import TLSConfig

log = logging.getLogger(__name__)


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used; `key` is the config key below `tls`."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


class SerializedSSLSocket(ssl.SSLSocket):
    """An SSLSocket that two threads may read and write, one call at a time.

    pynetdicom's DUL thread reads the requester's socket while our C-FIND,
    C-MOVE and C-GET handlers write their responses on it from the association
    thread; an OpenSSL connection must never be used by two threads at once.
    """

    def do_handshake(self, block: bool = False) -> None:
        self._io_lock = threading.Lock()  # every socket passes here once, before any read or write
        super().do_handshake(block)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - ssl's name
        with self._io_lock:
            return super().read(len, buffer)

    def send(self, data: Any, flags: int = 0) -> int:  # sendall calls this per chunk
        with self._io_lock:
            return super().send(data, flags)

    def pending(self) -> int:
        with self._io_lock:
            return super().pending()


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context for accepted connections; raises TLSSetupError naming the bad file."""
    ca = tls.ca_certificates
    if ca is not None:
        _readable("ca_certificates", ca)
    with _loading("ca_certificates", ca, "a PEM file of CA certificates"):
        # With cafile given, only that CA is trusted (no system CAs are loaded).
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    _harden(context)
    _load_identity(context, tls)
    context.sslsocket_class = SerializedSSLSocket
    return context


@lru_cache(maxsize=4)
def client_context(tls: TLSConfig | None) -> ssl.SSLContext:
    """The context for our sub-associations to remotes marked `tls: true`.

    The remote's certificate is verified against `tls.ca_certificates` when
    given, else the system's CAs, and must name the host we connect to. Built
    once per config: loading the system CAs costs tens of milliseconds.
    """
    ca = tls.ca_certificates if tls is not None else None
    with _loading("ca_certificates", ca, "a PEM file of CA certificates"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    _harden(context)
    if tls is not None:
        _load_identity(context, tls)
    return context


def handshake(sock: ssl.SSLSocket, timeout: float | None) -> None:
    """The server side of the handshake, bounded by `timeout`; raises OSError (SSLError, timeout)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    sock.do_handshake()
    sock.settimeout(previous)


class HandshakeInThread:
    """Mixin for pynetdicom's ThreadedAssociationServer: TLS handshakes off the accept loop.

    `get_request` wraps a TLS connection with `secure`; the handshake then runs
    in the connection's thread before pynetdicom sees the socket. A failed one
    is logged and the connection closed; `handshake_failed` lets a subclass
    account for it.
    """

    ae: Any
    ssl_context: ssl.SSLContext | None

    def secure(self, sock: Any) -> ssl.SSLSocket:
        assert self.ssl_context is not None
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                handshake(request, self.ae.acse_timeout)
            except OSError as exc:
                log.warning("TLS handshake with %s port %s failed: %s", client_address[0],
                            client_address[1], exc)
                self.shutdown_request(request)  # type: ignore[attr-defined]
                self.handshake_failed()
                return
        super().process_request_thread(request, client_address)  # type: ignore[misc]

    def handshake_failed(self) -> None:
        """Called after a failed handshake closed the connection."""


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195; DCMTK's default profile too


def _load_identity(context: ssl.SSLContext, tls: TLSConfig) -> None:
    """Our certificate (chain) and private key; an encrypted key is refused, never prompted for."""
    _readable("certificate", tls.certificate)
    _readable("private_key", tls.private_key)
    with _loading("certificate", tls.certificate, "a PEM certificate"):
        ssl.create_default_context().load_verify_locations(cafile=tls.certificate)
    with _loading("private_key", tls.private_key,
                  f"an unencrypted PEM private key matching {tls.certificate}"):
        context.load_cert_chain(tls.certificate, tls.private_key, password=lambda: b"")


def _readable(key: str, path: Path | None) -> None:
    try:
        with open(path, "rb") as handle:  # type: ignore[arg-type]
            handle.read(1)
    except OSError as exc:
        raise TLSSetupError(key, f"cannot read {path}: {exc.strerror or exc}") from None


@contextmanager
def _loading(key: str, path: Path | None, what: str) -> Iterator[None]:
    try:
        yield
    except ssl.SSLError as exc:
        raise TLSSetupError(key, f"{path} is not {what} ({exc.reason or exc})") from None
    except OSError as exc:
        raise TLSSetupError(key, f"cannot read {path}: {exc.strerror or exc}") from None
