"""Short, loggable summaries of a query/retrieve identifier.

Logs at INFO and the audit trail name the keys a requester sent but show only
values that identify no patient: UIDs, dates, times, codes and numbers outside
the Patient module. Names, IDs, birth dates, descriptions and other free text
appear as `Key=***`; with `reveal` (the DEBUG line) every value is shown. Never
the whole data set: at most VALUE_CHARS characters and LIST_VALUES values per key.
"""
from __future__ import annotations

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

# VRs whose values say nothing about a person on their own (free text does: LO, SH, PN ...).
_PLAIN_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "SL", "SS", "TM", "UI", "UL", "US"}
_PATIENT_PREFIXES = ("Patient", "OtherPatient", "IssuerOfPatient")
_SKIPPED = {"QueryRetrieveLevel", "SpecificCharacterSet"}  # shown separately or noise
VALUE_CHARS = 64
LIST_VALUES = 3
MASK = "***"


def keys_summary(identifier: Dataset, reveal: bool = False) -> str:
    """`Key=value ...` for the matching keys, then how many return-only (empty) keys."""
    try:
        return _summary(identifier, reveal)
    except Exception:  # a value that does not decode: the request is refused anyway
        return "(undecodable identifier)"


def _summary(identifier: Dataset, reveal: bool) -> str:
    parts, returned = [], 0
    for element in identifier:
        keyword = element.keyword or str(element.tag)
        if keyword in _SKIPPED:
            continue
        if element.VR == "SQ":
            parts.append(f"{keyword}[{len(element.value or [])}]")
        elif element.is_empty:
            returned += 1
        elif reveal or _plain(element, keyword):
            parts.append(f"{keyword}={_value(element)}")
        else:
            parts.append(f"{keyword}={MASK}")
    if returned:
        parts.append(f"(+{returned} return keys)")
    return " ".join(parts) or "(no keys)"


def _plain(element: DataElement, keyword: str) -> bool:
    return element.VR in _PLAIN_VRS and not keyword.startswith(_PATIENT_PREFIXES)


def _value(element: DataElement) -> str:
    value = element.value
    if isinstance(value, (list, MultiValue)):
        shown = "\\".join(str(v)[:VALUE_CHARS] for v in value[:LIST_VALUES])
        return shown + (f"\\... ({len(value)} values)" if len(value) > LIST_VALUES else "")
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)[:VALUE_CHARS]
