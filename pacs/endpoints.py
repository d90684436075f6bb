"""Where the node listens: the plain DICOM port, the TLS port, or both (`port`, `tls`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

from pacs.config import Config


class Endpoint(NamedTuple):
    key: str  # the config key of the port, for error messages
    port: int
    tls: bool


class ListenError(Exception):
    """A port cannot be bound; the message starts with its config key."""


def endpoints(config: Config) -> list[Endpoint]:
    """The plain port unless `tls.plain_port` is false, then the TLS port if `tls` is set."""
    tls = config.tls
    found = [] if tls is not None and not tls.plain_port else [Endpoint("host/port", config.port, False)]
    if tls is not None:
        found.append(Endpoint("tls.port", tls.port, True))
    return found


@contextmanager
def binding(endpoint: Endpoint, host: str) -> Iterator[None]:
    """Turn a failure to bind `endpoint` into a ListenError naming its key."""
    try:
        yield
    except OSError as exc:
        raise ListenError(f"{endpoint.key}: cannot listen on {host}:{endpoint.port}: "
                          f"{exc.strerror or exc}") from None
