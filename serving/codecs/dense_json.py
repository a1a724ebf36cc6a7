"""A predict body holding one numeric array, read without building a Python object per number.

``{"instances": [[[0.1, ...]]]}`` for a 96x96x3 image is 27,648 numbers. orjson
plus ``np.asarray`` spend GIL time on it creating and then discarding a Python
float and a list per element; this reader creates none (docs/benchmarks.md):

1. *Structure.* Deleting every byte a JSON number or whitespace can contain
   leaves the body's skeleton (``{"instancs":[[,,],[,,]]}``). When the skeleton
   holds exactly one array and that array is the last value of the object, its
   shape follows from its first elements, and the skeleton must then equal the
   one rectangular array of that shape has, byte for byte: a ragged array or a
   non-numeric leaf can never match.
2. *Numbers.* pysimdjson validates the whole body as strict JSON and copies the
   array's numbers into a float64 buffer in C.

Anything else returns None: strings or objects in the array, NaN, ragged
lists, a second array such as ``output_filter``, a ``[`` inside a string before
the array, numbers beyond float64. The caller then takes the general orjson
path, which owns every error message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import simdjson

# Every byte a JSON number or insignificant whitespace may contain.
_NUMBER_AND_SPACE = b"0123456789.-+eE \t\n\r"
_ROW_KEY, _COLUMN_KEY = "instances", "inputs"
# The deepest array taken here (codec.MAX_JSON_RANK applies on the general path).
MAX_RANK = 32
# A thread's parser keeps the capacity of the largest body it parsed; larger
# bodies get a parser of their own that is freed with them.
_POOLED_BYTES = 4 << 20


class ParserPool:
    """simdjson parsers, one per thread, reused for bodies up to a few MiB."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> simdjson.Parser:
        """A parser for a body of ``size`` bytes: this thread's own, or a fresh one for a large body."""
        if size > _POOLED_BYTES:
            return simdjson.Parser()
        parser = getattr(self._local, "parser", None)
        if parser is None:
            parser = self._local.parser = simdjson.Parser()
        return parser


@dataclass(frozen=True)
class DenseBody:
    """A predict body whose ``key`` ("instances" or "inputs") is one rectangular numeric array."""

    key: str
    values: np.ndarray  # float64, in the array's exact shape
    fields: dict[str, Any]  # the body's other top-level keys (signature_name...), parsed
    raw: bytes = field(repr=False)  # the body itself, for a caller that needs its JSON types

    def as_body(self) -> dict[str, Any]:
        """The body as the general path would have parsed it, with the array as an ndarray."""
        return {**self.fields, self.key: self.values}


class DenseReader:
    """Reads :class:`DenseBody` from request bodies; one simdjson parser per thread."""

    def __init__(self):
        self._parsers = ParserPool()

    def read(self, raw: bytes) -> DenseBody | None:
        """The body as a DenseBody, or None when it is anything else (including invalid JSON)."""
        shape = _dense_shape(raw)
        if shape is None:
            return None
        parser = self._parsers.get(len(raw))
        try:
            return _read(parser, raw, shape)
        except (ValueError, TypeError, RuntimeError, KeyError):
            # Not strict JSON, a non-numeric leaf, or a number beyond float64 / int64:
            # the general path decides (it accepts NaN and Infinity, as TF Serving does).
            return None


def _read(parser: simdjson.Parser, raw: bytes, shape: tuple[int, ...]) -> DenseBody | None:
    doc = parser.parse(raw)
    array = None
    try:
        if not isinstance(doc, simdjson.Object):
            return None
        keys = list(doc.keys())
        present = [k for k in (_ROW_KEY, _COLUMN_KEY) if k in keys]
        if len(present) != 1 or len(set(keys)) != len(keys):
            return None
        key = present[0]
        array = doc[key]
        if not isinstance(array, simdjson.Array):
            return None
        # The skeleton holds this one array only, so its shape is ``shape``
        # unless a list was empty ("[]" and "[5]" look alike): the count tells.
        values = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
        if values.size != _product(shape):
            return None
        others = {k: plain(doc[k]) for k in keys if k != key}
    finally:
        # The parser refuses to parse again while proxies into its document live.
        del doc, array
    return DenseBody(key=key, values=values.reshape(shape), fields=others, raw=raw)


def plain(value: Any) -> Any:
    """A simdjson value as plain Python (dict, list, str, number), detached from its document."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _product(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _dense_shape(raw: bytes) -> tuple[int, ...] | None:
    """The shape of the body's only array when it is rectangular and last in the object, else None."""
    skeleton = raw.translate(None, _NUMBER_AND_SPACE)
    start = skeleton.find(b"[")
    if start < 0 or not skeleton.endswith(b"]}") or not skeleton.startswith(b"{"):
        return None
    array = skeleton[start:-1]
    shape = _first_shape(array)
    if shape is None or _skeleton(shape) != array:
        return None
    return shape


def _first_shape(array: bytes) -> tuple[int, ...] | None:
    """The shape implied by the first element at every depth of an array skeleton."""
    rank = len(array) - len(array.lstrip(b"["))
    if rank == 0 or rank > MAX_RANK:
        return None
    # The first list at depth d (1 = outermost) ends where the first run of
    # rank-d+1 closing brackets ends; its skeleton is n commas-separated copies of
    # the list one level down, plus its own two brackets.
    shape: list[int] = []
    inner_length = None
    for depth in range(rank, 0, -1):
        run = rank - depth + 1
        end = array.find(b"]" * run)
        if end < 0:
            return None
        length = end + run - (depth - 1)  # from this list's "[" to its "]", inclusive
        if inner_length is None:
            count = length - 1  # "[,,]": n - 1 commas, so n = length - 1
        else:
            count, rest = divmod(length - 1, inner_length + 1)
            if rest:
                return None
        if count < 1:
            return None
        shape.append(count)
        inner_length = length
    return tuple(reversed(shape))


@lru_cache(maxsize=64)
def _skeleton(shape: tuple[int, ...]) -> bytes:
    """The skeleton of a rectangular numeric array of ``shape`` (at least one dimension)."""
    text = b"[" + b"," * (shape[-1] - 1) + b"]"
    for n in reversed(shape[:-1]):
        text = b"[" + b",".join([text] * n) + b"]"
    return text
