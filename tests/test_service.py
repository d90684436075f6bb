"""Running as a system service: the systemd unit, the install script, port 104."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pacs.config import load
from tests.conftest import ServeProcess, send_datasets, stored_path, write_config
from tests.dicomgen import make_instance

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
INSTALL = SCRIPTS / "install.sh"
SETPRIV = Path("/usr/bin/setpriv")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PACS = shutil.which("pacs")  # the console script, so ExecStart names an executable that exists


def install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=60)


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_install_script_parses():
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unit_has_the_promised_settings():
    unit = unit_settings(SCRIPTS / "pacs.service")
    for key, value in {
        "Type": "notify", "User": "pacs", "Restart": "on-failure", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/pacs", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert unit.get(key) == [value], key


def test_install_into_a_root_is_idempotent_and_keeps_the_config(tmp_path):
    prefix = str(Path(PACS).parent.parent) if PACS else "/opt/pacs"
    first = install("--root", str(tmp_path), "--no-venv", "--prefix", prefix)
    assert first.returncode == 0, first.stderr
    config_path = tmp_path / "etc/pacs/pacs.yaml"
    unit_path = tmp_path / "etc/systemd/system/pacs.service"
    assert (tmp_path / "var/lib/pacs/store").is_dir()
    assert oct(config_path.stat().st_mode & 0o777) == "0o640"
    assert oct((tmp_path / "var/lib/pacs").stat().st_mode & 0o777) == "0o750"
    config = load(config_path)
    assert (config.port, str(config.storage.root)) == (11112, "/var/lib/pacs/store")
    assert config.database.url == "sqlite:////var/lib/pacs/index.sqlite"
    assert unit_settings(unit_path)["ExecStart"] == [
        f"{prefix}/bin/pacs serve --config /etc/pacs/pacs.yaml"]

    edited = yaml.safe_load(config_path.read_text())
    edited["port"] = 104
    config_path.write_text(yaml.safe_dump(edited))
    second = install("--root", str(tmp_path), "--no-venv", "--prefix", prefix)
    assert second.returncode == 0, second.stderr
    assert "keeping" in second.stdout
    assert load(config_path).port == 104
    assert not list(tmp_path.rglob("*.??????"))  # no temporary files left behind

    if SYSTEMD_ANALYZE and PACS:
        verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_path)],
                                capture_output=True, text=True, timeout=60)
        # Unknown or misspelt settings are only warnings: no output at all is the pass.
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze not installed")
@pytest.mark.skipif(not PACS, reason="the pacs console script is not on PATH (pip install -e .)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """The repository's unit as is, but for ExecStart pointing at the installed `pacs`."""
    text = (SCRIPTS / "pacs.service").read_text().replace("/opt/pacs/bin/pacs", PACS)
    unit = tmp_path / "pacs.service"
    unit.write_text(text)
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    broken = tmp_path / "broken" / "pacs.service"
    broken.parent.mkdir()
    broken.write_text(text.replace("ProtectHome=", "ProtectHomes="))
    warned = subprocess.run([SYSTEMD_ANALYZE, "verify", str(broken)], capture_output=True,
                            text=True, timeout=60)
    assert "Unknown key" in warned.stderr  # the check above can fail


def test_install_dry_run_changes_nothing(tmp_path):
    result = install("--dry-run", "--prefix", str(tmp_path / "venv"))
    assert result.returncode == 0, result.stderr
    assert "+ write /etc/systemd/system/pacs.service (mode 0644)" in result.stdout
    assert f"+ python3 -m venv {tmp_path / 'venv'}" in result.stdout
    assert not (tmp_path / "venv").exists()


def test_install_rejects_bad_options():
    result = install("--prefix", "relative/path")
    assert result.returncode == 2
    assert "--prefix must be an absolute path" in result.stderr


def port_104_free() -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", 104))
        except OSError:
            return False
    return True


needs_root_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not SETPRIV.exists(),
    reason="needs root and setpriv to run the node with exactly the unit's capabilities")
UNSHARE = Path("/usr/bin/unshare")
SERVICE_UID = 65534  # nobody/nogroup: any user without privileges, as the unit's `pacs`
# In a private mount namespace: bind the interpreter's prefix where the service
# user can reach it (a pyenv under root's 0700 home is out of its reach), then
# become that user with only CAP_NET_BIND_SERVICE, as ambient capability, as
# the unit does (User=, AmbientCapabilities=, CapabilityBoundingSet=,
# NoNewPrivileges=). Arguments: prefix, mount point, interpreter, then
# ServeProcess's command, whose own interpreter path is dropped.
AS_SERVICE_USER = (
    'mount --bind "$1" "$2" || exit 1; lib="$2/lib"; python="$3"; shift 4; '
    f'exec {SETPRIV} --reuid={SERVICE_UID} --regid={SERVICE_UID} --clear-groups --no-new-privs '
    '--inh-caps=+net_bind_service --ambient-caps=+net_bind_service '
    '--bounding-set=-all,+net_bind_service -- env LD_LIBRARY_PATH="$lib" "$python" "$@"')


@needs_root_setpriv
@pytest.mark.skipif(not UNSHARE.exists(), reason="needs unshare (util-linux)")
@pytest.mark.skipif(sys.prefix != sys.base_prefix, reason="the interpreter must not be a venv's")
@pytest.mark.skipif(not port_104_free(), reason="port 104 is in use")
def test_port_104_as_the_unit_runs_it():
    """A user without privileges and the ambient CAP_NET_BIND_SERVICE listens on port 104,
    answers C-ECHO and stores into a folder of its own."""
    folder = Path(tempfile.mkdtemp(prefix="pacs-service-", dir="/tmp"))  # tmp_path is 0700
    try:
        os.chown(folder, SERVICE_UID, SERVICE_UID)
        mount_point = folder / "python"
        mount_point.mkdir()
        interpreter = mount_point / Path(sys.executable).relative_to(sys.prefix)
        prefix = (str(UNSHARE), "--mount", "--", "sh", "-c", AS_SERVICE_USER, "sh", sys.prefix,
                  str(mount_point), str(interpreter))
        proc = ServeProcess(write_config(folder, port=104), prefix=prefix)
        try:
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            assert f"Uid:\t{SERVICE_UID}\t{SERVICE_UID}\t" in status
            for line in ("CapEff", "CapAmb", "CapBnd"):  # CAP_NET_BIND_SERVICE (10) alone
                assert f"{line}:\t0000000000000400" in status, status
            ds = make_instance()
            assert [s.Status for s in send_datasets(proc, [ds], ae_title="WS1")] == [0]
            assert stored_path(proc.config, ds).stat().st_uid == SERVICE_UID
            assert proc.terminate() == 0
        finally:
            proc.kill()
    finally:
        shutil.rmtree(folder)


@needs_root_setpriv
def test_port_104_without_the_capability_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, port=104)
    result = subprocess.run(
        [str(SETPRIV), "--bounding-set=-net_bind_service", "--", sys.executable, "-m", "pacs",
         "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pacs: {config}: host/port: cannot listen on 127.0.0.1:104: Permission denied"]
