"""C-ECHO and C-STORE through the real protocol: files on disk, index rows, counters."""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from pacs.filestore import FileStore
from pacs.index.models import Instance, Patient, Series, Study
from tests.conftest import (
    DCMTK, associate, dataset_bytes, delete_index, needs_dcmtk, run_pacs, send_datasets,
    store_files, stored_path,
)
from tests.dicomgen import CT, make_instance, make_study, uid, write


def sent_bytes(ds: pydicom.Dataset) -> bytes:
    """What pynetdicom puts on the wire for an Explicit VR Little Endian dataset."""
    return encode(ds, False, True)


def storescu(node, files: list[Path], *options: str) -> subprocess.CompletedProcess:
    """DCMTK's storescu (the absolute path: a bare `storescu` may be pynetdicom's)."""
    return subprocess.run([str(DCMTK / "storescu"), "-aec", node.ae_title, *options, "127.0.0.1",
                           str(node.port), *map(str, files)], capture_output=True, text=True,
                          timeout=60)


def test_echo(node):
    assoc = associate(node, contexts=(Verification,))
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0


def test_store_files_rows_and_counters(node):
    datasets = make_study(series=2, per_series=3)
    assert [s.Status for s in send_datasets(node, datasets)] == [0] * 6

    assert store_files(node.config) == {stored_path(node.config, ds)
                                        for ds in datasets}
    for ds in datasets:
        path = stored_path(node.config, ds)
        assert dataset_bytes(path) == sent_bytes(ds)
        row = Instance.get(Instance.sop_uid == ds.SOPInstanceUID)
        assert (row.sop_class_uid, row.transfer_syntax, row.size) == (
            CT, "1.2.840.10008.1.2.1", path.stat().st_size)
        assert node.config.storage.root / row.path == path
        assert (row.series.series_uid, row.instance_number) == (ds.SeriesInstanceUID,
                                                                str(ds.InstanceNumber))

    patient = Patient.get()
    assert (patient.patient_id, patient.patient_name, patient.num_studies, patient.num_series,
            patient.num_instances) == ("PID1", "DOE^JOHN", 1, 2, 6)
    study = Study.get()
    assert (study.study_uid, study.patient_id, study.modalities, study.sop_classes,
            study.num_series, study.num_instances) == (
        datasets[0].StudyInstanceUID, patient.id, "\\CT\\", f"\\{CT}\\", 2, 6)
    assert {(s.series_uid, s.num_instances) for s in Series.select()} == {
        (ds.SeriesInstanceUID, 3) for ds in datasets}


def _folder_flags(path: Path) -> int:
    """Its inode flags (FS_IOC_GETFLAGS, what lsattr shows); 0x20000 is +T."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x80086601, bytes(4)))[0]
    finally:
        os.close(fd)


def _skip_without_topdir_flag(tmp_path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("i", _folder_flags(probe) | 0x20000))
    except OSError as exc:
        pytest.skip(f"{tmp_path} takes no top-of-hierarchy flag (not ext2/3/4): {exc}")
    finally:
        os.close(fd)


def test_store_root_spreads_its_folders_over_the_disk(node, tmp_path):
    """chattr +T on the store root: ext4 spreads staging and the study buckets over its
    flex groups instead of the one of the store's parent (pacs.filestore)."""
    _skip_without_topdir_flag(tmp_path)
    assert [s.Status for s in send_datasets(node, make_study(series=1, per_series=2))] == [0, 0]
    root = node.config.storage.root
    assert _folder_flags(root) & 0x20000
    assert not _folder_flags(root / ".staging") & 0x20000  # the hint is for the root only


def test_a_new_store_puts_staging_somewhere_new(tmp_path):
    """A store made where one was just deleted does not put its staging folder, where
    every received file's inode is made, among the inodes just freed: ext4 places a
    folder by its name, so staging is made under a random one, then renamed."""
    _skip_without_topdir_flag(tmp_path)
    places = set()
    for _ in range(6):
        store = FileStore(tmp_path / "store")
        store.prepare()
        assert sorted(os.listdir(store.root)) == [".staging"]
        places.add(os.stat(store.staging).st_ino >> 17)  # ext4's default flex group: 2^17 inodes
        shutil.rmtree(store.root)
    assert len(places) > 1


@needs_dcmtk
def test_store_with_dcmtk_storescu(node, tmp_path):
    datasets = make_study(tmp_path / "in", series=1, per_series=3)
    files = sorted((tmp_path / "in").rglob("*.dcm"))
    result = storescu(node, files)
    assert result.returncode == 0, result.stderr
    for path in files:
        assert dataset_bytes(stored_path(node.config, pydicom.dcmread(path))) == dataset_bytes(path)
    assert {i.sop_uid for i in Instance.select()} == {ds.SOPInstanceUID for ds in datasets}
    assert Series.get().num_instances == 3


@needs_dcmtk
@pytest.mark.parametrize("tool, option, syntax", [
    (["dcmcjpeg", "+e1"], "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
    (["dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),             # RLE Lossless
])
def test_compressed_stored_as_received(node, tmp_path, tool, option, syntax):
    plain = write(make_instance(rows=64, cols=64), tmp_path / "plain.dcm")
    packed = tmp_path / "packed.dcm"
    subprocess.run([str(DCMTK / tool[0]), *tool[1:], str(plain), str(packed)], check=True)
    sent = pydicom.dcmread(packed)
    assert sent.file_meta.TransferSyntaxUID == syntax

    result = storescu(node, [packed], option)
    assert result.returncode == 0, result.stderr

    stored = stored_path(node.config, sent)
    kept = pydicom.dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert kept.PixelData == sent.PixelData
    assert dataset_bytes(stored) == dataset_bytes(packed)
    assert Instance.get().transfer_syntax == syntax


@pytest.mark.parametrize("on_duplicate, winner_index", [("replace", 1), ("keep", 0)])
def test_duplicate_sop_instance(make_node, on_duplicate, winner_index):
    node = make_node(storage={"on_duplicate": on_duplicate})
    first = make_instance(number=1)
    second = make_instance(number=2, sop=first.SOPInstanceUID)
    assert [s.Status for s in send_datasets(node, [first, second])] == [0, 0]

    winner = (first, second)[winner_index]
    assert dataset_bytes(stored_path(node.config, first)) == sent_bytes(winner)
    assert len(store_files(node.config)) == 1
    row = Instance.get()
    assert (Instance.select().count(), row.instance_number) == (1, str(winner.InstanceNumber))
    assert (Series.get().num_instances, Study.get().num_instances,
            Patient.get().num_instances) == (1, 1, 1)


@pytest.mark.both_backends
@pytest.mark.parametrize("on_duplicate", ["replace", "keep"])
def test_instance_sent_again_in_another_series(make_node, on_duplicate):
    """The same SOP Instance UID in another series belongs in that series' folder: one
    file and one row remain, the new ones (replace) or the first (keep)."""
    node = make_node(storage={"on_duplicate": on_duplicate})
    first = make_instance(number=1)
    again = make_instance(number=2, series=uid("another series"), sop=first.SOPInstanceUID)
    assert [s.Status for s in send_datasets(node, [first, again])] == [0, 0]

    winner = again if on_duplicate == "replace" else first
    root = node.config.storage.root
    assert store_files(node.config) == {stored_path(node.config, winner)}
    assert dataset_bytes(stored_path(node.config, winner)) == sent_bytes(winner)
    assert [(i.path, i.instance_number) for i in Instance.select()] == [
        (str(stored_path(node.config, winner).relative_to(root)), str(winner.InstanceNumber))]
    counts = {s.series_uid: s.num_instances for s in Series.select()}
    assert counts == ({first.SeriesInstanceUID: 0, again.SeriesInstanceUID: 1}
                      if on_duplicate == "replace" else {first.SeriesInstanceUID: 1})
    assert (Study.get().num_instances, Patient.get().num_instances) == (1, 1)


@pytest.mark.both_backends
def test_files_of_the_first_layout_are_indexed_and_moved_when_replaced(node):
    """root/ab/cd/<sha256 of the SOP Instance UID>.dcm, the layout before series
    folders: reindex and verify take it, and a replacement moves it to its series."""
    ds = make_instance()
    assert send_datasets(node, [ds])[0].Status == 0
    node.stop()
    root, new = node.config.storage.root, stored_path(node.config, ds)
    old = root / new.name[:2] / new.name[2:4] / new.name
    old.parent.mkdir(parents=True, exist_ok=True)
    new.rename(old)
    delete_index(node.config)
    reindexed = run_pacs("reindex", "--no-progress", config=node.config_path)
    assert reindexed.stdout.splitlines()[-1] == "reindexed 1 instances, 0 unreadable files"
    assert run_pacs("verify", "--no-progress", config=node.config_path).returncode == 0
    node.restart()
    assert [i.path for i in Instance.select()] == [str(old.relative_to(root))]

    assert send_datasets(node, [ds])[0].Status == 0
    assert store_files(node.config) == {new}
    assert [i.path for i in Instance.select()] == [str(new.relative_to(root))]
    assert Series.get().num_instances == 1


def test_keep_still_indexes_a_file_without_row(make_node):
    """A retry indexes a file left without its row (a crash before the commit), even with keep."""
    node = make_node(storage={"on_duplicate": "keep"})
    ds = make_instance()
    assert send_datasets(node, [ds])[0].Status == 0
    node.stop()
    delete_index(node.config)
    node.restart()
    assert Instance.select().count() == 0

    assert send_datasets(node, [ds])[0].Status == 0
    assert [i.sop_uid for i in Instance.select()] == [ds.SOPInstanceUID]
    assert Series.get().num_instances == 1
    assert store_files(node.config) == {stored_path(node.config, ds)}


def test_patients_keyed_by_id_and_issuer(node, caplog):
    datasets = [
        make_instance(patient_id="P1", study="1.2.3.1", IssuerOfPatientID="HOSP_A"),
        make_instance(patient_id="P1", study="1.2.3.2", IssuerOfPatientID="HOSP_B"),
        make_instance(patient_id="P1", study="1.2.3.3", IssuerOfPatientID="HOSP_A",
                      patient_name="DOE^JANE"),
    ]
    with caplog.at_level(logging.WARNING, logger="pacs"):
        assert [s.Status for s in send_datasets(node, datasets)] == [0, 0, 0]

    patients = {(p.patient_id, p.issuer): p for p in Patient.select()}
    assert set(patients) == {("P1", "HOSP_A"), ("P1", "HOSP_B")}
    hosp_a = patients["P1", "HOSP_A"]
    assert (hosp_a.patient_name, hosp_a.num_studies, hosp_a.num_instances) == ("DOE^JOHN", 2, 2)
    assert patients["P1", "HOSP_B"].num_studies == 1
    assert Instance.select().count() == 3
    assert any("patient_name differs" in r.getMessage() and "DOE^JANE" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("charset, name, encoded", [
    ("ISO_IR 100", "Müller^Jürgen", "Müller".encode("latin-1")),
    ("ISO_IR 192", "Παπαδόπουλος^Γιώργος", "Παπαδόπουλος".encode()),
    ("ISO_IR 192", "山田^太郎", "山田".encode()),
])
def test_non_ascii_names_stored_decoded(node, charset, name, encoded):
    ds = make_instance(patient_name=name, charset=charset)
    assert send_datasets(node, [ds])[0].Status == 0
    assert encoded in dataset_bytes(stored_path(node.config, ds))
    patient = Patient.get()
    assert (patient.patient_name, patient.patient_name_fold) == (name, name.casefold())


@pytest.mark.parametrize("private_bytes", [0, 70_000, 600_000])
def test_header_longer_than_the_first_read(node, private_bytes):
    """The header is parsed from the file's first 64 KiB (pacs.header.HEAD_BYTES) unless it
    runs on past them: the attributes after a long private value are indexed all the same,
    and the stored header holds every byte up to the pixel data."""
    ds = make_instance(rows=64, cols=64)
    if private_bytes:
        block = ds.private_block(0x0009, "PACS TEST", create=True)
        block.add_new(0x01, "OB", bytes(range(256)) * (private_bytes // 256))
    ds.InstanceNumber = 417  # group 0020: after the private group 0009
    assert send_datasets(node, [ds])[0].Status == 0
    row = Instance.get(Instance.sop_uid == ds.SOPInstanceUID)
    data = stored_path(node.config, ds).read_bytes()
    assert row.instance_number == "417"
    assert row.header == data[:data.index(b"\xe0\x7f\x10\x00")]  # up to (7FE0,0010)
    assert len(row.header) > private_bytes


def test_restart_keeps_rows_and_files(make_node):
    node = make_node()
    before = make_study(series=1, per_series=2)
    assert [s.Status for s in send_datasets(node, before)] == [0, 0]
    files = store_files(node.config)

    node.restart()
    assert store_files(node.config) == files
    assert {i.sop_uid for i in Instance.select()} == {ds.SOPInstanceUID for ds in before}

    after = make_instance(study=before[0].StudyInstanceUID, series=before[0].SeriesInstanceUID,
                          number=3)
    assert send_datasets(node, [after])[0].Status == 0
    assert (Series.get().num_instances, Study.get().num_instances) == (3, 3)
    assert len(store_files(node.config)) == 3
