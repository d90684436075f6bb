"""Turn a C-MOVE/C-GET identifier into the instances it names (PS3.4 C.4.2.2.1, C.4.3.2.1).

A retrieve identifier holds the Query/Retrieve Level and unique keys. The key of
the level itself is required and may be a list of values (backslash-separated),
so a workstation can pick several studies, series or images at once. Keys of the
levels above are optional, as dcm4chee and Orthanc accept, but when present they
must be single-valued and must match (PS3.4 C.4.2.2.1 hierarchical retrieve).
Keys below the level and non-unique keys are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pydicom import Dataset
from pydicom.multival import MultiValue

from pacs.index.levels import TOP_LEVEL, query_level
from pacs.index.levels import IdentifierError as SelectionError
from pacs.index.models import Instance, Patient, Series, Study

# (level, unique key, its tag for messages, the indexed column), in LEVELS order
_KEYS = (
    ("PATIENT", "PatientID", "(0010,0020)", Patient.patient_id),
    ("STUDY", "StudyInstanceUID", "(0020,000D)", Study.study_uid),
    ("SERIES", "SeriesInstanceUID", "(0020,000E)", Series.series_uid),
    ("IMAGE", "SOPInstanceUID", "(0008,0018)", Instance.sop_uid),
)


@dataclass(frozen=True)
class Match:
    """One instance to send: what the sender needs, without opening the file."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    relpath: str
    size: int
    study_uid: str = ""  # for the audit trail; set by select_matches
    patient_id: str = ""


def key_values(identifier: Dataset, keyword: str) -> list[str]:
    """The non-empty values of one key; a list of UIDs arrives as a MultiValue."""
    value = identifier.get(keyword)
    if value is None:
        return []
    items = value if isinstance(value, (list, MultiValue)) else str(value).split("\\")
    return [text for text in (str(v).strip().rstrip("\x00") for v in items) if text]


def select_matches(identifier: Dataset, root: str) -> list[Match]:
    """The instances an identifier names under a root (PATIENT_ROOT or STUDY_ROOT).

    Raises SelectionError for a missing or unknown level, a missing key at the
    level, or a list where a single value is required.
    """
    target = query_level(identifier, root)
    conditions = []
    for index in range(TOP_LEVEL[root], target + 1):
        level, keyword, tag, column = _KEYS[index]
        values = key_values(identifier, keyword)
        if index == target:
            if not values:
                raise SelectionError(f"{keyword} {tag} is required at the {level} level")
            conditions.append(column.in_(values) if len(values) > 1 else column == values[0])
        elif len(values) > 1:
            raise SelectionError(f"{keyword} {tag} must be a single value above the "
                                 f"{_KEYS[target][0]} level")
        elif values:
            conditions.append(column == values[0])
    query = (Instance
             .select(Instance.sop_uid, Instance.sop_class_uid, Instance.transfer_syntax,
                     Instance.path, Instance.size, Study.study_uid, Patient.patient_id)
             .join(Series).join(Study).join(Patient)
             .where(*conditions)
             .order_by(Study.id, Series.id, Instance.id))
    return [Match(*row) for row in query.tuples().iterator()]


def find_instances(sop_uids: Iterable[str]) -> dict[str, Match]:
    """The indexed instances among these SOP Instance UIDs (for Storage Commitment)."""
    wanted = list(dict.fromkeys(sop_uids))
    found = {}
    for start in range(0, len(wanted), 500):  # stay far below SQLite's bound-variable limit
        query = (Instance
                 .select(Instance.sop_uid, Instance.sop_class_uid, Instance.transfer_syntax,
                         Instance.path, Instance.size)
                 .where(Instance.sop_uid.in_(wanted[start:start + 500])))
        for row in query.tuples():
            found[row[0]] = Match(*row)
    return found
