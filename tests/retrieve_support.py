"""Destinations and data for the retrieve and commitment tests.

`DcmtkStoreSCP` runs /usr/bin/storescp in bit-preserving mode; `RecordingSCP` is a
pynetdicom storage SCP in this process that records what arrives (and can be
told to accept only some transfer syntaxes, to abort, or to go slowly);
`Receiver` is the storage side of a pynetdicom C-GET requester.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyRootGet
from pynetdicom.sop_class import _STORAGE_CLASSES

from tests.conftest import DCMTK, dataset_bytes, free_port, send_datasets, stored_path
from tests.dicomgen import write

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def store(node, datasets: list[Dataset]) -> dict[str, bytes]:
    """C-STORE the datasets into the node; return each one's data set bytes as stored."""
    statuses = send_datasets(node, datasets)
    assert [s.Status for s in statuses] == [0] * len(datasets)
    return {str(ds.SOPInstanceUID): dataset_bytes(stored_path(node.config, ds))
            for ds in datasets}


def fit_bits_stored(ds: Dataset) -> Dataset:
    """Clear the pixel bits above BitsStored (12), which lossless JPEG does not keep."""
    ds.PixelData = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(ds.PixelData))
    return ds


def compress(ds: Dataset, folder: Path, tool: str, *args: str) -> Dataset:
    """The dataset compressed by a DCMTK tool (dcmcrle, dcmcjpeg), read back."""
    plain = write(ds, folder / f"{ds.SOPInstanceUID}.plain.dcm")
    packed = folder / f"{ds.SOPInstanceUID}.{tool}.dcm"
    subprocess.run([str(DCMTK / tool), *args, str(plain), str(packed)], check=True,
                   capture_output=True)
    return dcmread(packed)


def wait_for_echo(port: int, ae_title: str, timeout: float = 10) -> None:
    ae = AE("WAITER")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{ae_title} on port {port} never answered")


class DcmtkStoreSCP:
    """/usr/bin/storescp writing every received file, byte for byte, into `folder`."""

    def __init__(self, folder: Path, ae_title: str = "DEST", *options: str):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"storescp-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", ae_title, "+B", "-od", str(folder), *options,
             str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_echo(self.port, ae_title)

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> data set bytes of every file written so far."""
        out = {}
        for path in self.folder.iterdir():
            out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(path)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class RecordingSCP:
    """A pynetdicom storage SCP that records each C-STORE it gets."""

    def __init__(self, ae_title: str = "DEST", syntaxes: list[str] | None = None,
                 abort_after: int | None = None, delay: float = 0.0, ssl_context=None):
        self.ae_title = ae_title
        self.port = free_port()
        self.received: dict[str, tuple[str, bytes]] = {}  # UID -> (transfer syntax, bytes)
        self.proposals: list[list[tuple[str, tuple[str, ...]]]] = []  # per association
        self._abort_after = abort_after
        self._delay = delay
        self._lock = threading.Lock()
        ae = AE(ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, syntaxes or UNCOMPRESSED)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      ssl_context=ssl_context, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted)])

    def _on_accepted(self, event) -> None:
        with self._lock:
            self.proposals.append([(str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax)))
                                   for cx in event.assoc.requestor.requested_contexts])

    def _on_store(self, event) -> int:
        with self._lock:
            if self._abort_after is not None and len(self.received) >= self._abort_after:
                event.assoc.abort()
                return 0xA700
        time.sleep(self._delay)
        path = Path(event.dataset_path)
        with self._lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] = (
                str(event.context.transfer_syntax), dataset_bytes(path))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


class Receiver:
    """The C-GET requester's storage side: records what comes back over the association."""

    def __init__(self, delay: float = 0.0, answers: dict[str, int] | None = None):
        self.received: dict[str, tuple[str, bytes]] = {}
        self._delay = delay
        self._answers = answers or {}  # SOP Instance UID -> C-STORE status (default Success)
        self._lock = threading.Lock()

    def on_store(self, event) -> int:
        time.sleep(self._delay)
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received[uid] = (str(event.context.transfer_syntax),
                                  dataset_bytes(event.dataset_path))
        return self._answers.get(uid, 0x0000)

    def get(self, node, ident, model=StudyRootGet, syntaxes=None, classes=(CTImageStorage,),
            **kwargs):
        """C-GET proposing `classes` in `syntaxes` with the SCP role for storage."""
        contexts = [(cls, syntaxes or UNCOMPRESSED) for cls in classes]
        roles = [build_role(cls, scp_role=True) for cls in classes]
        return retrieve(node, ident, model, contexts=contexts, ext_neg=roles,
                        evt_handlers=[(evt.EVT_C_STORE, self.on_store)], **kwargs)


def retrieve(node, identifier: Dataset, model, destination: str | None = None,
             cancel_after_pending: int | None = None, **assoc_kwargs):
    """C-MOVE (with a destination) or C-GET through pynetdicom; (pending statuses, final, identifier).

    `cancel_after_pending`: send C-CANCEL once that many pending responses arrived.
    """
    ae = AE("RETRIEVER")
    ae.dimse_timeout = 30
    ae.add_requested_context(model)
    for context in assoc_kwargs.pop("contexts", []):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, **assoc_kwargs)
    assert assoc.is_established
    if destination is not None:
        responses = assoc.send_c_move(identifier, destination, model)
    else:
        responses = assoc.send_c_get(identifier, model)
    pending, final, final_identifier = [], None, None
    try:
        for status, ident in responses:
            if status.Status in (0xFF00, 0xFF01):
                pending.append(status)
                if cancel_after_pending is not None and len(pending) == cancel_after_pending:
                    assoc.send_c_cancel(1, query_model=model)
            else:
                final, final_identifier = status, ident
    finally:
        assoc.release()
    assert final is not None, "no final response"
    return pending, final, final_identifier


def identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


def counts(status: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) sub-operations of a C-MOVE/C-GET response."""
    return (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations,
            status.NumberOfWarningSuboperations)


def failed_uids(identifier: Dataset) -> set[str]:
    """The Failed SOP Instance UID List (a single value decodes as a str)."""
    value = identifier.FailedSOPInstanceUIDList
    return {value} if isinstance(value, str) else set(value)
