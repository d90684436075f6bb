"""The archive facade: ingest orders file store and index so a crash is harmless.

Order for every instance (C-STORE and `pacs import` alike):
  parse header -> validate UIDs -> fsync file -> rename into place -> fsync folder
  -> commit index row (grouped with other associations') -> answer.
A crash before the commit leaves at most a file without a row, which
`pacs reindex`/`pacs verify` repair; a row without a file never happens.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from peewee import PeeweeException
from pydicom import Dataset

from pacs.committer import GroupCommitter
from pacs.config import Config
from pacs.filestore import FileStore, StoreWriteError
from pacs.header import InvalidInstance, check_identity, read_header
from pacs.index.audit import write_events
from pacs.index.db import close_database, open_database
from pacs.index.postgres import discard_broken_connection
from pacs.index.models import Instance
from pacs.index.records import InstanceRecord, build_record
from pacs.index.selection import Match, find_instances, select_matches
from pacs.index.writer import IndexWriter, Written

log = logging.getLogger(__name__)
_LOCK_STRIPES = 64


class OutOfResources(Exception):
    """The archive cannot take an instance now (disk, index); the sender may retry."""


class Outcome(enum.Enum):
    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"  # same SOP Instance UID, kept the first (on_duplicate: keep)


@dataclass(frozen=True)
class Ingested:
    sop_uid: str
    outcome: Outcome
    size: int
    study_uid: str  # with patient_id, for the audit trail
    patient_id: str


@contextmanager
def _index_errors() -> Iterator[None]:
    """A database failure becomes OutOfResources: the peer may retry later (0xA700).

    A connection the server dropped is discarded, so the next operation reconnects.
    """
    try:
        yield
    except PeeweeException as exc:
        discard_broken_connection()
        raise OutOfResources(f"index unavailable: {_first_line(exc)}") from None


def abandoned_after(config: Config) -> float:
    """Seconds after which a staging file no association or command wrote to is surely dead."""
    net = config.network
    return 2 * (net.network_timeout + net.dimse_timeout) + 60


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Archive:
    """One file store and one index, opened from the config."""

    def __init__(self, config: Config):
        self.config = config
        self.store = FileStore(config.storage.root, fsync=config.storage.fsync)
        self.store.prepare()
        open_database(config.database.url, durable=config.storage.fsync)
        self._writer = IndexWriter(keep_existing=config.storage.on_duplicate == "keep")
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._committer: GroupCommitter[InstanceRecord, Written] = GroupCommitter(
            self._writer.write)

    def close(self) -> None:
        close_database()

    def _lock_for(self, sop_uid: str) -> threading.Lock:
        digest = hashlib.blake2b(sop_uid.encode(), digest_size=2).digest()
        return self._locks[int.from_bytes(digest, "big") % _LOCK_STRIPES]

    def clean_staging(self) -> int:
        """Remove temporary files of an earlier run (call before this process makes any).

        With a PostgreSQL index other nodes may share the store and be writing
        into its staging folder right now: then only abandoned files go.
        """
        shared = self.config.database.url.startswith(("postgresql://", "postgres://"))
        removed = self.store.clean_staging(older_than=abandoned_after(self.config) if shared else 0)
        if removed:
            log.info("removed %d stray temporary files from an earlier run", removed)
        return removed

    def check_space(self) -> None:
        """Refuse early when the store is below its free-space reserve."""
        reserve = self.config.storage.min_free_bytes
        if reserve and self.store.free_bytes() < reserve:
            raise OutOfResources(f"store below its {reserve} byte free-space reserve")

    def ingest(self, path: Path, affected_sop_uid: str | None = None,
               owned: bool = False) -> Ingested:
        """File one Part 10 file into the archive.

        `owned` means the file is a temporary copy we may move (a received
        C-STORE); otherwise it is copied first and left untouched (import).
        Raises InvalidInstance, OutOfResources.
        """
        if not owned:  # a received file was checked before it was written (services.store)
            self.check_space()
        header = read_header(path)
        uids = check_identity(header.values, affected_sop_uid)
        sop_uid, study_uid = uids[0], uids[2]
        patient_id = header.values.text("PatientID", 64)
        relpath = self.store.relpath(sop_uid, study_uid, uids[3])
        with self._lock_for(sop_uid):
            # The path is the UIDs', so a stat finds duplicates; only then ask the index,
            # as a crash before the commit can leave a file without its row. An instance
            # filed elsewhere (another series, the first layout) is found by the writer.
            existed = self.store.exists(relpath) and self._indexed(sop_uid)
            if existed and self.config.storage.on_duplicate == "keep":
                if owned:
                    self.store.discard(path)
                return Ingested(sop_uid, Outcome.DUPLICATE, 0, study_uid, patient_id)
            try:
                staged = path if owned else self.store.copy_in(path)
                _, size = self.store.commit(staged, relpath)
            except (StoreWriteError, OSError) as exc:
                if not existed:  # renamed, but its folder could not be synced
                    self.store.remove(relpath)
                raise OutOfResources(f"cannot write the file: {exc.strerror or exc}") from None
            record = build_record(header.values, uids, header.transfer_syntax, relpath, size,
                                  header.blob)
            try:
                with _index_errors():
                    written = self._committer.commit(record)
            except OutOfResources:
                # Refused means not stored: a new file without its row goes again. A
                # replaced file stays, under the row it already has.
                if not existed:
                    self.store.remove(relpath)
                raise
            if written.unindexed is not None:
                self.store.remove(written.unindexed)
        if written.unindexed == relpath:  # on_duplicate: keep, and the first was elsewhere
            return Ingested(sop_uid, Outcome.DUPLICATE, 0, study_uid, patient_id)
        outcome = Outcome.REPLACED if existed or written.existed else Outcome.STORED
        return Ingested(sop_uid, outcome, size, study_uid, patient_id)

    def _indexed(self, sop_uid: str) -> bool:
        with _index_errors():
            return Instance.select().where(Instance.sop_uid == sop_uid).exists()

    def select(self, identifier: Dataset, root: str) -> list[Match]:
        """The instances a C-MOVE/C-GET identifier names (raises SelectionError, OutOfResources)."""
        with _index_errors():
            return select_matches(identifier, root)

    def record_audit(self, rows: Sequence[dict],
                     counts: Mapping[int, tuple[int, int]] | None = None) -> list[int]:
        """Add audit events and update the (count, failed) of earlier ones (`pacs.activity`);
        the new rows' ids. Raises PeeweeException when the index fails."""
        return write_events(rows, counts)

    def file_path(self, relpath: str) -> Path:
        """Where an indexed instance's file is (it may have vanished since)."""
        return self.store.path(relpath)

    def held(self, sop_uids: Iterable[str]) -> dict[str, Match]:
        """The instances among these that are indexed and whose file has the recorded size.

        What Storage Commitment promises: the archive can send them back.
        """
        with _index_errors():
            found = find_instances(sop_uids)
        return {uid: match for uid, match in found.items()
                if self.store.size(match.relpath) == match.size}


__all__ = ["Archive", "Ingested", "InvalidInstance", "Outcome", "OutOfResources"]
