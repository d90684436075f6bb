"""C-FIND config and flow control: query.max_results, query.case_insensitive_pn, C-CANCEL."""
from __future__ import annotations

import pytest

from tests.conftest import associate, send_datasets
from tests.dicomgen import make_instance, uid, write
from tests.find_support import STUDY_ROOT, find, query, values

pytestmark = pytest.mark.both_backends  # same results on SQLite and PostgreSQL


def load(node, datasets) -> None:
    assert {s.Status for s in send_datasets(node, datasets)} == {0}


def one_study_each(*names: str) -> list:
    return [make_instance(patient_id=f"PID{i}", patient_name=name) for i, name in enumerate(names)]


def test_max_results_cuts_with_a_failure_that_says_so(make_node):
    node = make_node(query={"max_results": 2})
    load(node, one_study_each("SMITH^A", "SMITH^B", "SMITH^C", "JONES^D"))
    assoc = associate(node, contexts=[STUDY_ROOT])
    matches, final = find(assoc, query("STUDY", PatientName="SMITH*", StudyInstanceUID=None))
    assert len(matches) == 2 and len(set(values(matches, "StudyInstanceUID"))) == 2
    assert (final.Status, final.ErrorComment) == (
        0xA700, "more than 2 matches; only the first 2 were sent")
    matches, final = find(assoc, query("STUDY", PatientID="PID0\\PID1"))
    assert (len(matches), final.Status) == (2, 0)  # exactly the limit: complete, Success
    assoc.release()


def test_case_sensitive_person_names_when_configured(make_node):
    node = make_node(query={"case_insensitive_pn": False})
    load(node, one_study_each("SMITH^JOHN", "Smith^Jane"))
    assoc = associate(node, contexts=[STUDY_ROOT])
    for name, expected in (("SMITH*", ["SMITH^JOHN"]), ("smith*", []), ("Smith^Jane", ["Smith^Jane"]),
                           ("smith^jane", []), ("S?ith*", ["Smith^Jane"])):
        matches, _ = find(assoc, query("STUDY", PatientName=name))
        assert values(matches, "PatientName") == expected, name
    assoc.release()


def test_cancel_stops_the_matches_with_fe00(make_node, tmp_path):
    node = make_node()
    series = uid("cancel", "series")
    # Filed through the archive, as `pacs import` does: 300 C-STOREs from pynetdicom take
    # 40 ms each (Nagle), and with TCP_NODELAY its requestor sometimes loses a response.
    # 50 KB of text per response: more than the socket buffers hold, so the server is
    # still sending when the C-CANCEL arrives.
    for i in range(300):
        ds = make_instance(series=series, sop=uid("cancel", i), number=i + 1,
                           TextValue="x" * 50000)
        node.archive.ingest(write(ds, tmp_path / f"{i}.dcm"))
    assoc = associate(node, contexts=[STUDY_ROOT])
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == STUDY_ROOT)
    statuses = []
    for status, _ in assoc.send_c_find(query("IMAGE", SeriesInstanceUID=series,
                                             SOPInstanceUID=None, TextValue=None),
                                       STUDY_ROOT, msg_id=7):
        statuses.append(status.Status)
        if len(statuses) == 1:
            assoc.send_c_cancel(7, context_id)
    assert statuses[-1] == 0xFE00
    assert set(statuses[:-1]) == {0xFF00} and len(statuses) - 1 < 300
    matches, final = find(assoc, query("IMAGE", SeriesInstanceUID=series, SOPInstanceUID=None))
    assert (len(matches), final.Status) == (300, 0)  # the association goes on
    assoc.release()
