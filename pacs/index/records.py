"""Turn a parsed header into the column values of each index level."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pacs.header import Values


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
    values: Values, uids: tuple[str, str, str, str], transfer_syntax: str,
    relpath: str, size: int, header: bytes,
) -> InstanceRecord:
    """Column values for one instance whose UIDs were already validated."""
    sop_uid, sop_class, study_uid, series_uid = uids
    text = values.text
    name = text("PatientName")
    referring = text("ReferringPhysicianName")
    return InstanceRecord(
        patient={
            "patient_id": text("PatientID", 64),
            "issuer": text("IssuerOfPatientID", 64),
            "patient_name": name,
            "patient_name_fold": name.casefold(),
            "birth_date": text("PatientBirthDate", 8),
            "sex": text("PatientSex", 16),
        },
        study={
            "study_uid": study_uid,
            "study_date": text("StudyDate", 8),
            "study_time": text("StudyTime", 16),
            "accession_number": text("AccessionNumber", 64),
            "study_id": text("StudyID", 16),
            "description": text("StudyDescription", 64),
            "referring_physician": referring,
            "referring_physician_fold": referring.casefold(),
        },
        series={
            "series_uid": series_uid,
            "modality": text("Modality", 16),
            "series_number": text("SeriesNumber", 12),
            "description": text("SeriesDescription", 64),
            "body_part": text("BodyPartExamined", 64),
            "series_date": text("SeriesDate", 8),
            "series_time": text("SeriesTime", 16),
        },
        instance={
            "sop_uid": sop_uid,
            "sop_class_uid": sop_class,
            "instance_number": text("InstanceNumber", 12),
            "content_date": text("ContentDate", 8),
            "content_time": text("ContentTime", 16),
            "rows": values.integer("Rows"),
            "columns": values.integer("Columns"),
            "number_of_frames": values.integer("NumberOfFrames"),
            "transfer_syntax": transfer_syntax,
            "path": relpath,
            "size": size,
            "received_at": datetime.now(timezone.utc).replace(tzinfo=None),
            "header": header,
        },
    )
