"""`pacs serve` as a process: SIGTERM stops it cleanly without losing a store in flight."""
from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs.index.models import Instance
from tests.conftest import (
    associate, open_index, run_pacs, staging_files, stored_path, write_config,
)
from tests.dicomgen import make_instance


def refuses_associations(proc) -> bool:
    ae = AE(ae_title="LATECOMER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title=proc.ae_title)
    if assoc.is_established:
        assoc.release()
    return not assoc.is_established


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_completes_running_stores_and_exits_0(serve_process, workers):
    """The store in flight completes and is indexed, new associations are refused, exit 0."""
    proc = serve_process(network={"workers": workers})
    big, late = make_instance(rows=1024, cols=1024), make_instance(number=2)
    assoc = associate(proc, contexts=((CTImageStorage, [ExplicitVRLittleEndian]),))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(assoc.send_c_store, big)
        deadline = time.monotonic() + 5
        while not (staging_files(proc.config) or running.done()) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.proc.send_signal(signal.SIGTERM)
        assert running.result(timeout=30).Status == 0

    deadline = time.monotonic() + 5
    while not refuses_associations(proc):
        assert time.monotonic() < deadline, "still accepting associations after SIGTERM"
        time.sleep(0.05)
    assert proc.proc.poll() is None  # waits for the open association
    assert assoc.send_c_store(late).Status == 0
    assoc.release()

    assert proc.terminate(timeout=20) == 0
    assert "Traceback" not in proc.log_text()
    with open_index(proc.config_path):
        assert {i.sop_uid for i in Instance.select()} == {big.SOPInstanceUID, late.SOPInstanceUID}
    assert all(stored_path(proc.config, ds.SOPInstanceUID).is_file() for ds in (big, late))
    assert staging_files(proc.config) == []
    assert "instances: 2" in run_pacs("stats", config=proc.config_path).stdout


def test_sigterm_when_idle_exits_0(serve_process):
    proc = serve_process()
    started = time.monotonic()
    assert proc.terminate(timeout=20) == 0
    assert time.monotonic() - started < 5


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
