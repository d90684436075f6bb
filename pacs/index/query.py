"""C-FIND over the index: an identifier becomes one SELECT, each row one response.

Patient Root (PATIENT, STUDY, SERIES, IMAGE) and Study Root (STUDY, SERIES,
IMAGE), hierarchical search (PS3.4 C.4.1.3.1.1). The entity of the query level
is joined with its parents in the same SELECT (no query per row), keys kept as
columns are matched in SQL (matching.py), and the rows stream from a cursor.
Keys that are not columns come from the stored header of one instance of the
entity (a correlated subquery, decoded only when such a key is asked for).
Keys of a level below the query level come back empty and are not matched:
relational queries are not supported.

Knows nothing of pynetdicom: the service maps QueryError to a status.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from peewee import Field, ModelSelect
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword

from pacs.index.answer import Answer
from pacs.index.db import stream
from pacs.index.keys import RequestKey, UndecodableKey, decode_keys, identifier_encodings
from pacs.index.matching import DateTimeRange, InvalidKey, Matcher, build
from pacs.index.models import Instance, Patient, Series, Study
from pacs.index.levels import IdentifierError as QueryError
from pacs.index.levels import LEVELS, QUERY_RETRIEVE_LEVEL, TOP_LEVEL, query_level
from pacs.index.levels import UNIQUE_KEYS as _UNIQUE
from pacs.index.stored import SequenceMatch, collect, is_ascii, parse

_MODELS = (Patient, Study, Series, Instance)
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056


@dataclass(frozen=True)
class QueryOptions:
    ae_title: str  # answered as Retrieve AE Title (0008,0054)
    case_insensitive_pn: bool = True


@dataclass(frozen=True)
class Column:
    """An attribute the index keeps as a column, at its own level."""

    vr: str
    level: int
    field: Field
    fold: Field | None = None  # casefolded twin (PN)
    multi: bool = False  # stored "\\a\\b\\"


def _columns() -> dict[int, Column]:
    spec = (
        ("PatientName", "PN", 0, Patient.patient_name, Patient.patient_name_fold),
        ("PatientID", "LO", 0, Patient.patient_id),
        ("IssuerOfPatientID", "LO", 0, Patient.issuer),
        ("PatientBirthDate", "DA", 0, Patient.birth_date),
        ("PatientSex", "CS", 0, Patient.sex),
        ("NumberOfPatientRelatedStudies", "IS", 0, Patient.num_studies),
        ("NumberOfPatientRelatedSeries", "IS", 0, Patient.num_series),
        ("NumberOfPatientRelatedInstances", "IS", 0, Patient.num_instances),
        ("StudyInstanceUID", "UI", 1, Study.study_uid),
        ("StudyDate", "DA", 1, Study.study_date),
        ("StudyTime", "TM", 1, Study.study_time),
        ("AccessionNumber", "SH", 1, Study.accession_number),
        ("StudyID", "SH", 1, Study.study_id),
        ("StudyDescription", "LO", 1, Study.description),
        ("ReferringPhysicianName", "PN", 1, Study.referring_physician,
         Study.referring_physician_fold),
        ("ModalitiesInStudy", "CS", 1, Study.modalities, None, True),
        ("SOPClassesInStudy", "UI", 1, Study.sop_classes, None, True),
        ("NumberOfStudyRelatedSeries", "IS", 1, Study.num_series),
        ("NumberOfStudyRelatedInstances", "IS", 1, Study.num_instances),
        ("SeriesInstanceUID", "UI", 2, Series.series_uid),
        ("Modality", "CS", 2, Series.modality),
        ("SeriesNumber", "IS", 2, Series.series_number),
        ("SeriesDescription", "LO", 2, Series.description),
        ("BodyPartExamined", "CS", 2, Series.body_part),
        ("SeriesDate", "DA", 2, Series.series_date),
        ("SeriesTime", "TM", 2, Series.series_time),
        ("NumberOfSeriesRelatedInstances", "IS", 2, Series.num_instances),
        ("SOPInstanceUID", "UI", 3, Instance.sop_uid),
        ("SOPClassUID", "UI", 3, Instance.sop_class_uid),
        ("InstanceNumber", "IS", 3, Instance.instance_number),
        ("ContentDate", "DA", 3, Instance.content_date),
        ("ContentTime", "TM", 3, Instance.content_time),
        ("Rows", "US", 3, Instance.rows),
        ("Columns", "US", 3, Instance.columns),
        ("NumberOfFrames", "IS", 3, Instance.number_of_frames),
    )
    return {tag_for_keyword(keyword): Column(*rest) for keyword, *rest in spec}


COLUMNS = _columns()
# DA/TM column pairs matched as one datetime when both are ranges (C.2.2.2.5.4)
_DATE_TIME_PAIRS = tuple((tag_for_keyword(d), tag_for_keyword(t)) for d, t in (
    ("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime")))


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_hierarchy(keys: dict[int, RequestKey], root: str, level: int) -> None:
    """Above the query level a unique key is absent, universal or one plain value (C.4.1.3.1.1).

    Absent keys are accepted, as dcm4chee and Orthanc do; lists and wild cards are not.
    """
    for upper in range(TOP_LEVEL[root], level):
        tag = tag_for_keyword(_UNIQUE[upper])
        key = keys.get(tag)
        values = [v for v in key.values if v.strip("*")] if key else []
        if len(values) > 1 or any("*" in v or "?" in v for v in values):
            raise QueryError(f"{_UNIQUE[upper]} must be a single value at {LEVELS[level]} level",
                             tag)


class Find:
    """One prepared C-FIND: the SELECT, the checks left to Python, and the response layout."""

    def __init__(self, identifier: Dataset, root: str, options: QueryOptions):
        """Raises QueryError when the identifier does not fit the information model."""
        self.level = query_level(identifier, root)
        self.options = options
        self._encodings = identifier_encodings(identifier)
        try:
            keys = {key.tag: key for key in decode_keys(identifier, self._encodings)}
        except UndecodableKey as exc:
            raise QueryError(str(exc), exc.tag) from None
        _check_hierarchy(keys, root, self.level)
        self._fields: list[Field] = []
        self._conditions: list = []
        self._checks: list[tuple[int, Matcher, bool]] = []  # (row index, matcher, multi)
        self._outputs: list[tuple[int, str, int | None, bool]] = []  # (tag, vr, row index, multi)
        self._from_header: list[tuple[RequestKey, Matcher | SequenceMatch | None]] = []
        self._lowest = self.level  # the highest level (lowest index) joined
        self._fixed: list[tuple[int, str, str]] = [
            (QUERY_RETRIEVE_LEVEL, "CS", LEVELS[self.level]),
            (RETRIEVE_AE_TITLE, "AE", options.ae_title)]
        if INSTANCE_AVAILABILITY in keys:
            self._fixed.append((INSTANCE_AVAILABILITY, "CS", "ONLINE"))
        unique = tag_for_keyword(_UNIQUE[self.level])
        keys.setdefault(unique, RequestKey(unique, "UI" if self.level else "LO"))
        for tag in (QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY):
            keys.pop(tag, None)
        self._plan(keys)
        self._header_index = self._header_column() if self._from_header else None

    # -- planning -----------------------------------------------------------

    def _plan(self, keys: dict[int, RequestKey]) -> None:
        matchers = {}
        for key in keys.values():
            tag = int(key.tag)  # a plain int: pydicom's BaseTag compares in Python, slowly
            column = COLUMNS.get(tag)
            if column is None:
                self._from_header.append((key, self._header_matcher(key)))
            elif column.level > self.level:  # no relational queries: returned empty
                self._outputs.append((tag, column.vr, None, False))
            else:
                matchers[tag] = self._matcher(key, column)
                self._outputs.append((tag, column.vr, self._index(column.field), column.multi))
        for date_tag, time_tag in _DATE_TIME_PAIRS:
            combined = DateTimeRange.combine(matchers.get(date_tag), matchers.get(time_tag))
            if combined is not None:
                del matchers[date_tag], matchers[time_tag]
                self._conditions.append(combined.condition(
                    self._use(COLUMNS[date_tag].field), self._use(COLUMNS[time_tag].field)))
        for tag, matcher in matchers.items():
            if matcher is not None:
                self._add_condition(COLUMNS[tag], matcher)

    def _fold(self, vr: str) -> bool:
        return vr == "PN" and self.options.case_insensitive_pn

    def _matcher(self, key: RequestKey, column: Column) -> Matcher | None:
        try:
            return build(column.vr, key.values, self._fold(column.vr) and column.fold is not None)
        except InvalidKey as exc:
            raise QueryError(f"{_name(key.tag)}: {exc}", key.tag) from None

    def _header_matcher(self, key: RequestKey) -> Matcher | SequenceMatch | None:
        if key.vr == "SQ":
            return SequenceMatch(key.item, self._encodings, self.options.case_insensitive_pn)
        try:
            return build(key.vr, key.values, self._fold(key.vr))
        except InvalidKey as exc:
            raise QueryError(f"{_name(key.tag)}: {exc}", key.tag) from None

    def _add_condition(self, column: Column, matcher: Matcher) -> None:
        field = column.fold if column.fold is not None and self._fold(column.vr) else column.field
        self._use(field)
        if column.multi:
            self._conditions.append(matcher.member_condition(field))
        else:
            self._conditions.append(matcher.condition(field))
        if not matcher.exact:
            self._checks.append((self._index(field), matcher, column.multi))

    def _use(self, field: Field) -> Field:
        """Note that the SELECT must join the level of `field`."""
        self._lowest = min(self._lowest, _MODELS.index(field.model))
        return field

    def _index(self, field: Field) -> int:
        """The position of `field` in the selected row, selecting it if new."""
        self._use(field)
        for index, selected in enumerate(self._fields):
            if selected is field:
                return index
        self._fields.append(field)
        return len(self._fields) - 1

    def _header_column(self) -> int:
        """Select the stored header of one instance of each entity."""
        if self.level == 3:
            return self._index(Instance.header)
        inst, series, study = Instance.alias(), Series.alias(), Study.alias()
        sub = inst.select(inst.header)
        if self.level == 2:
            sub = sub.where(inst.series == Series.id)
        elif self.level == 1:
            sub = sub.join(series, on=(inst.series == series.id)).where(series.study == Study.id)
        else:
            sub = (sub.join(series, on=(inst.series == series.id))
                   .join(study, on=(series.study == study.id)).where(study.patient == Patient.id))
        self._fields.append(sub.limit(1).alias("header"))
        return len(self._fields) - 1

    def select(self) -> ModelSelect:
        query = _MODELS[self.level].select(*self._fields)
        for level in range(self.level - 1, self._lowest - 1, -1):
            query = query.join(_MODELS[level])
        return query.where(*self._conditions) if self._conditions else query

    # -- answering ----------------------------------------------------------

    def responses(self) -> Iterator[Answer]:
        """One answer per matching entity, read from a cursor as they come.

        The driver's rows as they are: the columns are text, integers and bytes
        already, and peewee's per-value conversion would cost more than the query.
        """
        for row in stream(self.select(), raw=True):
            if self._checks and not all(_test(matcher, row[index], multi)
                                        for index, matcher, multi in self._checks):
                continue
            answer = self._answer(row)
            if self._header_index is None or self._header_keys(row[self._header_index], answer):
                yield answer

    def _header_keys(self, blob: bytes | None, answer: Answer) -> bool:
        """Match and add the keys read from the header; False if one does not match."""
        header = parse(blob)
        for key, matcher in self._from_header:
            elem = collect(key, matcher, header)
            if elem is None:
                return False
            answer.stored.append(elem)
            answer.wide = answer.wide or not is_ascii(elem)
        return True

    def _answer(self, row: tuple) -> Answer:
        answer = Answer(self._fixed.copy())
        for tag, vr, index, multi in self._outputs:
            value = None if index is None else row[index]
            if isinstance(value, str):
                answer.wide = answer.wide or not value.isascii()
                value = ([v for v in value.split("\\") if v] if multi else value) or None
            answer.elements.append((tag, vr, value))
        return answer


def _test(matcher: Matcher, value: str, multi: bool) -> bool:
    if multi:
        return any(matcher.test(v) for v in value.split("\\") if v)
    return matcher.test(value)
