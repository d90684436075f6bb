"""Several worker processes behind one listening port, for more than one core.

pynetdicom runs every association as Python threads in one process, so one
process never uses more than one core (the GIL): parallel modalities would
queue behind each other. `pacs serve` with `network.workers` > 1 therefore
runs a supervisor that owns the listening sockets (plain and TLS), accepts each
connection and hands the socket (SCM_RIGHTS) to the worker with the fewest open
associations, tagged plain or TLS: the worker does the TLS handshake, so the
supervisor never holds a key or spends CPU on cryptography;
each worker is a full node (archive, index connection, all services).
Workers report each closed association back over the same channel. A worker
that dies is restarted. On SIGHUP the supervisor checks the config file and,
if it loads, passes the signal on to every worker (`pacs.live`); a worker
started later reads the file as it is then. dcmqrscp forks per association and
Orthanc runs a thread pool; this keeps pynetdicom and stays within a few processes.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pacs.config import Config, ConfigError, load
from pacs.endpoints import binding, endpoints
from pacs.sdnotify import notify
from pacs.signals import signal_pipe

log = logging.getLogger(__name__)
CLOSED = b"c"           # worker -> supervisor: one association ended
HANDOFF = b"h"          # supervisor -> worker: here is a connection
HANDOFF_TLS = b"t"      # supervisor -> worker: here is a connection to wrap in TLS
STOP_GRACE_S = 40


def run_in_child(work: Callable[[], int]) -> int:
    """Run `work` in a forked child and return its exit code (the parent stays small)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def worker_count(config: Config) -> int:
    """`network.workers`, where 0 means one per CPU core (at most 4)."""
    wanted = config.network.workers
    return wanted if wanted > 0 else max(1, min(os.cpu_count() or 1, 4))


class _Worker:
    def __init__(self, index: int, config_path: Path, extra_args: list[str]):
        self.index = index
        self.channel, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.active = 0
        # The worker starts with SIGHUP blocked (the mask is inherited) until its
        # handler is in place, so a reload meanwhile is held, not fatal.
        # Only the supervisor talks to systemd: no $NOTIFY_SOCKET for workers.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacs", "serve", "--config", str(config_path),
                 "--worker-fd", str(child.fileno()), *extra_args],
                pass_fds=[child.fileno()], env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.close()
        log.info("worker %d started (pid %d)", index, self.proc.pid)


class _Pool:
    """The workers, their channels in one selector, and how many associations each holds."""

    def __init__(self, count: int, source: Path, extra_args: list[str]):
        self.source = source
        self.extra_args = extra_args
        self.selector = selectors.DefaultSelector()
        self.workers = [self._start(i) for i in range(count)]

    def _start(self, index: int) -> _Worker:
        worker = _Worker(index, self.source, self.extra_args)
        self.selector.register(worker.channel, selectors.EVENT_READ, worker)
        return worker

    def hand_off(self, listener: socket.socket, tag: bytes) -> None:
        """Accept one connection and pass it, tagged, to the worker with the fewest associations."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        with conn:
            for worker in sorted(self.workers, key=lambda w: w.active):
                try:
                    socket.send_fds(worker.channel, [tag], [conn.fileno()])
                except OSError:
                    continue
                worker.active += 1
                return
        log.error("no worker could take a connection; closed it")

    def read_reports(self, worker: _Worker) -> None:
        try:
            data = worker.channel.recv(4096)
        except OSError:
            data = b""
        if data:
            worker.active = max(0, worker.active - data.count(CLOSED))
        else:  # the channel closed: the worker is gone
            worker.proc.wait()
            self.restart(worker)

    def reload(self) -> None:
        """Check the config file, then let every worker reload it (SIGHUP)."""
        try:
            load(self.source)
        except ConfigError as exc:
            log.error("reload failed, the previous config stays in force: %s", exc)
            return
        log.info("reload: passing SIGHUP to %d workers", len(self.workers))
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGHUP)

    def restart_dead(self) -> None:
        for worker in list(self.workers):
            if worker.proc.poll() is not None:
                self.restart(worker)

    def restart(self, worker: _Worker) -> None:
        log.error("worker %d (pid %d) exited with %s; restarting it", worker.index,
                  worker.proc.pid, worker.proc.poll())
        self.selector.unregister(worker.channel)
        worker.channel.close()
        time.sleep(0.5)  # do not spin if it keeps dying
        self.workers[self.workers.index(worker)] = self._start(worker.index)

    def stop(self) -> int:
        """SIGTERM every worker, wait (bounded), kill stragglers; 0 if all stopped cleanly."""
        self.selector.close()
        log.info("stopping %d workers", len(self.workers))
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        codes = []
        for worker in self.workers:
            try:
                codes.append(worker.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.proc.kill()
                codes.append(worker.proc.wait())
            worker.channel.close()
        # A worker stopped by SIGTERM before it installed its handler (at start-up) is a clean stop too.
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1


def supervise(config: Config, count: int, extra_args: list[str]) -> int:
    """Listen, hand connections to `count` workers, stop them all on SIGTERM/SIGINT."""
    assert config.source is not None
    listeners = {}
    for endpoint in endpoints(config):
        with binding(endpoint, config.host):
            listener = socket.create_server((config.host, endpoint.port), backlog=128)
        listener.setblocking(False)
        listeners[listener] = HANDOFF_TLS if endpoint.tls else HANDOFF
    signals, _writer = signal_pipe()
    pool = _Pool(count, config.source, extra_args)
    for listener, tag in listeners.items():
        pool.selector.register(listener, selectors.EVENT_READ, tag)
        log.info("%s listening on %s:%d%s with %d workers", config.ae_title, config.host,
                 listener.getsockname()[1], " (TLS)" if tag == HANDOFF_TLS else "", count)
    pool.selector.register(signals, selectors.EVENT_READ, "signals")
    notify("READY=1")
    stopping = False
    while not stopping:
        received = b""
        for key, _ in pool.selector.select(timeout=1.0):
            if key.data in (HANDOFF, HANDOFF_TLS):
                pool.hand_off(key.fileobj, key.data)
            elif key.data == "signals":
                received = signals.recv(64)
            elif isinstance(key.data, _Worker):
                pool.read_reports(key.data)
        stopping = any(signum != signal.SIGHUP for signum in received)
        if signal.SIGHUP in received and not stopping:
            notify("RELOADING=1")
            pool.reload()
            notify("READY=1")
        pool.restart_dead()
    notify("STOPPING=1")
    for listener in listeners:
        listener.close()
    return pool.stop()
