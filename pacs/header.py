"""Read what the index needs from a received Part 10 file, never the pixel data.

The header is parsed up to the first bulk element (Pixel Data and friends, or
any value over BULK_LIMIT bytes), so a 1 GB multi-frame costs the same as a
thumbnail. The bytes read are kept as the instance's compact attributes, so a
later C-FIND can return any key without opening the file.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
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
_PIXEL_GROUP = 0x7FE00000
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SEQ_DELIMITER = 0xFFFEE0DD


class InvalidInstance(ValueError):
    """A dataset the archive must refuse, with the reason for the ErrorComment."""


@dataclass(frozen=True)
class Header:
    """The parsed non-bulk attributes of one instance and their encoded bytes."""

    dataset: Dataset
    blob: bytes
    transfer_syntax: str


def _at_bulk(tag: int, vr: str | None, length: int) -> bool:
    # `tag >> 16` is a plain int: BaseTag's own comparisons cost ~1 us per element.
    return tag >> 16 >= _PIXEL_GROUP >> 16 or (length != _UNDEFINED and length > BULK_LIMIT)


def read_header(path: Path) -> Header:
    """Parse a Part 10 file up to its bulk data; raise InvalidInstance if it is not DICOM."""
    try:
        with open(path, "rb") as fp:
            ds = read_partial(fp, stop_when=_at_bulk)
            # pydicom decodes values lazily: make a broken one fail here, as a parse
            # error, rather than later when the UIDs or index columns are read.
            ds.walk(lambda *_: None)
            end = fp.tell()
            ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
            if ts == DeflatedExplicitVRLittleEndian:
                blob = encode_header(ds)
            else:
                _check_complete(fp, end, os.fstat(fp.fileno()).st_size, ts)
                fp.seek(0)
                blob = fp.read(end)
    except (InvalidDicomError, BytesLengthException, EOFError, ValueError, KeyError, OverflowError,
            struct.error, NotImplementedError) as exc:  # NotImplementedError: an unknown VR
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk failed, not the data
            raise
        # pydicom's "No tag to read at file position ...": a sequence item cut short.
        raise InvalidInstance(f"cannot parse the dataset: {exc}") from None
    return Header(ds, blob, ts)


def _check_complete(fp, end: int, size: int, ts: str) -> None:
    """Raise EOFError if the bulk element where parsing stopped runs past the file's end."""
    if end >= size:
        return
    fp.seek(end)
    head = fp.read(12)
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
        fp.seek(size - 8)
        group, elem, last = struct.unpack(order + "HHI", fp.read(8))
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


def check_identity(ds: Dataset, affected_sop_instance: str | None) -> tuple[str, str, str, str]:
    """Validate the four UIDs an instance is filed under; return them.

    The SOP Instance UID must also equal the request's Affected SOP Instance UID,
    else the file would be indexed under a UID the sender never announced.
    """
    sop_instance = check_uid("SOPInstanceUID (0008,0018)", ds.get("SOPInstanceUID"))
    sop_class = check_uid("SOPClassUID (0008,0016)", ds.get("SOPClassUID"))
    study = check_uid("StudyInstanceUID (0020,000D)", ds.get("StudyInstanceUID"))
    series = check_uid("SeriesInstanceUID (0020,000E)", ds.get("SeriesInstanceUID"))
    if affected_sop_instance is not None and sop_instance != affected_sop_instance.rstrip("\x00 "):
        raise InvalidInstance(
            f"SOPInstanceUID does not match the Affected SOP Instance UID: "
            f"data set {sop_instance}, request {affected_sop_instance}"
        )
    return sop_instance, sop_class, study, series
