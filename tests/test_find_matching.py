"""C-FIND matching rules (PS3.4 C.2.2.2) through pynetdicom, on the fixture archive of find_support.

Each case asserts the exact list of matching studies (sorted, so a duplicate
response would show) for one rule.
"""
from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.conftest import (
    RunningNode, associate, fresh_database, needs_dcmtk, on_database, send_datasets, write_config,
)
from tests.dicomgen import MR
from tests.find_support import (
    GREEK, MUELLER, PATIENT_ROOT, STUDY, STUDY_ROOT, archive, find, findscu, query, studies,
    values,
)

# The client side warns about the wild cards and ranges pydicom thinks invalid in CS, UI, DA.
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR"),
              pytest.mark.both_backends]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, backend):
    """One node holding the fixture archive for the whole module."""
    with fresh_database(backend) as url:
        node = RunningNode(write_config(tmp_path_factory.mktemp("find"), **on_database(url, {})))
        try:
            assert {s.Status for s in send_datasets(node, archive())} == {0}
            yield node
        finally:
            node.stop()


@pytest.fixture(scope="module")
def assoc(loaded):
    assoc = associate(loaded, contexts=[STUDY_ROOT, PATIENT_ROOT])
    yield assoc
    assoc.release()


def without_level(identifier: Dataset) -> Dataset:
    del identifier.QueryRetrieveLevel
    return identifier


def study_uids(assoc, **keys) -> list[str]:
    matches, final = find(assoc, query("STUDY", **{"StudyInstanceUID": None, **keys}))
    assert final.Status == 0
    return values(matches, "StudyInstanceUID")


@pytest.mark.parametrize("keys, expected", [
    # single value matching (C.2.2.2.1), PN case-insensitive by default
    ({"PatientID": "PID-MUELLER"}, "AB"),
    ({"AccessionNumber": "ACC-C"}, "C"),
    ({"PatientName": "müller^jürgen"}, "AB"),
    ({"PatientName": "MÜLLER^JÜRGEN"}, "AB"),
    ({"PatientName": "παπαδόπουλος^γιώργος"}, "C"),
    ({"ReferringPhysicianName": "smith^anna"}, "A"),
    ({"StudyDescription": "ct chest"}, ""),  # only PN ignores case
    # universal matching (C.2.2.2.3)
    ({"PatientName": "", "StudyDate": ""}, "ABCDEF"),
    ({"PatientName": "*"}, "ABCDEF"),
    # wild card matching (C.2.2.2.4)
    ({"PatientName": "SMITH*"}, "DE"),
    ({"PatientName": "*ITH^J*"}, "D"),
    ({"PatientName": "?MITH^JOHN"}, "D"),
    ({"PatientName": "m?ller*"}, "AB"),
    ({"StudyDescription": "100%*"}, "D"),
    ({"StudyDescription": "*CONTRAST_A"}, "D"),
    ({"StudyDescription": "ct*"}, ""),
    # % and _ are data, not SQL wild cards
    ({"PatientName": "SMI%"}, ""),
    ({"PatientName": "SM_TH^JOHN"}, ""),
    ({"StudyDescription": "100_*"}, ""),
    ({"StudyDescription": "*CONTRAST%A"}, ""),
    # no wild cards on UIDs and dates
    ({"StudyInstanceUID": STUDY["A"][:12].encode() + b"*"}, ""),
    ({"StudyDate": "2019*"}, ""),
    # range matching (C.2.2.2.5); a study without a date never matches a range
    ({"StudyDate": "20190101-20201231"}, "AC"),
    ({"StudyDate": "-20191231"}, "AD"),
    ({"StudyDate": "20210101-"}, "BE"),
    ({"StudyDate": "20190304"}, "A"),
    ({"StudyTime": "0800-0900"}, "A"),
    ({"StudyTime": "-1300"}, "AD"),
    ({"StudyTime": "1405"}, ""),
    # combined date and time (C.2.2.2.5.4): one datetime range, not a daily window
    ({"StudyDate": "20190304-20211120", "StudyTime": "090000-140000"}, "C"),
    ({"StudyDate": "20211120-", "StudyTime": "1400-"}, "BE"),
    ({"StudyDate": "20190101-20211231", "StudyTime": "-1300"}, "A"),
    # list of UID matching (C.2.2.2.2)
    ({"StudyInstanceUID": f"{STUDY['A']}\\{STUDY['C']}"}, "AC"),
    # multi-valued attributes: a study matches if any value matches any query value
    ({"ModalitiesInStudy": "MR"}, "BC"),
    ({"ModalitiesInStudy": "CT\\US"}, "ABEF"),
    ({"ModalitiesInStudy": "C?"}, "ABDF"),
    ({"ModalitiesInStudy": "*T"}, "ABF"),
    ({"SOPClassesInStudy": MR}, "BC"),
    # several values in another key: any of them
    ({"AccessionNumber": "ACC-A\\ACC-D"}, "AD"),
    # computed keys are matchable
    ({"NumberOfStudyRelatedInstances": "3"}, "B"),
    ({"NumberOfStudyRelatedSeries": "2"}, "B"),
    # keys read from the stored header
    ({"InstitutionName": "GENERAL*"}, "A"),
    ({"InstitutionName": "CITY CLINIC"}, "B"),
    # combined with each other
    ({"PatientName": "müller*", "ModalitiesInStudy": "MR"}, "B"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_matching_rule(assoc, keys, expected):
    assert study_uids(assoc, **keys) == studies(*expected)


def test_keys_of_a_lower_level_are_not_matched_and_come_back_empty(assoc):
    matches, final = find(assoc, query("STUDY", StudyInstanceUID=STUDY["B"], Modality="US"))
    assert final.Status == 0 and len(matches) == 1
    assert matches[0].Modality == ""


def test_universal_keys_come_back_filled_and_missing_values_empty(assoc):
    matches, _ = find(assoc, query(
        "STUDY", StudyInstanceUID=f"{STUDY['A']}\\{STUDY['E']}", PatientName=None,
        PatientID=None, PatientBirthDate=None, PatientSex=None, StudyDate=None, StudyTime=None,
        AccessionNumber=None, StudyDescription=None, ReferringPhysicianName=None,
        ModalitiesInStudy=None, NumberOfStudyRelatedSeries=None,
        NumberOfStudyRelatedInstances=None))
    by_uid = {m.StudyInstanceUID: m for m in matches}
    a, e = by_uid[STUDY["A"]], by_uid[STUDY["E"]]
    assert (str(a.PatientName), a.PatientID, a.PatientBirthDate, a.PatientSex) == (
        MUELLER, "PID-MUELLER", "19600512", "M")
    assert (a.StudyDate, a.StudyTime, a.AccessionNumber, a.StudyDescription) == (
        "20190304", "083000", "ACC-A", "CT CHEST")
    assert (str(a.ReferringPhysicianName), a.ModalitiesInStudy) == ("SMITH^ANNA", "CT")
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances) == (1, 2)
    assert (str(e.PatientName), e.StudyDate, e.ModalitiesInStudy) == (
        "Smithers^Jane", "20241231", "US")
    for keyword in ("PatientBirthDate", "PatientSex", "StudyTime", "AccessionNumber",
                    "StudyDescription", "ReferringPhysicianName"):
        assert keyword in e and e[keyword].is_empty, keyword


def test_response_has_exactly_the_requested_keys(assoc):
    matches, _ = find(assoc, query("STUDY", StudyInstanceUID=STUDY["D"], PatientName=None,
                                   StudyDate=None))
    assert [elem.keyword for elem in matches[0]] == [
        "StudyDate", "QueryRetrieveLevel", "RetrieveAETitle", "PatientName", "StudyInstanceUID"]
    assert (matches[0].QueryRetrieveLevel, matches[0].RetrieveAETitle) == ("STUDY", "MINIPACS")


def test_unique_key_and_availability_come_back(assoc):
    matches, _ = find(assoc, query("STUDY", AccessionNumber="ACC-A", InstanceAvailability=None))
    assert [(m.StudyInstanceUID, m.InstanceAvailability) for m in matches] == [
        (STUDY["A"], "ONLINE")]


def test_multi_valued_keys_return_every_value(assoc):
    matches, _ = find(assoc, query("STUDY", StudyInstanceUID=STUDY["B"], ModalitiesInStudy="MR",
                                   SOPClassesInStudy=None))
    assert list(matches[0].ModalitiesInStudy) == ["CT", "MR"]
    assert sorted(matches[0].SOPClassesInStudy) == sorted(["1.2.840.10008.5.1.4.1.1.2", MR])


def test_computed_counts_at_every_level(assoc):
    patients, _ = find(assoc, query("PATIENT", PatientID="PID-MUELLER",
                                    NumberOfPatientRelatedStudies=None,
                                    NumberOfPatientRelatedSeries=None,
                                    NumberOfPatientRelatedInstances=None), PATIENT_ROOT)
    assert [(p.NumberOfPatientRelatedStudies, p.NumberOfPatientRelatedSeries,
             p.NumberOfPatientRelatedInstances) for p in patients] == [(2, 3, 5)]
    series, _ = find(assoc, query("SERIES", StudyInstanceUID=STUDY["B"], SeriesInstanceUID=None,
                                  Modality=None, NumberOfSeriesRelatedInstances=None))
    assert sorted((s.Modality, s.NumberOfSeriesRelatedInstances) for s in series) == [
        ("CT", 1), ("MR", 2)]
    matched, _ = find(assoc, query("PATIENT", NumberOfPatientRelatedStudies="2"), PATIENT_ROOT)
    assert values(matched, "PatientID") == ["PID-MUELLER"]


def test_sequence_returned_whole_when_requested_empty(assoc):
    matches, _ = find(assoc, query("STUDY", StudyInstanceUID=f"{STUDY['C']}\\{STUDY['D']}",
                                   ProcedureCodeSequence=[]))
    by_uid = {m.StudyInstanceUID: m for m in matches}
    assert [(i.CodeValue, i.CodeMeaning) for i in by_uid[STUDY["D"]].ProcedureCodeSequence] == [
        ("XR-CHEST", "Chest X-ray"), ("XR-RIB", "Rib series")]
    assert len(by_uid[STUDY["C"]].ProcedureCodeSequence) == 0


@pytest.mark.parametrize("code, expected, items", [
    ("XR-RIB", "D", ["XR-RIB"]),
    ("XR-*", "D", ["XR-CHEST", "XR-RIB"]),
    ("", "ABCDEF", None),
    ("NOPE", "", None),
])
def test_sequence_matching_on_items(assoc, code, expected, items):
    item = Dataset()
    item.CodeValue = code
    matches, _ = find(assoc, query("STUDY", StudyInstanceUID=None, ProcedureCodeSequence=[item]))
    assert values(matches, "StudyInstanceUID") == studies(*expected)
    if items is not None:
        returned = matches[0].ProcedureCodeSequence
        assert [i.CodeValue for i in returned] == items
        assert all(list(i.keys()) == [0x00080100] for i in returned)  # only what was asked


@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Müller^Jürgen"), ("ISO_IR 192", "MÜLLER*"),
])
def test_query_in_latin1_or_utf8_matches_and_answers_in_utf8(assoc, charset, name):
    identifier = query("STUDY", StudyInstanceUID=None, PatientName=name)
    identifier.SpecificCharacterSet = charset
    matches, _ = find(assoc, identifier)
    assert values(matches, "StudyInstanceUID") == studies("A", "B")
    assert {(m.SpecificCharacterSet, str(m.PatientName)) for m in matches} == {
        ("ISO_IR 192", MUELLER)}


def test_utf8_name_stored_in_utf8_found_from_a_latin1_query(assoc):
    identifier = query("STUDY", StudyInstanceUID=None, PatientName="*", PatientID="PID-GREEK")
    identifier.SpecificCharacterSet = "ISO_IR 100"
    matches, _ = find(assoc, identifier)
    assert [(m.SpecificCharacterSet, str(m.PatientName)) for m in matches] == [
        ("ISO_IR 192", GREEK)]


def test_ascii_answers_carry_no_character_set(assoc):
    matches, _ = find(assoc, query("STUDY", PatientID="PID-SMITH", PatientName=None))
    assert [("SpecificCharacterSet" in m, str(m.PatientName)) for m in matches] == [
        (False, "SMITH^JOHN")]


def test_series_and_image_levels(assoc):
    series, _ = find(assoc, query("SERIES", StudyInstanceUID=STUDY["B"], SeriesInstanceUID=None,
                                  SeriesNumber=None, Modality="MR"))
    assert [(s.SeriesNumber, s.Modality, s.StudyInstanceUID) for s in series] == [
        (2, "MR", STUDY["B"])]
    images, _ = find(assoc, query("IMAGE", StudyInstanceUID=STUDY["B"],
                                  SeriesInstanceUID=series[0].SeriesInstanceUID,
                                  SOPInstanceUID=None, SOPClassUID=None, InstanceNumber=None,
                                  Rows=None, PatientName=None))
    assert sorted((i.InstanceNumber, i.SOPClassUID, i.Rows, str(i.PatientName))
                  for i in images) == [(1, MR, 8, MUELLER), (2, MR, 8, MUELLER)]
    one, _ = find(assoc, query("IMAGE", SOPInstanceUID=images[1].SOPInstanceUID,
                               InstanceNumber=None))
    assert [i.InstanceNumber for i in one] == [images[1].InstanceNumber]


def test_image_level_key_from_the_stored_header(assoc):
    images, _ = find(assoc, query("IMAGE", StudyInstanceUID=STUDY["A"], SOPInstanceUID=None,
                                  PhotometricInterpretation=None, BitsStored=12))
    assert [i.PhotometricInterpretation for i in images] == ["MONOCHROME2"] * 2
    assert find(assoc, query("IMAGE", StudyInstanceUID=STUDY["A"], BitsStored=16))[0] == []


def test_patient_root_at_every_level(assoc):
    patients, final = find(assoc, query("PATIENT", PatientName="SMITH*", PatientID=None,
                                        PatientBirthDate=None), PATIENT_ROOT)
    assert final.Status == 0
    assert sorted((p.PatientID, p.PatientBirthDate) for p in patients) == [
        ("PID-SMITH", "19800101"), ("PID-SMITHERS", "")]
    studies_, _ = find(assoc, query("STUDY", PatientID="PID-MUELLER", StudyInstanceUID=None),
                       PATIENT_ROOT)
    assert values(studies_, "StudyInstanceUID") == studies("A", "B")
    series, _ = find(assoc, query("SERIES", PatientID="PID-MUELLER", StudyInstanceUID=STUDY["B"],
                                  SeriesInstanceUID=None), PATIENT_ROOT)
    assert len(series) == 2
    images, _ = find(assoc, query("IMAGE", PatientID="PID-MUELLER", StudyInstanceUID=STUDY["B"],
                                  SeriesInstanceUID=series[0].SeriesInstanceUID,
                                  SOPInstanceUID=None), PATIENT_ROOT)
    assert len(images) in (1, 2) and len(set(values(images, "SOPInstanceUID"))) == len(images)


def test_one_response_per_patient_not_per_instance(assoc):
    patients, _ = find(assoc, query("PATIENT", PatientID=None), PATIENT_ROOT)
    assert values(patients, "PatientID") == sorted(
        ["PID-MUELLER", "PID-GREEK", "PID-SMITH", "PID-SMITHERS", "PID-NODATE"])


@pytest.mark.parametrize("model, identifier, comment, offending", [
    (STUDY_ROOT, without_level(query("STUDY", StudyInstanceUID=None)),
     "QueryRetrieveLevel (0008,0052) is missing", 0x00080052),
    (STUDY_ROOT, query("FOO", StudyInstanceUID=None),
     "QueryRetrieveLevel 'FOO' is not one of STUDY/SERIES/IMAGE", 0x00080052),
    (STUDY_ROOT, query("PATIENT", PatientID=None),
     "QueryRetrieveLevel 'PATIENT' is not one of STUDY/SERIES/IMAGE", 0x00080052),
    (STUDY_ROOT, query("SERIES", StudyInstanceUID=f"{STUDY['A']}\\{STUDY['B']}"),
     "StudyInstanceUID must be a single value at SERIES level", 0x0020000D),
    (STUDY_ROOT, query("IMAGE", StudyInstanceUID=STUDY["A"], SeriesInstanceUID=b"1.2*"),
     "SeriesInstanceUID must be a single value at IMAGE level", 0x0020000E),
    (PATIENT_ROOT, query("STUDY", PatientID="PID-A\\PID-B"),
     "PatientID must be a single value at STUDY level", 0x00100020),
    (STUDY_ROOT, query("STUDY", NumberOfStudyRelatedInstances=b"many"),
     "NumberOfStudyRelatedInstances: 'many' is not a number", 0x00201208),
], ids=["level missing", "level unknown", "patient level in study root", "study uid list",
        "series uid wildcard", "patient id list", "bad number"])
def test_identifier_failures(assoc, model, identifier, comment, offending):
    matches, final = find(assoc, identifier, model)
    assert matches == []
    assert (final.Status, final.ErrorComment) == (0xA900, comment)
    assert final.OffendingElement == offending
    assert find(assoc, query("STUDY", AccessionNumber="ACC-A"))[1].Status == 0  # still usable


# -- the same archive through DCMTK findscu ----------------------------------------------------

@needs_dcmtk
def test_findscu_study_root_wildcard(loaded, tmp_path):
    proc, responses = findscu(loaded.port, tmp_path, "-S", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", "PatientName=SMITH*", "-k", "StudyInstanceUID",
                              "-k", "ModalitiesInStudy")
    assert proc.returncode == 0, proc.stderr
    assert sorted((r.StudyInstanceUID, r.ModalitiesInStudy) for r in responses) == sorted(
        [(STUDY["D"], "CR"), (STUDY["E"], "US")])


@needs_dcmtk
def test_findscu_patient_root_patient_level_in_latin1(loaded, tmp_path):
    proc, responses = findscu(loaded.port, tmp_path, "-P", "-k", "QueryRetrieveLevel=PATIENT",
                              "-k", "SpecificCharacterSet=ISO_IR 100",
                              "-k", "PatientName=m\xfcller*".encode("latin-1"), "-k", "PatientID",
                              "-k", "NumberOfPatientRelatedInstances")
    assert proc.returncode == 0, proc.stderr
    assert [(r.SpecificCharacterSet, str(r.PatientName), r.PatientID,
             r.NumberOfPatientRelatedInstances) for r in responses] == [
        ("ISO_IR 192", MUELLER, "PID-MUELLER", 5)]


@needs_dcmtk
def test_findscu_series_and_image_levels(loaded, tmp_path):
    proc, series = findscu(loaded.port, tmp_path, "-S", "-k", "QueryRetrieveLevel=SERIES",
                           "-k", f"StudyInstanceUID={STUDY['B']}", "-k", "SeriesInstanceUID",
                           "-k", "Modality")
    assert proc.returncode == 0, proc.stderr
    assert sorted(s.Modality for s in series) == ["CT", "MR"]
    mr = next(s for s in series if s.Modality == "MR")
    proc, images = findscu(loaded.port, tmp_path, "-S", "-k", "QueryRetrieveLevel=IMAGE",
                           "-k", f"StudyInstanceUID={STUDY['B']}",
                           "-k", f"SeriesInstanceUID={mr.SeriesInstanceUID}",
                           "-k", "SOPInstanceUID", "-k", "InstanceNumber")
    assert sorted(i.InstanceNumber for i in images) == [1, 2]


@needs_dcmtk
def test_findscu_sees_the_failure_status(loaded, tmp_path):
    proc, responses = findscu(loaded.port, tmp_path, "-v", "-S",
                              "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID")
    assert responses == []
    log = proc.stderr.decode("latin-1") + proc.stdout.decode("latin-1")
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in log, log  # A900


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                    ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_same_answer_in_every_transfer_syntax(loaded, syntax):
    assoc = associate(loaded, contexts=[(STUDY_ROOT, [syntax])])
    try:
        matches, final = find(assoc, query(
            "STUDY", StudyInstanceUID=f"{STUDY['B']}\\{STUDY['D']}", PatientName=None,
            ModalitiesInStudy=None, NumberOfStudyRelatedInstances=None, Rows=None,
            ProcedureCodeSequence=[], InstitutionName=None))
    finally:
        assoc.release()
    assert final.Status == 0
    by_uid = {m.StudyInstanceUID: m for m in matches}
    b, d = by_uid[STUDY["B"]], by_uid[STUDY["D"]]
    assert (b.SpecificCharacterSet, str(b.PatientName), list(b.ModalitiesInStudy),
            b.NumberOfStudyRelatedInstances, b.InstitutionName) == (
        "ISO_IR 192", MUELLER, ["CT", "MR"], 3, "CITY CLINIC")
    assert (str(d.PatientName), d.ModalitiesInStudy, d.Rows) == ("SMITH^JOHN", "CR", None)
    assert [i.CodeValue for i in d.ProcedureCodeSequence] == ["XR-CHEST", "XR-RIB"]
