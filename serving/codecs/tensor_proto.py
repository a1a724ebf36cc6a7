"""TensorProto <-> numpy and TF Serving's Input -> tf.Examples, for its gRPC API and warmup records.

TensorProtos become arrays with ``np.frombuffer`` on ``tensor_content`` (no
per-element loop) where the sender used it; bad content raises ``InvalidArgument``.
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import InvalidArgument

# DataType enum -> (numpy dtype, TensorProto value field). Little-endian explicitly,
# because tensor_content is little-endian whatever the host is.
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    types_pb2.DT_HALF: (np.dtype("<f2"), "half_val"),
    types_pb2.DT_INT8: (np.dtype("i1"), "int_val"),
    types_pb2.DT_INT16: (np.dtype("<i2"), "int_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_UINT8: (np.dtype("u1"), "int_val"),
    types_pb2.DT_UINT16: (np.dtype("<u2"), "int_val"),
    types_pb2.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype("?"), "bool_val"),
    types_pb2.DT_STRING: (np.dtype(object), "string_val"),
}
_ENUM_BY_DTYPE: dict[np.dtype, int] = {
    np.dtype(dt).newbyteorder("="): enum for enum, (dt, _) in _DTYPES.items()
}


def tensor_proto_to_numpy(tp: tensor_pb2.TensorProto, *, max_elements: int) -> np.ndarray:
    """TensorProto -> ndarray; InvalidArgument on unsupported dtype or inconsistent content."""
    entry = _DTYPES.get(tp.dtype)
    if entry is None:
        raise InvalidArgument(f"unsupported tensor dtype {types_pb2.DataType.Name(tp.dtype)}"
                              if tp.dtype in types_pb2.DataType.values()
                              else f"unknown tensor dtype {tp.dtype}")
    dtype, field = entry
    if tp.tensor_shape.unknown_rank:
        raise InvalidArgument("tensor shape has unknown rank")
    shape = tuple(d.size for d in tp.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidArgument(f"tensor of {count} elements exceeds the limit of {max_elements}")
    # An empty tensor may still claim absurd other dimensions, which numpy cannot even shape.
    if math.prod(d for d in shape if d) > max_elements:
        raise InvalidArgument(f"tensor shape {list(shape)} exceeds the limit of {max_elements} elements")
    # Each read of a bytes field copies it: read the (possibly megabytes of) content once.
    content = tp.tensor_content
    if content:
        if dtype.kind == "O":
            raise InvalidArgument("DT_STRING tensors must use string_val, not tensor_content")
        if len(content) != count * dtype.itemsize:
            raise InvalidArgument(
                f"tensor_content holds {len(content)} bytes but shape {list(shape)} of "
                f"{dtype.name} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    values = getattr(tp, field)
    n = len(values)
    if n > count:
        raise InvalidArgument(f"tensor has {n} values but shape {list(shape)} holds {count}")
    if dtype.kind == "O":
        arr = np.empty(count, dtype=object)
        if n:
            arr[:n] = list(values)
            arr[n:] = values[-1]
        else:
            arr[:] = b""
        return arr.reshape(shape)
    if tp.dtype == types_pb2.DT_HALF:
        # half_val carries the raw IEEE bits in int32 slots.
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        flat = np.asarray(values, dtype=dtype.newbyteorder("="))
    if n == count:
        return flat.reshape(shape)
    # TF's Tensor::FromProto rule: missing values repeat the last one, or are zero.
    out = np.zeros(count, dtype=dtype.newbyteorder("="))
    if n:
        out[:n] = flat
        out[n:] = flat[-1]
    return out.reshape(shape)


def numpy_to_tensor_proto(arr: np.ndarray) -> tensor_pb2.TensorProto:
    """ndarray -> TensorProto: tensor_content for numbers, string_val for strings."""
    arr = np.asarray(arr)
    tp = tensor_pb2.TensorProto()
    for size in arr.shape:
        tp.tensor_shape.dim.add().size = size
    if arr.dtype.kind in "OSU":
        tp.dtype = types_pb2.DT_STRING
        tp.string_val.extend(
            v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.reshape(-1).tolist()
        )
        return tp
    enum = _ENUM_BY_DTYPE.get(arr.dtype.newbyteorder("="))
    if enum is None:
        raise InvalidArgument(f"dtype {arr.dtype} has no TensorProto equivalent")
    tp.dtype = enum
    tp.tensor_content = np.ascontiguousarray(arr, dtype=_DTYPES[enum][0]).tobytes()
    return tp


def examples_from_input(input_proto) -> tuple[list[bytes], bytes | None]:
    """The serialized tf.Examples of a TF Serving ``Input`` message, and its context (or None)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples], None
    if kind == "example_list_with_context":
        listed = input_proto.example_list_with_context
        return [e.SerializeToString() for e in listed.examples], listed.context.SerializeToString()
    raise InvalidArgument("Input is empty")
