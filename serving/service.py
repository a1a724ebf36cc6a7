"""InferenceService: the one protocol-neutral core that the REST and gRPC adapters call.

It resolves model / version / label through the manager, validates inputs against
the signature (each error names the input), decodes encoded images for image
signatures, runs through the version's batcher when batching is on, records
metrics, and refuses new work while draining. It knows no wire format except the
tf.Example bytes that Classify/Regress are defined over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graft.contract import (
    CLASSIFY_METHOD,
    LINEAGE_METADATA_KEY,
    PREDICT_METHOD,
    REGRESS_METHOD,
    training_summary,
)
from serving.codecs import image
from serving.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServingError,
    Unavailable,
    located,
    metric_code,
)
from serving.limits import DEFAULT_MAX_IMAGE_PIXELS
from serving.shadow import TRUNK_FEATURES, ShadowMirror, Window, empty_report
from serving.statistics import StatisticsSnapshot, Timing, VersionStatistics

if TYPE_CHECKING:
    from serving.batching import Batcher
    from serving.config import BatchingConfig, VersionPolicy
    from serving.manager import ModelManager, VersionStatus
    from serving.metrics import ServingMetrics
    from serving.servable import Servable, SignatureSpec

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
# Seconds a client should wait before retrying a server that is shutting down.
DRAIN_RETRY_AFTER = 1.0

Inputs = Mapping[str, np.ndarray]


@dataclass
class PredictCall:
    """One Predict request, whatever protocol carried it.

    ``inputs`` is either the arrays themselves or a function from the resolved
    signature to the arrays, for formats (REST JSON) whose decoding needs the
    signature's dtypes. An object array of ``bytes`` for a float image input means
    encoded images. ``deadline`` is a ``time.monotonic()`` instant.
    """

    model: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""
    inputs: Inputs | Callable[[SignatureSpec], Inputs] = field(default_factory=dict)
    output_filter: Sequence[str] = ()
    deadline: float | None = None
    protocol: str = "grpc"


@dataclass
class PredictResult:
    """Outputs of a Predict, with the version that served it."""

    model: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


@dataclass
class ExamplesCall:
    """One Classify or Regress request: serialized tf.Example protos plus an optional context.

    The context's serialized bytes are prepended to each example, which is how TF
    Serving merges ``example_list_with_context`` (protobuf concatenation = merge).
    """

    model: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""
    examples: Sequence[bytes] = ()
    context: bytes | None = None
    deadline: float | None = None
    protocol: str = "grpc"


@dataclass
class ClassifyResult:
    """Per example, a list of ``(label, score)`` pairs in the signature's class order."""

    model: str
    version: int
    signature_name: str
    classifications: list[list[tuple[str, float]]]


@dataclass
class RegressResult:
    """One regression value per example."""

    model: str
    version: int
    signature_name: str
    values: list[float]


@dataclass
class InferenceTask:
    """One task of a MultiInference: a signature and the method it must have.

    ``model`` (with its ``version`` or ``label``) names another model than the call's:
    allowed only when every task's version shares one loaded trunk (Graft's fan-out).
    """

    signature_name: str
    method_name: str
    model: str | None = None
    version: int | None = None
    label: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A model, and optionally its version or label (None: the model's latest)."""

    name: str
    version: int | None = None
    label: str | None = None


@dataclass
class FanOutCall:
    """One input set for several models that share one trunk: one trunk pass, then each head.

    ``inputs`` as ``PredictCall``'s, decoded against the first model's signature.
    """

    models: Sequence[ModelRef]
    signature_name: str = ""
    inputs: Inputs | Callable[[SignatureSpec], Inputs] = field(default_factory=dict)
    deadline: float | None = None
    protocol: str = "rest"


@dataclass
class MultiInferenceCall:
    """Several classify/regress tasks on one model version over the same examples."""

    model: str
    version: int | None = None
    label: str | None = None
    tasks: Sequence[InferenceTask] = ()
    examples: Sequence[bytes] = ()
    context: bytes | None = None
    deadline: float | None = None
    protocol: str = "grpc"


@dataclass
class MetadataResult:
    """A version's SignatureDefMap (tensorflow_serving.apis.get_model_metadata_pb2) and lineage."""

    model: str
    version: int
    signature_def_map: Any
    lineage: dict | None = None   # assets.extra/graft.json, when the version has one


@dataclass
class ModelDescription:
    """How one version is served: its default signature, batching and version policy.

    ``batching`` is the batching in force for that signature (None: its requests
    run one by one, because batching is off or the signature cannot be batched).
    """

    model: str
    version: int
    signature: SignatureSpec | None
    batching: BatchingConfig | None
    policy: VersionPolicy


@dataclass
class RepositoryModel:
    """One configured model and the state of each version the server knows, newest first.

    ``unloaded``: a client unloaded it (:meth:`InferenceService.unload_model`) and none loaded it since.
    """

    name: str
    unloaded: bool
    versions: list[VersionStatus]


# How long a client's load or unload waits for the model to settle, in seconds.
LOAD_WAIT_S = 300.0
UNLOAD_WAIT_S = 60.0


class InferenceService:
    """The serving core. Thread-safe; one instance per process, shared by every adapter."""

    def __init__(self, manager: ModelManager, *, metrics: ServingMetrics | None = None,
                 batching: BatchingConfig | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, allow_reload_requests: bool = True,
                 shadow: ShadowMirror | None = None, shared_queue: Callable[[], int] | None = None):
        self._manager = manager
        self._shadow = shadow   # mirrors a fraction of stable's answers to canary (serving.shadow)
        # Rows queued in batchers this service does not own: the shared trunks' groups
        # (serving.trunks.TrunkRegistry.queued_rows), where shared versions' requests wait.
        self._shared_queue = shared_queue
        self._allow_reload_requests = allow_reload_requests
        self._metrics = metrics
        self._batching = batching
        self._max_image_pixels = max_image_pixels
        self._lock = threading.Lock()
        self._batchers: dict[tuple[str, int, str], Batcher | None] = {}
        # Each loaded version's statistics live as long as its Servable (and no longer).
        self._statistics: weakref.WeakKeyDictionary[Servable, VersionStatistics] = weakref.WeakKeyDictionary()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._draining = False
        # on_unload closes the batchers of a version once the manager has drained it.
        manager.add_listener(self)

    # ------------------------------------------------------------------ inference

    def predict(self, request: PredictCall) -> PredictResult:
        """Run a signature on validated inputs; only the filtered outputs are returned."""
        with self._request(request.protocol, "predict", request.model, request.deadline) as record:
            with self._manager.acquire(request.model, request.version, request.label) as servable:
                sig, wanted, inputs = self._predict_inputs(servable, request, record)
                claim = self._claim(request, servable)
                outputs = self._run(servable, sig, inputs, request.deadline, record.timing, claim is not None)
                self._mirror(claim, servable, sig.name, inputs, outputs, record)
                return _predict_result(servable, sig, wanted, outputs)

    async def predict_async(self, request: PredictCall) -> PredictResult:
        """:meth:`predict` for an event loop: the same checks and metrics, but the batch
        wait (or, with batching off, the model run in a worker thread) is awaited."""
        with self._request(request.protocol, "predict", request.model, request.deadline) as record:
            with self._manager.acquire(request.model, request.version, request.label) as servable:
                sig, wanted, inputs = self._predict_inputs(servable, request, record)
                claim = self._claim(request, servable)
                outputs = await self._run_async(servable, sig, inputs, request.deadline, record.timing,
                                                claim is not None)
                self._mirror(claim, servable, sig.name, inputs, outputs, record)
                return _predict_result(servable, sig, wanted, outputs)

    def _predict_inputs(self, servable: Servable, request: PredictCall,
                        record: Callable) -> tuple[SignatureSpec, list[str], dict[str, np.ndarray]]:
        sig = self._signature(servable, request.signature_name)
        record(servable.version, sig.name, servable=servable)  # bad inputs, too, count against the version
        wanted = _output_filter(sig, request.output_filter)
        raw = request.inputs(sig) if callable(request.inputs) else request.inputs
        inputs = self._validate(sig, raw)
        record(servable.version, sig.name, _batch_size(sig, inputs), servable=servable,
               inferences=_run_rows(sig, inputs))
        return sig, wanted, inputs

    def classify(self, request: ExamplesCall) -> ClassifyResult:
        """Run a classify signature over tf.Examples."""
        return self._examples(request, CLASSIFY_METHOD)

    def regress(self, request: ExamplesCall) -> RegressResult:
        """Run a regress signature over tf.Examples."""
        return self._examples(request, REGRESS_METHOD)

    def _examples(self, request: ExamplesCall, method: str) -> ClassifyResult | RegressResult:
        """Classify or regress: one path, told apart by the signature method it needs."""
        label, result_type, read = _EXAMPLE_METHODS[method]
        with self._request(request.protocol, label, request.model, request.deadline) as record:
            with self._manager.acquire(request.model, request.version, request.label) as servable:
                sig = self._method_signature(servable, request.signature_name, method)
                record(servable.version, sig.name, len(request.examples), servable=servable)
                inputs = _examples_tensor(sig, request.examples, request.context)
                self._check_example_images(request.examples, request.context)
                claim = self._claim(request, servable) if method == CLASSIFY_METHOD else None
                outputs = self._run(servable, sig, inputs, request.deadline, record.timing, claim is not None)
                self._mirror(claim, servable, sig.name, inputs, outputs, record)
                return result_type(servable.name, servable.version, sig.name, read(outputs, len(request.examples)))

    def warm(self, servable: Servable, call: PredictCall | ExamplesCall, method: str) -> None:
        """Run one warmup call on ``servable`` (loaded, not yet AVAILABLE) with a request's checks.

        The same signature lookup, input validation, image limits and output checks
        as a request of that method; no batching and no request metrics, as the
        version serves nobody yet. Raises what the request would.
        """
        if method == PREDICT_METHOD:
            sig, _, inputs = self._predict_inputs(servable, call, lambda *a, **k: None)  # no request to count
            servable.run(sig.name, inputs)
            return
        if method not in _EXAMPLE_METHODS:
            raise InvalidArgument(f"Unsupported signature method_name: {method}")
        _, _, read = _EXAMPLE_METHODS[method]
        sig = self._method_signature(servable, call.signature_name, method)
        inputs = _examples_tensor(sig, call.examples, call.context)
        self._check_example_images(call.examples, call.context)
        read(servable.run(sig.name, inputs), len(call.examples))

    def multi_inference(self, request: MultiInferenceCall) -> list[ClassifyResult | RegressResult]:
        """Run several classify/regress tasks on one version, in task order."""
        if not request.tasks:
            raise InvalidArgument("MultiInferenceRequest has no tasks")
        seen = set()
        for task in request.tasks:
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
            key = task.signature_name or DEFAULT_SIGNATURE
            if (_task_model(request, task), key) in seen:
                raise InvalidArgument(f"Duplicate evaluation of signature: {key}")
            seen.add((_task_model(request, task), key))
        if len({_task_model(request, task) for task in request.tasks}) > 1:
            return self._fan_out_examples(request)
        with self._request(request.protocol, "multi_inference", request.model, request.deadline) as record:
            with self._manager.acquire(request.model, request.version, request.label) as servable:
                sigs = [self._method_signature(servable, t.signature_name, t.method_name)
                        for t in request.tasks]
                self._check_example_images(request.examples, request.context)
                record(servable.version, ",".join(s.name for s in sigs), len(request.examples), servable=servable)
                results: list[ClassifyResult | RegressResult] = []
                n = len(request.examples)
                for task, sig in zip(request.tasks, sigs):
                    inputs = _examples_tensor(sig, request.examples, request.context)
                    outputs = self._run(servable, sig, inputs, request.deadline, record.timing)
                    if task.method_name == CLASSIFY_METHOD:
                        results.append(ClassifyResult(servable.name, servable.version, sig.name,
                                                      _classifications(outputs, n)))
                    else:
                        results.append(RegressResult(servable.name, servable.version, sig.name,
                                                     _regressions(outputs, n)))
                return results

    def _fan_out_examples(self, request: MultiInferenceCall) -> list[ClassifyResult]:
        """A MultiInference whose tasks name several models (or versions): one pass of the trunk
        they all share over the examples, then each task's head. InvalidArgument when they do not
        share one loaded trunk."""
        n = len(request.examples)
        with self._request(request.protocol, "multi_inference", request.model, request.deadline) as record, \
                ExitStack() as held:
            servables = [held.enter_context(self._manager.acquire(*_task_model(request, task)))
                         for task in request.tasks]
            sigs = [self._method_signature(s, t.signature_name, t.method_name)
                    for s, t in zip(servables, request.tasks)]
            group = _one_trunk(servables, "MultiInference tasks naming several models")
            self._check_example_images(request.examples, request.context)
            record(servables[0].version, ",".join(s.name for s in sigs), n, servable=servables[0])
            inputs = _examples_tensor(sigs[0], request.examples, request.context)
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise DeadlineExceeded("Deadline exceeded before the request could run")
            outputs = group.fan_out([(s, sig.name) for s, sig in zip(servables, sigs)], inputs,
                                    request.deadline, record.timing)
            return [ClassifyResult(s.name, s.version, sig.name, _classifications(o, n))
                    for s, sig, o in zip(servables, sigs, outputs)]

    def fan_out(self, request: FanOutCall) -> list[PredictResult]:
        """Answer one input set from several models that share one loaded trunk, with one trunk pass.

        Graft's extension (REST ``POST /v1/trunks:fanout``). InvalidArgument when the
        models do not share one loaded trunk, or name one model version twice.
        """
        if not request.models:
            raise InvalidArgument("a fan-out needs at least one model")
        first = request.models[0].name
        with self._request(request.protocol, "fan_out", first, request.deadline) as record, ExitStack() as held:
            servables = [held.enter_context(self._manager.acquire(m.name, m.version, m.label))
                         for m in request.models]
            if len({(s.name, s.version) for s in servables}) < len(servables):
                raise InvalidArgument("a fan-out names one model version more than once")
            sigs = [self._signature(s, request.signature_name) for s in servables]
            group = _one_trunk(servables, "a fan-out")
            record(servables[0].version, sigs[0].name, servable=servables[0])
            raw = request.inputs(sigs[0]) if callable(request.inputs) else request.inputs
            inputs = self._validate(sigs[0], raw)
            record(servables[0].version, sigs[0].name, _batch_size(sigs[0], inputs), servable=servables[0],
                   inferences=_run_rows(sigs[0], inputs) * len(servables))
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise DeadlineExceeded("Deadline exceeded before the request could run")
            outputs = group.fan_out([(s, sig.name) for s, sig in zip(servables, sigs)], inputs,
                                    request.deadline, record.timing)
            return [PredictResult(s.name, s.version, sig.name, o) for s, sig, o in zip(servables, sigs, outputs)]

    def _claim(self, request: PredictCall | ExamplesCall, servable: Servable) -> Window | None:
        """Whether the shadow mirror wants this request's stable answer (asked before the run, so that a
        run on a shared trunk keeps its features for the canary's head)."""
        if self._shadow is None or self._shadow.fraction <= 0:
            return None
        try:
            return self._shadow.claim(request.model, request.version, request.label, servable.version)
        except Exception:  # the mirror must never fail a primary request
            log.exception("shadow mirroring failed for %s", request.model)
            return None

    def _mirror(self, claim: Window | None, servable: Servable, signature: str, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray], record: _Served) -> None:
        """Hand a claimed request's stable answer to the shadow mirror; whatever happens there, the
        client's answer stands (and never carries the trunk features kept for the canary)."""
        if claim is None:
            return
        features = outputs.pop(TRUNK_FEATURES, None)
        try:
            group = servable.shared_trunk()
            kept = None if features is None or group is None else (servable.trunk_info()["fingerprint"], features)
            self._shadow.submit(claim, signature, inputs, outputs, time.perf_counter() - record.start, kept)
        except Exception:  # the mirror must never fail a primary request
            log.exception("shadow mirroring failed for %s", servable.name)

    def busy(self) -> bool:
        """Whether requests are waiting for a model now: rows queued in a batcher (the service's own
        or a shared trunk's), or, without batching, more than one request running (the shadow
        mirror runs only when this is false)."""
        if self._shared_queue is not None and self._shared_queue():
            return True
        with self._lock:
            batchers = [b for b in self._batchers.values() if b is not None]
        if batchers:
            return any(b.queue_depth() for b in batchers)
        return self._in_flight > 1

    def shadow_report(self, name: str) -> dict:
        """The live comparison of ``name``'s stable and canary versions (``GET /v1/models/{name}/shadow``).

        NotFound for an unknown model; zero counts when shadow evaluation is off or a label is missing.
        """
        if self._shadow is None:
            return empty_report(0.0, self._manager.labels(name))
        return self._shadow.report(name)

    # ------------------------------------------------------------------- metadata

    def model_status(self, name: str, version: int | None = None,
                     label: str | None = None) -> list[VersionStatus]:
        """TF Serving's GetModelStatus: the versions of ``name`` and their states."""
        return self._manager.status(name, version, label)

    def model_metadata(self, name: str, version: int | None = None,
                       label: str | None = None) -> MetadataResult:
        """The SignatureDefMap of the resolved version."""
        with self._manager.acquire(name, version, label) as servable:
            return MetadataResult(servable.name, servable.version, servable.signature_def_map(),
                                  servable.lineage())

    def list_models(self) -> list[dict]:
        """Every configured model with its versions (TF Serving's status shape) and labels."""
        models = []
        for name in self._manager.model_names():
            statuses = self._manager.status(name)
            models.append({
                "name": name,
                "model_version_status": [self._with_training_summary(name, s) for s in statuses],
                "labels": dict(self._manager.labels(name)),
            })
        _count_trunk_groups(models)
        return models

    def _with_training_summary(self, name: str, status: VersionStatus) -> dict:
        """A version's status JSON plus, when it is AVAILABLE with a lineage, its training summary."""
        entry = version_status_json(status)
        if status.state == "AVAILABLE":
            try:
                with self._manager.acquire(name, status.version) as servable:
                    lineage = servable.lineage()
                    trunk = servable.trunk_info()
            except ServingError:  # unloaded since the status was read
                lineage = trunk = None
            if lineage is not None:
                entry[LINEAGE_METADATA_KEY] = training_summary(lineage)
                if trunk is not None:
                    entry[LINEAGE_METADATA_KEY]["trunk"] = trunk
        return entry

    def statistics(self, name: str = "", version: int | None = None,
                   label: str | None = None) -> list[StatisticsSnapshot]:
        """The statistics of loaded versions: one version (or label) of ``name``, every AVAILABLE
        version of ``name``, or, without a name, of every model. NotFound for an unknown model
        or a version that is not loaded."""
        if version is not None or label is not None:
            with self._manager.acquire(name, version, label) as servable:
                return [self._statistics_of(servable).snapshot()]
        snapshots = []
        for model in [name] if name else self._manager.model_names():
            try:
                versions = self._manager.available_versions(model)
            except NotFound:
                if name:
                    raise
                continue  # removed from the config since it was listed
            for number in versions:
                try:
                    with self._manager.acquire(model, number) as servable:
                        snapshots.append(self._statistics_of(servable).snapshot())
                except NotFound:
                    continue  # unloaded since it was listed
        return snapshots

    def model_description(self, name: str, version: int | None = None,
                          label: str | None = None) -> ModelDescription:
        """How the resolved version of ``name`` is served: default signature, batching, version policy."""
        with self._manager.acquire(name, version, label) as servable:
            sig = servable.signatures.get(DEFAULT_SIGNATURE)
            batching = self._batching if sig is not None and _is_batchable(sig) else None
            return ModelDescription(servable.name, servable.version, sig, batching,
                                    self._manager.model_config(name).policy)

    def repository_index(self) -> list[RepositoryModel]:
        """Every configured model, loaded or not, with the state of each version the server knows."""
        index = []
        for name in self._manager.model_names():
            try:
                unloaded = self._manager.is_unloaded(name)
            except NotFound:
                continue  # removed from the config since it was listed
            try:
                versions = self._manager.status(name)
            except NotFound:  # no version found on disk yet
                versions = []
            index.append(RepositoryModel(name, unloaded, versions))
        return index

    def load_model(self, name: str, timeout: float = LOAD_WAIT_S) -> None:
        """A client's load of a configured model (V2's repository extension): serve it again after
        an unload, and pick up new versions on disk now; returns once a version is AVAILABLE.

        Only names in the server's model config can be loaded (NotFound otherwise): a client
        cannot point the server at a directory. PermissionDenied with
        ``--enable_reload_config_rpc=false``; Unavailable while draining; FailedPrecondition
        when no version could be loaded; DeadlineExceeded after ``timeout`` seconds (the load
        goes on).
        """
        self._check_model_control("load")
        if self._draining:
            raise Unavailable("Server is shutting down", retry_after=DRAIN_RETRY_AFTER)
        self._manager.load(name, timeout)

    def unload_model(self, name: str, timeout: float = UNLOAD_WAIT_S) -> None:
        """A client's unload of a configured model: it stops taking new requests at once, its
        versions unload as their in-flight requests finish (labels included), and it stays
        unloaded until a client loads it again. Waits up to ``timeout`` seconds for that drain;
        requests still running then keep their version until they finish.

        NotFound for a name the config does not know; PermissionDenied as for :meth:`load_model`.
        """
        self._check_model_control("unload")
        self._manager.unload(name, timeout)

    def _check_model_control(self, action: str) -> None:
        # Load and unload change what the server serves, as a reload_config does: one switch for all.
        if not self._allow_reload_requests:
            raise PermissionDenied(
                f"model {action} requests are disabled on this server (--enable_reload_config_rpc=false)")

    def ready(self) -> bool:
        """True when not draining and every configured model has an AVAILABLE version
        (models a client unloaded excepted)."""
        return not self._draining and self._manager.ready()

    def not_ready(self) -> dict[str, str]:
        """Why each model that keeps the server from being ready is not, by name (``/readyz`` shows it)."""
        return self._manager.not_ready()

    def live(self) -> bool:
        """True while the process can answer at all (also while draining)."""
        return True

    @property
    def draining(self) -> bool:
        """Whether :meth:`begin_drain` was called."""
        return self._draining

    def reload_config(self, configs) -> None:
        """Replace the served model list (models missing from it unload)."""
        self._manager.reload_config(list(configs))

    def reload_config_request(self, configs) -> None:
        """A client's ``reload_config`` (ModelService.HandleReloadConfigRequest).

        ``PermissionDenied`` when the server was started with
        ``--enable_reload_config_rpc=false``: the request can point the server at
        any directory it can read. The operator's own ``--model_config_file``
        polling is not affected.
        """
        if not self._allow_reload_requests:
            raise PermissionDenied(
                "HandleReloadConfigRequest is disabled on this server (--enable_reload_config_rpc=false)")
        self.reload_config(configs)

    # -------------------------------------------------------------------- shutdown

    def begin_drain(self) -> None:
        """Refuse new inference requests with Unavailable; those already admitted finish.

        Queued requests run at once: no new request can join their batches, so
        waiting out ``batch_timeout_micros`` would only delay the drain.
        """
        with self._idle:
            self._draining = True
            self._idle.notify_all()
        with self._lock:
            batchers = [b for b in self._batchers.values() if b is not None]
        for batcher in batchers:
            batcher.flush()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` seconds passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        """Close every batcher (after a drain); the manager is stopped by its owner."""
        with self._lock:
            batchers = [b for b in self._batchers.values() if b is not None]
            self._batchers.clear()
        for batcher in batchers:
            batcher.close(drain=True)

    # ---------------------------------------------------------- ManagerListener

    def on_state(self, name: str, version: int, state: str) -> None:
        """An UNLOADING version gets no new requests: its queued ones run now, without waiting
        out the batch timeout for company that cannot come (as :meth:`begin_drain` does)."""
        if state != "UNLOADING":
            return
        with self._lock:
            batchers = [b for k, b in self._batchers.items() if k[0] == name and k[1] == version and b is not None]
        for batcher in batchers:
            batcher.flush()

    def on_load(self, name: str, version: int, seconds: float, error: str | None) -> None:
        """ManagerListener hook; the service keeps no per-load data."""

    def on_unload(self, name: str, version: int) -> None:
        """Close that version's batchers and drop its statistics: its in-flight requests are already done."""
        with self._lock:
            keys = [k for k in self._batchers if k[0] == name and k[1] == version]
            batchers = [self._batchers.pop(k) for k in keys]
            for servable in [s for s in self._statistics if s.name == name and s.version == version]:
                del self._statistics[servable]
        for batcher in batchers:
            if batcher is not None:
                batcher.close(drain=True)

    # -------------------------------------------------------------------- helpers

    @contextmanager
    def _request(self, protocol: str, method: str, model: str, deadline: float | None = None) -> Iterator[_Served]:
        """Admit one inference request (or refuse it while draining); record its metrics and,
        once it reached a version, that version's statistics.

        A caller cancelled at or after ``deadline`` (gRPC cancels a call when its
        deadline passes, racing the server's own expiry) counts as DEADLINE_EXCEEDED.
        """
        with self._idle:
            if self._draining:
                raise Unavailable("Server is shutting down", retry_after=DRAIN_RETRY_AFTER)
            self._in_flight += 1
        start = time.perf_counter()
        served = _Served()
        code = "OK"
        try:
            yield served
        except asyncio.CancelledError:  # an asyncio caller's client went away
            expired = deadline is not None and time.monotonic() >= deadline
            code = DeadlineExceeded.code if expired else Cancelled.code
            raise
        except Exception as exc:
            code = metric_code(exc)
            if isinstance(exc, ServingError):
                exc.counted = True
            raise
        finally:
            seconds = time.perf_counter() - start
            if self._metrics is not None:
                self._metrics.observe_request(model, served.version, served.signature, method, protocol, code,
                                              seconds)
                if code == "OK":
                    self._metrics.observe_examples(model, served.version, served.signature, method,
                                                   served.examples)
            if served.servable is not None:
                self._statistics_of(served.servable).record_request(code == "OK", seconds, served.inferences,
                                                                    served.timing)
            with self._idle:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.notify_all()

    def observe_refusal(self, protocol: str, method: str, model: str, error: ServingError,
                        seconds: float) -> None:
        """Count an inference request that an adapter refused before the service saw it
        (a body that is not JSON, one too large, a malformed URL or message): the request
        metrics cover every answer, not only those the service gave. Does nothing for an
        error the service already counted."""
        if error.counted:
            return
        error.counted = True
        if self._metrics is not None:
            self._metrics.observe_request(model, None, "", method, protocol, error.code, seconds)

    @staticmethod
    def _signature(servable: Servable, name: str) -> SignatureSpec:
        key = name or DEFAULT_SIGNATURE
        sig = servable.signatures.get(key)
        if sig is None:
            # TF Serving's code and wording for an unknown Predict signature.
            raise FailedPrecondition(f'Serving signature key "{key}" not found.')
        return sig

    @staticmethod
    def _method_signature(servable: Servable, name: str, method: str) -> SignatureSpec:
        key = name or DEFAULT_SIGNATURE
        sig = servable.signatures.get(key)
        if sig is None:
            raise InvalidArgument(f"No signature was found with the name: {key}")
        if sig.method_name != method:
            kind = "classification" if method == CLASSIFY_METHOD else "regression"
            # TF Serving reports this as INVALID_ARGUMENT with exactly this wording.
            raise InvalidArgument(
                f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}")
        if len(sig.inputs) != 1:
            raise InvalidArgument("Expected one input Tensor.")
        return sig

    def _validate(self, sig: SignatureSpec, inputs: Inputs) -> dict[str, np.ndarray]:
        """Check names, dtypes, shapes and batch agreement; decode encoded images."""
        expected = ", ".join(sig.inputs)
        for name in inputs:
            if name not in sig.inputs:
                raise InvalidArgument(
                    f"unknown input '{name}' for signature '{sig.name}'; expected: {expected}")
        for name in sig.inputs:
            if name not in inputs:
                raise InvalidArgument(
                    f"missing input '{name}' for signature '{sig.name}'; expected: {expected}")
        out = {}
        for name, spec in sig.inputs.items():
            arr = self._coerce(sig, name, spec, np.asarray(inputs[name]))
            if spec.shape is not None:
                if arr.ndim != len(spec.shape) or any(
                        want is not None and want != got for want, got in zip(spec.shape, arr.shape)):
                    raise InvalidArgument(
                        f"input '{name}' expects shape {_shape_text(spec.shape)} "
                        f"but got {list(arr.shape)}")
            out[name] = arr
        batched = {n: a.shape[0] for n, a in out.items() if _is_batched(sig.inputs[n])}
        if len(set(batched.values())) > 1:
            sizes = ", ".join(f"{n}={b}" for n, b in batched.items())
            raise InvalidArgument(f"inputs have inconsistent batch sizes: {sizes}")
        return out

    def _coerce(self, sig: SignatureSpec, name: str, spec, arr: np.ndarray) -> np.ndarray:
        if spec.dtype.kind == "O":
            if arr.dtype.kind == "O":
                strings = arr
            elif arr.dtype.kind == "S":
                strings = arr.astype(object)
            elif arr.dtype.kind == "U":
                strings = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(arr)
            else:
                raise InvalidArgument(f"input '{name}' expects string but got {arr.dtype.name}")
            self._check_string_images(name, strings)
            return strings
        if arr.dtype == spec.dtype:
            return arr
        if arr.dtype.kind in "OS" and _is_image_signature(sig):
            return self._decode_images(name, spec, arr)
        got = "string" if arr.dtype.kind in "OSU" else arr.dtype.name
        raise InvalidArgument(f"input '{name}' expects {spec.dtype.name} but got {got}")

    def _check_string_images(self, name: str, strings: np.ndarray) -> None:
        # The model may decode these itself (tf.io.decode_image): --max_image_pixels
        # must hold there too, before TensorFlow allocates the pixels.
        for i, value in enumerate(strings.flat):
            if isinstance(value, bytes):
                with located(f"input '{name}' item {i}"):
                    image.check_image_pixels(value, self._max_image_pixels)

    def _check_example_images(self, examples: Sequence[bytes], context: bytes | None) -> None:
        for i, serialized in enumerate(examples):
            with located(f"example {i}"):
                image.check_example_images(serialized, self._max_image_pixels)
        if context:
            with located("context"):
                image.check_example_images(context, self._max_image_pixels)

    def _decode_images(self, name: str, spec, arr: np.ndarray) -> np.ndarray:
        _, height, width, _ = spec.shape
        if height is None or width is None:
            raise InvalidArgument(
                f"input '{name}' has no fixed height and width, so encoded images cannot be resized")
        if arr.ndim != 1:
            raise InvalidArgument(
                f"input '{name}': encoded images must be a list of {{\"b64\": ...}} values, "
                f"got shape {list(arr.shape)}")
        images = []
        for i, data in enumerate(arr.tolist()):
            if not isinstance(data, bytes):
                raise InvalidArgument(f"input '{name}': item {i} is not image bytes")
            with located(f"input '{name}' item {i}"):
                images.append(image.decode_image(data, height, width, max_pixels=self._max_image_pixels))
        if not images:
            return np.zeros((0, height, width, 3), dtype=spec.dtype)
        return np.stack(images).astype(spec.dtype, copy=False)

    def _run(self, servable: Servable, sig: SignatureSpec, inputs: dict[str, np.ndarray],
             deadline: float | None, timing: Timing, features: bool = False) -> dict[str, np.ndarray]:
        # features: a run on a shared trunk also returns its trunk features (TRUNK_FEATURES).
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("Deadline exceeded before the request could run")
        batcher = self._batcher(servable, sig, features) if _batch_size(sig, inputs) else None
        if batcher is None:
            return self._run_direct(servable, sig, inputs, timing, None, features)
        return batcher.submit(inputs, deadline, timing)

    async def _run_async(self, servable: Servable, sig: SignatureSpec, inputs: dict[str, np.ndarray],
                         deadline: float | None, timing: Timing, features: bool = False) -> dict[str, np.ndarray]:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("Deadline exceeded before the request could run")
        batcher = self._batcher(servable, sig, features) if _batch_size(sig, inputs) else None
        if batcher is None:
            return await asyncio.to_thread(self._run_direct, servable, sig, inputs, timing, time.perf_counter(),
                                           features)
        return await batcher.submit_async(inputs, deadline, timing)

    def _run_direct(self, servable: Servable, sig: SignatureSpec, inputs: dict[str, np.ndarray],
                    timing: Timing, queued: float | None, features: bool = False) -> dict[str, np.ndarray]:
        """One model run without a batcher, timed as a batch's run is: for the inference
        histogram, and as one execution in the version's statistics. ``queued`` is when
        the run was handed to this worker thread (its wait counts as queueing)."""
        start = time.perf_counter()
        try:
            if features and servable.shared_trunk() is not None:
                outputs = servable.run_with_features(sig.name, inputs)
            else:
                outputs = servable.run(sig.name, inputs)
        finally:
            seconds = time.perf_counter() - start
            if self._metrics is not None:
                self._metrics.observe_inference(servable.name, servable.version, sig.name, seconds)
        timing.add(0.0 if queued is None else start - queued, 0.0, seconds, 0.0)
        self._statistics_of(servable).on_execution(_run_rows(sig, inputs), 0.0, seconds, 0.0)
        return outputs

    def _statistics_of(self, servable: Servable) -> VersionStatistics:
        with self._lock:
            return self._statistics_locked(servable)

    def _statistics_locked(self, servable: Servable) -> VersionStatistics:
        stats = self._statistics.get(servable)
        if stats is None:
            stats = self._statistics[servable] = VersionStatistics(servable.name, servable.version)
        return stats

    def _batcher(self, servable: Servable, sig: SignatureSpec, features: bool = False) -> Batcher | None:
        if self._batching is None or not _is_batchable(sig):
            return None
        shared = servable.member_batcher(sig.name, features, executions=self._statistics_of(servable))
        if shared is not None:  # its trunk group's batcher, shared with other models (serving.trunks)
            return shared
        key = (servable.name, servable.version, sig.name)
        with self._lock:
            if key not in self._batchers:
                from serving.batching import Batcher  # only when batching is configured

                observer = (self._metrics.batch_observer(servable.name, servable.version, sig.name)
                            if self._metrics is not None else None)
                self._batchers[key] = Batcher(
                    functools.partial(servable.run, sig.name), self._batching, observer=observer,
                    executions=self._statistics_locked(servable),
                    name=f"{servable.name}/{servable.version}/{sig.name}")
            return self._batchers[key]


def _task_model(request: MultiInferenceCall, task: InferenceTask) -> tuple[str, int | None, str | None]:
    """The (model, version, label) a MultiInference task runs on: its own, else the call's."""
    if task.model is None:
        return request.model, request.version, request.label
    return task.model, task.version, task.label


def _one_trunk(servables: Sequence[Servable], what: str):
    """The one trunk group every servable shares (``serving.trunks``); InvalidArgument naming why not."""
    groups = [s.shared_trunk() for s in servables]
    for servable, group in zip(servables, groups):
        if group is None:
            raise InvalidArgument(f"{what} need them all to share one loaded trunk: model {servable.name} "
                                  f"version {servable.version} does not run a shared trunk (TF Serving allows "
                                  "one model name per MultiInference)")
        if group is not groups[0]:
            raise InvalidArgument(f"{what} need them all to share one loaded trunk: model {servable.name} "
                                  f"version {servable.version} runs trunk {group.short}, model "
                                  f"{servables[0].name} version {servables[0].version} trunk {groups[0].short}")
    return groups[0]


def _count_trunk_groups(models: list[dict]) -> None:
    """Give each listed trunk without a ``group_size`` (one loaded standalone) the number of
    listed versions declaring its fingerprint; a shared trunk's comes from its group."""
    trunks = [entry[LINEAGE_METADATA_KEY]["trunk"] for model in models for entry in model["model_version_status"]
              if "trunk" in entry.get(LINEAGE_METADATA_KEY, {})]
    for trunk in trunks:
        if trunk.get("group_size") is None:
            trunk["group_size"] = sum(1 for other in trunks if other["fingerprint"] == trunk["fingerprint"])


def version_status_json(status: VersionStatus) -> dict:
    """One VersionStatus in TF Serving's REST shape."""
    return {
        "version": str(status.version),
        "state": status.state,
        "status": {"error_code": status.error_code, "error_message": status.error_message},
    }


def _predict_result(servable: Servable, sig: SignatureSpec, wanted: list[str],
                    outputs: dict[str, np.ndarray]) -> PredictResult:
    if wanted:
        outputs = {name: outputs[name] for name in wanted}
    return PredictResult(servable.name, servable.version, sig.name, outputs)


def _output_filter(sig: SignatureSpec, names: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for name in names:
        if name not in sig.outputs:
            raise InvalidArgument(
                f"output tensor alias not found in signature: {name} Outputs expected to be "
                f"in the set {{{','.join(sig.outputs)}}}.")
        if name in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {name}")
        seen.append(name)
    return seen


def _shape_text(shape) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"


def _is_batched(spec) -> bool:
    return spec.shape is not None and len(spec.shape) >= 1 and spec.shape[0] is None


def _is_batchable(sig: SignatureSpec) -> bool:
    # Rows from several requests may only be concatenated when every input and output
    # has a free leading (batch) dimension.
    return all(_is_batched(s) for s in sig.inputs.values()) and all(
        _is_batched(s) for s in sig.outputs.values())


def _batch_size(sig: SignatureSpec, inputs: dict[str, np.ndarray]) -> int:
    sizes = [a.shape[0] for n, a in inputs.items() if _is_batched(sig.inputs[n]) and a.ndim]
    return sizes[0] if sizes else 0


def _run_rows(sig: SignatureSpec, inputs: dict[str, np.ndarray]) -> int:
    """How many inferences one run of ``inputs`` makes: its rows, or 1 without a batch dimension."""
    sizes = [a.shape[0] for n, a in inputs.items() if _is_batched(sig.inputs[n]) and a.ndim]
    return sizes[0] if sizes else 1


class _Served:
    """What one request reached (version, signature, rows) and where its time went.

    Called by the request's path once it knows more: ``record(version, signature,
    examples, servable=..., inferences=...)``. The version's statistics count the
    request only when its ``servable`` is given; ``inferences`` defaults to ``examples``.
    """

    __slots__ = ("examples", "inferences", "servable", "signature", "start", "timing", "version")

    def __init__(self) -> None:
        self.start = time.perf_counter()   # the request's admission: stable's side of shadow latency
        self.version: int | None = None
        self.servable: Servable | None = None
        self.signature = ""
        self.examples = 0
        self.inferences = 0
        self.timing = Timing()

    def __call__(self, version: int, signature: str, examples: int = 0, *, servable: Servable | None = None,
                 inferences: int | None = None) -> None:
        self.version, self.signature, self.examples = version, signature, examples
        self.servable = servable
        self.inferences = examples if inferences is None else inferences


def _is_image_signature(sig: SignatureSpec) -> bool:
    if len(sig.inputs) != 1:
        return False
    spec = next(iter(sig.inputs.values()))
    return (spec.dtype.kind == "f" and spec.shape is not None and len(spec.shape) == 4
            and spec.shape[3] in (3, None))


def _examples_tensor(sig: SignatureSpec, examples: Sequence[bytes],
                     context: bytes | None) -> dict[str, np.ndarray]:
    if not examples:
        raise InvalidArgument("Input is empty")
    (name, spec), = sig.inputs.items()
    if spec.dtype.kind != "O":
        raise InvalidArgument(f"signature '{sig.name}' input '{name}' is not a string tensor")
    arr = np.empty(len(examples), dtype=object)
    arr[:] = [context + e for e in examples] if context else list(examples)
    return {name: arr}


def _classifications(outputs: dict[str, np.ndarray], n: int) -> list[list[tuple[str, float]]]:
    classes = outputs.get("classes")
    scores = outputs.get("scores")
    if classes is None and scores is None:
        raise InvalidArgument(
            'Expected classification signature outputs to contain at least one of "classes" or "scores".')
    for what, tensor in (("classes", classes), ("scores", scores)):
        if tensor is None:
            continue
        if tensor.ndim != 2:
            raise InvalidArgument(
                f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)} for {what}")
        if tensor.shape[0] != n:
            raise InvalidArgument(f"Expected {what} output batch size of {n}. Got: {tensor.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise InvalidArgument(
            f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}")
    width = (classes if classes is not None else scores).shape[1]
    labels = ([[_text(c) for c in row] for row in classes.tolist()] if classes is not None
              else [[""] * width for _ in range(n)])
    values = scores.astype(np.float32).tolist() if scores is not None else [[0.0] * width] * n
    return [list(zip(lab, val)) for lab, val in zip(labels, values)]


def _regressions(outputs: dict[str, np.ndarray], n: int) -> list[float]:
    values = outputs.get("outputs")
    if values is None:
        raise InvalidArgument('No regression outputs found in signature: expected "outputs".')
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.shape[0] != n:
        raise InvalidArgument(
            f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
            f"but got {list(values.shape)}")
    return values.astype(np.float32).tolist()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# Signature method -> (metric method label, result type, reader of the outputs).
_EXAMPLE_METHODS: dict[str, tuple[str, type, Callable[[dict[str, np.ndarray], int], list]]] = {
    CLASSIFY_METHOD: ("classify", ClassifyResult, _classifications),
    REGRESS_METHOD: ("regress", RegressResult, _regressions),
}
