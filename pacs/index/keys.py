"""The keys of a C-FIND identifier, decoded without pydicom's value conversion.

pydicom converts IS, DS and the like to numbers when an element is read, so a
key such as SeriesNumber "*" or a DA range would raise before matching starts.
Here string values are decoded by hand: text through the identifier's Specific
Character Set (so `Müller` in ISO_IR 100 and in ISO_IR 192 become the same
Unicode string), the rest as ASCII, and split on the backslash.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.values import convert_PN, convert_text

CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
SPECIFIC_CHARACTER_SET = 0x00080005


class UndecodableKey(ValueError):
    """An element of the identifier that cannot be decoded; names the element."""

    def __init__(self, tag: int, message: str):
        super().__init__(message)
        self.tag = tag


@dataclass(frozen=True)
class RequestKey:
    """One key of the identifier: its values (empty: universal) or its sequence item."""

    tag: BaseTag
    vr: str
    values: tuple[str, ...] = ()
    item: Dataset | None = None  # SQ keys: the one query item, None when empty


def element_vr(tag: BaseTag, vr: str | None) -> str:
    """The VR of an element: as encoded, else from the dictionary (implicit VR), else UN."""
    if vr and vr != "UN":
        return vr
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def as_strings(value: object) -> tuple[str, ...]:
    """A converted element value as its non-empty string values."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return ()
    items = value if isinstance(value, (list, tuple, MultiValue)) else (value,)
    return tuple(text for text in (str(v).strip(" \x00") for v in items) if text)


def identifier_encodings(identifier: Dataset) -> list[str]:
    """The Python codecs of the identifier's Specific Character Set (default repertoire if none)."""
    return convert_encodings(identifier.get("SpecificCharacterSet") or None)


def decode_keys(ds: Dataset, encodings: list[str]) -> list[RequestKey]:
    """Every key of an identifier or query item, group 0000/0002 and group lengths left out."""
    keys = []
    for elem in ds.elements():
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag.element == 0 or tag == SPECIFIC_CHARACTER_SET:
            continue
        vr = element_vr(tag, elem.VR)
        try:
            keys.append(_decode(ds, elem, vr, encodings))
        except Exception as exc:  # any decoding problem is the requester's: name the element
            raise UndecodableKey(tag, f"cannot decode key {tag}: {exc}") from None
    return keys


def _decode(ds: Dataset, elem, vr: str, encodings: list[str]) -> RequestKey:
    if vr == "SQ":
        items = ds[elem.tag].value or []
        return RequestKey(elem.tag, vr, item=items[0] if len(items) else None)
    if not isinstance(elem, RawDataElement):
        return RequestKey(elem.tag, vr, as_strings(elem.value))
    raw = elem.value or b""
    if not raw or vr == "UN":
        return RequestKey(elem.tag, vr)
    if vr == "PN":
        values = as_strings(convert_PN(raw, encodings))
    elif vr in CHARSET_VRS:
        values = as_strings(convert_text(raw, encodings, vr))
    elif vr in ASCII_VRS:
        values = as_strings(raw.decode("ascii", "replace").split("\\"))
    else:  # binary numbers (US, FL, ...): pydicom's conversion cannot fail on them
        values = as_strings(ds[elem.tag].value)
    return RequestKey(elem.tag, vr, values)
