"""`pacs import`, `reindex`, `verify` and `stats` on a real store and index."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pacs.config import load
from tests.conftest import (
    delete_index, index_snapshot, on_database, open_index, run_pacs, store_files, stored_path,
    write_config,
)
from tests.dicomgen import make_instance, make_study, write

pytestmark = pytest.mark.both_backends  # every command on SQLite and PostgreSQL


def make_source(folder: Path) -> list:
    """Good files in nested folders (two patients, CT and MR), plus non-DICOM and a truncated file.

    Returns the good datasets; the last one is in `deeper/still/other.dcm`.
    """
    good = make_study(folder / "study", series=2, per_series=2)
    good.append(make_instance(study=good[0].StudyInstanceUID, modality="MR"))
    write(good[-1], folder / "study" / "mr" / "1.dcm")
    good.append(make_instance(patient_id="PID2", patient_name="Müller^Jürgen",
                              charset="ISO_IR 100"))
    write(good[-1], folder / "deeper" / "still" / "other.dcm")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "deeper" / "empty.dcm").write_bytes(b"")
    cut = write(make_instance(patient_id="PID3"), folder / "cut.dcm")
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 64])  # the pixel data (128 bytes) is last: cut in its middle
    return good


def site_config(tmp_path: Path, database_url: str | None, **overrides: object) -> Path:
    """A config in tmp_path/site on the test's index backend, with no node running on it."""
    (tmp_path / "site").mkdir()
    return write_config(tmp_path / "site", **on_database(database_url, overrides))


def import_(config: Path, *paths: Path):
    return run_pacs("import", "--no-progress", *map(str, paths), config=config)


@pytest.mark.parametrize("on_duplicate", ["replace", "keep"])
def test_import_folder(tmp_path, database_url, on_duplicate):
    config = site_config(tmp_path, database_url, storage={"on_duplicate": on_duplicate})
    source = tmp_path / "source"
    good = make_source(source)
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}

    result = import_(config, source)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "stored 6, duplicates 0, skipped 2 non-DICOM, failed 1"
    assert f"skipped (not DICOM): {source / 'notes.txt'}" in lines
    assert f"skipped (not DICOM): {source / 'deeper' / 'empty.dcm'}" in lines
    assert any(line.startswith(f"failed: {source / 'cut.dcm'}: ") for line in lines)
    files = {stored_path(load(config), ds) for ds in good}
    assert store_files(load(config)) == files
    assert {p: p.read_bytes() for p in before} == before  # sources untouched

    # Import again, one file changed under the same SOP Instance UID: every file
    # counts as a duplicate; "replace" takes the new bytes, "keep" the first.
    changed = write(make_instance(patient_id="PID2", sop=good[-1].SOPInstanceUID, number=7),
                    source / "deeper" / "still" / "other.dcm")
    result = import_(config, source)
    assert result.stdout.splitlines()[-1] == "stored 0, duplicates 6, skipped 2 non-DICOM, failed 1"
    assert store_files(load(config)) == files
    winner = changed.read_bytes() if on_duplicate == "replace" else before[changed]
    assert stored_path(load(config), good[-1]).read_bytes() == winner  # copied as is
    with open_index(config):
        assert len(index_snapshot()["instances"]) == 6

    result = import_(config, *(p for p in before if p.name not in ("cut.dcm", "notes.txt",
                                                                     "empty.dcm")))
    assert result.returncode == 0, result.stdout


@pytest.fixture
def filled(tmp_path, database_url):
    """A config whose archive holds the good files of :func:`make_source`."""
    config = site_config(tmp_path, database_url)
    make_source(tmp_path / "source")
    assert import_(config, tmp_path / "source").returncode == 1
    return config


def test_stats(filled):
    result = run_pacs("stats", config=filled)
    assert result.returncode == 0, result.stderr
    size = sum(p.stat().st_size for p in store_files(load(filled)))
    assert result.stdout.splitlines() == [
        "patients: 2", "studies: 2", "series: 4", "instances: 6", f"bytes: {size}"]


def test_reindex_rebuilds_the_same_index(filled):
    with open_index(filled):
        before = index_snapshot()
    delete_index(load(filled))

    result = run_pacs("reindex", "--no-progress", config=filled)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "reindexed 6 instances, 0 unreadable files"
    with open_index(filled):
        after = index_snapshot()
    assert after == before
    assert {row[0] for row in after["patients"]} == {"PID1", "PID2"}
    assert ("\\CT\\MR\\", 3, 5) in {row[3:4] + row[5:] for row in after["studies"]}


@pytest.mark.parametrize("command", ["import", "reindex"])
def test_import_and_reindex_clean_abandoned_staging_files(filled, tmp_path, database_url, command):
    """What a killed run left in staging goes at the next start; with PostgreSQL (a store
    other nodes may share) only files older than the dead-age, as `pacs serve` does."""
    staging = load(filled).storage.root / ".staging"
    fresh, old = staging / "tmpfresh.tmp", staging / "tmpold.tmp"
    for leftover in (fresh, old):
        leftover.write_bytes(b"\0" * 100)
    an_hour_ago = time.time() - 3600  # older than the default dead-age (2 x (60 + 60) + 60 s)
    os.utime(old, (an_hour_ago, an_hour_ago))
    args = ("import", "--no-progress", str(tmp_path / "source" / "study")) if command == "import" \
        else ("reindex", "--no-progress")
    assert run_pacs(*args, config=filled).returncode == 0
    assert sorted(staging.iterdir()) == ([fresh] if database_url else [])


def test_reindex_warns_of_patient_name_conflicts(tmp_path, database_url):
    config = site_config(tmp_path, database_url)
    for n, name in enumerate(("DOE^JOHN", "DOE^JONATHAN")):
        write(make_instance(patient_name=name, study=f"1.2.3.{n}"), tmp_path / "in" / f"{n}.dcm")
    assert import_(config, tmp_path / "in").returncode == 0
    result = run_pacs("reindex", "--no-progress", config=config)
    assert result.returncode == 0
    assert "patient_name differs" in result.stderr
    assert "patients: 1" in run_pacs("stats", config=config).stdout


def delete_file(root: Path, relpath: str) -> str:
    (root / relpath).unlink()
    return "row without file: "


def add_dcm_file(root: Path, relpath: str) -> str:
    folder = relpath.rpartition("/")[0]
    shutil.copy(root / relpath, root / folder / ("f" * 64 + ".dcm"))
    return f"file without row: {folder}/{'f' * 64}.dcm"


def add_other_file(root: Path, relpath: str) -> str:
    folder = relpath.rpartition("/")[0]
    (root / folder / "notes.txt").write_text("stray")
    return f"stray file: {folder}/notes.txt"


def truncate_file(root: Path, relpath: str) -> str:
    data = (root / relpath).read_bytes()
    (root / relpath).write_bytes(data[:-10])
    return f"size mismatch: {relpath}: index {len(data)}, file {len(data) - 10} bytes"


def test_verify_consistent(filled):
    result = run_pacs("verify", "--no-progress", config=filled)
    assert (result.returncode, result.stdout) == (0, "store and index are consistent\n")


@pytest.mark.parametrize("damage", [delete_file, add_dcm_file, add_other_file, truncate_file])
def test_verify_names_each_problem(filled, damage):
    root = load(filled).storage.root
    relpath = str(sorted(store_files(load(filled)))[0].relative_to(root))
    expected = damage(root, relpath)
    result = run_pacs("verify", "--no-progress", config=filled)
    assert result.returncode == 1
    assert any(line.startswith(expected) for line in result.stdout.splitlines()), result.stdout
    assert relpath[:6] in result.stdout
