"""The fixture archive of the C-FIND tests and small query helpers.

Six studies of five patients, built so each matching rule has a distinct answer:

| study | patient (charset)                     | date     | time   | modalities | notes                       |
|-------|---------------------------------------|----------|--------|------------|-----------------------------|
| A     | Müller^Jürgen (ISO_IR 100)            | 20190304 | 083000 | CT         | 2 instances                 |
| B     | Müller^Jürgen (ISO_IR 100)            | 20211120 | 140500 | CT, MR     | 3 instances in 2 series     |
| C     | Παπαδόπουλος^Γιώργος (ISO_IR 192)     | 20200715 | 235900 | MR         |                             |
| D     | SMITH^JOHN                            | 20150101 | 120000 | CR         | ProcedureCodeSequence, "100% CONTRAST_A" |
| E     | Smithers^Jane (no birth date, sex)    | 20241231 | -      | US         | no time, accession, description, referring |
| F     | DOE^JANE                              | -        | -      | CT         | no date, no time            |
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,  # noqa: F401 - for the tests
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from tests.conftest import DCMTK
from tests.dicomgen import make_instance, uid

STUDY = {name: uid("find", name) for name in "ABCDEF"}
SERIES = {name: uid("find-series", name) for name in ("A1", "B1", "B2", "C1", "D1", "E1", "F1")}
MUELLER, GREEK = "Müller^Jürgen", "Παπαδόπουλος^Γιώργος"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = meaning
    return item


def _series(study: str, series: str, modality: str, count: int, number: int,
            **attrs: object) -> list[Dataset]:
    return [make_instance(study=STUDY[study], series=SERIES[series], modality=modality,
                          sop=sop_uid(series, i), number=i + 1, SeriesNumber=number, **attrs)
            for i in range(count)]


def sop_uid(series: str, index: int) -> str:
    return uid("find-sop", series, index)


def archive() -> list[Dataset]:
    """Every instance of the fixture archive."""
    mueller = dict(patient_id="PID-MUELLER", patient_name=MUELLER, charset="ISO_IR 100",
                   PatientBirthDate="19600512", PatientSex="M")
    a = dict(mueller, StudyDate="20190304", StudyTime="083000", AccessionNumber="ACC-A",
             StudyID="A1", StudyDescription="CT CHEST", ReferringPhysicianName="SMITH^ANNA",
             InstitutionName="GENERAL HOSPITAL")
    b = dict(mueller, StudyDate="20211120", StudyTime="140500", AccessionNumber="ACC-B",
             StudyDescription="CT/MR ABDOMEN", ReferringPhysicianName="JONES^BOB",
             InstitutionName="CITY CLINIC")
    c = dict(patient_id="PID-GREEK", patient_name=GREEK, charset="ISO_IR 192",
             PatientBirthDate="19751224", PatientSex="M", StudyDate="20200715",
             StudyTime="235900", AccessionNumber="ACC-C", StudyDescription="MR BRAIN")
    d = dict(patient_id="PID-SMITH", patient_name="SMITH^JOHN", PatientBirthDate="19800101",
             StudyDate="20150101", StudyTime="120000", AccessionNumber="ACC-D",
             StudyDescription="100% CONTRAST_A",
             ProcedureCodeSequence=Sequence([_code("XR-CHEST", "Chest X-ray"),
                                             _code("XR-RIB", "Rib series")]))
    e = dict(patient_id="PID-SMITHERS", patient_name="Smithers^Jane", StudyDate="20241231")
    f = dict(patient_id="PID-NODATE", patient_name="DOE^JANE")
    instances = (
        _series("A", "A1", "CT", 2, 1, SeriesDate="20190304", SeriesTime="083500", **a)
        + _series("B", "B1", "CT", 1, 1, **b) + _series("B", "B2", "MR", 2, 2, **b)
        + _series("C", "C1", "MR", 1, 1, **c) + _series("D", "D1", "CR", 1, 1, **d)
        + _series("E", "E1", "US", 1, 1, **e) + _series("F", "F1", "CT", 1, 1, **f)
    )
    for ds in instances:
        if ds.PatientID == "PID-SMITHERS":
            for keyword in ("StudyTime", "AccessionNumber", "StudyDescription",
                            "ReferringPhysicianName", "PatientBirthDate", "PatientSex"):
                delattr(ds, keyword)
        if ds.PatientID == "PID-NODATE":
            del ds.StudyDate, ds.StudyTime
    return instances


def query(level: str, **keys: object) -> Dataset:
    """An identifier: QueryRetrieveLevel and the keys (None or "" asks for the value).

    A bytes value goes on the wire as given, even where pydicom would refuse it.
    """
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        if isinstance(value, bytes):
            tag = Tag(tag_for_keyword(keyword))
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
        if isinstance(value, str) and not value.isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def find(assoc, identifier: Dataset, model=STUDY_ROOT) -> tuple[list[Dataset], Dataset]:
    """The pending identifiers and the final status of one C-FIND."""
    matches, final = [], None
    for status, ident in assoc.send_c_find(identifier, model):
        assert status is not None, "no response"
        if status.Status in (0xFF00, 0xFF01):
            matches.append(ident)
        else:
            final = status
    return matches, final


def values(matches: list[Dataset], keyword: str) -> list:
    """One attribute of every match, sorted (so duplicates show)."""
    return sorted(str(m.get(keyword, "")) for m in matches)


def studies(*names: str) -> list[str]:
    return sorted(STUDY[name] for name in names)


def findscu(port: int, out: Path, *args: str | bytes) -> tuple[subprocess.CompletedProcess,
                                                               list[Dataset]]:
    """Run DCMTK findscu with -X -od: its output and the response files, in arrival order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    proc = subprocess.run([str(DCMTK / "findscu"), "-aec", "MINIPACS", "-X", "-od", str(out),
                           *args, "127.0.0.1", str(port)], capture_output=True, timeout=60)
    return proc, [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]

