"""Group commit: many threads hand in work, whoever holds the lead commits it all.

Each C-STORE waits for its own index row to be committed before it answers
success, but rows that arrive while a commit is running are gathered and
committed together by the next leader, so N parallel associations cost one
transaction (one WAL fsync) per batch, not one per instance. A lone
association commits on its own thread: no hand-off to a committer thread.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class GroupCommitter(Generic[T, R]):
    """`commit(item)` returns once `commit_batch` has run on a batch holding it, with
    what `commit_batch` returned for it (one result per item, in order)."""

    def __init__(self, commit_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 500):
        self._commit_batch = commit_batch
        self._max_batch = max_batch
        self._pending: list[tuple[T, Future]] = []
        self._pending_lock = threading.Lock()
        self._lead = threading.Lock()

    def commit(self, item: T) -> R:
        """Commit one item, possibly together with others; its result, or its failure."""
        future: Future = Future()
        with self._pending_lock:
            self._pending.append((item, future))
        while not future.done():
            with self._lead:
                if future.done():
                    break
                with self._pending_lock:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                self._run(batch)
        return future.result()

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        try:
            results = self._commit_batch([item for item, _ in batch])
        except Exception as exc:  # isolate the bad item so the others still land
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch commit of %d failed (%s); retrying one by one", len(batch), exc)
            for entry in batch:
                self._run([entry])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
