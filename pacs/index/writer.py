"""Write instance records into the index, many per transaction.

One transaction per batch is what makes ingest fast: the disk does one
commit (one fsync of the WAL) for every instance that arrived meanwhile on any
association. Counter deltas and ModalitiesInStudy/SOPClassesInStudy are gathered
in memory during the batch and written once at its end.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

from pacs.index.models import Instance, Patient, Series, Study, database
from pacs.index.records import InstanceRecord

log = logging.getLogger(__name__)


def add_value(joined: str, value: str) -> str:
    """Add one value to a "\\a\\b\\" multi-value column, keeping it sorted and unique."""
    if not value:
        return joined
    values = set(filter(None, joined.split("\\")))
    if value in values:
        return joined
    values.add(value)
    return "\\" + "\\".join(sorted(values)) + "\\"


class _Batch:
    """Rows looked up or created in this transaction, and counter deltas to apply."""

    def __init__(self) -> None:
        self.patients: dict[tuple[str, str], Patient] = {}
        self.studies: dict[str, Study] = {}
        self.series: dict[str, Series] = {}
        self.deltas: dict[type, Counter] = {Patient: Counter(), Study: Counter(), Series: Counter()}
        self.multi: dict[int, Study] = {}

    def bump(self, model: type, row_id: int, field: str, by: int = 1) -> None:
        self.deltas[model][(row_id, field)] += by

    def patient(self, values: dict) -> Patient:
        key = (values["patient_id"], values["issuer"])
        row = self.patients.get(key)
        if row is None:
            row = Patient.get_or_none(
                (Patient.patient_id == key[0]) & (Patient.issuer == key[1])
            )
            if row is None:
                row = Patient.create(**values)
            else:
                _log_conflict(row, values)
            self.patients[key] = row
        return row

    def study(self, values: dict, patient: Patient) -> Study:
        row = self.studies.get(values["study_uid"])
        if row is None:
            row = Study.get_or_none(Study.study_uid == values["study_uid"])
            if row is None:
                row = Study.create(patient=patient, **values)
                self.bump(Patient, patient.id, "num_studies")
            elif row.patient_id != patient.id:
                log.warning(
                    "study %s already filed under patient row %s; keeping it there "
                    "(new instance names patient %r)", row.study_uid, row.patient_id,
                    patient.patient_id,
                )
            self.studies[row.study_uid] = row
        return row

    def series_row(self, values: dict, study: Study) -> Series:
        row = self.series.get(values["series_uid"])
        if row is None:
            row = Series.get_or_none(Series.series_uid == values["series_uid"])
            if row is None:
                row = Series.create(study=study, **values)
                self.bump(Study, study.id, "num_series")
                self.bump(Patient, study.patient_id, "num_series")
                self.add_multi(study, "modalities", values["modality"])
            self.series[row.series_uid] = row
        return row

    def add_multi(self, study: Study, field: str, value: str) -> None:
        updated = add_value(getattr(study, field), value)
        if updated != getattr(study, field):
            setattr(study, field, updated)
            self.multi[study.id] = study

    def count_instance(self, series: Series, by: int) -> None:
        study = self.studies_by_id(series.study_id)
        self.bump(Series, series.id, "num_instances", by)
        self.bump(Study, study.id, "num_instances", by)
        self.bump(Patient, study.patient_id, "num_instances", by)

    def studies_by_id(self, study_id: int) -> Study:
        for row in self.studies.values():
            if row.id == study_id:
                return row
        row = Study.get_by_id(study_id)
        self.studies[row.study_uid] = row
        return row

    def flush(self) -> None:
        for model, counter in self.deltas.items():
            for (row_id, field), delta in counter.items():
                if delta:
                    column = getattr(model, field)
                    model.update({column: column + delta}).where(model.id == row_id).execute()
        for study in self.multi.values():
            Study.update(modalities=study.modalities, sop_classes=study.sop_classes).where(
                Study.id == study.id
            ).execute()


def _log_conflict(row: Patient, values: dict) -> None:
    for field in ("patient_name", "birth_date"):
        old, new = getattr(row, field), values[field]
        if new and old != new:
            log.warning(
                "patient %r (issuer %r): %s differs: index has %r, new instance has %r; "
                "stored under the existing patient", row.patient_id, row.issuer, field, old, new,
            )


def write_batch(records: Iterable[InstanceRecord]) -> None:
    """Insert or replace these instances (and their parents) in one transaction."""
    with database.atomic():
        batch = _Batch()
        for record in records:
            _write_one(batch, record)
        batch.flush()


def _write_one(batch: _Batch, record: InstanceRecord) -> None:
    patient = batch.patient(record.patient)
    study = batch.study(record.study, patient)
    series = batch.series_row(record.series, study)
    batch.add_multi(batch.studies_by_id(series.study_id), "sop_classes",
                    record.instance["sop_class_uid"])
    old = Instance.get_or_none(Instance.sop_uid == record.sop_uid)
    if old is None:
        Instance.insert(series=series.id, **record.instance).execute()
        batch.count_instance(series, 1)
        return
    Instance.update(series=series.id, **record.instance).where(Instance.id == old.id).execute()
    if old.series_id != series.id:
        log.warning("instance %s moved from series row %s to %s", record.sop_uid,
                    old.series_id, series.id)
        batch.count_instance(Series.get_by_id(old.series_id), -1)
        batch.count_instance(series, 1)
