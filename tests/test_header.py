"""The hand-written header reader (`header._scan`) reads what pydicom reads, or declines.

Every C-STORE goes through it, so the protocol tests use it too; here each
kind of encoding it takes is compared with pydicom's reading of the same
bytes, element by element, and the ones it must leave to pydicom are named.
"""
from __future__ import annotations

import io

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, JPEGBaseline8Bit,
)

from pacs.header import HEAD_BYTES, _parse_head, _scan
from pacs.index.models import Instance, Series, Study
from tests.conftest import send_datasets
from tests.dicomgen import make_instance, uid


def with_sequences(ds: Dataset, undefined: bool) -> Dataset:
    """Two levels of sequences, private elements among them, lengths (un)defined."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D1100", "SRT", "Head"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = uid("referenced", ds.SOPInstanceUID)
    item.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.add_new(0x00091010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091011, "SQ", Sequence([Dataset()]))
    ds.add_new(0x00091012, "UN", b"\x01\x02\x03\x04")
    for element in (ds["ReferencedImageSequence"], item["AnatomicRegionSequence"],
                    ds[0x00091011]):
        element.is_undefined_length = undefined
        for each in element.value:
            each.is_undefined_length_sequence_item = undefined
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=syntax != ExplicitVRBigEndian, enforce_file_format=True)
    return out.getvalue()


def both(data: bytes):
    head = data[:HEAD_BYTES]
    return _scan(head, len(data)), _parse_head(head, len(data))


def assert_same(data: bytes) -> Dataset:
    scanned, parsed = both(data)
    assert scanned is not None and parsed is not None
    (ours, end), (theirs, their_end) = scanned, parsed
    assert end == their_end
    assert list(ours.keys()) == list(theirs.keys())
    for tag in theirs.keys():
        assert (ours[tag].VR, ours[tag].value) == (theirs[tag].VR, theirs[tag].value), tag
    assert [(e.tag, e.value) for e in ours.file_meta] == [(e.tag, e.value)
                                                        for e in theirs.file_meta]
    return ours


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("sequences", [None, "defined", "undefined"])
@pytest.mark.parametrize("charset", [None, "ISO_IR 192", "ISO_IR 100"])
def test_read_as_pydicom_reads_it(syntax, sequences, charset):
    ds = make_instance(patient_name="Müller^Jörg" if charset else "DOE^JOHN", charset=charset)
    if sequences:
        with_sequences(ds, undefined=sequences == "undefined")
    ours = assert_same(encode(ds, syntax))
    assert str(ours.PatientName) == str(ds.PatientName)
    if sequences:
        region = ours.ReferencedImageSequence[0].AnatomicRegionSequence[0]
        assert (len(ours.ReferencedImageSequence), region.CodeMeaning) == (2, "Head")


def test_encapsulated_pixel_data_is_where_reading_stops():
    ds = make_instance()
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd" \
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    data = encode(ds, JPEGBaseline8Bit)
    ours = assert_same(data)
    assert "PixelData" not in ours


@pytest.mark.parametrize("case", ["big endian", "deflated", "no preamble", "longer than the head",
                                  "cut in an element", "undefined length UN"])
def test_left_to_pydicom(case):
    ds = make_instance()
    if case == "big endian":
        data = encode(ds, ExplicitVRBigEndian)
    elif case == "deflated":
        data = encode(ds, DeflatedExplicitVRLittleEndian)
    elif case == "no preamble":
        data = encode(ds)[128:]
    elif case == "longer than the head":
        ds.add_new(0x00091010, "LO", "PRIVATE CREATOR")
        ds.add_new(0x00091011, "OB", b"\0" * HEAD_BYTES)
        data = encode(ds)
    elif case == "cut in an element":
        data = encode(ds)
        data = data[:data.index(b"TEST STUDY") + 4]
    else:
        ds.add_new(0x00091010, "LO", "PRIVATE CREATOR")
        ds.add_new(0x00091011, "UN", b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\0\0\0\0")
        ds[0x00091011].is_undefined_length = True
        data = encode(ds)
    assert both(data)[0] is None


def test_stored_through_the_protocol_with_nested_sequences(node):
    """Implicit VR, undefined lengths: the index has the values, the header blob its items."""
    datasets = [with_sequences(make_instance(number=n, charset="ISO_IR 192",
                                             patient_name="Müller^Jörg"), undefined=True)
                for n in (1, 2)]
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert [s.Status for s in send_datasets(node, datasets)] == [0, 0]
    assert Study.get().patient.patient_name == "Müller^Jörg"
    assert Series.get().num_instances == 2
    rows = {i.sop_uid: i for i in Instance.select()}
    assert set(rows) == {ds.SOPInstanceUID for ds in datasets}
    assert all(row.transfer_syntax == ImplicitVRLittleEndian for row in rows.values())
