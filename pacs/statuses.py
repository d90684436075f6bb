"""DIMSE status codes we answer with, in one place (PS3.7 Annex C, PS3.4)."""
from __future__ import annotations

from pydicom import Dataset

SUCCESS = 0x0000
# PS3.4 B.2.3 Storage Service Class statuses
OUT_OF_RESOURCES = 0xA700          # Refused: Out of Resources
DATASET_MISMATCH = 0xA900          # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000         # Error: Cannot understand
HANDLER_FAILED = 0xC211            # Error (Cxxx range): pynetdicom's answer when a handler raises
# PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4 Query/Retrieve statuses
PENDING = 0xFF00
PENDING_WARNING = 0xFF01           # Pending: optional keys not supported
CANCEL = 0xFE00                    # Cancel: matching/sub-operations terminated
UNABLE_TO_PROCESS = 0xC001         # Failed: Unable to process (C-FIND/C-MOVE/C-GET)
IDENTIFIER_MISMATCH = 0xA900       # Failed: Identifier does not match SOP Class
MOVE_DESTINATION_UNKNOWN = 0xA801  # Refused: Move Destination unknown
MATCHES_OUT_OF_RESOURCES = 0xA701  # Refused: Out of Resources - unable to calculate number of matches
SUBOPS_OUT_OF_RESOURCES = 0xA702   # Refused: Out of Resources - unable to perform sub-operations
SUBOPS_WARNING = 0xB000            # Warning: sub-operations complete, one or more failures
# PS3.7 C.5 general statuses
NOT_AUTHORIZED = 0x0124            # Refused: Not authorized (N-services; Storage Commitment)
SOP_CLASS_NOT_SUPPORTED = 0x0122   # Refused: SOP Class not supported
# An operation the caller's `remote_aes` permissions exclude (pacs.access).
# PS3.7 lists "Refused: Not authorized" (0124H) for the N-services only; each
# C-service of PS3.4 has the implementation-defined failure range Cxxx (C-STORE
# "Cannot understand", C-FIND/C-MOVE/C-GET "Unable to process"), and C124
# there echoes 0124H. The refused-class codes (A7xx "Out of resources", A801
# "Move destination unknown") would send the caller hunting the wrong problem.
# Orthanc aborts the association instead, which tells the caller nothing.
NOT_PERMITTED = 0xC124
# C-ECHO (PS3.7 9.1.5.1.4) has neither: it refuses with "SOP Class not supported",
# i.e. Verification is not offered to this caller.
ECHO_NOT_PERMITTED = SOP_CLASS_NOT_SUPPORTED
# PS3.7 10.1.4.1.10 N-ACTION statuses, also Failure Reasons in PS3.4 J.3.3.1.1
PROCESSING_FAILURE = 0x0110        # Processing failure
NO_SUCH_OBJECT_INSTANCE = 0x0112   # No such object instance
CLASS_INSTANCE_CONFLICT = 0x0119   # Class-instance conflict
MISSING_ATTRIBUTE = 0x0120         # Missing attribute
NO_SUCH_ACTION = 0x0123            # No such action type

ERROR_COMMENT_MAX = 64             # ErrorComment is LO


def error_comment(text: str) -> str:
    """Text made fit for ErrorComment: an LO value has no backslash and at most 64 chars."""
    return text.replace("\\", "/")[:ERROR_COMMENT_MAX]


def status(code: int, comment: str | None = None) -> Dataset:
    """A status dataset with an ErrorComment that fits its VR."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds
