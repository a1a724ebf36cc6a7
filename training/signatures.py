"""Whether a candidate version can replace the current one for existing clients: its signatures and classes.

Read from ``saved_model.pb`` through graft.contract, without loading TensorFlow,
so a promotion decides on compatibility before it spends time evaluating.
"""

from __future__ import annotations

import os

from tensorboard.compat.proto import types_pb2

from graft import contract


def dtype_name(enum: int) -> str:
    """TensorFlow's name for a DataType enum ("float32", "int64", "string"), without TensorFlow."""
    try:
        name = types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"
    base = name.removeprefix("DT_").lower()
    ref = base.endswith("_ref")
    base = base.removesuffix("_ref")
    # The proto's names for these three predate TensorFlow's width-suffixed ones.
    base = {"float": "float32", "double": "float64", "half": "float16"}.get(base, base)
    return base + ("_ref" if ref else "")


def read_signatures(path: str | os.PathLike) -> dict[str, dict]:
    """Signature name -> {"method", "inputs", "outputs"} of a version's ``serve`` graph (no TF load).

    Each input/output maps alias -> (dtype name, shape) with None for unknown
    dimensions and a None shape for unknown rank. ValueError when ``path``
    holds no readable SavedModel.
    """
    def tensors(infos) -> dict[str, tuple]:
        found = {}
        for alias, info in sorted(infos.items()):
            shape = None if info.tensor_shape.unknown_rank else tuple(
                dim.size if dim.size >= 0 else None for dim in info.tensor_shape.dim)
            found[alias] = (dtype_name(info.dtype), shape)
        return found

    return {name: {"method": sig.method_name, "inputs": tensors(sig.inputs), "outputs": tensors(sig.outputs)}
            for name, sig in contract.read_signature_defs(path).items()}


def signature_differences(current: str | os.PathLike, candidate: str | os.PathLike) -> list[str]:
    """Why ``candidate`` cannot replace ``current`` for existing clients (empty when it can).

    Every signature of the current version must exist in the candidate with the
    same method, input and output names, dtypes and shapes; the class lists
    (assets/labels.txt) must be equal. Extra candidate signatures are fine.
    """
    differences = []
    old, new = read_signatures(current), read_signatures(candidate)
    for name, spec in old.items():
        if name not in new:
            differences.append(f"signature {name!r} is missing")
            continue
        other = new[name]
        if spec["method"] != other["method"]:
            differences.append(f"signature {name!r}: method {other['method']!r} instead of {spec['method']!r}")
        for side in ("inputs", "outputs"):
            mine, theirs = spec[side], other[side]
            if set(mine) != set(theirs):
                differences.append(f"signature {name!r}: {side} {sorted(theirs)} instead of {sorted(mine)}")
                continue
            for alias, (dtype, shape) in mine.items():
                if theirs[alias][0] != dtype:
                    differences.append(f"signature {name!r}: {side[:-1]} {alias!r} dtype "
                                       f"{theirs[alias][0]} instead of {dtype}")
                if theirs[alias][1] != shape:
                    differences.append(f"signature {name!r}: {side[:-1]} {alias!r} shape "
                                       f"{_shape_text(theirs[alias][1])} instead of {_shape_text(shape)}")
    try:
        old_classes, new_classes = contract.read_class_names(current), contract.read_class_names(candidate)
    except ValueError as exc:
        differences.append(str(exc))
    else:
        if old_classes != new_classes:
            differences.append(f"class list {new_classes} instead of {old_classes}")
    return differences


def _shape_text(shape) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
