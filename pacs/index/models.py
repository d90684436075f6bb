"""The index tables: Patient -> Study -> Series -> Instance.

Each attribute is stored once, at its own level. Text is stored decoded to
Unicode (pydicom applies the dataset's Specific Character Set), and person
names also folded (`*_fold`, str.casefold) for case-insensitive matching that
works beyond ASCII on every backend. Multi-valued text (e.g. ModalitiesInStudy)
is stored backslash-joined with a leading and trailing backslash, so one value
matches with `LIKE '%\\CT\\%'`. Counters of related entities are kept up to date
on ingest, so the computed C-FIND keys cost nothing at query time.
"""
from __future__ import annotations

from peewee import (
    AutoField,
    BigIntegerField,
    BlobField,
    CharField,
    DatabaseProxy,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

database = DatabaseProxy()


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Patient(BaseModel):
    id = AutoField()
    patient_id = CharField(max_length=64, default="")  # LO
    issuer = CharField(max_length=64, default="")  # IssuerOfPatientID, LO
    patient_name = CharField(max_length=324, default="", index=True)
    patient_name_fold = CharField(max_length=324, default="", index=True)
    birth_date = CharField(max_length=8, default="", index=True)
    sex = CharField(max_length=16, default="")
    num_studies = IntegerField(default=0)
    num_series = IntegerField(default=0)
    num_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


class Study(BaseModel):
    id = AutoField()
    patient = ForeignKeyField(Patient, backref="studies", on_delete="CASCADE", index=True)
    study_uid = CharField(max_length=64, unique=True)
    study_date = CharField(max_length=8, default="", index=True)
    study_time = CharField(max_length=16, default="")
    accession_number = CharField(max_length=64, default="", index=True)
    study_id = CharField(max_length=16, default="")
    description = CharField(max_length=64, default="")
    referring_physician = CharField(max_length=324, default="", index=True)  # schema v4
    referring_physician_fold = CharField(max_length=324, default="", index=True)
    modalities = CharField(max_length=256, default="")  # "\CT\MR\"
    sop_classes = TextField(default="")  # "\1.2...\1.2...\"
    num_series = IntegerField(default=0)
    num_instances = IntegerField(default=0)


class Series(BaseModel):
    id = AutoField()
    study = ForeignKeyField(Study, backref="series", on_delete="CASCADE", index=True)
    series_uid = CharField(max_length=64, unique=True)
    modality = CharField(max_length=16, default="", index=True)
    series_number = CharField(max_length=12, default="")  # IS, kept as text
    description = CharField(max_length=64, default="")
    body_part = CharField(max_length=64, default="")
    series_date = CharField(max_length=8, default="")
    series_time = CharField(max_length=16, default="")
    num_instances = IntegerField(default=0)


class Instance(BaseModel):
    id = AutoField()
    series = ForeignKeyField(Series, backref="instances", on_delete="CASCADE", index=True)
    sop_uid = CharField(max_length=64, unique=True)
    sop_class_uid = CharField(max_length=64, default="")
    instance_number = CharField(max_length=12, default="")  # IS, kept as text
    content_date = CharField(max_length=8, default="")
    content_time = CharField(max_length=16, default="")
    rows = IntegerField(null=True)
    columns = IntegerField(null=True)
    number_of_frames = IntegerField(null=True)
    transfer_syntax = CharField(max_length=64)
    path = CharField(max_length=255)  # relative to the store root
    size = BigIntegerField()
    received_at = DateTimeField()
    header = BlobField()  # Part 10 bytes up to the bulk data: every other attribute


class AuditEvent(BaseModel):
    """Who stored, queried or retrieved what (PS3.15 A.5 / IHE ATNA in spirit); see pacs.activity.

    Not part of the index proper: `pacs reindex` keeps it. No patient names, only IDs.
    """

    id = AutoField()
    time = DateTimeField(index=True)  # UTC, naive
    event = CharField(max_length=8, index=True)  # store | find | move | get | reject
    calling_ae = CharField(max_length=16, index=True)
    peer = CharField(max_length=64)  # address:port
    status = IntegerField(null=True)  # final DIMSE status (reject: A-ASSOCIATE-RJ reason);
    # None: the connection was lost
    count = IntegerField(default=0)  # instances stored, matches, or sub-operations completed
    failed = IntegerField(default=0)  # sub-operations failed or with a warning
    destination = CharField(max_length=16, default="")  # C-MOVE
    patient_id = TextField(default="")  # backslash-joined
    studies = TextField(default="")  # Study Instance UIDs, backslash-joined
    detail = TextField(default="")  # model, level and keys, patient values masked


class SchemaVersion(BaseModel):
    """One row: the version of the schema (index/schema.py migrates older ones)."""

    version = IntegerField()


MODELS = (Patient, Study, Series, Instance, AuditEvent, SchemaVersion)
