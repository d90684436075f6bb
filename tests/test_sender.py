"""Sub-operation planning and file handling of the sender, without a network."""
from __future__ import annotations

import os

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pacs.index.selection import Match
from pacs.scu import Proposal
from pacs.sender import choose_context, dataset_offset, plan
from tests.dicomgen import make_instance, write

CT = "1.2.840.10008.5.1.4.1.1.2"


def match(number: int, sop_class: str = CT, syntax: str = ExplicitVRLittleEndian) -> Match:
    return Match(f"1.2.3.{number}", sop_class, syntax, f"x/{number}.dcm", 100)


def test_plan_proposes_stored_syntaxes_alone_plus_an_uncompressed_fallback():
    (proposals, items), = plan([match(1, syntax=RLELossless), match(2)])
    assert proposals == [Proposal(CT, (RLELossless,)), Proposal(CT, (ExplicitVRLittleEndian,)),
                         Proposal(CT, (ImplicitVRLittleEndian,))]
    assert [m.sop_uid for m in items] == ["1.2.3.1", "1.2.3.2"]


def test_plan_splits_over_128_contexts_by_sop_class_keeping_order():
    matches = [match(n, sop_class=f"1.2.840.10008.5.1.4.1.1.{n % 70}") for n in range(140)]
    batches = plan(matches)
    assert len(batches) == 2 and all(len(p) <= 128 for p, _ in batches)
    for proposals, items in batches:
        assert {m.sop_class_uid for m in items} == {p.sop_class for p in proposals}
        assert items == sorted(items, key=matches.index)
    assert sum(len(items) for _, items in batches) == 140


def test_choose_context_prefers_the_stored_syntax_then_uncompressed():
    jpeg = match(1, syntax="1.2.840.10008.1.2.4.70")
    assert choose_context({(CT, jpeg.transfer_syntax): 1, (CT, ExplicitVRLittleEndian): 3}, jpeg) == (
        1, jpeg.transfer_syntax)
    assert choose_context({(CT, ImplicitVRLittleEndian): 5}, jpeg) == (5, ImplicitVRLittleEndian)
    assert choose_context({(CT, RLELossless): 7}, jpeg) is None


def test_dataset_offset_with_and_without_the_meta_group_length(tmp_path):
    path = write(make_instance(), tmp_path / "a.dcm")
    raw = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    offset = dataset_offset(fd)
    os.close(fd)
    assert raw[offset:offset + 2] == b"\x08\x00"  # the data set's first element is in group 0008
    stripped = tmp_path / "b.dcm"  # (0002,0000) is Type 1, but some writers leave it out
    stripped.write_bytes(raw[:132] + raw[144:])
    fd = os.open(stripped, os.O_RDONLY)
    assert dataset_offset(fd) == offset - 12
    os.close(fd)
