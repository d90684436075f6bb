"""Send selected instances as C-STORE sub-operations and count every outcome.

C-MOVE sends over its own sub-associations (`pacs.scu`), C-GET over the
requester's association; both go through `Sender`, so accounting, conversion
and failure rules are the same (PS3.4 C.4.2.3, C.4.3.3).

A file goes out exactly as stored when the destination accepted its transfer
syntax: its bytes after the file meta are streamed, never decoded. Otherwise it
is read whole and re-encoded in an accepted uncompressed syntax, decompressed
first by pydicom's pixel-data plugins when it is compressed (Orthanc transcodes
likewise). An instance no accepted context can carry is counted as failed and
never sent; so is one whose file is gone or that no codec can decode.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs.index.selection import Match
from pacs.pdata import FileRegion
from pacs.scu import MAX_CONTEXTS, ConnectionLost, Proposal, Response

log = logging.getLogger(__name__)

# What a file is converted to when its own syntax was not accepted, in order of preference.
CONVERSION_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNING_STATUSES = {0x0001, 0x0107, 0x0116}  # PS3.7 C.4: the warnings outside 0xBxxx
_META_START = 132  # after the 128-byte preamble and "DICM" (PS3.10 7.1)
_GROUP_LENGTH_UL4 = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, length 4, explicit VR LE


class Channel(Protocol):
    """Where sub-operations go: an association on which this side is the Storage SCU."""

    accepted: Mapping[tuple[str, str], int]  # (SOP class, transfer syntax) -> context ID

    def store(self, context_id: int, sop_class: str, sop_uid: str,
              data: bytes | FileRegion) -> Response:
        """One C-STORE; raises ConnectionLost when the association is gone."""


class CannotSend(Exception):
    """This instance cannot be sent (the association is fine); the message says why."""


@dataclass
class Tally:
    """Sub-operation counts for the C-MOVE/C-GET responses (PS3.4 C.4.2.1.5)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)


def plan(matches: Iterable[Match]) -> list[tuple[list[Proposal], list[Match]]]:
    """Presentation contexts to propose, in batches that fit one association each.

    Per SOP class: one context per stored transfer syntax (so acceptance is
    unambiguous), plus one with the conversion targets not already proposed.
    A SOP class never spans two batches; instances keep their order in a batch.
    """
    matches = list(matches)
    syntaxes: dict[str, dict[str, None]] = {}
    for match in matches:
        syntaxes.setdefault(match.sop_class_uid, {})[match.transfer_syntax] = None
    batch_of: dict[str, int] = {}
    batches: list[list[Proposal]] = [[]]
    for sop_class, stored in syntaxes.items():
        proposals = [Proposal(sop_class, (syntax,)) for syntax in stored]
        fallback = tuple(ts for ts in CONVERSION_TARGETS if ts not in stored)
        if fallback:
            proposals.append(Proposal(sop_class, fallback))
        if len(batches[-1]) + len(proposals) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(proposals)
        batch_of[sop_class] = len(batches) - 1
    return [(proposals, [m for m in matches if batch_of[m.sop_class_uid] == index])
            for index, proposals in enumerate(batches) if proposals]


def choose_context(accepted: Mapping[tuple[str, str], int], match: Match) -> tuple[int, str] | None:
    """The context to send an instance on and the transfer syntax it must go out in."""
    stored = accepted.get((match.sop_class_uid, match.transfer_syntax))
    if stored is not None:
        return stored, match.transfer_syntax
    for syntax in CONVERSION_TARGETS:
        context_id = accepted.get((match.sop_class_uid, syntax))
        if context_id is not None:
            return context_id, syntax
    return None


def dataset_offset(fd: int) -> int:
    """Where a Part 10 file's data set starts, after its preamble and file meta.

    Usually read from the File Meta Information Group Length that follows
    "DICM"; pydicom walks the meta elements when that element is absent.
    """
    head = os.pread(fd, _META_START + 12, 0)
    if head[128:132] == b"DICM" and head[_META_START:_META_START + 8] == _GROUP_LENGTH_UL4:
        return _META_START + 12 + int.from_bytes(head[_META_START + 8:], "little")
    with open(fd, "rb", closefd=False) as fp:
        read_preamble(fp, False)
        read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                     stop_when=lambda tag, vr, length: tag.group != 2)
        return fp.tell()


def encode_as(path: Path, syntax: str) -> bytes:
    """The data set of a file re-encoded in an uncompressed transfer syntax.

    Compressed pixel data is decoded by whichever installed pydicom plugin can
    (pylibjpeg and friends); raises CannotSend when none can.
    """
    target = UID(syntax)
    try:
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds.decompress(generate_instance_uid=False)
        out = DicomBytesIO()
        out.is_implicit_VR, out.is_little_endian = target.is_implicit_VR, target.is_little_endian
        write_dataset(out, ds)
    except (FileNotFoundError, InvalidDicomError):
        raise
    except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
        raise CannotSend(f"cannot convert to {target.name}: {exc}") from None
    return out.getvalue()


def outcome(status: int) -> str:
    """'completed', 'warning' or 'failed' for a C-STORE response status (PS3.4 B.2.3)."""
    if status == 0x0000:
        return "completed"
    if status in _WARNING_STATUSES or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failed"


class Sender:
    """Sends instances over channels; counts, and reports progress after each one."""

    def __init__(self, total: int, locate: Callable[[str], Path],
                 progress: Callable[[Tally], None], cancelled: Callable[[], bool]):
        self.tally = Tally(remaining=total)
        self.cancelled = False
        self.problem = ""  # why sub-operations failed as a whole, for the ErrorComment
        self._locate = locate
        self._progress = progress
        self._is_cancelled = cancelled

    def send(self, channel: Channel, matches: list[Match]) -> bool:
        """Send each instance; False when stopped early (cancel, lost association)."""
        for index, match in enumerate(matches):
            if self._is_cancelled():
                self.cancelled = True
                return False
            try:
                self._count(match, self._send_one(channel, match))
            except ConnectionLost as exc:
                self.fail(matches[index:], f"association lost: {exc}")
                return False
            except CannotSend as exc:
                log.warning("not sent: %s: %s", match.sop_uid, exc)
                self._count(match, "failed")
            except (FileNotFoundError, InvalidDicomError, EOFError) as exc:
                log.error("not sent: %s: its file %s is missing or unreadable (%s); "
                          "`pacs verify` lists such rows", match.sop_uid, match.relpath, exc)
                self._count(match, "failed")
        return True

    def fail(self, matches: list[Match], reason: str) -> None:
        """Count instances that cannot be sent at all (no association, lost association)."""
        log.error("%d sub-operations failed: %s", len(matches), reason)
        self.problem = reason
        for match in matches:
            self._count(match, "failed", report=False)
        self._progress(self.tally)

    def _send_one(self, channel: Channel, match: Match) -> str:
        choice = choose_context(channel.accepted, match)
        if choice is None:
            raise CannotSend(f"the destination accepted {UID(match.sop_class_uid).name} neither in "
                             f"{UID(match.transfer_syntax).name} nor uncompressed")
        context_id, syntax = choice
        path = self._locate(match.relpath)
        if syntax == match.transfer_syntax:
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = dataset_offset(fd)
                region = FileRegion(fd, offset, os.fstat(fd).st_size - offset)
                response = channel.store(context_id, match.sop_class_uid, match.sop_uid, region)
            finally:
                os.close(fd)
        else:
            data = encode_as(path, syntax)
            response = channel.store(context_id, match.sop_class_uid, match.sop_uid, data)
        result = outcome(response.status)
        if result != "completed":
            log.warning("C-STORE of %s answered 0x%04X %s", match.sop_uid, response.status,
                        response.comment)
        return result

    def _count(self, match: Match, result: str, report: bool = True) -> None:
        tally = self.tally
        tally.remaining -= 1
        if result == "completed":
            tally.completed += 1
        elif result == "warning":
            tally.warning += 1
        else:
            tally.failed += 1
            tally.failed_uids.append(match.sop_uid)
        if report:
            self._progress(tally)

