"""The configuration files graft-serve reads, all TF Serving text protos, as dataclasses.

- ``--model_config_file``: which models to serve (ModelServerConfig);
- ``--batching_parameters_file``: how to batch (BatchingParameters);
- ``--monitoring_config_file``: where metrics are served (MonitoringConfig);
- ``--ssl_config_file`` is read here too; its checks live in ``serving.runtime.tls``.

Every file goes through one reader, :func:`read_config_file`, so every problem
(unreadable, bad syntax, bad value) is a ``ValueError`` that starts with the
flag and the path.

Models:

``parse_model_config`` reads the same ``models.config`` files TF Serving reads
(``model_config_list { config { name base_path model_version_policy version_labels } }``);
``single_model_config`` covers ``--model_name``/``--model_base_path``. Every problem
raises ``ValueError`` naming the model and the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message
from tensorflow_serving.config import model_server_config_pb2

from serving.metrics import DEFAULT_METRICS_PATHS, TF_SERVING_METRICS_PATH
from serving.protos.graft import batching_pb2, monitoring_config_pb2

T = TypeVar("T")
POLICY_KINDS = ("latest", "all", "specific")
# TF Serving accepts only this platform for SavedModels; empty means the default.
SUPPORTED_PLATFORMS = ("", "tensorflow")


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk to serve (TF Serving's ServableVersionPolicy)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"version policy must be one of {POLICY_KINDS}, not {self.kind!r}")
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError(f"latest version policy needs num_versions >= 1, got {self.num_versions}")
        if self.kind == "specific":
            if not self.versions:
                raise ValueError("specific version policy needs at least one version")
            if any(v < 0 for v in self.versions):
                raise ValueError(f"specific version policy has a negative version: {list(self.versions)}")
            object.__setattr__(self, "versions", tuple(sorted(set(self.versions))))


@dataclass(frozen=True)
class ModelConfig:
    """One model to serve: its name, its repository directory, policy and fixed labels."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not self.name:
            raise ValueError("model config: name is empty")
        if not self.base_path:
            raise ValueError(f"model config {self.name!r}: base_path is empty")
        for label, version in self.labels.items():
            if not label:
                raise ValueError(f"model config {self.name!r}: empty version label")
            if version < 0:
                raise ValueError(f"model config {self.name!r}: label {label!r} -> negative version {version}")
        # Frozen means frozen: callers must not be able to mutate the labels afterwards.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


def single_model_config(name: str, base_path: str | os.PathLike) -> ModelConfig:
    """The config for ``--model_name``/``--model_base_path``: one model, latest version."""
    return ModelConfig(name=name, base_path=os.fspath(base_path))


def parse_text_proto(text: str, message: Message) -> Message:
    """Parse a text proto into ``message``; ``ValueError`` says which message it is not."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ValueError(f"not a {type(message).__name__} text proto: {exc}") from None
    return message


def read_config_file(path: str | os.PathLike, flag: str, parse: Callable[[str], T]) -> T:
    """``parse`` the text of the file a flag names; every error starts with the flag and the path."""
    where = f"{flag} {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_model_config(text: str) -> list[ModelConfig]:
    """Parse a ModelServerConfig text proto (the contents of ``models.config``)."""
    return model_configs_from_proto(parse_text_proto(text, model_server_config_pb2.ModelServerConfig()))


def read_model_config_file(path: str | os.PathLike) -> list[ModelConfig]:
    """Read and parse ``--model_config_file``."""
    return read_config_file(path, "--model_config_file", parse_model_config)


def model_configs_from_proto(message: model_server_config_pb2.ModelServerConfig) -> list[ModelConfig]:
    """Convert a ModelServerConfig message (e.g. from HandleReloadConfigRequest)."""
    if message.WhichOneof("config") == "custom_model_config":
        raise ValueError("custom_model_config is not supported; use model_config_list")
    configs: list[ModelConfig] = []
    seen: set[str] = set()
    for index, proto in enumerate(message.model_config_list.config):
        where = f"model config #{index + 1}" + (f" ({proto.name!r})" if proto.name else "")
        if not proto.name:
            raise ValueError(f"{where}: name is empty")
        if proto.name in seen:
            raise ValueError(f"{where}: model name {proto.name!r} appears more than once")
        seen.add(proto.name)
        if not proto.base_path:
            raise ValueError(f"{where}: base_path is empty")
        if proto.model_platform not in SUPPORTED_PLATFORMS:
            raise ValueError(f"{where}: model_platform {proto.model_platform!r} is not supported "
                             "(only 'tensorflow')")
        if proto.model_type == model_server_config_pb2.OTHER:
            raise ValueError(f"{where}: model_type OTHER is not supported")
        try:
            configs.append(ModelConfig(
                name=proto.name,
                base_path=proto.base_path,
                policy=_policy_from_proto(proto.model_version_policy),
                labels=dict(proto.version_labels),
            ))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return configs


def _policy_from_proto(policy) -> VersionPolicy:
    """Convert a ServableVersionPolicy message; an unset policy is latest 1, as in TF Serving."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        return VersionPolicy(kind="specific", versions=tuple(policy.specific.versions))
    if choice == "latest":
        # TF Serving treats an unset (0) num_versions as 1.
        return VersionPolicy(kind="latest", num_versions=max(policy.latest.num_versions, 1))
    return VersionPolicy()


# -- batching parameters -------------------------------------------------------------------

def _default_threads() -> int:
    # TF Serving defaults to port::MaxParallelism(): the CPUs this process may use.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's ``BatchingParameters``, with TF Serving's defaults.

    ``max_execution_batch_size`` (None: ``max_batch_size``) caps the rows of one
    run when large-batch splitting is on; it is ignored otherwise. Invalid values
    raise ``ValueError`` naming the field.
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=_default_threads)
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None
    pad_variable_length_inputs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_batch_sizes", tuple(int(s) for s in self.allowed_batch_sizes))
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must not be negative, got {self.batch_timeout_micros}")
        sizes = self.allowed_batch_sizes
        if sizes:
            if sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be positive, got {list(sizes)}")
            if any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"allowed_batch_sizes must be strictly increasing, got {list(sizes)}")
        mx = self.max_execution_batch_size
        if mx is not None and not 1 <= mx <= self.max_batch_size:
            raise ValueError(f"max_execution_batch_size must be in 1..max_batch_size ({self.max_batch_size}), got {mx}")
        if sizes and sizes[-1] != self.execution_batch_size:
            # As TF Serving checks: padding must never take a run past the rows one run may hold.
            field_name = ("max_execution_batch_size" if self.execution_batch_size != self.max_batch_size
                          else "max_batch_size")
            raise ValueError(
                f"allowed_batch_sizes must end with {field_name} ({self.execution_batch_size}), got {list(sizes)}"
            )

    @property
    def execution_batch_size(self) -> int:
        """The most rows one run takes: ``max_execution_batch_size`` when splitting, else ``max_batch_size``."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size is not None:
            return self.max_execution_batch_size
        return self.max_batch_size


def batching_config_from_proto(msg) -> BatchingConfig:
    """A ``BatchingConfig`` from a ``BatchingParameters`` message; unset fields keep the defaults."""
    kwargs: dict = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
                 "max_execution_batch_size"):
        if msg.HasField(name):
            kwargs[name] = int(getattr(msg, name).value)
    if msg.HasField("thread_pool_name"):
        kwargs["thread_pool_name"] = msg.thread_pool_name.value
    if msg.HasField("enable_large_batch_splitting"):
        kwargs["enable_large_batch_splitting"] = bool(msg.enable_large_batch_splitting.value)
    kwargs["allowed_batch_sizes"] = tuple(msg.allowed_batch_sizes)
    kwargs["pad_variable_length_inputs"] = bool(msg.pad_variable_length_inputs)
    return BatchingConfig(**kwargs)


def parse_batching_parameters(text: str) -> BatchingConfig:
    """Parse TF Serving's ``BatchingParameters`` text format (``--batching_parameters_file``).

    Raises ``ValueError`` naming the field for unknown fields, bad syntax or
    invalid values.
    """
    return batching_config_from_proto(parse_text_proto(text, batching_pb2.BatchingParameters()))


def read_batching_parameters_file(path: str | os.PathLike) -> BatchingConfig:
    """Read and parse ``--batching_parameters_file``."""
    return read_config_file(path, "--batching_parameters_file", parse_batching_parameters)


# -- monitoring ----------------------------------------------------------------------------

def parse_monitoring_config(text: str) -> tuple[str, ...]:
    """The REST paths a TF Serving ``MonitoringConfig`` text proto asks metrics to be served at.

    ``/metrics`` and ``prometheus_config.path`` (TF Serving's default path when
    empty), or none when ``prometheus_config.enable`` is false. ``ValueError``
    names the problem: bad syntax, an unknown field, or a path that is not
    absolute or lies under the API's own ``/v1/`` and ``/v2/`` trees.
    """
    prometheus = parse_text_proto(text, monitoring_config_pb2.MonitoringConfig()).prometheus_config
    if not prometheus.enable:
        return ()
    path = prometheus.path or TF_SERVING_METRICS_PATH
    if not path.startswith("/") or path.lower().startswith(("/v1/", "/v2/")) or path.lower() in ("/v1", "/v2"):
        raise ValueError(f"prometheus_config.path must be an absolute path outside /v1 and /v2, got {path!r}")
    return tuple(dict.fromkeys((DEFAULT_METRICS_PATHS[0], path)))


def read_monitoring_config_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Read ``--monitoring_config_file``: the metrics paths it asks for."""
    return read_config_file(path, "--monitoring_config_file", parse_monitoring_config)
