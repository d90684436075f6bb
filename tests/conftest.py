"""Shared fixtures: a real node on a free loopback port, real clients.

`node` runs the server in this process (Archive + Node, as `pacs serve` does);
`serve_process` runs `pacs serve` as a subprocess for signal and CLI tests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs.archive import Archive
from pacs.config import load
from pacs.node import Node

DCMTK = Path("/usr/bin")
HAVE_DCMTK = (DCMTK / "storescu").exists()
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, **overrides: object) -> Path:
    """A pacs.yaml in `folder` with the store and index under it; nested dicts merge."""
    config = {
        "ae_title": "MINIPACS",
        "host": "127.0.0.1",
        "port": free_port(),
        "storage": {"root": "data/store", "fsync": False, "min_free_bytes": 0},
        "database": {"url": "sqlite:///data/index.sqlite"},
        "remote_aes": {},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "pacs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class RunningNode:
    """An in-process node and the handles tests need."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.config = load(config_path)
        self.archive = Archive(self.config)
        self.node = Node(self.config, self.archive)
        self.node.start()
        self.port = self.node.port
        self.ae_title = self.config.ae_title

    def stop(self) -> None:
        self.node.stop(grace=5)
        self.archive.close()


@pytest.fixture
def make_node(tmp_path):
    """Factory: make_node(**config overrides) -> RunningNode, stopped at teardown."""
    started = []

    def make(**overrides):
        folder = tmp_path / f"node{len(started)}"
        folder.mkdir()
        running = RunningNode(write_config(folder, **overrides))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def node(make_node):
    return make_node()


def associate(node, contexts=(Verification,), ae_title: str = "TESTSCU", **kwargs):
    """An established pynetdicom association to the node (asserted)."""
    ae = AE(ae_title=ae_title)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, **kwargs)
    assert assoc.is_established
    return assoc


class ServeProcess:
    """`pacs serve` in a subprocess; ready once C-ECHO succeeds."""

    def __init__(self, config_path: Path, extra_env: dict | None = None):
        self.config_path = config_path
        self.config = load(config_path)
        self.port = self.config.port
        self.ae_title = self.config.ae_title
        env = {**os.environ, **(extra_env or {})}
        self.log = open(config_path.parent / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs", "serve", "--config", str(config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        ae = AE(ae_title="READY")
        ae.add_requested_context(Verification)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pacs serve exited {self.proc.returncode}: {self.log_text()}")
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"pacs serve not ready: {self.log_text()}")

    def log_text(self) -> str:
        return (self.config_path.parent / "serve.log").read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve_process(tmp_path):
    """Factory: serve_process(**config overrides) -> ServeProcess, stopped at teardown."""
    started = []

    def start(**overrides):
        folder = tmp_path / f"proc{len(started)}"
        folder.mkdir()
        proc = ServeProcess(write_config(folder, **overrides))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def run_pacs(*args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `pacs` CLI (as `python -m pacs`) and capture its output."""
    cmd = [sys.executable, "-m", "pacs", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


