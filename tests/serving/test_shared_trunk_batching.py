"""The batcher options a shared trunk needs: tagged runs and earliest-deadline-first (serving.batching).

A fake run function records which tags each batch carried; the first batch holds
the only batch thread until the test has queued everything, so the order in which
the queue is served is the test's to control.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher
from serving.config import BatchingConfig
from serving.errors import DeadlineExceeded, Internal


class Recorder:
    """A tagged run: each row's output is its input times 10 plus its part's class count of columns."""

    def __init__(self, hold_first: bool = True) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.running = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, inputs, parts):
        self.batches.append([tag for tag, _ in parts])
        self.running.set()
        assert self.gate.wait(30)
        x = inputs["x"]
        out, pos = [], 0
        for tag, rows in parts:
            width = len(tag)  # a different output width per tag, as heads with different class counts
            out.append({"y": np.repeat(x[pos:pos + rows] * 10, width, axis=1)})
            pos += rows
        return out


def _wait_depth(batcher: Batcher, rows: int) -> None:
    end = time.monotonic() + 10
    while batcher.queue_depth() != rows:
        assert time.monotonic() < end, f"queue depth {batcher.queue_depth()}, expected {rows}"
        time.sleep(0.005)


def _config(**changes) -> BatchingConfig:
    return BatchingConfig(**{"max_batch_size": 2, "batch_timeout_micros": 0, "num_batch_threads": 1,
                             "max_enqueued_batches": 10, **changes})


def test_a_tagged_run_sees_each_parts_tag_and_returns_each_part_its_own_outputs():
    run = Recorder(hold_first=False)
    batcher = Batcher(run, _config(max_batch_size=8, batch_timeout_micros=200_000), tagged=True)
    try:
        results = {}
        threads = [threading.Thread(target=lambda t=tag, v=value: results.__setitem__(
            t, batcher.submit({"x": np.full((2, 1), v, np.float32)}, tag=t)))
            for tag, value in (("ab", 1.0), ("abcd", 2.0))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert run.batches == [["ab", "abcd"]] or sorted(map(tuple, run.batches)) == [("ab",), ("abcd",)]
        np.testing.assert_array_equal(results["ab"]["y"], np.full((2, 2), 10.0))
        np.testing.assert_array_equal(results["abcd"]["y"], np.full((2, 4), 20.0))
    finally:
        batcher.close()


def test_a_tagged_run_that_returns_the_wrong_rows_fails_its_batch():
    batcher = Batcher(lambda inputs, parts: [{"y": np.zeros((5, 1))}], _config(), tagged=True)
    try:
        with pytest.raises(Internal, match="dimension 0"):
            batcher.submit({"x": np.zeros((1, 1), np.float32)}, tag="a")
    finally:
        batcher.close()


def test_a_full_queue_is_served_earliest_deadline_first_and_expired_requests_never_run():
    run = Recorder()
    # A request without a deadline counts as arriving plus 20 s.
    batcher = Batcher(run, _config(), tagged=True, edf_default_s=20.0)
    errors: dict[str, BaseException] = {}

    def submit(tag: str, seconds: float | None) -> None:
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            batcher.submit({"x": np.ones((1, 1), np.float32)}, deadline, tag=tag)
        except BaseException as exc:  # checked below
            errors[tag] = exc

    threads = [threading.Thread(target=submit, args=("blocker", None))]
    threads[0].start()
    assert run.running.wait(10)
    # Arrival order (and so FIFO batch order): [far, none], [near, mid], [expiring].
    for tag, seconds in (("far", 50.0), ("none", None), ("near", 5.0), ("mid", 10.0), ("expiring", 0.3)):
        thread = threading.Thread(target=submit, args=(tag, seconds))
        thread.start()
        threads.append(thread)
        _wait_depth(batcher, len(threads) - 1)
    # The expiring request's deadline passes while every batch waits behind the blocker.
    time.sleep(0.6)
    run.gate.set()
    for thread in threads:
        thread.join(30)
    try:
        assert run.batches == [["blocker"], ["near", "mid"], ["none", "far"]]
        assert isinstance(errors.pop("expiring"), DeadlineExceeded)
        assert errors == {}
    finally:
        batcher.close()


def test_without_edf_the_same_queue_is_served_in_arrival_order():
    run = Recorder()
    batcher = Batcher(run, _config(), tagged=True)
    threads = [threading.Thread(target=lambda: batcher.submit({"x": np.ones((1, 1), np.float32)}, tag="blocker"))]
    threads[0].start()
    assert run.running.wait(10)
    for tag, seconds in (("far", 50.0), ("none", None), ("near", 5.0), ("mid", 10.0)):
        deadline = None if seconds is None else time.monotonic() + seconds
        thread = threading.Thread(target=batcher.submit, args=({"x": np.ones((1, 1), np.float32)}, deadline),
                                  kwargs={"tag": tag})
        thread.start()
        threads.append(thread)
        _wait_depth(batcher, len(threads) - 1)
    run.gate.set()
    for thread in threads:
        thread.join(30)
    try:
        assert run.batches == [["blocker"], ["far", "none"], ["near", "mid"]]
    finally:
        batcher.close()


def test_edf_drops_an_expired_request_when_its_batch_is_taken():
    """An expired request queued behind a running batch never runs; the one beside it does."""
    run = Recorder()
    batcher = Batcher(run, _config(), tagged=True, edf_default_s=20.0)

    async def scenario():
        blocker = asyncio.ensure_future(asyncio.to_thread(
            batcher.submit, {"x": np.ones((1, 1), np.float32)}, None, None, "blocker"))
        while not run.running.is_set():
            await asyncio.sleep(0.01)
        ok = asyncio.ensure_future(batcher.submit_async({"x": np.ones((1, 1), np.float32)}, None, tag="ok"))
        late = asyncio.ensure_future(batcher.submit_async({"x": np.ones((1, 1), np.float32)},
                                                          time.monotonic() + 0.2, tag="late"))
        with pytest.raises(DeadlineExceeded):
            await late
        run.gate.set()
        await ok
        await blocker

    try:
        asyncio.run(scenario())
        assert run.batches == [["blocker"], ["ok"]]
    finally:
        batcher.close()


def test_expired_requests_taken_with_a_batch_leave_its_room_to_live_ones():
    run = Recorder()
    batcher = Batcher(run, _config(), tagged=True, edf_default_s=20.0)
    one = {"x": np.ones((1, 1), np.float32)}

    async def scenario():
        blocker = asyncio.ensure_future(asyncio.to_thread(batcher.submit, one, None, None, "blocker"))
        while not run.running.is_set():
            await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batcher.submit_async(one, time.monotonic() + 0.2, tag="late"))
        others = [asyncio.ensure_future(batcher.submit_async(one, tag=tag)) for tag in ("x", "y")]
        while batcher.queue_depth() != 3:
            await asyncio.sleep(0.01)
        # The loop is held, so the late request cannot withdraw itself: the batch thread
        # finds it expired when it takes the next batch.
        time.sleep(0.4)
        run.gate.set()
        time.sleep(0.3)
        with pytest.raises(DeadlineExceeded):
            await late
        await asyncio.gather(*others, blocker)

    try:
        asyncio.run(scenario())
        assert run.batches == [["blocker"], ["x", "y"]]
    finally:
        batcher.close()
