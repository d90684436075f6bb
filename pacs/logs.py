"""Logging set-up: stderr (journald takes it from there) and an optional rotating file.

Every line carries the process ID: with `network.workers` > 1 the supervisor and
each worker write to the same stderr and file, and the supervisor logs which PID
each worker has.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
from logging.handlers import RotatingFileHandler

from pacs.config import Config, ConfigError

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class SharedRotatingFileHandler(RotatingFileHandler):
    """A RotatingFileHandler that the supervisor and its workers can share.

    Each record is written under an flock on `FILE.lock`, and a process that finds
    the file rotated by another one reopens it first: exactly one process renames
    the file, and none keeps writing into a rotated one (which a plain
    RotatingFileHandler per process would do).
    """

    def __init__(self, filename: str, max_bytes: int, backups: int):
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups)
        self._lock_fd = os.open(filename + ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._reopen_if_rotated()
                super().emit(record)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except Exception:  # as logging does: report on stderr, never raise into the caller
            self.handleError(record)

    def _reopen_if_rotated(self) -> None:
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            on_disk = None
        if self.stream is not None:
            if on_disk is not None and os.path.samestat(on_disk, os.fstat(self.stream.fileno())):
                return
            self.stream.close()
        self.stream = self._open()

    def close(self) -> None:
        super().close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def setup_logging(config: Config, override: str | None) -> None:
    """Log to stderr and, if configured, the shared rotating file (ConfigError if it won't open)."""
    level = override or config.logging.level
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    settings = config.logging
    if settings.file is not None:
        try:
            settings.file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(SharedRotatingFileHandler(str(settings.file), settings.max_bytes,
                                                      settings.backups))
        except OSError as exc:
            raise ConfigError(f"{config.source}: logging.file: cannot open {settings.file}: "
                              f"{exc.strerror or exc}") from None
    number = logging.getLevelName(level)
    # DEBUG is for our own loggers: peewee's would print every SQL parameter (stored
    # headers included), pynetdicom's whole PDUs and data sets; its INFO is chatty too.
    logging.basicConfig(level=max(number, logging.INFO), handlers=handlers, force=True,
                        format=FORMAT)
    logging.getLogger("pacs").setLevel(number)
    logging.getLogger("pynetdicom").setLevel(max(number, logging.WARNING))
