"""ModelManager: which versions are loaded, their lifecycle, and safe access to them.

One poller scans every model's repository; one loader thread does all loading,
warmup and unloading, so the request path never waits on disk or TensorFlow
graph construction. Rules, as TF Serving's availability-preserving policy:

- a version the policy (or a label) wants is loaded, warmed up, then AVAILABLE;
- a version no longer wanted goes UNLOADING only once every wanted version is
  AVAILABLE (new before old), and is unloaded once its in-flight requests (the
  references held by :meth:`ModelManager.acquire`) are done;
- a version that fails to load is END with an error, earlier versions keep
  serving, and the load is retried with exponential back-off;
- a model a client unloaded (:meth:`ModelManager.unload`) wants no version,
  drains and unloads every one, labelled ones included, until a client loads it
  again (:meth:`ModelManager.load`); it stays in the config meanwhile.

All listener callbacks run on the loader thread, in order, outside the lock.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import tensorflow as tf

from serving.config import ModelConfig
from serving.errors import (
    HTTP_STATUS_BY_CODE,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from serving.repository import Repository, select_versions
from serving.servable import Servable, status_code, tf_error_message

log = logging.getLogger(__name__)


# TF error codes share gRPC's numbering; map them to the names status reports.
_TF_CODE_NAMES = {getattr(tf.errors, n): n for n in HTTP_STATUS_BY_CODE if hasattr(tf.errors, n)}


class VersionState(enum.StrEnum):
    """TF Serving's version states; a failed load is END with an error."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


@dataclass
class VersionStatus:
    """One version's state as GetModelStatus reports it."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


class ManagerListener(Protocol):
    """Observer of version lifecycle events (metrics, and the service for its batchers)."""

    def on_state(self, name: str, version: int, state: VersionState) -> None:
        """A version entered ``state``."""

    def on_load(self, name: str, version: int, seconds: float, error: str | None) -> None:
        """A load (with warmup) finished after ``seconds``; ``error`` is None on success."""

    def on_unload(self, name: str, version: int) -> None:
        """A drained version is about to be unloaded; no request holds it any more."""


@dataclass(eq=False)
class _Version:
    model: "_Model" = field(repr=False)
    number: int
    path: str
    state: VersionState = VersionState.START
    servable: Servable | None = None
    refs: int = 0
    unload_queued: bool = False
    error_code: str = "OK"
    error_message: str = ""
    failures: int = 0
    retry_at: float = 0.0


@dataclass(eq=False)
class _Model:
    config: ModelConfig
    repository: Repository
    versions: dict[int, _Version] = field(default_factory=dict)
    complete: dict[int, str] = field(default_factory=dict)   # from the last scan
    pending: frozenset[int] = frozenset()                     # seen, not yet settled
    file_labels: dict[str, int] | None = None                 # last good labels.json
    labels: dict[str, int] = field(default_factory=dict)      # in force now
    desired: set[int] = field(default_factory=set)
    latest: _Version | None = None                            # newest AVAILABLE
    removed: bool = False
    unloaded: bool = False                                    # by a client, until it loads it again
    label_notes: dict[str, str] = field(default_factory=dict)  # label -> last logged problem
    labels_error: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def requested_labels(self) -> dict[str, int]:
        # labels.json wins over models.config, label by label.
        return {**self.config.labels, **(self.file_labels or {})}


class ModelManager:
    """Loads, serves and unloads the versions of the configured models.

    ``poll_seconds`` <= 0 disables background polling after :meth:`start` (TF
    Serving's meaning of a zero poll wait); tests call :meth:`poll` directly.
    ``retry_backoff`` is (first delay, maximum delay) in seconds between attempts
    to load a version that failed. ``settle_seconds`` is the pause between the two
    scans :meth:`start` and :meth:`reload_config` make, so that versions already
    on disk pass the completeness check at once. ``warmup`` runs on each loaded
    version before it becomes AVAILABLE and returns how many records it replayed
    (``serving.warmup.replay`` bound to the service); an exception fails the load.
    """

    def __init__(self, configs: list[ModelConfig], *, poll_seconds: float = 1.0,
                 servable_loader: Callable[[str, int, str], Servable] = Servable.load,
                 listener: ManagerListener | None = None,
                 warmup: Callable[[Servable], int] | None = None,
                 retry_backoff: tuple[float, float] = (1.0, 60.0), settle_seconds: float = 0.25):
        self._poll_seconds = poll_seconds
        self._loader = servable_loader
        self._listeners: list[ManagerListener] = [listener] if listener is not None else []
        self._warmup = warmup
        self._backoff = retry_backoff
        self._settle = settle_seconds
        self._lock = threading.Condition(threading.Lock())
        self._poll_lock = threading.Lock()  # serialises scans; taken before _lock
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_event = threading.Event()
        self._poll_thread: threading.Thread | None = None
        self._loader_thread: threading.Thread | None = None
        self._started = False
        self._stopping = False
        self._models: dict[str, _Model] = {}
        for config in _unique(configs):
            self._models[config.name] = _Model(config, Repository(config.base_path))

    # ----- lifecycle ---------------------------------------------------------------

    def add_listener(self, listener: ManagerListener) -> None:
        """Register another listener (e.g. the service, after the manager was built)."""
        with self._lock:
            self._listeners.append(listener)

    def start(self) -> None:
        """Start the loader thread, scan synchronously (twice, see class doc), start polling."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._loader_thread = threading.Thread(target=self._loader_loop, name="graft-model-loader", daemon=True)
        self._loader_thread.start()
        self._scan_settled()
        if self._poll_seconds > 0:
            self._poll_thread = threading.Thread(target=self._poll_loop, name="graft-model-poller", daemon=True)
            self._poll_thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling, unload every version once its requests drain, join the threads.

        Waits at most ``timeout`` seconds for in-flight requests and loads to finish.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._stop_event.set()
        if self._poll_thread is not None:
            self._poll_thread.join()
        if self._loader_thread is None:
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            for model in self._models.values():
                self._reconcile(model)
            done = self._lock.wait_for(self._all_ended, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            log.warning("stopping with versions still in use or loading after %.1fs", timeout)
        self._jobs.put(None)
        self._loader_thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> "ModelManager":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def poll(self) -> None:
        """Scan every model's repository once and schedule loads and unloads."""
        with self._poll_lock:
            with self._lock:
                models = [m for m in self._models.values() if not m.removed]
            results = []
            for model in models:  # disk I/O outside the main lock
                scan = model.repository.scan()
                try:
                    labels, labels_error = model.repository.read_labels(), ""
                except ValueError as exc:
                    labels, labels_error = None, str(exc)
                results.append((model, scan, labels, labels_error))
            with self._lock:
                if self._stopping:
                    return
                for model, scan, labels, labels_error in results:
                    if model.removed:
                        continue
                    model.complete = dict(scan.versions)
                    model.pending = scan.pending
                    if labels_error:
                        if labels_error != model.labels_error:
                            log.error("model %s: ignoring %s; keeping labels %s",
                                      model.name, labels_error, model.labels)
                    else:
                        model.file_labels = labels
                    model.labels_error = labels_error
                    self._reconcile(model)

    def reload_config(self, configs: list[ModelConfig]) -> None:
        """Replace the model list: new models load, missing ones unload, others update."""
        wanted = {c.name: c for c in _unique(configs)}
        with self._poll_lock, self._lock:
            for name, model in list(self._models.items()):
                if name not in wanted and not model.removed:
                    log.info("model %s removed from config", name)
                    model.removed = True
                    self._reconcile(model)
                    self._forget_if_done(model)
            for name, config in wanted.items():
                model = self._models.get(name)
                if model is None:
                    self._models[name] = model = _Model(config, Repository(config.base_path))
                    log.info("model %s added from %s", name, config.base_path)
                if model.config.base_path != config.base_path:
                    model.repository = Repository(config.base_path)
                    model.complete = {}
                model.config = config
                model.removed = False
                self._reconcile(model)
            started = self._started and not self._stopping
        if started:
            self._scan_settled()

    # ----- request path ------------------------------------------------------------

    @contextmanager
    def acquire(self, name: str, version: int | None = None,
                label: str | None = None) -> Iterator[Servable]:
        """Hold one AVAILABLE version of ``name`` for the duration of the block.

        No version or label: the newest AVAILABLE version. Raises NotFound (unknown
        model, version not available) or InvalidArgument (unknown label, or both a
        version and a label). The version is not unloaded while the block runs.
        """
        record = self._take(name, version, label)
        try:
            yield record.servable
        finally:
            with self._lock:
                record.refs -= 1
                if record.refs == 0 and record.state is VersionState.UNLOADING:
                    self._queue_unload(record.model, record)

    def _take(self, name: str, version: int | None, label: str | None) -> _Version:
        if version is not None and label is not None:
            raise InvalidArgument("a request may name a version or a version label, not both")
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed:
                raise NotFound(f"Servable not found for request: {_request_text(name, version, label)}")
            if label is not None:
                version = model.labels.get(label)
                if version is None:
                    raise InvalidArgument(f"Unrecognized servable version label: {label}")
            if version is None:
                record = model.latest
            else:
                record = model.versions.get(version)
                if record is not None and record.state is not VersionState.AVAILABLE:
                    record = None
            if record is None:
                raise NotFound(f"Servable not found for request: {_request_text(name, version, None)}")
            record.refs += 1
            return record

    # ----- queries -----------------------------------------------------------------

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """Status of every known version of ``name`` (newest first), or of one version/label."""
        if version is not None and label is not None:
            raise InvalidArgument("a request may name a version or a version label, not both")
        with self._lock:
            model = self._model(name)
            if label is not None:
                version = model.labels.get(label)
                if version is None:
                    raise InvalidArgument(f"Unrecognized servable version label: {label}")
            records = sorted(model.versions.values(), key=lambda r: r.number, reverse=True)
            if version is not None:
                records = [r for r in records if r.number == version]
                if not records:
                    raise NotFound(f"Could not find version {version} of model {name}")
            if not records:
                raise NotFound(f"Could not find any versions of model {name}")
            return [VersionStatus(r.number, r.state.value, r.error_code, r.error_message) for r in records]

    def model_names(self) -> list[str]:
        """Names of the configured models."""
        with self._lock:
            return sorted(n for n, m in self._models.items() if not m.removed)

    def labels(self, name: str) -> dict[str, int]:
        """Labels in force for ``name`` (each points at an AVAILABLE version)."""
        with self._lock:
            return dict(self._model(name).labels)

    def available_versions(self, name: str) -> list[int]:
        """AVAILABLE versions of ``name``, ascending."""
        with self._lock:
            return self._available(self._model(name))

    def ready(self) -> bool:
        """True when every configured model has an AVAILABLE version (unloaded ones excepted)."""
        with self._lock:
            return all(m.latest is not None for m in self._models.values() if not (m.removed or m.unloaded))

    def not_ready(self) -> dict[str, str]:
        """Why each model that keeps the server from being ready has no AVAILABLE version, by name."""
        with self._lock:
            return {m.name: _not_ready_reason(m) for m in self._models.values()
                    if m.latest is None and not (m.removed or m.unloaded)}

    def model_config(self, name: str) -> ModelConfig:
        """The configuration ``name`` is served with."""
        with self._lock:
            return self._model(name).config

    def is_unloaded(self, name: str) -> bool:
        """Whether a client unloaded ``name`` and none loaded it since."""
        with self._lock:
            return self._model(name).unloaded

    # ----- model control (a client's load and unload) -------------------------------

    def load(self, name: str, timeout: float) -> None:
        """Serve ``name`` again after :meth:`unload`, and rescan its base path now (new versions
        load without waiting for the next poll; failed ones are retried at once). Returns once
        no wanted version is still loading, if one is AVAILABLE.

        Raises NotFound for a name the config does not know, FailedPrecondition when no
        version could be loaded (naming each one's error), DeadlineExceeded when loading
        takes longer than ``timeout`` seconds (it goes on).
        """
        with self._lock:
            model = self._configured(name)
            if model.unloaded:
                log.info("model %s: loaded again by a client", name)
            model.unloaded = False
            for record in model.versions.values():
                record.retry_at = 0.0
            started = self._started and not self._stopping
        if started:
            self._scan_settled()
        with self._lock:
            self._reconcile(model)
            if not self._lock.wait_for(lambda: model.removed or self._settled(model), timeout=timeout):
                raise DeadlineExceeded(f"model {name} is still loading after {timeout:g}s; the load goes on")
            if model.removed:
                raise NotFound(f"model {name} was removed from the config while it loaded")
            if model.latest is not None:
                return
            failed = [f"version {r.number}: {r.error_message}"
                      for r in sorted(model.versions.values(), key=lambda r: -r.number)
                      if r.error_code != "OK" and r.number in model.complete]
            if failed:
                raise FailedPrecondition(f"model {name}: no version could be loaded; " + "; ".join(failed))
            raise FailedPrecondition(f"model {name}: {_not_ready_reason(model)}")  # what /readyz says too

    def unload(self, name: str, timeout: float) -> None:
        """Stop serving ``name``: no new request reaches it from now on, and each version
        unloads once its in-flight requests are done (labels do not keep one). Waits up to
        ``timeout`` seconds for that. NotFound for a name the config does not know.
        """
        with self._lock:
            model = self._configured(name)
            if not model.unloaded:
                log.info("model %s: unloaded by a client; its versions unload once their requests finish", name)
            model.unloaded = True
            self._reconcile(model)
            self._lock.wait_for(
                lambda: all(r.state is VersionState.END for r in model.versions.values()), timeout=timeout)

    def _configured(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None or model.removed:
            raise NotFound(f"model {name} is not in the server's model config; only configured models "
                           "can be loaded or unloaded")
        return model

    @staticmethod
    def _settled(model: _Model) -> bool:
        """No version the model wants is on its way (loading, or draining to load again)."""
        busy = (VersionState.START, VersionState.LOADING, VersionState.UNLOADING)
        return not any(r.state in busy for r in model.versions.values() if r.number in model.desired)

    def wait_until_available(self, name: str, version: int | None = None, timeout: float = 60.0) -> None:
        """Block until ``name`` (or that version) is AVAILABLE; TimeoutError otherwise."""
        def available() -> bool:
            model = self._model(name)
            if version is None:
                return model.latest is not None
            record = model.versions.get(version)
            return record is not None and record.state is VersionState.AVAILABLE

        with self._lock:
            if not self._lock.wait_for(available, timeout=timeout):
                model = self._model(name)
                states = {v: (r.state.value, r.error_message) for v, r in model.versions.items()}
                raise TimeoutError(f"model {name} version {version if version is not None else 'any'} "
                                   f"not available after {timeout}s; versions: {states}")

    # ----- internals (called with self._lock held unless noted) --------------------

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None or model.removed:
            raise NotFound(f"Could not find any versions of model {name}")
        return model

    @staticmethod
    def _available(model: _Model) -> list[int]:
        return sorted(v for v, r in model.versions.items() if r.state is VersionState.AVAILABLE)

    def _set_state(self, model: _Model, record: _Version, state: VersionState) -> None:
        record.state = state
        available = [r for r in model.versions.values() if r.state is VersionState.AVAILABLE]
        model.latest = max(available, key=lambda r: r.number) if available else None
        self._lock.notify_all()

    def _all_ended(self) -> bool:
        return all(r.state is VersionState.END for m in self._models.values() for r in m.versions.values())

    def _reconcile(self, model: _Model) -> None:
        """Bring one model towards its desired versions: schedule loads, move labels, retire."""
        now = time.monotonic()
        if model.removed or model.unloaded or self._stopping:
            desired: set[int] = set()
        else:
            desired = select_versions(model.config.policy, model.complete)
            if model.config.policy.kind == "latest":
                # While a selected version fails to load, the next older ones stand in,
                # so a broken newest version cannot leave the model with nothing to serve.
                failed = [v for v in desired if _failed(model.versions.get(v))]
                spares = sorted(set(model.complete) - desired, reverse=True)[: len(failed)]
                desired |= set(spares)
            # TF Serving requires labelled versions to be loaded, policy or not.
            desired |= {v for v in model.requested_labels().values() if v in model.complete}
        model.desired = desired

        for number in sorted(desired):
            record = model.versions.get(number)
            if record is not None and not (
                    record.state is VersionState.END
                    and (record.error_code == "OK" or now >= record.retry_at)):
                continue
            if record is None:
                record = model.versions[number] = _Version(model, number, model.complete[number])
            else:
                record.path = model.complete[number]
                record.error_code, record.error_message = "OK", ""
                record.unload_queued = False
            self._set_state(model, record, VersionState.START)
            self._emit("on_state", model.name, number, VersionState.START)
            self._jobs.put(lambda m=model, r=record: self._load(m, r))

        self._update_labels(model)

        # New before old: keep unwanted versions until every wanted one is AVAILABLE.
        settled = all(model.versions[v].state is VersionState.AVAILABLE for v in desired)
        if not settled:
            return
        protected = set(model.labels.values())
        for number, record in model.versions.items():
            if record.state is VersionState.AVAILABLE and number not in desired and number not in protected:
                log.info("model %s version %d: unloading once its requests finish", model.name, number)
                self._set_state(model, record, VersionState.UNLOADING)
                self._emit("on_state", model.name, number, VersionState.UNLOADING)
                if record.refs == 0:
                    self._queue_unload(model, record)

    def _update_labels(self, model: _Model) -> None:
        """Apply requested labels whose version is AVAILABLE; otherwise keep the old one."""
        if model.removed or model.unloaded or self._stopping:
            model.labels = {}
            return
        labels: dict[str, int] = {}
        for label, number in model.requested_labels().items():
            record = model.versions.get(number)
            if record is not None and record.state is VersionState.AVAILABLE and number in model.complete:
                labels[label] = number
                model.label_notes.pop(label, None)
                continue
            old = model.labels.get(label)
            old_record = model.versions.get(old) if old is not None else None
            keep = (old_record is not None and old_record.state is VersionState.AVAILABLE
                    and old in model.complete)
            if keep:
                labels[label] = old
            state = record.state.value if record is not None else "not on disk"
            note = f"{number}:{state}"
            if model.label_notes.get(label) != note:
                model.label_notes[label] = note
                level = logging.INFO if state in ("START", "LOADING") else logging.ERROR
                log.log(level, "model %s: label %r -> version %d not applied (version %s); %s",
                        model.name, label, number, state,
                        f"label stays on version {old}" if keep else "label unset")
        model.labels = labels

    def _queue_unload(self, model: _Model, record: _Version) -> None:
        if not record.unload_queued:
            record.unload_queued = True
            self._jobs.put(lambda: self._unload(model, record))

    def _forget_if_done(self, model: _Model) -> None:
        if model.removed and all(r.state is VersionState.END for r in model.versions.values()):
            if self._models.get(model.name) is model:
                del self._models[model.name]

    def _emit(self, method: str, *args) -> None:
        """Queue a listener call, so that all of them run on the loader thread in order."""
        self._jobs.put(lambda: self._notify(method, *args))

    def _notify(self, method: str, *args) -> None:
        """Call every listener (loader thread, lock not held); a failing listener is logged."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            callback = getattr(listener, method, None)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:
                log.exception("manager listener %r failed in %s%r", listener, method, args)

    # ----- threads (lock not held) -------------------------------------------------

    def _loader_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("model loader job failed")

    def _poll_loop(self) -> None:
        while not self._stop_event.wait(self._poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("model repository poll failed")

    def _scan_settled(self) -> None:
        """Poll; if any version was new, poll again after a pause so complete ones load now."""
        self.poll()
        with self._lock:
            pending = any(m.pending and not m.removed for m in self._models.values())
        if pending and not self._stop_event.wait(self._settle):
            self.poll()

    def _load(self, model: _Model, record: _Version) -> None:
        name, number = model.name, record.number
        with self._lock:
            if record.state is not VersionState.START:
                return
            if self._stopping or model.removed or number not in model.desired:
                self._set_state(model, record, VersionState.END)
                self._forget_if_done(model)
                cancelled = True
            else:
                self._set_state(model, record, VersionState.LOADING)
                cancelled = False
            path = record.path
        if cancelled:
            self._notify("on_state", name, number, VersionState.END)
            return
        self._notify("on_state", name, number, VersionState.LOADING)
        log.info("model %s version %d: loading from %s", name, number, path)
        started = time.monotonic()
        servable, error = None, None
        try:
            servable = self._loader(name, number, path)
            if self._warmup is not None:
                count = self._warmup(servable)
                if count:
                    log.info("model %s version %d: replayed %d warmup records", name, number, count)
        except Exception as exc:
            error = exc
            if servable is not None:
                _quiet_unload(servable)
                servable = None
        seconds = time.monotonic() - started

        discard = None
        with self._lock:
            if error is not None:
                record.failures += 1
                delay = min(self._backoff[0] * 2 ** (record.failures - 1), self._backoff[1])
                record.retry_at = time.monotonic() + delay
                record.error_code = status_code(error)
                record.error_message = tf_error_message(error)
                state = VersionState.END
                log.error("model %s version %d failed to load (attempt %d, retry in %.2fs): %s",
                          name, number, record.failures, delay, record.error_message)
            elif self._stopping or model.removed:
                discard, state = servable, VersionState.END
            else:
                record.failures = 0
                record.servable = servable
                state = VersionState.AVAILABLE
                log.info("model %s version %d: AVAILABLE after %.2fs", name, number, seconds)
            self._set_state(model, record, state)
            if state is VersionState.END:
                self._forget_if_done(model)
            # Moves labels onto the new version and retires the ones it replaces, or (after a
            # failure) starts the older ones that stand in, in the same step: a client waiting
            # in load() never sees the failure without its stand-ins. Listeners hear of what
            # this schedules after this version's own events (_emit queues behind this job).
            self._reconcile(model)
        if discard is not None:
            _quiet_unload(discard)
        self._notify("on_load", name, number, seconds, None if error is None else record.error_message)
        self._notify("on_state", name, number, state)

    def _unload(self, model: _Model, record: _Version) -> None:
        self._notify("on_unload", model.name, record.number)
        with self._lock:
            servable, record.servable = record.servable, None
        if servable is not None:
            _quiet_unload(servable)
        with self._lock:
            self._set_state(model, record, VersionState.END)
            self._forget_if_done(model)
        log.info("model %s version %d: unloaded", model.name, record.number)
        self._notify("on_state", model.name, record.number, VersionState.END)
        with self._lock:
            # Wanted again while it drained (e.g. a label moved back): load it now.
            self._reconcile(model)


def _not_ready_reason(model: _Model) -> str:
    """One line on why ``model`` has no AVAILABLE version yet (what an operator should look at)."""
    if model.repository.problem:
        return model.repository.problem
    records = sorted(model.versions.values(), key=lambda r: r.number, reverse=True)
    for record in records:
        if record.state in (VersionState.START, VersionState.LOADING):
            return f"version {record.number} is {record.state.value}"
    for record in records:
        if record.error_code != "OK":
            return f"version {record.number} failed to load: {record.error_message}"
    if model.pending:
        return f"version {max(model.pending)} is still being written (it loads once two scans see it unchanged)"
    return f"no version under {model.config.base_path} that its version policy selects"


def _failed(record: _Version | None) -> bool:
    return record is not None and record.state is VersionState.END and record.error_code != "OK"


def _quiet_unload(servable: Servable) -> None:
    try:
        servable.unload()
    except Exception:
        log.exception("unloading %r failed", servable)


def _request_text(name: str, version: int | None, label: str | None) -> str:
    """TF Serving's wording of a servable request in NotFound messages."""
    if label is not None:
        return f"Labeled({name}, {label})"
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


def _unique(configs: list[ModelConfig]) -> list[ModelConfig]:
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names appear more than once: {duplicates}")
    return list(configs)
