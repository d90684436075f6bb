"""Admin work on a whole archive: import folders, rebuild the index, verify, count."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from peewee import fn
from tqdm import tqdm

from pacs.archive import Archive, InvalidInstance, Outcome, OutOfResources
from pacs.header import check_identity, read_header
from pacs.index.db import reset_schema, stream
from pacs.index.models import Instance, Patient, Series, Study, database
from pacs.index.records import build_record
from pacs.index.writer import write_batch

log = logging.getLogger(__name__)
REINDEX_BATCH = 500


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file under the given files and folders, recursively, in a stable order."""
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name
        else:
            yield path


def looks_like_dicom(path: Path) -> bool:
    """A Part 10 file has 'DICM' after its 128-byte preamble."""
    try:
        with open(path, "rb") as fp:
            fp.seek(128)
            return fp.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class ImportSummary:
    stored: int = 0
    duplicates: int = 0
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def import_paths(archive: Archive, paths: list[Path], progress: bool = True) -> ImportSummary:
    """Ingest files through the same path as C-STORE; the sources stay untouched."""
    files = list(iter_files(paths))
    summary = ImportSummary()
    for path in tqdm(files, unit="file", disable=not progress, desc="import"):
        if not path.exists():
            summary.failed.append((path, "no such file"))
            continue
        if not looks_like_dicom(path):
            summary.skipped.append(path)
            continue
        try:
            result = archive.ingest(path, owned=False)
        except (InvalidInstance, OutOfResources) as exc:
            summary.failed.append((path, str(exc)))
            continue
        if result.outcome in (Outcome.DUPLICATE, Outcome.REPLACED):
            summary.duplicates += 1
        else:
            summary.stored += 1
    return summary


@dataclass
class ReindexSummary:
    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def reindex(archive: Archive, progress: bool = True) -> ReindexSummary:
    """Drop the index and refill it from the files alone (one transaction per batch)."""
    store = archive.store
    relpaths = list(store.walk())
    reset_schema(database.obj)
    summary = ReindexSummary()
    batch = []
    for relpath in tqdm(relpaths, unit="file", disable=not progress, desc="reindex"):
        path = store.path(relpath)
        try:
            header = read_header(path)
            uids = check_identity(header.values, None)
        except InvalidInstance as exc:
            summary.failed.append((relpath, str(exc)))
            continue
        batch.append(build_record(header.values, uids, header.transfer_syntax, relpath,
                                  path.stat().st_size, header.blob))
        if len(batch) >= REINDEX_BATCH:
            write_batch(batch)
            summary.indexed += len(batch)
            batch = []
    if batch:
        write_batch(batch)
        summary.indexed += len(batch)
    return summary


def verify(archive: Archive, progress: bool = True) -> list[str]:
    """Every disagreement between store and index, one line each."""
    store = archive.store
    problems = []
    indexed = set()
    rows = stream(Instance.select(Instance.sop_uid, Instance.path, Instance.size))
    total = Instance.select().count()
    for sop_uid, relpath, size in tqdm(rows, total=total, unit="row",
                                       disable=not progress, desc="verify"):
        indexed.add(relpath)
        actual = store.size(relpath)
        if actual is None:
            problems.append(f"row without file: {sop_uid} -> {relpath}")
            continue
        if actual != size:
            problems.append(f"size mismatch: {relpath}: index {size}, file {actual} bytes")
        if os.path.basename(relpath) != store.file_name(sop_uid):
            problems.append(f"name mismatch: {relpath} is not named for {sop_uid}")
        try:
            in_file = str(read_header(store.path(relpath)).dataset.get("SOPInstanceUID", ""))
        except InvalidInstance as exc:
            problems.append(f"unreadable file: {relpath}: {exc}")
            continue
        if in_file != sop_uid:
            problems.append(f"UID mismatch: {relpath}: index {sop_uid}, file {in_file}")
    for relpath in store.walk():
        if relpath not in indexed:
            problems.append(f"file without row: {relpath}")
    for relpath in store.stray_files():
        problems.append(f"stray file: {relpath}")
    return problems


@dataclass(frozen=True)
class Stats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int


def stats() -> Stats:
    return Stats(
        patients=Patient.select().count(),
        studies=Study.select().count(),
        series=Series.select().count(),
        instances=Instance.select().count(),
        bytes=Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar(),
    )
