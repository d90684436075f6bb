"""Turn a parsed header into the column values of each index level."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue


def text(ds: Dataset, keyword: str, limit: int = 324) -> str:
    """An attribute as decoded text, multiple values joined by backslash."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not stop ingest: index it as empty
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass
class InstanceRecord:
    """Everything the index keeps about one instance, split by level."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]

    INSTANCE_FIELDS = (
        "sop_uid", "sop_class_uid", "instance_number", "content_date", "content_time", "rows",
        "columns", "number_of_frames", "transfer_syntax", "path", "size", "received_at", "header",
    )

    @property
    def sop_uid(self) -> str:
        return self.instance["sop_uid"]


def build_record(
    ds: Dataset, uids: tuple[str, str, str, str], transfer_syntax: str,
    relpath: str, size: int, header: bytes,
) -> InstanceRecord:
    """Column values for one instance whose UIDs were already validated."""
    sop_uid, sop_class, study_uid, series_uid = uids
    name = text(ds, "PatientName")
    referring = text(ds, "ReferringPhysicianName")
    return InstanceRecord(
        patient={
            "patient_id": text(ds, "PatientID", 64),
            "issuer": text(ds, "IssuerOfPatientID", 64),
            "patient_name": name,
            "patient_name_fold": name.casefold(),
            "birth_date": text(ds, "PatientBirthDate", 8),
            "sex": text(ds, "PatientSex", 16),
        },
        study={
            "study_uid": study_uid,
            "study_date": text(ds, "StudyDate", 8),
            "study_time": text(ds, "StudyTime", 16),
            "accession_number": text(ds, "AccessionNumber", 64),
            "study_id": text(ds, "StudyID", 16),
            "description": text(ds, "StudyDescription", 64),
            "referring_physician": referring,
            "referring_physician_fold": referring.casefold(),
        },
        series={
            "series_uid": series_uid,
            "modality": text(ds, "Modality", 16),
            "series_number": text(ds, "SeriesNumber", 12),
            "description": text(ds, "SeriesDescription", 64),
            "body_part": text(ds, "BodyPartExamined", 64),
            "series_date": text(ds, "SeriesDate", 8),
            "series_time": text(ds, "SeriesTime", 16),
        },
        instance={
            "sop_uid": sop_uid,
            "sop_class_uid": sop_class,
            "instance_number": text(ds, "InstanceNumber", 12),
            "content_date": text(ds, "ContentDate", 8),
            "content_time": text(ds, "ContentTime", 16),
            "rows": integer(ds, "Rows"),
            "columns": integer(ds, "Columns"),
            "number_of_frames": integer(ds, "NumberOfFrames"),
            "transfer_syntax": transfer_syntax,
            "path": relpath,
            "size": size,
            "received_at": datetime.now(timezone.utc).replace(tzinfo=None),
            "header": header,
        },
    )
