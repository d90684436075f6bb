"""One C-FIND match: its elements, as a pydicom Dataset or encoded straight to bytes.

Building a Dataset and encoding it with pydicom costs ~0.25 ms for a dozen
keys, ten times what the SELECT costs per row; for the plain text and numbers
of index columns the bytes are simple to write by hand (PS3.5 7.1), so a
response in Little Endian is encoded here, and only elements read from the
stored header (sequences, any VR) go through pydicom.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from pacs.index.keys import SPECIFIC_CHARACTER_SET

UTF8 = "ISO_IR 192"
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                              "UT", "UV"})
Value = str | list[str] | int | None


@dataclass
class Answer:
    """The response identifier of one matching entity."""

    elements: list[tuple[int, str, Value]] = field(default_factory=list)  # (tag, VR, value)
    stored: list[DataElement] = field(default_factory=list)  # decoded from the stored header
    wide: bool = False  # some text is not ASCII: the response is UTF-8, and says so

    def dataset(self) -> Dataset:
        ds = Dataset()
        for tag, vr, value in self._all():
            ds.add(DataElement(tag, vr, value))
        for elem in self.stored:
            ds.add(elem)
        return ds

    def encode(self, implicit_vr: bool) -> bytes:
        """The identifier in Implicit or Explicit VR Little Endian."""
        codec = "utf-8" if self.wide else "ascii"
        parts = [(tag, _element(tag, vr, _value(vr, value, codec), implicit_vr))
                 for tag, vr, value in self._all()]
        for elem in self.stored:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit_vr
            write_data_element(fp, elem, ["utf_8"] if self.wide else None)
            parts.append((int(elem.tag), fp.getvalue()))
        parts.sort(key=lambda part: part[0])
        return b"".join(raw for _, raw in parts)

    def _all(self) -> list[tuple[int, str, Value]]:
        if self.wide:
            return [(SPECIFIC_CHARACTER_SET, "CS", UTF8), *self.elements]
        return self.elements


def _value(vr: str, value: Value, codec: str) -> bytes:
    if value is None or value == []:
        return b""
    if vr == "US":
        return struct.pack("<H", value)
    text = "\\".join(value) if isinstance(value, list) else str(value)
    raw = text.encode(codec)
    return raw + (b"\0" if vr == "UI" else b" ") if len(raw) % 2 else raw


def _element(tag: int, vr: str, raw: bytes, implicit_vr: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit_vr:
        return struct.pack("<HHI", group, element, len(raw)) + raw
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(raw)) + raw
    return struct.pack("<HH2sH", group, element, vr.encode(), len(raw)) + raw
