"""Several worker processes behind one listening port, for more than one core.

pynetdicom runs every association as Python threads in one process, so one
process never uses more than one core (the GIL): parallel modalities would
queue behind each other. `pacs serve` with `network.workers` > 1 therefore
runs a supervisor that owns the listening socket, accepts each connection and
hands the socket (SCM_RIGHTS) to the worker with the fewest open associations;
each worker is a full node (archive, index connection, all services).
Workers report each closed association back over the same channel. A worker
that dies is restarted. dcmqrscp forks per association and Orthanc runs a
thread pool; this keeps pynetdicom and stays within a few processes.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from pacs.config import Config

log = logging.getLogger(__name__)
CLOSED = b"c"           # worker -> supervisor: one association ended
HANDOFF = b"h"          # supervisor -> worker: here is a connection
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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs", "serve", "--config", str(config_path),
             "--worker-fd", str(child.fileno()), *extra_args],
            pass_fds=[child.fileno()],
        )
        child.close()
        log.info("worker %d started (pid %d)", index, self.proc.pid)


def supervise(config: Config, count: int, extra_args: list[str]) -> int:
    """Listen, hand connections to `count` workers, stop them all on SIGTERM/SIGINT."""
    assert config.source is not None
    listener = socket.create_server((config.host, config.port), backlog=128)
    listener.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        wake_w.send(b"x")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    workers = [_Worker(i, config.source, extra_args) for i in range(count)]
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    for worker in workers:
        selector.register(worker.channel, selectors.EVENT_READ, worker)
    log.info("%s listening on %s:%d with %d workers", config.ae_title, config.host,
             config.port, count)
    while not stopping.is_set():
        for key, _ in selector.select(timeout=1.0):
            if key.data == "accept":
                _hand_off(listener, workers)
            elif isinstance(key.data, _Worker):
                _read_reports(key.data, selector, workers, config.source, extra_args)
        for worker in list(workers):
            if worker.proc.poll() is not None:
                _restart(worker, selector, workers, config.source, extra_args)
    selector.close()
    listener.close()
    return _stop_workers(workers)


def _hand_off(listener: socket.socket, workers: list[_Worker]) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    with conn:
        for worker in sorted(workers, key=lambda w: w.active):
            try:
                socket.send_fds(worker.channel, [HANDOFF], [conn.fileno()])
            except OSError:
                continue
            worker.active += 1
            return
    log.error("no worker could take a connection; closed it")


def _read_reports(worker: _Worker, selector: selectors.BaseSelector, workers: list[_Worker],
                  source: Path, extra_args: list[str]) -> None:
    try:
        data = worker.channel.recv(4096)
    except OSError:
        data = b""
    if data:
        worker.active = max(0, worker.active - data.count(CLOSED))
    else:
        worker.proc.wait()
        _restart(worker, selector, workers, source, extra_args)


def _restart(worker: _Worker, selector: selectors.BaseSelector, workers: list[_Worker],
             source: Path, extra_args: list[str]) -> None:
    log.error("worker %d (pid %d) exited with %s; restarting it", worker.index,
              worker.proc.pid, worker.proc.poll())
    selector.unregister(worker.channel)
    worker.channel.close()
    time.sleep(0.5)  # do not spin if it keeps dying
    fresh = _Worker(worker.index, source, extra_args)
    workers[workers.index(worker)] = fresh
    selector.register(fresh.channel, selectors.EVENT_READ, fresh)


def _stop_workers(workers: list[_Worker]) -> int:
    log.info("stopping %d workers", len(workers))
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    codes = []
    for worker in workers:
        try:
            codes.append(worker.proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in time; killing it", worker.index)
            worker.proc.kill()
            codes.append(worker.proc.wait())
        worker.channel.close()
    # A worker stopped by SIGTERM before it installed its handler (at start-up) is a clean stop too.
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
