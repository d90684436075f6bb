"""The sharded file store: stage, commit, check and walk files, atomically.

Layout under the root (also in storage/README.md)::

    <root>/ab/cd/abcd<12 hex>/<16 hex>/<64 hex>.dcm   one Part 10 file per SOP Instance
    <root>/.staging/                                  temporary files, never final

As in dcm4chee, a series' instances share a folder: the study folder is named
by the SHA-256 of the Study Instance UID (first 16 hex digits, the first four
also giving the two levels above it), the series folder by that of the Series
Instance UID, and the file by the full SHA-256 of the SOP Instance UID. So no
received string ever becomes part of a path; 65,536 buckets hold the studies
(about 450 each at 30 million studies), and a study needs three or four new
folders where one folder per instance would cost a mkdir for nearly every
instance of a new study (~0.2 ms each on ext4). Files of the first layout,
``<root>/ab/cd/<64 hex>.dcm``, are still read, verified and reindexed.

A file reaches its final name only by `rename` from the staging folder on the
same filesystem, after an optional fsync, so a crash never leaves a partial
file under a final name. Knows nothing of DICOM tags or the index.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator

STAGING = ".staging"
SUFFIX = ".dcm"
_NAME = re.compile(r"[0-9a-f]{64}\.dcm")
_FINAL_DEPTHS = (2, 4)  # folders above a final file: first layout, study/series layout
_DURABLE_KEPT = 100_000  # folders remembered as synced into their parent
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # linux/fs.h
_FS_TOPDIR_FL = 0x00020000  # "top of directory hierarchies" (chattr +T)


class StoreWriteError(OSError):
    """The store could not take a file (unwritable, disk full, ...)."""


class FileStore:
    """Files named by a hash of their key, two levels of hex folders deep."""

    def __init__(self, root: Path, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.staging = self.root / STAGING
        self._durable: set[str] = set()  # folders (relative) whose own entry was synced

    def prepare(self) -> None:
        """Create the root and staging folders; raise StoreWriteError if impossible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _spread_subfolders(self.root)
            if not self.staging.is_dir():
                _make_under_a_random_name(self.staging)
        except OSError as exc:
            raise StoreWriteError(exc.errno, f"cannot create {self.staging}: {exc.strerror}") from None

    def relpath(self, key: str, study: str, series: str) -> str:
        """The file's path relative to the root: its study's and series' folders, its name."""
        folder, series_folder = _digest(study)[:16], _digest(series)[:16]
        return f"{folder[:2]}/{folder[2:4]}/{folder}/{series_folder}/{self.file_name(key)}"

    @staticmethod
    def file_name(key: str) -> str:
        """The name of the file stored for this key, in any layout."""
        return _digest(key) + SUFFIX

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def commit(self, staged: Path, relpath: str) -> tuple[Path, int]:
        """Move a staged file to its final name: fsync (as configured), then rename.

        The staged file may live outside the root (another filesystem); it is then
        copied into staging first. Returns the final path and its size. With fsync,
        the file's entry in its folder, and that of any folder above it not known to
        be durable, are synced before this returns: before the index row is committed.
        """
        final = self.root / relpath
        try:
            if staged.parent != self.staging and not _same_device(staged, self.root):
                staged = self.copy_in(staged)
            if self.fsync:
                _fsync_path(staged)
            size = staged.stat().st_size
            try:
                os.rename(staged, final)
            except FileNotFoundError:
                if not staged.exists():
                    raise
                self._make_folders(relpath)
                os.rename(staged, final)
            if self.fsync:
                self._sync_entries(relpath)
            return final, size
        except OSError as exc:
            _unlink_quietly(staged)
            raise StoreWriteError(exc.errno, f"cannot store {relpath}: {exc.strerror}") from None

    def _make_folders(self, relpath: str) -> None:
        """Create the missing folders of `relpath`."""
        parts = relpath.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            try:
                (self.root / "/".join(parts[:depth])).mkdir()
            except FileExistsError:
                continue

    def _sync_entries(self, relpath: str) -> None:
        """fsync the file's folder, then each folder's parent up to the first folder whose
        entry is known durable, so the rename and any mkdir survive a crash.

        Each association does this on its own thread, outside the group commit: the
        disk takes several at once, while one index transaction commits. A folder
        another thread is making now is synced here too, not left to that thread.
        """
        folder = os.path.dirname(relpath)
        _fsync_path(self.root / folder)
        while folder and folder not in self._durable:
            parent = os.path.dirname(folder)
            _fsync_path(self.root / parent)
            if len(self._durable) >= _DURABLE_KEPT:  # bounded; a forgotten one is synced again
                self._durable.clear()
            self._durable.add(folder)
            folder = parent

    def remove(self, relpath: str) -> None:
        """Delete a final file (one whose index row could not be committed)."""
        _unlink_quietly(self.root / relpath)

    def discard(self, staged: Path) -> None:
        """Drop a staged file that will not be kept."""
        _unlink_quietly(staged)

    def copy_in(self, src: Path) -> Path:
        """Copy a file into staging (the source is left untouched); return the copy."""
        self.prepare()
        try:
            fd, name = tempfile.mkstemp(dir=self.staging, suffix=".tmp")
            with open(src, "rb") as source, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out, 1024 * 1024)
        except OSError as exc:
            raise StoreWriteError(exc.errno, f"cannot copy into {self.staging}: {exc.strerror}") from None
        return Path(name)

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def size(self, relpath: str) -> int | None:
        try:
            return (self.root / relpath).stat().st_size
        except FileNotFoundError:
            return None

    def walk(self) -> Iterator[str]:
        """Every final file's path relative to the root (staging excluded), sorted."""
        return (relpath for relpath, final in self._files() if final)

    def stray_files(self) -> Iterator[str]:
        """Files under the root that are neither final nor staging (for verify)."""
        return (relpath for relpath, final in self._files() if not final)

    def _files(self) -> Iterator[tuple[str, bool]]:
        """(path relative to the root, whether it is a final file) of every file outside
        staging: final means named as `file_name` makes names, at a layout's depth."""
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel == STAGING:
                dirnames[:] = []
                continue
            dirnames.sort()
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            for name in sorted(filenames):
                relpath = os.path.normpath(os.path.join(rel, name))
                yield relpath, depth in _FINAL_DEPTHS and _NAME.fullmatch(name) is not None

    def clean_staging(self, older_than: float = 0) -> int:
        """Remove staging files older than `older_than` seconds; return how many."""
        if not self.staging.is_dir():
            return 0
        limit = time.time() - older_than
        removed = 0
        for entry in os.scandir(self.staging):
            try:
                if entry.is_file() and entry.stat().st_mtime <= limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def free_bytes(self) -> int:
        """Free bytes available to us on the store's filesystem."""
        target = self.root if self.root.exists() else self.root.parent
        return shutil.disk_usage(target).free


def _spread_subfolders(folder: Path) -> None:
    """Mark `folder` as a top of directory hierarchies (`chattr +T`), where the filesystem
    takes that hint (ext2/3/4); elsewhere nothing changes.

    ext4 puts a new file's inode in its folder's flex group, and a new folder in
    its parent's, so every folder and file of a store would share the flex group
    of the store's parent. Without a journal, ext4 also skips, one by one from
    the start of the group, every inode freed in the last 5 s (300 s while its
    inode table block is dirty) on each allocation: after 6,000 files were
    deleted nearby, creating a file took 430 us instead of 30 (measured on the
    bench machine), and a store shares its parent's group with whatever else
    comes and goes there. With the hint, as for /home, the root's subfolders
    (staging, where received files are made, and the study buckets) are spread
    over the disk's flex groups by the Orlov allocator.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
    except OSError:
        pass  # no such flags here (tmpfs, XFS, btrfs), or not ours to change
    finally:
        os.close(fd)


def _make_under_a_random_name(folder: Path) -> None:
    """Create `folder` by renaming a new folder with a random name, so ext4 places it
    anew each time instead of where the folder of that name was.

    Orlov places a new top folder by a hash of its name, then takes the group
    with the fewest folders. Every received file's inode is made in staging, so
    a store's files all sit in its staging folder's group. A store deleted and
    made again (the bench does it for every run) got its staging folder in the
    same group, among the inodes just freed, which ext4 skips one by one on
    every allocation: creating a file there took 926 us instead of 34 (measured
    on the bench machine). A folder made under a random name lands elsewhere.
    """
    made = folder.with_name(f"{folder.name}-{secrets.token_hex(8)}")
    made.mkdir()  # the mode mkdir gives, as for every other folder of the store
    try:
        os.rename(made, folder)  # atomic; fails only if a non-empty one appeared meanwhile
    except OSError:
        made.rmdir()
        if not folder.is_dir():
            raise


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _same_device(path: Path, root: Path) -> bool:
    try:
        return os.stat(path.parent).st_dev == os.stat(root).st_dev
    except FileNotFoundError:
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
