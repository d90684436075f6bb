"""Read what the index needs from a received Part 10 file, never the pixel data.

The header is parsed up to the first bulk element (Pixel Data and friends, or
any value over BULK_LIMIT bytes), so a 1 GB multi-frame costs the same as a
thumbnail. The bytes read are kept as the instance's compact attributes, so a
later C-FIND can return any key without opening the file.
"""
from __future__ import annotations

import functools
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import (
    CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32, TEXT_VR_DELIMS,
)
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

BULK_LIMIT = 1 << 20
HEAD_BYTES = 64 * 1024  # holds the header of nearly every instance
_PIXEL_GROUP = 0x7FE00000
_UNDEFINED = 0xFFFFFFFF
_SEQ_DELIMITER = 0xFFFEE0DD
_ITEM, _ITEM_DELIMITER = 0xFFFEE000, 0xFFFEE00D
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) encoded Little Endian
_SHORT_VRS = {vr.encode(): vr for vr in EXPLICIT_VR_LENGTH_16}
_LONG_VRS = {vr.encode(): vr for vr in EXPLICIT_VR_LENGTH_32}  # 32-bit length after 2 reserved
_TAG_LENGTH = struct.Struct("<HHI")  # group, element, 32-bit length (Implicit VR, items)
_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW"})
_VALUE_SIZES = {"US": 2, "SS": 2, "US or SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8,
                "UV": 8}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})


class InvalidInstance(ValueError):
    """A dataset the archive must refuse, with the reason for the ErrorComment."""


@dataclass(frozen=True)
class Header:
    """The parsed non-bulk attributes of one instance and their encoded bytes."""

    dataset: Dataset
    blob: bytes
    transfer_syntax: str

    @functools.cached_property
    def values(self) -> "Values":
        """Its index values: one reader (and one character set lookup) per header."""
        return Values(self.dataset)


def _at_bulk(tag: int, vr: str | None, length: int) -> bool:
    # `tag >> 16` is a plain int: BaseTag's own comparisons cost ~1 us per element.
    return tag >> 16 >= _PIXEL_GROUP >> 16 or (length != _UNDEFINED and length > BULK_LIMIT)


def read_header(path: Path) -> Header:
    """Parse a Part 10 file up to its bulk data; raise InvalidInstance if it is not DICOM.

    The header is parsed from the file's first HEAD_BYTES in memory, read with
    one system call: parsing from a file object costs a call per tell/seek of
    pydicom (~70 a header), each a GIL hand-off between the threads of parallel
    associations.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEAD_BYTES, 0)
            parsed = _scan(head, size) or _parse_head(head, size)
            if parsed is None:  # a header longer than `head`, or a broken one: the whole file
                with open(fd, "rb", closefd=False) as fp:
                    parsed = _parse(fp)
            ds, end = parsed
            ts = Values(ds.file_meta).text("TransferSyntaxUID") or ExplicitVRLittleEndian
            if ts == DeflatedExplicitVRLittleEndian:
                blob = encode_header(ds)
            else:
                _check_complete(fd, end, size, ts)
                blob = head[:end] if end <= len(head) else os.pread(fd, end, 0)
        finally:
            os.close(fd)
    except _PARSE_ERRORS as exc:
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk failed, not the data
            raise
        # pydicom's "No tag to read at file position ...": a sequence item cut short.
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    return Header(ds, blob, ts)


# NotImplementedError: an unknown VR
_PARSE_ERRORS = (InvalidDicomError, BytesLengthException, EOFError, ValueError, KeyError,
                 OverflowError, struct.error, NotImplementedError)


def _parse(fp) -> tuple[Dataset, int]:
    """The header dataset (values checked) and the offset where parsing stopped."""
    ds = read_partial(fp, stop_when=_at_bulk)
    _decode_fallible(ds)
    return ds, fp.tell()


def _parse_head(head: bytes, size: int) -> tuple[Dataset, int] | None:
    """The header parsed from the file's first bytes, if that is surely the same as
    parsing the file: the whole file, or a stop at a bulk element whose 12 header
    bytes pydicom peeked at lie within `head`. Else None."""
    try:
        ds, end = _parse(io.BytesIO(head))
    except (*_PARSE_ERRORS, OSError):
        return None
    if len(head) == size:
        return ds, end
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    return None if deflated or end + 12 > len(head) else (ds, end)


def _scan(head: bytes, size: int) -> tuple[Dataset, int] | None:
    """The common file's header read by hand, as `_parse_head` would read it; else None.

    Common: a preamble, and a Little Endian data set (Implicit VR, or Explicit VR
    under any transfer syntax but deflate and big endian) whose top-level
    elements lie within `head`. The result holds the raw elements pydicom's
    `read_partial` makes, four times faster (pydicom's was a fifth of a
    C-STORE's CPU). Anything unusual (a VR we do not know, an undefined length
    that is not a sequence, a header that goes on past `head`) is left to pydicom.
    """
    if head[128:132] != b"DICM":
        return None
    meta = _elements(head, 132, size, implicit=False, meta=True)
    if meta is None:
        return None
    syntax = meta[0].get(0x00020010)
    implicit = _implicit_vr(syntax.value) if syntax else None
    if implicit is None:
        return None  # guessed, big endian, deflated or private: as pydicom reads it
    start = meta[1]
    if start + 6 <= len(head):  # as pydicom: a data set whose first VR says otherwise is not ours
        explicit_vr = 0x40 < head[start + 4] < 0x5B and 0x40 < head[start + 5] < 0x5B
        if explicit_vr == implicit or head[start:start + 2] == b"\0\0":  # or a command set
            return None
    found = _elements(head, start, size, implicit, meta=False)
    if found is None:
        return None
    elements, end = found
    ds = Dataset(elements)
    ds.file_meta = FileMetaDataset(meta[0])
    ds.set_original_encoding(implicit, True, Values(ds).encodings)
    _decode_fallible(ds, elements.values())
    return ds, end


@functools.lru_cache(maxsize=64)
def _implicit_vr(syntax: bytes) -> bool | None:
    """For a Transfer Syntax UID's value: whether its data set is Implicit VR, if it is
    a Little Endian syntax pydicom knows, not deflated; else None."""
    ts = UID(syntax.decode("ascii", "replace").rstrip("\0 "))
    if not ts.is_transfer_syntax or not ts.is_little_endian or ts == DeflatedExplicitVRLittleEndian:
        return None
    return ts.is_implicit_VR


def _elements(head: bytes, pos: int, size: int, implicit: bool,
              meta: bool) -> tuple[dict, int] | None:
    """The top-level raw elements from `pos` to the end of the file meta (`meta`) or to
    the first bulk element, and the offset of the first not taken; None if unsure."""
    elements: dict[int, RawDataElement] = {}
    limit = len(head)
    while pos < limit:
        if meta and head[pos:pos + 2] != b"\x02\x00":  # the data set begins: group 0002 ends
            return elements, pos
        parsed = _element_head(head, pos, implicit)
        if parsed is None:
            return None
        tag, vr, length, width = parsed
        if not meta and _at_bulk(tag, vr, length):
            return (elements, pos) if pos + 12 <= limit else None  # as `_parse_head`
        start = pos + width
        if length == _UNDEFINED:
            # As pydicom: an Implicit VR element the dictionary does not know is a
            # sequence if an item follows.
            vr = vr or _dictionary_vr(tag) or ("SQ" if head[start:start + 4] == _ITEM_TAG
                                               else None)
            if vr != "SQ":
                return None
            end = _skip_items(head, start, implicit)
            if end is None:
                return None
            value, pos = head[start:end - 8], end  # the items, as a defined length holds them
        else:
            pos = start + length
            if pos > limit:
                return None
            value = head[start:pos]
        elements[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, start, implicit, True)
    return (elements, pos) if limit == size else None  # else the header goes on past `head`


def _element_head(head: bytes, pos: int,
                  implicit: bool) -> tuple[int, str | None, int, int] | None:
    """(tag, VR or None, length, header width) of the element at `pos`; None if unsure."""
    if pos + 8 > len(head):
        return None
    if implicit:
        group, element, length = _TAG_LENGTH.unpack_from(head, pos)
        return group << 16 | element, None, length, 8
    group, element, raw_vr, length = _EXPLICIT_SHORT.unpack_from(head, pos)
    tag = group << 16 | element
    if group == 0xFFFE:  # items and delimiters carry no VR
        return tag, None, _TAG_LENGTH.unpack_from(head, pos)[2], 8
    vr = _SHORT_VRS.get(raw_vr)
    if vr is not None:
        return tag, vr, length, 8
    vr = _LONG_VRS.get(raw_vr)
    if vr is None or pos + 12 > len(head):
        return None
    return tag, vr, int.from_bytes(head[pos + 8:pos + 12], "little"), 12


def _skip_items(head: bytes, pos: int, implicit: bool) -> int | None:
    """The offset just past the Sequence Delimitation Item of the undefined-length
    sequence whose first item is at `pos`; None if unsure."""
    while True:
        parsed = _element_head(head, pos, True)
        if parsed is None:
            return None
        tag, _, length, _ = parsed
        if tag == _SEQ_DELIMITER:
            return pos + 8
        if tag != _ITEM:
            return None
        pos += 8
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # the item's elements, up to its Item Delimitation Item
            parsed = _element_head(head, pos, implicit)
            if parsed is None:
                return None
            tag, vr, length, width = parsed
            if tag == _ITEM_DELIMITER:
                pos += 8
                break
            if tag >> 16 == 0xFFFE:
                return None
            if length == _UNDEFINED:
                skipped = _skip_items(head, pos + width, implicit)
                if skipped is None:
                    return None
                pos = skipped
            else:
                pos += width + length


def _decode_fallible(ds: Dataset, raws: Iterable[RawDataElement] | None = None) -> None:
    """Decode every value whose decoding can fail, so a broken one is a parse error here.

    pydicom decodes values lazily, so a broken one would otherwise raise later,
    when the UIDs, the index columns or a C-FIND answer are read. Of its
    conversions only binary numbers (a length that is no multiple of the value's
    size), unknown VRs and sequence items can raise; text is kept or replaced
    as it is, never refused; bytes stay bytes. So text and bytes stay raw here,
    numbers only have their length checked, and just sequences (and anything
    unusual) are decoded: a fraction of decoding everything (`Dataset.walk`).
    `raws`: the data set's raw elements, where the caller has them at hand.
    """
    for raw in ds.elements() if raws is None else raws:
        vr = raw.VR or _dictionary_vr(raw.tag)
        if vr in _TEXT_VRS or vr in _BYTES_VRS:
            continue
        size = _VALUE_SIZES.get(vr)
        if size is not None and isinstance(raw, RawDataElement):
            length = len(raw.value or b"")
            if length % size:  # what pydicom's conversion would raise, without converting
                raise BytesLengthException(
                    f"{raw.tag} {vr}: {length} bytes are not a whole number of {size}-byte values")
            continue
        element = ds[raw.tag]
        if element.VR == "SQ":
            for item in element.value:
                _decode_fallible(item)


def _dictionary_vr(tag: int) -> str | None:
    """An Implicit VR element's VR, where the dictionary knows it."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


# Where the character set resets (PS3.5 6.1.2.5.3): control characters and the
# value delimiter, and in a person name also its group and component delimiters.
_TEXT_DELIMITERS = TEXT_VR_DELIMS | {0x5C}
_PN_DELIMITERS = _TEXT_DELIMITERS | {0x3D, 0x5E}


class Values:
    """The values the index keeps, read as text from one parsed header's raw bytes.

    pydicom would build a DataElement per value (~20 us each, most of ingest's
    CPU); the index needs only the decoded string: one `decode_bytes` of the raw
    bytes in the header's character set, each value stripped of its padding,
    multiple values joined by backslash.
    """

    def __init__(self, ds: Dataset):
        self._ds = ds
        self._encodings: list[str] | None = None

    def text(self, keyword: str, limit: int = 324) -> str:
        """An attribute as decoded text, multiple values joined by backslash ("" if absent)."""
        tag, vr = _tag(keyword)
        element = self._ds.get_item(tag)
        if element is None:
            return ""
        if not isinstance(element, RawDataElement):  # decoded already
            value = element.value
            if isinstance(value, (list, MultiValue)):
                return "\\".join(str(v) for v in value).strip()[:limit]
            return ("" if value is None else str(value)).strip()[:limit]
        raw = element.value or b""
        if vr == "PN":  # empty trailing component groups dropped, as pydicom does
            values = [value.strip(" \0").rstrip("=") for value in
                      decode_bytes(raw, self.encodings, _PN_DELIMITERS).split("\\")]
        elif vr in CUSTOMIZABLE_CHARSET_VR:
            values = [value.strip(" \0") for value in
                      decode_bytes(raw, self.encodings, _TEXT_DELIMITERS).split("\\")]
        else:  # the default repertoire; stray bytes kept as Latin-1, as pydicom does
            values = [value.strip(" \0") for value in raw.decode("latin-1").split("\\")]
        return "\\".join(values).strip()[:limit]

    def integer(self, keyword: str) -> int | None:
        """An IS or US attribute's first value as an int (None if absent or not a number)."""
        tag, vr = _tag(keyword)
        element = self._ds.get_item(tag)
        if vr == "US" and isinstance(element, RawDataElement):
            raw = element.value or b""
            order = "little" if element.is_little_endian else "big"
            return int.from_bytes(raw[:2], order) if len(raw) >= 2 else None
        try:
            return int(self.text(keyword).split("\\")[0])
        except ValueError:
            return None

    @property
    def encodings(self) -> list[str]:
        """Python codecs for the header's Specific Character Set (0008,0005)."""
        if self._encodings is None:
            self._encodings = list(_codecs(self.text("SpecificCharacterSet")))
        return self._encodings


@functools.lru_cache(maxsize=256)
def _codecs(charset: str) -> tuple[str, ...]:
    """Python codecs for a Specific Character Set value (the same few on every instance)."""
    return tuple(convert_encodings(charset.split("\\")))


@functools.cache
def _tag(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


def _check_complete(fd: int, end: int, size: int, ts: str) -> None:
    """Raise EOFError if the bulk element where parsing stopped runs past the file's end."""
    if end >= size:
        return
    head = os.pread(fd, 12, end)
    if len(head) < 8:
        raise EOFError(f"truncated at byte {end}")
    order = ">" if ts == ExplicitVRBigEndian else "<"
    if ts == ImplicitVRLittleEndian:
        (length,), width = struct.unpack(order + "I", head[4:8]), 8
    elif head[4:6] in _LONG_VRS:
        (length,), width = struct.unpack(order + "I", head[8:12]), 12
    else:
        (length,), width = struct.unpack(order + "H", head[6:8]), 8
    if length == _UNDEFINED:
        group, elem, last = struct.unpack(order + "HHI", os.pread(fd, 8, size - 8))
        if (group << 16 | elem) != _SEQ_DELIMITER or last != 0:
            raise EOFError("truncated: encapsulated pixel data has no sequence delimiter")
    elif end + width + length > size:
        raise EOFError(f"truncated: element at byte {end} needs {length} bytes, file has {size - end - width}")


def encode_header(ds: Dataset) -> bytes:
    """Encode a header-only dataset as Explicit VR Little Endian Part 10 bytes."""
    out = io.BytesIO()
    meta = ds.file_meta.copy() if hasattr(ds, "file_meta") else None
    copy = Dataset(ds)
    if meta is not None:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        copy.file_meta = meta
    dcmwrite(out, copy, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return out.getvalue()


def parse_blob(blob: bytes) -> Dataset:
    """Decode the compact attributes stored by :func:`read_header`."""
    return read_partial(io.BytesIO(blob), stop_when=_at_bulk)


def check_uid(name: str, value: object) -> str:
    """Return a valid UID (PS3.5 9.1) or raise InvalidInstance naming the attribute."""
    text = "" if value is None else str(value).rstrip("\x00 ")
    if not text:
        raise InvalidInstance(f"{name} is missing")
    if not UID(text).is_valid:
        # The problem first: the ErrorComment (LO) keeps only 64 characters.
        shown = text if len(text) <= 80 and text.isprintable() else repr(text[:80])
        raise InvalidInstance(f"{name} is not a valid UID (PS3.5 9.1): {shown}")
    return text


def check_identity(values: Values, affected_sop_instance: str | None) -> tuple[str, str, str, str]:
    """Validate the four UIDs an instance is filed under; return them.

    The SOP Instance UID must also equal the request's Affected SOP Instance UID,
    else the file would be indexed under a UID the sender never announced.
    """
    sop_instance = check_uid("SOPInstanceUID (0008,0018)", values.text("SOPInstanceUID"))
    sop_class = check_uid("SOPClassUID (0008,0016)", values.text("SOPClassUID"))
    study = check_uid("StudyInstanceUID (0020,000D)", values.text("StudyInstanceUID"))
    series = check_uid("SeriesInstanceUID (0020,000E)", values.text("SeriesInstanceUID"))
    if affected_sop_instance is not None and sop_instance != affected_sop_instance.rstrip("\x00 "):
        raise InvalidInstance(
            f"SOPInstanceUID does not match the Affected SOP Instance UID: "
            f"data set {sop_instance}, request {affected_sop_instance}"
        )
    return sop_instance, sop_class, study, series
