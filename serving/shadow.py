"""Shadow evaluation: a fraction of the requests ``stable`` answers also runs on ``canary``.

:class:`ShadowMirror` is protocol-free: the service asks it before a run whether the
request is to be mirrored (``claim``), then hands it stable's answer (``submit``:
the request's inputs, stable's outputs and latency), and it counts and compares. The rules (issue 24, docs/internals.md):

- **Which requests.** Those addressed to the label ``stable``, or to the model with
  no version when stable is the version that answered, of a model that has both a
  ``stable`` and a ``canary`` label on two different versions. A fraction F of them
  is mirrored, chosen by a counter (request n is mirrored when ``floor(n F)``
  steps), so a run is reproducible: F = 0.1 mirrors exactly every tenth.
- **Never in the primary's way.** Offering copies the arrays and puts one item on a
  bounded queue without waiting; a full queue drops the item and counts it. Workers
  of their own take items, hold the canary version only while running it, and count
  a canary that is gone (unloaded, label moved away) as dropped, and a canary that
  fails as a canary error. Queued items hold no version, so nothing waits for
  mirrored work to unload.
- **Shed first under load.** A worker runs an item only once ``busy()`` (the
  service's view: primary rows queued for a batch, or more than one primary
  request running without batching) has been false for :data:`QUIET_SPAN_S`,
  waiting up to :data:`QUIET_PATIENCE_S`; otherwise the item is dropped and counted. At
  capacity the canary gets nothing, so the primary keeps its throughput.
- **What is compared**, per window (model, stable version, canary version): counts
  (mirrored = compared + dropped + canary errors + those still queued or running),
  top-1 agreement for classifiers, the mean absolute difference of the outputs
  otherwise, each side's latency p50/p99 over its latest :data:`LATENCY_SAMPLES`
  samples, and each side's predicted-class histogram with their Jensen-Shannon
  divergence in bits (log base 2, so it lies in [0, 1]). Moving either label
  starts a new window.
- **Shared trunks.** When stable runs a shared trunk (serving.trunks), the service
  claims the request before the run (:meth:`ShadowMirror.claim`), so that a sampled
  run keeps its trunk features; a canary in the same trunk group then runs only its
  head on them (``canary_head_only`` counts those comparisons). Any other canary runs
  its whole signature on the request's inputs. Both are the default ``runner``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from serving.errors import NotFound

if TYPE_CHECKING:
    from serving.manager import ModelManager
    from serving.servable import Servable

log = logging.getLogger(__name__)

STABLE = "stable"
CANARY = "canary"
# Mirrored items waiting for a worker; beyond this they are dropped (and counted).
DEFAULT_QUEUE_SIZE = 64
DEFAULT_WORKERS = 1
# Each side's latency percentiles are over its latest this many samples (a sliding reservoir).
LATENCY_SAMPLES = 4096
# The output under which a run that was asked for its trunk features (serving.trunks) gets them,
# beside the signature's outputs; not a name a signature output can have.
TRUNK_FEATURES = "graft:trunk_features"
# A worker runs an item only once the primary traffic has left room (``busy`` false) for
# QUIET_SPAN_S on end: at capacity the batch queue empties only for instants between batches,
# which must not count. It waits up to QUIET_PATIENCE_S and drops the item otherwise. It looks
# every QUIET_POLL_S while the traffic is quiet, and backs off to QUIET_POLL_MAX_S while it is
# busy: at capacity every look is a wake-up that takes the GIL from the primary's threads.
QUIET_PATIENCE_S = 0.1
QUIET_SPAN_S = 0.006
QUIET_POLL_S = 0.002
QUIET_POLL_MAX_S = 0.016

Outputs = Mapping[str, np.ndarray]
# (canary servable, signature name, inputs, stable's trunk features or None) -> (canary's outputs,
# whether only its head ran).
CanaryRunner = Callable[["Servable", str, Mapping[str, np.ndarray], "tuple[str, np.ndarray] | None"],
                        "tuple[Outputs, bool]"]


def run_signature(canary: Servable, signature: str, inputs: Mapping[str, np.ndarray],
                  features: tuple[str, np.ndarray] | None) -> tuple[Outputs, bool]:
    """The default canary runner: only the canary's head on stable's trunk features when the canary
    shares that trunk (serving.trunks), else the canary's signature of the same name on the inputs."""
    if features is not None:
        group = canary.shared_trunk()
        if group is not None and canary.trunk_info()["fingerprint"] == features[0]:
            return canary.run_head(signature, features[1]), True
    return canary.run(signature, dict(inputs)), False


def rfc3339(moment: float) -> str:
    """A ``time.time()`` instant as RFC 3339 UTC with milliseconds (``2026-12-06T10:00:00.000Z``)."""
    text = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def js_divergence(p: Mapping[str, int], q: Mapping[str, int]) -> float | None:
    """Jensen-Shannon divergence of two count histograms, in bits (0: same, 1: disjoint); None if one is empty."""
    keys = sorted(set(p) | set(q))
    a = np.array([p.get(k, 0) for k in keys], dtype=np.float64)
    b = np.array([q.get(k, 0) for k in keys], dtype=np.float64)
    if a.sum() == 0 or b.sum() == 0:
        return None
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, (kl(a) + kl(b)) / 2)


def top1(outputs: Outputs) -> np.ndarray | None:
    """Each row's predicted class index, when the outputs are a classifier's; else None.

    A ``class_ids`` vector of integers wins; else the argmax of a 2-D ``scores``
    (TF Serving's classify outputs, graft's exports); else the argmax of the only
    output, when it is 2-D floating point with at least two columns.
    """
    ids = outputs.get("class_ids")
    if ids is not None and ids.ndim == 1 and ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    scores = outputs.get("scores")
    if scores is None and len(outputs) == 1:
        scores = next(iter(outputs.values()))
    if scores is not None and scores.ndim == 2 and scores.shape[1] >= 2 and scores.dtype.kind == "f":
        return np.argmax(scores, axis=1)
    return None


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (not empty)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Window:
    """The comparison of one (model, stable version, canary version) since ``since``; guarded by the mirror's lock."""

    model: str
    stable: int
    canary: int
    since: float = field(default_factory=time.time)
    seen: int = 0             # eligible requests, for the sampling counter
    mirrored: int = 0
    compared: int = 0
    dropped: int = 0
    canary_errors: int = 0
    head_only: int = 0        # compared with only the canary's head run, on stable's trunk features
    rows: int = 0             # classifier rows compared
    agreed_rows: int = 0
    abs_sum: float = 0.0      # other outputs: sum of |stable - canary| over abs_count values
    abs_count: int = 0
    histogram_stable: Counter = field(default_factory=Counter)
    histogram_canary: Counter = field(default_factory=Counter)
    latency_stable: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    latency_canary: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def report(self, fraction: float) -> dict:
        """The JSON of ``GET /v1/models/{name}/shadow`` for this window."""
        return {
            "stable": self.stable, "canary": self.canary, "fraction": fraction,
            "mirrored": self.mirrored, "compared": self.compared, "dropped": self.dropped,
            "canary_errors": self.canary_errors,
            "agreement": self.agreed_rows / self.rows if self.rows else None,
            "js_divergence": js_divergence(self.histogram_stable, self.histogram_canary),
            "latency_ms": {"stable": _latency(self.latency_stable), "canary": _latency(self.latency_canary)},
            "class_histogram": {"stable": _histogram(self.histogram_stable),
                                "canary": _histogram(self.histogram_canary)},
            "since": rfc3339(self.since),
            # Beyond the shape: the counts behind agreement, and the figure for non-classifiers.
            "rows": self.rows, "agreed_rows": self.agreed_rows,
            "mean_abs_diff": self.abs_sum / self.abs_count if self.abs_count else None,
            "canary_head_only": self.head_only,
        }


def empty_report(fraction: float, labels: Mapping[str, int]) -> dict:
    """The report of a model with no window: no ``stable`` or no ``canary`` label (or both on one version)."""
    return {
        "stable": labels.get(STABLE), "canary": labels.get(CANARY), "fraction": fraction,
        "mirrored": 0, "compared": 0, "dropped": 0, "canary_errors": 0,
        "agreement": None, "js_divergence": None,
        "latency_ms": {"stable": None, "canary": None},
        "class_histogram": {"stable": {}, "canary": {}},
        "since": None, "rows": 0, "agreed_rows": 0, "mean_abs_diff": None, "canary_head_only": 0,
    }


def _latency(samples: deque) -> dict | None:
    if not samples:
        return None
    values = list(samples)
    return {"p50": round(percentile(values, 0.50) * 1000, 3), "p99": round(percentile(values, 0.99) * 1000, 3)}


def _histogram(counts: Counter) -> dict[str, int]:
    return {str(k): counts[k] for k in sorted(counts)}


@dataclass
class _Item:
    """One mirrored request: what the canary needs and stable's side of the comparison. Holds no version."""

    window: Window
    signature: str
    inputs: dict[str, np.ndarray]
    stable_outputs: dict[str, np.ndarray]
    stable_seconds: float
    features: tuple[str, np.ndarray] | None = None   # (trunk fingerprint, stable's trunk features)


class ShadowMirror:
    """Mirrors a fraction of stable's answers to canary and compares them; thread-safe.

    ``manager`` gives the labels in force and holds the canary while it runs.
    ``fraction`` 0 mirrors nothing and starts no thread. ``busy`` says whether the primary
    traffic needs the machine now (None: never). Call :meth:`close` to stop.
    """

    def __init__(self, manager: ModelManager, fraction: float, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 workers: int = DEFAULT_WORKERS, runner: CanaryRunner = run_signature,
                 busy: Callable[[], bool] | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"shadow fraction must be within 0..1, got {fraction}")
        self._manager = manager
        self._fraction = fraction
        self._runner = runner
        self._busy = busy
        self._lock = threading.Lock()
        self._windows: dict[str, Window] = {}
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"graft-shadow-{i}", daemon=True)
                         for i in range(workers if fraction > 0 else 0)]
        for thread in self._threads:
            thread.start()

    @property
    def fraction(self) -> float:
        """The fraction of stable's eligible requests that are mirrored."""
        return self._fraction

    def offer(self, model: str, version: int | None, label: str | None, served: int, signature: str,
              inputs: Mapping[str, np.ndarray], outputs: Outputs, seconds: float) -> None:
        """Stable's answer to one request (``version``/``label`` as the client addressed it, ``served``
        the version that answered, ``seconds`` its latency): queue it for the canary when it is
        sampled. Never blocks and never raises for the canary's sake. (:meth:`claim`, then
        :meth:`submit`.)"""
        window = self.claim(model, version, label, served)
        if window is not None:
            self.submit(window, signature, inputs, outputs, seconds)

    def claim(self, model: str, version: int | None, label: str | None, served: int) -> Window | None:
        """Before stable runs: the window when this request is to be mirrored (eligible and sampled), else
        None. Deciding first lets the run keep what the canary can reuse (its trunk features)."""
        if self._fraction <= 0 or self._closed:
            return None
        if label != STABLE and not (label is None and version is None):
            return None
        labels = self._manager.labels(model)
        stable, canary = labels.get(STABLE), labels.get(CANARY)
        if stable is None or canary is None or stable == canary or served != stable:
            return None
        with self._lock:
            window = self._window(model, stable, canary)
            window.seen += 1
            if math.floor(window.seen * self._fraction) == math.floor((window.seen - 1) * self._fraction):
                return None
            return window

    def submit(self, window: Window, signature: str, inputs: Mapping[str, np.ndarray], outputs: Outputs,
               seconds: float, features: tuple[str, np.ndarray] | None = None) -> None:
        """Stable's answer to a claimed request, queued for the canary (or dropped, counted, when the queue
        is full). ``features``: (trunk fingerprint, the trunk features stable's run computed), which a
        canary on the same trunk runs its head on instead of running whole."""
        with self._lock:
            window.mirrored += 1
            if self._queue.full():  # checked first, so a dropped request costs no copy
                window.dropped += 1
                return
        # Copies: the request's buffers may be reused once it is answered.
        item = _Item(window, signature, {k: np.array(v, copy=True) for k, v in inputs.items()},
                     {k: np.array(v, copy=True) for k, v in outputs.items()}, seconds,
                     None if features is None else (features[0], np.array(features[1], copy=True)))
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                window.dropped += 1

    def report(self, model: str) -> dict:
        """The comparison window of ``model`` under its labels now (a new one if a label moved).

        NotFound for a model the server does not know."""
        labels = self._manager.labels(model)
        stable, canary = labels.get(STABLE), labels.get(CANARY)
        with self._lock:
            if stable is None or canary is None or stable == canary:
                self._windows.pop(model, None)
                return empty_report(self._fraction, labels)
            return self._window(model, stable, canary).report(self._fraction)

    def window(self, model: str) -> Window | None:
        """The live window of ``model`` (it keeps counting items mirrored under it after a label moves)."""
        with self._lock:
            return self._windows.get(model)

    def pending(self) -> int:
        """Mirrored items queued and not yet taken by a worker."""
        return self._queue.qsize()

    def reports(self) -> list[dict]:
        """Every current window's report, each with its ``model`` (for the metrics at scrape time)."""
        with self._lock:
            return [{"model": w.model, **w.report(self._fraction)} for w in self._windows.values()]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; items still queued are counted as dropped."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with self._lock:
                    item.window.dropped += 1
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _window(self, model: str, stable: int, canary: int) -> Window:
        window = self._windows.get(model)
        if window is None or (window.stable, window.canary) != (stable, canary):
            window = self._windows[model] = Window(model, stable, canary)
        return window

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._run(item)
            except Exception:  # a bug here must not end the worker
                log.exception("shadow comparison failed")

    def _quiet(self) -> bool:
        """Whether the primary traffic leaves room for a canary run (for QUIET_SPAN_S on end) within
        QUIET_PATIENCE_S."""
        if self._busy is None:
            return True
        now = time.monotonic()
        end, quiet_since, pause = now + QUIET_PATIENCE_S, None, QUIET_POLL_S
        while True:
            if self._busy():
                quiet_since = None
                pause = min(pause * 2, QUIET_POLL_MAX_S)
            else:
                pause = QUIET_POLL_S
                if quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= QUIET_SPAN_S:
                    return True
            if now >= end:
                return False
            time.sleep(min(pause, max(end - now, 0.0) + 1e-4))
            now = time.monotonic()

    def _run(self, item: _Item) -> None:
        window = item.window
        if not self._quiet():
            with self._lock:
                window.dropped += 1
            return
        try:
            with self._hold(window.model, window.canary) as canary:
                if canary is None:
                    with self._lock:
                        window.dropped += 1
                    return
                start = time.perf_counter()
                outputs, head_only = self._runner(canary, item.signature, item.inputs, item.features)
                seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 (any canary failure is counted, never raised)
            log.debug("canary %s/%d failed: %s", window.model, window.canary, exc)
            with self._lock:
                window.canary_errors += 1
            return
        self._compare(item, dict(outputs), seconds, head_only)

    @contextmanager
    def _hold(self, model: str, version: int) -> Iterator[Servable | None]:
        """The canary for the block (None when it is gone); held no longer than the block."""
        try:
            hold = self._manager.acquire(model, version)
            canary = hold.__enter__()
        except NotFound:
            yield None
            return
        try:
            yield canary
        finally:
            hold.__exit__(None, None, None)

    def _compare(self, item: _Item, canary: dict[str, np.ndarray], seconds: float, head_only: bool) -> None:
        stable = item.stable_outputs
        a, b = top1(stable), top1(canary)
        classifier = a is not None and b is not None and a.shape == b.shape
        abs_sum, abs_count = 0.0, 0
        if not classifier:
            common = [k for k in stable if k in canary and stable[k].dtype.kind in "fiu"
                      and canary[k].dtype.kind in "fiu" and stable[k].shape == canary[k].shape]
            if not common:
                with self._lock:
                    item.window.canary_errors += 1  # nothing the two answers share can be compared
                return
            for key in common:
                diff = np.abs(stable[key].astype(np.float64) - canary[key].astype(np.float64))
                abs_sum += float(diff.sum())
                abs_count += diff.size
        with self._lock:
            window = item.window
            window.compared += 1
            window.head_only += head_only
            window.latency_stable.append(item.stable_seconds)
            window.latency_canary.append(seconds)
            if classifier:
                window.rows += int(a.size)
                window.agreed_rows += int(np.count_nonzero(a == b))
                window.histogram_stable.update(a.tolist())
                window.histogram_canary.update(b.tolist())
            else:
                window.abs_sum += abs_sum
                window.abs_count += abs_count

