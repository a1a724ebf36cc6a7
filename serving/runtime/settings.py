"""The typed settings of one graft-serve process: what ``GraftServer(config)`` takes.

Field names are TF Serving's flag names (``--rest_api_port`` -> ``rest_api_port``),
and the defaults are the flags' defaults: ``serving.runtime.main`` builds its
parser from this class, so a flag and its field cannot drift apart. TF Serving's
flags that have no effect in Graft have no field of their own: those given are
kept in ``inert_flags`` (``serving.runtime.compat``). Programs and tests build a
``ServerConfig`` directly, as Flask apps take a config object. Free of TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from serving.limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REST_TIMEOUT_MS,
)
from serving.runtime.compat import INERT_FLAGS
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
    rest_api_enable_cors_support: bool = False
    rest_api_num_threads: int | None = None
    grpc_max_threads: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    enable_batching: bool | None = None
    batching_parameters_file: str = ""
    freeze_graph: bool = True
    # Versions declaring one frozen trunk load it once and batch through it together (serving.trunks).
    shared_trunks: bool = True
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    tensorflow_session_parallelism: int = 0
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
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 0
    ssl_config_file: str = ""
    rest_tls_cert: str = ""
    rest_tls_key: str = ""
    log_level: str = "INFO"
    # Mirror this fraction of stable's requests to canary and compare (serving.shadow); 0: off.
    shadow_fraction: float = 0.0
    # TF Serving flags given that have no effect here, (name, value) sorted by name;
    # serving.runtime.compat says why for each. A mapping is accepted too.
    inert_flags: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.model_config_file and not self.model_base_path:
            raise ValueError("either --model_config_file or --model_base_path is required")
        if bool(self.rest_tls_cert) != bool(self.rest_tls_key):
            raise ValueError("--rest_tls_cert and --rest_tls_key go together")
        if self.auth_metrics and not self.auth_token_file:
            raise ValueError("--auth_metrics needs --auth_token_file")
        if self.rest_api_port and self.rest_api_port == self.port:
            raise ValueError(f"--rest_api_port must differ from --port (both are {self.port})")
        for name in ("tensorflow_session_parallelism", "num_request_iterations_for_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ValueError(f"--shadow_fraction must be within 0..1, got {self.shadow_fraction}")
        for name in ("grpc_event_loop", "rest_event_loop"):
            if getattr(self, name) not in EVENT_LOOPS:
                raise ValueError(f"--{name} must be one of {', '.join(EVENT_LOOPS)}, got {getattr(self, name)!r}")
        # A list from a caller becomes a tuple, so the config stays hashable and frozen.
        object.__setattr__(self, "grpc_channel_arguments", tuple(tuple(a) for a in self.grpc_channel_arguments))
        object.__setattr__(self, "inert_flags", _inert(self.inert_flags))

    @property
    def batching_enabled(self) -> bool:
        """Whether requests are batched: as asked, else whenever a parameters file is given."""
        if self.enable_batching is None:
            return bool(self.batching_parameters_file)
        return self.enable_batching

    @property
    def intra_op_threads(self) -> int:
        """TensorFlow's intra-op threads: the flag, else --tensorflow_session_parallelism (0: TF decides)."""
        return self.tensorflow_intra_op_parallelism or self.tensorflow_session_parallelism

    @property
    def inter_op_threads(self) -> int:
        """TensorFlow's inter-op threads: the flag, else --tensorflow_session_parallelism (0: TF decides)."""
        return self.tensorflow_inter_op_parallelism or self.tensorflow_session_parallelism

    def replace(self, **changes) -> ServerConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def field_default(name: str):
    """The default of one ServerConfig field (the flag's default)."""
    return next(f.default for f in dataclasses.fields(ServerConfig) if f.name == name)


def _inert(flags: Mapping[str, object] | Iterable[tuple[str, object]]) -> tuple[tuple[str, object], ...]:
    pairs = flags.items() if isinstance(flags, Mapping) else flags
    checked = []
    for name, value in pairs:
        flag = INERT_FLAGS.get(name)
        if flag is None:
            raise ValueError(f"inert_flags: --{name} is not a TF Serving flag Graft accepts without effect")
        # bool is an int subclass: an int flag must not take True.
        if not isinstance(value, flag.kind) or (flag.kind is int and isinstance(value, bool)):
            raise ValueError(f"inert_flags: --{name} takes a {flag.kind.__name__}, got {value!r}")
        checked.append((name, value))
    return tuple(sorted(checked))
