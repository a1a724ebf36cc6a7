"""TF Serving's flags that graft-serve accepts without effect, and why each one has none.

graft-serve takes every flag of TF Serving's ``tensorflow_model_server`` 2.x, so
that a command line written for it starts Graft unchanged (docs/flags.md has the
whole list). Most are implemented (``ServerConfig`` fields of the same name);
those below are accepted with their TF Serving types, kept in
``ServerConfig.inert_flags`` when given, and ``GraftServer.start`` logs one line
for each, saying why it changes nothing here: INFO where Graft already behaves
as the flag asks or the flag tunes something Graft does not have, WARNING where
the user loses something the flag asked for. Free of TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class InertFlag:
    """One accepted TF Serving flag: its value type, TF Serving's default, why it has no effect."""

    kind: type
    tf_serving_default: str
    reason: str
    warn: bool = False  # the flag asks for something Graft does not do: WARNING, not INFO


_TFLITE = "TensorFlow Lite models are not served: every version loads from saved_model.pb"
_XLA = ("TensorFlow's runtime compiles with XLA what the model asks to be compiled (jit_compile=True); "
        "there is no switch for it")
_LOAD_RETRIES = ("a version that fails to load is retried without limit, with back-off from 1 s to 60 s, "
                 "and its error shows in the model's status meanwhile")

INERT_FLAGS = MappingProxyType({
    "grpc_socket_path": InertFlag(
        str, "", "gRPC is served on --host:--port only, not on a UNIX socket", warn=True),
    "allow_version_labels_for_unavailable_models": InertFlag(
        bool, "false", "a label may always name a version that is not AVAILABLE yet: it moves there once "
        "the version is, and stays where it was meanwhile"),
    "enable_per_model_batching_parameters": InertFlag(
        bool, "false", "batching parameters are the server's (--batching_parameters_file); a "
        "batching_params.pbtxt inside a SavedModel is not read", warn=True),
    "num_load_threads": InertFlag(
        int, "0", "versions load one at a time on the loader thread, never on the request path"),
    "num_unload_threads": InertFlag(
        int, "0", "versions unload on the loader thread once their in-flight requests are done"),
    "max_num_load_retries": InertFlag(int, "5", _LOAD_RETRIES),
    "load_retry_interval_micros": InertFlag(int, "60000000", _LOAD_RETRIES),
    "flush_filesystem_caches": InertFlag(
        bool, "true", "Graft holds no file-system cache of its own to flush after a load"),
    "tensorflow_session_config_file": InertFlag(
        str, "", "TensorFlow 2 runs without a Session: threads come from --tensorflow_intra_op_parallelism "
        "and --tensorflow_inter_op_parallelism, GPU memory from --per_process_gpu_memory_fraction",
        warn=True),
    "use_alts_credentials": InertFlag(
        bool, "false", "ALTS is not available: use --ssl_config_file for gRPC over TLS", warn=True),
    "platform_config_file": InertFlag(
        str, "", "Graft serves TensorFlow SavedModels only, set up by its flags", warn=True),
    "saved_model_tags": InertFlag(
        str, "serve", "every version loads the MetaGraph tagged 'serve'", warn=True),
    "remove_unused_fields_from_bundle_metagraph": InertFlag(
        bool, "true", "Graft keeps a loaded version's signatures, not its MetaGraphDef"),
    "prefer_tflite_model": InertFlag(bool, "false", _TFLITE, warn=True),
    "num_tflite_pools": InertFlag(int, "ncpus", _TFLITE),
    "num_tflite_interpreters_per_pool": InertFlag(int, "1", _TFLITE),
    "enable_signature_method_name_check": InertFlag(
        bool, "false", "Classify and Regress always require a signature with the classify or regress "
        "method_name"),
    "xla_cpu_compilation_enabled": InertFlag(bool, "false", _XLA),
    "xla_gpu_compilation_enabled": InertFlag(bool, "false", _XLA),
    "enable_profiler": InertFlag(
        bool, "true", "no TensorFlow profiler service is served"),
    "thread_pool_factory_config_file": InertFlag(
        str, "", "the batch threads are --batching_parameters_file's num_batch_threads; there is no "
        "thread pool factory", warn=True),
    "mixed_precision": InertFlag(
        str, "", "versions run in the precision they were saved in", warn=True),
    "skip_initialize_tpu": InertFlag(bool, "false", "Graft does not initialise or use TPUs"),
    "enable_grpc_healthcheck_service": InertFlag(
        bool, "false", "grpc.health.v1 is always served on --port (NOT_SERVING while draining)"),
    "enable_serialization_as_tensor_content": InertFlag(
        bool, "false", "numeric tensors in responses are always serialized as tensor_content"),
})


def inert_message(name: str, value: object) -> str:
    """The startup line for an accepted flag that has no effect: the flag, its value and why."""
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"--{name}={shown} has no effect in Graft: {INERT_FLAGS[name].reason}"
