"""SIGHUP reloads `remote_aes` and `security` in `pacs serve`, with one and with two workers."""
from __future__ import annotations

import os
import signal
import socket

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import ServeProcess, write_config
from tests.dicomgen import make_instance
from tests.test_workers import children, wait_for

KNOWN = {"host": "127.0.0.1", "port": 11113}
CALLING_NOT_RECOGNIZED = 3


def connect(proc, ae_title: str):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", proc.port, ae_title=proc.ae_title)


def rejected(proc, ae_title: str) -> bool:
    assoc = connect(proc, ae_title)
    if assoc.is_established:
        assoc.release()
        return False
    rj = assoc.acceptor.primitive
    return assoc.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (
        1, 1, CALLING_NOT_RECOGNIZED)


def accepted_everywhere(proc, ae_title: str, workers: int) -> bool:
    """`workers` associations held open at once: each worker takes one (fewest open first)."""
    held = [connect(proc, ae_title) for _ in range(workers)]
    try:
        return all(a.is_established and a.send_c_echo().Status == 0 for a in held)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def rewrite(proc, **changes: object) -> None:
    data = yaml.safe_load(proc.config_path.read_text())
    data.update(changes)
    proc.config_path.write_text(yaml.safe_dump(data))


def hangup_and_wait(proc, text: str, times: int) -> None:
    """SIGHUP the server; wait until `text` has been logged `times` more times."""
    before = proc.log_text().count(text)
    proc.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: proc.log_text().count(text) >= before + times), proc.log_text()


@pytest.fixture
def locked_server(serve_process):
    """Only READY (the fixture's readiness probe) and OLD may call."""
    def start(workers: int):
        proc = serve_process(network={"workers": workers},
                             security={"allow_unknown_callers": False},
                             remote_aes={"READY": KNOWN, "OLD": KNOWN})
        if workers > 1:
            assert wait_for(lambda: len(children(proc.proc.pid)) == workers)
        return proc
    return start


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_applies_new_rules_and_keeps_running_associations(locked_server, workers):
    proc = locked_server(workers)
    running = connect(proc, "OLD")
    assert running.is_established
    assert rejected(proc, "NEWCOMER")

    rewrite(proc, remote_aes={"READY": KNOWN, "NEWCOMER": {**KNOWN, "permissions": ["echo"]}})
    hangup_and_wait(proc, "reloaded remote_aes (2 AEs) and security", workers)

    assert accepted_everywhere(proc, "NEWCOMER", workers)
    assert rejected(proc, "OLD")
    newcomer = connect(proc, "NEWCOMER")
    refused = newcomer.send_c_store(make_instance())
    assert (refused.Status, refused.ErrorComment) == (0xC124, "not permitted")
    newcomer.release()
    # The association opened under the old rules goes on.
    assert running.send_c_echo().Status == 0
    running.release()

    if workers > 1:  # a worker started after the reload reads the new rules too
        victim = min(children(proc.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: victim not in children(proc.proc.pid)
                        and len(children(proc.proc.pid)) == 2)
        assert wait_for(lambda: accepted_everywhere(proc, "NEWCOMER", workers))
        assert rejected(proc, "OLD") and rejected(proc, "OLD")

    assert proc.terminate() == 0
    assert "Traceback" not in proc.log_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_flips_unknown_callers_and_a_permission(serve_process, workers):
    """`security` itself reloads: new associations follow it, running ones stay up, and
    the next request of a running one follows the new permissions."""
    def rules(allow_unknown: bool, ws_permissions: list[str]) -> dict:
        return {"security": {"allow_unknown_callers": allow_unknown},
                "remote_aes": {"READY": KNOWN, "WS": {**KNOWN, "permissions": ws_permissions}}}

    proc = serve_process(network={"workers": workers}, **rules(False, ["echo"]))
    if workers > 1:
        assert wait_for(lambda: len(children(proc.proc.pid)) == workers)
    assert rejected(proc, "STRANGER")
    ws = connect(proc, "WS")
    assert ws.is_established
    assert ws.send_c_store(make_instance(number=1)).Status == 0xC124

    rewrite(proc, **rules(True, ["echo", "store"]))
    hangup_and_wait(proc, "reloaded remote_aes (2 AEs) and security", workers)
    assert accepted_everywhere(proc, "STRANGER", workers)
    stranger = connect(proc, "STRANGER")
    assert stranger.is_established
    assert ws.send_c_store(make_instance(number=2)).Status == 0

    rewrite(proc, **rules(False, ["echo"]))
    hangup_and_wait(proc, "reloaded remote_aes (2 AEs) and security", workers)
    assert rejected(proc, "STRANGER") and rejected(proc, "STRANGER")
    refused = ws.send_c_store(make_instance(number=3))
    assert (refused.Status, refused.ErrorComment) == (0xC124, "not permitted")
    # Admitted while unknown callers were allowed: it goes on.
    assert stranger.send_c_echo().Status == 0
    assert ws.send_c_echo().Status == 0
    stranger.release()
    ws.release()
    assert proc.terminate() == 0
    assert "Traceback" not in proc.log_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_config_on_reload_keeps_the_old_rules(locked_server, workers):
    proc = locked_server(workers)
    good = proc.config_path.read_text()
    data = yaml.safe_load(good)
    data["remote_aes"]["OLD"]["permissions"] = ["fly"]
    for bad, problem in (("remote_aes: [unclosed\n", "invalid YAML"),
                         (yaml.safe_dump(data), "remote_aes.OLD.permissions: unknown permission")):
        proc.config_path.write_text(bad)
        hangup_and_wait(proc, "reload failed", 1)
        line = [ln for ln in proc.log_text().splitlines() if "reload failed" in ln][-1]
        assert str(proc.config_path) in line and problem in line, line
        assert proc.proc.poll() is None
        assert accepted_everywhere(proc, "OLD", workers)
        assert rejected(proc, "STRANGER")
    # Only the supervisor checks the file when there are workers: one line per failed reload.
    assert proc.log_text().count("reload failed") == 2
    proc.config_path.write_text(good)
    assert proc.terminate() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_notifications(tmp_path, workers):
    """Type=notify: READY=1 once listening, RELOADING=1/READY=1 around a reload, STOPPING=1;
    never from a worker (its READY=1 would come before the reload)."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        config = write_config(tmp_path, network={"workers": workers})
        proc = ServeProcess(config, extra_env={"NOTIFY_SOCKET": address})
        try:
            messages = [listener.recv(256).decode()]
            proc.proc.send_signal(signal.SIGHUP)
            messages += [listener.recv(256).decode(), listener.recv(256).decode()]
            assert proc.terminate() == 0
            messages.append(listener.recv(256).decode())
        finally:
            proc.kill()
    assert messages == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
