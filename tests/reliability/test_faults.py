"""Faults: no space, an unwritable store, a locked index, a C-MOVE destination that stalls.

Each refusal is 0xA700 with an ErrorComment and leaves nothing behind, and the
node recovers by itself once the fault is gone: no restart.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyRootMove

from tests.conftest import staging_files, stored_path
from tests.dicomgen import make_instance, make_study
from tests.reliability.support import echo_ok, index_rows, store_one, verify_problems
from tests.retrieve_support import RecordingSCP, counts, failed_uids, identifier, retrieve, store

MiB = 1 << 20
SETPRIV = Path("/usr/bin/setpriv")


def assert_refused(proc, ds: Dataset, words: str) -> None:
    """0xA700 with an ErrorComment naming the problem; no file, no staging leftover, no row."""
    answer = store_one(proc, ds)
    assert answer.Status == 0xA700 and words in answer.ErrorComment, answer
    assert not stored_path(proc.config, ds).exists()
    assert staging_files(proc.config) == []
    assert index_rows(database(proc), str(ds.SOPInstanceUID)) == 0


def database(proc) -> str:
    return proc.config.database.url.removeprefix("sqlite:///")


def unprivileged() -> tuple[str, ...]:
    """The command prefix that makes file modes bind the node: as root, setpriv without
    CAP_DAC_OVERRIDE (root ignores modes otherwise), so refusals are real write errors."""
    if os.geteuid() != 0:
        return ()
    return (str(SETPRIV), "--bounding-set=-dac_override,-dac_read_search", "--")


needs_modes = pytest.mark.skipif(os.geteuid() == 0 and not SETPRIV.exists(),
                                 reason="root ignores file modes, and setpriv to drop that is missing")


def test_free_space_reserve_is_checked_live(serve_process, tmp_path):
    """The reserve is compared with the filesystem's free space at every C-STORE.

    "Space runs out" is a 512 MiB ballast file (fallocate: no data written) on
    the store's filesystem, with the reserve set 256 MiB below the free space:
    the ballast takes the store below it, deleting it brings the space back.
    The margins absorb what other processes write meanwhile; filling the disk
    or mounting a small filesystem (root only) would not work on every CI.
    """
    free = shutil.disk_usage(tmp_path).free
    if free < 2048 * MiB:
        pytest.skip("less than 2 GiB free")
    proc = serve_process(storage={"min_free_bytes": free - 256 * MiB})
    first, second = make_instance(number=1), make_instance(number=2)
    assert store_one(proc, first).Status == 0
    ballast = proc.config.storage.root.parent / "ballast"
    with open(ballast, "wb") as fp:
        os.posix_fallocate(fp.fileno(), 0, 512 * MiB)
    staging = proc.config.storage.root / ".staging"
    try:
        os.utime(staging, ns=(0, 0))  # making (and deleting) a receive file would set it to now
        assert_refused(proc, second, "free-space reserve")
        assert staging.stat().st_mtime_ns == 0, "the refused transfer was written to staging"
    finally:
        ballast.unlink()
    assert store_one(proc, second).Status == 0
    assert verify_problems(proc.config_path) == []


@needs_modes
def test_unwritable_store_refuses_then_recovers(serve_process, rng):
    """chmod the store and staging read-only and back, several times, in random order
    (at least once each way)."""
    proc = serve_process(prefix=unprivileged())
    folders = (proc.config.storage.root, proc.config.storage.root / ".staging")
    writable = [True, False] + [rng.random() < 0.5 for _ in range(6)]
    rng.shuffle(writable)
    try:
        for n, state in enumerate(writable):
            for folder in folders:
                folder.chmod(0o755 if state else 0o500)
            ds = make_instance(patient_id="RO", number=n + 1)
            if state:
                assert store_one(proc, ds).Status == 0
            else:
                assert_refused(proc, ds, "cannot write")
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert store_one(proc, make_instance(patient_id="RO", number=99)).Status == 0
    assert verify_problems(proc.config_path) == []


@needs_modes
def test_unwritable_shard_folder_refuses_then_recovers(serve_process):
    """Staging takes the data but the rename into its series folder fails: that folder
    is read-only, or its top-level folder is (the rest is still to be made)."""
    proc = serve_process(prefix=unprivileged())
    root = proc.config.storage.root
    first = make_instance(patient_id="SHARD", number=1)
    shard = stored_path(proc.config, first).parent
    # a second study in another top-level folder: its "ab" is blocked, the rest is missing
    second = next(ds for ds in (make_instance(patient_id=f"SHARD{n}") for n in range(2, 99))
                  if stored_path(proc.config, ds).parents[3] != shard.parents[2])
    top = stored_path(proc.config, second).parents[3]
    cases = ((first, shard), (second, top))
    for _, blocked in cases:
        blocked.mkdir(parents=True)
        blocked.chmod(0o500)
    try:
        for ds, _ in cases:
            assert_refused(proc, ds, "cannot write the file")
    finally:
        for _, blocked in cases:
            blocked.chmod(0o755)
    for ds, _ in cases:
        assert store_one(proc, ds).Status == 0
        assert stored_path(proc.config, ds).is_file()
        assert index_rows(database(proc), str(ds.SOPInstanceUID)) == 1
    assert verify_problems(proc.config_path) == []


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


def test_locked_index_refuses_then_recovers(serve_process):
    """Another process holds the SQLite write lock past the busy timeout (10 s)."""
    proc = serve_process()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, database(proc)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        ds = make_instance(patient_id="LOCKED")
        assert_refused(proc, ds, "index unavailable")
    finally:
        locker.stdin.close()
        locker.wait(10)
    assert store_one(proc, ds).Status == 0
    assert stored_path(proc.config, ds).is_file()
    assert verify_problems(proc.config_path) == []


class StallingSCP(RecordingSCP):
    """Accepts the association, takes `stall_after` instances, then never answers again."""

    def __init__(self, stall_after: int):
        super().__init__(ae_title="STALL")
        self.stall_after = stall_after
        self.released = threading.Event()

    def _on_store(self, event) -> int:
        if len(self.received) >= self.stall_after:
            self.released.wait(120)
        return super()._on_store(event)

    def stop(self) -> None:
        self.released.set()
        super().stop()


def test_move_to_a_stalling_destination_times_out_and_counts(serve_process):
    stalling, healthy = StallingSCP(stall_after=2), RecordingSCP(ae_title="GOOD")
    try:
        proc = serve_process(
            network={"dimse_timeout": 3},
            remote_aes={"STALL": {"host": "127.0.0.1", "port": stalling.port},
                        "GOOD": {"host": "127.0.0.1", "port": healthy.port}})
        study = make_study(patient_id="STALL", series=1, per_series=5)
        store(proc, study)
        ident = identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID)
        moving = threading.Thread(target=lambda: results.append(
            retrieve(proc, ident, StudyRootMove, destination="STALL")))
        results: list = []
        moving.start()
        assert echo_ok(proc.port)  # serving others while the move waits
        moving.join(60)
        assert not moving.is_alive()
        _, final, failed = results[0]
        assert final.Status == 0xB000 and counts(final) == (2, 3, 0)
        assert failed_uids(failed) == {str(ds.SOPInstanceUID) for ds in study} - set(stalling.received)
        _, final, _ = retrieve(proc, ident, StudyRootMove, destination="GOOD")
        assert final.Status == 0x0000 and counts(final) == (5, 0, 0)
        assert len(healthy.received) == 5
    finally:
        stalling.stop()
        healthy.stop()
