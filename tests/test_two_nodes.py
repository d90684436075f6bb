"""Two real `pacs serve` nodes sharing one PostgreSQL index and one storage root."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyRootMove

from pacs.index.models import Instance, Patient, Series, Study
from tests.conftest import (
    ServeProcess, associate, fresh_database, open_index, run_pacs, send_datasets, write_config,
)
from tests.dicomgen import make_instance, uid
from tests.find_support import STUDY_ROOT, find, query, values
from tests.retrieve_support import RecordingSCP, counts, identifier, retrieve

SENDERS = 8
STUDIES = {f"S{n}": f"PAT{n // 2}" for n in range(4)}  # two studies per patient
SERIES_PER_STUDY, PER_SERIES = 2, 3


def series_uid(study: str, number: int) -> str:
    return uid("two-nodes", study, "series", number)


def batch(index: int) -> list:
    """The instances one pair of senders sends: a share of every series of every study."""
    return [make_instance(patient_id=patient, patient_name=f"NAME^{patient}",
                          study=uid("two-nodes", study), series=series_uid(study, r),
                          sop=uid("two-nodes", index, study, r, n), number=index * 10 + n,
                          modality=("CT", "MR")[r])
            for study, patient in STUDIES.items()
            for r in range(SERIES_PER_STUDY) for n in range(PER_SERIES)]


@pytest.fixture
def nodes(tmp_path):
    """Nodes A and B, started at once on a new database: one index, one store.

    B knows the C-MOVE destination DEST.
    """
    dest = RecordingSCP()
    configs = []
    for name, remote_aes in (("A", {}), ("B", {"DEST": {"host": "127.0.0.1", "port": dest.port}})):
        (tmp_path / name).mkdir()
        configs.append((tmp_path / name, dict(
            ae_title=f"NODE{name}", storage={"root": str(tmp_path / "shared-store")},
            remote_aes=remote_aes)))
    with fresh_database("postgresql") as url, ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(lambda f, o: ServeProcess(write_config(
            f, database={"url": url}, **o)), folder, overrides) for folder, overrides in configs]
        try:
            yield (*(future.result() for future in starting), dest)
        finally:
            for future in starting:
                if future.exception() is None:
                    future.result().kill()
            dest.stop()


def test_parallel_overlapping_stores_on_two_nodes_end_in_one_row_each(nodes):
    a, b, dest = nodes
    pairs = SENDERS // 2
    start = threading.Barrier(SENDERS)

    def send(sender: int) -> list[int]:
        datasets = batch(sender // 2)  # both senders of a pair send the same SOP Instance UIDs
        start.wait()
        return [s.Status for s in send_datasets((a, b)[sender % 2], datasets)]

    with ThreadPoolExecutor(SENDERS) as pool:
        statuses = list(pool.map(send, range(SENDERS)))
    per_batch = len(STUDIES) * SERIES_PER_STUDY * PER_SERIES
    assert statuses == [[0] * per_batch] * SENDERS  # no failure reached a sender

    expected = {str(ds.SOPInstanceUID) for index in range(pairs) for ds in batch(index)}
    with open_index(a.config_path):
        assert (Patient.select().count(), Study.select().count(), Series.select().count(),
                Instance.select().count()) == (2, 4, 8, len(expected))
        assert {p.num_instances for p in Patient.select()} == {len(expected) // 2}
        assert {(s.num_series, s.num_instances, s.modalities) for s in Study.select()} == {
            (2, len(expected) // 4, "\\CT\\MR\\")}
        assert {s.num_instances for s in Series.select()} == {len(expected) // 8}

    for node in (a, b):
        assoc = associate(node, contexts=[STUDY_ROOT])
        matches, final = find(assoc, query("STUDY", StudyInstanceUID=None,
                                           NumberOfStudyRelatedInstances=None))
        assert final.Status == 0
        assert values(matches, "StudyInstanceUID") == sorted(
            uid("two-nodes", study) for study in STUDIES)
        assert values(matches, "NumberOfStudyRelatedInstances") == [str(len(expected) // 4)] * 4
        found = []
        for study in STUDIES:
            for r in range(SERIES_PER_STUDY):
                matches, final = find(assoc, query(
                    "IMAGE", StudyInstanceUID=uid("two-nodes", study),
                    SeriesInstanceUID=series_uid(study, r), SOPInstanceUID=None))
                assert final.Status == 0
                found += values(matches, "SOPInstanceUID")
        assoc.release()
        assert sorted(found) == sorted(expected)

    result = run_pacs("verify", "--no-progress", config=b.config_path)
    assert (result.returncode, result.stdout) == (0, "store and index are consistent\n")
    for node in (a, b):
        assert "Traceback" not in node.log_text()


def test_move_from_node_b_of_what_node_a_stored(nodes):
    a, b, dest = nodes
    series = [make_instance(patient_id="MOVE", study="1.2.826.0.1.3680043.99.1",
                            series="1.2.826.0.1.3680043.99.1.1", number=n) for n in range(3)]
    assert [s.Status for s in send_datasets(a, series)] == [0, 0, 0]

    pending, final, _ = retrieve(b, identifier("SERIES", StudyInstanceUID=series[0].StudyInstanceUID,
                                               SeriesInstanceUID=series[0].SeriesInstanceUID),
                                 StudyRootMove, destination="DEST")
    assert (final.Status, counts(final)) == (0, (3, 0, 0))
    assert set(dest.received) == {str(ds.SOPInstanceUID) for ds in series}
    stored = Path(b.config.storage.root)
    assert stored == Path(a.config.storage.root)
