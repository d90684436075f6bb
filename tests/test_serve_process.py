"""`pacs serve` as a process: SIGTERM stops it cleanly without losing a store in flight."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs.index.models import Instance
from tests.conftest import (
    dataset_bytes, open_index, run_pacs, staging_files, stored_path, write_config,
)
from tests.dicomgen import make_instance
from tests.reliability.raw import RELEASE_RQ, establish, read_pdu, read_response, store_pdus
from tests.reliability.support import expected_bytes
from tests.test_workers import wait_for

RELEASE_RP = 0x06


def refuses_associations(proc) -> bool:
    ae = AE(ae_title="LATECOMER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title=proc.ae_title)
    if assoc.is_established:
        assoc.release()
    return not assoc.is_established


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_completes_running_stores_and_exits_0(serve_process, workers):
    """The store in flight completes and is indexed, new associations are refused, exit 0.

    A raw sender holds back the last half of the data set until after SIGTERM, so the
    store is surely running (its receive file in staging, its last fragment unsent)."""
    proc = serve_process(network={"workers": workers})
    big, late = make_instance(rows=512, cols=512), make_instance(number=2)
    pdus = store_pdus(str(big.SOPClassUID), str(big.SOPInstanceUID), expected_bytes(big))
    assert len(pdus) > 4
    with establish(proc.port, timeout=60) as sock:
        half = len(pdus) // 2
        sock.sendall(b"".join(pdus[:half]))
        assert wait_for(lambda: staging_files(proc.config)), "the store never started"
        proc.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: refuses_associations(proc)), "accepting associations after SIGTERM"
        assert proc.proc.poll() is None  # waits for the open association
        with open_index(proc.config_path):
            assert not Instance.select().exists()  # still in flight
        sock.sendall(b"".join(pdus[half:]))
        assert read_response(sock).Status == 0
        sock.sendall(b"".join(store_pdus(str(late.SOPClassUID), str(late.SOPInstanceUID),
                                         expected_bytes(late), message_id=2)))
        assert read_response(sock).Status == 0
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == RELEASE_RP

    assert proc.terminate(timeout=20) == 0
    assert "Traceback" not in proc.log_text()
    with open_index(proc.config_path):
        assert {i.sop_uid for i in Instance.select()} == {big.SOPInstanceUID, late.SOPInstanceUID}
    for ds in (big, late):
        assert dataset_bytes(stored_path(proc.config, ds)) == expected_bytes(ds)
    assert staging_files(proc.config) == []
    assert "instances: 2" in run_pacs("stats", config=proc.config_path).stdout


def test_sigterm_when_idle_exits_0(serve_process):
    proc = serve_process()
    started = time.monotonic()
    assert proc.terminate(timeout=20) == 0
    assert time.monotonic() - started < 5


def signal_a_thread_not_main(pid: int, signum: int) -> None:
    """What the kernel may do with a process's signal: give it to any thread that takes it
    (here the oldest after the main one, a server thread that lives as long as the node)."""
    tid = min(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def test_signals_caught_by_another_thread_still_reload_and_stop(serve_process):
    """A blocking wait in the main thread does not see a signal another thread caught."""
    proc = serve_process()
    signal_a_thread_not_main(proc.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: "reloaded remote_aes" in proc.log_text()), proc.log_text()
    signal_a_thread_not_main(proc.proc.pid, signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    assert "stopped" in proc.log_text().splitlines()[-1]


def test_busy_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, port=port)
        result = run_pacs("serve", config=config, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert f"{config}: host/port: cannot listen on 127.0.0.1:{port}" in result.stderr
