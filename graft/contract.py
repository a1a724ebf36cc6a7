"""The contract between graft-train and graft-serve: the model repository on disk.

Both packages import this module and nothing else defines these names. It never
imports TensorFlow, so readers of a repository (promotion, the console, the
server's flag checks) stay fast.

Layout (TF Serving's, plus Graft's own files)::

    <repo>/<model>/                        a model's base path
      <N>/                                 a version: an integer name, complete when visible
        saved_model.pb
        variables/
        assets/labels.txt                  class names, one per line, in score order
        assets.extra/graft.json            lineage (LINEAGE_SCHEMA_VERSION)
        assets.extra/tf_serving_warmup_requests
        assets.extra/graft-segments/<i>/   a frozen-trunk version's trunk alone, cut at each block end:
                                           segment i (i = 0, 1, ...), each a SavedModel
        assets.extra/graft-head/           and its head alone, on the trunk's features
        assets.extra/graft-trunk/          the trunk whole, in place of segments (older exports)
        assets.extra/graft-report/         the training run's report: curves and confusion PNGs, JSON
      labels.json                          {"stable": 3, "canary": 4}
      labels.history.jsonl                 one JSON line per label move
      .tmp-*                               staging directories and files (hidden: never served)
      .graft-publish.lock, .graft-promote.lock

A new key of the lineage (a trunk fingerprint, report files) is added here first:
a name in ``LINEAGE_KEYS`` with its type, so that every reader checks it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# -- layout ------------------------------------------------------------------------------

SAVED_MODEL_FILE = "saved_model.pb"
ASSETS_DIR = "assets"
ASSETS_EXTRA_DIR = "assets.extra"
CLASS_NAMES_FILE = "labels.txt"          # in ASSETS_DIR
LINEAGE_FILE = "graft.json"              # in ASSETS_EXTRA_DIR
WARMUP_FILE = "tf_serving_warmup_requests"  # in ASSETS_EXTRA_DIR (TF Serving's name)
TRUNK_MODEL_DIR = "graft-trunk"          # in ASSETS_EXTRA_DIR
HEAD_MODEL_DIR = "graft-head"            # in ASSETS_EXTRA_DIR
SEGMENTS_DIR = "graft-segments"          # in ASSETS_EXTRA_DIR
REPORT_DIR = "graft-report"              # in ASSETS_EXTRA_DIR
LABELS_FILE = "labels.json"              # in the model's base path
HISTORY_FILE = "labels.history.jsonl"    # in the model's base path
PUBLISH_LOCK_FILE = ".graft-publish.lock"
PROMOTE_LOCK_FILE = ".graft-promote.lock"
TEMP_PREFIX = ".tmp-"

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
METHODS = (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)


def is_version_name(name: str) -> bool:
    """Whether a directory name is a version number as the server reads it ("007" is 7)."""
    return name.isascii() and name.isdigit()


def is_hidden(name: str) -> bool:
    """Whether the server ignores this entry of a base path (staging dirs, locks, dot files)."""
    return name.startswith(".")


def class_names_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets/labels.txt``."""
    return Path(version_dir) / ASSETS_DIR / CLASS_NAMES_FILE


def lineage_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets.extra/graft.json``."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / LINEAGE_FILE


def warmup_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets.extra/tf_serving_warmup_requests``."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / WARMUP_FILE


def trunk_model_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets.extra/graft-trunk``: the trunk whole, as exports before segments carry it (see SHARED_SIGNATURES)."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / TRUNK_MODEL_DIR


def head_model_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets.extra/graft-head``: the version's head as a SavedModel, on ``FEATURES_KEY``."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / HEAD_MODEL_DIR


def segment_model_path(version_dir: str | os.PathLike, index: int) -> Path:
    """``<version>/assets.extra/graft-segments/<index>``: segment ``index`` of the version's trunk (see SEGMENT_SIGNATURE)."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / SEGMENTS_DIR / str(index)


def report_path(version_dir: str | os.PathLike) -> Path:
    """``<version>/assets.extra/graft-report``: the training run's report files, travelling with the version."""
    return Path(version_dir) / ASSETS_EXTRA_DIR / REPORT_DIR


def labels_path(base_path: str | os.PathLike) -> Path:
    """``<base_path>/labels.json``."""
    return Path(base_path) / LABELS_FILE


def history_path(base_path: str | os.PathLike) -> Path:
    """``<base_path>/labels.history.jsonl``."""
    return Path(base_path) / HISTORY_FILE


def _read_optional(path: Path) -> str | None:
    """The text of a file that may be absent (None); ValueError names it when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


# -- labels.json -------------------------------------------------------------------------

def check_labels(labels: Mapping[Any, Any]) -> dict[str, int]:
    """Labels as the server reads them: non-empty string names to version numbers (int >= 0).

    Raises ValueError naming the first bad entry.
    """
    checked: dict[str, int] = {}
    for name, version in labels.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"label names must be non-empty strings, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"label {name!r} must map to a version number (int >= 0), got {version!r}")
        checked[name] = version
    return checked


def parse_labels(text: str, source: str = LABELS_FILE) -> dict[str, int]:
    """Parse the text of ``labels.json``; ValueError names ``source`` and the problem."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of label -> version")
    try:
        return check_labels(data)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def read_labels(base_path: str | os.PathLike) -> dict[str, int] | None:
    """The labels in ``<base_path>/labels.json``; None when there is no such file.

    Raises ValueError naming the file when it exists but cannot be read or is malformed.
    """
    path = labels_path(base_path)
    text = _read_optional(path)
    return None if text is None else parse_labels(text, str(path))


# -- lineage (assets.extra/graft.json) -----------------------------------------------------

LINEAGE_SCHEMA_VERSION = 1
# A version whose exported model keeps its whole trunk frozen declares that trunk:
# versions with equal fingerprints run the same trunk on the same input.
TRUNK_KEYS = ("fingerprint", "base", "cut_layer", "input_shape")
# A declaration may also list the trunk's segments: [{"cut_layer", "fingerprint"}, ...],
# shallowest first, segment i ending at its cut_layer and fingerprinted as the trunk
# cut there would be. The last is the trunk itself (its fingerprint, its cut_layer).
SEGMENT_KEYS = ("cut_layer", "fingerprint")
# The key under which graft-serve's metadata and status answers carry a version's lineage
# (REST metadata, gRPC GetModelMetadata's metadata map, V2 model parameters).
LINEAGE_METADATA_KEY = "graft"


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_size(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_fingerprint(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_segments(value: Any, fingerprint: Any, cut_layer: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(s, dict) and set(s) == set(SEGMENT_KEYS) and _is_fingerprint(s["fingerprint"])
                    and (s["cut_layer"] is None or isinstance(s["cut_layer"], str)) for s in value)
            and len({s["fingerprint"] for s in value}) == len(value)
            and value[-1]["fingerprint"] == fingerprint and value[-1]["cut_layer"] == cut_layer)


def _is_trunk(value: Any) -> bool:
    if not isinstance(value, dict) or not set(TRUNK_KEYS) <= set(value) <= {*TRUNK_KEYS, "segments"}:
        return False
    if "segments" in value and not _is_segments(value["segments"], value["fingerprint"], value["cut_layer"]):
        return False
    shape = value["input_shape"]
    return (_is_fingerprint(value["fingerprint"])
            and isinstance(value["base"], str) and value["base"] != ""
            and (value["cut_layer"] is None or isinstance(value["cut_layer"], str))
            and isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape))


# key -> (check, what the check wants). A record may lack any key but schema_version.
LINEAGE_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "schema_version": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "model_name": (_is_str, "a string"),
    "class_names": (_is_str_list, "a list of strings"),
    "image_size": (_is_size, "[height, width] in pixels"),
    "created_at": (_is_str, "an ISO 8601 time"),
    "base": (_is_str, "a string"),
    "preprocess": (_is_str, "a string"),
    "weights": (_is_object, "an object"),
    "scenario": (lambda v: isinstance(v, (str, dict)), "a name or an object"),
    # Why this scenario and cut: the user's flag, or auto's evidence (probe accuracy per cut, data size, threshold).
    "decision": (lambda v: isinstance(v, dict) and (v.get("chosen_by") == "user" or (
        v.get("chosen_by") == "auto" and isinstance(v.get("probe_accuracy"), dict) and len(v["probe_accuracy"]) > 0
        and all(isinstance(k, str) and isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
                for k, a in v["probe_accuracy"].items())
        and isinstance(v.get("images_per_class"), (int, float)) and not isinstance(v["images_per_class"], bool)
        and isinstance(v.get("small_threshold"), int) and not isinstance(v["small_threshold"], bool)
        and v["small_threshold"] > 0)),
        "an object: chosen_by 'user', or 'auto' with probe_accuracy (cut -> 0..1), images_per_class "
        "and small_threshold"),
    "frozen_layers": (_is_object, "an object"),
    "bn_frozen": (_is_str_list, "a list of layer names"),
    "hyper_parameters": (_is_object, "an object"),
    "metrics": (_is_object, "an object"),
    "dataset": (_is_object, "an object"),
    "signatures": (_is_object, "an object of signature name -> method name"),
    "package_versions": (_is_object, "an object"),
    "trunk": (lambda v: _is_trunk(v), "a trunk declaration {fingerprint, base, cut_layer, input_shape[, segments]}: segments "
              "[{cut_layer, fingerprint}, ...] of distinct fingerprints, the last one the trunk's own"),
}
# Exports from before the schema was versioned carry no schema_version; they are read as 0.
LEGACY_SCHEMA_VERSION = 0


def validate_lineage(record: Any, source: str = LINEAGE_FILE) -> dict:
    """Check a lineage record against the schema and return it as a dict.

    Known keys must have their types; unknown keys are kept (a newer writer's).
    A record without ``schema_version`` is a legacy export and is accepted as
    version 0. Raises ValueError naming ``source`` and the first bad key.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        if key in LINEAGE_KEYS:
            check, wanted = LINEAGE_KEYS[key]
            if not check(value):
                raise ValueError(f"{source}: {key!r} must be {wanted}, got {value!r}")
    return dict(record)


def lineage_schema_version(record: Mapping) -> int:
    """The schema version of a validated record (LEGACY_SCHEMA_VERSION when it has none)."""
    return int(record.get("schema_version", LEGACY_SCHEMA_VERSION))


def new_lineage(**fields: Any) -> dict:
    """A lineage record of the current schema from ``fields``, validated."""
    return validate_lineage({"schema_version": LINEAGE_SCHEMA_VERSION, **fields}, "lineage")


def read_lineage(version_dir: str | os.PathLike) -> dict | None:
    """The validated lineage of a version; None when the version has no lineage file.

    Raises ValueError naming the file when it cannot be read, is not JSON, or
    breaks the schema.
    """
    path = lineage_path(version_dir)
    text = _read_optional(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return validate_lineage(data, str(path))


def training_summary(lineage: Mapping[str, Any]) -> dict:
    """Base, scenario name, accuracy and created_at of a lineage record (None where absent).

    ``accuracy`` is the validation accuracy, else the training accuracy.
    """
    scenario = lineage.get("scenario")
    if isinstance(scenario, Mapping):
        scenario = scenario.get("name", scenario.get("scenario"))
    metrics = lineage.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    accuracy = next((metrics[key] for key in ("val_accuracy", "accuracy")
                     if isinstance(metrics.get(key), int | float) and not isinstance(metrics.get(key), bool)),
                    None)
    return {"base": lineage.get("base"), "scenario": scenario, "accuracy": accuracy,
            "created_at": lineage.get("created_at")}


def trunk_of(lineage: Mapping[str, Any] | None) -> dict | None:
    """The trunk a version declares (``TRUNK_KEYS``), or None when its trunk was trained."""
    if not lineage:
        return None
    trunk = lineage.get("trunk")
    return dict(trunk) if isinstance(trunk, dict) else None


# -- shared trunks (assets.extra/graft-segments, graft-head, graft-trunk) ------------------
#
# A version that declares a trunk also carries it apart from its head, so that a server
# can load the trunk once per fingerprint and each version's head alone. The version's
# own SavedModel stays whole and standalone; these are extra.
#
# The trunk (its first segment, below, or the whole trunk of an older export) has one
# signature per version signature that can share it, named in SHARED_SIGNATURES: the
# version signature's inputs, same names and specs, in; FEATURES_KEY (float32, batch
# first) out. The head SavedModel has a signature of the version signature's own name:
# FEATURES_KEY in, that signature's outputs out.
# So version signature S == head[S](trunk[SHARED_SIGNATURES[S]](inputs)).

FEATURES_KEY = "features"
# Version signature -> the trunk signature that computes its features.
SHARED_SIGNATURES = {"serving_default": "images", "predict_images": "image_bytes", "classify": "examples"}


# A declaration with segments carries the trunk cut into them (SEGMENTS_DIR):
# segment 0 has the trunk SavedModel's signatures (SHARED_SIGNATURES' values); every
# later one has the one signature SEGMENT_SIGNATURE, FEATURES_KEY in (the segment
# before's features) and FEATURES_KEY out. So trunk[T](x) == segment_k[SEGMENT_SIGNATURE](
# ... segment_1[SEGMENT_SIGNATURE](segment_0[T](x))). Two versions whose segment i has
# the same fingerprint compute the same features up to there (the fingerprint covers
# every layer before it), whatever their cuts: a server may run that prefix once for both.
SEGMENT_SIGNATURE = "features"


def trunk_segments(version_dir: str | os.PathLike, lineage: Mapping[str, Any] | None) -> list[tuple[str, Path]]:
    """(fingerprint, SavedModel directory) of each segment a version declares and carries, shallowest first;
    empty when it declares none or lacks any of their SavedModels."""
    declared = (trunk_of(lineage) or {}).get("segments") or []
    paths = [segment_model_path(version_dir, index) for index in range(len(declared))]
    if not declared or not all((path / SAVED_MODEL_FILE).is_file() for path in paths):
        return []
    return [(segment["fingerprint"], path) for segment, path in zip(declared, paths)]


def shared_parts(version_dir: str | os.PathLike) -> tuple[list[tuple[str, Path]], Path] | None:
    """(trunk segments, head) of a version that declares its trunk and carries it apart, else None.

    The segments are ``trunk_segments``'; a version exported before trunks were cut
    into segments carries its trunk whole (``trunk_model_path``), its one segment.
    """
    head = head_model_path(version_dir)
    if not (head / SAVED_MODEL_FILE).is_file():
        return None
    try:
        lineage = read_lineage(version_dir)
    except ValueError:
        return None
    declared = trunk_of(lineage)
    if declared is None:
        return None
    segments = trunk_segments(version_dir, lineage)
    if segments:
        return segments, head
    whole = trunk_model_path(version_dir)
    return ([(declared["fingerprint"], whole)], head) if (whole / SAVED_MODEL_FILE).is_file() else None


def short_fingerprint(fingerprint: str) -> str:
    """The prefix of a trunk fingerprint that metrics and logs show (never the whole hash)."""
    return fingerprint[:12]


def read_class_names(version_dir: str | os.PathLike) -> list[str]:
    """The class names of a version: ``assets/labels.txt``, else the lineage's ``class_names``.

    Raises ValueError when the version has neither.
    """
    path = class_names_path(version_dir)
    if path.is_file():
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    lineage = read_lineage(version_dir)
    if lineage and lineage.get("class_names"):
        return list(lineage["class_names"])
    raise ValueError(f"{version_dir}: no {ASSETS_DIR}/{CLASS_NAMES_FILE} and no class_names in the lineage")


# -- saved_model.pb signatures --------------------------------------------------------------

def _saved_model_class():
    # The SavedModel message around TensorBoard's TensorFlow-free copy of MetaGraphDef
    # (same wire format), so that reading signatures never loads TensorFlow.
    from tensorboard.compat.proto import meta_graph_pb2

    pool = descriptor_pool.Default()
    name = "graft/contract/saved_model.proto"
    try:
        file = pool.FindFileByName(name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name=name, package="graft.contract", syntax="proto3",
            dependency=[meta_graph_pb2.DESCRIPTOR.name])
        message = proto.message_type.add(name="SavedModel")
        message.field.add(name="saved_model_schema_version", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        message.field.add(name="meta_graphs", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                          type_name=".tensorboard.MetaGraphDef")
        file = pool.Add(proto)
    return message_factory.GetMessageClass(file.message_types_by_name["SavedModel"])


def read_saved_model(version_dir: str | os.PathLike):
    """The parsed ``saved_model.pb`` of a version (a SavedModel message).

    Raises ValueError naming the file when it is missing, unreadable or not a SavedModel.
    """
    path = Path(version_dir) / SAVED_MODEL_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    saved = _saved_model_class()()
    try:
        saved.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or others on truncated data
        raise ValueError(f"{path} is not a valid SavedModel: {exc}") from exc
    return saved


def _serve_graph(saved, path: Path):
    for meta_graph in saved.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError(f"{path / SAVED_MODEL_FILE} has no meta graph tagged {SERVE_TAG!r}")


def read_signature_defs(version_dir: str | os.PathLike) -> dict:
    """Signature name -> SignatureDef of the ``serve`` meta graph, as stored in saved_model.pb.

    Internal entries such as ``__saved_model_init_op`` are left out. The messages
    have TensorFlow's wire format; ``type(x).FromString(sig.SerializeToString())``
    turns one into another message class of the same definition. Raises ValueError
    when the file is not a SavedModel or has no ``serve`` graph.
    """
    graph = _serve_graph(read_saved_model(version_dir), Path(version_dir))
    return {k: v for k, v in sorted(graph.signature_def.items()) if not k.startswith("__")}


def set_method_names(version_dir: str | os.PathLike, methods: Mapping[str, str]) -> None:
    """Rewrite the method_name of the named signatures in ``saved_model.pb``, in place.

    Exporters write ``tensorflow/serving/predict`` for every signature; TF Serving's
    Classify and Regress APIs need their own method names. Raises KeyError for a
    signature that is not there and ValueError for a method name outside METHODS.
    """
    path = Path(version_dir)
    saved = read_saved_model(path)
    graph = _serve_graph(saved, path)
    for name, method in methods.items():
        if method not in METHODS:
            raise ValueError(f"unknown method name {method!r} for signature {name!r}")
        if name not in graph.signature_def:
            raise KeyError(f"no signature {name!r} in {path / SAVED_MODEL_FILE}")
        graph.signature_def[name].method_name = method
    (path / SAVED_MODEL_FILE).write_bytes(saved.SerializeToString())
