"""The batching scheduler: waiting requests whose rows share a model and settings run as one batch.

Every request is split into rows (one image each). The scheduler's loop (one asyncio task) takes the oldest waiting
request's batch key (model, ``Settings``), waits at most ``max_wait_ms`` from that request's arrival for more rows of
the same key (or until ``max_batch`` are waiting), then takes up to ``max_batch`` rows round-robin over the waiting
requests of that key (oldest first, one row each per round: a large ``n`` is split over batches and never starves a
small request), and runs them on one worker thread (the event loop stays free to answer). Requests of other keys wait
their turn in arrival order. The queue is bounded by rows (``QueueFull`` past ``max_queue``); a cancelled request's
waiting rows leave the queue at once; ``drain`` refuses new work and waits for the queue to empty.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from typing import Any, Callable, Deque, Hashable, List, Optional, Sequence

import torch


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` rows already; ``retry_after`` (s) is an estimate of when there is room."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Draining(RuntimeError):
    """The scheduler is draining (the server is shutting down) and takes no new work."""


class Job:
    """One request in the scheduler: ``conds`` (N,) rows with their ``row_seeds`` (N,) int64, under batch ``key``;
    ``future`` gets the list of N per-row results once every row has run."""

    def __init__(self, key: Hashable, conds: Sequence[Any], row_seeds: torch.Tensor) -> None:
        if len(conds) != len(row_seeds):
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(conds)} rows; give one per row")
        self.key, self.conds, self.row_seeds = key, list(conds), row_seeds
        self.arrival = time.monotonic()
        self.next_row = 0  # rows before this were handed to a batch
        self.results: List[Any] = [None] * len(self.conds)
        self.done_rows = 0
        self.future: "asyncio.Future[List[Any]]" = asyncio.get_running_loop().create_future()

    @property
    def waiting_rows(self) -> int:
        return len(self.conds) - self.next_row


RunBatch = Callable[[Hashable, List[Any], torch.Tensor], List[Any]]


class Scheduler:
    """Coalesces ``Job`` rows with equal keys into batches of at most ``max_batch`` rows for ``run_batch(key, conds,
    row_seeds) -> one result per row`` (run on one worker thread). ``on_batch(size, seconds)`` is told of every batch
    (metrics). Start with ``start()`` inside the event loop; ``drain()`` to finish."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
                 on_batch: Optional[Callable[[int, float], None]] = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.on_batch = max_queue, on_batch
        self.jobs: Deque[Job] = collections.deque()  # jobs with rows still waiting, in arrival order
        self.running = 0  # rows in the batch on the worker
        self.draining = False
        self.batch_seconds = 0.0  # the last batch's duration (Retry-After's estimate)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssg-serve-batch")

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (the queue depth)."""
        return sum(job.waiting_rows for job in self.jobs)

    def start(self) -> None:
        """Start the loop task on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def check_open(self) -> None:
        """``Draining`` when the scheduler takes no new work."""
        if self.draining:
            raise Draining("the server is shutting down and takes no new requests; retry on another replica")

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``Draining`` when shutting down, ``QueueFull`` when its rows do not fit the queue."""
        self.check_open()
        if self.queued_rows + len(job.conds) > self.max_queue:
            batches = math.ceil((self.queued_rows + self.running) / self.max_batch) + 1
            raise QueueFull(f"the queue is full ({self.queued_rows} images waiting, at most {self.max_queue}); retry later",
                            retry_after=max(1, round(batches * max(self.batch_seconds, 0.1))))
        self.jobs.append(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """Forget ``job``: its waiting rows leave the queue (rows already running finish and are dropped)."""
        if job in self.jobs:
            self.jobs.remove(job)
        if not job.future.done():
            job.future.cancel()

    async def drain(self, timeout: float) -> bool:
        """Refuse new jobs and wait (at most ``timeout`` s) until every queued row has run; True if it did."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.jobs or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        done = not self.jobs and not self.running
        if self._task is not None:
            self._task.cancel()
        self._worker.shutdown(wait=False)
        return done

    async def _wait(self, timeout: Optional[float]) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _take(self, key: Hashable) -> List[tuple]:
        """Up to ``max_batch`` (job, row) pairs of ``key``: round-robin over its waiting jobs, oldest first."""
        same = [job for job in self.jobs if job.key == key]
        taken: List[tuple] = []
        while len(taken) < self.max_batch and any(job.waiting_rows for job in same):
            for job in same:
                if job.waiting_rows and len(taken) < self.max_batch:
                    taken.append((job, job.next_row))
                    job.next_row += 1
        for job in same:
            if not job.waiting_rows:
                self.jobs.remove(job)
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.jobs:
                await self._wait(None)
                continue
            head = self.jobs[0]
            key = head.key
            while True:  # gather more rows of the head's key until the batch is full or the head has waited enough
                waiting = sum(job.waiting_rows for job in self.jobs if job.key == key)
                left = head.arrival + self.max_wait - time.monotonic()
                if waiting >= self.max_batch or left <= 0 or head not in self.jobs:
                    break
                await self._wait(left)
            if head not in self.jobs:  # cancelled while waiting
                continue
            taken = self._take(key)
            conds = [job.conds[r] for job, r in taken]
            seeds = torch.stack([job.row_seeds[r] for job, r in taken])
            self.running = len(taken)
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self._worker, self.run_batch, key, conds, seeds)
                error: Optional[BaseException] = None
            except Exception as e:  # a failed batch fails its requests, never the loop
                results, error = [], e
            finally:
                self.running = 0
            self.batch_seconds = time.monotonic() - start
            if self.on_batch is not None:
                self.on_batch(len(taken), self.batch_seconds)
            for i, (job, r) in enumerate(taken):
                if job.future.done():
                    continue
                if error is not None:
                    if job in self.jobs:
                        self.jobs.remove(job)
                    job.future.set_exception(error)
                    continue
                job.results[r] = results[i]
                job.done_rows += 1
                if job.done_rows == len(job.conds):
                    job.future.set_result(job.results)
