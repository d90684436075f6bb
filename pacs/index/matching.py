"""PS3.4 C.2.2.2 attribute matching: one key value -> an SQL condition and a Python test.

Each matcher gives both: the condition narrows the rows in the database (and
uses its indexes), the test decides in Python where SQL cannot be exact on
every backend (SQLite's LIKE ignores ASCII case; a LIKE over a "\\a\\b\\"
multi-value column can span two values) and for attributes that are not
columns (read from the stored header). Text compared here is already decoded
to Unicode, so a query in any character set matches values stored in any other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from peewee import SQL, Expression, Field, IntegerField, NodeList, SqliteDatabase

from pacs.index.models import database

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
RANGE_VRS = frozenset({"DA", "DT", "TM"})
NUMBER_VRS = frozenset({"DS", "FD", "FL", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
_LIKE_ESCAPE = "\\"
_UPPER_PAD = "~"  # sorts after digits and "." : "-1015" includes 10:15:59.999


class InvalidKey(ValueError):
    """A key value no matching rule accepts (e.g. letters in an IS key)."""


class Matcher:
    """One query value of one key."""

    exact: bool = True  # False: the SQL condition is a superset, the test decides

    def condition(self, column: Field) -> Expression:
        raise NotImplementedError

    def member_condition(self, column: Field) -> Expression:
        """The condition on a "\\a\\b\\" column: some stored value matches."""
        raise NotImplementedError

    def test(self, value: str) -> bool:
        raise NotImplementedError


def _like(column: Field, pattern: str) -> Expression:
    """`column LIKE pattern ESCAPE '\\'`, spelled out: peewee maps LIKE to GLOB on SQLite."""
    return NodeList((column, SQL("LIKE"), pattern, SQL("ESCAPE"), _LIKE_ESCAPE))


def _literal(text: str) -> str:
    """`text` as a LIKE pattern that matches only itself (% and _ are data here)."""
    return re.sub(r"([\\%_])", r"\\\1", text)


def _member(inner: str) -> str:
    return "%" + _literal("\\") + inner + _literal("\\") + "%"


@dataclass(frozen=True)
class Equals(Matcher):
    """Single value matching (C.2.2.2.1)."""

    value: str

    def condition(self, column: Field) -> Expression:
        return column == self.value

    def member_condition(self, column: Field) -> Expression:
        return _like(column, _member(_literal(self.value)))

    def test(self, value: str) -> bool:
        return value == self.value


@dataclass(frozen=True)
class OneOf(Matcher):
    """List of UID matching (C.2.2.2.2)."""

    values: frozenset[str]

    def condition(self, column: Field) -> Expression:
        return column.in_(sorted(self.values))

    def member_condition(self, column: Field) -> Expression:
        return _any(_like(column, _member(_literal(v))) for v in sorted(self.values))

    def test(self, value: str) -> bool:
        return value in self.values


class Pattern(Matcher):
    """Wild card matching (C.2.2.2.4): `*` any run of characters, `?` one character."""

    exact = False

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._sql_pattern = _literal(pattern).replace("*", "%").replace("?", "_")
        self._regex = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
            re.DOTALL,
        )

    def condition(self, column: Field) -> Expression:
        expression = _like(column, self._sql_pattern)
        prefix = re.split(r"[*?]", self.pattern, maxsplit=1)[0]
        if prefix and isinstance(database.obj, SqliteDatabase):
            # SQLite cannot use a plain index for LIKE (it ignores ASCII case); a
            # binary range on the literal prefix can. Not on PostgreSQL, where a
            # locale collation does not keep every extension of a prefix inside
            # it; there the varchar_pattern_ops indexes (index/schema.py) serve LIKE.
            expression = (column >= prefix) & expression
            if ord(prefix[-1]) < 0x10FFFF:
                expression = (column < prefix[:-1] + chr(ord(prefix[-1]) + 1)) & expression
        return expression

    def member_condition(self, column: Field) -> Expression:
        return _like(column, _member(self._sql_pattern))

    def test(self, value: str) -> bool:
        return self._regex.fullmatch(value) is not None


@dataclass(frozen=True)
class Range(Matcher):
    """Range matching on DA, TM, DT (C.2.2.2.5): `a-b`, `-b`, `a-`; an empty value never matches.

    Values compare as strings: fixed-width DA, and TM/DT whose precision may be
    reduced, so the upper bound is padded to take in its whole last unit.
    """

    low: str
    high: str

    def condition(self, column: Field) -> Expression:
        expression = column != ""
        if self.low:
            expression &= column >= self.low
        if self.high:
            expression &= column <= self.high + _UPPER_PAD
        return expression

    def test(self, value: str) -> bool:
        return bool(value) and (not self.low or value >= self.low) and (
            not self.high or value <= self.high + _UPPER_PAD)


@dataclass(frozen=True)
class NumberEquals(Matcher):
    """Single value matching of a number, whatever its stored spelling ("01", "1.0")."""

    number: float

    def condition(self, column: Field) -> Expression:
        if isinstance(column, IntegerField):
            return column == (int(self.number) if self.number.is_integer() else self.number)
        return column == _spell(self.number)

    def member_condition(self, column: Field) -> Expression:
        return _like(column, _member(_literal(_spell(self.number))))

    def test(self, value: str) -> bool:
        try:
            return float(value) == self.number
        except ValueError:
            return False


@dataclass(frozen=True)
class AnyOf(Matcher):
    """Several values in a non-UID key: an entity matches if any of them matches."""

    parts: tuple[Matcher, ...]

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(part.exact for part in self.parts)

    def condition(self, column: Field) -> Expression:
        return _any(part.condition(column) for part in self.parts)

    def member_condition(self, column: Field) -> Expression:
        return _any(part.member_condition(column) for part in self.parts)

    def test(self, value: str) -> bool:
        return any(part.test(value) for part in self.parts)


class Folded(Matcher):
    """Case-insensitive matching of PN (config `query.case_insensitive_pn`).

    The query value was casefolded when the matcher was built; stored values are
    casefolded in the test, and the caller compares in SQL with a `*_fold` column.
    """

    def __init__(self, inner: Matcher):
        self.inner = inner
        self.exact = inner.exact

    def condition(self, column: Field) -> Expression:
        return self.inner.condition(column)

    def member_condition(self, column: Field) -> Expression:
        return self.inner.member_condition(column)

    def test(self, value: str) -> bool:
        return self.inner.test(value.casefold())


def _any(expressions: Iterable[Expression]) -> Expression:
    result = None
    for expression in expressions:
        result = expression if result is None else (result | expression)
    return result


def _spell(number: float) -> str:
    return str(int(number)) if number.is_integer() else repr(number)


def _normalize(vr: str, value: str) -> str:
    """The stored spelling of a date or time: no ACR-NEMA separators."""
    if vr == "DA":
        return value.replace(".", "")
    if vr == "TM":
        return value.replace(":", "")
    return value


def build(vr: str, values: Sequence[str], fold: bool = False) -> Matcher | None:
    """The matcher for a key's values, or None for universal matching (C.2.2.2.3).

    `fold`: match case-insensitively (PN with `query.case_insensitive_pn`).
    Raises InvalidKey for a value no rule accepts.
    """
    values = [v for v in values if v]
    if vr == "UI":
        values = [v for v in values if v.strip("*")]  # "*" from lenient SCUs: universal
        if not values:
            return None
        return Equals(values[0]) if len(values) == 1 else OneOf(frozenset(values))
    parts = [part for part in (_one(vr, value.casefold() if fold else value) for value in values)
             if part is not None]
    if len(parts) < len(values) or not parts:
        return None  # one universal alternative makes the whole key universal
    matcher = parts[0] if len(parts) == 1 else AnyOf(tuple(parts))
    return Folded(matcher) if fold else matcher


def _one(vr: str, value: str) -> Matcher | None:
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return None if not value.strip("*") else Pattern(value)
    if vr in RANGE_VRS:
        return _range(vr, value)
    if vr in NUMBER_VRS:
        if value.strip("*") == "":
            return None
        try:
            return NumberEquals(float(value))
        except ValueError:
            raise InvalidKey(f"{value[:20]!r} is not a number") from None
    return Equals(value)


def _range(vr: str, value: str) -> Matcher:
    low, dash, high = value.partition("-")
    if dash and vr == "DT" and len(high) == 4 and high.isdigit() and low > high:
        dash = ""  # "20200101120000-0500" is a DT with a UTC offset, not a range
    if not dash:
        return Equals(_normalize(vr, value))
    return Range(_normalize(vr, low.strip()), _normalize(vr, high.strip()))


@dataclass(frozen=True)
class DateTimeRange:
    """Combined date and time range matching (C.2.2.2.5.4) of a DA key and its TM key.

    StudyDate "20060705-20060707" with StudyTime "1000-1800" means from
    2006-07-05 10:00 to 2006-07-07 18:00, not 10:00-18:00 on each of the days.
    """

    low: tuple[str, str] | None
    high: tuple[str, str] | None

    @classmethod
    def combine(cls, date: Matcher | None, time: Matcher | None) -> DateTimeRange | None:
        """The combined range when both keys are ranges of the same form, else None."""
        if not (isinstance(date, Range) and isinstance(time, Range)):
            return None
        if bool(date.low) != bool(time.low) or bool(date.high) != bool(time.high):
            return None
        return cls((date.low, time.low) if date.low else None,
                   (date.high, time.high) if date.high else None)

    def condition(self, date: Field, time: Field) -> Expression:
        """The bounds on `date` alone come first, so an index on the date column serves."""
        expression = date != ""
        if self.low:
            day, moment = self.low
            expression &= (date >= day) & ((date > day) | (time >= moment))
        if self.high:
            day, moment = self.high
            expression &= (date <= day) & ((date < day) | (time <= moment + _UPPER_PAD))
        return expression
