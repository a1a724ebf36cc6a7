"""Server-side dynamic batching: many small requests in, one model run per batch.

One ``Batcher`` serves one (model, version, signature). Callers block in
``submit`` (or await ``submit_async`` from an event loop) while their rows ride
in a batch with other callers' rows; the batch runs once, and each caller gets
back exactly its own rows.

Semantics follow TF Serving's ``SharedBatchScheduler`` / ``BatchingSession``:

- The queue holds *batches*, at most ``max_enqueued_batches`` of them (a batch a
  thread has taken no longer counts). A request that needs a new batch when the
  queue is full fails at once with ``Unavailable`` (``retry_after`` = 1 s).
- The batch at the tail is open: a request joins it while its rows fit, else the
  batch closes and a new one opens. A thread runs the head batch as soon as it is
  closed or full, or ``batch_timeout_micros`` after its first request arrived
  (with the default timeout 0, whatever is queued runs as soon as a thread is
  free, so batches grow only under load).
- Each input is concatenated along dimension 0; the batch is padded up to the
  next ``allowed_batch_sizes`` entry by repeating its first row; padding rows are
  never returned. Every output must have the padded batch size as dimension 0,
  else the whole batch fails with ``Internal``.
- A request larger than ``max_batch_size`` is ``InvalidArgument`` unless
  ``enable_large_batch_splitting`` is on; then any request is split into parts
  that fill the open batch's room first and then whole batches of
  ``max_execution_batch_size`` rows, and its outputs are reassembled in order.
- A request whose deadline (``time.monotonic()``) passes while queued is never
  run: it gets ``DeadlineExceeded``, at its deadline. A request already running
  at its deadline also gets ``DeadlineExceeded`` at its deadline (its rows'
  results are discarded).
- Requests whose inputs differ in dtype or in non-batch dimensions never share
  a batch: the open batch closes and the request starts a new one. With
  ``pad_variable_length_inputs`` they may share one when only the sizes of
  non-batch dimensions differ: each input is padded at the end of every such
  dimension to the largest size in the batch, with that request's first
  element (as TF Serving does); outputs are returned as the model produced them.
- An error raised by the run function reaches every request of that batch and
  no other; a non-``ServingError`` becomes ``Internal``. The exception is
  ``InvalidArgument`` (bad data only the model can see, such as image bytes
  that do not decode): then each request of the batch runs again on its own,
  so only the one with the bad data fails.

A request with zero rows runs directly on the caller's thread (nothing to batch).

Two options serve a batcher shared by several models (``serving.trunks``: one trunk
batcher per trunk group and trunk signature):

- ``tagged``: each request carries a ``tag`` (the model version it belongs to), and
  ``run`` is called as ``run(inputs, parts)`` with ``parts`` the ``(tag, rows)`` of
  each request part in row order; it returns one output dict per part, since the
  parts' outputs need not share shapes (heads with different class counts).
- ``edf_default_s``: earliest deadline first. When a batch is due, it is filled
  from every queued request of its input shape, nearest deadline first, instead
  of in arrival order; a request without a deadline counts as arriving plus
  ``edf_default_s``. Expired requests never run, as above.

What each request went through (its wait in the queue, the batch's input merge,
model run and its share of the output split) is added to the ``timing`` it was
submitted with, before it is woken; each successful run is reported to the
``executions`` observer. Together they feed the per-version statistics
(``serving.statistics``).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from serving.buffers import aligned_empty
from serving.config import BatchingConfig
from serving.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ServingError,
    Unavailable,
)

log = logging.getLogger(__name__)

RunFunction = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
# A tagged batcher's run: merged inputs and the (tag, rows) of each part, in row order,
# to one output dict per part.
TaggedRunFunction = Callable[[dict[str, np.ndarray], list[tuple[object, int]]], Sequence[Mapping[str, np.ndarray]]]

# Retry-After for a full queue: one second is the smallest value HTTP can state
# and is long enough for a few batches to drain at any realistic batch latency.
QUEUE_FULL_RETRY_AFTER_S = 1.0


class BatchObserver(Protocol):
    """What a ``Batcher`` reports, so metrics can watch it without the batcher importing them."""

    def on_batch(self, size: int, padded_size: int, queue_delays: list[float], run_seconds: float) -> None:
        """One batch ran: real rows, rows after padding, each part's seconds in queue, the run's seconds."""

    def on_queue_depth(self, depth: int) -> None:
        """The number of rows now waiting in the queue (not yet taken by a thread)."""


class ExecutionObserver(Protocol):
    """Told of every successful model run (``serving.statistics.VersionStatistics`` is one)."""

    def on_execution(self, batch_size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A run over ``batch_size`` rows (padding included) succeeded: seconds spent merging its
        inputs, running the model, and splitting its outputs among the requests."""


class RequestTiming(Protocol):
    """Where one request's time went (``serving.statistics.Timing`` is one)."""

    def add(self, queue_s: float, input_s: float, infer_s: float, output_s: float) -> None:
        """Add one run of the request's rows: its wait, the input merge, the run, its output split."""


_QUEUED, _TAKEN, _CANCELLED = 0, 1, 2
_QUEUED_DEADLINE_MESSAGE = "deadline exceeded while the request waited in the batch queue"


class _Request:
    """What one ``submit`` call waits on; completed once, by whoever finishes it."""

    __slots__ = ("done", "outputs", "error", "tasks", "remaining", "parts", "mutex", "finished", "waiter",
                 "timing")

    def __init__(self, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None,
                 timing: RequestTiming | None = None) -> None:
        self.timing = timing
        # An asyncio caller's loop and the future it awaits; resolved (by _wake) once the result is in.
        self.waiter = waiter
        self.done = threading.Lock()
        # Held until the result is in: the waiter blocks on a second acquire.
        self.done.acquire()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        # Its queued parts, for withdrawing them; emptied once it completes.
        self.tasks: Sequence[_Task] = ()
        self.remaining = 0
        self.parts: list | None = None
        self.mutex: threading.Lock | None = None
        self.finished = False


def _resolve_all(futures: list[asyncio.Future]) -> None:
    for done in futures:
        if not done.done():  # a waiter that timed out cancelled it
            done.set_result(None)


def _wake(requests: list[_Request]) -> None:
    """Resolve the asyncio waiters of completed requests: one loop wake-up per event loop.

    Each ``call_soon_threadsafe`` writes to the loop's self-pipe, and that write
    releases the GIL; the woken loop thread takes it and the batch thread then
    waits for it back, up to the interpreter's switch interval (5 ms). Waking a
    whole batch's callers with one call keeps that to once per batch.
    """
    if not requests:
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for request in requests:
        loop, future = request.waiter
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, futures)
        except RuntimeError:  # the loop closed: nobody is waiting any more
            pass


class _Task:
    """One queued unit: a whole request, or one part of a split one."""

    __slots__ = ("batch", "deadline", "enqueued", "index", "inputs", "key", "request", "rows", "state", "tag")

    def __init__(self, request, index, inputs, rows, key, deadline, enqueued, tag=None) -> None:
        self.tag = tag
        self.request = request
        self.index = index
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.deadline = deadline
        self.enqueued = enqueued
        self.state = _QUEUED
        self.batch: _Batch | None = None


class _Batch:
    __slots__ = ("tasks", "rows", "key", "created", "open")

    def __init__(self, key, created) -> None:
        self.tasks: list[_Task] = []
        self.rows = 0
        self.key = key
        self.created = created
        self.open = True


class Batcher:
    """Dynamic batcher for one servable signature (see the module docstring for the semantics).

    ``run`` takes a dict of batched numpy inputs and returns a dict of outputs
    whose dimension 0 is the batch size. It is called from this batcher's
    ``config.num_batch_threads`` threads, at most that many at once.
    """

    def __init__(self, run: RunFunction | TaggedRunFunction, config: BatchingConfig, *,
                 observer: BatchObserver | None = None, executions: ExecutionObserver | None = None,
                 name: str = "", tagged: bool = False, edf_default_s: float | None = None) -> None:
        self._run = run
        self._tagged = tagged
        self._edf_default_s = edf_default_s
        self.config = config
        self.name = name
        self._observer = observer
        self._executions = executions
        # Set by flush(): no more company is coming, so no batch waits out its timeout.
        self._flushing = False
        self._cap = config.execution_batch_size
        self._allowed = list(config.allowed_batch_sizes)
        self._timeout_s = config.batch_timeout_micros / 1e6
        self._pad_var = config.pad_variable_length_inputs
        self._cond = threading.Condition(threading.Lock())
        self._batches: deque[_Batch] = deque()
        self._queued_rows = 0
        self._closing = False
        label = f"{config.thread_pool_name}-{name}" if name else config.thread_pool_name
        self._threads = [
            threading.Thread(target=self._worker, name=f"{label}-{i}", daemon=True)
            for i in range(config.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    # -- caller side -------------------------------------------------------

    def submit(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None,
               timing: RequestTiming | None = None, tag: object = None) -> dict[str, np.ndarray]:
        """Run ``inputs`` in a batch; block until this request's own output rows are back.

        Raises ``Unavailable`` (queue full, ``retry_after`` set; or closed),
        ``DeadlineExceeded`` (``deadline``, a ``time.monotonic()`` value, passed
        first), ``InvalidArgument`` (inputs that cannot be batched, or too many
        rows with splitting off), or the error the batch's run raised. ``timing``
        hears where the request's time went once it succeeded. ``tag``: the request's
        tag, for a ``tagged`` batcher.
        """
        request = self._admit(inputs, deadline, None, timing, tag)
        if request is None:
            return self._run_empty(inputs, timing, tag)
        return self._wait(request, deadline)

    async def submit_async(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None,
                           timing: RequestTiming | None = None, tag: object = None) -> dict[str, np.ndarray]:
        """:meth:`submit` for a coroutine: queue at once, then await without blocking the event loop.

        Same errors as ``submit``. A caller cancelled while queued (its client went
        away) withdraws its rows, so they never run.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        request = self._admit(inputs, deadline, (loop, done), timing, tag)
        if request is None:
            return await asyncio.to_thread(self._run_empty, inputs, timing, tag)
        try:
            if deadline is None:
                await done
            else:
                await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if self._withdraw(request):
                raise DeadlineExceeded(_QUEUED_DEADLINE_MESSAGE) from None
        except asyncio.CancelledError:
            self._withdraw(request)
            raise
        if request.error is not None:
            raise request.error
        return request.outputs

    def _admit(self, inputs: Mapping[str, np.ndarray], deadline: float | None,
               waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None,
               timing: RequestTiming | None, tag: object = None) -> _Request | None:
        """Check and queue a request; None when it has no rows (the caller runs it directly)."""
        rows, key = self._check(inputs)
        if rows == 0:
            return None
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        request = _Request(waiter, timing)
        with self._cond:
            if self._closing:
                raise Unavailable(f"the batcher{' of ' + self.name if self.name else ''} is closed")
            tasks = self._plan(request, inputs, rows, key, deadline, now, tag)
            self._enqueue(tasks)
            self._queued_rows += rows
            self._report_depth()
            self._cond.notify()
        return request

    def _run_empty(self, inputs: Mapping[str, np.ndarray], timing: RequestTiming | None,
                   tag: object = None) -> dict[str, np.ndarray]:
        """Run a request without rows at once, in the caller's thread: there is nothing to batch."""
        started = time.perf_counter()
        outputs = dict(self._run(dict(inputs), [(tag, 0)])[0] if self._tagged else self._run(dict(inputs)))
        seconds = time.perf_counter() - started
        if timing is not None:
            timing.add(0.0, 0.0, seconds, 0.0)
        self._executed(0, 0.0, seconds, 0.0)
        return outputs

    def _check(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple]:
        if not inputs:
            raise InvalidArgument("a batched request needs at least one input")
        rows = None
        first = None
        for name, arr in inputs.items():
            if not isinstance(arr, np.ndarray):
                raise InvalidArgument(f"input '{name}' is not an array")
            if arr.ndim == 0:
                raise InvalidArgument(f"input '{name}' is a scalar: batching needs a batch dimension (dimension 0)")
            if rows is None:
                rows, first = arr.shape[0], name
            elif arr.shape[0] != rows:
                raise InvalidArgument(
                    f"inputs disagree on batch size (dimension 0): "
                    f"'{first}' has {rows} rows, '{name}' has {arr.shape[0]}"
                )
        cfg = self.config
        if not cfg.enable_large_batch_splitting:
            if rows > cfg.max_batch_size:
                raise InvalidArgument(
                    f"request has {rows} rows, more than max_batch_size ({cfg.max_batch_size}); "
                    "send smaller requests or enable enable_large_batch_splitting"
                )
        elif rows > self._cap * cfg.max_enqueued_batches:
            raise InvalidArgument(
                f"request has {rows} rows, more than the queue can ever hold "
                f"(max_enqueued_batches {cfg.max_enqueued_batches} x batches of {self._cap} rows)"
            )
        if self._pad_var:
            key = tuple((n, a.dtype, a.ndim) for n, a in sorted(inputs.items()))
        else:
            key = tuple((n, a.dtype, a.shape[1:]) for n, a in sorted(inputs.items()))
        return rows, key

    def _open_room(self, key) -> int:
        """Rows the open tail batch can still take for a request with ``key`` (0: none open or incompatible)."""
        if self._batches:
            tail = self._batches[-1]
            if tail.open and tail.key == key:
                return self._cap - tail.rows
        return 0

    def _plan(self, request, inputs, rows, key, deadline, now, tag=None) -> list[_Task]:
        """Cut the request into tasks and check the queue has room for them (under the lock)."""
        room = self._open_room(key)
        if rows <= room:
            sizes, new_batches = [rows], 0
        elif not self.config.enable_large_batch_splitting or (room == 0 and rows <= self._cap):
            sizes, new_batches = [rows], 1
        else:
            # Fill the open batch's room first, as TF Serving's splitting does.
            sizes = [room] if room else []
            left = rows - room
            new_batches = math.ceil(left / self._cap)
            sizes += [self._cap] * (left // self._cap)
            if left % self._cap:
                sizes.append(left % self._cap)
        limit = self.config.max_enqueued_batches
        # Batches emptied by withdrawn requests wait in the deque until a thread pops them; they hold no rows.
        if new_batches and len(self._batches) + new_batches > limit and \
                sum(1 for batch in self._batches if batch.rows) + new_batches > limit:
            raise Unavailable(
                f"batch queue{' of ' + self.name if self.name else ''} is full "
                f"(max_enqueued_batches={self.config.max_enqueued_batches}); retry later",
                retry_after=QUEUE_FULL_RETRY_AFTER_S,
            )
        if len(sizes) == 1:
            tasks = [_Task(request, 0, inputs, rows, key, deadline, now, tag)]
        else:
            tasks = []
            start = 0
            for i, size in enumerate(sizes):
                part = {n: a[start:start + size] for n, a in inputs.items()}
                tasks.append(_Task(request, i, part, size, key, deadline, now, tag))
                start += size
            request.parts = [None] * len(tasks)
            request.mutex = threading.Lock()
        request.tasks = tasks
        request.remaining = len(tasks)
        return tasks

    def _enqueue(self, tasks: list[_Task]) -> None:
        batches = self._batches
        cap = self._cap
        for task in tasks:
            tail = batches[-1] if batches else None
            if tail is None or not tail.open or tail.key != task.key or tail.rows + task.rows > cap:
                if tail is not None:
                    tail.open = False
                tail = _Batch(task.key, task.enqueued)
                batches.append(tail)
            tail.tasks.append(task)
            tail.rows += task.rows
            task.batch = tail
            if tail.rows >= cap:
                tail.open = False

    def _wait(self, request: _Request, deadline: float | None) -> dict[str, np.ndarray]:
        if deadline is None:
            request.done.acquire()
        elif not request.done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            if self._withdraw(request):
                raise DeadlineExceeded(_QUEUED_DEADLINE_MESSAGE)
        if request.error is not None:
            raise request.error
        return request.outputs

    def _withdraw(self, request: _Request) -> bool:
        """Give up on a request unless its result is already in; True when it was withdrawn.

        Its still-queued tasks are cancelled; a task already running finishes, and
        its rows are discarded.
        """
        with self._cond:
            finished = request.done.acquire(blocking=False)
            if not finished:
                request.finished = True
                self._cancel(request)
                request.tasks = ()
                self._report_depth()
        return not finished

    def _cancel(self, request: _Request) -> None:
        """Withdraw the request's still-queued tasks (under the lock)."""
        for task in request.tasks:
            if task.state == _QUEUED:
                task.state = _CANCELLED
                task.batch.rows -= task.rows
                self._queued_rows -= task.rows

    def flush(self) -> None:
        """Run what is queued without waiting for batch timeouts, from now on (the server is draining).

        New requests are still accepted (those admitted before the drain may still
        arrive); they too run as soon as a batch thread is free.
        """
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def queue_depth(self) -> int:
        """Rows waiting in the queue, not yet taken by a batch thread."""
        with self._cond:
            return self._queued_rows

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests, then stop the threads.

        ``drain=True`` runs everything already queued first (without waiting for
        batch timeouts); ``drain=False`` fails queued requests with
        ``Unavailable``. Batches already running always finish. Waits up to
        ``timeout`` seconds (None: no limit) for the threads to end.
        """
        dropped: list[_Task] = []
        with self._cond:
            self._closing = True
            if not drain:
                while self._batches:
                    for task in self._batches.popleft().tasks:
                        if task.state == _QUEUED:
                            task.state = _TAKEN
                            dropped.append(task)
                self._queued_rows = 0
                self._report_depth()
            self._cond.notify_all()
        self._fail(dropped, Unavailable("the batcher was closed before this request ran"))
        current = threading.current_thread()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is not current:
                thread.join(None if end is None else max(0.0, end - time.monotonic()))

    # -- batch threads -------------------------------------------------------

    def _take(self) -> tuple[list[_Task], list[_Task], float] | None:
        """Block until a batch is due; pop it (None: closed and empty)."""
        cond = self._cond
        timeout_s = self._timeout_s
        with cond:
            while True:
                batches = self._batches
                if batches:
                    head = batches[0]
                    if head.rows == 0:
                        for task in batches.popleft().tasks:
                            task.batch = None
                        continue
                    if head.open and not (self._closing or self._flushing) and timeout_s > 0:
                        wait = head.created + timeout_s - time.monotonic()
                        if wait > 0:
                            cond.wait(wait)
                            continue
                    break
                if self._closing:
                    return None
                cond.wait()
            now = time.monotonic()
            batch = batches.popleft() if self._edf_default_s is None else self._earliest_first(now)
            batch.open = False
            live: list[_Task] = []
            expired: list[_Task] = []
            for task in batch.tasks:
                # Only a queued task needs its batch (to be withdrawn from it); dropping the
                # link leaves no task <-> batch cycle for the garbage collector.
                task.batch = None
                if task.state != _QUEUED:
                    continue
                task.state = _TAKEN
                if task.deadline is not None and task.deadline <= now:
                    expired.append(task)
                else:
                    live.append(task)
            self._queued_rows -= batch.rows
            self._report_depth()
            if batches:
                cond.notify()
        return live, expired, now

    def _earliest_first(self, now: float) -> _Batch:
        """Pop a batch of the head batch's key filled nearest deadline first from every queued batch (under the lock).

        Expired requests are taken whatever their number (they fail without running);
        the others fill the batch up to its cap in deadline order. Batches left
        empty leave the queue; the others keep their place and their open state.
        """
        head = self._batches[0]
        default_s = self._edf_default_s
        candidates = [task for batch in self._batches if batch.key == head.key
                      for task in batch.tasks if task.state == _QUEUED]
        candidates.sort(key=lambda t: (t.deadline if t.deadline is not None else t.enqueued + default_s,
                                       t.enqueued))
        chosen = _Batch(head.key, head.created)
        live_rows = 0  # expired rows leave with the batch but never run: they take no room
        for task in candidates:
            expired = task.deadline is not None and task.deadline <= now
            if not expired:
                if live_rows + task.rows > self._cap:
                    continue
                live_rows += task.rows
            task.batch.tasks.remove(task)
            task.batch.rows -= task.rows
            chosen.tasks.append(task)
            chosen.rows += task.rows
        self._batches = deque(batch for batch in self._batches if batch.tasks)
        return chosen

    def _worker(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            live, expired, started = taken
            if expired:
                self._fail(expired, DeadlineExceeded(_QUEUED_DEADLINE_MESSAGE))
            if live:
                try:
                    self._run_batch(live, started)
                except BaseException as err:  # never leave a caller hanging on a bug here
                    log.exception("batcher %s: batch failed unexpectedly", self.name)
                    self._fail(live, Internal(f"batching failed: {err!r}"))

    def _padded_size(self, rows: int) -> int:
        if not self._allowed:
            return rows
        return self._allowed[bisect.bisect_left(self._allowed, rows)]

    def _merge(self, tasks: list[_Task], rows: int, target: int) -> dict[str, np.ndarray]:
        first = tasks[0].inputs
        if len(tasks) == 1 and target == rows:
            return dict(first)
        merged = {}
        for name, head in first.items():
            if self._pad_var:
                trailing = tuple(max(t.inputs[name].shape[d] for t in tasks) for d in range(1, head.ndim))
            else:
                trailing = head.shape[1:]
            # Aligned, so that TensorFlow takes the merged batch without copying it (serving.buffers).
            out = aligned_empty((target, *trailing), head.dtype)
            pos = 0
            for task in tasks:
                arr = task.inputs[name]
                end = pos + task.rows
                if arr.shape[1:] == trailing:
                    out[pos:end] = arr
                else:
                    # TF Serving pads with the tensor's own first element.
                    out[pos:end] = arr.flat[0] if arr.size else 0
                    out[(slice(pos, end), *(slice(0, s) for s in arr.shape[1:]))] = arr
                pos = end
            if target > rows:
                out[rows:] = out[0]
            merged[name] = out
        return merged

    def _run_batch(self, tasks: list[_Task], started: float) -> None:
        rows = sum(t.rows for t in tasks)
        target = self._padded_size(rows)
        error: BaseException | None = None
        outputs = None
        run_seconds = None
        merge_started = time.perf_counter()
        try:
            inputs = self._merge(tasks, rows, target)
            t0 = time.perf_counter()
            try:
                outputs = self._run(inputs, [(t.tag, t.rows) for t in tasks]) if self._tagged else self._run(inputs)
            finally:
                run_seconds = time.perf_counter() - t0
            if self._tagged:
                _check_parts(outputs, tasks)
            else:
                _check_outputs(outputs, target)
        except ServingError as err:
            error = err
        except Exception as err:
            error = Internal(f"model run failed: {err}")
        if isinstance(error, InvalidArgument) and len(tasks) > 1:
            # Data that only the model can judge (image bytes that do not decode, a malformed
            # tf.Example) fails the merged run; one request's bad data must not fail the others,
            # so each runs again on its own and only the culprit gets the error.
            self._observe(rows, target, [started - t.enqueued for t in tasks], run_seconds)
            for task in tasks:
                self._run_batch([task], started)
            return
        woken = []
        if error is not None:
            for task in tasks:
                # Each caller raises its own copy: one instance raised in many threads would share a traceback.
                woken.append(self._finish(task, None, copy.copy(error)))
        else:
            merge_seconds = t0 - merge_started
            split_seconds = 0.0
            pos = 0
            for i, task in enumerate(tasks):
                end = pos + task.rows
                split_started = time.perf_counter()
                own = dict(outputs[i]) if self._tagged else {n: v[pos:end] for n, v in outputs.items()}
                split = time.perf_counter() - split_started
                split_seconds += split
                woken.append(self._finish(task, own, None,
                                          (started - task.enqueued, merge_seconds, run_seconds, split)))
                pos = end
        _wake([request for request in woken if request is not None])
        if error is None:
            self._executed(target, merge_seconds, run_seconds, split_seconds)
        self._observe(rows, target, [started - t.enqueued for t in tasks], run_seconds)

    def _executed(self, size: int, merge_seconds: float, run_seconds: float, split_seconds: float) -> None:
        if self._executions is not None:
            try:
                self._executions.on_execution(size, merge_seconds, run_seconds, split_seconds)
            except Exception:
                log.exception("batcher %s: execution observer failed", self.name)

    def _observe(self, rows: int, target: int, queue_delays: list[float], run_seconds: float | None) -> None:
        if run_seconds is not None and self._observer is not None:
            try:
                self._observer.on_batch(rows, target, queue_delays, run_seconds)
            except Exception:
                log.exception("batcher %s: observer failed", self.name)

    def _fail(self, tasks: list[_Task], error: BaseException) -> None:
        """Finish every task with ``error`` and wake their asyncio waiters."""
        _wake([request for task in tasks if (request := self._finish(task, None, error))])

    def _finish(self, task: _Task, outputs, error, timing: tuple[float, float, float, float] | None = None
                ) -> _Request | None:
        """Hand one task's result to its request; complete the request when it is whole.

        ``timing`` (a successful run's queue, merge, run and split seconds) is added
        to the request's own before it can wake. A blocked ``submit`` wakes at once.
        Returns the request when this completed it and an asyncio caller awaits it:
        the caller passes it to ``_wake``.
        """
        request = task.request
        if request.mutex is None:
            if request.finished:
                return None
            request.finished = True
            if timing is not None and request.timing is not None:
                request.timing.add(*timing)
            request.outputs, request.error = outputs, error
            request.tasks = ()  # no request <-> task cycle left for the garbage collector
            request.done.release()
            return request if request.waiter is not None else None
        with request.mutex:
            if request.finished:
                return None
            if error is None:
                if timing is not None and request.timing is not None:
                    request.timing.add(*timing)
                request.parts[task.index] = outputs
                request.remaining -= 1
                if request.remaining:
                    return None
            request.finished = True
        if error is None:
            try:
                parts = request.parts
                request.outputs = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
            except ValueError as err:
                error = Internal(f"parts of a split request came back with different output shapes: {err}")
        else:
            # The request failed: its other queued parts need not run.
            with self._cond:
                self._cancel(request)
                self._report_depth()
        request.error = error
        request.tasks = ()
        request.done.release()
        return request if request.waiter is not None else None

    def _report_depth(self) -> None:
        # Called with the lock held, so that reports reach the gauge in the order the depth changed.
        if self._observer is not None:
            try:
                self._observer.on_queue_depth(self._queued_rows)
            except Exception:
                log.exception("batcher %s: observer failed", self.name)


def _check_outputs(outputs, target: int) -> None:
    """Raise ``Internal`` unless ``outputs`` maps names to arrays of ``target`` rows."""
    if not isinstance(outputs, Mapping):
        raise Internal(f"model run returned {type(outputs).__name__}, not a mapping of outputs")
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != target:
            shape = getattr(value, "shape", None)
            raise Internal(
                f"output '{name}' has shape {shape}, but its dimension 0 must be the batch size "
                f"{target}; this signature cannot be batched (serve it with batching off)"
            )


def _check_parts(parts, tasks: Sequence[_Task]) -> None:
    """Raise ``Internal`` unless a tagged run returned one output mapping per task, each of its rows."""
    if not isinstance(parts, Sequence) or len(parts) != len(tasks):
        raise Internal(f"a tagged run returned {type(parts).__name__}, not one output mapping per request part")
    for outputs, task in zip(parts, tasks):
        _check_outputs(outputs, task.rows)
