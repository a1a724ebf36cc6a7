"""Cumulative inference statistics of one loaded model version, as Triton's statistics extension counts them.

For each version the server keeps, from its load until its unload: requests that
succeeded and failed (count and total time), how long successful requests waited
for their batch (queue) and how long their model runs took (compute: preparing
the inputs, running the model, extracting the outputs), the rows inferred, the
model runs made, and the runs per batch size. Durations are kept in nanoseconds,
as Triton reports them.

Who records what: the service records each request that reached a version
(:meth:`VersionStatistics.record_request`, with the :class:`Timing` its runs
filled in); the batcher, or the service for a run without one, records each
successful model run (:meth:`VersionStatistics.on_execution`). Nothing here knows
a wire format: the V2 adapters format a :class:`StatisticsSnapshot`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000


def _ns(seconds: float) -> int:
    return max(0, round(seconds * NS_PER_S))


@dataclass
class Duration:
    """A count and the total nanoseconds of what was counted (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        """Count one more occurrence that took ``seconds``."""
        self.count += 1
        self.ns += _ns(seconds)


class Timing:
    """Where one request's time went, filled in by whoever ran its rows.

    A request split over several batches adds each part's wait and run.
    """

    __slots__ = ("queue_s", "input_s", "infer_s", "output_s")

    def __init__(self) -> None:
        self.queue_s = 0.0
        self.input_s = 0.0
        self.infer_s = 0.0
        self.output_s = 0.0

    def add(self, queue_s: float, input_s: float, infer_s: float, output_s: float) -> None:
        """Add one run of the request's rows: its wait, input preparation, model run and output extraction."""
        self.queue_s += queue_s
        self.input_s += input_s
        self.infer_s += infer_s
        self.output_s += output_s


@dataclass
class BatchStatistics:
    """Successful model runs of one batch size (rows as run, padding included)."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class StatisticsSnapshot:
    """One version's statistics at one instant; ``last_inference_ms`` is 0 before the first request."""

    name: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: list[BatchStatistics] = field(default_factory=list)


class VersionStatistics:
    """The statistics of one loaded version; thread-safe. ``clock`` gives seconds since the epoch."""

    def __init__(self, name: str, version: int, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._totals = StatisticsSnapshot(name, version)
        self._batches: dict[int, BatchStatistics] = {}

    def record_request(self, ok: bool, seconds: float, inferences: int, timing: Timing | None = None) -> None:
        """One request answered by this version after ``seconds``: a success inferring
        ``inferences`` rows, or a failure. A success also counts its queue and compute times."""
        now_ms = int(self._clock() * 1000)
        with self._lock:
            totals = self._totals
            totals.last_inference_ms = now_ms
            if not ok:
                totals.fail.add(seconds)
                return
            totals.success.add(seconds)
            totals.inference_count += inferences
            timing = timing or Timing()
            totals.queue.add(timing.queue_s)
            totals.compute_input.add(timing.input_s)
            totals.compute_infer.add(timing.infer_s)
            totals.compute_output.add(timing.output_s)

    def on_execution(self, batch_size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One successful model run over ``batch_size`` rows (the batcher's ``ExecutionObserver``)."""
        with self._lock:
            self._totals.execution_count += 1
            batch = self._batches.get(batch_size)
            if batch is None:
                batch = self._batches[batch_size] = BatchStatistics(batch_size)
            batch.compute_input.add(input_s)
            batch.compute_infer.add(infer_s)
            batch.compute_output.add(output_s)

    def snapshot(self) -> StatisticsSnapshot:
        """A copy of the statistics now, batch sizes in increasing order."""
        with self._lock:
            snapshot = copy.deepcopy(self._totals)
            snapshot.batches = [copy.deepcopy(b) for _, b in sorted(self._batches.items())]
        return snapshot
