"""The typed settings of one graft-serve process: what ``GraftServer(config)`` takes.

Field names are TF Serving's flag names (``--rest_api_port`` -> ``rest_api_port``),
and the defaults are the flags' defaults: ``serving.runtime.main`` builds its
parser from this class, so a flag and its field cannot drift apart. Programs and
tests build a ``ServerConfig`` directly, as Flask apps take a config object.
Free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serving.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REST_TIMEOUT_MS,
)
from serving.runtime.loop import EVENT_LOOPS

DEFAULT_DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of graft-serve. ``None`` means "derived at start" where a field allows it.

    Raises ValueError on construction when the settings contradict each other.
    """

    port: int = 8500
    rest_api_port: int = 8501
    host: str = "0.0.0.0"
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    rest_api_timeout_in_ms: int = DEFAULT_REST_TIMEOUT_MS
    rest_api_num_threads: int | None = None
    grpc_max_threads: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    enable_batching: bool | None = None
    batching_parameters_file: str = ""
    freeze_graph: bool = True
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    tensorflow_cpus: int = 0
    python_switch_interval_micros: int | None = None
    grpc_event_loop: str = "auto"
    grpc_channel_arguments: tuple[tuple[str, int | str], ...] = ()
    rest_event_loop: str = "auto"
    per_process_gpu_memory_fraction: float = 0.0
    gpu_memory_limit_mb: int = 0
    gpu_memory_growth: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    enable_metrics: bool = True
    monitoring_config_file: str = ""
    auth_token_file: str = ""
    auth_metrics: bool = False
    enable_reload_config_rpc: bool = True
    ssl_config_file: str = ""
    rest_tls_cert: str = ""
    rest_tls_key: str = ""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.model_config_file and not self.model_base_path:
            raise ValueError("either --model_config_file or --model_base_path is required")
        if bool(self.rest_tls_cert) != bool(self.rest_tls_key):
            raise ValueError("--rest_tls_cert and --rest_tls_key go together")
        if self.auth_metrics and not self.auth_token_file:
            raise ValueError("--auth_metrics needs --auth_token_file")
        for name in ("grpc_event_loop", "rest_event_loop"):
            if getattr(self, name) not in EVENT_LOOPS:
                raise ValueError(f"--{name} must be one of {', '.join(EVENT_LOOPS)}, got {getattr(self, name)!r}")
        # A list from a caller becomes a tuple, so the config stays hashable and frozen.
        object.__setattr__(self, "grpc_channel_arguments", tuple(tuple(a) for a in self.grpc_channel_arguments))

    @property
    def batching_enabled(self) -> bool:
        """Whether requests are batched: as asked, else whenever a parameters file is given."""
        if self.enable_batching is None:
            return bool(self.batching_parameters_file)
        return self.enable_batching

    def replace(self, **changes) -> ServerConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def field_default(name: str):
    """The default of one ServerConfig field (the flag's default)."""
    return next(f.default for f in dataclasses.fields(ServerConfig) if f.name == name)
