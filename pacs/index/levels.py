"""Query/Retrieve information models and levels, shared by C-FIND and C-MOVE/C-GET.

PS3.4 C.3: Patient Root starts at PATIENT, Study Root at STUDY; each level has
one unique key. Both FIND and retrieve identifiers name their level the same way.
"""
from __future__ import annotations

from pydicom import Dataset

PATIENT_ROOT, STUDY_ROOT = "PATIENT", "STUDY"
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
TOP_LEVEL = {PATIENT_ROOT: 0, STUDY_ROOT: 1}  # index in LEVELS of each root's first level
QUERY_RETRIEVE_LEVEL = 0x00080052


class IdentifierError(ValueError):
    """The identifier does not fit the information model; the message becomes the ErrorComment."""

    def __init__(self, message: str, tag: int | None = None):
        super().__init__(message)
        self.tag = tag  # the offending element, when there is one


def query_level(identifier: Dataset, root: str) -> int:
    """The index in LEVELS of the identifier's Query/Retrieve Level, valid under `root`."""
    level = str(identifier.get("QueryRetrieveLevel") or "").strip().upper()
    if not level:
        raise IdentifierError("QueryRetrieveLevel (0008,0052) is missing", QUERY_RETRIEVE_LEVEL)
    allowed = LEVELS[TOP_LEVEL[root]:]
    if level not in allowed:
        raise IdentifierError(f"QueryRetrieveLevel {level[:16]!r} is not one of {'/'.join(allowed)}",
                              QUERY_RETRIEVE_LEVEL)
    return LEVELS.index(level)
