"""Read the YAML config once and validate it into frozen dataclasses.

Every problem is raised as :class:`ConfigError`, whose message names the file,
the dotted key and what is wrong, so the CLI can print one line and exit 2.
Relative paths resolve against the config file's folder (INTERFACE.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, get_args, get_origin, get_type_hints

import yaml

from pacs.tls import TLSSetupError, server_context

DEFAULT_CONFIG = Path("config") / "pacs.yaml"
PERMISSIONS = ("echo", "store", "find", "move", "get")


class ConfigError(Exception):
    """A config problem, already phrased as `file: key: what is wrong`."""


@dataclass(frozen=True)
class RemoteAE:
    """A known peer: a C-MOVE destination and, with `security`, an allowed caller."""

    host: str
    port: int
    permissions: tuple[str, ...] = PERMISSIONS
    check_host: bool = False
    tls: bool = False


@dataclass(frozen=True)
class StorageConfig:
    root: Path = Path("store")
    fsync: bool = True
    on_duplicate: str = "replace"
    min_free_bytes: int = 100 * 1024 * 1024


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///index.sqlite"


@dataclass(frozen=True)
class QueryConfig:
    case_insensitive_pn: bool = True
    max_results: int = 0


@dataclass(frozen=True)
class NetworkConfig:
    max_associations: int = 32
    max_pdu: int = 0
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 60
    workers: int = 0  # processes serving associations; 0 = one per core, at most 4


@dataclass(frozen=True)
class SecurityConfig:
    allow_unknown_callers: bool = True
    require_called_ae: bool = True


@dataclass(frozen=True)
class TLSConfig:
    port: int = 2762
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    plain_port: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    file: Path | None = None
    max_bytes: int = 50 * 1024 * 1024  # rotate the file beyond this size; 0 = never
    backups: int = 5  # rotated files kept: FILE.1 ... FILE.5


@dataclass(frozen=True)
class Config:
    ae_title: str = "MINIPACS"
    host: str = "0.0.0.0"
    port: int = 11112
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    remote_aes: Mapping[str, RemoteAE] = field(default_factory=dict)
    query: QueryConfig = field(default_factory=QueryConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tls: TLSConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None


_AE_BAD = re.compile(r"[\\\x00-\x1f\x7f]")
_PORT_KEYS = {"port"}
_CHOICES = {
    "storage.on_duplicate": ("replace", "keep"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_NON_NEGATIVE = {
    "storage.min_free_bytes", "query.max_results", "network.max_pdu", "network.workers",
    "logging.max_bytes", "logging.backups",
}
_POSITIVE = {
    "network.max_associations", "network.acse_timeout",
    "network.dimse_timeout", "network.network_timeout",
}


def check_ae_title(value: str) -> str | None:
    """Return what is wrong with an AE title (PS3.5 AE VR), or None."""
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return f"must be at most 16 characters, got {len(value)}"
    if _AE_BAD.search(value):
        return "must not contain a backslash or control characters"
    return None


class _Reader:
    """Walks the YAML mapping against the dataclass tree, naming keys as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.base = path.parent

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.fail(prefix or "(top level)", f"expected a mapping, got {_kind(data)}")
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls) if f.name != "source"}
        for key in data:
            if key not in known:
                where = f"{prefix}.{key}" if prefix else str(key)
                raise self.fail(where, f"unknown key (known: {', '.join(sorted(known))})")
        values = {}
        for name in known:
            if name in data:
                key = f"{prefix}.{name}" if prefix else name
                values[name] = self.value(hints[name], data[name], key)
        return cls(**values)

    def value(self, hint: Any, raw: Any, key: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if origin is not None and type(None) in args:  # Optional[X]
            if raw is None:
                return None
            hint = next(a for a in args if a is not type(None))
            origin, args = get_origin(hint), get_args(hint)
        if is_dataclass(hint):
            return self.build(hint, raw, key)
        if key == "remote_aes":
            return self.remote_aes(raw, key)
        if hint is bool:
            if not isinstance(raw, bool):
                raise self.fail(key, f"expected true or false, got {raw!r}")
            return raw
        if hint is int or hint is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (
                hint is int and not isinstance(raw, int)
            ):
                raise self.fail(key, f"expected {'an integer' if hint is int else 'a number'}, got {raw!r}")
            self.check_number(key, raw)
            return raw
        if hint is str:
            if not isinstance(raw, str):
                raise self.fail(key, f"expected a string, got {raw!r}")
            if key in _CHOICES:
                raw = raw.upper() if key == "logging.level" else raw
                if raw not in _CHOICES[key]:
                    raise self.fail(key, f"must be one of {', '.join(_CHOICES[key])}, got {raw!r}")
            return raw
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                raise self.fail(key, f"expected a path, got {raw!r}")
            return (self.base / os.path.expanduser(raw)).resolve()
        if origin is tuple:
            if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
                raise self.fail(key, f"expected a list of strings, got {raw!r}")
            bad = [p for p in raw if p not in PERMISSIONS]
            if bad:
                raise self.fail(key, f"unknown permission {bad[0]!r} (known: {', '.join(PERMISSIONS)})")
            return tuple(raw)
        raise self.fail(key, f"unsupported value {raw!r}")  # pragma: no cover

    def check_number(self, key: str, raw: float) -> None:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in _PORT_KEYS and not 1 <= raw <= 65535:
            raise self.fail(key, f"port must be 1-65535, got {raw}")
        if key in _NON_NEGATIVE and raw < 0:
            raise self.fail(key, f"must be 0 or more, got {raw}")
        if key in _POSITIVE and raw <= 0:
            raise self.fail(key, f"must be more than 0, got {raw}")

    def remote_aes(self, raw: Any, key: str) -> dict[str, RemoteAE]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"expected a mapping of AE titles, got {_kind(raw)}")
        out = {}
        for title, spec in raw.items():
            where = f"{key}.{title}"
            problem = check_ae_title(str(title))
            if problem:
                raise self.fail(where, f"AE title {problem}")
            if not isinstance(spec, dict):
                raise self.fail(where, f"expected a mapping with host and port, got {_kind(spec)}")
            for required in ("host", "port"):
                if required not in spec:
                    raise self.fail(f"{where}.{required}", "missing (a remote AE needs host and port)")
            out[str(title)] = self.build(RemoteAE, spec, where)
        return out


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def resolve_path(explicit: str | os.PathLike | None) -> Path:
    """Pick the config file: --config, then $PACS_CONFIG, then config/pacs.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PACS_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load(path: str | os.PathLike) -> Config:
    """Read and validate one YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(parse)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}: invalid YAML: {problem}") from None
    reader = _Reader(path.resolve())
    config = reader.build(Config, data, "")
    problem = check_ae_title(config.ae_title)
    if problem:
        raise reader.fail("ae_title", problem)
    if config.tls is not None:
        for name in ("certificate", "private_key"):
            if getattr(config.tls, name) is None:
                raise reader.fail(f"tls.{name}", "missing (TLS needs a certificate and a private key)")
        if config.tls.plain_port and config.tls.port == config.port:
            raise reader.fail("tls.port", f"must differ from port ({config.port}) while "
                                          "tls.plain_port is true")
        try:
            server_context(config.tls)  # every file readable, the key matching the certificate
        except TLSSetupError as exc:
            raise reader.fail(f"tls.{exc.key}", str(exc)) from None
    storage = replace(config.storage, root=(reader.base / config.storage.root).resolve())
    database = replace(config.database, url=_resolve_sqlite(config.database.url, reader.base))
    return replace(config, storage=storage, database=database, source=path.resolve())


def _resolve_sqlite(url: str, base: Path) -> str:
    """Make a relative `sqlite:///file` URL absolute against the config's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str((base / url[len(prefix):]).resolve())
    return url
