"""Micro-batching: requests that arrive together share one model call and one search.

Embedding one query costs nearly as much as embedding eight (the weights are read once per
call), and an exact search of a batch reads the gallery matrix once for all its queries, so
a server that answers concurrent requests one at a time wastes most of its time. A
:class:`MicroBatcher` runs one worker thread: it takes every job waiting in the queue (up to
``max_batch``), and when other requests are known to be on their way (they announced
themselves with :meth:`MicroBatcher.expecting` while they decode their image) it waits for
them at most ``max_wait`` seconds. A lone request therefore never waits: batches form from
the requests that queue up while the worker is busy, plus the stragglers of a bounded wait.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("cirkit")


class Closed(RuntimeError):
    """The batcher was closed before the job ran."""


class Ticket:
    """An announced job (see :meth:`MicroBatcher.expecting`)."""

    queued = False


class MicroBatcher:
    """One worker thread calling ``fn(jobs) -> results`` on batches of submitted jobs.

    ``fn`` returns one result per job, in order; a result that is an exception is raised in
    the submitting thread (one bad job does not fail the others). An exception raised by
    ``fn`` itself fails every job of that batch. ``stats`` counts batches and jobs.
    """

    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 32, max_wait: float = 0.005,
                 name: str = "cirkit-batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), max(0.0, float(max_wait))
        self._queue: deque[tuple[Any, Future, float]] = deque()
        self._cv = threading.Condition()
        self._expected = 0
        self._closed = False
        self.stats = {"batches": 0, "jobs": 0, "largest": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def expecting(self) -> Iterator[Ticket]:
        """Announce a job that is being prepared, so a forming batch may wait for it (bounded).

        Pass the ticket to :meth:`put`: the job then stops being expected in the same step as it
        is queued, so the worker never waits for a job that is already in its queue.
        """
        ticket = Ticket()
        with self._cv:
            self._expected += 1
        try:
            yield ticket
        finally:
            with self._cv:
                if not ticket.queued:
                    self._expected -= 1
                    self._cv.notify_all()

    def put(self, job: Any, ticket: Ticket | None = None) -> Future:
        """Queue ``job`` (announced with ``ticket``, if any); the future gives its result or error."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down")
            self._queue.append((job, fut, time.perf_counter()))
            if ticket is not None and not ticket.queued:
                ticket.queued = True
                self._expected -= 1
            self._cv.notify_all()
        return fut

    def submit(self, job: Any) -> Any:
        """Queue ``job`` and wait for its result."""
        return self.put(job).result()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued jobs are done."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _take(self) -> list[tuple[Any, Future, float]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = time.perf_counter() + self.max_wait
            # Wait (bounded) only for requests that are already being prepared: a lone request
            # is answered at once, and a batch never waits for traffic that may not come.
            while len(self._queue) < self.max_batch and self._expected > 0 and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            jobs = [j for j, _, _ in batch]
            started = time.perf_counter()
            for job, _, queued in batch:
                if hasattr(job, "queued_s"):
                    job.queued_s = started - queued
            try:
                results = list(self.fn(jobs))
                if len(results) != len(jobs):
                    raise RuntimeError(f"batch function gave {len(results)} results for {len(jobs)} jobs")
            except BaseException as e:  # handed to every waiting request
                log.debug("batch of %d failed: %r", len(jobs), e)
                results = [e] * len(jobs)
            self.stats["batches"] += 1
            self.stats["jobs"] += len(jobs)
            self.stats["largest"] = max(self.stats["largest"], len(jobs))
            for (_, fut, _), res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
