"""Group commit: many threads hand in work, one thread commits it in batches.

Each C-STORE waits for its own index row to be committed before it answers
success, but rows that arrive while a commit is running are gathered and
committed together, so N parallel associations cost one fsync per batch,
not one per instance.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class GroupCommitter(Generic[T]):
    """Runs `commit(batch)` on a single thread; a failing batch is retried item by item."""

    def __init__(self, commit: Callable[[Sequence[T]], None], max_batch: int = 500,
                 name: str = "group-commit"):
        self._commit = commit
        self._max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue one item; the future completes when it is committed (or failed)."""
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [entry for entry in batch if entry is not _STOP]
            if batch:
                self._commit_batch(batch)

    def _commit_batch(self, batch: list) -> None:
        try:
            self._commit([item for item, _ in batch])
        except Exception as exc:  # isolate the bad item so the others still land
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch commit of %d failed (%s); retrying one by one", len(batch), exc)
            for entry in batch:
                self._commit_batch([entry])
            return
        for _, future in batch:
            future.set_result(None)
