"""The serve scheduler alone (no model): batching of compatible rows, fairness, splitting, the bounded queue,
cancellation and draining. Every wait is bounded (asyncio.wait_for)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, List

import pytest
import torch

from ssg_engine.serve.scheduler import Draining, Job, QueueFull, Scheduler

TIMEOUT = 10.0


class Recorder:
    """A fake batch runner: records each batch (key, conds) and answers (cond, seed) per row; ``gate`` (a
    threading.Event) holds a batch until set."""

    def __init__(self, gate: threading.Event = None, fail: bool = False) -> None:
        self.batches: List[tuple] = []
        self.gate, self.fail = gate, fail

    def __call__(self, key: Any, conds: List[Any], seeds: torch.Tensor) -> List[Any]:
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        self.batches.append((key, list(conds)))
        if self.fail:
            raise ValueError("cfg: this model refuses it")
        return [(c, int(s)) for c, s in zip(conds, seeds)]


def job(key: str, conds: List[Any], first_seed: int = 0) -> Job:
    return Job(key, conds, torch.arange(first_seed, first_seed + len(conds), dtype=torch.int64))


def run(coro) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_compatible_requests_share_a_batch_and_get_their_own_rows():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch=8, max_wait_ms=200)
        s.start()
        jobs = [job("a", ["x", "y"], 0), job("a", ["z"], 10), job("a", ["w", "v", "u"], 20)]
        for j in jobs:
            s.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs))
        await s.drain(TIMEOUT)
        return rec, results

    rec, results = run(main())
    assert len(rec.batches) == 1 and len(rec.batches[0][1]) == 6
    assert results == [[("x", 0), ("y", 1)], [("z", 10)], [("w", 20), ("v", 21), ("u", 22)]]


def test_different_settings_never_share_a_batch():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch=8, max_wait_ms=50)
        s.start()
        jobs = [job("a", [1, 2]), job("b", [3]), job("a", [4]), job("b", [5, 6])]
        for j in jobs:
            s.submit(j)
        await asyncio.gather(*(j.future for j in jobs))
        await s.drain(TIMEOUT)
        return rec

    rec = run(main())
    assert sorted((k, sorted(c)) for k, c in rec.batches) == [("a", [1, 2, 4]), ("b", [3, 5, 6])]


def test_a_large_request_is_split_and_shares_batches_round_robin():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate)
        s = Scheduler(rec, max_batch=4, max_wait_ms=0)
        s.start()
        big, small = job("a", list(range(10))), job("a", ["s0", "s1"], 100)
        s.submit(big)
        s.submit(small)
        gate.set()
        results = await asyncio.gather(big.future, small.future)
        await s.drain(TIMEOUT)
        return rec, results

    rec, (big, small) = run(main())
    assert [len(c) for _, c in rec.batches] == [4, 4, 4]
    assert rec.batches[0][1] == [0, "s0", 1, "s1"]  # the small request is not kept waiting behind the large one
    assert big == [(i, i) for i in range(10)] and small == [("s0", 100), ("s1", 101)]


def test_the_queue_is_bounded_and_a_cancelled_request_frees_its_rows():
    async def main():
        gate = threading.Event()
        s = Scheduler(Recorder(gate), max_batch=2, max_wait_ms=0, max_queue=4)
        s.start()
        running = job("a", [0, 1])
        s.submit(running)
        while s.running == 0:  # the loop took it: its 2 rows are on the worker, none in the queue
            await asyncio.sleep(0.001)
        waiting = job("a", [2, 3, 4])
        s.submit(waiting)
        with pytest.raises(QueueFull) as full:
            s.submit(job("a", [5, 6]))
        assert full.value.retry_after >= 1 and "at most 4" in str(full.value)
        s.cancel(waiting)
        assert s.queued_rows == 0 and waiting.future.cancelled()
        late = job("a", [7, 8])
        s.submit(late)
        gate.set()
        out = await asyncio.gather(running.future, late.future)
        await s.drain(TIMEOUT)
        return out

    assert run(main()) == [[(0, 0), (1, 1)], [(7, 0), (8, 1)]]


def test_drain_refuses_new_work_and_finishes_the_queued_work():
    async def main():
        rec = Recorder()
        s = Scheduler(rec, max_batch=2, max_wait_ms=0)
        s.start()
        queued = [job("a", [0, 1, 2]), job("b", [3])]
        for j in queued:
            s.submit(j)
        drained = asyncio.ensure_future(s.drain(TIMEOUT))
        await asyncio.sleep(0)
        with pytest.raises(Draining):
            s.submit(job("a", [9]))
        assert await drained
        return [j.future.result() for j in queued]

    assert run(main()) == [[(0, 0), (1, 1), (2, 2)], [(3, 0)]]


def test_a_failed_batch_fails_its_requests_and_the_loop_goes_on():
    async def main():
        rec = Recorder(fail=True)
        s = Scheduler(rec, max_batch=4, max_wait_ms=0)
        s.start()
        bad = job("a", [0, 1])
        s.submit(bad)
        with pytest.raises(ValueError, match="cfg"):
            await bad.future
        rec.fail = False
        good = job("a", [5])
        s.submit(good)
        out = await good.future
        await s.drain(TIMEOUT)
        return out

    assert run(main()) == [(5, 0)]


def test_bad_limits_and_row_counts_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(Recorder(), max_batch=0)

    async def mismatch():
        Job("a", [1, 2], torch.zeros(3, dtype=torch.int64))

    with pytest.raises(ValueError, match="row_seeds"):
        run(mismatch())
