"""One loaded model version: its signatures, their tensor specs, and running them.

Signature defs (with TF Serving method names, which ``tf.saved_model.load`` does not
expose) are read from ``saved_model.pb``; the callable functions come from
``tf.saved_model.load``. ``run`` takes numpy arrays that the service has already
validated and returns numpy arrays. A version can be placed on devices: one
replica per device, each run on the least busy one (``serving.devices``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from graft import contract
from serving.buffers import is_shareable
from serving.devices import ReplicaPool
from serving.errors import Internal, InvalidArgument, NotFound, ServingError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature, keyed by its alias."""

    name: str
    dtype: np.dtype
    tf_dtype: tf.DType
    shape: tuple[int | None, ...] | None

    @classmethod
    def from_tensor_info(cls, alias: str, info: meta_graph_pb2.TensorInfo) -> "TensorSpec":
        """Build the spec of ``alias`` from a SignatureDef's TensorInfo."""
        tf_dtype = tf.as_dtype(info.dtype)
        if info.tensor_shape.unknown_rank:
            shape = None
        else:
            shape = tuple(d.size if d.size >= 0 else None for d in info.tensor_shape.dim)
        return cls(alias, np.dtype(tf_dtype.as_numpy_dtype), tf_dtype, shape)


@dataclass(frozen=True)
class SignatureSpec:
    """A signature's method name and its input and output specs."""

    name: str
    method_name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    @classmethod
    def from_signature_def(cls, name: str, sig: meta_graph_pb2.SignatureDef) -> "SignatureSpec":
        """Build a spec from a SignatureDef proto."""
        inputs = {k: TensorSpec.from_tensor_info(k, v) for k, v in sorted(sig.inputs.items())}
        outputs = {k: TensorSpec.from_tensor_info(k, v) for k, v in sorted(sig.outputs.items())}
        return cls(name, sig.method_name, MappingProxyType(inputs), MappingProxyType(outputs))


def tf_signature_defs(path: str | os.PathLike) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the ``serve`` meta graph in ``path/saved_model.pb``, as TensorFlow's messages.

    Read through ``graft.contract.read_signature_defs``; raises ``ValueError`` when
    the file is not a SavedModel or has no ``serve`` graph.
    """
    return {name: meta_graph_pb2.SignatureDef.FromString(sig.SerializeToString())
            for name, sig in contract.read_signature_defs(path).items()}


class Servable:
    """One loaded version of a model. Built by :meth:`load`; thread-safe to ``run``.

    It holds one replica of the loaded graph per device it was placed on (one per
    GPU; a single one when TensorFlow places it); each run goes to the least busy
    replica (``serving.devices.ReplicaPool``).
    """

    def __init__(self, name: str, version: int, path: str,
                 signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
                 replicas: Sequence[tuple[str | None, Any]], lineage: dict | None = None, *,
                 freeze: bool = True):
        self.name = name
        self.version = version
        self.path = path
        self.devices: tuple[str, ...] = tuple(d for d, _ in replicas if d)
        self.device: str | None = self.devices[0] if self.devices else None
        self._signature_defs = dict(signature_defs)
        self.signatures: Mapping[str, SignatureSpec] = MappingProxyType({
            k: SignatureSpec.from_signature_def(k, v) for k, v in sorted(self._signature_defs.items())
        })
        # Only signatures present in both saved_model.pb and the loaded object can run.
        self._pool: ReplicaPool[_Replica] | None = ReplicaPool([
            _Replica.build(device, loaded, [k for k in self.signatures if k in loaded.signatures], freeze)
            for device, loaded in replicas])
        self._lineage = lineage

    @classmethod
    def load(cls, name: str, version: int, path: str | os.PathLike,
             device: str | Sequence[str] | None = None, freeze: bool = True) -> "Servable":
        """Load the SavedModel at ``path``, once per device in ``device`` (None: TF's default placement).

        A replica's variables are created on its device; its runs execute there.
        With ``freeze`` (``--freeze_graph``), each signature runs with its variables
        folded into constants (see ``_FrozenCall``).
        """
        path = os.fspath(path)
        signature_defs = tf_signature_defs(path)
        devices: Sequence[str | None] = [device] if device is None or isinstance(device, str) else list(device)
        if not devices:
            devices = [None]
        replicas = []
        for where in devices:
            with _placement(where):
                replicas.append((where, tf.saved_model.load(path, tags=[contract.SERVE_TAG])))
        return cls(name, version, path, signature_defs, replicas, _read_lineage(path), freeze=freeze)

    def variable_devices(self) -> dict[str | None, list[str]]:
        """Per replica device, the devices its signatures' variables live on (to check placement)."""
        pool = self._pool
        if pool is None:
            return {}
        result = {}
        for replica in pool.replicas:
            found = {v.device for fn in replica.functions.values() for v in fn.variables}
            result[replica.device] = sorted(found)
        return result

    def in_flight(self) -> list[int]:
        """Runs in flight per replica (all zeros with one replica, which is not tracked)."""
        pool = self._pool
        return pool.in_flight() if pool is not None else []

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one signature on validated numpy inputs; return its outputs as numpy arrays.

        Raises NotFound for an unknown signature, InvalidArgument when the model rejects
        its input (TF's InvalidArgumentError, e.g. undecodable image bytes or a failed
        assertion; TF Serving reports these as INVALID_ARGUMENT too), and Internal for any
        other failure inside the model.
        """
        pool = self._pool
        if pool is None or signature_name not in pool.replicas[0].functions:
            raise NotFound(f'Serving signature name: "{signature_name}" not found in signature def')
        tensors = self._tensors(signature_name, inputs)
        with self._tf_errors(signature_name), pool.acquire() as replica:
            return _numpy(_call(replica.calls[signature_name], replica.device, tensors))

    def then(self, signature_name: str, head: "Servable", head_signature: str,
             key: str) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None:
        """This version's ``signature_name`` followed by ``head``'s ``head_signature`` on its output
        ``key``, as one traced function: one TensorFlow call where running them in turn makes two.

        Returns a callable taking ``run``'s inputs and giving the head's outputs, with
        ``run``'s errors; None when either side is placed on several devices, has no such
        signature, or the two cannot be traced together (logged).
        """
        return self.chain(signature_name, [(head, head_signature)], key)

    def chain(self, signature_name: str, steps: Sequence[tuple["Servable", str]],
              key: str) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None:
        """:meth:`then` over several steps: this version's ``signature_name``, then each
        (servable, signature) of ``steps`` on the output ``key`` of the one before, traced as one."""
        pools = [self._pool, *(servable._pool for servable, _ in steps)]
        if any(pool is None or len(pool.replicas) != 1 for pool in pools):
            return None
        replicas = [pool.replicas[0] for pool in pools]
        names = [signature_name, *(name for _, name in steps)]
        if any(name not in replica.functions for replica, name in zip(replicas, names)) \
                or len({replica.device for replica in replicas}) != 1:
            return None
        replica = replicas[0]
        first, *rest = (r.calls[name] for r, name in zip(replicas, names))

        def traced(**inputs):
            outputs = first(**inputs)
            for call in rest:
                outputs = call(**{key: outputs[key]})
            return outputs
        _, input_specs = replica.functions[signature_name].structured_input_signature
        try:
            with _placement(replica.device):
                composed = tf.function(traced).get_concrete_function(**input_specs)
        except Exception as exc:
            log.warning("%s %s then %s run as %d calls: tracing them as one failed: %s", self.name,
                        signature_name, ", ".join(f"{s.name} {n}" for s, n in steps), len(names),
                        tf_error_message(exc))
            return None
        # Frozen calls compose without captures; unfrozen ones capture their variables.
        call = composed if composed.captured_inputs else _FlatCall(composed)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            tensors = self._tensors(signature_name, inputs)
            with self._tf_errors(signature_name):
                return _numpy(_call(call, replica.device, tensors))
        return run

    def _tensors(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, tf.Tensor]:
        """The signature's inputs as tensors of its dtypes (InvalidArgument for what does not fit)."""
        specs = self.signatures[signature_name].inputs
        tensors = {}
        for key, value in inputs.items():
            spec = specs.get(key)
            if spec is None:
                raise InvalidArgument(f"signature {signature_name!r} has no input {key!r}")
            try:
                tensors[key] = _to_tensor(value, spec)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"input {key!r} cannot be converted to {spec.tf_dtype.name}: "
                                      f"{tf_error_message(exc)}") from exc
        if len(tensors) != len(specs):
            missing = sorted(set(specs) - set(tensors))
            raise InvalidArgument(f"signature {signature_name!r} is missing input(s) {missing}")
        return tensors

    @contextlib.contextmanager
    def _tf_errors(self, signature_name: str):
        """Map a failed run's TensorFlow errors to the serving errors ``run`` documents."""
        try:
            yield
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidArgument(tf_error_message(exc)) from exc
        except TypeError as exc:
            # A missing or extra keyword reaches the concrete function as a TypeError.
            raise InvalidArgument(f"inputs do not match signature {signature_name!r}: {exc}") from exc
        except ServingError:
            raise
        except Exception as exc:
            raise Internal(f"model {self.name} version {self.version} failed: {tf_error_message(exc)}") from exc

    def member_batcher(self, signature_name: str, features: bool = False, executions=None):
        """The batcher this version shares with others for ``signature_name`` (``serving.trunks``), else None.

        None: the version batches alone, in the service's own batcher. ``features``: answers
        also carry the shared trunk's features (``serving.shadow.TRUNK_FEATURES``). ``executions``
        (a ``batching.ExecutionObserver``) hears this version's share of each shared run.
        """

    def shared_trunk(self):
        """The trunk group this version shares (``serving.trunks.TrunkGroup``), None when it runs alone."""

    def trunk_info(self) -> dict | None:
        """The trunk this version declares, ``{"fingerprint", "shared": False}``, or None (a trained trunk).

        A version loaded standalone runs its own copy; ``serving.trunks`` overrides this
        for versions that share theirs.
        """
        trunk = contract.trunk_of(self._lineage)
        return None if trunk is None else {"fingerprint": trunk["fingerprint"], "shared": False}

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        """The SignatureDefMap for GetModelMetadata (a fresh message each call)."""
        result = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in self._signature_defs.items():
            result.signature_def[key].CopyFrom(sig)
        return result

    def lineage(self) -> dict | None:
        """The lineage record from ``assets.extra/graft.json``, read at load time, if any."""
        return copy.deepcopy(self._lineage)

    def unload(self) -> None:
        """Drop the loaded graph so its memory can be freed; ``run`` fails afterwards."""
        self._pool = None
        # The loaded object graph holds reference cycles; collect now rather than at
        # some later allocation, so memory does not grow across version swaps.
        gc.collect()

    def __repr__(self) -> str:
        return f"Servable({self.name!r}, {self.version}, {self.path!r})"


@dataclass(frozen=True)
class _Replica:
    """One copy of the loaded graph on one device (None: TensorFlow's default placement).

    ``functions`` are the restored signatures (their variables tell placement);
    ``calls`` are what ``run`` calls: each signature traced once inside a
    ``tf.function`` and, with ``freeze``, its variables folded into constants
    (:class:`_FrozenCall`). Calling a restored signature maps every captured
    variable through Python on each call (``_WrapperFunction._call_flat``, with
    the GIL held); the traced wrapper captured them once.
    """

    device: str | None
    loaded: Any
    functions: Mapping[str, Callable]
    calls: Mapping[str, Callable]

    @classmethod
    def build(cls, device: str | None, loaded: Any, names: Sequence[str], freeze: bool = True) -> "_Replica":
        """The replica of ``loaded`` on ``device`` with its named signatures prepared for calling."""
        functions = {k: loaded.signatures[k] for k in names}
        calls = {}
        for name, fn in functions.items():
            traced = _traced_call(fn, device)
            calls[name] = _frozen_call(traced, name, device) if freeze else traced
        return cls(device, loaded, functions, calls)


def _placement(device: str | None):
    """``tf.device(device)``, or a context that changes nothing for TensorFlow's default placement."""
    return tf.device(device) if device else contextlib.nullcontext()


def _call(fn: Callable, device: str | None, tensors: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    """``fn(**tensors)``, on ``device`` when the replica has one."""
    if device:
        with tf.device(device):
            return fn(**tensors)
    return fn(**tensors)


def _numpy(outputs: Mapping[str, tf.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in outputs.items()}


def _traced_call(signature, device: str | None) -> Callable:
    """``signature`` wrapped in one traced concrete function (the signature itself if it cannot be)."""
    _, input_specs = signature.structured_input_signature
    try:
        with _placement(device):
            return tf.function(lambda **inputs: signature(**inputs)).get_concrete_function(**input_specs)
    except Exception as exc:  # an exotic signature still runs, only slower
        log.warning("calling signature %s untraced: %s", getattr(signature, "name", signature),
                    tf_error_message(exc))
        return signature


# Ops that write a resource variable. A signature that runs one keeps its variables:
# folded into constants, its writes would be lost between calls.
_VARIABLE_WRITER = re.compile(r"Assign\w*VariableOp|ResourceApply\w+|ResourceSparseApply\w+|ResourceScatter\w+"
                              r"|ResourceStridedSliceAssign")


class _FlatCall:
    """A concrete function without captured inputs, called on its flat inputs: no Python
    argument binding per call. ``structure`` (default: the function itself) gives the
    keyword inputs and the output structure.

    Called like a traced signature: keyword tensors in, the signature's output dict
    out; a missing, extra or mismatched input raises ``TypeError``.
    """

    def __init__(self, function, structure=None) -> None:
        structure = function if structure is None else structure
        _, input_specs = structure.structured_input_signature
        # The flat inputs follow tf.nest's order of the keyword dict: its sorted keys.
        self._names = sorted(input_specs)
        self._specs = [(t.dtype, t.shape) for t in function.inputs]
        if len(self._specs) != len(self._names) or function.captured_inputs:
            raise ValueError(f"graph has {len(self._specs)} inputs and {len(function.captured_inputs)} "
                             f"captures for the signature's {len(self._names)} inputs")
        self._outputs = structure.structured_outputs
        # A signature's outputs are a flat dict: its flat order is the sorted keys.
        self._output_names = (sorted(self._outputs) if isinstance(self._outputs, dict)
                              and all(isinstance(v, tf.Tensor) for v in self._outputs.values()) else None)
        # The graph's own function, called on a flat list.
        self._function = function._inference_function

    def __call__(self, **tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        """Run the graph on the signature's keyword inputs; returns its output tensors by name."""
        if len(tensors) != len(self._names):
            raise TypeError(f"expected inputs {self._names}, got {sorted(tensors)}")
        flat = []
        for name, (dtype, shape) in zip(self._names, self._specs):
            tensor = tensors.get(name)
            if tensor is None:
                raise TypeError(f"expected inputs {self._names}, got {sorted(tensors)}")
            if tensor.dtype != dtype or not shape.is_compatible_with(tensor.shape):
                raise TypeError(f"input {name!r} must be {dtype.name} {shape}, got {tensor.dtype.name} "
                                f"{tensor.shape}")
            flat.append(tensor)
        results = tf.nest.flatten(self._function.call_preflattened(flat))
        if self._output_names is not None:
            return dict(zip(self._output_names, results))
        return tf.nest.pack_sequence_as(self._outputs, results)


class _FrozenCall(_FlatCall):
    """A traced signature with its variables folded into constants, called on its flat inputs.

    Why: a traced signature passes every variable to every call as captured
    inputs (CPU of the calling thread per call, in TensorFlow's eager op set-up),
    and its graph reads them at run time, so Grappler and oneDNN cannot fold batch
    norms into the convolutions or keep the filters in their prepared layout.
    Frozen calls are faster and cheaper for the caller (docs/benchmarks.md,
    seventh pass, has the figures). The cost is a second copy of the weights in
    memory (``--freeze_graph=false`` keeps one).
    """

    def __init__(self, traced) -> None:
        # TensorFlow's private graph freezer: loaded only where --freeze_graph is on.
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        super().__init__(convert_variables_to_constants_v2(traced), traced)


def _frozen_call(traced, name: str, device: str | None) -> Callable:
    """``traced`` as a :class:`_FrozenCall`, or as it is when it cannot be frozen (logged).

    Left as it is: an untraced signature, one that writes its variables, and one
    whose freezing fails (a graph past protobuf's 2 GB, an op the converter does not know).
    """
    if not isinstance(traced, tf.types.experimental.ConcreteFunction):
        return traced
    try:
        graph_def = traced.graph.as_graph_def()
        op_types = {node.op for node in graph_def.node}
        op_types.update(node.op for function in graph_def.library.function for node in function.node_def)
        writers = sorted(t for t in op_types if _VARIABLE_WRITER.fullmatch(t))
        if writers:
            log.info("signature %s writes its variables (%s): served unfrozen", name, ", ".join(writers))
            return traced
        with _placement(device):
            return _FrozenCall(traced)
    except Exception as exc:
        log.warning("signature %s served unfrozen: freezing its variables failed: %s", name, tf_error_message(exc))
        return traced


def _to_tensor(value, spec: TensorSpec) -> tf.Tensor:
    """A tensor of the spec's dtype: sharing the array's memory where it can, else a copy.

    A merged batch (``serving.buffers.aligned_empty``) is shared through DLPack;
    anything else is copied by ``tf.constant``, where inference from a matching
    numpy dtype is the fast path.
    """
    if getattr(value, "dtype", None) == spec.dtype:
        if isinstance(value, np.ndarray) and is_shareable(value):
            return tf.experimental.dlpack.from_dlpack(value.__dlpack__())
        return tf.constant(value)
    return tf.constant(value, dtype=spec.tf_dtype)


def _read_lineage(path: str) -> dict | None:
    """The version's lineage (``graft.contract``); a missing file is None, a bad one is logged and None.

    A version with unreadable lineage still serves: lineage describes it, it does not run it.
    """
    try:
        return contract.read_lineage(path)
    except ValueError as exc:
        log.error("ignoring the lineage of %s: %s", path, exc)
        return None


# TensorFlow's error codes are gRPC's: error_code -> the code's name.
_TF_CODE_NAMES = {code: name for name, code in vars(tf.errors).items() if name.isupper() and isinstance(code, int)}

# Lines TF adds around a graph error that tell a client nothing about its request.
# "File ..." lines are the Python stack that built the failing node, which a graph
# built in this process (a frozen signature) carries.
_TF_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[{{node", 'File "')


def status_code(exc: BaseException) -> str:
    """The gRPC status code name of a failure: a ServingError's own, TensorFlow's error's, else UNKNOWN."""
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, tf.errors.OpError):
        return _TF_CODE_NAMES.get(exc.error_code, "UNKNOWN")
    return "UNKNOWN"


def tf_error_message(exc: BaseException) -> str:
    """The useful part of an error message (TF graph-location noise removed), on one line."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_TF_NOISE)]
    text = " ".join(kept) or " ".join(lines)
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)


def servable_loader(devices: Sequence[str], freeze: bool = True) -> Callable[[str, int, str], Servable]:
    """The manager's loader: ``Servable.load`` placing each version on ``devices`` (none: TF's default).

    ``freeze`` is ``--freeze_graph``: run signatures with their variables folded into constants.
    """
    return functools.partial(Servable.load, device=tuple(devices) or None, freeze=freeze)
