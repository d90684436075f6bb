"""C-STORE refusals: bad UIDs, write failures, no space, aborted transfers.

Each refusal must leave nothing behind (no file, no staging leftover, no row)
and the node must go on serving.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from pacs.index.models import Instance
from tests.conftest import (
    AnnouncedDataset, associate, open_index, send_datasets, staging_files, store_files, stored_path,
)
from tests.dicomgen import make_instance, uid, write

pytestmark = pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")

TOO_LONG = "1." + "2" * 63  # 65 characters


def assert_nothing_stored(node) -> None:
    assert store_files(node.config) == set()
    assert staging_files(node.config) == []
    assert Instance.select().count() == 0


def assert_still_serving(node) -> None:
    ds = make_instance(patient_id="AFTER")
    assert send_datasets(node, [ds])[0].Status == 0
    assert stored_path(node.config, ds).is_file()
    assert [i.sop_uid for i in Instance.select()] == [ds.SOPInstanceUID]


def bad_dataset(keyword: str, value: str | None, announced: str | None = None) -> Dataset:
    """An instance with `keyword` removed (None) or set to `value`.

    `announced` is the request's Affected SOP Instance UID when it should not be
    the dataset's own SOPInstanceUID.
    """
    ds = make_instance()
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    return AnnouncedDataset(ds, announced) if announced else ds


@pytest.mark.parametrize("keyword, value, announced, problem", [
    ("SOPInstanceUID", None, uid("announced"), "missing"),
    ("SOPInstanceUID", "1.02.3", None, "not a valid UID"),
    ("SOPInstanceUID", "1.2.abc", None, "not a valid UID"),
    ("SOPInstanceUID", uid("in the data set"), uid("announced"), "does not match"),
    ("StudyInstanceUID", None, None, "missing"),
    ("StudyInstanceUID", "1.02.3", None, "not a valid UID"),
    ("StudyInstanceUID", TOO_LONG, None, "not a valid UID"),
    ("SeriesInstanceUID", None, None, "missing"),
    ("SeriesInstanceUID", "1.2.abc", None, "not a valid UID"),
    ("SeriesInstanceUID", TOO_LONG, None, "not a valid UID"),
])
def test_bad_uids_refused(node, keyword, value, announced, problem):
    status = send_datasets(node, [bad_dataset(keyword, value, announced)])[0]
    assert status.Status == 0xA900
    assert status.ErrorComment.startswith(keyword) and problem in status.ErrorComment
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_truncated_data_set_refused_with_c000(node, tmp_path, monkeypatch):
    path = write(make_instance(), tmp_path / "cut.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])  # in the middle of the pixel data
    # Client side only: pynetdicom then sends the file's bytes as they are, unparsed.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(node, contexts=((CTImageStorage, [ExplicitVRLittleEndian]),))
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xC000
    assert status.ErrorComment.startswith("cannot parse")
    assert_nothing_stored(node)
    assert_still_serving(node)


@contextmanager
def staging_is_a_file(node, ds: Dataset) -> Iterator[None]:
    """Receiving cannot create its file in the staging folder."""
    staging = node.config.storage.root / ".staging"
    staging.rmdir()
    staging.write_bytes(b"")
    yield
    staging.unlink()
    staging.mkdir()


@contextmanager
def shard_is_a_file(node, ds: Dataset) -> Iterator[None]:
    """The instance's first-level shard folder is a regular file: the final rename fails."""
    shard = stored_path(node.config, ds).parents[3]
    shard.write_bytes(b"")
    yield
    shard.unlink()


@pytest.mark.parametrize("blocked", [staging_is_a_file, shard_is_a_file])
def test_write_failure_refused_with_a700(node, blocked):
    ds = make_instance()
    with blocked(node, ds):
        status = send_datasets(node, [ds])[0]
    assert status.Status == 0xA700
    assert "cannot write" in status.ErrorComment
    assert_nothing_stored(node)
    assert_still_serving(node)


SETPRIV = Path("/usr/bin/setpriv")


@pytest.mark.skipif(os.geteuid() == 0 and not SETPRIV.exists(),
                    reason="root ignores file modes, and setpriv to drop that is missing")
def test_read_only_store_refused_with_a700(serve_process):
    """chmod 0o500 on the store and its staging folder, as an operator might.

    Root ignores file modes (CAP_DAC_OVERRIDE), so as root the node runs under
    setpriv without that capability.
    """
    prefix = ()
    if os.geteuid() == 0:
        prefix = (str(SETPRIV), "--bounding-set=-dac_override,-dac_read_search", "--")
    proc = serve_process(prefix=prefix)
    folders = (proc.config.storage.root, proc.config.storage.root / ".staging")
    for folder in folders:
        folder.chmod(0o500)
    try:
        status = send_datasets(proc, [make_instance()])[0]
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert status.Status == 0xA700
    assert "cannot write" in status.ErrorComment
    with open_index(proc.config_path):
        assert_nothing_stored(proc)
        assert_still_serving(proc)


def test_free_space_reserve_refuses_with_a700(make_node):
    node = make_node(storage={"min_free_bytes": shutil.disk_usage("/").total * 2})
    status = send_datasets(node, [make_instance()])[0]
    assert status.Status == 0xA700
    assert "free-space reserve" in status.ErrorComment
    assert_nothing_stored(node)
    assoc = associate(node)
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def wait_for(condition, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_abort_mid_transfer_stores_nothing(node):
    """Send the command and half the data set's P-DATA, then A-ABORT."""
    ds = make_instance(rows=256, cols=256)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)

    assoc = associate(node, contexts=((CTImageStorage, [ExplicitVRLittleEndian]),))
    pdus = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 4096))
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    staging = node.config.storage.root / ".staging"
    wait_for(lambda: sum(p.stat().st_size for p in staging.iterdir()) > 50_000)
    assoc.abort()

    wait_for(lambda: not staging_files(node.config))
    assert_nothing_stored(node)
    assert_still_serving(node)
