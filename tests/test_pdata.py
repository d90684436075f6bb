"""The hand-written DIMSE framing and command sets, checked against the standard's layout."""
from __future__ import annotations

import os
import socket
import struct
import threading
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset

from pacs.pdata import FileRegion, PDataWriter, parse_command, store_command


def deframe(raw: bytes) -> tuple[bytes, bytes, int, int]:
    """Command bytes, data bytes, number of last fragments and the largest PDU (PS3.8 9.3.5)."""
    parts = {0: [], 1: []}
    pos, lasts, largest = 0, 0, 0
    while pos < len(raw):
        kind, _, length = struct.unpack_from(">BBI", raw, pos)
        assert kind == 0x04
        body = raw[pos + 6:pos + 6 + length]
        item_length, context_id, flags = struct.unpack_from(">IBB", body)
        assert item_length + 4 == len(body) and context_id == 3
        parts[flags & 1].append(body[6:])
        lasts += bool(flags & 2)
        largest = max(largest, length)
        pos += 6 + length
    return b"".join(parts[1]), b"".join(parts[0]), lasts, largest


@pytest.mark.parametrize("max_pdu", [16384, 4096, 100, 0])
@pytest.mark.parametrize("size", [0, 1, 94, 95, 16378, 16379, 3_000_000])
def test_messages_are_framed_within_the_peer_limit(tmp_path, max_pdu, size):
    payload = os.urandom(size)
    path = tmp_path / "file.bin"
    path.write_bytes(b"HEAD" + payload)
    ours, theirs = socket.socketpair()
    received = bytearray()
    reader = threading.Thread(target=lambda: [received.extend(c) for c in iter(
        lambda: theirs.recv(1 << 20), b"")], daemon=True)
    reader.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        writer = PDataWriter(ours, max_pdu)
        writer.send(3, b"CMD1", FileRegion(fd, 4, size))
        writer.send(3, b"CMD2", payload)
    finally:
        os.close(fd)
        ours.close()
    reader.join(10)
    command, data, lasts, largest = deframe(bytes(received))
    assert command == b"CMD1CMD2" and data == payload * 2
    assert lasts == 4
    assert max_pdu == 0 or largest <= max_pdu


def test_store_command_matches_pydicom_decoding():
    raw = store_command(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", ("MOVESCU", 9))
    ds = read_dataset(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageID, ds.AffectedSOPInstanceUID) == (1, 7, "1.2.3")
    assert ds.MoveOriginatorApplicationEntityTitle == "MOVESCU" and ds.MoveOriginatorMessageID == 9
    assert ds.CommandDataSetType != 0x0101
    assert parse_command(raw).us(0x0110) == 7
