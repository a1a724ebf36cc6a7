"""Which models to serve: TF Serving's ModelServerConfig text proto, as dataclasses.

``parse_model_config`` reads the same ``models.config`` files TF Serving reads
(``model_config_list { config { name base_path model_version_policy version_labels } }``);
``single_model_config`` covers ``--model_name``/``--model_base_path``. Every problem
raises ``ValueError`` naming the model and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

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


def parse_model_config(text: str) -> list[ModelConfig]:
    """Parse a ModelServerConfig text proto (the contents of ``models.config``)."""
    message = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ValueError(f"model config does not parse: {exc}") from exc
    return model_configs_from_proto(message)


def read_model_config_file(path: str | os.PathLike) -> list[ModelConfig]:
    """Read and parse a ``models.config`` file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read model config file {os.fspath(path)}: {exc}") from exc
    try:
        return parse_model_config(text)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from exc


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
