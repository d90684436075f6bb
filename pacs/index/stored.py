"""Keys answered from the stored header of an instance: plain values and sequences.

The index keeps every instance's attributes up to its bulk data (`Instance.header`),
so a key that is not a column can still be matched and returned. Elements come
back decoded to Unicode from whatever character set they were stored in.
"""
from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence

from pacs.header import parse_blob
from pacs.index.keys import RequestKey, as_strings, decode_keys
from pacs.index.matching import Matcher, build

log = logging.getLogger(__name__)


def parse(blob: bytes | None) -> Dataset:
    """The stored header; an empty data set if there is none or it cannot be decoded."""
    try:
        return parse_blob(blob) if blob else Dataset()
    except Exception:  # a damaged header answers like one without the attributes
        log.warning("cannot decode a stored header; its attributes are answered empty")
        return Dataset()


def plain(elem: DataElement) -> DataElement:
    """A stored element with its text decoded to Unicode, ready for a UTF-8 response."""
    if elem.VR == "SQ":
        return DataElement(elem.tag, "SQ", [plain_item(item) for item in elem.value])
    value = elem.value
    if elem.VR == "PN":
        value = [str(v) for v in value] if isinstance(value, list) else (
            None if value is None else str(value))
    return DataElement(elem.tag, elem.VR, value)


def plain_item(item: Dataset) -> Dataset:
    out = Dataset()
    for elem in item:
        out.add(plain(elem))
    return out


def is_ascii(elem: DataElement) -> bool:
    """True if no text in the element (or its items) needs more than ASCII."""
    if elem.VR == "SQ":
        return all(is_ascii(e) for item in elem.value for e in item)
    values = elem.value if isinstance(elem.value, list) else [elem.value]
    return all(v.isascii() for v in values if isinstance(v, str))


class SequenceMatch:
    """Sequence matching (PS3.4 C.2.2.2.6) on a sequence read from the stored header.

    An entity matches when one stored item matches every key of the query item;
    the matching items come back with only the requested attributes. An empty
    query item (or none) asks for the whole sequence.
    """

    def __init__(self, item: Dataset | None, encodings: list[str], fold_pn: bool):
        keys = decode_keys(item, encodings) if item is not None else []
        self._keys = [(key, SequenceMatch(key.item, encodings, fold_pn) if key.vr == "SQ"
                       else build(key.vr, key.values, fold_pn and key.vr == "PN"))
                      for key in keys]
        self.constrained = any(
            matcher.constrained if isinstance(matcher, SequenceMatch) else matcher is not None
            for _, matcher in self._keys)

    def select(self, stored: Sequence | None) -> list[Dataset] | None:
        """The items to return, or None when the entity does not match."""
        if not self._keys:
            return [plain_item(item) for item in stored or []]
        picked = [out for out in (self._pick(item) for item in stored or []) if out is not None]
        return None if self.constrained and not picked else picked

    def _pick(self, item: Dataset) -> Dataset | None:
        out = Dataset()
        for key, matcher in self._keys:
            elem = collect(key, matcher, item)
            if elem is None:
                return None
            out.add(elem)
        return out


def collect(key: RequestKey, matcher: Matcher | SequenceMatch | None,
            stored: Dataset) -> DataElement | None:
    """The element to answer for one key of stored data, or None if the key does not match."""
    try:
        elem = stored[key.tag] if key.tag in stored else None
    except Exception:  # a malformed stored value: as if absent
        elem = None
    if isinstance(matcher, SequenceMatch):
        items = matcher.select(elem.value if elem is not None and elem.VR == "SQ" else None)
        return None if items is None else DataElement(key.tag, "SQ", items)
    if matcher is not None and (elem is None or not any(
            matcher.test(v) for v in as_strings(elem.value))):
        return None
    return plain(elem) if elem is not None else DataElement(key.tag, key.vr, None)
