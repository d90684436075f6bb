"""`pacs migrate`: copy an index from SQLite to PostgreSQL (and back) without touching the images."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pacs.index.models import Instance
from tests.conftest import fresh_database, index_snapshot, open_index, run_pacs, write_config
from tests.dicomgen import make_instance, make_study, write


@pytest.fixture
def pg_url():
    with fresh_database("postgresql") as url:
        yield url


def snapshot() -> dict[str, set[tuple]]:
    """index_snapshot plus what it leaves out: each instance's header bytes and arrival time."""
    rows = Instance.select(Instance.sop_uid, Instance.header, Instance.received_at).tuples()
    return {**index_snapshot(), "headers": {(uid, bytes(header), received.isoformat())
                                            for uid, header, received in rows}}


def on_url(config: Path, url: str) -> Path:
    """A copy of `config` in a sibling folder, with the same store and another database.url."""
    data = yaml.safe_load(config.read_text())
    data["storage"]["root"] = str(config.parent / data["storage"]["root"])
    data["database"]["url"] = url
    folder = config.parent.parent / f"{config.parent.name}-moved"
    folder.mkdir()
    (folder / "pacs.yaml").write_text(yaml.safe_dump(data))
    return folder / "pacs.yaml"


def test_sqlite_to_postgresql_and_back(tmp_path, pg_url):
    (tmp_path / "site").mkdir()
    config = write_config(tmp_path / "site")
    make_study(tmp_path / "in", series=2, per_series=3)
    write(make_instance(patient_id="PID2", patient_name="Müller^Jürgen", charset="ISO_IR 100"),
          tmp_path / "in" / "other.dcm")
    assert run_pacs("import", "--no-progress", str(tmp_path / "in"), config=config).returncode == 0
    with open_index(config):
        before = snapshot()

    result = run_pacs("migrate", "--to", pg_url, config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "copied 2 patient, 2 study, 3 series, 7 instance, 0 audit_event")
    assert "migrate" in result.stderr  # the progress bar
    moved = on_url(config, pg_url)
    with open_index(moved):
        assert snapshot() == before
    result = run_pacs("verify", "--no-progress", config=moved)
    assert (result.returncode, result.stdout) == (0, "store and index are consistent\n")

    # New rows on the copy get fresh ids (the sequences continue after the copied ones).
    write(make_instance(patient_id="PID3"), tmp_path / "new" / "1.dcm")
    result = run_pacs("import", "--no-progress", str(tmp_path / "new"), config=moved)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "instances: 8" in run_pacs("stats", config=moved).stdout

    back = f"sqlite:///{tmp_path / 'back.sqlite'}"
    result = run_pacs("migrate", "--no-progress", "--from", pg_url, "--to", back, config=config)
    assert result.returncode == 0, result.stderr
    with open_index(moved):
        expected = snapshot()
    with open_index(on_url(moved, back)):
        assert snapshot() == expected


def test_refuses_a_target_with_rows_or_unreachable(tmp_path, pg_url):
    (tmp_path / "site").mkdir()
    config = write_config(tmp_path / "site")
    write(make_instance(), tmp_path / "in" / "1.dcm")
    assert run_pacs("import", "--no-progress", str(tmp_path / "in"), config=config).returncode == 0
    assert run_pacs("migrate", "--no-progress", "--to", pg_url, config=config).returncode == 0

    result = run_pacs("migrate", "--no-progress", "--to", pg_url, config=config)
    assert (result.returncode, result.stderr) == (
        2, "pacs: --to: the target index is not empty\n")
    result = run_pacs("migrate", "--no-progress", "--to",
                      "postgresql://postgres@127.0.0.1:1/none", config=config)
    assert result.returncode == 2
    assert result.stderr.startswith("pacs: --to: cannot open postgresql://postgres@127.0.0.1:1/none")
